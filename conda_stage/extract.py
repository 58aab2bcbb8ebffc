"""Safe streaming extraction, with prefix relocation done in the same pass.

The tar is read front to back from the decompressor -- no temporary copy of
the archive, no second pass over the files.  Members are checked before
anything is written: absolute names, ``..``, links that leave the target,
members reached through a symlink, device files and FIFOs are refused.
Files that carry a prefix placeholder are rewritten for the new prefix as
they are written; modification times are kept (Python's ``.pyc`` checks
need them) and write permission is left out from the start when the copy is
to be read-only.

Speed (an environment is ~20k small files): a background thread decompresses
ahead in 1 MiB chunks (zstd and zlib release the GIL), and the tar headers
are parsed here rather than by :mod:`tarfile`, whose stream mode costs tens
of microseconds per member.  File data is written straight from the
decompressed chunks.  What is left per file is the kernel's work: open
(create), write, futimens, close.  The reader understands what tarfile
writes -- ustar, POSIX pax (``x``/``g`` headers: path, linkpath, size,
mtime), GNU long names (``L``/``K``) and base-256 numbers -- and, unlike
tarfile, refuses a truncated or corrupt archive instead of stopping early.
"""
from __future__ import annotations

import os
import posixpath
import queue
import stat
import threading
from dataclasses import dataclass, field

from .errors import UnsafeArchive
from .relocate import Relocator

_CHUNK = 1 << 20  # decompressed bytes per read
_AHEAD = 8  # chunks decompressed ahead of the writer
BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)

# tar type flags
_REG, _AREG, _CONT = b"0", b"\0", b"7"
_LNK, _SYM, _CHR, _BLK, _DIR, _FIFO = b"1", b"2", b"3", b"4", b"5", b"6"
_GNU_LONGNAME, _GNU_LONGLINK, _GNU_SPARSE = b"L", b"K", b"S"
_PAX, _PAX_SOLARIS, _PAX_GLOBAL = b"x", b"X", b"g"
_REGULAR = (_REG, _AREG, _CONT)
_GNU_TYPES = (_GNU_LONGNAME, _GNU_LONGLINK, _GNU_SPARSE)


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


def _corrupt(what: str) -> UnsafeArchive:
    return UnsafeArchive(f"The archive is truncated or corrupt ({what}); repack the environment "
                         f"with 'conda stage --pack --force'")


# ------------------------------------------------------------------ reading
class _Chunks:
    """The decompressed tar as a run of chunks, decompressed ahead by a thread."""

    def __init__(self, stream):
        self._queue: queue.Queue = queue.Queue(_AHEAD)
        self._stop = threading.Event()
        self._buf = b""
        self._view = memoryview(self._buf)
        self._pos = 0
        self._eof = False
        self._thread = threading.Thread(target=self._fill, args=(stream,),
                                        name="conda-stage-decompress", daemon=True)
        self._thread.start()

    def _fill(self, stream) -> None:
        try:
            while not self._stop.is_set():
                data = stream.read(_CHUNK)
                if not data:
                    break
                self._put(data)
        except BaseException as exc:  # handed to the reading thread
            self._put(exc)
        self._put(None)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Stop the thread (it must not touch the stream once we return)."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()

    def _next_chunk(self) -> bool:
        if self._eof:
            return False
        item = self._queue.get()
        if item is None:
            self._eof = True
            return False
        if isinstance(item, BaseException):
            self._eof = True
            raise item
        self._buf, self._view, self._pos = item, memoryview(item), 0
        return True

    def read(self, n: int) -> bytes:
        """``n`` bytes, or fewer at the end of the data."""
        pos, buf = self._pos, self._buf
        if pos + n <= len(buf):
            self._pos = pos + n
            return buf[pos:pos + n]
        parts = []
        while n:
            avail = len(self._buf) - self._pos
            if not avail:
                if not self._next_chunk():
                    break
                continue
            take = min(avail, n)
            parts.append(self._view[self._pos:self._pos + take])
            self._pos += take
            n -= take
        return b"".join(parts)

    def pieces(self, n: int):
        """Yield ``n`` bytes as memoryviews into the chunks (no copies)."""
        while n:
            avail = len(self._buf) - self._pos
            if not avail:
                if not self._next_chunk():
                    raise _corrupt("member data ends early")
                continue
            take = min(avail, n)
            yield self._view[self._pos:self._pos + take]
            self._pos += take
            n -= take

    def skip(self, n: int) -> None:
        for _piece in self.pieces(n):
            pass


def _nts(b: bytes) -> str:
    p = b.find(b"\0")
    if p != -1:
        b = b[:p]
    return b.decode("utf-8", "surrogateescape")


def _nti(b: bytes) -> int:
    if b[0] in (0o200, 0o377):  # GNU base-256
        n = int.from_bytes(b[1:], "big")
        if b[0] == 0o377:
            n -= 256 ** (len(b) - 1)
        return n
    p = b.find(b"\0")
    if p != -1:
        b = b[:p]
    try:
        return int(b.strip() or b"0", 8)
    except ValueError:
        raise _corrupt("bad number in a header") from None


