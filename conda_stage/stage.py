"""Stage an environment onto local disk, and unstage it.

stage: open the tarball and read its sidecar once, under a shared lock;
if it is not fresh, pack (interactive) or refuse (job prolog); check the
target path fits the binary placeholders and the disk has room for at least
the tarball, stream-extract and relocate into a temporary name, recompile
the bytecode of the relocated ``.py`` files, mark the copy, make it
read-only, rename it into place.  (unstage, which removes a copy and the
folder made for it, is in :mod:`store`: 'conda deactivate' runs it, and it
needs none of what staging imports.)
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import BinaryIO, NamedTuple

from . import bytecode, formats, imagestage, output
from .errors import StageError
from .extract import extract
from .imagestage import Shared, mount_fresh_image, mount_image
from .locking import file_lock
from .output import printable
from .relocate import Relocator, check_prefix_fits
from .resolve import Env
from .store import (MARKER, add_holder, find_shared, holders_locked, live_holders, new_marker,
                    new_parent, read_marker, remove_tree, staging_base)
from .store import unstage  # noqa: F401 (its home was here; it needs none of the above)
from .tarball import Sidecar, Tarball
from .userfiles import check_planted, open_regular

ACTIVATE_HOOK = "etc/conda/activate.d/zzz.conda-stage-auto.sh"
DEACTIVATE_HOOK = "etc/conda/deactivate.d/000.conda-stage-auto.sh"


class Opened(NamedTuple):
    """A tarball opened for staging, with what its sidecar said.  ``fh`` is
    None when there is no usable tarball; ``sidecar.problem`` says why."""

    tarball: Tarball
    sidecar: Sidecar
    fh: BinaryIO | None

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


def open_tarball(env: Env, lock_timeout: float | None = None,
                 deadline: float | None = None, waiting: str | None = None) -> Opened:
    """The environment's tarball, opened, and its sidecar -- read once,
    under the shared lock (so never half-way through a repack), and checked
    against the opened file.  Once open, the file stays readable even if it
    is replaced.  The tarball must be a regular file (a FIFO is refused,
    never waited on)."""
    with file_lock(Tarball.lock_for(env), shared=True, timeout=lock_timeout, deadline=deadline,
                   waiting=waiting):
        tarball, side = Tarball.load(env)
        if side.meta is None:
            return Opened(tarball, side, None)
        try:
            fh = open_regular(tarball.path, what="tarball")
        except FileNotFoundError:
            return Opened(tarball, side.check(None), None)
        except OSError as exc:
            raise StageError(f"Cannot read the tarball {printable(str(tarball.path))}: "
                             f"{exc.strerror}") from None
        st = os.fstat(fh.fileno())
        try:
            check_planted(env, tarball, st)
        except StageError:
            fh.close()
            raise
        side = side.check(st)
        if side.meta is None:
            fh.close()
            return Opened(tarball, side, None)
        return Opened(tarball, side, fh)


def _time_left(deadline: float | None, what: str) -> float | None:
    """Seconds until ``deadline`` (None: there is none); a StageError once
    it has passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise StageError(f"the time allowed for staging ran out {what}")
    return left


def stage(env: Env, *, path: Path | None = None, base: Path | None = None,
          name: str | None = None, writable: bool = False, owner_pid: int | None = None,
          mode: str = "interactive", job_id: str | None = None,
          repack: bool = True, lock_timeout: float | None = None,
          deadline: float | None = None) -> Path:
    """Stage ``env``; returns the path of the staged copy.

    ``path``: the exact folder to create (must not exist).  Otherwise a new
    ``conda-stage-XXXXXXXX/<name>`` folder under ``base`` (default
    ``$CONDA_STAGE_TMPDIR``, ``$TMPDIR``, ``/tmp``).  With ``repack=False`` a
    missing or stale tarball is an error instead of being rebuilt.
    ``deadline`` (a ``time.monotonic()`` value) bounds lock waits and
    extraction: past it, staging stops with a StageError.

    The sidecar is read once, together with opening the tarball; the copy is
    extracted into ``<parent>/.<name>.partial-<pid of this process>`` and
    renamed into place when complete.
    """
    from .nodestore import copy_id

    for_shell = path is None and mode == "interactive" and owner_pid and not writable
    said = None  # why a fresh image was not mounted (said already)
    if for_shell and _has_image(env):
        from .imagestage import mount_fresh_for_shell

        said = mount_fresh_for_shell(env, owner_pid, deadline)
        if isinstance(said, Path):
            return said
    opened = open_fresh(env, repack=repack, lock_timeout=lock_timeout, deadline=deadline,
                        announce=said is None)
    with opened.fh:
        tid = copy_id(os.getuid(), name or env.name, str(env.prefix),
                      os.fstat(opened.fh.fileno()))
        if for_shell:
            shared = _join_shared(env, Path(base) if base else staging_base(), tid, owner_pid)
            if shared is not None:
                return shared
            if said is None and _has_image(env):
                from .imagestage import mount_for_shell

                mounted = mount_for_shell(env, os.fstat(opened.fh.fileno()), owner_pid,
                                          deadline)
                if mounted is not None:
                    return mounted
        elif writable and path is None and mode == "interactive" and _has_image(env):
            from .shellimage import site

            if site() is not None:
                output.info("Not mounting its image: a writable copy was asked for (--writable); "
                            "extracting it instead")
        return _stage_from(env, opened.sidecar.meta, opened.fh, opened.tarball, path=path,
                           base=base, name=name, writable=writable, owner_pid=owner_pid,
                           mode=mode, job_id=job_id, deadline=deadline, tarball_id=tid)


