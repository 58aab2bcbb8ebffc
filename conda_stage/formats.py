"""Archive formats behind one small interface: a compressed stream to write a
tar into, and a decompressed stream to read a tar from.

``tar.zst`` (default) compresses on all cores and decompresses several times
faster than gzip; ``tar.gz`` is there for sites whose tools expect it.
"""
from __future__ import annotations

import gzip
import os
from typing import BinaryIO

from .errors import UsageError

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


def decompressor(fileobj: BinaryIO, fmt: str):
    """A readable stream of the tar inside ``fileobj``."""
    check_format(fmt)
    if fmt == "tar.zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(fileobj, read_size=1 << 20,
                                                          closefd=False)
    return gzip.GzipFile(fileobj=fileobj, mode="rb")
