"""Advisory file locks that also work on network filesystems.

POSIX record locks (``fcntl.lockf``) are used because NFS, Lustre and BeeGFS
forward them between nodes, where ``flock`` may be node-local.  A lock file
may be removed by its last user (``--auto-stage=disable``); after locking we
check that the path still names the file we locked, and retry otherwise.
"""
from __future__ import annotations

import errno
import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path

from . import output
from .errors import LockTimeout


@contextmanager
def file_lock(path: Path, *, shared: bool = False, timeout: float | None = None,
              waiting: str | None = None):
    """Hold a lock on ``path`` for the ``with`` body.

    ``waiting`` is printed once (as INFO) if the lock is busy.  An exclusive
    lock creates the lock file; a shared lock never does (readers write
    nothing): when the file does not exist or cannot be opened, nobody is
    packing, and the read goes unlocked.
    """
    path = Path(path)
    kind = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    deadline = None if timeout is None else time.monotonic() + timeout
    told = False
    while True:
        try:
            if shared:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if shared and exc.errno in (errno.ENOENT, errno.EACCES, errno.EROFS, errno.EPERM):
                output.debug(f"no lock file {path} ({exc.strerror}); reading unlocked")
                yield None
                return
            raise
        try:
            while True:
                try:
                    fcntl.lockf(fd, kind | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                if waiting and not told:
                    output.info(waiting)
                    told = True
                if deadline is not None and time.monotonic() > deadline:
                    raise LockTimeout(f"Timed out after {timeout:.0f} s waiting for lock {path}")
                time.sleep(0.1)
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
        finally:
            os.close(fd)
