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


class _Reader:
    """Base of the decompressing readers: ``read(n)`` returns at most ``n``
    bytes (possibly fewer), ``b""`` only at the verified end of the
    compressed data."""

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
_ZSTD_GROUP = 8  # blocks decoded per call


class _ZstdReader(_Reader):
    """zstd frames, decoded a few whole blocks at a time with ``decompressobj()``.

    ``stream_reader`` reports a cut frame as a normal end of data, so the
    frames are walked here: a frame header, then blocks (each announces its
    compressed size and decodes to at most 128 KiB, which bounds what one
    ``decompress()`` call can return however crafted the input), then the
    optional checksum, after which the decompressor must say ``eof``.  Any
    number of frames, and skippable frames, may follow one another; input
    that ends inside one, or that is not a frame, is an error.
    """

    def __init__(self, fileobj: BinaryIO, read_size: int = 1 << 20):
        import zstandard

        self._zstd = zstandard
        self._dctx = zstandard.ZstdDecompressor()
        self._src = fileobj
        self._read_size = read_size
        self._in = b""
        self._pos = 0
        self._src_eof = False
        self._out = memoryview(b"")
        self._blocks = self._decode()

    # -- input
    def _need(self, n: int) -> bool:
        """Make ``n`` input bytes available at ``_pos``; False at the end of input."""
        while len(self._in) - self._pos < n:
            if self._src_eof:
                return False
            data = self._src.read(max(self._read_size, n))
            if not data:
                self._src_eof = True
                return False
            self._in = self._in[self._pos:] + data
            self._pos = 0
        return True

    def _take(self, n: int) -> memoryview:
        view = memoryview(self._in)[self._pos:self._pos + n]
        self._pos += n
        return view

    def _skip(self, n: int) -> None:
        while n:
            if not self._need(1):
                raise corrupt_archive("a zstd skippable frame ends early")
            take = min(n, len(self._in) - self._pos)
            self._pos += take
            n -= take

    def _feed(self, dobj, n: int) -> bytes:
        try:
            return dobj.decompress(self._take(n))
        except self._zstd.ZstdError as exc:
            raise corrupt_archive(f"zstd: {exc}") from None

    # -- frames
    def _decode(self):
        frames = 0
        while True:
            if not self._need(4):
                if len(self._in) > self._pos:
                    raise corrupt_archive("the zstd data ends inside a frame header")
                if not frames:
                    raise corrupt_archive("no zstd data")
                return
            magic = int.from_bytes(self._in[self._pos:self._pos + 4], "little")
            if magic & 0xFFFFFFF0 == 0x184D2A50:  # skippable frame
                if not self._need(8):
                    raise corrupt_archive("a zstd skippable frame ends early")
                size = int.from_bytes(self._in[self._pos + 4:self._pos + 8], "little")
                self._pos += 8
                self._skip(size)
                frames += 1
                continue
            if magic != _ZSTD_MAGIC:
                raise corrupt_archive("not zstd data" if not frames else "data after the last zstd frame")
            if not self._need(5):
                raise corrupt_archive("the zstd data ends inside a frame header")
            fhd = self._in[self._pos + 4]
            single = fhd & 0x20
            header = (5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
                      + ((1 if single else 0), 2, 4, 8)[fhd >> 6])
            if not self._need(header):
                raise corrupt_archive("the zstd data ends inside a frame header")
            dobj = self._dctx.decompressobj(write_size=_ZSTD_GROUP * _ZSTD_BLOCK_MAX)
            self._feed(dobj, header)
            last = False
            while not last:
                # Up to _ZSTD_GROUP whole blocks per call: at most 1 MiB out.
                size = blocks = 0
                while blocks < _ZSTD_GROUP and not last:
                    if not self._need(size + 3):
                        raise corrupt_archive("the zstd frame ends early")
                    at = self._pos + size
                    bh = int.from_bytes(self._in[at:at + 3], "little")
                    btype, bsize = (bh >> 1) & 3, bh >> 3
                    if btype == 3 or bsize > _ZSTD_BLOCK_MAX:
                        raise corrupt_archive("bad zstd block header")
                    size += 3 + (1 if btype == 1 else bsize)
                    blocks += 1
                    last = bh & 1
                if last and fhd & 0x04:  # content checksum
                    size += 4
                if not self._need(size):
                    raise corrupt_archive("the zstd frame ends early")
                out = self._feed(dobj, size)
                if out:
                    yield out
            if not dobj.eof:
                raise corrupt_archive("the zstd frame does not end where its last block does")
            frames += 1

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (fewer when a decoding step ends: like a raw
        stream, ``b""`` only at the end)."""
        if not self._out:
            out = next(self._blocks, None)
            if out is None:
                return b""
            if n is None or n < 0 or len(out) <= n:
                return out
            self._out = memoryview(out)
        if n is None or n < 0:
            n = len(self._out)
        take, self._out = self._out[:n], self._out[n:]
        return take.tobytes()


class _GzipReader(_Reader):
    """gzip, with truncation and corruption as :class:`UnsafeArchive`."""

    def __init__(self, fileobj: BinaryIO):
        self._gz = gzip.GzipFile(fileobj=fileobj, mode="rb")

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
