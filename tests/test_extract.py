"""Safe extraction and in-flight relocation, on archives built in memory.

Hostile archives are extracted into ``tmp_path/env`` next to
``tmp_path/outside`` (holding a canary file): every test of an attack checks
the specific error and that nothing outside ``env`` was created or linked.
"""
import errno
import gzip
import io
import os
import stat
import tarfile
import threading
import time
import tracemalloc

import pytest
import zstandard

from conda_stage import extract as extract_mod
from conda_stage import formats, store
from conda_stage.errors import PrefixTooLong, StageError, UnsafeArchive
from conda_stage.extract import Reserve, extract
from conda_stage.relocate import Relocator, check_prefix_fits

PLACEHOLDER = "/opt/placeholder_" + "x" * 60


def _tar(members) -> bytes:
    """members: (name, kind, payload) with kind in file|dir|sym|hard|chr|fifo."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload in members:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_600_000_000
            if kind == "file":
                data = payload if isinstance(payload, bytes) else payload.encode()
                ti.size, ti.mode = len(data), 0o755
                tar.addfile(ti, io.BytesIO(data))
                continue
            ti.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
                       "chr": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            ti.mode = 0o755
            if kind in ("sym", "hard"):
                ti.linkname = payload
            tar.addfile(ti)
    return buf.getvalue()


def _extract(tmp_path, members, **kw):
    data = zstandard.ZstdCompressor().compress(_tar(members))
    dest = tmp_path / "env"
    with formats.decompressor(io.BytesIO(data), "tar.zst") as stream:
        return dest, extract(stream, str(dest), **kw)


def test_regular_tree_is_extracted_read_only_with_mtimes(tmp_path):
    dest, stats = _extract(tmp_path, [("bin", "dir", None), ("bin/tool", "file", "#!/bin/sh\n"),
                                       ("lib/deep/x.py", "file", "x = 1\n"),
                                       ("bin/link", "sym", "tool"), ("bin/hard", "hard", "bin/tool")])
    assert (dest / "bin/tool").read_text() == "#!/bin/sh\n"
    assert os.readlink(dest / "bin/link") == "tool"
    assert os.stat(dest / "bin/hard").st_ino == os.stat(dest / "bin/tool").st_ino
    assert os.stat(dest / "lib/deep/x.py").st_mtime == 1_600_000_000
    for p in (dest, dest / "bin", dest / "lib/deep", dest / "bin/tool"):
        assert not os.stat(p).st_mode & 0o222, p
    assert os.stat(dest / "bin/tool").st_mode & stat.S_IXUSR
    assert stats.files == 2 and stats.links == 2


def test_writable_copy_keeps_write_bits(tmp_path):
    dest, _ = _extract(tmp_path, [("a/b", "file", "x")], writable=True)
    assert os.stat(dest / "a").st_mode & stat.S_IWUSR
    assert os.stat(dest / "a/b").st_mode & stat.S_IWUSR


@pytest.mark.parametrize("members, words", [
    ([("/etc/evil", "file", "x")], "absolute"),
    ([("../evil", "file", "x")], "'..'"),
    ([("a/../../evil", "file", "x")], "'..'"),
    ([("up", "sym", "../outside")], "outside"),
    ([("abs", "sym", "/etc")], "outside"),
    ([("a/b/up", "sym", "../../../x")], "outside"),
    ([("link", "sym", "sub"), ("sub", "dir", None), ("link/file", "file", "x")], "beneath the symlink"),
    ([("dev", "chr", None)], "device file"),
    ([("pipe", "fifo", None)], "special file"),
    ([("h", "hard", "/etc/passwd")], "absolute"),
    ([("h", "hard", "missing")], "not a file extracted before"),
    ([("s", "sym", "x"), ("h", "hard", "s")], "not a file extracted before"),
    ([("f", "file", "x"), ("f", "file", "y")], "appears twice"),
    ([("f", "file", "x"), ("f/g", "file", "y")], "not a folder"),
])
def test_hostile_members_are_refused(tmp_path, members, words):
    with pytest.raises(UnsafeArchive, match=words.replace("(", r"\(")):
        _extract(tmp_path, members)
    assert not (tmp_path / "evil").exists()
    assert sorted(os.listdir(tmp_path)) in (["env"], [])
    assert not _stage_threads()


def test_symlink_chain_cannot_escape(tmp_path):
    # d1/d2/x -> ../.. points at the root; d1/d2/x/l would then resolve above it.
    members = [("d1/d2/keep", "file", "k"), ("d1/d2/x", "sym", "../.."),
               ("d1/d2/x/l", "sym", "../../up")]
    with pytest.raises(UnsafeArchive, match="beneath the symlink"):
        _extract(tmp_path, members)


def test_skip_and_extra_files(tmp_path):
    dest, stats = _extract(tmp_path, [("etc/conda/activate.d/hook.sh", "file", "echo hi"),
                                       ("keep", "file", "k")],
                           skip=frozenset({"etc/conda/activate.d/hook.sh"}),
                           extra={".marker": b"{}"})
    assert not (dest / "etc/conda/activate.d/hook.sh").exists()
    assert (dest / ".marker").read_bytes() == b"{}"
    assert stats.skipped == ["etc/conda/activate.d/hook.sh"]


def test_relocation_text_and_binary(tmp_path):
    new = str(tmp_path / "env")
    binary = b"\x7fELF" + PLACEHOLDER.encode() + b"/lib\0rest\0"
    members = [("etc/cfg", "file", f"prefix={PLACEHOLDER}\n"), ("lib/bin.so", "file", binary),
               ("plain", "file", "no prefix")]
    records = [("etc/cfg", PLACEHOLDER, "text"), ("lib/bin.so", PLACEHOLDER, "binary")]
    dest, stats = _extract(tmp_path, members, relocator=Relocator(records, new))
    assert (dest / "etc/cfg").read_text() == f"prefix={new}\n"
    data = (dest / "lib/bin.so").read_bytes()
    assert len(data) == len(binary)
    assert data.startswith(b"\x7fELF" + new.encode() + b"/lib\0")
    assert stats.relocated == 2


def test_prefix_longer_than_placeholder_is_refused():
    check_prefix_fits("/short", 10)
    with pytest.raises(PrefixTooLong, match="at most 10"):
        check_prefix_fits("/much/too/long/path", 10)


# ------------------------------------------------------------------ attacks
def _stage_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("conda-stage-")]


@pytest.fixture
def box(tmp_path):
    """``tmp_path`` with ``outside/canary`` beside the extraction target ``env``."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "canary").write_text("canary")
    return tmp_path


