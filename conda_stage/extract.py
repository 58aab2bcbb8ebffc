"""Safe streaming extraction, with prefix relocation done in the same pass.

The tar is read front to back from the decompressor -- no temporary copy of
the archive, no second pass over the files.  The archive and the sidecar that
drives relocation are user-controlled, so the extraction is at least as
strict as PEP 706's ``data`` filter, and bounded:

* Every member is checked before anything is written.  Absolute names,
  ``..``, device files, FIFOs and sparse files are refused, and so is any
  member whose path goes through a symlink.  A symlink's target is resolved
  against the tree extracted so far (a virtual ``realpath`` over dicts, no
  system calls): it is refused if it is absolute or leaves the root at any
  step, and, because a name not extracted yet may become a symlink later,
  if it climbs (``..``) out of a path that does not exist yet.  A hard link
  must name, exactly, a regular file extracted earlier from this archive.
* The archive must end with the end-of-archive marker followed only by zero
  padding, and the compressed stream must end where its format says it does
  (see :mod:`conda_stage.formats`): a cut archive is an error, never a
  smaller environment.
* Memory does not grow with a member's size: extended headers are capped
  (:data:`MAX_EXTENDED_HEADER`), files to relocate (which are rewritten in
  memory) are capped (:data:`MAX_RELOCATE_BYTES`), everything else is written
  from the decompressed chunks as they come; the member count is capped too
  (:data:`MAX_MEMBERS`, the virtual tree lives in memory).
* Space is checked against what is written, not what the sidecar claims: the
  bytes and inodes of every member are counted before it is written, and
  the destination's ``statvfs`` is consulted every 64 MiB / 4096 inodes (or
  sooner when close), so the extraction stops before eating into a
  :class:`Reserve`.  ENOSPC/EDQUOT, and any other OS error, become a
  one-line :class:`StageError`.
* ``deadline`` (a :func:`time.monotonic` value) is checked between members
  and while waiting or writing.

On any error the threads are stopped and the partial tree (folders still
0700) is left for the caller to remove.

Files that carry a prefix placeholder are rewritten for the new prefix as
they are written; modification times are kept (Python's ``.pyc`` checks
need them) and write permission is left out from the start when the copy is
to be read-only.  The names of the files rewritten are returned
(``ExtractStats.rewritten``), and ``before_seal`` runs while the folders are
still writable: the stager recompiles the bytecode of rewritten ``.py``
files there (:mod:`conda_stage.bytecode`).

Speed (an environment is ~20k small files): a background thread decompresses
ahead in 1 MiB chunks (zstd and zlib release the GIL), and the tar headers
are parsed here rather than by :mod:`tarfile`, whose stream mode costs tens
of microseconds per member.  File data is written straight from the
decompressed chunks.  What is left per file is the kernel's work: open
(create), write, futimens, close.  The reader understands what tarfile
writes -- ustar, POSIX pax (``x``/``g`` headers: path, linkpath, size,
mtime), GNU long names (``L``/``K``) and base-256 numbers.
"""
from __future__ import annotations

import errno
import math
import os
import queue
import stat
import threading
import time
from dataclasses import dataclass, field

from .errors import StageError, UnsafeArchive
from .formats import corrupt_archive as _corrupt
from .relocate import Relocator

_CHUNK = 1 << 20  # decompressed bytes per read
_AHEAD = 8  # chunks decompressed ahead of the writer
BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)

#: Largest extended header (pax ``x``/``g``, GNU long name/link) accepted, and
#: the most extended-header data before one member or in global headers.
MAX_EXTENDED_HEADER = 1 << 20
#: Largest file that relocation (which rewrites a file in memory) accepts.
MAX_RELOCATE_BYTES = 512 << 20
#: Most members in one archive (the virtual tree is kept in memory).
MAX_MEMBERS = 2_000_000
#: Most (zero) bytes accepted after the end-of-archive marker; tar writers pad
#: to their record size (10 KiB by default, 1 MiB for ``tar -b 2048``).
MAX_TRAILING = 1 << 20
#: Files at least this large are written by the extracting thread itself,
#: straight from the chunks, instead of being queued for the writer threads.
DIRECT_WRITE = 4 << 20
_PATH_MAX = 4095  # longest member name or link target accepted (characters)
_MAX_FOLLOWS = 40  # symlinks followed while resolving one target (Linux: 40)
_MAX_STEPS = 4096  # path components processed while resolving one target
_CHECK_BYTES = 64 << 20  # space: statvfs at least every this many bytes ...
_CHECK_INODES = 4096  # ... or inodes

