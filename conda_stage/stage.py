"""Stage an environment onto local disk, and unstage it.

stage: make sure the tarball is fresh (pack if not), check the target path
fits the binary placeholders and the disk has room, stream-extract and
relocate into a temporary name, mark the copy, make it read-only, rename it
into place.  unstage: remove a copy (and the folder made for it).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from . import formats, output
from .errors import StageError
from .extract import extract
from .locking import file_lock
from .pack import needs_pack, pack
from .relocate import Relocator, check_prefix_fits
from .resolve import Env
from .store import (MARKER, new_marker, new_parent, read_marker, remove_copy,
                    remove_tree, staging_base)
from .tarball import Tarball

ACTIVATE_HOOK = "etc/conda/activate.d/zzz.conda-stage-auto.sh"
DEACTIVATE_HOOK = "etc/conda/deactivate.d/000.conda-stage-auto.sh"


def open_tarball(env: Env, lock_timeout: float | None = None):
    """``(meta, file object)`` of the environment's tarball, consistent with
    each other: read under the shared lock, so never half-way through a
    repack.  Once open, the file stays readable even if it is replaced."""
    tarball = Tarball.for_env(env)
    with file_lock(tarball.lock_path, shared=True, timeout=lock_timeout):
        meta = tarball.read_meta()
        if meta is None:
            return None, None, tarball
        fh = open(tarball.path, "rb")
        st = os.fstat(fh.fileno())
        if (st.st_size, st.st_mtime_ns) != (meta.size, meta.mtime_ns):
            fh.close()
            return None, None, tarball
        return meta, fh, tarball


def stage(env: Env, *, path: Path | None = None, base: Path | None = None,
          name: str | None = None, writable: bool = False, owner_pid: int | None = None,
          mode: str = "interactive", job_id: str | None = None,
          repack: bool = True, lock_timeout: float | None = None) -> Path:
    """Stage ``env``; returns the path of the staged copy.

    ``path``: the exact folder to create (must not exist).  Otherwise a new
    ``conda-stage-XXXXXXXX/<name>`` folder under ``base`` (default
    ``$CONDA_STAGE_TMPDIR``, ``$TMPDIR``, ``/tmp``).  With ``repack=False`` a
    missing or stale tarball is an error instead of being rebuilt.
    """
    if (env.prefix / MARKER).exists():
        raise StageError(f"{env.prefix} is itself a staged copy; stage the original environment")
    output.info(f"Staging current Conda environment ({env.prefix}) to local disk ...")
    meta, fh = None, None
    for _attempt in range(3):
        if repack:
            pack(env, lock_timeout=lock_timeout)
        else:
            reason = needs_pack(Tarball.for_env(env))
            if reason is not None:
                raise StageError(f"its tarball must be rebuilt first, because {reason} "
                                 f"(run 'conda stage --pack {env.prefix}', or activate it once "
                                 f"interactively)")
        meta, fh, tarball = open_tarball(env, lock_timeout)
        if meta is not None or not repack:
            break
    if meta is None:
        raise StageError(f"No usable tarball for {env.prefix}; run 'conda stage --pack {env.prefix}'")
    with fh:
        return _stage_from(env, meta, fh, tarball, path=path, base=base, name=name,
                           writable=writable, owner_pid=owner_pid, mode=mode, job_id=job_id)


def _stage_from(env, meta, fh, tarball, *, path, base, name, writable, owner_pid, mode, job_id):
    name = name or env.name
    if path is not None:
        target = Path(os.path.abspath(path))
        if os.path.lexists(target):
            raise StageError(f"Stage folder must not exist: {target}")
        if not target.parent.is_dir():
            raise StageError(f"No such folder: {target.parent}")
        parent, parent_owned = target.parent, False
    else:
        parent = new_parent(Path(base) if base else staging_base())
        target, parent_owned = parent / name, True
    tmp = parent / f".{name}.partial-{os.getpid()}"
    try:
        check_prefix_fits(str(target), meta.max_prefix_length)
        _check_space(parent, meta.unpacked_bytes)
        output.info(f"Extracting {output.describe_file(tarball.path)} to {target}")
        marker = new_marker(env.prefix, name, mode, owner_pid=owner_pid, job_id=job_id,
                            writable=writable, parent_owned=parent_owned)
        skip = {ACTIVATE_HOOK} | ({DEACTIVATE_HOOK} if mode == "job" else set())
        relocator = Relocator(meta.records, str(target))
        t0 = time.monotonic()
        with output.Progress("Extracting", meta.unpacked_bytes) as bar, \
                formats.decompressor(fh, meta.format) as stream:
            stats = extract(stream, str(tmp), relocator=relocator, writable=writable,
                            skip=frozenset(skip), extra={MARKER: marker.to_bytes()},
                            progress=bar.update)
        os.rename(tmp, target)
    except BaseException:
        remove_tree(tmp)
        if parent_owned:
            try:
                parent.rmdir()
            except OSError:
                pass
        raise
    elapsed = time.monotonic() - t0
    output.info(f"Total extract time: {output.seconds(elapsed)} "
                f"({stats.files} files, {stats.bytes / 1e6:.1f} MB)")
    if stats.skipped:
        output.info(f"Disabled the auto-staging hook in the staged copy ({', '.join(stats.skipped)})")
    output.info(f"Unpacking (relocating): {stats.relocated} files rewritten for the new prefix")
    if not writable:
        output.info("Made staged environment read-only (use --writable to disable)")
    return target


def _check_space(folder: Path, needed: int) -> None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if needed and free < needed * 1.05 + (16 << 20):
        raise StageError(f"Not enough free space in {folder}: the environment needs "
                         f"{needed / 1e6:.0f} MB, {free / 1e6:.0f} MB are free")


def unstage(prefix: Path, *, force: bool = False) -> bool:
    """Remove the staged copy at ``prefix``.  Copies staged by a job's
    prolog are left to the epilog unless ``force``.  Returns whether it was
    removed."""
    prefix = Path(os.path.abspath(prefix))
    marker = read_marker(prefix)
    if marker is None:
        raise StageError(f"Does not look like a staged environment: no {MARKER} file in {prefix}")
    if marker.mode == "job" and not force:
        output.info(f"Keeping {prefix}: it was staged for job {marker.job_id} and is removed "
                    f"when the job ends")
        return False
    output.info("Unstaging and reverting to original Conda environment  ...")
    t0 = time.monotonic()
    output.info(f"Removing staged Conda environment: {prefix}")
    remove_copy(prefix, marker)
    output.info(f"Total unstage time: {output.seconds(time.monotonic() - t0)}")
    return True