def _untouched(box):
    """Nothing was created, linked or changed outside ``env``, and the
    extraction's threads are gone."""
    assert sorted(os.listdir(box)) in (["env", "outside"], ["outside"])
    assert os.listdir(box / "outside") == ["canary"]
    st = os.lstat(box / "outside" / "canary")
    assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1
    assert (box / "outside" / "canary").read_text() == "canary"
    assert not _stage_threads()


def _clear(box):
    """Remove the (partial) extraction, as the caller of extract() does."""
    store.remove_tree(box / "env")
    assert not os.path.lexists(box / "env")


def _inside(dest):
    """Every path in ``dest`` resolves inside it."""
    root = os.path.realpath(dest)
    for folder, dirs, files in os.walk(dest):
        for n in dirs + files:
            real = os.path.realpath(os.path.join(folder, n))
            assert real == root or real.startswith(root + os.sep), (os.path.join(folder, n), real)


def _run(box, data, fmt="tar.zst", **kw):
    dest = box / "env"
    with formats.decompressor(io.BytesIO(data), fmt) as stream:
        return dest, extract(stream, str(dest), **kw)


def _zst(tar: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(tar)


def _hdr(name, typ, size, linkname="") -> bytes:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.linkname, ti.mtime = typ, size, linkname, 0
    return ti.tobuf(tarfile.GNU_FORMAT)  # base-256 sizes allowed


def _end() -> bytes:
    return bytes(2 * 512)


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


@pytest.mark.parametrize("members, words", [
    # issue 8's chain: each link looks harmless as text, the third ends above the root
    ([("s1", "sym", "."), ("s2", "sym", "s1/.."), ("s3", "sym", "s2/..")], "points outside"),
    ([("s1", "sym", "."), ("s2", "sym", "s1/.."), ("h", "hard", "s2/outside/canary")],
     "points outside"),
    ([("d", "dir", None), ("d/up", "sym", ".."), ("l", "sym", "d/up/..")], "points outside"),
    ([("d/e/f", "file", "x"), ("d/e/up", "sym", "../.."), ("l", "sym", "d/e/up/../outside")],
     "points outside"),
    # a dangling link first, then the link that would make it climb out
    ([("l", "sym", "x/.."), ("x", "sym", ".")], "does not exist yet"),
    ([("a", "sym", "x/y"), ("l", "sym", "a/../..")], "does not exist yet"),
    ([("a", "sym", "b"), ("b", "sym", "a"), ("c", "sym", "a/x")], "too many symlinks"),
    ([("f", "file", "x"), ("l", "sym", "f/../..")], "through a file"),
    ([("l", "sym", "a/" * 2100)], "too long"),
    # hard links: only a regular file extracted earlier, by its exact name
    ([("d/f", "file", "x"), ("s", "sym", "d"), ("h", "hard", "s/f")], "not a file extracted before"),
    ([("d", "dir", None), ("h", "hard", "d")], "not a file extracted before"),
    ([("h", "hard", "f"), ("f", "file", "x")], "not a file extracted before"),
    ([("s", "sym", "."), ("f", "file", "x"), ("h", "hard", "s/f")], "not a file extracted before"),
])
def test_links_resolve_against_the_extracted_tree(box, members, words):
    with pytest.raises(UnsafeArchive, match=words):
        _extract(box, members)
    _untouched(box)
    assert not (box / "env" / "h").exists() and not (box / "env" / "l").exists()


def test_symlink_blow_up_is_refused_quickly(box):
    # a_i -> a_(i-1)/a_(i-1): resolving a_n naively takes 2**n steps
    members = [("a0", "sym", ".")] + [(f"a{i}", "sym", f"a{i - 1}/a{i - 1}") for i in range(1, 40)]
    t0 = time.monotonic()
    with pytest.raises(UnsafeArchive, match="too many symlinks"):
        _extract(box, members)
    assert time.monotonic() - t0 < 2
    _untouched(box)


def test_links_that_stay_inside_are_kept(box):
    dest, stats = _extract(box, [
        ("lib/libx.so.1", "file", "x"), ("lib/libx.so", "sym", "libx.so.1"),
        ("bin/x", "sym", "../lib/libx.so"), ("share/y", "sym", "../bin/x"),
        ("a/b/c", "sym", "../../lib/../bin"), ("a/b/d", "sym", "c/x"),
        ("later", "sym", "not/yet/there"), ("not/yet/there/f", "file", "f"),
        ("top", "sym", "."), ("lib/h", "hard", "./lib//libx.so.1")])
    assert (dest / "a/b/d").read_text() == "x"
    assert (dest / "later/f").read_text() == "f"
    assert os.stat(dest / "lib/h").st_ino == os.stat(dest / "lib/libx.so.1").st_ino
    assert stats.links == 8
    _inside(dest)
    _untouched(box)


def _tar_body(members) -> bytes:
    """The tar of ``members`` without its end-of-archive marker."""
    tar = _tar(members)
    while tar.endswith(bytes(512)):
        tar = tar[:-512]
    return tar


def test_archive_without_end_marker_is_refused(box):
    with pytest.raises(UnsafeArchive, match=r"truncated or corrupt \(no end-of-archive marker\)"):
        _run(box, _zst(_tar_body([("a", "file", "x"), ("b", "file", "y")])))
    _untouched(box)


def test_tar_zst_cut_at_a_header_boundary_is_refused(box):
    tar = _tar([("a", "file", "x"), ("b", "file", "y")])
    assert tar[1024:1536].startswith(b"b\0")  # b's header: the cut is between two members
    # a complete frame that holds the archive up to the cut
    with pytest.raises(UnsafeArchive, match="no end-of-archive marker"):
        _run(box, _zst(tar[:1024]))
    _untouched(box)
    _clear(box)
    # the frame of the whole archive, cut anywhere: never a smaller environment
    whole = _zst(tar)
    for cut in range(len(whole)):
        with pytest.raises(UnsafeArchive, match="truncated or corrupt"):
            _run(box, whole[:cut])
        _untouched(box)
        _clear(box)
    _run(box, whole)


def test_cut_frame_after_the_end_marker_is_found(box):
    tar = _tar([("a", "file", "x")])
    end = 4 * 512  # a's header and data, then the marker
    assert tar[end - 1024:end] == _end() and set(tar[end:]) == {0}
    first, rest = _zst(tar[:end]), _zst(tar[end:])
    with pytest.raises(UnsafeArchive, match="zstd data ends inside a frame"):
        _run(box, first + rest[:-3])
    _untouched(box)
    _clear(box)
    dest, _ = _run(box, first + rest)  # several frames are fine
    assert (dest / "a").read_text() == "x"


@pytest.mark.parametrize("data, words", [
    (_tar([("a", "file", "x")]) + b"junk", "data after the end-of-archive marker"),
    (_tar([("a", "file", "x")]) + bytes(2 << 20), "KiB after the end-of-archive marker"),
])
def test_only_some_zero_padding_may_follow_the_marker(box, data, words):
    with pytest.raises(UnsafeArchive, match=words):
        _run(box, _zst(data))
    _untouched(box)


@pytest.mark.parametrize("data, words", [
    (_zst(_tar([("a", "file", "x")])) + b"garbage!", "data after the last zstd frame"),
    (_tar([("a", "file", "x")]), "not zstd data"),
    (b"", "no zstd data"),
])
def test_zstd_stream_must_be_exactly_frames(box, data, words):
    with pytest.raises(UnsafeArchive, match=words):
        _run(box, data)
    _untouched(box)


def test_truncated_gzip_is_one_clear_line(box):
    whole = gzip.compress(_tar([("a", "file", "x" * 1000), ("b", "file", "y")]))
    for cut in (10, len(whole) // 2, len(whole) - 4):
        with pytest.raises(UnsafeArchive) as err:
            _run(box, whole[:cut], "tar.gz")
        assert "truncated or corrupt (the gzip data ends early)" in str(err.value)
        assert "\n" not in str(err.value)
        _untouched(box)
        _clear(box)
    dest, _ = _run(box, whole, "tar.gz")
    assert (dest / "b").read_text() == "y"


def _peak_while(fn):
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("typ", [b"x", b"g", b"L", b"K"])
def test_huge_extended_header_is_refused_in_bounded_memory(box, typ):
    size = 64 << 20
    data = _zst(_hdr("././@LongLink", typ, size) + bytes(size) + _end())

    def run():
        with pytest.raises(UnsafeArchive, match="extended .* headers hold more than 1024 KiB"):
            _run(box, data)
    assert _peak_while(run) < 24 << 20
    _untouched(box)


def test_extended_header_claiming_terabytes_is_refused(box):
    with pytest.raises(UnsafeArchive, match="extended"):
        _run(box, _zst(_hdr("x", b"x", 1 << 40) + _end()))


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + len(str(len(body))) + 1
    n = len(body) + len(str(n))
    return str(n).encode() + body


def test_extended_headers_do_not_add_up(box):
    record = _pax_record("comment", "c" * 600_000)
    pax = _pad(_hdr("g", b"g", len(record)) + record)
    _run(box, _zst(pax + _tar([("a", "file", "x")])))  # one is fine
    _clear(box)
    with pytest.raises(UnsafeArchive, match="extended"):
        _run(box, _zst(pax + pax + _tar([("a", "file", "x")])))
    _untouched(box)


def test_large_member_is_written_without_holding_it(box):
    size = 64 << 20
    payload = b"\1" + bytes(size - 2) + b"\2"
    data = _zst(_tar([("big", "file", payload), ("small", "file", "s")]))
    del payload
    dest = box / "env"

    def run():
        _run(box, data)
    assert _peak_while(run) < 24 << 20
    assert os.path.getsize(dest / "big") == size
    with open(dest / "big", "rb") as f:
        assert f.read(1) == b"\1"
        f.seek(size - 1)
        assert f.read(1) == b"\2"
    assert (dest / "small").read_text() == "s"


def test_file_to_relocate_is_capped(box, monkeypatch):
    monkeypatch.setattr(extract_mod, "MAX_RELOCATE_BYTES", 1 << 20)
    new = str(box / "env")
    ok = f"prefix={PLACEHOLDER}\n".encode() + b"#" * (512 << 10)
    big = f"prefix={PLACEHOLDER}\n".encode() + b"#" * (2 << 20)
    records = [("ok", PLACEHOLDER, "text"), ("big", PLACEHOLDER, "text")]
    with pytest.raises(UnsafeArchive, match="'big': it is 2 MB, more than the 1 MB a file to relocate"):
        _extract(box, [("ok", "file", ok), ("big", "file", big)], relocator=Relocator(records, new))
    _untouched(box)
    _clear(box)
    dest, stats = _extract(box, [("ok", "file", ok)], relocator=Relocator(records, new))
    assert (dest / "ok").read_bytes().startswith(f"prefix={new}\n".encode())
    assert stats.relocated == 1


def _zeros_tar_zst(n_files: int, size: int) -> bytes:
    """A tar.zst of ``n_files`` files of ``size`` zeros, built as a stream."""
    out = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(out, closefd=False) as zw:
        with tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for i in range(n_files):
                ti = tarfile.TarInfo(f"d/f{i}")
                ti.size = size
                tar.addfile(ti, io.BytesIO(bytes(size)))
    return out.getvalue()


def _bytes_in(dest):
    return sum(os.lstat(os.path.join(f, n)).st_size for f, _d, files in os.walk(dest) for n in files)


def test_space_reserve_is_kept_whatever_the_archive_claims(box):
    st = os.statvfs(box)
    free = st.f_bavail * st.f_frsize
    headroom = 16 << 20
    reserve = Reserve(fraction=0, min_bytes=free - headroom, inode_fraction=0)
    with pytest.raises(StageError, match="Not enough free space to extract into .*kept in reserve") as err:
        _run(box, _zeros_tar_zst(40, 4 << 20), reserve=reserve)  # 160 MiB
    assert not isinstance(err.value, UnsafeArchive)
    assert _bytes_in(box / "env") <= headroom + (4 << 20)
    _untouched(box)


def test_space_reserve_as_a_fraction(box):
    with pytest.raises(StageError, match="Not enough free space"):
        _extract(box, [("a", "file", "x")], reserve=Reserve(fraction=1.0))
    _untouched(box)
    _clear(box)
    dest, _ = _extract(box, [("a", "file", "x")], reserve=Reserve(fraction=0, min_bytes=0))
    assert (dest / "a").read_text() == "x"


def test_inode_reserve(box):
    st = os.statvfs(box)
    if not st.f_files:
        pytest.skip("this filesystem does not count inodes")
    reserve = Reserve(fraction=0, min_bytes=0, inode_fraction=(st.f_favail - 100) / st.f_files)
    with pytest.raises(StageError, match="Not enough free inodes to extract into"):
        _extract(box, [(f"d/f{i}", "file", "") for i in range(400)], reserve=reserve)
    assert len(os.listdir(box / "env" / "d")) <= 150
    _untouched(box)


def test_no_space_in_a_writer_thread_is_one_clear_line(box, monkeypatch):
    where = []

    def full(fd, data):
        where.append(threading.current_thread().name)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(extract_mod, "_write_all", full)
    with pytest.raises(StageError, match=r"^No space left on /.* while extracting into .*env") as err:
        _extract(box, [(f"f{i}", "file", "x") for i in range(100)])
    assert where and where[0].startswith("conda-stage-write-")
    assert "\n" not in str(err.value) and not isinstance(err.value, UnsafeArchive)
    _untouched(box)


def test_quota_exceeded_is_one_clear_line(box, monkeypatch):
    monkeypatch.setattr(extract_mod, "DIRECT_WRITE", 0)  # written by the extracting thread

    def over(fd, data):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    monkeypatch.setattr(extract_mod, "_write_all", over)
    with pytest.raises(StageError, match=r"^Disk quota exceeded on /.* while extracting into"):
        _extract(box, [("f", "file", "x")])
    _untouched(box)


def test_deadline_already_passed(box):
    with pytest.raises(StageError, match="ran out of time"):
        _extract(box, [("f", "file", "x")], deadline=time.monotonic() - 1)
    assert not (box / "env").exists()
    _untouched(box)


class _Slow(io.RawIOBase):
    def __init__(self, data):
        self._f = io.BytesIO(data)

    def readable(self):
        return True

    def read(self, n=-1):
        time.sleep(0.02)
        return self._f.read(min(n, 4096) if n >= 0 else 4096)


@pytest.mark.parametrize("fmt", ["tar.zst", "tar.gz"])
def test_deadline_stops_a_slow_extraction(box, fmt):
    tar = _tar([(f"f{i}", "file", os.urandom(10_000)) for i in range(200)])
    data = _zst(tar) if fmt == "tar.zst" else gzip.compress(tar)  # ~10 s to read
    t0 = time.monotonic()
    with pytest.raises(StageError, match="ran out of time"):
        with formats.decompressor(_Slow(data), fmt) as stream:
            extract(stream, str(box / "env"), deadline=t0 + 0.5)
    assert time.monotonic() - t0 < 3
    _untouched(box)
    _clear(box)
    assert not (box / "env").exists()


def test_writable_copy_is_never_group_or_other_writable(box):
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        d = tarfile.TarInfo("d")
        d.type, d.mode = tarfile.DIRTYPE, 0o777
        t.addfile(d)
        f = tarfile.TarInfo("d/f")
        f.mode, f.size = 0o6777, 1
        t.addfile(f, io.BytesIO(b"x"))
    dest, _ = _run(box, _zst(tar.getvalue()), writable=True)
    assert stat.S_IMODE(os.stat(dest / "d").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(dest / "d/f").st_mode) == 0o755


def test_member_named_like_an_extra_file_is_refused(box):
    with pytest.raises(UnsafeArchive, match="holds a member named '.marker'"):
        _extract(box, [(".marker", "file", "forged")], extra={".marker": b"{}"})
    _untouched(box)


def test_member_count_is_capped(box, monkeypatch):
    monkeypatch.setattr(extract_mod, "MAX_MEMBERS", 10)
    with pytest.raises(UnsafeArchive, match="more than 10 members"):
        _extract(box, [(f"f{i}", "file", "") for i in range(11)])
    _untouched(box)


@pytest.mark.parametrize("members, words", [
    ([("a/" * 2100 + "f", "file", "x")], "name of 4201 characters"),
])
def test_overlong_names_are_refused(box, members, words):
    with pytest.raises(UnsafeArchive, match=words):
        _extract(box, members)
    _untouched(box)


@pytest.mark.parametrize("mtime", ["nan", "inf", "1e300"])
def test_bad_modification_time_is_refused(box, mtime):
    record = _pax_record("mtime", mtime)
    with pytest.raises(UnsafeArchive, match="bad modification time"):
        _run(box, _zst(_pad(_hdr("p", b"x", len(record)) + record) + _tar([("a", "file", "x")])))
    _untouched(box)
