"""The packed environment on the shared filesystem: ``NAME.tar.zst`` next to
the environment, a small sidecar ``NAME.conda-stage.json`` describing it, and
a lock file ``.NAME.conda-stage.lock`` that serialises packing.

The sidecar records the archive's format, size and mtime (so a tarball that
does not match its sidecar is never used), the fingerprint of the
environment it was packed from (so a stale tarball is noticed without
running conda), and the prefix records needed to relocate the copy.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import formats
from .resolve import Env

META_VERSION = 1


@dataclass
class Meta:
    format: str
    archive: str  # basename of the tarball, next to the sidecar
    size: int
    mtime_ns: int
    prefix: str
    fingerprint: str
    tool_version: str
    created: str
    pack_seconds: float
    files: int
    unpacked_bytes: int
    # (path inside the env, placeholder, "text" | "binary")
    records: list = field(default_factory=list)
    meta_version: int = META_VERSION

    @property
    def max_prefix_length(self) -> int | None:
        """Longest staging prefix the binary placeholders leave room for."""
        lengths = [len(ph.encode()) for _, ph, mode in self.records if mode == "binary"]
        return min(lengths) if lengths else None


@dataclass(frozen=True)
class Tarball:
    env: Env
    path: Path
    meta_path: Path
    lock_path: Path

    @classmethod
    def for_env(cls, env: Env, fmt: str | None = None) -> "Tarball":
        parent, name = env.prefix.parent, env.prefix.name
        meta_path = parent / f"{name}.conda-stage.json"
        if fmt is None:
            meta = _read_json(meta_path)
            fmt = meta.get("format") if meta else None
            if fmt not in formats.FORMATS:
                fmt = formats.DEFAULT_FORMAT
        return cls(env, parent / (name + formats.suffix(fmt)), meta_path,
                   parent / f".{name}.conda-stage.lock")

    @property
    def format(self) -> str:
        return self.path.name[len(self.env.prefix.name) + 1:]

    def read_meta(self) -> Meta | None:
        """The sidecar, if it exists and describes the tarball on disk."""
        data = _read_json(self.meta_path)
        if not data or data.get("meta_version") != META_VERSION:
            return None
        try:
            meta = Meta(**data)
        except TypeError:
            return None
        if meta.archive != self.path.name:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        if (st.st_size, st.st_mtime_ns) != (meta.size, meta.mtime_ns):
            return None
        return meta

    def write_meta(self, meta: Meta) -> None:
        atomic_write(self.meta_path, json.dumps(asdict(meta), indent=1).encode())

    def remove(self) -> list[Path]:
        removed = []
        for fmt in formats.FORMATS:
            p = self.path.parent / (self.env.prefix.name + formats.suffix(fmt))
            if p.exists():
                p.unlink()
                removed.append(p)
        if self.meta_path.exists():
            self.meta_path.unlink()
        return removed


def _read_json(path: Path) -> dict | None:
    try:
        with open(path, "rb") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
