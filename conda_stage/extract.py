"""Safe streaming extraction, with prefix relocation done in the same pass.

The tar is read front to back from the decompressor -- no temporary copy of
the archive, no second pass over the files.  Members are checked before
anything is written: absolute names, ``..``, links that leave the target,
members reached through a symlink, device files and FIFOs are refused.
Files that carry a prefix placeholder are rewritten for the new prefix as
they are written; modification times are kept (Python's ``.pyc`` checks
need them) and write permission is left out from the start when the copy is
to be read-only.
"""
from __future__ import annotations

import os
import posixpath
import stat
import tarfile
from dataclasses import dataclass, field

from .errors import UnsafeArchive
from .relocate import Relocator

_CHUNK = 1 << 20
# tarfile's stream mode copies its whole buffer on every small read: keep it small.
_TAR_BUFSIZE = tarfile.RECORDSIZE


@dataclass
class ExtractStats:
    files: int = 0
    dirs: int = 0
    links: int = 0
    bytes: int = 0
    relocated: int = 0
    skipped: list = field(default_factory=list)


def _clean_name(name: str) -> str:
    if not name or "\0" in name:
        raise UnsafeArchive(f"Refusing archive member with an empty or NUL-containing name: {name!r}")
    if name.startswith("/"):
        raise UnsafeArchive(f"Refusing archive member with an absolute path: {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"Refusing archive member with '..' in its path: {name!r}")
    return "/".join(parts)


def _check_link_target(name: str, target: str) -> None:
    if not target or target.startswith("/"):
        raise UnsafeArchive(f"Refusing symlink {name!r} -> {target!r}: it points outside the environment")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
    if resolved == ".." or resolved.startswith("../"):
        raise UnsafeArchive(f"Refusing symlink {name!r} -> {target!r}: it points outside the environment")


def extract(stream, dest: str, *, relocator: Relocator | None = None,
            writable: bool = False, skip: frozenset = frozenset(),
            extra: dict | None = None, progress=None) -> ExtractStats:
    """Extract the tar read from ``stream`` into the new directory ``dest``.

    ``skip`` names members (paths inside the environment) not to write;
    ``extra`` maps top-level file names to contents written after the archive.
    ``progress(n)`` is called with the number of bytes written.
    """
    os.mkdir(dest, 0o700)
    stats = ExtractStats()
    dir_modes: dict[str, int] = {"": 0o755}
    symlinks: set[str] = set()
    wmask = 0o777 if writable else 0o555

    def make_parents(name: str) -> None:
        """Create the missing parent folders of ``name``, refusing to go
        through anything but folders this extraction created."""
        parent = posixpath.dirname(name)
        missing = []
        while parent and parent not in dir_modes:
            if parent in symlinks:
                raise UnsafeArchive(f"Refusing archive member {name!r}: it lies beneath the symlink {parent!r}")
            missing.append(parent)
            parent = posixpath.dirname(parent)
        for d in reversed(missing):
            full = os.path.join(dest, d)
            try:
                os.mkdir(full, 0o700)
            except FileExistsError:
                raise UnsafeArchive(f"Refusing archive member {name!r}: {d!r} is not a folder") from None
            dir_modes[d] = 0o755

    with tarfile.open(fileobj=stream, mode="r|", bufsize=_TAR_BUFSIZE) as tar:
        for ti in tar:
            name = _clean_name(ti.name)
            if not name:
                continue
            make_parents(name)
            path = os.path.join(dest, name)
            if name in skip:
                stats.skipped.append(name)
                continue
            if ti.isdir():
                if name in symlinks:
                    raise UnsafeArchive(f"Refusing archive member {name!r}: a symlink of that name exists")
                if name not in dir_modes:
                    try:
                        os.mkdir(path, 0o700)
                    except FileExistsError:
                        raise UnsafeArchive(f"Refusing archive member {name!r}: it replaces a file") from None
                    stats.dirs += 1
                dir_modes[name] = stat.S_IMODE(ti.mode)
            elif ti.isreg():
                _write_file(tar, ti, path, name, wmask, relocator, stats, progress)
            elif ti.issym():
                _check_link_target(name, ti.linkname)
                try:
                    os.symlink(ti.linkname, path)
                except FileExistsError:
                    raise UnsafeArchive(f"Refusing archive member {name!r}: it appears twice") from None
                symlinks.add(name)
                stats.links += 1
            elif ti.islnk():
                source = _clean_name(ti.linkname)
                src_path = os.path.join(dest, source)
                if source in symlinks or not os.path.isfile(src_path) or os.path.islink(src_path):
                    raise UnsafeArchive(f"Refusing hard link {name!r} -> {ti.linkname!r}: "
                                        f"its target is not a file extracted before it")
                os.link(src_path, path)
                stats.links += 1
            else:
                kind = "device file" if (ti.ischr() or ti.isblk()) else "special file"
                raise UnsafeArchive(f"Refusing archive member {name!r}: it is a {kind}")
    for fname, data in (extra or {}).items():
        fd = os.open(os.path.join(dest, fname), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
    # Directories last, deepest first, once nothing more is written into them.
    for name in sorted(dir_modes, key=lambda n: n.count("/") + (n != ""), reverse=True):
        mode = (dir_modes[name] | 0o700) & wmask
        os.chmod(os.path.join(dest, name) if name else dest, mode)
    return stats


def _write_file(tar, ti, path, name, wmask, relocator, stats, progress) -> None:
    mode = (stat.S_IMODE(ti.mode) & 0o777 | 0o400) & wmask
    src = tar.extractfile(ti)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise UnsafeArchive(f"Refusing archive member {name!r}: it appears twice") from None
    try:
        if relocator is not None and relocator.wants(name):
            raw = src.read()
            data = relocator.apply(name, raw)
            if data != raw:
                stats.relocated += 1
            _write_all(fd, data)
            written = len(data)
        else:
            written = 0
            while True:
                chunk = src.read(_CHUNK)
                if not chunk:
                    break
                _write_all(fd, chunk)
                written += len(chunk)
        os.utime(fd, (ti.mtime, ti.mtime))
    finally:
        os.close(fd)
    stats.files += 1
    stats.bytes += written
    if progress is not None:
        progress(ti.size)


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
