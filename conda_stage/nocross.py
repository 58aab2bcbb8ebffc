"""Root's lookups in folders a user can write, which never enter a mount.

A user may mount a FUSE filesystem on any folder of theirs -- their store
folder, a job's ``envs/`` or ``tmp/``, something inside them.  A system call
on such a mount is answered by the user's FUSE process: with
``user_allow_other`` in /etc/fuse.conf it may lie to root (a folder "owned"
by another user) or never answer (root's hook hangs).  So below the staging
folders root looks a name up with ``openat2(RESOLVE_NO_XDEV |
RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH)``: the kernel refuses with EXDEV
before the mounted filesystem is asked anything, and links are never
followed.  A mount met where root removes things is detached
(:func:`detach_at`: ``umount2(MNT_DETACH | UMOUNT_NOFOLLOW)`` by its name in
a folder root opened), never entered.

Kernels before 5.6 have no ``openat2``: there these fall back to
``O_NOFOLLOW`` lookups, which keep links out but not mounts (SECURITY.md).
"""
from __future__ import annotations

import ctypes
import errno
import os

_SYS_OPENAT2 = 437  # the same number on every architecture (a new syscall)
_RESOLVE = 0x01 | 0x04 | 0x08  # RESOLVE_NO_XDEV | RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH
_MNT_DETACH, _UMOUNT_NOFOLLOW = 2, 8


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_have_openat2 = True


def open_at(dir_fd: int, name: str, flags: int) -> int:
    """``openat(dir_fd, name, flags | O_CLOEXEC)`` that neither crosses into
    another mount (OSError EXDEV) nor follows a link (ELOOP; with
    ``O_PATH | O_NOFOLLOW`` the link itself)."""
    global _have_openat2
    flags |= os.O_CLOEXEC
    if _have_openat2:
        how = _OpenHow(flags, 0, _RESOLVE)
        fd = _libc.syscall(_SYS_OPENAT2, ctypes.c_int(dir_fd), os.fsencode(name),
                           ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            raise OSError(err, os.strerror(err), name)
        _have_openat2 = False
    return os.open(name, flags | os.O_NOFOLLOW, dir_fd=dir_fd)


def have_openat2() -> bool:
    """Whether lookups here refuse mounts (False: a kernel before 5.6)."""
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.close(open_at(fd, ".", os.O_PATH))
    except OSError:
        pass
    finally:
        os.close(fd)
    return _have_openat2


def lstat_at(dir_fd: int, name: str) -> os.stat_result:
    """``lstat`` of ``name`` in ``dir_fd``; OSError EXDEV if a mount is there."""
    fd = open_at(dir_fd, name, os.O_PATH | os.O_NOFOLLOW)
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def is_mount_error(exc: OSError) -> bool:
    """Whether ``exc`` says a mount is in the way: EXDEV from :func:`open_at`,
    EBUSY from unlink/rmdir, EACCES from a FUSE mount root may not enter."""
    return exc.errno in (errno.EXDEV, errno.EBUSY, errno.EACCES)


def detach_at(dir_fd: int, name: str) -> bool:
    """(root) Lazily detach the mount at ``name`` in the folder ``dir_fd``
    (a link there is not followed; only a mount on that very name goes).
    Whether one was detached."""
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"not a name in a folder: {name!r}")
    here = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fchdir(dir_fd)
        return _libc.umount2(os.fsencode(name), _MNT_DETACH | _UMOUNT_NOFOLLOW) == 0
    finally:
        os.fchdir(here)
        os.close(here)
