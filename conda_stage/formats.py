"""Archive formats behind one small interface: a compressed stream to write a
tar into, and a decompressed stream to read a tar from.

``tar.zst`` (default) compresses on all cores and decompresses several times
faster than gzip; ``tar.gz`` is there for sites whose tools expect it.

Reading is for archives a user controls: a stream that ends before its
compressed data does (a cut zstd frame or gzip member), a corrupt one, or
data that is no zstd/gzip at all raises :class:`UnsafeArchive` with one line,
never a silent early end; and no read returns more than it was asked for,
however far a crafted stream would decompress.
"""
from __future__ import annotations

import gzip
import os
import zlib
from typing import BinaryIO

from .errors import UnsafeArchive, UsageError

FORMATS = ("tar.zst", "tar.gz")
DEFAULT_FORMAT = "tar.zst"
DEFAULT_LEVEL = {"tar.zst": 3, "tar.gz": 4}


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise UsageError(f"Unknown archive format {fmt!r} (choose from: {', '.join(FORMATS)})")
    return fmt


def suffix(fmt: str) -> str:
    return "." + check_format(fmt)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _ZstdWriter:
    """File-like object compressing into ``fileobj`` with zstd."""

    copies_input = True  # write() is done with its buffer when it returns

    def __init__(self, fileobj: BinaryIO, level: int, threads: int):
        import zstandard

        self._zstd = zstandard
        cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
        self._writer = cctx.stream_writer(fileobj, closefd=False)

    def write(self, data) -> int:
        return self._writer.write(data)

    def tell(self) -> int:
        return self._writer.tell()

    def close(self) -> None:
        self._writer.flush(self._zstd.FLUSH_FRAME)
        self._writer.close()


def compressor(fileobj: BinaryIO, fmt: str, level: int | None = None,
               threads: int | None = None):
    """A writable, closable stream that compresses into ``fileobj``
    (which stays open)."""
    check_format(fmt)
    level = DEFAULT_LEVEL[fmt] if level is None else level
    threads = cpu_count() if threads is None else threads
    if fmt == "tar.zst":
        return _ZstdWriter(fileobj, level, threads)
    if threads > 1:
        from conda_pack.formats import ParallelGzipFileWriter

        return ParallelGzipFileWriter(fileobj, compresslevel=level, n_threads=threads, mtime=0)
    return gzip.GzipFile(fileobj=fileobj, mode="wb", compresslevel=level, mtime=0)


def corrupt_archive(what: str) -> UnsafeArchive:
    return UnsafeArchive(f"The archive is truncated or corrupt ({what}); repack the environment "
                         f"with 'conda stage --pack --force'")


class Cancelled(Exception):
    """Raised by a reader's source once :meth:`_Reader.cancel` was called."""


class _Source:
    """The compressed file, read by the decompressor through here so that a
    reader can be cancelled between two reads of a slow file."""

    def __init__(self, fileobj: BinaryIO):
        self._f = fileobj
        self.cancelled = False

    def read(self, n: int = -1) -> bytes:
        if self.cancelled:
            raise Cancelled("reading the archive was cancelled")
        return self._f.read(n)


class _Reader:
    """Base of the decompressing readers: ``read(n)`` returns at most ``n``
    bytes (possibly fewer), ``b""`` only at the verified end of the
    compressed data.  ``cancel()`` (from any thread) makes a read that is
    waiting for the file raise :class:`Cancelled` at the file's next read."""

    _source: _Source

    def cancel(self) -> None:
        self._source.cancelled = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass

    def readable(self) -> bool:
        return True


_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_BLOCK_MAX = 128 << 10  # largest block, compressed or not (RFC 8878 3.1.1.2.3)


