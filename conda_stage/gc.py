"""``conda-stage gc``: remove staged copies nobody will clean up.

Mark what is in use, delete the rest, carry on past what cannot be removed
(and say so):

* interactive copies (``$TMPDIR/conda-stage-*/NAME``) whose shell has exited
  without ``conda deactivate``, half-written ``.NAME.partial-PID`` folders
  of staging processes that were killed, and ``conda-stage-*.trash``
  folders of copies whose removal in the background ('conda deactivate')
  did not finish (its process died) -- run by the user;
* with ``--jobs``, Slurm job folders (``<staging dir>/<job id>``) and their
  manifests of jobs the scheduler no longer runs, e.g. after a node crash
  that skipped the epilog -- run by root (a cron job or a node health
  check).  SGE needs no such pass: execd deletes each job's TMPDIR.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from . import output
from .errors import StageError
from .jobdir import JobDir, UnsafeBase, open_base, valid_key
from .store import (find_copies, find_trash, live_holders, own_parents, remove_copy,
                    remove_trash, remove_tree)

_PARTIAL = re.compile(r"^\.(.+)\.partial-([0-9]+)$")


def collect(base: Path, *, dry_run: bool = False) -> list[Path]:
    removed, failed = [], []

    def drop(path: Path, why: str, remove) -> None:
        if dry_run:
            output.info(f"Would remove {path} ({why})")
            removed.append(path)
            return
        output.info(f"Removing {path} ({why})")
        try:
            remove()
            removed.append(path)
        except OSError as exc:
            output.warn(f"Cannot remove {path}: {exc.strerror or exc}")
            failed.append(path)

    for path, marker in list(find_copies(base)):
        if marker.mode == "interactive" and not live_holders(path, marker):
            drop(path, f"shell {marker.owner_pid} is gone",
                 lambda p=path, m=marker: remove_copy(p, m))
    for path in _dead_partials(base):
        drop(path, "left by a staging process that was killed", lambda p=path: _remove_partial(p))
    for path in find_trash(base):
        if dry_run:
            drop(path, "a copy whose removal did not finish", None)
            continue
        try:
            if not remove_trash(path):
                output.info(f"Not removing {path}: a 'conda deactivate' is removing it")
                continue
            output.info(f"Removed {path} (a copy whose removal did not finish)")
            removed.append(path)
        except (OSError, StageError) as exc:
            output.warn(f"Cannot remove {path}: {getattr(exc, 'strerror', None) or exc}")
            failed.append(path)
    from .shellimage import collect as collect_images

    removed += collect_images(dry_run=dry_run)
    if not removed and not failed:
        output.info(f"Nothing to collect in {base}")
    return removed


def _dead_partials(base: Path):
    """``conda-stage-*/.NAME.partial-PID`` folders of the current user whose
    process is gone."""
    for parent in own_parents(base):
        try:
            entries = list(os.scandir(parent))
        except OSError:
            continue
        for entry in entries:
            m = _PARTIAL.match(entry.name)
            if m and entry.is_dir(follow_symlinks=False) and not _pid_exists(int(m.group(2))):
                yield Path(entry.path)


def _pid_exists(pid: int) -> bool:
    import psutil  # here: the common case, nothing to collect, never needs it

    return psutil.pid_exists(pid)


def _remove_partial(path: Path) -> None:
    remove_tree(path)
    try:
        path.parent.rmdir()  # the conda-stage-XXXX folder made for it, if now empty
    except OSError:
        pass


def collect_jobs(staging_dir: Path, state_dir: Path, is_active, *,
                 dry_run: bool = False, keep: float = 300.0,
                 keep_share: float = 0.25, shell_images: bool = False) -> list[Path]:
    """(root) Job folders and manifests of jobs that ``is_active(job_id,
    scheduler)`` says no longer run; then the shared copies (see
    :func:`collect_store`)."""
    if os.geteuid() != 0:
        raise StageError("'conda-stage gc --jobs' removes other users' job folders: run it as root")
    keys = set()
    for folder, strip in ((staging_dir, ""), (state_dir, ".json"), (state_dir, ".told")):
        try:
            fd = open_base(str(folder), create=False)
        except UnsafeBase as exc:
            if "does not exist" not in str(exc):
                output.warn(f"Not collecting in {folder}: {exc}")
            continue
        try:
            names = os.listdir(fd)
        finally:
            os.close(fd)
        keys |= {n[:len(n) - len(strip)] for n in names
                 if n.endswith(strip) and valid_key(n[:len(n) - len(strip)])}
    removed, failed = [], []
    for key in sorted(keys, key=lambda k: [int(p) for p in k.split(".")]):
        job = JobDir(str(staging_dir), str(state_dir), key)
        manifest = job.read_manifest()
        try:
            if is_active(key.split(".")[0], (manifest or {}).get("scheduler")):
                continue
        except StageError as exc:
            output.warn(str(exc))
            failed.append(key)
            continue
        if dry_run:
            output.info(f"Would remove job {key}'s folder and manifest (it is not running)")
            removed.append(job.path)
            continue
        try:
            gone = job.remove()
        except (OSError, StageError) as exc:
            output.warn(f"Cannot remove job {key}'s files: {getattr(exc, 'strerror', None) or exc}")
            failed.append(key)
            continue
        for path in gone:
            output.info(f"Removed {path} (job {key} is not running)")
        removed += gone
    if not dry_run:
        removed += collect_store(staging_dir, state_dir, is_active, keep=keep,
                                 keep_share=keep_share, shell_images=shell_images)
    if not removed and not failed:
        output.info(f"Nothing to collect in {staging_dir}")
    if failed:
        raise StageError(f"{len(failed)} job folder(s) could not be collected: {', '.join(failed)}")
    return removed


class _Say:
    """The hook-log interface, printed for a person running gc."""

    info = staticmethod(output.info)
    warning = error = staticmethod(output.warn)


def collect_store(staging_dir: Path, state_dir: Path, is_active, *,
                  keep: float = 300.0, keep_share: float = 0.25,
                  shell_images: bool = False) -> list[Path]:
    """(root) Mark, then sweep, every user's shared copies, each user under
    their lock: holders whose job the scheduler no longer runs are dropped;
    copies nobody holds go once unused for ``keep`` seconds, or beyond the
    disk budget (``keep_share`` of the filesystem); folders without a record
    (half-written) go too."""
    from .jobstage import sweep_node
    from .nodestore import NodeStore

    store = NodeStore(str(staging_dir), str(state_dir), keep_unused=keep, keep_share=keep_share,
                      shell_images=shell_images)

    def is_gone(holder: str) -> bool:
        scheduler, _, key = holder.partition(":")
        if scheduler not in ("slurm", "sge"):
            return False
        try:
            return not is_active(key.split(".")[0], scheduler)
        except StageError as exc:
            output.warn(str(exc))
            return False

    return [Path(r.path) for r in sweep_node(store, _Say, "gc", wait=True, is_gone=is_gone)]
