"""Staged copies on local disk: where they go, how they are marked, how they
are removed.

Every staged copy carries a marker file ``.conda-stage`` (JSON) naming the
original environment, who owns the copy (an interactive shell's PID, or a
batch job) and whether its parent folder was created for it.  Nothing is
removed that does not carry a valid marker.
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from . import __version__, output
from .errors import StageError
from .userfiles import read_bounded

MARKER = ".conda-stage"
PARENT_PREFIX = "conda-stage-"
# A copy's ``conda-stage-XXXXXXXX`` folder, renamed when the copy is removed
# in the background: mkdtemp's names never hold a dot, so no folder made for
# a copy has this name.  The remover holds the folder's lock until it is
# gone; one whose lock nobody holds was left by a remover that died, and
# 'conda-stage gc' removes it.
TRASH_SUFFIX = ".trash"


@dataclass
class Marker:
    original: str
    name: str
    mode: str  # "interactive" | "job"
    owner_pid: int | None = None
    owner_start: float | None = None
    job_id: str | None = None
    writable: bool = False
    parent_owned: bool = False
    host: str = ""
    created: str = ""
    tool_version: str = __version__
    tarball_id: str | None = None  # which tarball it came from (shells share such a copy)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()


def new_marker(original: Path, name: str, mode: str, *, owner_pid=None, job_id=None,
               writable=False, parent_owned=False, tarball_id=None) -> Marker:
    import datetime
    import socket

    start = _start_time(owner_pid) if owner_pid else None
    return Marker(original=str(original), name=name, mode=mode, owner_pid=owner_pid,
                  owner_start=start, job_id=job_id, writable=writable,
                  parent_owned=parent_owned, host=socket.gethostname(), tarball_id=tarball_id,
                  created=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))


MARKER_LIMIT = 64 << 10

# Marker fields and the JSON types they may have.
_MARKER_TYPES = {"original": (str,), "name": (str,), "mode": (str,),
                 "owner_pid": (int, type(None)), "owner_start": (float, int, type(None)),
                 "job_id": (str, type(None)), "writable": (bool,), "parent_owned": (bool,),
                 "host": (str,), "created": (str,), "tool_version": (str,),
                 "tarball_id": (str, type(None))}


def read_marker(prefix: Path) -> Marker | None:
    """The marker of the staged copy at ``prefix``; None if there is none or
    it is not a marker conda-stage wrote (wrong types, not a regular file,
    too large): nothing without a valid marker is ever removed."""
    try:
        data = json.loads(read_bounded(Path(prefix) / MARKER, MARKER_LIMIT, what="marker"))
    except (OSError, ValueError, RecursionError, StageError):
        return None
    if not isinstance(data, dict) or not set(data) <= set(_MARKER_TYPES):
        return None
    for key, value in data.items():
        types = _MARKER_TYPES[key]
        if type(value) not in types or (isinstance(value, str) and "\0" in value):
            return None
    if data.get("mode") not in ("interactive", "job"):
        return None
    pid, start = data.get("owner_pid"), data.get("owner_start")
    if pid is not None and not 0 <= pid < 1 << 31:
        return None
    if start is not None and not math.isfinite(start):
        return None
    try:
        return Marker(**data)
    except TypeError:  # a required field is missing
        return None


def is_staged_copy(prefix: Path) -> bool:
    return (Path(prefix) / MARKER).exists()


def owner_alive(marker: Marker) -> bool:
    """Whether the shell that staged an interactive copy still runs."""
    if not marker.owner_pid:
        return True  # unknown owner: assume alive, never collect
    try:
        start = process_start(marker.owner_pid)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return marker.owner_start is None or abs(start - marker.owner_start) < 1.0


def staging_base(environ=None) -> Path:
    environ = os.environ if environ is None else environ
    for var in ("CONDA_STAGE_TMPDIR", "TMPDIR"):
        value = environ.get(var)
        if value and os.path.isdir(value):
            return Path(value)
    return Path("/tmp")


def new_parent(base: Path) -> Path:
    """A fresh private ``conda-stage-XXXXXXXX`` folder under ``base``."""
    import tempfile

    try:
        return Path(tempfile.mkdtemp(prefix=PARENT_PREFIX, dir=base))
    except OSError as exc:
        raise StageError(f"Cannot create a staging folder in {base}: {exc.strerror}") from None


def remove_tree(path: Path) -> None:
    """Remove ``path`` completely, read-only folders included.  Symlinks are
    never followed."""
    import shutil

    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    for root, dirs, _files in os.walk(path):
        try:
            os.chmod(root, 0o700)
        except OSError:
            pass
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
    shutil.rmtree(path)


def remove_copy(prefix: Path, marker: Marker) -> None:
    """Remove a staged copy and, if it was made for it, its parent folder."""
    prefix = Path(prefix)
    remove_tree(prefix)
    parent = prefix.parent
    if marker.parent_owned and parent.name.startswith(PARENT_PREFIX):
        try:
            for holder in parent.glob(f"{HOLDER_PREFIX}*"):
                holder.unlink(missing_ok=True)
            parent.rmdir()
        except OSError:
            pass


def own_parents(base: Path, *, trash: bool = False) -> list[Path]:
    """The current user's ``conda-stage-*`` folders under ``base`` (with
    ``trash``: only the ``*.trash`` ones -- copies being removed in the
    background, or left by a remover that died -- else only the others)."""
    uid = os.getuid()
    try:
        entries = list(os.scandir(base))
    except OSError:
        return []
    found = []
    for entry in entries:
        try:
            if (entry.name.startswith(PARENT_PREFIX) and entry.name.endswith(TRASH_SUFFIX) == trash
                    and entry.is_dir(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_uid == uid):
                found.append(Path(entry.path))
        except OSError:
            continue
    return found


def find_copies(base: Path):
    """Interactive copies under ``base``: ``(prefix, marker)`` pairs of the
    ``conda-stage-*/<name>`` folders the current user owns."""
    for parent in own_parents(base):
        try:
            children = list(os.scandir(parent))
        except OSError:
            continue
        for child in children:
            if child.is_dir(follow_symlinks=False):
                marker = read_marker(Path(child.path))
                if marker is not None:
                    yield Path(child.path), marker


# ----------------------------------------------- shells sharing one copy
# An interactive copy made in its own ``conda-stage-XXXXXXXX`` folder can be
# held by several shells of its user: one empty file ``.holder-PID-START``
# per shell next to it, changed under a lock on that folder.
HOLDER_PREFIX = ".holder-"


def process_start(pid: int) -> float:
    """When process ``pid`` started (seconds since the epoch), computed as
    psutil's ``Process(pid).create_time()`` does on Linux -- its start in
    clock ticks after boot (``/proc/PID/stat``) plus the boot time
    (``/proc/stat``) -- without importing psutil (~12 ms of every 'conda
    activate' and 'conda deactivate').  ProcessLookupError when there is no
    such process; another OSError when it cannot be told."""
    if not 0 < pid < 1 << 31:
        raise ProcessLookupError(pid)
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            raise ProcessLookupError(pid) from None
        return _psutil_start(pid)  # no procfs (not Linux)
    try:
        ticks = float(data[data.rindex(b")") + 2:].split()[19])
    except (ValueError, IndexError):
        raise OSError(f"cannot parse /proc/{pid}/stat") from None
    return ticks / os.sysconf("SC_CLK_TCK") + _boot_time()


def _boot_time() -> float:
    with open("/proc/stat", "rb") as fh:
        for line in fh:
            if line.startswith(b"btime"):
                return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


def _psutil_start(pid: int) -> float:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        raise ProcessLookupError(pid) from None
    except psutil.Error as exc:
        raise OSError(str(exc)) from None


def _start_time(pid: int) -> float | None:
    try:
        return process_start(pid)
    except OSError:
        return None


@contextmanager
def holders_locked(prefix: Path):
    """Hold the lock of the folder a copy was made in (flock on the folder);
    yields the locked descriptor."""
    import fcntl

    fd = os.open(Path(prefix).parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def add_holder(prefix: Path, pid: int) -> None:
    start = _start_time(pid)
    name = f"{HOLDER_PREFIX}{pid}-{int(start * 1000) if start else 0}"
    fd = os.open(Path(prefix).parent / name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o600)
    os.close(fd)


def drop_holder(prefix: Path, pid: int) -> None:
    for path in Path(prefix).parent.glob(f"{HOLDER_PREFIX}{pid}-*"):
        path.unlink(missing_ok=True)


def live_holders(prefix: Path, marker: Marker) -> list[int]:
    """PIDs of the shells that hold the copy and still run (the same
    process: its start time matches).  A copy without holder files (made
    before shells shared copies) is held by the marker's owner."""
    found, seen = [], False
    for path in Path(prefix).parent.glob(f"{HOLDER_PREFIX}*"):
        seen = True
        try:
            pid, start_ms = (int(x) for x in path.name[len(HOLDER_PREFIX):].split("-", 1))
            start = process_start(pid)  # raises when it is gone, whatever start_ms says
            if not start_ms or abs(start * 1000 - start_ms) < 1000:
                found.append(pid)
        except (ValueError, OSError):
            continue
    if not seen and marker.tarball_id is None and marker.owner_pid and owner_alive(marker):
        found.append(marker.owner_pid)
    return found


def find_shared(base: Path, original: Path, tarball_id: str):
    """A complete, read-only interactive copy of ``original`` from this very
    tarball that a live shell of the current user holds, or None."""
    for prefix, marker in find_copies(base):
        if (marker.mode == "interactive" and not marker.writable and marker.parent_owned
                and marker.original == str(original) and marker.tarball_id == tarball_id):
            if live_holders(prefix, marker):
                return prefix
    return None


# ------------------------------------------------ removal in the background
def remove_copy_detached(prefix: Path, marker: Marker, lock_fd: int) -> bool:
    """Remove an interactive copy made in its own folder without making the
    caller wait: under the folder's lock (``lock_fd``, from
    :func:`holders_locked`), rename the folder to its trash name -- from then
    on no shell can find or hold the copy -- and remove it in a detached
    process that inherits the lock and holds it until everything is gone.
    That process keeps stderr (a warning if the removal fails) and nothing
    else of the caller's; stdin and stdout are /dev/null.  If it dies, the
    trash folder stays with its lock free, and :func:`remove_trash` ('gc')
    removes it.  Returns False, having changed nothing, when the copy must be
    removed in the foreground instead (not in a folder of its own, or the
    rename failed).  Only for a process without threads (the CLI)."""
    parent = Path(prefix).parent
    if not (marker.parent_owned and parent.name.startswith(PARENT_PREFIX)
            and TRASH_SUFFIX not in parent.name):
        return False
    trash = parent.with_name(parent.name + TRASH_SUFFIX)
    try:
        os.rename(parent, trash)  # never onto a folder of someone else's (sticky /tmp)
    except OSError:
        return False
    try:
        child = os.fork()
    except OSError:
        remove_tree(trash)
        return True
    if child == 0:  # pragma: no cover (a forked process; tests check its work)
        code = 1
        try:
            os.setsid()  # not in the shell's session: no SIGHUP/SIGINT from its terminal
            if os.fork() == 0:  # the remover; its parent exits at once, so no zombie is left
                code = _remover(trash, lock_fd)
            else:
                code = 0
        finally:
            os._exit(code)
    os.waitpid(child, 0)
    return True


def _remover(trash: Path, lock_fd: int) -> int:  # pragma: no cover (a forked process)
    import signal

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    import fcntl

    if lock_fd < 3:  # stdin or stdout were closed: keep the lock out of their way
        lock_fd = fcntl.fcntl(lock_fd, fcntl.F_DUPFD, 3)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.closerange(3, lock_fd)  # nothing of the caller's is held open but the lock
    os.closerange(lock_fd + 1, max(os.sysconf("SC_OPEN_MAX"), lock_fd + 1))
    try:
        remove_tree(trash)
        return 0
    except BaseException as exc:
        from . import output

        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        output.warn(f"Could not remove {trash}: {why}; 'conda-stage gc' removes it")
        return 1


def find_trash(base: Path) -> list[Path]:
    """The current user's trash folders under ``base``."""
    return own_parents(base, trash=True)


def remove_trash(path: Path) -> bool:
    """Remove a trash folder unless a remover still holds its lock (then
    False: it is being removed)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        if os.fstat(fd).st_uid != os.getuid():
            raise StageError(f"{path} is not yours; left alone")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        remove_tree(path)
        return True
    finally:
        os.close(fd)


# ---------------------------------------------------------------- unstage
def unstage(prefix: Path, *, force: bool = False, holder_pid: int | None = None,
            background: bool = False) -> bool:
    """Let go of the staged copy at ``prefix`` for the shell ``holder_pid``
    (default: the calling shell, our parent process) and remove it unless
    other live shells hold it.  Copies staged by a job's prolog are left to
    the epilog.  ``force``: remove it whoever holds it.  ``background``
    (the CLI only, see :func:`store.remove_copy_detached`): a copy made in
    its own folder is renamed out of the way under the folder's lock and
    removed by a detached process, so that 'conda deactivate' does not wait
    for it.  Returns whether it was removed (or is being removed)."""
    prefix = Path(os.path.abspath(prefix))
    marker = read_marker(prefix)
    if marker is None:
        raise StageError(f"Does not look like a staged environment: no {MARKER} file in {prefix}")
    if marker.mode == "job" and marker.job_id is None:  # an image's: shells may hold it
        from .shellimage import unstage as unstage_image

        done = unstage_image(prefix, holder_pid or os.getppid(), force=force)
        if done is not None:
            return done
    if marker.mode == "job" and not force:
        output.info(f"Keeping {prefix}: it was staged for job {marker.job_id} and is removed "
                    f"when the job ends")
        return False
    if marker.mode == "interactive" and marker.parent_owned:
        with holders_locked(prefix) as lock_fd:
            drop_holder(prefix, holder_pid or os.getppid())
            others = [p for p in live_holders(prefix, marker) if p != (holder_pid or os.getppid())]
            if others and not force:
                output.info(f"Keeping {prefix}: {len(others)} other shell(s) still use it "
                            f"(PID {', '.join(map(str, others[:5]))})")
                return False
            if background:
                output.info("Unstaging and reverting to original Conda environment  ...")
                if remove_copy_detached(prefix, marker, lock_fd):
                    output.info(f"Removing staged Conda environment: {prefix} (in the background)")
                    return True
            _remove(prefix, marker, announced=background)
        return True
    _remove(prefix, marker)
    return True


def _remove(prefix: Path, marker, announced: bool = False) -> None:
    if not announced:
        output.info("Unstaging and reverting to original Conda environment  ...")
    t0 = time.monotonic()
    output.info(f"Removing staged Conda environment: {prefix}")
    remove_copy(prefix, marker)
    output.info(f"Total unstage time: {output.seconds(time.monotonic() - t0)}")
