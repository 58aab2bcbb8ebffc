"""The packed environment on the shared filesystem: ``NAME.tar.zst`` next to
the environment, a small sidecar ``NAME.conda-stage.json`` describing it, and
a lock file ``.NAME.conda-stage.lock`` that serialises packing.

The sidecar records the archive's format, size and mtime (so a tarball that
does not match its sidecar is never used), the fingerprint of the
environment it was packed from (so a stale tarball is noticed without
running conda), the stats that let a check skip the fingerprint's listings
(``quick``, see :mod:`conda_stage.fingerprint`; optional: a sidecar without
them is checked by the full fingerprint), and the prefix records needed to
relocate the copy.
"""
from __future__ import annotations

import json
import math
import re
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import fingerprint as fp
from . import formats
from .errors import StageError
from .output import printable
from .resolve import Env
from .userfiles import MiB, UnsafeUserFile, read_bounded

META_VERSION = 1
# Fields a later conda-stage may add within the same META_VERSION are
# ignored here, so that nodes of two versions can share sidecars during a
# rolling upgrade: an addition that older readers could not safely ignore
# must bump META_VERSION instead.  Ignored fields must look like field names,
# and there may be only a few (their values are bounded with the rest).
MAX_UNKNOWN_FIELDS = 16
_FIELD_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

# Limits of what a sidecar may hold.  A real one is a few KB to a few MB
# (one record of ~300 bytes per file with a prefix placeholder).
SIDECAR_LIMIT = 16 * MiB  # a 50k-file PyTorch environment's is a few MiB
MAX_RECORDS = 100_000  # bounds the parsed sidecar's memory (~70 MB)
MAX_TEXT = 4096  # bytes of any string field (PATH_MAX)
_MAX_INT = (1 << 63) - 1
_RECORD_MODES = ("text", "binary")


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
    # [path relative to the prefix, [mtime_ns, ctime_ns, size, ino] | None]
    # for each input of the fingerprint (fingerprint.quick_record); None: none
    quick: list | None = None

    @property
    def max_prefix_length(self) -> int | None:
        """Longest staging prefix the binary placeholders leave room for."""
        lengths = [len(ph.encode()) for _, ph, mode in self.records if mode == "binary"]
        return min(lengths) if lengths else None


class MalformedSidecar(ValueError):
    """The sidecar is not what conda-stage writes; the message says why."""


class OtherMetaVersion(ValueError):
    """The sidecar was written by a conda-stage with another sidecar format."""


