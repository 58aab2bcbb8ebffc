"""Valid bytecode in every staged copy.

A staged copy is read-only, so Python cannot repair a stale ``.pyc`` in it:
it compiles the module again, in memory, at every start.  Two things make
``.pyc`` files stale in a copy:

* the environment itself: a ``.pyc`` whose header does not match its ``.py``
  as packed (a package built with other source times than it ships, a file
  rewritten after compiling, ...).  A writable environment repairs these
  quietly on first import; the archive would carry them as they are.
  :class:`PackRepair` finds them while the environment is packed -- by
  reading 16 bytes of each ``.pyc`` and the ``lstat`` of its ``.py`` -- and
  has the environment's own interpreter compile fresh ones into a temporary
  folder outside the environment (or takes the environment's own copy of a
  stale package-cache ``.pyc`` when Python already rewrote it there);
  :mod:`conda_stage.pack` puts those into the archive instead.  The
  environment is never written to.
* relocation: a ``.py`` rewritten for the copy's prefix no longer matches
  its ``.pyc`` (size for timestamp ``.pyc`` files, content for hash-based
  ones), and its compiled constants name the old prefix anyway.
  :func:`recompile_relocated` recompiles exactly those files, with the
  copy's interpreter, before the copy is made read-only.

Only ``__pycache__/<stem>.<tag>[.opt-N].pyc`` files of the environment's
interpreter (its ``sys.implementation.cache_tag``) are considered, and only
for Python >= 3.7 (16-byte headers, PEP 552).  Timestamp ``.pyc`` files are
checked against the source's whole-second mtime and size, as Python checks
them; hash-based ones are left alone when packing (they do not depend on
times) and recompiled, keeping their mode, when relocation changed their
source.

The interpreters run isolated (``-I -S -B``: no site, no user site, no
``PYTHON*`` variables, never writing bytecode of their own), with a fixed
minimal environment, reading their work from a pipe.  Running as root, an
interpreter that belongs to another user is not run (that would run the
user's code as root): the bytecode is then left as it is.
"""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass

from . import output
from .errors import StageError
from .output import printable
from .userfiles import open_regular_fd

#: Seconds the environment's interpreter may take to start and say hello.
START_TIMEOUT = 60.0
#: Seconds allowed for compiling, on top of :data:`PER_FILE` seconds per file.
COMPILE_TIMEOUT = 60.0
PER_FILE = 1.0
#: Most per-file warnings printed; the rest are counted in one more line.
MAX_WARNINGS = 10