class _ZstdFrames:
    """The frame structure of zstd data, walked as the compressed bytes pass.

    ``stream_reader`` reports a cut frame as a normal end of data (and
    ``decompressobj`` returns any amount of output for one input chunk), so
    the frames are followed here instead, at the cost of a few operations
    per block: frame header, blocks (each announces its size and whether it
    is the last), optional checksum; skippable frames; any number of frames.
    At the end of the input :meth:`end` says whether it fell between two
    frames.  The decompressor checks what is inside the blocks.
    """

    def __init__(self):
        self.frames = 0
        self._state = self._magic
        self._want = 4  # bytes of the next field
        self._field = b""
        self._skip = 0  # bytes of a block body or skippable frame to pass over
        self._after_skip = None
        self._checksum = False
        self._last = False

    def feed(self, data) -> None:
        pos, n = 0, len(data)
        while pos < n:
            if self._skip:
                take = min(self._skip, n - pos)
                self._skip -= take
                pos += take
                if not self._skip:
                    self._after_skip()
                continue
            take = min(self._want - len(self._field), n - pos)
            self._field += bytes(data[pos:pos + take])
            pos += take
            if len(self._field) == self._want:
                field, self._field = self._field, b""
                self._state(int.from_bytes(field, "little"))

    def end(self) -> None:
        if self._state != self._magic or self._field or self._skip:
            raise corrupt_archive("the zstd data ends inside a frame")
        if not self.frames:
            raise corrupt_archive("no zstd data")

    def _expect(self, state, want: int) -> None:
        self._state, self._want = state, want

    def _pass(self, n: int, then) -> None:
        self._skip, self._after_skip = n, then
        if not n:
            then()

    def _magic(self, magic: int) -> None:
        if magic & 0xFFFFFFF0 == 0x184D2A50:
            self._expect(self._skippable_size, 4)
        elif magic == _ZSTD_MAGIC:
            self._expect(self._descriptor, 1)
        else:
            raise corrupt_archive("not zstd data" if not self.frames else "data after the last zstd frame")

    def _skippable_size(self, size: int) -> None:
        self._expect(self._magic, 4)
        self._pass(size, self._frame_done)

    def _descriptor(self, fhd: int) -> None:
        single = fhd & 0x20
        rest = (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + ((1 if single else 0), 2, 4, 8)[fhd >> 6]
        self._checksum = bool(fhd & 0x04)
        self._expect(self._block, 3)
        if rest:
            self._expect(self._header_rest, rest)

    def _header_rest(self, _value: int) -> None:
        self._expect(self._block, 3)

    def _block(self, bh: int) -> None:
        btype, size = (bh >> 1) & 3, bh >> 3
        if btype == 3 or size > _ZSTD_BLOCK_MAX:
            raise corrupt_archive("bad zstd block header")
        self._last = bool(bh & 1)
        self._pass(1 if btype == 1 else size, self._block_done)

    def _block_done(self) -> None:
        if not self._last:
            self._expect(self._block, 3)
        elif self._checksum:
            self._expect(self._checksum_done, 4)
        else:
            self._frame_done()

    def _checksum_done(self, _value: int) -> None:
        self._frame_done()

    def _frame_done(self) -> None:
        self.frames += 1
        self._expect(self._magic, 4)


class _FrameCheckedSource(_Source):
    """The compressed file, passed through :class:`_ZstdFrames`."""

    def __init__(self, fileobj: BinaryIO):
        super().__init__(fileobj)
        self._frames = _ZstdFrames()

    def read(self, n: int = -1) -> bytes:
        data = super().read(n)
        if data:
            self._frames.feed(data)
        else:
            self._frames.end()
        return data


class _ZstdReader(_Reader):
    """zstd, decompressed by ``stream_reader`` (at most ``n`` bytes per read,
    however far a crafted stream would expand) from a source that follows
    the frames, so that a cut frame raises instead of ending the data."""

    def __init__(self, fileobj: BinaryIO, read_size: int = 1 << 20):
        import zstandard

        self._error = zstandard.ZstdError
        self._source = _FrameCheckedSource(fileobj)
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            self._source, read_size=read_size, read_across_frames=True, closefd=False)

    def read(self, n: int = -1) -> bytes:
        try:
            return self._reader.read(n)
        except self._error as exc:
            raise corrupt_archive(f"zstd: {exc}") from None

    def close(self) -> None:
        self._reader.close()


class _GzipReader(_Reader):
    """gzip, with truncation and corruption as :class:`UnsafeArchive`."""

    def __init__(self, fileobj: BinaryIO):
        self._source = _Source(fileobj)
        self._gz = gzip.GzipFile(fileobj=self._source, mode="rb")

    def read(self, n: int = -1) -> bytes:
        try:
            return self._gz.read(n)
        except EOFError:
            raise corrupt_archive("the gzip data ends early") from None
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise corrupt_archive(f"gzip: {exc}") from None

    def close(self) -> None:
        self._gz.close()


def decompressor(fileobj: BinaryIO, fmt: str):
    """A readable stream of the tar inside ``fileobj`` (which stays open)."""
    check_format(fmt)
    if fmt == "tar.zst":
        return _ZstdReader(fileobj)
    return _GzipReader(fileobj)