def _chksum_ok(h: bytes) -> bool:
    stored = _nti(h[148:156])
    unsigned = sum(h) - sum(h[148:156]) + 256  # the field counts as 8 spaces
    if stored == unsigned:
        return True
    signed = sum(x - 256 if x > 127 else x for x in h[:148] + h[156:]) + 256
    return stored == signed


def _pax_records(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    pos, end = 0, len(data)
    while pos < end and data[pos] != 0:
        sp = data.find(b" ", pos)
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise _corrupt("bad pax header") from None
        if sp < 0 or length < 5 or pos + length > end or data[pos + length - 1] != 0x0A:
            raise _corrupt("bad pax header")
        key, eq, value = data[sp + 1:pos + length - 1].partition(b"=")
        if not eq:
            raise _corrupt("bad pax header")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


@dataclass
class _Member:
    name: str
    type: bytes
    mode: int
    size: int
    mtime: float
    linkname: str

    def isreg(self) -> bool:
        return self.type in _REGULAR

    def isdir(self) -> bool:
        return self.type == _DIR


def _members(chunks: _Chunks):
    """Yield the archive's members; the caller consumes each regular file's
    ``size`` bytes (then the padding is skipped here)."""
    pax_global: dict[str, str] = {}
    pax: dict[str, str] = {}
    longname = longlink = None
    while True:
        h = chunks.read(BLOCK)
        if not h or h == _ZERO_BLOCK:
            return  # end of archive (tarfile, too, stops at the first zero block)
        if len(h) < BLOCK:
            raise _corrupt("a header ends early")
        if not _chksum_ok(h):
            raise _corrupt("bad header checksum")
        typ = h[156:157]
        size = _nti(h[124:136])
        if typ in (_PAX, _PAX_SOLARIS, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK):
            data = chunks.read(size)
            if len(data) < size:
                raise _corrupt("an extended header ends early")
            chunks.skip(-size % BLOCK)
            if typ == _PAX_GLOBAL:
                pax_global.update(_pax_records(data))
            elif typ in (_PAX, _PAX_SOLARIS):
                pax.update(_pax_records(data))
            elif typ == _GNU_LONGNAME:
                longname = _nts(data)
            else:
                longlink = _nts(data)
            continue
        name = _nts(h[0:100])
        if typ == _AREG and name.endswith("/"):
            typ = _DIR  # old V7 tar: a folder is a file whose name ends with '/'
        if typ == _DIR:
            name = name.rstrip("/")
        prefix = _nts(h[345:500])
        if prefix and typ not in _GNU_TYPES:
            name = prefix + "/" + name
        linkname = _nts(h[157:257])
        mtime: float = _nti(h[136:148])
        if longname is not None:
            name = longname
        if longlink is not None:
            linkname = longlink
        if pax_global or pax:
            merged = {**pax_global, **pax}
            if any(k.startswith("GNU.sparse.") for k in merged):
                typ = _GNU_SPARSE
            if "path" in merged:
                name = merged["path"]
            if "linkpath" in merged:
                linkname = merged["linkpath"]
            try:
                if "size" in merged:
                    size = int(merged["size"])
                if "mtime" in merged:
                    mtime = float(merged["mtime"])
            except ValueError:
                raise _corrupt("bad pax header") from None
        pax, longname, longlink = {}, None, None
        if size < 0:
            raise _corrupt("negative member size")
        yield _Member(name, typ, _nti(h[100:108]), size, mtime, linkname)
        if typ in _REGULAR:
            chunks.skip(-size % BLOCK)


# ------------------------------------------------------------------ writing
class _Writers:
    """Threads that create, fill and close files, so the kernel's work for
    one file overlaps the parsing of the next (open/write/close release the
    GIL).  Files are handed over in batches to keep the hand-offs few."""

    BATCH_FILES = 32
    BATCH_BYTES = 1 << 20

    def __init__(self, threads: int):
        self._queue: queue.Queue = queue.Queue(2 * threads)
        self._batch: list = []
        self._batch_bytes = 0
        self.error: BaseException | None = None
        self._abort = False
        self._threads = [threading.Thread(target=self._work, name=f"conda-stage-write-{i}",
                                          daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while True:
            batch = self._queue.get()
            try:
                if batch is None:
                    return
                if not self._abort:
                    for path, name, mode, mtime, pieces in batch:
                        _create(path, name, mode, mtime, pieces)
            except BaseException as exc:
                if self.error is None:
                    self.error = exc
                self._abort = True
            finally:
                self._queue.task_done()

    def add(self, path, name, mode, mtime, pieces, size) -> None:
        self._batch.append((path, name, mode, mtime, pieces))
        self._batch_bytes += size
        if len(self._batch) >= self.BATCH_FILES or self._batch_bytes >= self.BATCH_BYTES:
            self._queue.put(self._batch)
            self._batch, self._batch_bytes = [], 0
            if self.error is not None:
                raise self.error

    def drain(self) -> None:
        """Return once every file handed over is on disk (or raise its error)."""
        if self._batch:
            self._queue.put(self._batch)
            self._batch, self._batch_bytes = [], 0
        self._queue.join()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Stop the threads; files not yet written are dropped."""
        self._abort = True
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        self._threads = []


def extract(stream, dest: str, *, relocator: Relocator | None = None,
            writable: bool = False, skip: frozenset = frozenset(),
            extra: dict | None = None, progress=None, threads: int | None = None) -> ExtractStats:
    """Extract the tar read from ``stream`` into the new directory ``dest``.

    ``skip`` names members (paths inside the environment) not to write;
    ``extra`` maps top-level file names to contents written after the archive.
    ``progress(n)`` is called with the number of bytes written.  ``threads``:
    how many threads create and write the files (default 1: with more, they
    mostly contend for the folders' locks in the kernel and for the GIL).
    """
    os.mkdir(dest, 0o700)
    stats = ExtractStats()
    dir_modes: dict[str, int] = {"": 0o755}
    symlinks: set[str] = set()
    # Regular files handed to the writer threads: they may not be on disk yet,
    # so name clashes with them are found here, not by the filesystem.
    files: set[str] = set()
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
            if d in files:
                raise UnsafeArchive(f"Refusing archive member {name!r}: {d!r} is not a folder")
            full = os.path.join(dest, d)
            try:
                os.mkdir(full, 0o700)
            except FileExistsError:
                raise UnsafeArchive(f"Refusing archive member {name!r}: {d!r} is not a folder") from None
            dir_modes[d] = 0o755

    chunks = _Chunks(stream)
    writers = _Writers(max(1, threads or 1))
    try:
        for ti in _members(chunks):
            name = _clean_name(ti.name)
            if not name:
                if ti.isreg():
                    chunks.skip(ti.size)
                continue
            make_parents(name)
            path = os.path.join(dest, name)
            if name in skip:
                stats.skipped.append(name)
                if ti.isreg():
                    chunks.skip(ti.size)
                continue
            if name in files:
                if ti.isdir():
                    raise UnsafeArchive(f"Refusing archive member {name!r}: it replaces a file")
                raise UnsafeArchive(f"Refusing archive member {name!r}: it appears twice")
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
                if name in dir_modes or name in symlinks:
                    raise UnsafeArchive(f"Refusing archive member {name!r}: it appears twice")
                files.add(name)
                _write_file(chunks, writers, ti, path, name, wmask, relocator, stats)
                if progress is not None:
                    progress(ti.size)
            elif ti.type == _SYM:
                _check_link_target(name, ti.linkname)
                try:
                    os.symlink(ti.linkname, path)
                except FileExistsError:
                    raise UnsafeArchive(f"Refusing archive member {name!r}: it appears twice") from None
                symlinks.add(name)
                stats.links += 1
            elif ti.type == _LNK:
                source = _clean_name(ti.linkname)
                src_path = os.path.join(dest, source)
                writers.drain()  # the target must be on disk
                if source in symlinks or not os.path.isfile(src_path) or os.path.islink(src_path):
                    raise UnsafeArchive(f"Refusing hard link {name!r} -> {ti.linkname!r}: "
                                        f"its target is not a file extracted before it")
                os.link(src_path, path)
                stats.links += 1
            elif ti.type == _GNU_SPARSE:
                raise UnsafeArchive(f"Refusing archive member {name!r}: it is a sparse file")
            else:
                kind = "device file" if ti.type in (_CHR, _BLK) else "special file"
                raise UnsafeArchive(f"Refusing archive member {name!r}: it is a {kind}")
        writers.drain()
    finally:
        writers.close()
        chunks.close()
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


_O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _write_file(chunks, writers, ti, path, name, wmask, relocator, stats) -> None:
    mode = (stat.S_IMODE(ti.mode) & 0o777 | 0o400) & wmask
    if relocator is not None and relocator.wants(name):
        raw = chunks.read(ti.size)
        if len(raw) < ti.size:
            raise _corrupt("member data ends early")
        data = relocator.apply(name, raw)
        if data != raw:
            stats.relocated += 1
        pieces = [data]
        written = len(data)
    else:
        pieces = list(chunks.pieces(ti.size))
        written = ti.size
    writers.add(path, name, mode, ti.mtime, pieces, written)
    stats.files += 1
    stats.bytes += written


def _create(path, name, mode, mtime, pieces) -> None:
    try:
        fd = os.open(path, _O_NEW, mode)
    except FileExistsError:
        raise UnsafeArchive(f"Refusing archive member {name!r}: it appears twice") from None
    try:
        for piece in pieces:
            _write_all(fd, piece)
        os.utime(fd, (mtime, mtime))
    finally:
        os.close(fd)


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