#: Run by the environment's (or the copy's) own interpreter, which may be any
#: Python >= 3.7 (and must at least not crash on anything older).
_CHILD = r'''
import sys
if sys.version_info < (3, 7) or getattr(sys.implementation, "cache_tag", None) is None:
    sys.stdout.write('{"unsupported": "%s"}\n' % sys.version.split()[0])
    sys.exit(0)
import json, marshal, os, stat, warnings
from importlib.util import MAGIC_NUMBER, source_hash
warnings.simplefilter("ignore")
TAG = sys.implementation.cache_tag

def u32(n):
    return (n & 0xFFFFFFFF).to_bytes(4, "little")

def compiled(data, dfile, opt, flags, mtime, size):
    code = compile(data, dfile, "exec", dont_inherit=True, optimize=opt)
    if flags & 1:
        head = MAGIC_NUMBER + u32(flags) + source_hash(data)
    else:
        head = MAGIC_NUMBER + u32(0) + u32(mtime) + u32(size)
    return head + marshal.dumps(code)

def put(path, data, mode):
    """Write ``path`` through a temporary name in its folder and a rename."""
    tmp = path + b".conda-stage-" + str(os.getpid()).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)

def why(exc):
    text = str(exc).splitlines()[0] if str(exc).strip() else ""
    return (type(exc).__name__ + (": " + text if text else ""))[:300]

def head(path):
    """(fstat, first 16 bytes) of a regular file, not through a symlink; None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        return st, os.pread(fd, 16, 0)
    except OSError:
        return None
    finally:
        os.close(fd)

def is_stale(h, mtime, size):
    if len(h) < 16 or h[:4] != MAGIC_NUMBER:
        return True
    flags = int.from_bytes(h[4:8], "little")
    if flags & ~3:
        return True
    if flags & 1:
        return False
    return h[8:12] != u32(mtime) or h[12:16] != u32(size)

def check(job):
    """None, or (job, mtime, size, valid in the environment itself)."""
    try:
        py = os.lstat(bytes.fromhex(job["py"]))
    except OSError:
        return None
    if not stat.S_ISREG(py.st_mode):
        return None
    got = head(bytes.fromhex(job["pyc"]))
    if got is None:
        return None
    mtime = int(py.st_mtime)
    if not is_stale(got[1], mtime, py.st_size):
        return None
    own = job.get("own")
    mine = head(bytes.fromhex(own)) if own else None
    reuse = mine is not None and mine[1][4:8] == b"\0\0\0\0" and not is_stale(mine[1], mtime, py.st_size)
    return job, mtime, py.st_size, reuse

def pack(outdir):
    """Candidates (a line of options, then one JSON line each): say which
    .pyc are stale (one JSON line), then compile those not valid in the
    environment itself -> outdir/<i>.pyc; failures -> outdir/errors."""
    errors = open(os.path.join(outdir, "errors"), "w")
    lines = sys.stdin.buffer.read().splitlines()  # all of it first: the packer never waits
    if not lines:
        return
    threads = int(json.loads(lines[0]).get("threads", 1))
    jobs = [json.loads(line) for line in lines[1:]]
    if threads > 1 and len(jobs) > 1:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(threads) as pool:
            found = [f for f in pool.map(check, jobs) if f is not None]
    else:
        found = [f for f in map(check, jobs) if f is not None]
    sys.stdout.write(json.dumps({"stale": [job["i"] for job, _, _, _ in found]}) + "\n")
    sys.stdout.flush()
    for job, mtime, size, reuse in found:
        if reuse:
            continue
        try:
            with open(bytes.fromhex(job["py"]), "rb") as fh:
                data = fh.read()
            if len(data) != size:
                raise OSError("it changed while being packed")
            out = compiled(data, os.fsdecode(bytes.fromhex(job["dfile"])), job["opt"], 0,
                           mtime, size)
            put(os.fsencode(os.path.join(outdir, "%d.pyc" % job["i"])), out, 0o644)
        except Exception as exc:
            errors.write(json.dumps([job["i"], why(exc)]) + "\n")
            errors.flush()

def stage():
    """For each rewritten .py, recompile the .pyc files it has in place."""
    jobs = json.loads(sys.stdin.read())
    for path_hex, dfile_hex in jobs:
        py = bytes.fromhex(path_hex)
        folder, base = os.path.split(py)
        stem = base[:-3]
        done = 0
        try:
            data = None
            for opt, suffix in ((0, b""), (1, b".opt-1"), (2, b".opt-2")):
                pyc = os.path.join(folder, b"__pycache__", stem + b"." + TAG.encode() + suffix + b".pyc")
                try:
                    st = os.lstat(pyc)
                except FileNotFoundError:
                    continue
                if not (st.st_mode & 0o170000 == 0o100000):
                    continue
                with open(pyc, "rb") as fh:
                    head = fh.read(16)
                flags = int.from_bytes(head[4:8], "little") if head[:4] == MAGIC_NUMBER else 0
                if flags not in (0, 1, 3):
                    flags = 0
                if data is None:
                    with open(py, "rb") as fh:
                        src = os.fstat(fh.fileno())
                        data = fh.read()
                out = compiled(data, os.fsdecode(bytes.fromhex(dfile_hex)), opt, flags,
                               int(src.st_mtime), src.st_size)
                put(pyc, out, st.st_mode & 0o7777)
                done += 1
            sys.stdout.write(json.dumps(["ok", path_hex, done]) + "\n")
        except Exception as exc:
            sys.stdout.write(json.dumps(["error", path_hex, why(exc)]) + "\n")
        sys.stdout.flush()

sys.stdout.write(json.dumps({"tag": TAG, "magic": MAGIC_NUMBER.hex()}) + "\n")
sys.stdout.flush()
if sys.argv[1] == "pack":
    pack(sys.argv[2])
else:
    stage()
'''

