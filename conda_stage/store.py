"""Staged copies on local disk: where they go, how they are marked, how they
are removed.

Every staged copy carries a marker file ``.conda-stage`` (JSON) naming the
original environment, who owns the copy (an interactive shell's PID, or a
batch job) and whether its parent folder was created for it.  Nothing is
removed that does not carry a valid marker.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from . import __version__
from .errors import StageError
from .userfiles import read_bounded

MARKER = ".conda-stage"
PARENT_PREFIX = "conda-stage-"


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
    start = None
    if owner_pid:
        try:
            import psutil

            start = psutil.Process(owner_pid).create_time()
        except Exception:
            start = None
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
    import psutil

    try:
        proc = psutil.Process(marker.owner_pid)
        if marker.owner_start is None:
            return True
        return abs(proc.create_time() - marker.owner_start) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def staging_base(environ=None) -> Path:
    environ = os.environ if environ is None else environ
    for var in ("CONDA_STAGE_TMPDIR", "TMPDIR"):
        value = environ.get(var)
        if value and os.path.isdir(value):
            return Path(value)
    return Path("/tmp")


def new_parent(base: Path) -> Path:
    """A fresh private ``conda-stage-XXXXXXXX`` folder under ``base``."""
    try:
        return Path(tempfile.mkdtemp(prefix=PARENT_PREFIX, dir=base))
    except OSError as exc:
        raise StageError(f"Cannot create a staging folder in {base}: {exc.strerror}") from None


def remove_tree(path: Path) -> None:
    """Remove ``path`` completely, read-only folders included.  Symlinks are
    never followed."""
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


def find_copies(base: Path):
    """Interactive copies under ``base``: ``(prefix, marker)`` pairs of the
    ``conda-stage-*/<name>`` folders the current user owns."""
    uid = os.getuid()
    try:
        entries = list(os.scandir(base))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(PARENT_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != uid:
                continue
            children = list(os.scandir(entry.path))
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


def _start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


@contextmanager
def holders_locked(prefix: Path):
    """Hold the lock of the folder a copy was made in (flock on the folder)."""
    import fcntl

    fd = os.open(Path(prefix).parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
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
    import psutil

    found, seen = [], False
    for path in Path(prefix).parent.glob(f"{HOLDER_PREFIX}*"):
        seen = True
        try:
            pid, start_ms = (int(x) for x in path.name[len(HOLDER_PREFIX):].split("-", 1))
            proc = psutil.Process(pid)
            if not start_ms or abs(proc.create_time() * 1000 - start_ms) < 1000:
                found.append(pid)
        except (ValueError, psutil.Error):
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