def _has_image(env: Env) -> bool:
    """Whether ``env`` has an image's sidecar: one stat on the activation's
    path, without importing :mod:`image` (its ``has_image`` also looks for
    an image without a sidecar, which no shell could mount)."""
    return os.path.lexists(env.prefix.parent / (env.prefix.name + ".sqfs.json"))


def _join_shared(env: Env, base: Path, tarball_id: str, owner_pid: int) -> Path | None:
    """Hold a live copy another shell of this user staged from this very
    tarball, instead of extracting again; None if there is none."""
    prefix = find_shared(base, env.prefix, tarball_id)
    if prefix is None:
        return None
    try:
        with holders_locked(prefix):
            marker = read_marker(prefix)  # it may have gone while we waited
            if marker is None or not live_holders(prefix, marker):
                return None
            add_holder(prefix, owner_pid)
    except OSError:
        return None
    output.info(f"Using the copy another shell staged from the same tarball: {prefix}")
    return prefix


def open_fresh(env: Env, *, repack: bool, lock_timeout: float | None = None,
               deadline: float | None = None, announce: bool = True) -> Opened:
    """The environment's tarball, opened, with a fresh sidecar: rebuilt
    first if it is missing or stale and ``repack``, else a StageError that
    says why and what to run.  (``announce``: say what is staged; False
    when an image's attempt said it already.)"""
    if (env.prefix / MARKER).exists():
        raise StageError(f"{env.prefix} is itself a staged copy; stage the original environment")
    if announce:
        imagestage.announce(env)
    waiting = f"Waiting for another process packing {env.prefix} ..." if repack else None
    for attempt in range(3):
        _time_left(deadline, "before its tarball could be read")
        candidate = open_tarball(env, lock_timeout, deadline, waiting=waiting)
        try:
            reason = candidate.sidecar.stale_reason(env)
        except BaseException:
            candidate.close()
            raise
        if reason is None:
            return candidate
        candidate.close()
        if not repack:
            if candidate.sidecar.malformed:
                raise candidate.sidecar.malformed_error(env)
            raise StageError(f"its tarball must be rebuilt first, because {reason} "
                             f"(run 'conda stage --pack {env.prefix}', or activate it once "
                             f"interactively)")
        if attempt < 2:
            _repack(env, reason, lock_timeout, deadline)
    raise StageError(f"No usable tarball for {env.prefix}; run 'conda stage --pack {env.prefix}'")


def stage_shared(env: Env, folder: Path, name: str, *, job_id: str | None = None,
                 lock_timeout: float | None = None, deadline: float | None = None,
                 mode: str = "extract", copy_image: bool = True) -> Shared:
    """(job user, under the node store's lock for this user) The copy of
    ``env`` in the user's store ``folder``: reused when a complete one of
    this very tarball is there (an extracted copy or a mounted image), else
    -- ``mode`` "image" or "auto" -- its image mounted at
    ``folder/<image id>/<name>``, or extracted to ``folder/<id>/<name>``.
    An image whose sidecar says it is current is mounted without reading
    the tarball (:func:`mount_fresh_image`).  A prolog never repacks."""
    from .nodestore import copy_id

    note = None
    if mode in ("image", "auto"):
        mounted = mount_fresh_image(env, Path(folder), name, copy_image, deadline)
        if isinstance(mounted, Shared):
            return mounted
        note = mounted
    opened = open_fresh(env, repack=False, lock_timeout=lock_timeout, deadline=deadline,
                        announce=note is None)
    with opened.fh:
        meta = opened.sidecar.meta
        st = os.fstat(opened.fh.fileno())
        if mode in ("image", "auto") and note is None:
            mounted = mount_image(env, Path(folder), name, st, mode, copy_image, deadline)
            if isinstance(mounted, Shared):
                return mounted._replace(bytes=meta.unpacked_bytes, files=meta.files)
            note = mounted
        cid = copy_id(os.getuid(), name, str(env.prefix), st)
        target = Path(folder) / cid / name
        if read_marker(target) is not None:  # copies appear complete, by rename
            output.info(f"Using the copy on this node: {target}")
            return Shared(target, cid, True, meta.unpacked_bytes, meta.files, note=note)
        os.makedirs(target.parent, mode=0o755, exist_ok=True)
        os.chmod(target.parent, 0o755)  # read-only if an earlier attempt finished it
        _stage_from(env, meta, opened.fh, opened.tarball, path=target, base=None, name=name,
                    writable=False, owner_pid=None, mode="job", job_id=job_id,
                    deadline=deadline)
        return Shared(target, cid, False, meta.unpacked_bytes, meta.files, note=note)


