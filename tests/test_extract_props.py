"""Property tests of the tar reader against generated, adversarial archives.

Archives of files, folders, symlinks and hard links with hostile names and
link targets (``..``, absolute paths, chains through symlinks, duplicates)
are extracted into ``box/env`` beside ``box/outside``.  Whatever the archive:
nothing outside ``env`` is created, changed or linked, and the extraction's
threads are gone.  Whenever the extraction succeeds: every path in the result
resolves inside ``env``, and Python's ``tarfile`` with PEP 706's ``data``
filter accepts the same archive (our reader is at least as strict).  The
``data`` filter needs Python 3.11.4+/3.12; when this Python lacks it, a newer
interpreter found on the machine answers for it (``DATA_FILTER_PYTHON``,
``python3.1x`` on PATH, pyenv), and without one those checks are skipped.
"""
import gzip
import glob
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading

import pytest
import zstandard
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from conda_stage import formats
from conda_stage.errors import StageError, UnsafeArchive
from conda_stage.extract import extract

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ------------------------------------------------------------------ generated archives
# A small world of names, so that links often meet what they name: folders
# d and e, leaves a..h; and outside/canary, outside/a and outside/s (a
# symlink) beside the target, for links that climb out to find.
_LEAVES = list("abcdefgh")
_FOLDERS = ["", "", "d/", "e/", "d/e/", "d/s/", "./d/"]
_HOSTILE_NAMES = ["../x", "/x", "d/../../x", "./../outside/x", "a/..", "..", "/", ""]


def _path(parts, lead=""):
    return lead + "/".join(parts)


def _mostly(common, rare, times=15):
    """``common``, and ``rare`` about once in ``times + 1``."""
    return st.integers(0, times).flatmap(lambda i: rare if i == times else common)


_names = _mostly(st.builds(lambda folder, leaf: folder + leaf, st.sampled_from(_FOLDERS),
                           st.sampled_from(_LEAVES)),
                 st.sampled_from(_HOSTILE_NAMES))
# Link targets: '..' is common, and so are names that exist outside.
_target_part = st.sampled_from(["..", "..", ".", "", "d", "e", "a", "b", "c", "s", "t",
                                "outside", "canary", "env"])
_targets = _mostly(
    st.builds(_path, st.lists(_target_part, min_size=1, max_size=6)),
    st.builds(_path, st.lists(_target_part, min_size=1, max_size=3), st.sampled_from(["/", "/tmp/"])),
    times=6)
_modes = st.sampled_from([0o755, 0o700, 0o777])


def _depth(name: str) -> int:
    return max(0, len([p for p in name.split("/") if p not in ("", ".")]) - 1)


@st.composite
def _archives(draw):
    """Up to 8 members, most of them harmless on their own: names are fresh
    (about one in twenty is hostile or a duplicate), links mostly name
    members made before them, through '..' and symlinks, and sometimes
    anything at all."""
    members, made, files = [], [], []
    for i in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["file", "file", "dir", "sym", "sym", "sym", "hard"]))
        if kind == "hard" and not files and draw(st.integers(0, 7)):
            kind = "file"  # a hard link to nothing is refused: seldom worth a whole example
        if draw(st.integers(0, 19)) == 0:
            name = draw(st.sampled_from(_HOSTILE_NAMES + made))
        elif kind == "dir":
            name = draw(st.sampled_from(["d", "e", "d/e", "e/d", "d/e/", "./d", "d/./e"]))
        else:
            name = draw(st.sampled_from(_FOLDERS)) + draw(st.sampled_from(_LEAVES)) + str(i)
        if kind == "dir":
            members.append(("dir", name, draw(_modes)))
            continue
        if kind == "file":
            arg = draw(st.binary(max_size=40))
        elif kind == "sym":
            how = draw(st.integers(0, 4))
            if how <= 2 and made:
                ups = _depth(name) if how < 2 else draw(st.integers(0, _depth(name) + 2))
                arg = "../" * ups + draw(st.sampled_from(made)) \
                    + draw(st.sampled_from(["", "", "/..", "/x", "/../..", "/../outside/canary"]))
            elif how == 3:
                ups = draw(st.integers(0, _depth(name) + 2))
                arg = "../" * ups + draw(st.sampled_from(["d", "e", "d/e", ".", "d/..", "outside", "env"]))
            else:
                arg = draw(_targets)
        elif files and draw(st.integers(0, 7)):
            arg = draw(st.sampled_from(files))
        else:
            arg = draw(st.one_of(_names, _targets))
        members.append((kind, name, arg))
        made.append(name)
        if kind in ("file", "hard"):
            files.append(name)
    return members


def _tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for kind, name, arg in members:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_600_000_000
            ti.mode = 0o644
            if kind == "file":
                ti.size = len(arg)
                tar.addfile(ti, io.BytesIO(arg))
                continue
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, arg
            else:
                ti.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
                ti.linkname = arg
            tar.addfile(ti)
    return buf.getvalue()