_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}


def _u32(n: int) -> bytes:
    return (n & 0xFFFFFFFF).to_bytes(4, "little")


def interpreter(prefix) -> str | None:
    """``<prefix>/bin/python`` if it is there and executable."""
    exe = os.path.join(str(prefix), "bin", "python")
    return exe if os.path.isfile(exe) and os.access(exe, os.X_OK) else None


def may_run(prefix, exe: str) -> bool:
    """Whether this process may run ``exe`` (an environment's interpreter):
    always, except as root when the environment or the interpreter is not
    root's (that would run a user's code as root)."""
    if os.geteuid() != 0:
        return True
    try:
        return os.stat(str(prefix)).st_uid == 0 and os.stat(exe).st_uid == 0
    except OSError:
        return False


def _popen(exe: str, args: list, cwd: str) -> subprocess.Popen:
    return subprocess.Popen([exe, "-I", "-S", "-B", "-c", _CHILD, *args], cwd=cwd, env=_ENV,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, close_fds=True)


def _read_line(proc: subprocess.Popen, deadline: float) -> bytes:
    """The child's first line, waiting at most until ``deadline``."""
    fd = proc.stdout.fileno()
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
    return buf.split(b"\n", 1)[0]


def _hello(line: bytes) -> tuple[str, bytes] | None:
    """(cache tag, magic number) from the child's first line; None when the
    interpreter is too old or said something else."""
    try:
        hello = json.loads(line)
        tag, magic = hello["tag"], bytes.fromhex(hello["magic"])
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(tag, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", tag) or len(magic) != 4:
        return None
    return tag, magic


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
    for fh in (proc.stdin, proc.stdout):
        try:
            if fh is not None:
                fh.close()
        except OSError:
            pass


# ------------------------------------------------------------------ packing
def pyc_pattern(tag: str) -> re.Pattern:
    """Matches ``dir/__pycache__/<stem>.<tag>[.opt-N].pyc`` (groups: dir
    with its slash, stem, N)."""
    return re.compile(r"((?:.*/)?)__pycache__/([^/]+)\." + re.escape(tag) + r"(?:\.opt-([12]))?\.pyc")


@dataclass
class Candidate:
    """A ``.pyc`` to be packed and the ``.py`` it was compiled from.
    ``env_pyc``: the environment's own copy of the ``.pyc``, when the one
    packed comes from elsewhere (conda-pack takes conda's files from the
    package cache)."""

    index: int
    pyc_source: str
    pyc_target: str
    py_source: str
    py_target: str
    opt: int
    env_pyc: str | None = None


@dataclass
class Stale:
    """What the detection found about a stale ``.pyc``: how to pack its
    replacement (mode and mtime of the original), the source's key, and
    ``reuse``: the environment's own copy of the ``.pyc`` when that one is
    valid for the packed ``.py`` (Python rewrote it there on an import)."""

    mode: int
    mtime: int
    py_mtime: int
    py_size: int
    reuse: str | None = None


def header_is_stale(head: bytes, magic: bytes, mtime: int, size: int) -> bool:
    """Whether Python would reject a ``.pyc`` with this 16-byte header for a
    source with this (whole-second) mtime and size.  Hash-based ``.pyc``
    files do not depend on times: never stale here."""
    if len(head) < 16 or head[:4] != magic:
        return True
    flags = int.from_bytes(head[4:8], "little")
    if flags & ~0b11:
        return True  # Python refuses unknown flags
    if flags & 1:
        return False
    return head[8:12] != _u32(mtime) or head[12:16] != _u32(size)


def candidates(files, tag: str, prefix: str | None = None) -> list[Candidate]:
    """Pairs of a ``.pyc`` and its ``.py`` among conda-pack's files, both
    packed verbatim (conda-pack passes them to the archive unchanged).
    ``prefix``: the environment (for :attr:`Candidate.env_pyc`)."""
    pattern = pyc_pattern(tag)
    # the .py files conda-pack hands to the archive as they are on disk (so
    # that their size and mtime in the tar are the source's): conda's files
    # but its records, and text/binary files with a prefix but text ones in
    # bin/ (shebangs rewritten)
    verbatim = {t: f for f in files if (t := f.target).endswith(".py") and (
        not t.startswith("conda-meta/") if (mode := f.file_mode) is None else
        mode == "binary" or mode == "text" and not t.startswith("bin/"))}
    found = []
    for f in files:
        if f.file_mode is not None or not f.target.endswith(".pyc"):
            continue
        m = pattern.fullmatch(f.target)
        if m is None:
            continue
        py = verbatim.get(f"{m.group(1)}{m.group(2)}.py")
        if py is not None:
            own = os.path.join(prefix, f.target) if prefix else None
            if own is not None and os.path.normpath(f.source) == os.path.normpath(own):
                own = None
            found.append(Candidate(len(found), f.source, f.target, py.source, py.target,
                                   int(m.group(3) or 0), own))
    return found


def _regular_fd(path: str) -> int | None:
    """A descriptor of the regular file ``path`` -- not through a symlink,
    never blocking on a FIFO (:func:`conda_stage.userfiles.open_regular_fd`);
    None if it cannot be opened."""
    try:
        return open_regular_fd(path, what="bytecode file", flags=os.O_RDONLY | os.O_NOFOLLOW)
    except (OSError, StageError):
        return None


def _head(path: str):
    """``(fstat, first 16 bytes)`` of a regular file; None if it cannot be read."""
    fd = _regular_fd(path)
    if fd is None:
        return None
    try:
        return os.fstat(fd), os.pread(fd, 16, 0)
    except OSError:
        return None
    finally:
        os.close(fd)


def check(c: Candidate, magic: bytes) -> Stale | None:
    """Read the ``.pyc``'s header and ``lstat`` its ``.py``: a :class:`Stale`
    if the ``.pyc`` does not validate against the ``.py`` as it will be
    packed (whole-second mtime, size); None if it does or cannot be told.
    A stale one whose copy in the environment is valid (Python rewrote it
    there) is to be replaced by that copy."""
    try:
        py = os.lstat(c.py_source)
    except OSError:
        return None
    if not stat.S_ISREG(py.st_mode):
        return None
    got = _head(c.pyc_source)
    if got is None:
        return None
    st, head = got
    mtime = int(py.st_mtime)  # what the tar writer stores
    if not header_is_stale(head, magic, mtime, py.st_size):
        return None
    found = Stale(stat.S_IMODE(st.st_mode), int(st.st_mtime), mtime, py.st_size)
    if c.env_pyc is not None:
        own = _head(c.env_pyc)
        if own is not None and _valid_timestamp_pyc(own[1], magic, mtime, py.st_size):
            found.reuse = c.env_pyc
    return found


def _valid_timestamp_pyc(head: bytes, magic: bytes, mtime: int, size: int) -> bool:
    return head[4:8] == b"\0\0\0\0" and not header_is_stale(head, magic, mtime, size)


def _read_regular(path: str, limit: int = 256 << 20) -> bytes | None:
    """The content of a regular file (see :func:`_regular_fd`), at most
    ``limit`` bytes; None if it cannot be read."""
    fd = _regular_fd(path)
    if fd is None:
        return None
    try:
        if os.fstat(fd).st_size > limit:
            return None
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read(limit + 1)
    except OSError:
        return None
    finally:
        os.close(fd)


class PackRepair:
    """Fresh ``.pyc`` files for the stale ones of an environment being packed.

    ``start(prefix)`` launches the environment's interpreter (it starts while
    conda-pack reads the environment).  ``plan(files)`` hands it every pair
    of a ``.pyc`` and its ``.py``; it checks them (16 bytes and an ``lstat``
    each, in threads on a shared filesystem) while the packer starts, says
    which are stale, and compiles those while the packing goes on -- except
    those whose copy in the environment itself is valid (Python rewrote it
    there on an import; conda-pack packs conda's files from the package
    cache): that copy is packed instead.  The packer reads that answer when
    it reaches the first candidate, and checks each stale one again itself
    (the interpreter only points at them).  The packer asks
    ``defer(target)`` for each file: a stale ``.pyc`` is left out then, and
    at the end ``finish()`` yields, for each of them, the fresh bytes (or
    None: the original is packed).  Nothing is written into the environment:
    the fresh files go to a temporary folder outside it, removed by
    ``close()``.
    """

    def __init__(self, prefix: str, exe: str, outdir: str, proc: subprocess.Popen):
        self.prefix = prefix
        self._exe = exe
        self._outdir = outdir
        self._proc = proc
        self._magic = b""
        self._stale: dict[str, tuple[Candidate, Stale]] = {}  # pyc target -> ...
        self._deferred: list[str] = []
        self._found: list[Candidate] = []
        self._pending: set[str] = set()  # candidates, until the interpreter's answer is read
        self._t0 = 0.0
        self.checked = 0
        self.reused = 0
        self.failed: list[tuple[str, str]] = []

    @property
    def stale(self) -> int:
        """How many stale ``.pyc`` files were left out to be replaced."""
        return len(self._deferred)

    # -- setup
    @classmethod
    def start(cls, prefix) -> "PackRepair | None":
        """Launch the environment's interpreter; None (after at most a
        warning) when there is none to use."""
        prefix = str(prefix)
        exe = interpreter(prefix)
        if exe is None:
            output.debug(f"No {prefix}/bin/python: the environment's bytecode is packed as it is")
            return None
        if not may_run(prefix, exe):
            output.warn(f"Not checking the bytecode of {printable(prefix)}: as root, conda-stage "
                        f"does not run another user's Python; stale .pyc files are packed as "
                        f"they are")
            return None
        outdir = None
        try:
            outdir = _scratch_dir(prefix)
            proc = _popen(exe, ["pack", outdir], cwd=outdir)
        except OSError as exc:
            if outdir is not None:
                shutil.rmtree(outdir, ignore_errors=True)
            output.warn(f"Not checking the bytecode of {printable(prefix)}: cannot run {printable(exe)} "
                        f"({exc.strerror or exc})")
            return None
        return cls(prefix, exe, outdir, proc)

    def plan(self, files, threads: int = 1) -> bool:
        """Hand the pairs of ``.pyc`` and ``.py`` among ``files`` (conda-pack's
        File list) to the interpreter, which checks them (``threads`` at once)
        and starts compiling the stale ones while the packing goes on; False
        (the bytecode is packed as it is) when the interpreter gave no answer."""
        try:
            hello = _hello(_read_line(self._proc, time.monotonic() + START_TIMEOUT))
        except (TimeoutError, OSError):
            hello = None
        if hello is None:
            output.debug(f"{self._exe} cannot check bytecode (not Python >= 3.7, or it did not "
                         f"start): the environment's bytecode is packed as it is")
            self.close()
            return False
        tag, self._magic = hello
        self._t0 = time.monotonic()
        found = candidates(files, tag, self.prefix)
        self.checked = len(found)
        self._found = found
        self._pending = {c.pyc_target for c in found}

        def hx(path: str) -> str:
            return os.fsencode(path).hex()

        jobs = [json.dumps({"threads": threads}) + "\n"]
        for c in found:
            own = f'"{hx(c.env_pyc)}"' if c.env_pyc is not None else "null"
            jobs.append(f'{{"i":{c.index},"pyc":"{hx(c.pyc_source)}","py":"{hx(c.py_source)}",'
                        f'"own":{own},"dfile":"{hx(os.path.join(self.prefix, c.py_target))}",'
                        f'"opt":{c.opt}}}\n')
        try:  # the interpreter reads all of it before checking: this does not block long
            self._proc.stdin.write("".join(jobs).encode())
            self._proc.stdin.close()
        except OSError:
            pass  # it went away: its answer is missing
        return True

    def _answer(self) -> None:
        """The interpreter's list of stale ``.pyc`` files (waited for when the
        packer reaches the first candidate), each checked here again: what
        is deferred is decided by :func:`check`, as when nothing is left to
        the interpreter."""
        pending, self._pending = self._pending, set()
        if not pending:
            return
        t0 = time.monotonic()
        stale = None
        try:
            line = _read_line(self._proc, t0 + COMPILE_TIMEOUT)
            got = json.loads(line)["stale"]
            if isinstance(got, list) and all(type(i) is int for i in got):
                stale = got
        except TimeoutError:
            output.warn(f"Checking the bytecode of {printable(self.prefix)} took more than "
                        f"{COMPILE_TIMEOUT:.0f} s; stopped (its .pyc files are packed as they are)")
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if stale is None:
            output.debug(f"{self._exe} gave no answer about the bytecode: it is packed as it is")
            _stop(self._proc)
            return
        found = self._found
        for i in stale:
            if 0 <= i < len(found):
                c = found[i]
                st = check(c, self._magic)
                if st is not None:
                    self._stale[c.pyc_target] = (c, st)
        reused = sum(1 for _, st in self._stale.values() if st.reuse is not None)
        output.debug(f"Checked {len(found)} .pyc files against their .py in "
                     f"{time.monotonic() - self._t0:.3f} s (waited {time.monotonic() - t0:.3f} s): "
                     f"{len(self._stale)} stale, {reused} of them valid in the environment itself")

    # -- while packing
    def defer(self, target: str) -> bool:
        """Whether ``target`` is a stale ``.pyc``, to be packed at the end."""
        if target in self._pending:
            self._answer()
        if target in self._stale:
            self._deferred.append(target)
            return True
        return False

    # -- at the end
    def finish(self):
        """Yield ``(pyc source, pyc target, mode, mtime, data or None)`` for
        every deferred file, once the interpreter is done (or timed out)."""
        self._answer()  # read, should no candidate have been packed (it may wait to write it)
        timeout = COMPILE_TIMEOUT + PER_FILE * len(self._deferred)
        t0 = time.monotonic()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            output.warn(f"Compiling fresh bytecode for {printable(self.prefix)} took more than "
                        f"{timeout:.0f} s; stopped (the files not done are packed as they are)")
        _stop(self._proc)
        output.debug(f"Waited {time.monotonic() - t0:.3f} s at the end for the fresh bytecode "
                     f"of {len(self._deferred)} files")
        errors = {}
        try:
            with open(os.path.join(self._outdir, "errors"), "rb") as fh:
                for line in fh.read(1 << 20).splitlines():
                    try:
                        i, why = json.loads(line)
                        errors[int(i)] = str(why)
                    except (ValueError, TypeError):
                        continue
        except OSError:
            pass
        for target in self._deferred:
            c, st = self._stale[target]
            if st.reuse is not None:
                data = _read_regular(st.reuse)
                if data is not None and _valid_timestamp_pyc(data[:16], self._magic, st.py_mtime,
                                                             st.py_size):
                    self.reused += 1
                else:
                    data = None
                    self.failed.append((c.py_target, "its copy in the environment changed"))
                yield c.pyc_source, target, st.mode, st.mtime, data
                continue
            data = None
            try:
                with open(os.path.join(self._outdir, f"{c.index}.pyc"), "rb") as fh:
                    data = fh.read()
            except OSError:
                self.failed.append((c.py_target, errors.get(c.index, "not compiled")))
            if data is not None and (len(data) < 16 or data[:4] != self._magic):
                data = None
                self.failed.append((c.py_target, "unexpected output"))
            yield c.pyc_source, target, st.mode, st.mtime, data
        self._warn_failed()

    def _warn_failed(self) -> None:
        for py, why in self.failed[:MAX_WARNINGS]:
            output.warn(f"Could not compile fresh bytecode for {printable(py)} ({printable(why)}); "
                        f"its stale .pyc is packed")
        if len(self.failed) > MAX_WARNINGS:
            output.warn(f"... and {len(self.failed) - MAX_WARNINGS} more files whose stale .pyc "
                        f"is packed")

    def close(self) -> None:
        _stop(self._proc)
        shutil.rmtree(self._outdir, ignore_errors=True)


def _scratch_dir(prefix: str) -> str:
    """A new private folder for the fresh ``.pyc`` files: in the temporary
    folder, or, should that be inside the environment, next to it."""
    real = os.path.realpath(prefix)
    base = tempfile.gettempdir()
    inside = os.path.realpath(base) + "/"
    if inside == real + "/" or inside.startswith(real.rstrip("/") + "/"):
        base = os.path.dirname(real)
    return tempfile.mkdtemp(prefix="conda-stage-pyc-", dir=base)


# ------------------------------------------------------------------ staging
def recompile_relocated(copy: str, final: str, names, *, original_prefix,
                        deadline: float | None = None) -> int:
    """Recompile, in place, the ``.pyc`` files of the ``.py`` files among
    ``names`` (paths inside the copy that relocation rewrote), with the
    copy's interpreter, before the copy is made read-only.

    ``copy`` is where the copy is now, ``final`` the prefix it was relocated
    for (the name compiled into the code objects).  ``deadline`` (a
    :func:`time.monotonic` value) bounds the work.  Never raises: a file
    that cannot be compiled, a missing interpreter, the deadline -- each is
    a one-line warning (the copy works, only slower).  Returns how many
    ``.pyc`` files were written.
    """
    py = sorted(n for n in names if n.endswith(".py"))
    if not py:
        return 0
    exe = interpreter(copy)
    if exe is None:
        return 0
    if not may_run(original_prefix, exe):
        output.warn(f"Not recompiling the bytecode of {len(py)} relocated files: as root, "
                    f"conda-stage does not run another user's Python")
        return 0
    timeout = COMPILE_TIMEOUT + PER_FILE * len(py)
    if deadline is not None:
        timeout = min(timeout, deadline - time.monotonic())
        if timeout <= 0:
            output.warn(f"Not recompiling the bytecode of {len(py)} relocated files: the time "
                        f"budget ended")
            return 0
    jobs = [[os.fsencode(os.path.join(copy, n)).hex(), os.fsencode(os.path.join(final, n)).hex()]
            for n in py]
    try:
        proc = _popen(exe, ["stage"], cwd="/")
    except OSError as exc:
        output.warn(f"Cannot recompile the bytecode of relocated files: cannot run the copy's "
                    f"Python ({exc.strerror or exc})")
        return 0
    try:
        out, _ = proc.communicate(json.dumps(jobs).encode(), timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        output.warn(f"Recompiling the bytecode of {len(py)} relocated files took more than "
                    f"{timeout:.0f} s; stopped (the rest recompile in memory at each start)")
        return 0
    finally:
        _stop(proc)
    lines = out.splitlines()
    if not lines or _hello(lines[0]) is None:
        output.debug(f"{exe} cannot recompile bytecode (not Python >= 3.7?)")
        return 0
    done = failed = answered = 0
    for line in lines[1:]:
        try:
            rec = json.loads(line)
            name = os.path.relpath(os.fsdecode(bytes.fromhex(rec[1])), copy)
        except (ValueError, TypeError, IndexError):
            continue
        answered += 1
        if rec[0] == "ok":
            done += rec[2] if len(rec) > 2 and isinstance(rec[2], int) else 0
            continue
        failed += 1
        if failed <= MAX_WARNINGS:
            why = str(rec[2]) if len(rec) > 2 else "?"
            output.warn(f"Could not recompile the bytecode of {printable(name)} after relocating "
                        f"it ({printable(why)}); Python compiles it in memory at each start")
    if failed > MAX_WARNINGS:
        output.warn(f"... and {failed - MAX_WARNINGS} more relocated files not recompiled")
    if answered < len(py) and proc.returncode:
        output.warn(f"Recompiling the bytecode of relocated files stopped after {answered} "
                    f"of {len(py)} (the copy's Python exited with status {proc.returncode})")
    return done