def _show(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _text(name: str, value, *, limit: int = MAX_TEXT, strict: bool = False) -> str:
    if not isinstance(value, str):
        raise MalformedSidecar(f"{name} must be a string, not {_show(value)}")
    if "\0" in value:
        raise MalformedSidecar(f"{name} contains a NUL character")
    try:
        # strict: must be real UTF-8 text (placeholders are searched for as
        # bytes); otherwise undecodable bytes of file names may appear as
        # surrogate escapes, as json.dumps of such a path writes them.
        raw = value.encode("utf-8", "strict" if strict else "surrogateescape")
    except UnicodeEncodeError:
        raise MalformedSidecar(f"{name} is not valid text: {_show(value)}") from None
    if len(raw) > limit:
        raise MalformedSidecar(f"{name} is longer than {limit} bytes")
    return value


def _count(name: str, value) -> int:
    if type(value) is not int:
        raise MalformedSidecar(f"{name} must be a whole number, not {_show(value)}")
    if not 0 <= value <= _MAX_INT:
        raise MalformedSidecar(f"{name} is out of range: {value}")
    return value


def _clean_relative(name: str, value) -> str:
    _text(name, value)
    parts = value.split("/")
    if not value or value.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise MalformedSidecar(f"{name} is not a clean relative path: {_show(value)}")
    return value


def _record(i: int, rec) -> list:
    where = f"record {i}"
    if not isinstance(rec, list) or len(rec) != 3:
        raise MalformedSidecar(f"{where} must be a [path, placeholder, mode] triple, "
                               f"not {_show(rec)}")
    path, placeholder, mode = rec
    _clean_relative(f"{where}: the path", path)
    _text(f"{where}: the placeholder", placeholder, strict=True)
    if not placeholder.startswith("/") or placeholder == "/":
        raise MalformedSidecar(f"{where}: the placeholder must be an absolute path, "
                               f"not {_show(placeholder)}")
    if mode not in _RECORD_MODES:
        raise MalformedSidecar(f"{where}: the mode must be 'text' or 'binary', not {_show(mode)}")
    return [path, placeholder, mode]


_BAD_PATH = ("\0\0", "\0/", "//", "/\0", "\0.\0", "\0./", "/./", "/.\0",
             "\0..\0", "\0../", "/../", "/..\0")


def _quick(value) -> list | None:
    """The quick record (fingerprint.quick_record's shape), checked."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > fp.MAX_QUICK:
        raise MalformedSidecar(f"quick must be a list of at most {fp.MAX_QUICK} entries, "
                               f"not {_show(value)}")
    out, seen = [], set()
    for i, entry in enumerate(value):
        where = f"quick entry {i}"
        if not isinstance(entry, list) or len(entry) != 2:
            raise MalformedSidecar(f"{where} must be a [path, stat] pair, not {_show(entry)}")
        path, st = entry
        _clean_relative(f"{where}: the path", path)
        if not fp.is_quick_path(path) or path in seen:
            raise MalformedSidecar(f"{where}: {_show(path)} is not an input of the "
                                   f"fingerprint, or is there twice")
        seen.add(path)
        if st is not None:
            if not isinstance(st, list) or len(st) != 4:
                raise MalformedSidecar(f"{where}: the stat must be [mtime_ns, ctime_ns, size, "
                                       f"inode] or null, not {_show(st)}")
            st = [_count(f"{where}: the stat", v) for v in st]
        out.append([path, st])
    return out


def _records_fast(records: list) -> list | None:
    """The records, when every one of them is well-formed -- checked all at
    once on joined strings (a 10k-record sidecar in a few ms instead of
    ~80 ms); None otherwise, and :func:`_record` then finds the first bad
    one and says why.  Accepts exactly what :func:`_record` accepts."""
    if not records:
        return []
    if not all(type(r) is list and len(r) == 3 for r in records):
        return None
    try:
        paths, placeholders, modes = zip(*records)
        if not (set(map(type, paths)) <= {str} and set(map(type, placeholders)) <= {str}
                and set(modes) <= set(_RECORD_MODES)):
            return None
        joined = "\0" + "\0".join(paths) + "\0"
        phs = "\0" + "\0".join(placeholders) + "\0"
        # NULs: a record's own NUL would show as one too many separators
        if (joined.count("\0") != len(paths) + 1 or phs.count("\0") != len(placeholders) + 1
                or any(bad in joined for bad in _BAD_PATH)
                or phs.count("\0/") != len(placeholders) or "\0/\0" in phs):
            return None
        joined.encode("utf-8", "surrogateescape")
        phs.encode("utf-8")  # strict
    except (TypeError, UnicodeEncodeError):  # unhashable modes, lone surrogates
        return None
    longest = max(map(len, paths + placeholders), default=0)
    if 4 * longest > MAX_TEXT:  # maybe longer than MAX_TEXT bytes: the slow path measures
        return None
    return records


def parse_meta(data: bytes) -> Meta:
    """The :class:`Meta` in sidecar bytes, checked field by field.

    Raises :class:`MalformedSidecar` with the reason for anything that
    conda-stage would not have written, :class:`OtherMetaVersion` for a
    sidecar of another format version.
    """
    # Bound the parsed size before parsing: json.loads of a few MB of
    # "[[],[],..." would take far more memory than any real sidecar.
    # (the other fields and a quick record of fp.MAX_QUICK entries fit in the 64)
    if (data.count(b"[") + data.count(b"{") > MAX_RECORDS + 64
            or data.count(b",") > 4 * MAX_RECORDS + 64):
        raise MalformedSidecar(f"it holds more values than {MAX_RECORDS} records would")
    try:
        obj = json.loads(data)
    except RecursionError:
        raise MalformedSidecar("it is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise MalformedSidecar(f"it is not valid JSON ({printable(str(exc))})") from None
    if not isinstance(obj, dict):
        raise MalformedSidecar(f"it is not a JSON object but {type(obj).__name__}")
    version = obj.get("meta_version")
    if type(version) is not int:
        raise MalformedSidecar(f"meta_version must be a whole number, not {_show(version)}")
    if version != META_VERSION:
        raise OtherMetaVersion(f"sidecar format {version}, this conda-stage reads {META_VERSION}")
    known = {f.name for f in fields(Meta)}
    unknown = sorted(k for k in obj if k not in known)
    for key in unknown:
        if not _FIELD_NAME.match(key):
            raise MalformedSidecar(f"unknown field {_show(key)} is not a field name")
    if len(unknown) > MAX_UNKNOWN_FIELDS:
        raise MalformedSidecar(f"it has more than {MAX_UNKNOWN_FIELDS} fields this "
                               f"conda-stage does not know ({_show(unknown[0])}, ...)")
    missing = [f.name for f in fields(Meta) if f.name not in obj
               and f.name not in ("records", "quick")]
    if missing:
        raise MalformedSidecar(f"field {missing[0]!r} is missing")
    fmt = _text("format", obj["format"])
    if fmt not in formats.FORMATS:
        raise MalformedSidecar(f"format must be one of {', '.join(formats.FORMATS)}, "
                               f"not {_show(fmt)}")
    archive = _text("archive", obj["archive"], limit=255)
    if not archive or "/" in archive or archive in (".", ".."):
        raise MalformedSidecar(f"archive must be a file name, not {_show(archive)}")
    ints = {k: _count(k, obj[k]) for k in ("size", "mtime_ns", "files", "unpacked_bytes")}
    texts = {k: _text(k, obj[k]) for k in ("prefix", "fingerprint", "tool_version", "created")}
    seconds = obj["pack_seconds"]
    if (type(seconds) not in (int, float) or not math.isfinite(seconds)
            or not 0 <= seconds <= 1e9):
        raise MalformedSidecar(f"pack_seconds must be a number of seconds, not {_show(seconds)}")
    records = obj.get("records", [])
    if not isinstance(records, list):
        raise MalformedSidecar(f"records must be a list, not {_show(records)}")
    if len(records) > MAX_RECORDS:
        raise MalformedSidecar(f"it has more than {MAX_RECORDS} records")
    records = _records_fast(records) or [_record(i, r) for i, r in enumerate(records)]
    return Meta(format=fmt, archive=archive, pack_seconds=float(seconds), records=records,
                meta_version=version, quick=_quick(obj.get("quick")), **ints, **texts)


@dataclass(frozen=True)
class Sidecar:
    """What a sidecar said when it was read (once).

    ``meta`` is set only when the sidecar is valid (and, after
    :meth:`check`, describes the tarball on disk); otherwise ``problem`` is
    why not, worded to follow "because", and ``malformed`` tells a sidecar
    that is broken (not what conda-stage writes) from one that is missing
    or out of date.
    """

    meta: Meta | None
    problem: str | None = None
    malformed: bool = False
    path: Path | None = None

    def check(self, st: os.stat_result | None) -> "Sidecar":
        """This sidecar if it describes the tarball whose ``fstat``/``stat`` is
        ``st`` (None: there is no tarball), else one saying why not."""
        if self.meta is None:
            return self
        if st is None:
            return Sidecar(None, "its tarball is missing", path=self.path)
        if (st.st_size, st.st_mtime_ns) != (self.meta.size, self.meta.mtime_ns):
            return Sidecar(None, "its tarball changed after it was packed (size or time differ "
                                 "from its sidecar)", path=self.path)
        return self

    def stale_reason(self, env: Env) -> str | None:
        """Why the environment must be (re)packed, None if the tarball is fresh."""
        if self.malformed:
            return f"its sidecar {printable(str(self.path))} is malformed: {self.problem}"
        if self.meta is None:
            return self.problem or "its tarball has no valid conda-stage metadata"
        if not fp.is_fresh(env.prefix, self.meta.fingerprint, self.meta.quick):
            return "the environment changed since it was packed"
        return None

    def malformed_error(self, env: Env) -> StageError:
        """The one-line error for a malformed sidecar (``self.malformed``)."""
        return StageError(f"its sidecar {printable(str(self.path))} is malformed: "
                          f"{self.problem}; run 'conda stage --pack --force "
                          f"{printable(str(env.prefix))}'")


def _read_sidecar(path: Path) -> tuple[Sidecar, bool]:
    """Read and check the sidecar at ``path`` once.  Returns the
    :class:`Sidecar` (not yet compared with a tarball) and whether a
    sidecar file exists at all."""
    shown = printable(str(path))
    try:
        data = read_bounded(path, SIDECAR_LIMIT, what="sidecar")
    except FileNotFoundError:
        return Sidecar(None, None, path=path), False
    except UnsafeUserFile as exc:
        return Sidecar(None, exc.reason, malformed=True, path=path), True
    except OSError as exc:
        return Sidecar(None, f"its sidecar {shown} cannot be read ({exc.strerror})",
                       path=path), True
    try:
        return Sidecar(parse_meta(data), path=path), True
    except OtherMetaVersion as exc:
        return Sidecar(None, f"its sidecar was written by another conda-stage version ({exc})",
                       path=path), True
    except MalformedSidecar as exc:
        return Sidecar(None, str(exc), malformed=True, path=path), True


@dataclass(frozen=True)
class Tarball:
    """The paths of an environment's tarball, sidecar and lock file (the
    one place that knows them), and reading the sidecar."""

    env: Env
    path: Path
    meta_path: Path
    lock_path: Path

    @classmethod
    def at(cls, env: Env, fmt: str) -> "Tarball":
        """The tarball of ``env`` in format ``fmt`` (reads nothing)."""
        parent, name = env.prefix.parent, env.prefix.name
        return cls(env, parent / (name + formats.suffix(fmt)),
                   parent / f"{name}.conda-stage.json", parent / f".{name}.conda-stage.lock")

    @classmethod
    def lock_for(cls, env: Env) -> Path:
        return cls.at(env, formats.DEFAULT_FORMAT).lock_path

    @classmethod
    def for_env(cls, env: Env, fmt: str | None = None) -> "Tarball":
        """The tarball of ``env``; without ``fmt``, in the format its sidecar
        names (the default format when there is no valid sidecar)."""
        if fmt is None:
            return cls.load(env)[0]
        return cls.at(env, fmt)

    @property
    def format(self) -> str:
        return self.path.name[len(self.env.prefix.name) + 1:]

    @classmethod
    def load(cls, env: Env) -> tuple["Tarball", Sidecar]:
        """The tarball of ``env`` and its sidecar, which is read once.  The
        sidecar is not yet compared with the tarball on disk: call
        ``sidecar.check(os.fstat(...))`` on the opened tarball."""
        default = cls.at(env, formats.DEFAULT_FORMAT)
        side, exists = _read_sidecar(default.meta_path)
        tarball = cls.at(env, side.meta.format) if side.meta is not None else default
        return tarball, tarball._describing(side, exists)

    def _describing(self, side: Sidecar, exists: bool) -> Sidecar:
        if side.meta is not None and side.meta.archive != self.path.name:
            return Sidecar(None, f"its sidecar describes another tarball "
                                 f"({printable(side.meta.archive)}, not {printable(self.path.name)})",
                           path=self.meta_path)
        if not exists:
            packed = any(os.path.lexists(self.path.parent / (self.env.prefix.name +
                                                             formats.suffix(f)))
                         for f in formats.FORMATS)
            return Sidecar(None, "its tarball has no valid conda-stage metadata" if packed
                           else "it hasn't been done before", path=self.meta_path)
        return side

    def read_sidecar(self) -> Sidecar:
        """The sidecar, read once and compared with this tarball on disk."""
        side, exists = _read_sidecar(self.meta_path)
        side = self._describing(side, exists)
        if side.meta is None:
            return side
        try:
            st = os.stat(self.path)
        except OSError:
            st = None
        return side.check(st)

    def read_meta(self) -> Meta | None:
        """The sidecar, if it is valid and describes the tarball on disk."""
        return self.read_sidecar().meta

    def write_meta(self, meta: Meta) -> None:
        """Write the sidecar of this (just written) tarball; without a quick
        record in ``meta``, it gets one now (:meth:`quick_record`)."""
        if meta.quick is None:
            meta.quick = self.quick_record(meta)
        # The fields as they are (asdict deep-copies every record) and json's C
        # encoder (indent= selects the pure-Python one): 0.17 s -> 0.02 s for
        # the 10,000 records of a jupyter environment, at the end of every pack.
        data = {f.name: getattr(meta, f.name) for f in fields(meta)
                if f.name != "quick" or meta.quick is not None}
        atomic_write(self.meta_path, json.dumps(data, separators=(",", ":")).encode())

    def quick_record(self, meta: Meta) -> list | None:
        """The quick check of the environment ``meta`` describes, its racy
        reference the mtime of this tarball -- written before the call, by
        the clock of the filesystem next to the environment (None: no quick
        check; the tarball is not the one ``meta`` describes)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        if (st.st_size, st.st_mtime_ns) != (meta.size, meta.mtime_ns):
            return None
        return fp.quick_record(Path(meta.prefix), meta.fingerprint, st.st_mtime_ns, st.st_dev)

    def remove(self) -> list[Path]:
        removed = []
        for fmt in formats.FORMATS:
            p = self.path.parent / (self.env.prefix.name + formats.suffix(fmt))
            if p.exists():
                p.unlink()
                removed.append(p)
        if self.meta_path.exists():
            self.meta_path.unlink()
        from .image import Image  # the image is built from the tarball: it goes too

        image = Image(self.env)
        for p in (image.path, image.meta_path):
            if p.exists():
                p.unlink()
                removed.append(p)
        return removed


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
