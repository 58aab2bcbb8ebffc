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

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()


def new_marker(original: Path, name: str, mode: str, *, owner_pid=None, job_id=None,
               writable=False, parent_owned=False) -> Marker:
    start = None
    if owner_pid:
        try:
            import psutil

            start = psutil.Process(owner_pid).create_time()
        except Exception:
            start = None
    return Marker(original=str(original), name=name, mode=mode, owner_pid=owner_pid,
                  owner_start=start, job_id=job_id, writable=writable,
                  parent_owned=parent_owned, host=socket.gethostname(),
                  created=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))


MARKER_LIMIT = 64 << 10

# Marker fields and the JSON types they may have.
_MARKER_TYPES = {"original": (str,), "name": (str,), "mode": (str,),
                 "owner_pid": (int, type(None)), "owner_start": (float, int, type(None)),
                 "job_id": (str, type(None)), "writable": (bool,), "parent_owned": (bool,),
                 "host": (str,), "created": (str,), "tool_version": (str,)}


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
