"""Pack an environment into its tarball, once, atomically, under a lock.

conda-pack does the hard part -- which files belong to which package, taking
conda-managed files from the package cache with their build-time prefix
placeholders, spotting editable installs and files clobbered by pip, and
collecting the prefix records -- through its public ``CondaEnv`` API and its
``Packer``.  This module adds what a shared cluster needs: multi-threaded
zstd, a tar writer that does not look up user names for every file,
read-ahead of the files with several threads (on a shared filesystem every
open is a round trip to a server; done one after the other they dominate the
time), a temporary name and a rename, a lock so two shells or jobs never
pack the same environment at once, and the sidecar describing the result.

For speed, a few of conda-pack's functions are written out here and tested
against conda-pack's own: ``_load_files``, ``_is_binary_file`` and
``_load_environment`` (the last used only with the conda-pack release it was
read from, checked by the sha256 of its ``core.py``; any other runs its own).
They follow conda-pack 0.9.2's ``core.py``, Copyright (c) 2017, Jim Crist and
contributors, under its BSD-3-Clause license (conda-pack's LICENSE.txt),
which applies to them.
"""
from __future__ import annotations

import builtins
import contextlib
import datetime
import gc
import hashlib
import io
import json
import mmap
import os
import re
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

from . import __version__, bytecode, formats, output
from .errors import PackError, StageError
from .fingerprint import fingerprint
from .locking import file_lock
from .resolve import Env
from .tarball import SIDECAR_LIMIT, Meta, Tarball, current_umask
from .userfiles import read_bounded


_READ_AHEAD_THREADS = 8
_READ_AHEAD_FILES = 128
_READ_AHEAD_MAX_FILE = 1 << 20  # bigger files are read when their turn comes


class _ReadAhead:
    """Stat and read the files about to be packed, a window ahead, in threads.

    ``take(path)`` hands over what was read -- ``(lstat result, bytes or
    None)`` -- once; a file that could not be read ahead (too big, an error)
    is simply read again by the caller, who then sees the real error.
    """

    def __init__(self, paths: list[str], threads: int = _READ_AHEAD_THREADS,
                 window: int = _READ_AHEAD_FILES):
        self._paths = paths
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="conda-stage-read")
        self._futures: dict[str, object] = {}
        self._taken: dict[str, os.stat_result] = {}  # stat of what conda-pack read itself
        self._next = 0
        self._window = window
        self._lock = threading.Lock()
        self._fill()

    @staticmethod
    def _read(path: str):
        try:
            st = os.lstat(path)
            data = None
            if stat.S_ISREG(st.st_mode) and st.st_size <= _READ_AHEAD_MAX_FILE:
                with builtins.open(path, "rb") as fh:
                    data = fh.read()
                if len(data) != st.st_size:
                    return None  # changing under us: let the caller read it
            return st, data
        except OSError:
            return None

    def _fill(self) -> None:
        while self._next < len(self._paths) and len(self._futures) < self._window:
            path = self._paths[self._next]
            self._next += 1
            if path not in self._futures:
                self._futures[path] = self._pool.submit(self._read, path)

    def take(self, path: str, keep_stat: bool = False):
        with self._lock:
            fut = self._futures.pop(path, None)
            self._fill()
        got = fut.result() if fut is not None else None
        if keep_stat and got is not None:
            self._taken[path] = got[0]
        return got

    def taken_stat(self, path: str):
        """The lstat result of a file whose data conda-pack took (once)."""
        return self._taken.pop(path, None)

    def close(self) -> None:
        for fut in self._futures.values():
            fut.cancel()
        self._pool.shutdown(wait=True)


_LOCAL_FS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "jfs", "reiserfs",
             "tmpfs", "ramfs", "overlay", "squashfs", "vfat", "exfat"}


def _on_shared_fs(path) -> bool:
    """Whether ``path`` is on a network or FUSE filesystem (NFS, Lustre, BeeGFS,
    GPFS, CephFS, ...), where each open waits for a server.  On local disks
    reading ahead in threads only adds overhead."""
    path = os.path.realpath(path)
    best, fstype = "", None
    try:
        with open("/proc/self/mountinfo", "rb") as fh:
            for line in fh:
                fields = line.decode("utf-8", "surrogateescape").split()
                mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
                    best, fstype = mp, fields[fields.index("-") + 1]
    except (OSError, ValueError, IndexError):
        return False
    return fstype is not None and fstype not in _LOCAL_FS


