"""Images for interactive shells: with ``CONDA_STAGE_SHELL_IMAGES=yes`` in the
site file, 'conda activate NAME' mounts the environment's image instead of
extracting its tarball -- at the path jobs mount it,
``<staging dir>/users/<uid>/<image id>/NAME``, the path it was relocated for
when it was packed.

The user's folder ``users/<uid>`` is the one the root prolog makes for the
user's jobs; where none did, the shell makes it (the hooks keep ``users/``
sticky and writable by all for that, like /tmp): 0700, the user's.  A
folder that is not the user's (someone made it first) is not used: one line,
and the tarball is extracted as before; the user's next prolog on the node
replaces it.

Who holds an image's mount, in its folder ``users/<uid>/<image id>/``,
changed only under that folder's lock (flock):

    .holder-<pid>-<start>   a shell using it (as for copies in $TMPDIR)
    .job-claim              a job uses it: left by a prolog's staging child,
                            taken away by the root hooks' sweep when no job
                            holds the copy any more

The last shell to leave unmounts it (lazily when busy) and removes the
folder, unless a job uses it; then the job's end does.  The sweep of the
root hooks (:mod:`conda_stage.jobstage`) leaves mounts that live shells
hold, and removes -- as the user -- image folders nobody holds.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

from . import output
from .errors import StageError
from .nocross import open_at
from .nodestore import USERS, valid_id
from .output import printable
from .store import HOLDER_PREFIX, process_start, remove_tree

JOB_CLAIM = ".job-claim"


def site():
    """The site settings, when shells may mount images here; else None."""
    from .config import Config

    try:
        config = Config.load()
    except StageError as exc:  # an untrusted or broken site file: extraction, as before
        output.debug(f"not mounting images: {exc}")
        return None
    if not config.shell_images or config.stage_mode == "extract":
        return None
    return config


def own_folder(staging_dir: str) -> Path | str:
    """The user's folder ``users/<uid>``, made if missing; or why it cannot
    be used (a line for the user)."""
    users = os.path.join(staging_dir, USERS)
    try:
        # O_PATH: with shell images, nobody but root may list it (mode 1733)
        fd = os.open(users, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        return f"this node has no usable {users} ({exc.strerror}; tell your admin)"
    try:
        st = os.fstat(fd)
        if st.st_uid != 0 or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
            return f"{users} is not root's alone (tell your admin)"
        name = str(os.getuid())
        try:
            os.mkdir(name, 0o700, dir_fd=fd)
        except FileExistsError:
            pass
        except OSError as exc:
            return f"cannot make your folder in {users} ({exc.strerror})"
        try:
            # never into a mount on it (EXDEV): another user's FUSE process
            # would answer the fstat below ("yours, 0700")
            mine = open_at(fd, name, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            return f"{users}/{name} is not a folder of yours ({exc.strerror}); tell your admin"
        try:
            st = os.fstat(mine)
        finally:
            os.close(mine)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            return (f"{users}/{name} is not yours alone (uid {st.st_uid} made it, mode "
                    f"{stat.S_IMODE(st.st_mode):o}); tell your admin")
        return Path(users) / name
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder_locked(folder: Path, *, create: bool = True, wait: bool = True):
    """Hold the lock of an image's folder (made if missing, else an OSError
    when it is not there or not a folder); yields None instead when ``wait``
    is False and someone else holds it.  The folder is
    writable while the lock is held, read-only (0555) otherwise: it is on
    jobs' CONDA_ENVS_PATH, where 'conda create' must never pick it."""
    while True:
        if create:
            try:
                os.mkdir(folder, 0o755)
            except FileExistsError:
                pass
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            if create:
                continue
            raise
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield None
                return
            try:  # removed by the one before us: lock the folder that is there now
                same = os.path.samestat(os.fstat(fd), os.stat(folder, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                os.fchmod(fd, 0o755)
                try:
                    yield fd
                finally:
                    with contextlib.suppress(OSError):
                        os.fchmod(fd, 0o555)
                return
            if not create:
                yield None
                return
        finally:
            os.close(fd)


def shell_holders(folder: Path) -> list[int]:
    """PIDs of the live shells holding the image in ``folder``: processes of
    the calling user whose start time matches their holder file (a holder
    file is the user's to write: it names no other user's process, no
    process without its start time, and none that has exited)."""
    found = []
    try:
        names = os.listdir(folder)
    except OSError:
        return found
    for name in names:
        if not name.startswith(HOLDER_PREFIX):
            continue
        try:
            pid, start_ms = (int(x) for x in name[len(HOLDER_PREFIX):].split("-", 1))
            start = process_start(pid)
            owner = os.stat(f"/proc/{pid}").st_uid
        except (ValueError, OSError):
            continue
        if start_ms and abs(start * 1000 - start_ms) < 1000 and owner == os.getuid():
            found.append(pid)
    return found


def has_holder_files(folder: Path) -> bool:
    try:
        return any(n.startswith(HOLDER_PREFIX) or n == JOB_CLAIM for n in os.listdir(folder))
    except OSError:
        return False


def claim_for_job(folder: Path) -> None:
    """(job user, under the folder's lock) A job uses this image."""
    os.close(os.open(folder / JOB_CLAIM, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o644))


def release_job_claim(folder: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folder / JOB_CLAIM)


def unstage(prefix: Path, holder_pid: int, *, force: bool = False) -> bool | None:
    """Let go of an image mount for the shell ``holder_pid``; None when
    ``prefix`` is no image shells hold (the caller goes on).  Unmounted and
    removed when no other live shell holds it and no job uses it (``force``:
    whoever holds it)."""
    folder = prefix.parent
    if not valid_id(folder.name) or not has_holder_files(folder):
        return None
    with folder_locked(folder, create=False) as fd:
        if fd is None:
            return None  # replaced meanwhile
        return _unstage_locked(prefix, fd, holder_pid, force)


def _unstage_locked(prefix: Path, fd: int, holder_pid: int, force: bool) -> bool:
    folder = prefix.parent
    mine = False
    for name in os.listdir(fd):
        if name.startswith(f"{HOLDER_PREFIX}{holder_pid}-"):
            mine = True
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
    if not force:
        if not mine:
            # e.g. a job's 'conda activate NAME' of the copy its prolog
            # mounted, and its 'conda deactivate': the job's end removes it
            output.debug(f"{prefix}: not held by shell {holder_pid}")
            return False
        others = shell_holders(folder)
        if others:
            output.info(f"Keeping {prefix}: {len(others)} other shell(s) still use it "
                        f"(PID {', '.join(map(str, others[:5]))})")
            return False
        if os.path.lexists(folder / JOB_CLAIM):
            output.info(f"Keeping {prefix}: a job on this node uses it too; the job's end "
                        f"removes it")
            return False
    output.info("Unstaging and reverting to original Conda environment  ...")
    output.info(f"Unmounting staged Conda environment: {prefix}")
    remove_image_folder(folder)
    return True


def remove_image_folder(folder: Path) -> None:
    """(user) Unmount what is mounted in an image's folder (lazily when
    busy) and remove it."""
    from .image import unmount_all

    unmount_all(folder)
    try:
        remove_tree(folder)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise StageError(f"could not remove {printable(str(folder))}: "
                             f"{exc.strerror}") from None


def sweep(folder: Path, recorded: set[str], live: set[str]) -> set[str]:
    """(the user, in the root hooks' sweep, under root's lock for the user)
    The ids of the image folders in the user's ``folder`` that live shells
    hold, or whose lock someone holds (a shell mounting): root keeps them
    for now, and those held that no job holds (not ``live``) lose their
    job claim, so the last shell removes them.  Image folders neither held nor
    ``recorded`` by root -- a shell that died, a prolog that failed -- are
    unmounted and removed (root removes recorded ones with their record,
    after stopping what runs from them)."""
    held = set()
    try:
        names = [n for n in os.listdir(folder) if valid_id(n)]
    except OSError:
        return held
    for cid in names:
        try:
            if _sweep_one(folder / cid, cid, recorded, live):
                held.add(cid)
        except OSError:
            continue  # not a folder (the user's own link, say): root removes no such thing
    return held


def _sweep_one(path: Path, cid: str, recorded: set[str], live: set[str]) -> bool:
    """:func:`sweep` of one image folder; whether it is held."""
    with folder_locked(path, create=False, wait=False) as fd:
        if fd is None:
            return True  # a shell is mounting it right now
        if shell_holders(path):
            if cid not in live:  # no job holds it any more
                release_job_claim(path)
            return True
        if cid in recorded or not (has_holder_files(path) or _is_image_folder(path)):
            return False  # root's, or an extracted copy's folder
        try:
            remove_image_folder(path)
        except StageError:
            pass
    return False


def _is_image_folder(path: Path) -> bool:
    from .image import SUFFIX

    try:
        return any(n == f".image{SUFFIX}" or n.startswith(f".image{SUFFIX}") for n in
                   os.listdir(path))
    except OSError:
        return False


def collect(*, dry_run: bool = False) -> list[Path]:
    """('conda-stage gc', the user) The user's image folders in this node's
    store whose shells are all gone and that no job uses: unmounted and
    removed."""
    config = site()
    if config is None:
        return []
    folder = Path(config.staging_dir) / USERS / str(os.getuid())
    removed = []
    try:
        names = [n for n in os.listdir(folder) if valid_id(n)]
    except OSError:
        return removed
    for cid in names:
        path = folder / cid
        try:
            if _collect_one(path, dry_run):
                removed.append(path)
        except (StageError, OSError) as exc:
            output.warn(f"Cannot remove {path}: {exc}")
    return removed


def _collect_one(path: Path, dry_run: bool) -> bool:
    with folder_locked(path, create=False, wait=False) as fd:
        if fd is None or shell_holders(path) or os.path.lexists(path / JOB_CLAIM) \
                or not any(n.startswith(HOLDER_PREFIX) for n in os.listdir(fd)):
            return False
        if dry_run:
            output.info(f"Would remove {path} (its shells are gone)")
        else:
            output.info(f"Removing {path} (its shells are gone)")
            remove_image_folder(path)
    return True