# ------------------------------------------------------------------ the sandbox
def _snapshot(box):
    """Everything in ``box`` but ``env``: path -> what lstat and readlink say."""
    seen = {}
    for folder, dirs, files in os.walk(box):
        if folder == box:
            dirs[:] = [d for d in dirs if d != "env"]
            files = [f for f in files if f != "env"]
        for n in dirs + files:
            p = os.path.join(folder, n)
            s = os.lstat(p)
            seen[p] = (s.st_mode, s.st_ino, s.st_nlink, s.st_size, s.st_mtime_ns,
                       os.readlink(p) if stat.S_ISLNK(s.st_mode) else None)
    return seen


def _new_box() -> str:
    box = tempfile.mkdtemp(prefix="cs-props-")
    os.makedirs(os.path.join(box, "outside", "a"))
    with open(os.path.join(box, "outside", "canary"), "w") as f:
        f.write("canary")
    os.symlink("canary", os.path.join(box, "outside", "s"))
    return box


def _remove(box) -> None:
    for folder, dirs, _files in os.walk(box):
        for d in dirs:
            p = os.path.join(folder, d)
            if not os.path.islink(p):
                os.chmod(p, 0o700)
    shutil.rmtree(box)


def _stage_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("conda-stage-")]


def _extract_in_box(data: bytes, fmt: str = "tar.zst"):
    """Extract ``data`` into a fresh box; check what must hold whatever the
    archive; return (box, error or None).  The caller removes the box."""
    box = _new_box()
    before = _snapshot(box)
    error = None
    try:
        with formats.decompressor(io.BytesIO(data), fmt) as stream:
            extract(stream, os.path.join(box, "env"))
    except StageError as exc:
        error = exc
    assert sorted(os.listdir(box)) in (["env", "outside"], ["outside"])
    assert _snapshot(box) == before
    assert not _stage_threads()
    return box, error


def _all_inside(dest: str) -> None:
    root = os.path.realpath(dest)
    for folder, dirs, files in os.walk(dest):
        for n in dirs + files:
            real = os.path.realpath(os.path.join(folder, n))
            assert real == root or real.startswith(root + os.sep), (os.path.join(folder, n), real)


# ------------------------------------------------------------------ the data filter
_SERVER = r"""
import io, os, sys, tarfile, tempfile
inp, out = sys.stdin.buffer, sys.stdout
while True:
    head = inp.read(8)
    if len(head) < 8:
        break
    data = inp.read(int.from_bytes(head, "big"))
    work = tempfile.mkdtemp(prefix="cs-oracle-")
    dest = os.path.join(work, "env")
    os.mkdir(dest)
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(dest, filter="data")
        answer = "ok"
    except tarfile.FilterError as exc:
        answer = "refused " + repr(exc)
    except Exception as exc:
        answer = "error " + repr(exc)
    for folder, dirs, _files in os.walk(work):
        for d in dirs:
            p = os.path.join(folder, d)
            if not os.path.islink(p):
                os.chmod(p, 0o700)
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    out.write(answer.replace("\n", " ") + "\n")
    out.flush()
"""


