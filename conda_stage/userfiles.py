"""Opening files a user controls -- the one place that does it.

The root prolog's child (running as the job user) reads the user's
``.condarc`` files, sidecar, tarball, lock files and settings.  Any of them
can be a FIFO (an ``open`` for reading would block forever), a device, a
socket, a folder, or a huge file.  Here every such file is opened
``O_RDONLY|O_NONBLOCK|O_CLOEXEC|O_NOCTTY`` (a FIFO opens at once and a
terminal never becomes the controlling one), must be a regular file by
``fstat`` of what was opened (a ``stat`` beforehand only spares opening
devices in the common case; the ``fstat`` is the guarantee, whatever was
swapped in between), and is read up to a byte limit.

What is refused raises :class:`UnsafeUserFile`, a :class:`StageError` with
one line naming the file and what it is.  Errors of ``open`` itself (no such
file, permission denied) are left to the caller as ``OSError``.
"""
from __future__ import annotations

import fcntl
import os
import stat
from typing import TYPE_CHECKING, BinaryIO

from .errors import StageError
from .output import printable

if TYPE_CHECKING:
    from .resolve import Env

KiB, MiB = 1 << 10, 1 << 20


class UnsafeUserFile(StageError):
    """A user file that is not a regular file, or is too large.  ``reason``
    is the part after the file name ("it is a FIFO (named pipe), not a
    regular file"), for callers that word the message themselves."""

    def __init__(self, path, what: str, reason: str):
        self.path, self.what, self.reason = os.fspath(path), what, reason
        super().__init__(f"Refusing {what} {printable(self.path)}: {reason}")

    def __reduce__(self):
        return type(self), (self.path, self.what, self.reason)


class NotRegularFile(UnsafeUserFile):
    pass


class FileTooLarge(UnsafeUserFile):
    pass


def kind(mode: int) -> str:
    """What a file of ``mode`` is, in words."""
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "an unknown kind of file"


def _refuse(path, what: str, mode: int) -> NotRegularFile:
    return NotRegularFile(path, what, f"it is {kind(mode)}, not a regular file")


def _size(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def _too_large(path, what: str, limit: int) -> FileTooLarge:
    return FileTooLarge(path, what, f"it is larger than {_size(limit)}")


def open_regular_fd(path, *, what: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """A file descriptor of the regular file ``path``.

    ``flags`` is the access mode plus e.g. ``O_CREAT``; ``O_NONBLOCK``,
    ``O_CLOEXEC`` and ``O_NOCTTY`` are always added, and ``O_NONBLOCK`` is
    cleared again once the file is known to be a regular file.  Raises
    :class:`NotRegularFile` for anything else, ``OSError`` if it cannot be
    opened.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise
    else:
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, what, st.st_mode)
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY, mode)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, what, st.st_mode)
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(path, *, what: str) -> BinaryIO:
    """The regular file ``path``, opened for reading (a binary file object)."""
    fd = open_regular_fd(path, what=what)
    try:
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_fd_bounded(fd: int, limit: int, *, path, what: str) -> bytes:
    """All of the open regular file ``fd``, refused if larger than ``limit``
    bytes (by its size, and by what is actually read: it may grow)."""
    if os.fstat(fd).st_size > limit:
        raise _too_large(path, what, limit)
    chunks, total = [], 0
    while total <= limit:
        chunk = os.read(fd, min(limit + 1 - total, 1 * MiB))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > limit:
        raise _too_large(path, what, limit)
    return b"".join(chunks)


def read_bounded(path, limit: int, *, what: str) -> bytes:
    """The contents of the regular file ``path``, at most ``limit`` bytes
    (a larger file is refused, not truncated)."""
    fd = open_regular_fd(path, what=what)
    try:
        return read_fd_bounded(fd, limit, path=path, what=what)
    finally:
        os.close(fd)


def check_planted(env: Env, tarball, st: os.stat_result, kind: str = "tarball",
                   side: os.stat_result | None = None) -> None:
    """A tarball (or image, ``kind``) or its sidecar (``side``: its stat, if
    known) someone else could have put next to a shared environment is not
    used: each must belong to the environment's owner or to whoever stages
    it, and must not be writable by everyone."""
    try:
        owners = {os.stat(env.prefix).st_uid, os.getuid()}
        side = side or os.stat(tarball.meta_path)
    except OSError:
        return  # gone meanwhile: the sidecar check reports it
    for what, info in ((kind, st), (f"{kind}'s sidecar", side)):
        if info.st_uid not in owners or info.st_mode & 0o002:
            path = tarball.path if what == kind else tarball.meta_path
            raise StageError(f"Not using the {what} {printable(str(path))}: it belongs to uid "
                             f"{info.st_uid}, not to the environment's owner, or anyone may "
                             f"write it; repack with 'conda stage --pack --force {env.prefix}'")