# tar type flags
_REG, _AREG, _CONT = b"0", b"\0", b"7"
_LNK, _SYM, _CHR, _BLK, _DIR, _FIFO = b"1", b"2", b"3", b"4", b"5", b"6"
_GNU_LONGNAME, _GNU_LONGLINK, _GNU_SPARSE = b"L", b"K", b"S"
_PAX, _PAX_SOLARIS, _PAX_GLOBAL = b"x", b"X", b"g"
_REGULAR = (_REG, _AREG, _CONT)
_GNU_TYPES = (_GNU_LONGNAME, _GNU_LONGLINK, _GNU_SPARSE)
_EXTENDED = (_PAX, _PAX_SOLARIS, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK)

# A regular file in the virtual tree (folders are dicts, symlinks their target).
_FILE = object()


@dataclass
class ExtractStats:
    files: int = 0
    dirs: int = 0
    links: int = 0
    bytes: int = 0
    relocated: int = 0
    skipped: list = field(default_factory=list)
    #: names (paths inside the environment) of the files relocation rewrote
    rewritten: list = field(default_factory=list)


@dataclass(frozen=True)
class Reserve:
    """What an extraction leaves free on the destination's filesystem: at
    least ``max(fraction * size, min_bytes)`` bytes and ``inode_fraction`` of
    its inodes."""

    fraction: float = 0.05
    min_bytes: int = 256 << 20
    inode_fraction: float = 0.05


