"""Auto-stage-enabled environments for scheduler tests, and proof that a job
left them alone."""
from __future__ import annotations

import hashlib
import os
import shlex
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class EnabledEnv:
    name: str
    prefix: Path

    @property
    def tarball(self) -> Path:
        return self.prefix.parent / f"{self.name}.tar.zst"

    def snapshot(self) -> dict:
        """Every file of the environment, its tarball and sidecar: path ->
        (size, mtime, mode), plus content hashes of tarball and sidecar."""
        state = {}
        for root, dirs, files in os.walk(self.prefix):
            for n in dirs + files:
                p = os.path.join(root, n)
                st = os.lstat(p)
                state[p] = (st.st_size, st.st_mtime_ns, st.st_mode)
        for p in (self.tarball, self.prefix.parent / f"{self.name}.conda-stage.json"):
            st = os.stat(p)
            state[str(p)] = (st.st_size, st.st_mtime_ns, st.st_mode,
                             hashlib.sha256(p.read_bytes()).hexdigest())
        return state


def enable_env(site, user, stage_bin: Path, name: str, *, enable: bool = True,
               packages=("python", "pip", "prefix-probe")) -> EnabledEnv:
    """A fresh environment ``name`` of ``user`` (real conda create), with
    auto-staging enabled by the user's own ``conda stage`` call."""
    prefix = site.create_env(user, name, packages=packages)
    for stale in prefix.parent.glob(f"{name}.*"):
        stale.unlink()
    if enable:
        r = site.shell(user, f'export PATH="{stage_bin}:$PATH"\n'
                             f"conda stage --auto-stage=enable {shlex.quote(name)}")
        if r.returncode != 0:
            raise RuntimeError(f"enabling {name} failed: {r.stderr}")
    return EnabledEnv(name, prefix)


def remove_env(site, user, env: EnabledEnv) -> None:
    for p in env.prefix.parent.glob(f"{env.name}.*"):
        p.unlink()
    lock = env.prefix.parent / f".{env.name}.conda-stage.lock"
    lock.unlink(missing_ok=True)
    site.remove_env(user, env.prefix)


@contextmanager
def job_envs(site, user, stage_bin: Path, prefix: str):
    """The environments scheduler tests use: ``jup`` (python, pip,
    prefix-probe) and ``tools`` (python, prefix-probe) enabled for
    auto-staging, ``plain`` (prefix-probe) not enabled; names start with
    ``prefix``.  Removed afterwards."""
    envs = {
        "jup": enable_env(site, user, stage_bin, f"{prefix}-jup"),
        "tools": enable_env(site, user, stage_bin, f"{prefix}-tools",
                            packages=("python", "prefix-probe")),
        "plain": enable_env(site, user, stage_bin, f"{prefix}-plain", enable=False,
                            packages=("prefix-probe",)),
    }
    try:
        yield envs
    finally:
        for env in envs.values():
            remove_env(site, user, env)