# The prefetcher: a child process (an interpreter of its own, so no GIL
# shared with the packer) that asks the kernel to read the files ahead with
# posix_fadvise(WILLNEED): the reads are queued, many at once, and the call
# returns at once.  With cold caches on a local disk the packer otherwise
# waits for the disk at each of ~17,000 small files, one after the other.
# Phase 1 walks the environment while conda-pack scans it; once the packer's
# list is there (phase 2) it follows that order, at most its budget of bytes
# ahead of the file being packed.  It only opens files for reading.
_PREFETCH_CHILD = r"""
import mmap, os, stat, struct, sys, time
prefix, budget, fd = os.fsencode(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
shm = mmap.mmap(fd, 4096)
parent = os.getppid()
FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
WILLNEED = os.POSIX_FADV_WILLNEED
IGNORE = {b"pkgs", b"envs", b"conda-bld", b".conda_lock", b"users", b"conda-recipes",
          b".index", b".unionfs", b".nonadmin", b"python.app", b"Launcher.app"}
done = set()
used = 0

def managed():
    # the environment's copies of conda's files whose package is in the
    # package cache: conda-pack reads those from there, not these
    import json
    skip, meta = set(), os.path.join(prefix, b"conda-meta")
    try:
        names = os.listdir(meta)
    except OSError:
        return skip
    for name in names:
        if not name.endswith(b".json"):
            continue
        try:
            with open(os.path.join(meta, name), "rb") as fh:
                info = json.loads(fh.read())
            link = info.get("link") or {}
            if link.get("source") and os.path.exists(link["source"]):
                skip.update(prefix + b"/" + os.fsencode(f) for f in info.get("files", ()))
        except (OSError, ValueError, TypeError, AttributeError):
            continue
    return skip

skip = managed()
CHECK = 512 if hasattr(os, "RWF_NOWAIT") and hasattr(os, "preadv") else 0

def field(i):
    return struct.unpack_from("q", shm, 8 * i)[0]

def gone():
    return field(2) or os.getppid() != parent

probe = bytearray(1)
checked = cached = 0

def warm(path, limit):
    # queue the reads of a regular file's first `limit` bytes; how many
    global checked, cached
    try:
        f = os.open(path, FLAGS)
    except OSError:
        return 0
    try:
        st = os.fstat(f)
        n = min(st.st_size, limit)
        if not stat.S_ISREG(st.st_mode) or n <= 0:
            return 0
        if checked < CHECK:  # is its first page in the page cache already?
            checked += 1
            try:
                os.preadv(f, [probe], 0, os.RWF_NOWAIT)
                cached += 1
            except OSError:
                pass
        os.posix_fadvise(f, 0, n, WILLNEED)
        return n
    except OSError:
        return 0
    finally:
        os.close(f)

def warm_already():
    # nearly all of the first CHECK files were in the page cache: so is the
    # rest, most likely (just installed, or packed a moment ago; a file or
    # two the packer never reads may not be); prefetching would only take
    # CPU time from the compressor
    return checked == CHECK and cached >= CHECK - CHECK // 16

def phase1():
    global used
    stack, k = [prefix], 0
    while stack:
        top = stack.pop()
        try:
            it = os.scandir(top)
        except OSError:
            continue
        with it:
            for e in it:
                k += 1
                if not k % 64 and (field(1) or gone()):
                    return
                try:
                    if e.is_dir(follow_symlinks=False):
                        if top != prefix or e.name not in IGNORE:
                            stack.append(e.path)
                    elif e.is_file(follow_symlinks=False) and e.path not in skip:
                        used += warm(e.path, budget - used)
                        done.add(e.path)
                        if used >= budget or CHECK and warm_already():
                            return
                except OSError:
                    pass

def phase2():
    while not field(1):
        if gone():
            return
        time.sleep(0.005)
    size, data = field(1) - 1, b""
    while len(data) < size:
        piece = os.pread(fd, size - len(data), 4096 + len(data))
        if not piece:
            return
        data += piece
    cum = [0]
    for j, path in enumerate(data.split(b"\0") if size else ()):
        while cum[-1] - cum[min(max(field(0), 0), j)] > budget:
            if gone():
                return
            time.sleep(0.002)
        if not j % 64 and gone():
            return
        behind = j < field(0) or path in done  # packed already, or queued in phase 1
        cum.append(cum[-1] + (0 if behind else warm(path, budget)))
        if CHECK and warm_already():
            return

phase1()
if not (CHECK and warm_already()):
    phase2()
"""


