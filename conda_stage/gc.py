"""``conda-stage gc``: remove staged copies nobody will clean up.

Mark what is in use, delete the rest:

* interactive copies (``$TMPDIR/conda-stage-*/NAME``) whose shell has exited
  without ``conda deactivate`` -- run by the user;
* with ``--jobs``, Slurm job folders (``<staging dir>/<job id>``) of jobs the
  scheduler no longer runs, e.g. after a node crash that skipped the epilog
  -- run by root (a cron job or a node health check).  SGE needs no such
  pass: execd deletes each job's TMPDIR.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from . import output
from .errors import StageError
from .store import find_copies, owner_alive, remove_copy


def collect(base: Path, *, dry_run: bool = False) -> list[Path]:
    removed = []
    for path, marker in list(find_copies(base)):
        if marker.mode != "interactive" or owner_alive(marker):
            continue
        if dry_run:
            output.info(f"Would remove {path} (shell {marker.owner_pid} is gone)")
        else:
            output.info(f"Removing {path} (shell {marker.owner_pid} is gone)")
            remove_copy(path, marker)
        removed.append(path)
    if not removed:
        output.info(f"Nothing to collect in {base}")
    return removed


def slurm_job_active(job_id: str) -> bool:
    """Whether Slurm still knows ``job_id`` as pending, running or completing."""
    try:
        r = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                           text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StageError(f"Cannot ask Slurm about job {job_id}: {exc}") from None
    if r.returncode != 0:
        if "Invalid job id" in r.stderr:
            return False
        raise StageError(f"Cannot ask Slurm about job {job_id}: {r.stderr.strip()}")
    return bool(r.stdout.strip())


def collect_jobs(staging_dir: Path, *, dry_run: bool = False,
                 is_active=slurm_job_active) -> list[Path]:
    if os.geteuid() != 0:
        raise StageError("'conda-stage gc --jobs' removes other users' job folders: run it as root")
    removed = []
    try:
        entries = sorted(os.scandir(staging_dir), key=lambda e: e.name)
    except FileNotFoundError:
        entries = []
    for entry in entries:
        if not entry.name.isdigit() or is_active(entry.name):
            continue
        verb = "Would remove" if dry_run else "Removing"
        output.info(f"{verb} {entry.path} (job {entry.name} is not running)")
        if not dry_run:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)  # fd-based, never follows symlinks
            else:
                os.unlink(entry.path)
        removed.append(Path(entry.path))
    if not removed:
        output.info(f"Nothing to collect in {staging_dir}")
    return removed
