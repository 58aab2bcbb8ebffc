"""Unprivileged test users, and running commands as them.

Scheduler and conda tests submit jobs and create environments as ordinary users
(uid >= 1000: SGE refuses smaller uids by default), never as root.
"""
from __future__ import annotations

import os
import pwd
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Shared, world-traversable base for everything tests build (not under /root,
# which is 0700, and not under /tmp, which job containers may hide).
TEST_BASE = Path(os.environ.get("CONDA_STAGE_TEST_BASE", "/var/tmp/conda-stage-tests"))


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: Path


def ensure_user(name: str) -> User:
    """Create ``name`` (with a home directory and bash as shell) if missing."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True)
        pw = pwd.getpwnam(name)
    home = Path(pw.pw_dir)
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, pw.pw_uid, pw.pw_gid)
    return User(name, pw.pw_uid, pw.pw_gid, home)


def run_as(user: User | None, argv, *, env=None, cwd=None, timeout=600,
           check=False, input=None) -> subprocess.CompletedProcess:
    """Run ``argv`` as ``user`` (root when None) with exactly ``env``.

    ``runuser`` sets uid, gid and supplementary groups the way a login would;
    ``env -i`` keeps the caller's environment (pytest's, root's) out.
    """
    env = dict(env or {})
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    if user is not None:
        env.setdefault("HOME", str(user.home))
        env.setdefault("USER", user.name)
        env.setdefault("LOGNAME", user.name)
    prefix = ["runuser", "-u", user.name, "--"] if user is not None else []
    cmd = prefix + ["env", "-i"] + [f"{k}={v}" for k, v in env.items()] + list(argv)
    return subprocess.run(cmd, cwd=cwd, timeout=timeout, check=check, input=input,
                          capture_output=True, text=True)