def _repack(env: Env, reason: str, lock_timeout, deadline) -> None:
    parent = env.prefix.parent
    if not os.access(parent, os.W_OK):
        raise StageError(f"Cannot stage {env.prefix}: its tarball must be rebuilt, because "
                         f"{reason}, but you cannot write to {parent}; ask the environment's "
                         f"owner to run 'conda stage --pack {env.prefix}'")
    left = _time_left(deadline, "before its tarball could be rebuilt")
    timeout = lock_timeout if left is None else (left if lock_timeout is None
                                                 else min(left, lock_timeout))
    from .image import keep_current
    from .pack import pack

    pack(env, lock_timeout=timeout)
    keep_current(env, lock_timeout=timeout)


def _stage_from(env, meta, fh, tarball, *, path, base, name, writable, owner_pid, mode, job_id,
                deadline=None, tarball_id=None, relocate_to: str | None = None):
    """Extract into ``path`` (or a new folder under ``base``), relocated for
    that path -- or for ``relocate_to``, where the tree will be seen
    instead (an image mounted there: it keeps the deactivate hook, for the
    shells that mount it)."""
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
        final = relocate_to or str(target)
        check_prefix_fits(final, meta.max_prefix_length)
        # Advisory, from the archive's own numbers (at least the tarball's
        # real size: the sidecar is the user's to write); the extractor
        # checks the space actually left while it writes.
        _check_space(parent, max(os.fstat(fh.fileno()).st_size, meta.unpacked_bytes), meta.files)
        _time_left(deadline, "before extracting")
        output.info(f"Extracting {output.describe_file(tarball.path)} to {target}")
        marker = new_marker(env.prefix, name, mode, owner_pid=owner_pid, job_id=job_id,
                            writable=writable, parent_owned=parent_owned, tarball_id=tarball_id)
        skip = {ACTIVATE_HOOK} | ({DEACTIVATE_HOOK} if mode == "job" and not relocate_to
                                 else set())
        relocator = Relocator(meta.records, final)
        recompiled = []

        def recompile(dest: str, stats) -> None:
            # Relocated .py files no longer match their .pyc, which a
            # read-only copy could not repair: recompile them now.
            started = time.monotonic()
            recompiled.append(bytecode.recompile_relocated(
                dest, final, stats.rewritten, original_prefix=env.prefix,
                deadline=deadline))
            recompiled.append(time.monotonic() - started)

        t0 = time.monotonic()
        with output.Progress("Extracting", meta.unpacked_bytes) as bar, \
                formats.decompressor(fh, meta.format) as stream:
            stats = extract(stream, str(tmp), relocator=relocator, writable=writable,
                            skip=frozenset(skip), extra={MARKER: marker.to_bytes()},
                            progress=bar.update, deadline=deadline, before_seal=recompile)
        os.rename(tmp, target)
        if parent_owned and owner_pid:
            add_holder(target, owner_pid)
    except BaseException:
        try:
            remove_tree(tmp)
        except OSError as exc:
            output.warn(f"Could not remove {tmp}: {exc.strerror}")
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
    if recompiled and recompiled[0]:
        output.info(f"Recompiled {recompiled[0]} .pyc files of relocated .py files "
                    f"({recompiled[1]:.2f} s)")
    if not writable:
        output.info("Made staged environment read-only (use --writable to disable)")
    return target


def _check_space(folder: Path, need_bytes: int, need_files: int) -> None:
    """Refuse early, in one line, when ``folder``'s filesystem has fewer
    free bytes or inodes than the copy needs.  Advisory only."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if free < need_bytes + (16 << 20):
        raise StageError(f"not enough free space on the local disk ({folder}): the copy needs "
                         f"{need_bytes / 1e6:.0f} MB, {free / 1e6:.0f} MB are free")
    if st.f_files and st.f_favail < need_files + 64:
        raise StageError(f"not enough free inodes on the local disk ({folder}): the copy needs "
                         f"{need_files} files, {st.f_favail} more can be created")