def _prefetch_budget() -> int:
    """Bytes the prefetcher may read ahead: a quarter of the available
    memory, between 64 MiB and 1 GiB."""
    avail = 0
    try:
        with open("/proc/meminfo", "rb") as fh:
            for line in fh:
                if line.startswith(b"MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    return max(64 << 20, min(1 << 30, avail // 4))


class _Prefetch:
    """The prefetcher, seen from the packer: ``follow(paths)`` hands over
    the order the packer reads the files in, ``at(i)`` says which one it is
    packing.  A hint and nothing more: when it cannot run, nothing is
    prefetched."""

    def __init__(self, prefix: str):
        self._shm = None
        self._fd = os.memfd_create("pack-prefetch", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, 4096)
            self._shm = mmap.mmap(self._fd, 4096)
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", "-c", _PREFETCH_CHILD, prefix,
                 str(_prefetch_budget()), str(self._fd)],
                pass_fds=(self._fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, cwd="/")
        except BaseException:
            self._release()
            raise

    @classmethod
    def start(cls, prefix: str) -> "_Prefetch | None":
        if not sys.executable or not hasattr(os, "posix_fadvise") \
                or not hasattr(os, "memfd_create"):
            return None
        try:
            return cls(prefix)
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    def follow(self, paths) -> None:
        if self._shm is None:
            return
        data = os.fsencode("\0".join(paths))  # as each path's os.fsencode, joined
        try:
            os.pwrite(self._fd, data, 4096)
        except OSError:
            self.close()
            return
        struct.pack_into("q", self._shm, 8, len(data) + 1)

    def at(self, i: int) -> None:
        struct.pack_into("q", self._shm, 0, i)

    def _release(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        if self._shm is None:
            return
        struct.pack_into("q", self._shm, 16, 1)  # stop
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._release()


def _read_whole(path: str) -> bytes:
    """The contents of a file, as ``open(path, 'rb').read()`` without the
    file objects (conda-pack reads most files of an environment this way)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        want = os.fstat(fd).st_size + 1
        parts = []
        while True:  # until EOF: a short read, or a file that grew
            piece = os.read(fd, want)
            if not piece:
                break
            parts.append(piece)
            want = 1 << 20
    finally:
        os.close(fd)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _is_binary_file(data) -> bool:
    """conda-pack's ``is_binary_file`` (not UTF-8 = binary), without decoding
    the ASCII files (most text files of an environment)."""
    if data.isascii():
        return False
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def _conda_pack_core():
    """``conda_pack.core``.  Imported for the first time, without running
    ``conda_pack/__init__`` yet (it asks importlib.metadata for conda-pack's
    version: ~15 ms of start-up before the first byte is packed): the
    package is set up bare, and runs its ``__init__`` when anything else
    is first asked of it (``conda_pack.CondaEnv``, ``__version__``, ...)."""
    core = sys.modules.get("conda_pack.core")
    if core is not None:
        return core
    if "conda_pack" not in sys.modules:
        import importlib.util
        import types

        spec = importlib.util.find_spec("conda_pack")  # finds, does not import
        if spec is not None and spec.submodule_search_locations and spec.loader is not None:
            package = types.ModuleType("conda_pack")
            package.__path__ = list(spec.submodule_search_locations)
            package.__spec__, package.__loader__ = spec, spec.loader
            package.__file__, package.__package__ = spec.origin, "conda_pack"

            def rest_of_init(name):
                if name.startswith("__") and name not in ("__version__", "__all__"):
                    raise AttributeError(name)
                del package.__getattr__
                spec.loader.exec_module(package)  # conda_pack/__init__, in this module
                return getattr(package, name)

            package.__getattr__ = rest_of_init
            sys.modules["conda_pack"] = package
            try:
                import conda_pack.core as core
            except BaseException:
                if sys.modules.get("conda_pack") is package:
                    del sys.modules["conda_pack"]
                raise
            return core
    import conda_pack.core as core
    return core


class _NotPlainJson(Exception):
    pass


def _json_dumps_sorted(obj, indent: str = " ") -> str:
    """``json.dumps(obj, indent=len(indent), sort_keys=True)``, the same
    string, 2x faster: with an indent, :mod:`json` encodes in Python, with
    a generator per container (conda-pack rewrites each conda-meta record
    this way; python's is 0.7 MB).  Anything but what ``json.loads`` makes
    (str keys; str, int, float, bool, None, list, dict) goes to json.dumps."""
    enc = json.encoder.encode_basestring_ascii
    floatstr = float.__repr__
    parts: list[str] = []
    put = parts.append
    encoders: dict = {}
    c_make = getattr(json.encoder, "c_make_encoder", None)

    def c_leaf(nl: str):
        e = encoders.get(nl)
        if e is None:
            e = encoders[nl] = c_make(None, _not_plain, enc, None, ": ", "," + nl, True, False,
                                      True)
        return e

    leaf = c_leaf if c_make is not None else None

    def scalar(o) -> str:
        t = type(o)
        if t is str:
            return enc(o)
        if o is None:
            return "null"
        if o is True:
            return "true"
        if o is False:
            return "false"
        if t is int:
            return int.__repr__(o)
        if t is float:
            return ("NaN" if o != o else "Infinity" if o == _INF else "-Infinity" if o == -_INF
                    else floatstr(o))
        raise _NotPlainJson

    def value(o, nl: str) -> None:
        t = type(o)
        if t is list:
            if not o:
                put("[]")
                return
            inner = nl + indent
            sep = "," + inner
            try:  # a list of strings (conda-meta's file lists): in one go
                put("[" + inner + sep.join(map(enc, o)) + nl + "]")
                return
            except TypeError:
                pass
            put("[" + inner)
            first = True
            for v in o:
                if not first:
                    put(sep)
                first = False
                tv = type(v)
                if tv is dict and leaf is not None and v and not any(
                        type(x) is list or type(x) is dict for x in v.values()):
                    # a record of plain values: json's C encoder, the items on
                    # lines of their own (JSON strings have no raw newlines)
                    body = "".join(leaf(inner + indent)(v, 0))
                    put("{" + inner + indent + body[1:-1] + inner + "}")
                elif tv is list or tv is dict:
                    value(v, inner)
                else:
                    put(scalar(v))
            put(nl + "]")
        elif t is dict:
            if not o:
                put("{}")
                return
            inner = nl + indent
            sep = "," + inner
            put("{" + inner)
            first = True
            for k, v in sorted(o.items()):
                if type(k) is not str:
                    raise _NotPlainJson
                if not first:
                    put(sep)
                first = False
                if type(v) is list or type(v) is dict:
                    put(enc(k) + ": ")
                    value(v, inner)
                else:
                    put(enc(k) + ": " + scalar(v))
            put(nl + "}")
        else:
            put(scalar(o))

    try:
        value(obj, "\n")
    except (_NotPlainJson, RecursionError):
        return json.dumps(obj, indent=len(indent), sort_keys=True)
    return "".join(parts)


_INF = float("inf")


def _not_plain(o):
    raise _NotPlainJson


def _rewrite_conda_meta(source: str, open_=builtins.open):
    """``conda_pack.core.rewrite_conda_meta`` (the record with the local
    paths blanked, and its data), with :func:`_json_dumps_sorted`."""
    with open_(source) as f:
        original = f.read()
    data = json.loads(original)
    for field in ["extracted_package_dir", "package_tarball_full_path"]:
        if field in data:
            data[field] = ""
    if "link" in data and data["link"] and "source" in data["link"]:
        data["link"]["source"] = ""
    out = _json_dumps_sorted(data)
    return out.encode(), data


@contextlib.contextmanager
def _conda_pack_reads_from(ahead: _ReadAhead | None):
    """Let conda-pack's own ``open(path)`` / ``open(path, 'rb')`` calls in
    ``Packer.add`` (unmanaged files, conda-meta records) be served from the
    read-ahead, or read with plain ``os.read``, and its UTF-8 test skip the
    ASCII files.  Anything else goes to the real ``open``."""
    core = _conda_pack_core()

    def fast_open(file, mode="r", *args, **kwargs):
        if not args and not kwargs and mode in ("r", "rb") and isinstance(file, str):
            data = None
            if ahead is not None:
                got = ahead.take(file, keep_stat=True)
                if got is not None:
                    data = got[1]
            else:
                data = _read_whole(file)
            if data is not None:
                raw = io.BytesIO(data)
                return raw if mode == "rb" else io.TextIOWrapper(raw)
        return builtins.open(file, mode, *args, **kwargs)

    original = core.is_binary_file, core.rewrite_conda_meta
    core.open = fast_open  # a module global shadows the builtin
    core.is_binary_file = _is_binary_file
    core.rewrite_conda_meta = lambda source: _rewrite_conda_meta(source, fast_open)
    try:
        yield
    finally:
        del core.open
        core.is_binary_file, core.rewrite_conda_meta = original


# conda-pack's scan (``CondaEnv.from_prefix``) is serial work before the
# first byte can be compressed.  Two of its helpers, as fast: the listing of
# the environment (``load_files``: ``os.walk`` with a ``relpath``, a ``join``
# and an ``islink`` per folder, a ``join`` per file) and the test whether a
# file is bytecode of a conda-managed source (``find_py_source``, an
# exception for every file that is not in a ``__pycache__`` folder).
_SCAN_IGNORE = frozenset(("pkgs", "envs", "conda-bld", ".conda_lock", "users", "conda-recipes",
                          ".index", ".unionfs", ".nonadmin", "python.app", "Launcher.app"))


def _load_files(prefix: str) -> set:
    """``conda_pack.core.load_files``: every file, symlink, symlink to a
    folder and empty folder below ``prefix``, relative to it (as os.walk
    sees them: folders that cannot be listed are left out)."""
    res = set()
    stack = []
    for fn in os.listdir(prefix):
        if fn in _SCAN_IGNORE or fn.endswith("~") or fn.endswith(".DS_STORE"):
            continue
        path = os.path.join(prefix, fn)
        if os.path.isfile(path) or os.path.islink(path):
            res.add(fn)
        else:
            stack.append((fn, path))
    add = res.add
    while stack:
        rel, path = stack.pop()
        try:
            it = os.scandir(path)
        except OSError:
            continue
        empty = True
        with it:
            for entry in it:
                empty = False
                try:
                    is_dir = entry.is_dir()  # through symlinks, as os.walk
                except OSError:
                    is_dir = False
                name = rel + "/" + entry.name
                if not is_dir:
                    add(name)
                elif entry.is_symlink():
                    add(name)  # a symlink to a folder: packed as the symlink
                else:
                    stack.append((name, path + "/" + entry.name))
        if empty:
            add(rel)
    return res


# conda-pack's core.py files whose load_environment _load_environment is
# (sha256): 0.9.2.  With any other, conda-pack's own runs.
_KNOWN_CONDA_PACK_CORE = frozenset((
    "88c2f01e93b4b53fe566c7f0bf6700067ed7fec056fd5f8ff459c660a9671481",
))


def _known_conda_pack(core) -> bool:
    """Whether ``core`` is a conda-pack whose ``load_environment`` is
    :func:`_load_environment`'s (its core.py, byte for byte), on POSIX."""
    if core.on_win:
        return False
    try:
        with builtins.open(core.__file__, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest() in _KNOWN_CONDA_PACK_CORE
    except (OSError, TypeError):
        return False


def _load_environment(prefix, on_missing_cache="warn", ignore_editable_packages=False,
                      ignore_missing_files=False):
    """conda-pack 0.9.2's ``load_environment``, step by step, on POSIX: the
    same File list in the same order, the same errors and warnings.  Only
    faster: ``os.path.normcase`` is the identity there (the names stay a
    set), and the 10,000s of unmanaged files are joined to the prefix with
    a "/" (``os.path.join`` of an absolute prefix and a relative name) and
    made with positional arguments."""
    core = _conda_pack_core()
    File = core.File
    if not os.path.exists(prefix):
        raise core.CondaPackException("Environment path %r doesn't exist" % prefix)
    conda_meta = os.path.join(prefix, "conda-meta")
    if not os.path.exists(conda_meta):
        raise core.CondaPackException("Path %r is not a conda environment" % prefix)

    site_packages = core.find_site_packages(prefix)
    if site_packages is not None and not ignore_editable_packages:
        core.check_no_editable_packages(prefix, site_packages)

    all_files = core.load_files(prefix)  # conda-pack: {normcase(p): p}, here {p: p}

    files = []
    managed = set()
    uncached = []
    missing_files = {}
    for path in os.listdir(conda_meta):
        if path.endswith(".json"):
            with builtins.open(os.path.join(conda_meta, path)) as fil:
                info = json.load(fil)

            pkg = info["link"]["source"] if info["link"] else ""

            if not os.path.exists(pkg):
                new_files = [File(os.path.join(prefix, f), f, is_conda=True,
                                  prefix_placeholder=None, file_mode="unknown")
                             for f in info["files"] if f != ".nonadmin"]
                uncached.append((info["name"], info["version"], info["url"]))
            else:
                new_files = core.load_managed_package(info, prefix, site_packages, all_files)

            targets = {f.target for f in new_files}
            new_missing = targets.difference(all_files)

            if new_missing:
                missing_files[(info["name"], info["version"])] = new_missing

                if ignore_missing_files:
                    new_files = [f for f in new_files if f.target not in new_missing]

            managed.update(targets)
            files.extend(new_files)
            managed.add(os.path.join("conda-meta", path))
            files.append(File(os.path.join(conda_meta, path),
                              os.path.join("conda-meta", path),
                              is_conda=True,
                              prefix_placeholder=None,
                              file_mode=None))

    if os.path.exists(os.path.join(conda_meta, "history")):
        managed.add(os.path.join("conda-meta", "history"))
        files.append(File(os.path.join(conda_meta, "history"),
                          os.path.join("conda-meta", "history"),
                          is_conda=True, prefix_placeholder=None, file_mode=None))

    if missing_files and not ignore_missing_files:
        packages = []
        for key, value in missing_files.items():
            packages.append("- %s %s:" % key)
            value = sorted(value)
            if len(value) > 4:
                value = value[:3] + ["+ %d others" % (len(value) - 3)]
            packages.extend("    " + p for p in value)
        packages = "\n".join(packages)
        raise core.CondaPackException(core._missing_files_error.format(packages))

    unmanaged = all_files.difference(managed)
    unmanaged -= {os.path.join(core.BIN_DIR, f) for f in ("conda", "activate", "deactivate")}

    base = prefix if prefix.endswith("/") else prefix + "/"
    find_py_source = core.find_py_source
    files.extend(File(base + p, p, False, "unknown", None)
                 for p in unmanaged if not _py_source_in(p, managed, find_py_source))

    if uncached and on_missing_cache in ("warn", "raise"):
        packages = "\n".join("- %s=%r   %s" % i for i in uncached)
        if on_missing_cache == "warn":
            core.context.warn(core._uncached_warning.format(packages))
        else:
            raise core.CondaPackException(core._uncached_error.format(packages))

    return files


def _py_source_in(path: str, managed: set, find_py_source) -> bool:
    """``find_py_source(path) in managed``, asked only of the bytecode whose
    source would be in ``managed``: importlib's ``source_from_cache`` either
    raises (conda-pack: None) or returns the folder above ``__pycache__``
    joined to the name up to its first dot, plus ".py"."""
    if sys.pycache_prefix is None:
        head, _, name = path.rpartition("/")
        above, _, folder = head.rpartition("/")
        if folder != "__pycache__":
            return False  # it raises: None
        source = name.partition(".")[0] + ".py"
        if (above + "/" + source if above else source) not in managed:
            return False  # it says that, or raises
    return find_py_source(path) in managed


@contextlib.contextmanager
def _fast_scan():
    """conda-pack's ``load_files`` and ``find_py_source`` replaced by the
    equivalents above while it scans the environment, and its
    ``load_environment`` too, when it is the one written out above."""
    core = _conda_pack_core()

    original = core.find_py_source

    def find_py_source(path, ignore=True):
        if ignore and sys.pycache_prefix is None and "__pycache__" not in path:
            return None  # what importlib's source_from_cache raises for
        return original(path, ignore)

    core.load_files, loader = _load_files, core.load_files
    core.find_py_source = find_py_source
    environment = core.load_environment
    if _known_conda_pack(core):
        core.load_environment = _load_environment
    try:
        yield
    finally:
        core.load_files = loader
        core.find_py_source = original
        core.load_environment = environment


# What tarfile writes in PAX format for the members packed here: a ustar
# header, preceded by a PAX record of the path (link) when it is longer than
# 100 bytes.  Built here with one struct.pack, 7x faster than TarInfo.tobuf,
# which cost more than everything else spent on a small file.  Only ASCII
# names and links, uid/gid 0 without user/group names, and sizes and
# mtimes that fit their fields take this path; anything else goes to
# tarfile.  tests/test_pack.py checks it is byte for byte what tarfile writes.
_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")
_USTAR_TYPES = frozenset((tarfile.REGTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.DIRTYPE))
_OCTAL_11 = 8 ** 11


# the checksum's part from the fields every header here has alike: uid,
# gid, the checksum field itself (as spaces), magic and version
_CHKSUM_FIXED = 2 * sum(b"0000000\0") + sum(b"        ") + sum(tarfile.POSIX_MAGIC)


def _block(name: bytes, mode: int, size: int, mtime: int, type_: bytes, link: bytes) -> bytes:
    m, n, t = b"%07o\0" % mode, b"%011o\0" % size, b"%011o\0" % mtime
    # the sum of the header's bytes, without summing its 512 bytes (the
    # empty fields are zeros; name and link are cut to their 100 bytes)
    chksum = (_CHKSUM_FIXED + sum(name[:100]) + sum(m) + sum(n) + sum(t) + type_[0]
              + sum(link[:100]))
    return _USTAR.pack(name, m, b"0000000\0", b"0000000\0", n, t, b"%06o\0 " % chksum, type_,
                       link, tarfile.POSIX_MAGIC, b"", b"", b"", b"", b"")


def _pax_record(keyword: bytes, value: bytes) -> bytes:
    """``"%d %s=%s\n"``, the length including its own digits."""
    n = len(keyword) + len(value) + 3
    length = n + len(str(n))
    if len(str(length)) != len(str(n)):
        length += 1
    return b"%d %s=%s\n" % (length, keyword, value)


def _ustar_header(ti: tarfile.TarInfo) -> bytes | None:
    """``ti.tobuf(tarfile.PAX_FORMAT)`` for the usual member, or None."""
    name, link = ti.name, ti.linkname
    if ti.type == tarfile.DIRTYPE and not name.endswith("/"):
        name += "/"
    if (not name.isascii() or not link.isascii() or ti.type not in _USTAR_TYPES
            or type(ti.mtime) is not int or not 0 <= ti.mtime < _OCTAL_11
            or not 0 <= ti.size < _OCTAL_11 or ti.uid or ti.gid or ti.uname or ti.gname
            or ti.pax_headers or not 0 <= ti.mode <= 0o7777):
        return None
    name_b, link_b = name.encode("ascii"), link.encode("ascii")
    main = _block(name_b, ti.mode, ti.size, ti.mtime, ti.type, link_b)
    if len(name_b) <= 100 and len(link_b) <= 100:
        return main
    records = b""
    if len(name_b) > 100:
        records += _pax_record(b"path", name_b)
    if len(link_b) > 100:
        records += _pax_record(b"linkpath", link_b)
    pad = -len(records) % tarfile.BLOCKSIZE
    return b"".join((_block(b"././@PaxHeader", 0, len(records), 0, tarfile.XHDTYPE, b""),
                     records, tarfile.NUL * pad, main))


class _TarWriter:
    """The ``add``/``add_bytes`` interface conda-pack's ``Packer`` writes to.

    The members are what :mod:`tarfile` writes in its PAX format, byte for
    byte: each header is made by ``TarInfo.tobuf``, only ``TarFile.addfile``
    is left out (it copies every ``TarInfo`` and pushes the data through a
    file object in 16 KiB pieces: per member, that cost more than building
    the header).  Headers and small files are gathered and handed to the
    compressor in large writes; big files go in 4 MiB pieces.
    """

    _FLUSH = 1 << 20  # gather this much before one write to the compressor
    _CHUNK = 4 << 20  # pieces of a file read here

    def __init__(self, stream, ahead: _ReadAhead | None = None,
                 repair: bytecode.PackRepair | None = None):
        self._stream = stream
        self._pending: list = []
        self._pending_size = 0
        self.offset = 0  # bytes of tar so far (as ``TarFile.offset``)
        self._inodes: dict[tuple[int, int], str] = {}
        self.files = 0
        self._ahead = ahead
        self._repair = repair
        self._buf = None  # for files read in pieces

    # -- output
    def _emit(self, data) -> None:
        n = len(data)
        if n >= self._FLUSH:
            self._flush()
            self._stream.write(data)
        else:
            self._pending.append(data)
            self._pending_size += n
            if self._pending_size >= self._FLUSH:
                self._flush()
        self.offset += n

    def _flush(self) -> None:
        if self._pending:
            self._stream.write(b"".join(self._pending))
            self._pending.clear()
            self._pending_size = 0

    def _pad(self, size: int) -> None:
        rest = size % tarfile.BLOCKSIZE
        if rest:
            self._emit(tarfile.NUL * (tarfile.BLOCKSIZE - rest))

    def _header(self, ti: tarfile.TarInfo) -> None:
        self._emit(_ustar_header(ti) or
                   ti.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"))
        self.files += 1

    def _member(self, ti: tarfile.TarInfo, data=None) -> None:
        self._header(ti)
        if data is not None:
            self._emit(data)
            self._pad(len(data))

    def _file_member(self, ti: tarfile.TarInfo, source: str) -> None:
        """A regular file read here: its first ``ti.size`` bytes (a file that
        shrank since its ``lstat`` is an error, as in ``TarFile.addfile``)."""
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if ti.size <= self._CHUNK:
                data = os.read(fd, ti.size)
                while len(data) < ti.size:  # short reads (network filesystems)
                    more = os.read(fd, ti.size - len(data))
                    if not more:
                        raise OSError(f"{source}: unexpected end of data")
                    data += more
                self._member(ti, data)
                return
            if self._buf is None:
                self._buf = memoryview(bytearray(self._CHUNK))
            self._header(ti)
            self._flush()
            left = ti.size
            while left:
                n = os.readv(fd, [self._buf[:min(left, self._CHUNK)]])
                if not n:
                    raise OSError(f"{source}: unexpected end of data")
                piece = self._buf[:n]
                # zstd copies what it is given; conda-pack's parallel gzip
                # keeps a reference until a block is full: give it a copy.
                self._stream.write(piece if getattr(self._stream, "copies_input", False)
                                   else bytes(piece))
                self.offset += n
                left -= n
            self._pad(ti.size)
        finally:
            os.close(fd)

    # -- members
    def _info(self, source: str, target: str, st=None) -> tarfile.TarInfo:
        if st is None:
            st = os.lstat(source)
        ti = tarfile.TarInfo(target)
        ti.mode = stat.S_IMODE(st.st_mode)
        ti.mtime = int(st.st_mtime)  # whole seconds: no PAX header per member
        if stat.S_ISREG(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self._inodes:
                ti.type, ti.linkname = tarfile.LNKTYPE, self._inodes[key]
            else:
                self._inodes[key] = target
                ti.type, ti.size = tarfile.REGTYPE, st.st_size
        elif stat.S_ISDIR(st.st_mode):
            ti.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(st.st_mode):
            ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(source)
        else:
            raise PackError(f"Cannot pack {source}: not a regular file, folder or symlink")
        return ti

    def add(self, source: str, target: str, st=None, data=None) -> None:
        """``source`` as ``target``; ``st``: its ``lstat`` if the caller has
        it, ``data``: its contents if the caller read them."""
        if self._repair is not None and self._repair.defer(target):
            if self._ahead is not None and st is None:
                self._ahead.take(source)  # not needed: frees its place in the window
            return  # a stale .pyc: its fresh replacement is added at the end
        self._add(source, target, st, data)

    def _add(self, source: str, target: str, st=None, data=None) -> None:
        if st is None and self._ahead is not None:
            got = self._ahead.take(source)
            if got is not None:
                st, data = got
        if data is not None and st is not None and len(data) == st.st_size and not (
                st.st_nlink > 1 and (st.st_dev, st.st_ino) in self._inodes) \
                and self._regular(target, st, data):
            return
        ti = self._info(source, target, st)
        if ti.type != tarfile.REGTYPE:
            self._member(ti)
        elif data is not None and len(data) == ti.size:
            self._member(ti, data)
        else:
            self._file_member(ti, source)

    def _regular(self, target: str, st, data) -> bool:
        """``data`` as the regular file ``target`` whose ``lstat`` is ``st``,
        without a TarInfo (what ``_info`` + ``_member`` write for it, for
        the usual member: an ASCII name of at most 100 bytes); False (nothing
        written) for anything else."""
        if len(target) > 100 or not target.isascii() or not stat.S_ISREG(st.st_mode):
            return False
        mtime = int(st.st_mtime)
        size = len(data)
        if not (0 <= mtime < _OCTAL_11 and size < _OCTAL_11):
            return False
        key = (st.st_dev, st.st_ino)
        if not (st.st_nlink > 1 and key in self._inodes):
            self._inodes[key] = target
        self._emit(_block(target.encode("ascii"), st.st_mode & 0o7777, size, mtime,
                          tarfile.REGTYPE, b""))
        self.files += 1
        self._emit(data)
        if size % tarfile.BLOCKSIZE:
            self._emit(tarfile.NUL * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))
        return True

    def add_bytes(self, source: str, data: bytes, target: str, st=None) -> None:
        if st is None and self._ahead is not None:
            st = self._ahead.taken_stat(source)
        if st is not None and self._regular(target, st, data):
            return
        ti = self._info(source, target, st)
        ti.type, ti.size, ti.linkname = tarfile.REGTYPE, len(data), ""
        self._member(ti, data)

    def add_deferred(self) -> None:
        """The stale ``.pyc`` files left out: fresh bytecode (same name, mode
        and mtime), or the original where none could be compiled."""
        if self._repair is None:
            return
        for source, target, mode, mtime, data in self._repair.finish():
            if data is None:
                self._add(source, target)
                continue
            ti = tarfile.TarInfo(target)
            ti.mode, ti.mtime, ti.type, ti.size = mode, mtime, tarfile.REGTYPE, len(data)
            self._member(ti, data)

    def close(self) -> int:
        """The end-of-archive blocks and the record padding, as ``TarFile.close``;
        returns the size of the tar without that padding."""
        self._emit(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        size = self.offset
        rest = size % tarfile.RECORDSIZE
        if rest:
            self._emit(tarfile.NUL * (tarfile.RECORDSIZE - rest))
        self._flush()
        return size


def _read_file(path: str, size: int) -> bytes:
    """The contents of a file on a local disk whose ``lstat`` said ``size``
    bytes: one read of ``size + 1`` (a shorter read there is the end of the
    file); a file that grew meanwhile is read to its end."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, size + 1)
        if len(data) <= size:
            return data
        parts = [data]
        while True:
            piece = os.read(fd, 1 << 20)
            if not piece:
                return b"".join(parts)
            parts.append(piece)
    finally:
        os.close(fd)


def _adder(packer, writer: _TarWriter):
    """``packer.add`` (conda-pack's ``Packer.add``) with one ``lstat`` per
    file, handed on to the tar writer, instead of its ``isdir``, ``islink``
    and the writer's own ``lstat`` (and for the files it reads, an ``fstat``
    and a read more): the same members, the same prefix records.  The
    conda-meta records and anything unusual go to ``packer.add`` itself."""
    core = _conda_pack_core()

    if core.on_win or packer.has_dest:
        return packer.add
    prefix, bin_dir, ahead = packer.prefix, core.BIN_DIR, writer._ahead
    prefixes, rewrite_shebang = packer.prefixes, core.rewrite_shebang

    def add(f) -> None:
        mode, source, target = f.file_mode, f.source, f.target
        if mode is None:
            if target.startswith("conda-meta/") and target.endswith(".json"):
                packer.add(f)  # fnmatch 'conda-meta/*.json': rewritten by conda-pack
            else:
                writer.add(source, target)
            return
        if mode not in ("text", "binary", "unknown"):
            packer.add(f)  # conda-pack's error
            return
        got = ahead.take(source) if ahead is not None else None
        st, data = got if got is not None else (os.lstat(source), None)
        if stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
            writer.add(source, target, st)
            return
        placeholder = f.prefix_placeholder
        if not (mode == "unknown" or mode == "text" and target.startswith(bin_dir)):
            writer.add(source, target, st, data)
            prefixes.append((target, placeholder, mode))
            return
        if data is None:
            data = _read_whole(source) if ahead is not None else _read_file(source, st.st_size)
        if mode == "unknown":
            placeholder = prefix
            if not _is_binary_file(data):
                mode = "text"
        if mode != "unknown":
            fixed = False
            if mode == "text" and target.startswith(bin_dir):
                data, fixed = rewrite_shebang(data, target, placeholder)
            if not fixed:
                prefixes.append((target, placeholder, mode))
        writer.add_bytes(source, data, target, st)

    return add


@contextlib.contextmanager
def _closing(ahead: _ReadAhead | None):
    try:
        yield ahead
    finally:
        if ahead is not None:
            ahead.close()


class _Output:
    """The archive's file, as the compressor writes into it, asking the
    kernel every few MiB to start writing back what is there
    (``posix_fadvise(DONTNEED)`` queues the writeback and returns): the
    ``fsync`` at the end then waits for the last pieces only, not for the
    whole archive (on this VM's disk, 55 ms for 80 MB down to 2 ms)."""

    _EVERY = 8 << 20

    def __init__(self, fh):
        self._fh = fh
        self._fd = fh.fileno()
        self._due = self._EVERY
        self._written = 0

    def write(self, data) -> int:
        n = self._fh.write(data)
        self._written += len(data)
        if self._written >= self._due:
            self._due = self._written + self._EVERY
            self._fh.flush()
            try:
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except (OSError, AttributeError):
                pass
        return n

    def __getattr__(self, name):
        return getattr(self._fh, name)


def _explain(exc: Exception, env: Env) -> PackError:
    """Turn a conda-pack exception into one line naming the way out."""
    text = str(exc)
    if "editable packages" in text:
        names = ", ".join(re.findall(r"^- (\S+)", text, re.M)) or "?"
        return PackError(
            f"Cannot pack {env.prefix}: it has editable pip installs ({names}), which a staged "
            f"copy cannot carry; reinstall them without -e, or keep this environment unstaged")
    if "deleted/overwritten" in text:
        names = ", ".join(re.findall(r"^- (\S+ \S+):", text, re.M)) or "?"
        return PackError(
            f"Cannot pack {env.prefix}: files that conda installed were deleted or overwritten "
            f"(usually by pip) in: {names}; repair them with "
            f"'conda install --force-reinstall <pkg>' or pack with --ignore-missing-files")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return PackError(f"Cannot pack {env.prefix}: {first}")


def needs_pack(tarball: Tarball) -> str | None:
    """Why the environment must be (re)packed, or None if its tarball is fresh."""
    meta = tarball.read_meta()
    if meta is None:
        if tarball.path.exists():
            return "its tarball has no valid conda-stage metadata"
        return "it hasn't been done before"
    from . import fingerprint as fp

    if not fp.is_fresh(tarball.env.prefix, meta.fingerprint, meta.quick):
        return "the environment changed since it was packed"
    return None


def pack(env: Env, *, fmt: str | None = None, level: int | None = None,
         threads: int | None = None, force: bool = False,
         ignore_missing_files: bool = False, lock_timeout: float | None = None) -> Meta:
    """Make sure ``env`` has a fresh tarball; build it if needed.  Returns its metadata."""
    with _no_gc():
        tarball = _tarball_for(env, fmt)
        waiting = f"Waiting for another process packing {env.prefix} ..."
        with file_lock(tarball.lock_path, waiting=waiting, timeout=lock_timeout):
            reason = "--force was given" if force else needs_pack(tarball)
            if reason is None:
                return tarball.read_meta()
            output.info(f"[ONCE] Packaging Conda environment, because {reason} ...")
            return _pack_locked(tarball, fmt or tarball.format, level, threads,
                                ignore_missing_files)


@contextlib.contextmanager
def _no_gc():
    """Python's cyclic garbage collector off while packing: the scan and the
    packer allocate tens of thousands of objects that live until the end
    (conda-pack's File list, the prefix records), and the collector went
    through them again and again (~170 collections, 50-110 ms of the pack of
    a jupyter environment); packing makes next to no cyclic garbage."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _tarball_for(env: Env, fmt: str | None) -> Tarball:
    """``Tarball.for_env(env, fmt)``, without parsing the sidecar when it can
    only name the default format.  Without ``fmt``, ``for_env`` takes the
    format a valid sidecar names, else the default; a sidecar in which no
    other format appears as a JSON string (literally: no ``\\u`` escape
    that could spell one either) names the default or is not valid.
    Parsing and checking the sidecar of a jupyter environment (10,000
    records, 1.4 MB) took 30-40 ms before packing could start."""
    if fmt is not None:
        return Tarball.for_env(env, fmt)
    default = Tarball.at(env, formats.DEFAULT_FORMAT)
    try:
        data = read_bounded(default.meta_path, SIDECAR_LIMIT, what="sidecar")
    except (OSError, StageError):
        return Tarball.for_env(env)  # whatever it makes of a missing or odd file
    if b"\\u" in data or any(f'"{other}"'.encode() in data for other in formats.FORMATS
                              if other != formats.DEFAULT_FORMAT):
        return Tarball.for_env(env)
    return default


def _pack_locked(tarball: Tarball, fmt: str, level, threads, ignore_missing_files) -> Meta:
    env = tarball.env
    if (env.prefix / "pkgs").is_dir():
        output.warn(f"{env.prefix / 'pkgs'} is not packed (conda-pack never packs an "
                    f"environment-local package cache)")
    t0 = time.monotonic()
    # On a local disk the prefetcher reads the files ahead, from now on
    # (on a shared filesystem threads of this process read them: _ReadAhead).
    shared = _on_shared_fs(env.prefix)
    prefetch = None if shared else _Prefetch.start(str(env.prefix))
    repair = None
    replaced = _Replaced()
    try:
        fp = fingerprint(env.prefix)
        # The environment's Python (for fresh .pyc files) starts while
        # conda-pack reads the environment.
        repair = bytecode.PackRepair.start(env.prefix)
        return _pack_files(tarball, fmt, level, threads, ignore_missing_files, fp, t0, repair,
                           shared, prefetch, replaced)
    finally:
        if repair is not None:
            repair.close()
        if prefetch is not None:
            prefetch.close()
        replaced.close()


class _Replaced:
    """The archive a repack replaces, held open across the rename and closed
    in a thread while the sidecar is written.  A rename over the last link
    of a file frees its blocks inside the rename (on this VM's ext4, mounted
    with ``discard``: 22-27 ms for an 80 MB archive, at the very end of
    every repack); held open, they are freed when it is closed.  On local
    disks only (an NFS client would rename it to a ``.nfs*`` name instead)."""

    def __init__(self):
        self._fd = None
        self._thread = None

    def hold(self, path) -> None:
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                               | os.O_CLOEXEC)
        except OSError:
            self._fd = None

    def release(self) -> None:
        """After the rename: close it, in a thread."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            thread = threading.Thread(target=os.close, args=(fd,), name="conda-stage-free")
            thread.start()
        except RuntimeError:  # no thread to be had
            os.close(fd)
            return
        self._thread = thread

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _pack_files(tarball: Tarball, fmt: str, level, threads, ignore_missing_files, fp, t0,
                repair: bytecode.PackRepair | None, shared: bool,
                prefetch: _Prefetch | None, replaced: _Replaced) -> Meta:
    core = _conda_pack_core()
    CondaPackException, Packer = core.CondaPackException, core.Packer

    env = tarball.env
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with _fast_scan():
                cenv = core.CondaEnv.from_prefix(
                    str(env.prefix), ignore_missing_files=ignore_missing_files)
        except CondaPackException as exc:
            raise _explain(exc, env) from None
    for w in caught:
        lines = [ln for ln in str(w.message).strip().splitlines() if ln.strip()]
        output.warn(" ".join(lines[:2]) + (" ..." if len(lines) > 2 else ""))

    target = tarball.path.parent / (env.prefix.name + formats.suffix(fmt))
    output.info(f"Packing environment at '{env.prefix}' to '{target}'")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            stream = formats.compressor(_Output(fh), fmt, level, threads)
            files = list(cenv.files)
            if prefetch is not None:
                prefetch.follow([f.source for f in files])
            if repair is not None and not repair.plan(files, threads=_READ_AHEAD_THREADS
                                                      if shared else 1):
                repair = None
            ahead = _ReadAhead([f.source for f in files]) if shared else None
            writer = _TarWriter(stream, ahead, repair)
            packer = Packer(str(env.prefix), writer)
            with output.Progress("Packing", len(files)) as bar, _closing(ahead), \
                    _conda_pack_reads_from(ahead):
                add = _adder(packer, writer)
                for i, f in enumerate(files):
                    if prefetch is not None:
                        prefetch.at(i)
                    try:
                        add(f)
                    except FileNotFoundError as exc:
                        raise PackError(f"Cannot pack {env.prefix}: {exc.filename} vanished "
                                        f"while packing; is conda or pip changing the "
                                        f"environment right now?") from None
                    bar.update(1)
                writer.add_deferred()
            unpacked = writer.close()
            stream.close()
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644 & ~current_umask())
        if not shared:
            replaced.hold(target)
        os.replace(tmp, target)
        replaced.release()
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    elapsed = time.monotonic() - t0
    for other in formats.FORMATS:
        stale = target.parent / (env.prefix.name + formats.suffix(other))
        if other != fmt and stale.exists():
            stale.unlink()
    st = os.stat(target)
    meta = Meta(
        format=fmt, archive=target.name, size=st.st_size, mtime_ns=st.st_mtime_ns,
        prefix=str(env.prefix), fingerprint=fp, tool_version=__version__,
        created=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        pack_seconds=round(elapsed, 3), files=writer.files, unpacked_bytes=unpacked,
        records=[list(r) for r in packer.prefixes if r[1]],
    )
    Tarball.for_env(env, fmt).write_meta(meta)
    if repair is not None and repair.stale:
        done = repair.stale - len(repair.failed)
        output.info(f"Packed fresh bytecode for {done} stale .pyc files of {repair.checked} "
                    f"({done - repair.reused} compiled, {repair.reused} valid in the "
                    f"environment itself)")
    output.info(f"Total 'conda-pack' time: {output.seconds(elapsed)}")
    output.info(f"Created conda-pack tarball: {output.describe_file(target)}")
    return meta

