"""Helpers of the image-mode suites (tests/test_image_slurm.py,
tests/test_image_sge.py, tests/test_attack_image.py).

* :func:`users_may_mount` -- squashfuse and squashfs-tools present and
  /dev/fuse usable by users (Debian's udev default, 0666) for a ``with``
  block, what it was restored afterwards;
* :func:`pack_image` -- ``conda stage --pack --image NAME`` as the
  environment's owner; :func:`image_file`, :func:`image_sidecar`,
  :func:`image_meta` -- the image next to the environment and its sidecar;
* what is mounted and running: :func:`mount_lines` and :func:`mount_points`
  (mounts under a staging folder), :func:`fuse_mounts` (FUSE mounts of a
  user, anywhere), :func:`fuse_processes` (``squashfuse_ll`` processes,
  optionally with the FUSE helpers), :func:`nothing_left` (the check after
  a job: no mount, no ``squashfuse_ll`` after a short wait, empty staging
  and state folders);
* the jobs of the image suites: :data:`PROBE` (where ``conda activate``
  landed), :data:`RUN` (a job that runs until ended), :func:`values` (the
  ``key=value`` lines it printed), :func:`end_sge_job_early`.

PYTEST_DONT_REWRITE is not set: the test modules register this module for
assertion rewriting before importing it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest

from .sitecfg import store_listing


# ----------------------------------------------------------------- FUSE for users
@contextlib.contextmanager
def users_may_mount():
    """squashfuse_ll and mksquashfs installed (else the test fails), and
    /dev/fuse mode 0666 for the block; its mode restored afterwards."""
    if not shutil.which("squashfuse_ll") or not shutil.which("mksquashfs"):
        pytest.fail("squashfuse and squashfs-tools are needed (tools/bootstrap.sh installs "
                    "them)", pytrace=False)
    mode = os.stat("/dev/fuse").st_mode & 0o777
    os.chmod("/dev/fuse", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", mode)


def shell_users_folder(staging: Path) -> Path:
    """``<staging>/users`` made root 1733, as an admin does for shell images
    on a node (``install -d``); the staging folder root 0755."""
    import subprocess

    for path, mode in ((staging, "0755"), (staging / "users", "1733")):
        subprocess.run(["install", "-d", "-o", "root", "-g", "root", "-m", mode, str(path)],
                       check=True)
    return staging / "users"


# ----------------------------------------------------------------- the image
@contextlib.contextmanager
def attack_envs_with_images(site, stage_bin: Path, people, prefix: str, kit: Path):
    """The attack suites' environments (:func:`tests.harness.attack.attack_envs`:
    the attacker's ``one`` and ``two``, the victim's ``vic``), each with an
    image built by its owner for the site's staging folder; ``kit`` (root
    0755) made for the block and removed afterwards."""
    from .attack import attack_envs

    kit.mkdir(parents=True, exist_ok=True)
    os.chmod(kit, 0o755)
    try:
        with attack_envs(site, stage_bin, people, prefix) as made:
            for key, env in made.items():
                pack_image(site, people.victim if key == "vic" else people.attacker, stage_bin,
                           env.name)
            yield made
    finally:
        shutil.rmtree(kit, ignore_errors=True)


def pack_image(site, user, stage_bin: Path, name: str) -> None:
    """``conda stage --pack --image NAME`` as ``user`` (the image's mount
    path comes from the site file in place); it must say it created one."""
    r = site.shell(user, f'export PATH="{stage_bin}:$PATH"\n'
                         f"conda stage --pack --image {name}")
    assert r.returncode == 0, r.stderr
    assert "INFO: Created image " in r.stderr, r.stderr


def image_file(env) -> Path:
    """``NAME.sqfs`` next to the environment."""
    return env.prefix.parent / f"{env.name}.sqfs"


def image_sidecar(env) -> Path:
    """``NAME.sqfs.json``, the image's sidecar."""
    return env.prefix.parent / f"{env.name}.sqfs.json"


def image_meta(env) -> dict:
    return json.loads(image_sidecar(env).read_text())


# ----------------------------------------------------------------- mounts and processes
def mount_lines(under: Path) -> list[str]:
    """This machine's mountinfo lines naming ``under``."""
    text = Path("/proc/self/mountinfo").read_text()
    return [line for line in text.splitlines() if str(under) in line]


def mount_points(under: Path) -> list[str]:
    """The mount points of :func:`mount_lines`."""
    return [line.split(" ")[4] for line in mount_lines(under)]


def fuse_mounts(uid: int) -> list[str]:
    """Mount points of FUSE filesystems mounted by ``uid`` (any path)."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if " - fuse" in line and re.search(rf"[ ,]user_id={uid}(,|$)", line):
            out.append(line.split(" ")[4])
    return out


def fuse_processes(uid: int | None = None, *, serving: Path | None = None, since: float = 0.0,
                   helpers: bool = False) -> list[psutil.Process]:
    """squashfuse_ll processes (``helpers``: fusermount3 and slowfs ones too)
    of ``uid`` (None: anyone's), whose command line names ``serving`` (when
    given), started at ``since`` or later."""
    found = []
    for p in psutil.process_iter(["name", "uids", "cmdline", "create_time"]):
        info = p.info
        if not info["uids"] or (uid is not None and info["uids"].real != uid):
            continue
        if since and info["create_time"] < since:
            continue
        cmd = " ".join(info["cmdline"] or [])
        if serving is not None and str(serving) not in cmd:
            continue
        if info["name"] == "squashfuse_ll" or (
                helpers and (info["name"] == "fusermount3" or "slowfs" in cmd)):
            found.append(p)
    return found


def nothing_left(staging: Path, state: Path, **which) -> None:
    """After the jobs and gc: nothing mounted under ``staging``, no
    :func:`fuse_processes` (of ``which``) left after at most 10 s, the
    staging and state folders empty."""
    assert mount_points(staging) == [], "image still mounted"
    deadline = time.monotonic() + 10
    while fuse_processes(**which) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert fuse_processes(**which) == [], "a squashfuse_ll process outlived its mount"
    assert store_listing(staging) == [] and store_listing(state) == [], \
        (store_listing(staging), store_listing(state))


# ----------------------------------------------------------------- jobs
PROBE = """
conda activate {name}
echo "prefix=$CONDA_PREFIX"
echo "sys_prefix=$(python -c 'import sys; print(sys.prefix)')"
prefix-probe | sed 's/:/=/'
if mountpoint -q "$CONDA_PREFIX"; then echo "mounted=yes"; fi
"""

RUN = """
conda activate {name}
python -c 'import time; time.sleep(600)' &
echo ready
sleep 600
"""


def values(text: str) -> dict[str, str]:
    """The ``key=value`` lines of a job's output."""
    return dict(line.split("=", 1) for line in text.splitlines() if re.match(r"^\w+=", line))


def end_sge_job_early(cluster, jid: str, how: str):
    """End a running SGE job as ``how`` says -- ``qdel``; ``h_rt``: let its
    time limit end it; ``sigkill``: kill -9 its job shell -- and wait for
    it to leave the queue (its result)."""
    if how == "qdel":
        cluster.delete(jid)
    elif how == "sigkill":
        os.kill(cluster.job_pids(jid)["shell"], signal.SIGKILL)
    return cluster.wait(jid, timeout=120)