def _data_filter_python():
    if hasattr(tarfile, "data_filter"):
        return sys.executable
    candidates = [os.environ.get("DATA_FILTER_PYTHON")]
    candidates += [shutil.which(f"python3.{minor}") for minor in range(20, 11, -1)]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[2-9]*/bin/python3")),
                         reverse=True)
    for python in filter(None, candidates):
        try:
            probe = subprocess.run([python, "-c", "import tarfile; tarfile.data_filter"],
                                   capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return python
    return None


class _Oracle:
    """tarfile's ``data`` filter, extracting in another interpreter."""

    def __init__(self, python):
        self.proc = subprocess.Popen([python, "-I", "-c", _SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=False)

    def __call__(self, tar: bytes) -> str:
        self.proc.stdin.write(len(tar).to_bytes(8, "big") + tar)
        self.proc.stdin.flush()
        return self.proc.stdout.readline().decode().strip()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


_NO_FILTER = (f"tarfile.data_filter needs Python 3.11.4+/3.12; this is {sys.version.split()[0]} "
              f"and no newer interpreter was found (set DATA_FILTER_PYTHON)")


@pytest.fixture(scope="module")
def data_filter():
    """The oracle, or None without one: then the properties still check
    containment, and only the comparison with tarfile is skipped (see
    test_the_oracle_refuses_what_it_must, which says so)."""
    python = _data_filter_python()
    if python is None:
        yield None
        return
    oracle = _Oracle(python)
    yield oracle
    oracle.close()


def test_the_oracle_refuses_what_it_must(data_filter):
    """The comparison means something: the filter refuses an escaping link
    and accepts a harmless archive."""
    if data_filter is None:
        pytest.skip(_NO_FILTER)
    assert data_filter(_tar([("sym", "up", "../x")])).startswith("refused")
    assert data_filter(_tar([("file", "a", b"x"), ("sym", "l", "a")])) == "ok"


def _filter_accepts(data_filter, tar: bytes) -> None:
    if data_filter is not None:
        answer = data_filter(tar)
        assert answer == "ok", f"we extracted what tarfile's data filter says: {answer}"


# ------------------------------------------------------------------ properties
_outcomes = {"extracted": 0, "refused": 0, "chains extracted": 0, "chains refused": 0}


@SETTINGS
@given(_archives())
def test_generated_archives(data_filter, members):
    """Refused (UnsafeArchive), or extracted with every path inside and
    accepted by the data filter; nothing outside touched either way."""
    tar = _tar(members)
    box, error = _extract_in_box(zstandard.ZstdCompressor().compress(tar))
    try:
        _outcomes["refused" if error else "extracted"] += 1
        if error is not None:
            note(f"refused: {error}")
            assert isinstance(error, UnsafeArchive), error
            return
        _all_inside(os.path.join(box, "env"))
        _filter_accepts(data_filter, tar)
    finally:
        _remove(box)


def _chain(first, steps, order):
    """Links s0 -> first, s1 -> s0/step, s2 -> s1/step, ... (issue 8's
    s1 -> ., s2 -> s1/.., s3 -> s2/.. is one of them), in ``order``."""
    links = [("s0", first)] + [(f"s{i + 1}", f"s{i}/{step}".rstrip("/")) for i, step in enumerate(steps)]
    return [links[i] for i in order(len(links))]


_orders = st.sampled_from([
    lambda n: range(n),  # each link after the one it names
    lambda n: reversed(range(n)),  # each link before the one it names
    lambda n: [*range(1, n), 0],
])
_chains = st.builds(_chain, st.sampled_from([".", "d", "d/e", "d/..", "d/e/../..", "s9", "d/s9"]),
                    st.lists(st.sampled_from(["", "..", "../..", "e", "../d", "../s0", "x/.."]),
                             min_size=1, max_size=3),
                    _orders)


@settings(SETTINGS, max_examples=200)
@given(_chains, st.sampled_from([None, "s0", "s1", "s2", "s3"]), st.booleans())
def test_generated_symlink_chains(data_filter, links, via, hard):
    """Folders d/e, then a chain of symlinks, each naming the one before,
    created in order or not, then maybe a hard link or a file through one
    of them: never anything outside."""
    members = [("dir", "d/e", 0o755), ("file", "d/e/f", b"f")]
    members += [("sym", name, target) for name, target in links]
    if via and hard:
        members.append(("hard", "h", via + "/outside/canary"))
    elif via:
        members.append(("file", via + "/x", b"x"))
    tar = _tar(members)
    box, error = _extract_in_box(zstandard.ZstdCompressor().compress(tar))
    try:
        _outcomes["chains extracted" if error is None else "chains refused"] += 1
        if error is None:
            _all_inside(os.path.join(box, "env"))
            _filter_accepts(data_filter, tar)
        else:
            note(f"refused: {error}")
            assert isinstance(error, UnsafeArchive), error
    finally:
        _remove(box)


def test_generated_archives_were_not_all_refused():
    """The properties above are only worth something if many archives pass
    (and many are refused)."""
    if not (_outcomes["extracted"] + _outcomes["refused"]) \
            or not (_outcomes["chains extracted"] + _outcomes["chains refused"]):
        pytest.skip("the generated-archive tests did not run (selected out, or no data filter)")
    for kind in ("", "chains "):
        assert _outcomes[kind + "extracted"] >= 15, _outcomes
        assert _outcomes[kind + "refused"] >= 15, _outcomes


_plain = st.lists(st.tuples(st.lists(st.sampled_from(_LEAVES), max_size=3).map("/".join),
                            st.binary(max_size=3000)),
                  min_size=1, max_size=6)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(_plain, st.sampled_from(["tar.zst", "tar.gz"]),
       st.one_of(st.floats(0, 1, exclude_max=True), st.integers(1, 24)))
def test_cut_archives_never_extract(files, fmt, where):
    """A compressed archive cut anywhere (often in its last bytes, after the
    tar's end-of-archive marker) is refused, never a smaller copy."""
    tar = _tar([("file", f"{folder}/f{i}".lstrip("/"), data) for i, (folder, data) in enumerate(files)])
    data = zstandard.ZstdCompressor().compress(tar) if fmt == "tar.zst" else gzip.compress(tar)
    cut = int(len(data) * where) if isinstance(where, float) else max(0, len(data) - where)
    box, error = _extract_in_box(data[:cut], fmt)
    try:
        assert isinstance(error, UnsafeArchive), f"a {fmt} cut at {cut}/{len(data)} was extracted"
        assert "truncated or corrupt" in str(error)
    finally:
        _remove(box)