def _clean_name(name: str) -> str:
    if not name or "\0" in name:
        raise UnsafeArchive(f"Refusing archive member with an empty or NUL-containing name: {name!r}")
    if len(name) > _PATH_MAX:
        raise UnsafeArchive(f"Refusing archive member with a name of {len(name)} characters: {_short(name)}")
    if name.startswith("/"):
        raise UnsafeArchive(f"Refusing archive member with an absolute path: {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"Refusing archive member with '..' in its path: {name!r}")
    return "/".join(parts)


def _short(text: str) -> str:
    return repr(text) if len(text) <= 200 else repr(text[:200]) + "..."


def _outside(name: str, target: str, why: str = "it points outside the environment") -> UnsafeArchive:
    return UnsafeArchive(f"Refusing symlink {_short(name)} -> {_short(target)}: {why}")


def _check_link_target(root: dict, parent: str, name: str, target: str) -> None:
    """Resolve ``target`` (of the symlink ``name`` in the folder ``parent``)
    through the tree extracted so far, like ``realpath`` would on disk, and
    refuse it if it leaves the root at any step.

    ``root`` is the virtual tree: folders are dicts of their entries, regular
    files :data:`_FILE`, symlinks their target.  Past the first name that does
    not exist yet the rest of the path must only descend: that name may
    become a symlink later (to the root, say), and a ``..`` after it would
    then climb out.  Cost: one dict look-up per component, bounded by
    :data:`_MAX_STEPS` and :data:`_MAX_FOLLOWS`.
    """
    if len(target) > _PATH_MAX:
        raise _outside(name, target, f"its target is too long ({len(target)} characters)")
    if not target or target.startswith("/") or "\0" in target:
        raise _outside(name, target)
    stack = [root]
    if parent:
        for part in parent.split("/"):
            stack.append(stack[-1][part])  # the member's folders exist: made before the link
    pending = target.split("/")
    pending.reverse()
    follows = steps = 0
    missing = False
    while pending:
        part = pending.pop()
        steps += 1
        if steps > _MAX_STEPS:
            raise _outside(name, target, "it takes too many steps to resolve")
        if part == "" or part == ".":
            continue
        if part == "..":
            if missing:
                raise _outside(name, target, "it climbs out of a path that does not exist yet")
            if len(stack) == 1:
                raise _outside(name, target)
            stack.pop()
            continue
        if missing:
            continue
        entry = stack[-1].get(part)
        if entry is None:
            missing = True
        elif type(entry) is dict:
            stack.append(entry)
        elif entry is _FILE:
            if pending:
                raise _outside(name, target, "it goes through a file")
        else:  # a symlink: continue from its target, relative to the folder it is in
            follows += 1
            if follows > _MAX_FOLLOWS or len(pending) + len(entry) > 2 * _MAX_STEPS:
                raise _outside(name, target, "it goes through too many symlinks")
            more = entry.split("/")
            more.reverse()
            pending.extend(more)


# ------------------------------------------------------------------ limits
class _Deadline:
    def __init__(self, deadline: float | None, dest: str):
        self.at = deadline
        self.dest = dest

    def check(self) -> None:
        if self.at is not None and time.monotonic() > self.at:
            raise self.error()

    def error(self) -> StageError:
        return StageError(f"Extracting into {self.dest} ran out of time (the time budget ended); "
                          f"stopped")

    def wait(self, get, *args):
        """``get(*args, timeout=...)`` until it succeeds, or the deadline."""
        if self.at is None:
            return get(*args)
        while True:
            left = self.at - time.monotonic()
            if left <= 0:
                raise self.error()
            try:
                return get(*args, timeout=min(left, 0.5))
            except (queue.Empty, queue.Full):
                continue


class _Space:
    """Counts what the extraction will have written and consults statvfs
    before the count could reach the reserve."""

    def __init__(self, dest: str, reserve: Reserve | None, settle):
        self.dest = dest
        self.reserve = reserve
        self._settle = settle  # wait until everything claimed so far is on disk
        self._bytes = self._inodes = 0  # claimed since the last check
        self._budget_bytes = self._budget_inodes = -1  # check at the first claim
        self.total = 0

    def claim(self, nbytes: int, inodes: int = 1) -> None:
        nbytes = -(-nbytes // 4096) * 4096  # whole blocks, roughly
        self.total += nbytes
        self._bytes += nbytes
        self._inodes += inodes
        if self._bytes > self._budget_bytes or self._inodes > self._budget_inodes:
            self._check(nbytes, inodes)

    def _check(self, nbytes: int, inodes: int) -> None:
        r = self.reserve
        if r is None:
            self._budget_bytes = self._budget_inodes = 1 << 62
            return
        self._settle()
        st = os.statvfs(self.dest)
        free = st.f_bavail * st.f_frsize
        keep = max(int(st.f_blocks * st.f_frsize * r.fraction), r.min_bytes)
        if free - keep < nbytes:
            raise StageError(
                f"Not enough free space to extract into {self.dest}: {_mb(free)} free on its "
                f"filesystem, {_mb(keep)} of it kept in reserve, and the archive needs at least "
                f"{_mb(nbytes)} more (stopped after {_mb(self.total - nbytes)})")
        self._budget_bytes = min(_CHECK_BYTES, free - keep)
        self._bytes = nbytes
        if st.f_files:  # 0: the filesystem does not count inodes
            keep_i = math.ceil(st.f_files * r.inode_fraction)
            if st.f_favail - keep_i < inodes:
                raise StageError(
                    f"Not enough free inodes to extract into {self.dest}: {st.f_favail} free on its "
                    f"filesystem, {keep_i} of them kept in reserve (stopped)")
            self._budget_inodes = min(_CHECK_INODES, st.f_favail - keep_i)
        else:
            self._budget_inodes = _CHECK_INODES
        self._inodes = inodes


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _mount_point(path: str) -> str:
    try:
        path = os.path.abspath(path)
        dev = os.stat(path).st_dev
        while path != "/":
            parent = os.path.dirname(path)
            if os.stat(parent).st_dev != dev:
                break
            path = parent
    except OSError:
        pass
    return path


def _os_error(exc: OSError, dest: str) -> StageError:
    if exc.errno == errno.ENOSPC:
        return StageError(f"No space left on {_mount_point(dest)} while extracting into {dest} "
                          f"(no free blocks or inodes)")
    if exc.errno == errno.EDQUOT:
        return StageError(f"Disk quota exceeded on {_mount_point(dest)} while extracting into {dest}")
    where = f" ({exc.filename})" if exc.filename else ""
    return StageError(f"Could not extract into {dest}: {exc.strerror or exc}{where}")


# ------------------------------------------------------------------ reading
class _Chunks:
    """The decompressed tar as a run of chunks, decompressed ahead by a thread."""

    def __init__(self, stream, deadline: _Deadline):
        self._queue: queue.Queue = queue.Queue(_AHEAD)
        self._stop = threading.Event()
        self._deadline = deadline
        self._buf = b""
        self._view = memoryview(self._buf)
        self._pos = 0
        self._eof = False
        self._stream = stream
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
        except EOFError:  # a decompressor's way to say the data ends early
            self._put(_corrupt("the compressed data ends early"))
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
        cancel = getattr(self._stream, "cancel", None)
        if cancel is not None:  # a read waiting for a slow file stops at its next read
            cancel()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()

    def _next_chunk(self) -> bool:
        if self._eof:
            return False
        item = self._deadline.wait(self._queue.get)
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

    def finish(self) -> None:
        """Read the rest of the stream (so that a cut compressed stream is
        found) and refuse anything there but some zero padding."""
        seen = 0
        while True:
            avail = len(self._buf) - self._pos
            if avail:
                seen += avail
                if seen > MAX_TRAILING:
                    raise _corrupt(f"more than {MAX_TRAILING >> 10} KiB after the end-of-archive marker")
                if self._buf.count(0, self._pos) != avail:
                    raise _corrupt("data after the end-of-archive marker")
                self._pos = len(self._buf)
            if not self._next_chunk():
                return


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
    ``size`` bytes (then the padding is skipped here).  Returns at the
    end-of-archive marker; an archive without one is refused."""
    pax_global: dict[str, str] = {}
    pax: dict[str, str] = {}
    longname = longlink = None
    extended = global_size = 0  # extended-header bytes for this member / in global headers
    count = 0
    while True:
        h = chunks.read(BLOCK)
        if h == _ZERO_BLOCK:
            return  # end of archive (tarfile, too, stops at the first zero block)
        if len(h) < BLOCK:
            raise _corrupt("no end-of-archive marker" if not h else "a header ends early")
        if not _chksum_ok(h):
            raise _corrupt("bad header checksum")
        typ = h[156:157]
        size = _nti(h[124:136])
        if typ in _EXTENDED:
            extended += BLOCK + max(size, 0)
            if typ == _PAX_GLOBAL:
                global_size += size
            if size > MAX_EXTENDED_HEADER or extended > MAX_EXTENDED_HEADER \
                    or global_size > MAX_EXTENDED_HEADER:
                raise UnsafeArchive(f"Refusing archive: its extended (pax or long-name) headers hold "
                                    f"more than {MAX_EXTENDED_HEADER >> 10} KiB")
            if size < 0:
                raise _corrupt("negative header size")
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
        count += 1
        if count > MAX_MEMBERS:
            raise UnsafeArchive(f"Refusing archive: it has more than {MAX_MEMBERS} members")
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
        pax, longname, longlink, extended = {}, None, None, 0
        if size < 0:
            raise _corrupt("negative member size")
        if not -(1 << 40) < mtime < (1 << 40):  # also NaN
            raise _corrupt("bad modification time")
        yield _Member(name, typ, _nti(h[100:108]), size, mtime, linkname)
        if typ in _REGULAR:
            chunks.skip(-size % BLOCK)


# ------------------------------------------------------------------ writing
class _Writers:
    """Threads that create, fill and close files, so the kernel's work for
    one file overlaps the parsing of the next (open/write/close release the
    GIL).  Files are handed over in batches to keep the hand-offs few; only
    files smaller than :data:`DIRECT_WRITE` come here, so what is queued is
    bounded."""

    BATCH_FILES = 32
    BATCH_BYTES = 1 << 20

    def __init__(self, threads: int, deadline: _Deadline):
        self._queue: queue.Queue = queue.Queue(2 * threads)
        self._deadline = deadline
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

    def _hand_over(self) -> None:
        self._deadline.wait(self._queue.put, self._batch)
        self._batch, self._batch_bytes = [], 0

    def add(self, path, name, mode, mtime, pieces, size) -> None:
        self._batch.append((path, name, mode, mtime, pieces))
        self._batch_bytes += size
        if len(self._batch) >= self.BATCH_FILES or self._batch_bytes >= self.BATCH_BYTES:
            self._hand_over()
            if self.error is not None:
                raise self.error

    def drain(self) -> None:
        """Return once every file handed over is on disk (or raise its error)."""
        if self._batch:
            self._hand_over()
        done = self._queue.all_tasks_done
        with done:
            while self._queue.unfinished_tasks:
                if self.error is not None:
                    break
                if self._deadline.at is None:
                    done.wait()
                else:
                    left = self._deadline.at - time.monotonic()
                    if left <= 0:
                        raise self._deadline.error()
                    done.wait(min(left, 0.5))
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Stop the threads; files not yet written are dropped."""
        self._abort = True
        self._batch = []
        while True:  # let the threads drop what is queued
            try:
                self._queue.get_nowait()
                self._queue.task_done()
            except queue.Empty:
                break
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        self._threads = []


def extract(stream, dest: str, *, relocator: Relocator | None = None,
            writable: bool = False, skip: frozenset = frozenset(),
            extra: dict | None = None, progress=None, threads: int | None = None,
            deadline: float | None = None, reserve: Reserve | None = Reserve(),
            before_seal=None) -> ExtractStats:
    """Extract the tar read from ``stream`` into the new directory ``dest``.

    ``skip`` names members (paths inside the environment) not to write;
    ``extra`` maps top-level file names to contents written after the archive.
    ``progress(n)`` is called with the number of bytes written.  ``threads``:
    how many threads create and write the files (default 1: with more, they
    mostly contend for the folders' locks in the kernel and for the GIL).
    ``deadline``: a :func:`time.monotonic` value after which extraction stops
    with a :class:`StageError`.  ``reserve``: the free space to leave on the
    destination's filesystem (``None``: no check).  ``before_seal(dest,
    stats)`` is called once every file is written, before the folders get
    their final modes (read-only unless ``writable``): the last moment
    anything can still be changed in the copy.

    Raises :class:`UnsafeArchive` for an archive that must not be extracted
    and :class:`StageError` for anything else (space, time, OS errors); the
    partial ``dest`` is then left for the caller to remove.
    """
    clock = _Deadline(deadline, dest)
    clock.check()
    try:
        os.mkdir(dest, 0o700)
    except OSError as exc:
        raise _os_error(exc, dest) from None
    stats = ExtractStats()
    dir_modes: dict[str, int] = {"": 0o755}
    # The virtual tree: folder name -> its entries (a dict for a sub-folder,
    # _FILE for a regular file, the target for a symlink).  Regular files
    # handed to the writer threads may not be on disk yet, so name clashes
    # are found here, not by the filesystem.
    folders: dict[str, dict] = {"": {}}
    wmask = 0o755 if writable else 0o555  # never group/other-writable (as the data filter)

    chunks = _Chunks(stream, clock)
    writers = _Writers(max(1, threads or 1), clock)
    space = _Space(dest, reserve, writers.drain)

    def folder_of(name: str, parent: str) -> dict:
        """The entries of ``name``'s folder, creating the missing folders and
        refusing to go through anything but folders this extraction made."""
        entries = folders.get(parent)
        if entries is not None:
            return entries
        missing = []
        while parent not in folders:
            missing.append(parent)
            parent = parent.rpartition("/")[0]
        entries = folders[parent]
        for d in reversed(missing):
            part = d.rpartition("/")[2]
            entry = entries.get(part)
            if type(entry) is str:
                raise UnsafeArchive(f"Refusing archive member {name!r}: it lies beneath the symlink {d!r}")
            if entry is not None:
                raise UnsafeArchive(f"Refusing archive member {name!r}: {d!r} is not a folder")
            space.claim(4096)
            os.mkdir(os.path.join(dest, d), 0o700)
            entries[part] = folders[d] = {}
            entries = folders[d]
            dir_modes[d] = 0o755
        return entries

    try:
        for ti in _members(chunks):
            clock.check()
            name = _clean_name(ti.name)
            if not name:
                if ti.isreg():
                    chunks.skip(ti.size)
                continue
            parent, _, base = name.rpartition("/")
            entries = folder_of(name, parent)
            path = os.path.join(dest, name)
            if name in skip:
                if name not in stats.skipped:
                    stats.skipped.append(name)
                if ti.isreg():
                    chunks.skip(ti.size)
                continue
            entry = entries.get(base)
            if ti.isdir():
                if entry is None:
                    space.claim(4096)
                    os.mkdir(path, 0o700)
                    entries[base] = folders[name] = {}
                    stats.dirs += 1
                elif type(entry) is str:
                    raise UnsafeArchive(f"Refusing archive member {name!r}: a symlink of that name exists")
                elif entry is _FILE:
                    raise UnsafeArchive(f"Refusing archive member {name!r}: it replaces a file")
                dir_modes[name] = stat.S_IMODE(ti.mode)
                continue
            if entry is not None:
                raise UnsafeArchive(f"Refusing archive member {name!r}: it appears twice")
            if ti.isreg():
                entries[base] = _FILE
                _write_file(chunks, writers, space, clock, ti, path, name, wmask, relocator, stats)
                if progress is not None:
                    progress(ti.size)
            elif ti.type == _SYM:
                _check_link_target(folders[""], parent, name, ti.linkname)
                space.claim(len(ti.linkname))
                os.symlink(ti.linkname, path)
                entries[base] = ti.linkname
                stats.links += 1
            elif ti.type == _LNK:
                source = _clean_name(ti.linkname)
                sparent, _, sbase = source.rpartition("/")
                if folders.get(sparent, {}).get(sbase) is not _FILE:
                    raise UnsafeArchive(f"Refusing hard link {name!r} -> {ti.linkname!r}: "
                                        f"its target is not a file extracted before it")
                writers.drain()  # the target must be on disk
                os.link(os.path.join(dest, source), path, follow_symlinks=False)
                entries[base] = _FILE
                stats.links += 1
            elif ti.type == _GNU_SPARSE:
                raise UnsafeArchive(f"Refusing archive member {name!r}: it is a sparse file")
            else:
                kind = "device file" if ti.type in (_CHR, _BLK) else "special file"
                raise UnsafeArchive(f"Refusing archive member {name!r}: it is a {kind}")
        chunks.finish()
        writers.drain()
        for fname, data in (extra or {}).items():
            if fname in folders[""]:
                raise UnsafeArchive(f"Refusing archive: it holds a member named {fname!r}")
            space.claim(len(data))
            fd = os.open(os.path.join(dest, fname), _O_NEW, 0o444)
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
        if before_seal is not None:
            before_seal(dest, stats)
        # Directories last, deepest first, once nothing more is written into them.
        for name in sorted(dir_modes, key=lambda n: n.count("/") + (n != ""), reverse=True):
            mode = (dir_modes[name] | 0o700) & wmask
            os.chmod(os.path.join(dest, name) if name else dest, mode)
    except OSError as exc:
        raise _os_error(exc, dest) from None
    finally:
        writers.close()
        chunks.close()
    return stats


_O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _write_file(chunks, writers, space, clock, ti, path, name, wmask, relocator, stats) -> None:
    mode = (stat.S_IMODE(ti.mode) & 0o777 | 0o400) & wmask
    if relocator is not None and relocator.wants(name):
        if ti.size > MAX_RELOCATE_BYTES:
            raise UnsafeArchive(f"Refusing archive member {name!r}: it is {_mb(ti.size)}, more than "
                                f"the {_mb(MAX_RELOCATE_BYTES)} a file to relocate may have")
        raw = chunks.read(ti.size)
        if len(raw) < ti.size:
            raise _corrupt("member data ends early")
        data = relocator.apply(name, raw)
        if data is not raw and data != raw:
            stats.relocated += 1
            stats.rewritten.append(name)
        del raw
        pieces = [data]
        written = len(data)
    else:
        pieces = None
        written = ti.size
    space.claim(written)
    if written >= DIRECT_WRITE:
        _create(path, name, mode, ti.mtime, pieces or chunks.pieces(ti.size), clock)
    else:
        writers.add(path, name, mode, ti.mtime, pieces or list(chunks.pieces(ti.size)), written)
    stats.files += 1
    stats.bytes += written


def _create(path, name, mode, mtime, pieces, clock: _Deadline | None = None) -> None:
    try:
        fd = os.open(path, _O_NEW, mode)
    except FileExistsError:
        raise UnsafeArchive(f"Refusing archive member {name!r}: it appears twice") from None
    try:
        for piece in pieces:
            if clock is not None:
                clock.check()
            _write_all(fd, piece)
        os.utime(fd, (mtime, mtime))
    finally:
        os.close(fd)


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
