"""Advisory file locks that also work on network filesystems.

POSIX record locks (``fcntl.lockf``) are used because NFS, Lustre and BeeGFS
forward them between nodes, where ``flock`` may be node-local.  A lock file
may be removed by its last user (``--auto-stage=disable``); after locking we
check that the path still names the file we locked, and retry otherwise.
Lock files are user files: they are opened through :mod:`.userfiles`, so a
FIFO or a device planted as a lock file never blocks.
"""
from __future__ import annotations

import errno
import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path

from . import output
from .errors import LockTimeout, StageError
from .output import printable
from .userfiles import open_regular_fd


@contextmanager
def file_lock(path: Path, *, shared: bool = False, timeout: float | None = None,
              waiting: str | None = None, deadline: float | None = None):
    """Hold a lock on ``path`` for the ``with`` body.

    ``waiting`` is printed once (as INFO) if the lock is busy.  An exclusive
    lock creates the lock file; a shared lock never does (readers write
    nothing): when the file does not exist or cannot be opened, nobody is
    packing, and the read goes unlocked.

    The wait ends after ``timeout`` seconds or at ``deadline`` (a
    ``time.monotonic()`` value), whichever comes first, with
    :class:`LockTimeout`.  A lock file that is not a regular file (a FIFO,
    a device) is refused at once, never waited on; a lock file that cannot
    be created or opened is a one-line :class:`StageError`.
    """
    path = Path(path)
    kind = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    end = deadline
    if timeout is not None:
        end = time.monotonic() + timeout if end is None else min(end, time.monotonic() + timeout)
    told = False
    while True:
        flags = os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT
        try:
            fd = open_regular_fd(path, what="lock file", flags=flags, mode=0o644)
        except OSError as exc:
            if shared and exc.errno in (errno.ENOENT, errno.EACCES, errno.EROFS, errno.EPERM):
                output.debug(f"no lock file {path} ({exc.strerror}); reading unlocked")
                yield None
                return
            raise StageError(f"Cannot {'open' if shared else 'create or open'} lock file "
                             f"{printable(str(path))}: {exc.strerror}") from None
        try:
            while True:
                try:
                    fcntl.lockf(fd, kind | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise StageError(f"Cannot lock {printable(str(path))}: "
                                         f"{exc.strerror}") from None
                if waiting and not told:
                    output.info(waiting)
                    told = True
                if end is not None and time.monotonic() >= end:
                    raise _timed_out(path, timeout, deadline, end)
                time.sleep(0.1 if end is None else max(0.0, min(0.1, end - time.monotonic())))
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                try:
                    yield fd
                finally:
                    fcntl.lockf(fd, fcntl.LOCK_UN)
                return
            if end is not None and time.monotonic() >= end:
                raise _timed_out(path, timeout, deadline, end)
        finally:
            os.close(fd)


def _timed_out(path: Path, timeout, deadline, end) -> LockTimeout:
    where = printable(str(path))
    if deadline is not None and end == deadline:
        return LockTimeout(f"Gave up waiting for lock {where}: the time allowed for staging "
                           f"ran out")
    return LockTimeout(f"Timed out after {timeout:.0f} s waiting for lock {where}")
