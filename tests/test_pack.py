"""The tar writer of the packer: what it writes is what tarfile writes.

conda_stage.pack writes members itself (headers with one struct.pack, data
handed to the compressor in large writes) instead of ``TarFile.addfile``;
these tests hold it to tarfile's PAX output byte for byte, through
conda-pack's own ``Packer`` (its reads served by the packer's fast reader),
and check the result extracts.
"""
import io
import json
import os
import random
import stat
import subprocess
import sys
import tarfile

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as hst
from conda_pack.core import File, Packer
import conda_pack.core as cp_core

from conda_stage import formats, pack
from conda_stage.extract import extract


def _tobuf(ti: tarfile.TarInfo) -> bytes:
    return ti.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


def _ti(name, type_=tarfile.REGTYPE, size=0, link="", mode=0o644, mtime=1_700_000_000):
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.linkname, ti.mode, ti.mtime = type_, size, link, mode, mtime
    return ti


def test_header_is_what_tarfile_writes():
    rnd = random.Random(11)
    cases = [_ti("a/b.py"), _ti("bin", tarfile.DIRTYPE, mode=0o755),
             _ti("bin/python", tarfile.SYMTYPE, link="python3.11", mode=0o777),
             _ti("lib/h", tarfile.LNKTYPE, link="lib/a", mode=0o4755),
             _ti("x" * 100), _ti("x" * 101, size=7), _ti("d" * 100, tarfile.DIRTYPE),
             _ti("s" * 300, tarfile.SYMTYPE, link="t" * 200), _ti("h", tarfile.LNKTYPE, link="q" * 101),
             _ti("big", size=8 ** 11 - 1, mtime=8 ** 11 - 1), _ti("zero", size=0, mtime=0)]
    for _ in range(3000):
        name = "/".join("abcdefghijklmnop"[:rnd.randint(1, 16)] for _ in range(rnd.randint(1, 30)))
        type_ = rnd.choice([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE])
        link = "l" * rnd.randint(1, 300) if type_ in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
        cases.append(_ti(name, type_, rnd.randint(0, 8 ** 11 - 1) if type_ == tarfile.REGTYPE else 0,
                         link, rnd.randint(0, 0o7777), rnd.randint(0, 2 ** 33)))
    for ti in cases:
        assert pack._ustar_header(ti) == _tobuf(ti), ti.name[:40]


@pytest.mark.parametrize("ti", [
    _ti("caf\u00e9.py"), _ti("link", tarfile.SYMTYPE, link="\u00e9t\u00e9"), _ti("surrogate\udcff"),
    _ti("float", mtime=1.5), _ti("huge", size=8 ** 11), _ti("old", mtime=-1),
    _ti("fifo", tarfile.FIFOTYPE), _ti("mode", mode=0o170644)])
def test_anything_unusual_is_left_to_tarfile(ti):
    assert pack._ustar_header(ti) is None


def _old_writer_tar(members) -> bytes:
    """The archive the packer wrote through tarfile before it wrote members
    itself: ``(target, TarInfo fields, data or None)`` in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in members:
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _member(path: str, target: str, st=None, data=None, inodes=None) -> tuple:
    st = st or os.lstat(path)
    ti = tarfile.TarInfo(target)
    ti.mode, ti.mtime = stat.S_IMODE(st.st_mode), int(st.st_mtime)
    if stat.S_ISDIR(st.st_mode):
        ti.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(st.st_mode):
        ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(path)
    elif (st.st_dev, st.st_ino) in inodes and data is None:
        ti.type, ti.linkname = tarfile.LNKTYPE, inodes[(st.st_dev, st.st_ino)]
    else:
        inodes.setdefault((st.st_dev, st.st_ino), target)
        if data is None:
            with open(path, "rb") as fh:
                data = fh.read()
        ti.size = len(data)
    return ti, data


@pytest.fixture
def tree(tmp_path):
    """A fake environment: folders, small, empty and big files, a symlink, a
    hardlink pair, long and non-ASCII names, a text script with a shebang
    into the prefix (conda-pack rewrites it), and a conda-meta record."""
    root = tmp_path / "env"
    (root / "bin").mkdir(parents=True)
    (root / "conda-meta").mkdir()
    deep = root / "lib" / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (root / "bin" / "tool").write_text(f"#!{root}/bin/python3\nprint('hi')\n")
    (root / "bin" / "python3").write_bytes(b"\x7fELF\x02\x01\x01" + os.urandom(3000))
    (root / "bin" / "python").symlink_to("python3")
    (root / "lib" / "empty.txt").write_bytes(b"")
    (root / "lib" / "big.bin").write_bytes(os.urandom(300_000) + b"\xff" * 200_000)
    (root / "lib" / "text.py").write_text("x = 'caf\u00e9'\n" * 1000)
    (root / "lib" / "caf\u00e9.txt").write_text("plain\n")
    (deep / ("f" * 120 + ".py")).write_text("y = 2\n")
    (root / "lib" / "a.so").write_bytes(b"\x00\x01" * 700)
    os.link(root / "lib" / "a.so", root / "lib" / "a-link.so")
    os.chmod(root / "bin" / "tool", 0o755)
    (root / "conda-meta" / "pkg-1.0-0.json").write_text(
        '{"name": "pkg", "version": "1.0", "files": [], "link": {"source": "/nowhere"}}')
    return root


def _files(root):
    out = []
    for dirpath, dirs, names in os.walk(root):
        for name in sorted(dirs + names):
            path = os.path.join(dirpath, name)
            target = os.path.relpath(path, root)
            if target.startswith("conda-meta") or target.endswith(".so"):
                mode = None  # a record, or a conda file without prefix: added as it is
            elif os.path.isdir(path) and not os.path.islink(path):
                continue  # conda-pack lists files, and empty folders
            else:
                mode = "unknown"  # as pip's files: conda-pack reads them
            out.append(File(path, target, is_conda=False, prefix_placeholder=None, file_mode=mode))
    out.append(File(str(root / "lib"), "lib", is_conda=False, prefix_placeholder=None,
                    file_mode=None))
    return out


def _pack_with(writer_factory, root):
    """Run conda-pack's Packer over the tree; returns (tar bytes, prefixes)."""
    files = _files(root)
    buf = io.BytesIO()
    writer = writer_factory(buf)
    packer = Packer(str(root), writer)
    with pack._conda_pack_reads_from(None):
        for f in files:
            packer.add(f)
    writer.close()
    return buf.getvalue(), packer.prefixes


class _RecordingWriter:
    """Collects what Packer hands over, and turns it into the tar the old
    tarfile-based writer made."""

    def __init__(self, buf):
        self.buf, self.members, self.inodes = buf, [], {}

    def add(self, source, target):
        self.members.append(_member(source, target, inodes=self.inodes))

    def add_bytes(self, source, data, target):
        self.members.append(_member(source, target, data=data, inodes=self.inodes))

    def close(self):
        self.buf.write(_old_writer_tar(self.members))


@pytest.mark.parametrize("chunk", [pack._TarWriter._CHUNK, 4096])
def test_writer_writes_what_tarfile_wrote(tree, monkeypatch, chunk):
    monkeypatch.setattr(pack._TarWriter, "_CHUNK", chunk)  # big files in pieces, too
    monkeypatch.setattr(pack._TarWriter, "_FLUSH", 1000)
    ours, prefixes = _pack_with(lambda b: pack._TarWriter(b), tree)
    ref, ref_prefixes = _pack_with(_RecordingWriter, tree)
    assert ours == ref
    assert prefixes == ref_prefixes
    assert any(t == "bin/tool" for t, _p, _m in prefixes) is False  # shebang rewritten
    assert ("lib/text.py", str(tree), "text") in prefixes
    with tarfile.open(fileobj=io.BytesIO(ours)) as tar:
        names = tar.getnames()
        assert tar.getmember("lib/a-link.so").islnk() or tar.getmember("lib/a.so").islnk()
        tool = tar.extractfile("bin/tool").read()
    assert tool.startswith(b"#!/usr/bin/env python3\n")
    assert len(names) == len(set(names)) == len(_files(tree))


def test_close_returns_the_size_before_the_record_padding(tree):
    buf = io.BytesIO()
    writer = pack._TarWriter(buf)
    writer.add(str(tree / "lib" / "text.py"), "lib/text.py")
    size = writer.close()
    data = buf.getvalue()
    assert len(data) % tarfile.RECORDSIZE == 0 and size <= len(data)
    assert size == 512 + (os.path.getsize(tree / "lib" / "text.py") + 511) // 512 * 512 + 1024
    assert writer.files == 1


def test_archive_extracts(tree, tmp_path):
    buf = io.BytesIO()
    stream = formats.compressor(buf, "tar.zst", 3, 2)
    writer = pack._TarWriter(stream)
    packer = Packer(str(tree), writer)
    with pack._conda_pack_reads_from(None):
        for f in _files(tree):
            packer.add(f)
    writer.close()
    stream.close()
    dest = tmp_path / "out"
    with formats.decompressor(io.BytesIO(buf.getvalue()), "tar.zst") as src:
        extract(src, str(dest), writable=True)
    assert (dest / "lib" / "big.bin").read_bytes() == (tree / "lib" / "big.bin").read_bytes()
    deep = os.path.relpath(next((tree / "lib").glob("d*/e*/f*.py")), tree)
    assert (dest / deep).read_text() == "y = 2\n"
    assert (dest / "lib" / "caf\u00e9.txt").read_text() == "plain\n"
    assert os.readlink(dest / "bin" / "python") == "python3"
    assert os.stat(dest / "lib" / "a.so").st_ino == os.stat(dest / "lib" / "a-link.so").st_ino


def test_file_that_shrank_while_packing_is_an_error(tree, monkeypatch):
    path = tree / "lib" / "big.bin"
    st = os.lstat(path)
    writer = pack._TarWriter(io.BytesIO())
    monkeypatch.setattr(pack._TarWriter, "_CHUNK", 4096)
    path.write_bytes(b"short")
    with pytest.raises(OSError, match="unexpected end of data"):
        writer._file_member(writer._info(str(path), "lib/big.bin", st), str(path))


def test_fast_reads_and_binary_test_are_conda_packs(tree, tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    for path in [tmp_path / "empty", *sorted(p for p in tree.rglob("*") if p.is_file())]:
        with open(path, "rb") as fh:
            assert pack._read_whole(str(path)) == fh.read()
    samples = [b"", b"ascii only\n", "caf\u00e9".encode(), b"\xff\xfe", b"abc\xc3", b"\x00\x01",
               os.urandom(5000), "\u20ac".encode() * 1000]
    original = cp_core.is_binary_file
    for data in samples:
        assert pack._is_binary_file(data) == original(data)
    with pack._conda_pack_reads_from(None):
        assert cp_core.is_binary_file is pack._is_binary_file
        with cp_core.open(str(tree / "lib" / "text.py")) as fh:  # text mode, as conda-pack's json
            assert fh.read() == (tree / "lib" / "text.py").read_text()
    assert cp_core.is_binary_file is original and not hasattr(cp_core, "open")
    with pytest.raises(FileNotFoundError):
        pack._read_whole(str(tmp_path / "missing"))


def test_compressed_archive_is_one_zstd_stream_with_checksum(tree):
    buf = io.BytesIO()
    stream = formats.compressor(buf, "tar.zst", 3, 2)
    writer = pack._TarWriter(stream)
    writer.add(str(tree / "lib" / "big.bin"), "lib/big.bin")
    size = writer.close()
    stream.close()
    params = zstandard.get_frame_parameters(buf.getvalue())
    assert params.has_checksum
    assert len(zstandard.ZstdDecompressor().decompressobj().decompress(buf.getvalue())) >= size


@pytest.mark.parametrize("fmt", ["tar.zst", "tar.gz"])
def test_big_files_survive_a_compressor_that_keeps_references(tmp_path, fmt, monkeypatch):
    """A file read in pieces into one reused buffer: conda-pack's parallel
    gzip keeps what it is given until a block is full, so it must get
    copies (tar.gz archives were corrupt: 'gzip: CRC check failed')."""
    monkeypatch.setattr(pack._TarWriter, "_CHUNK", 4096)
    src = tmp_path / "huge.bin"
    src.write_bytes(os.urandom(900_000))  # more than one gzip block
    buf = io.BytesIO()
    stream = formats.compressor(buf, fmt, None, 2)
    writer = pack._TarWriter(stream)
    writer.add(str(src), "huge.bin")
    writer.close()
    stream.close()
    dest = tmp_path / "out"
    with formats.decompressor(io.BytesIO(buf.getvalue()), fmt) as data:
        extract(data, str(dest), writable=True)
    assert (dest / "huge.bin").read_bytes() == src.read_bytes()


def _conda_files(root):
    """_files plus what conda's own packages bring: text and binary files with
    a prefix placeholder (recorded, not read), a script in bin/ (read, its
    shebang rewritten), a symlink and a folder with a file mode."""
    base = _files(root)
    (root / "bin" / "conda-tool").write_text("#!/opt/placeholder/bin/python3\nimport x\n")
    (root / "bin" / "binder").write_text("plain text in bin, no shebang\n")
    (root / "lib" / "conf.txt").write_text("prefix=/opt/placeholder\n")
    (root / "lib" / "libx.so").write_bytes(b"\x00/opt/placeholder\x00" + os.urandom(100))
    (root / "lib" / "sub").mkdir()
    extra = [File(str(root / "bin" / "conda-tool"), "bin/conda-tool", prefix_placeholder="/opt/placeholder",
                  file_mode="text"),
             File(str(root / "bin" / "binder"), "bin/binder", prefix_placeholder="/opt/placeholder",
                  file_mode="text"),
             File(str(root / "lib" / "conf.txt"), "lib/conf.txt", prefix_placeholder="/opt/placeholder",
                  file_mode="text"),
             File(str(root / "lib" / "libx.so"), "lib/libx.so", prefix_placeholder="/opt/placeholder",
                  file_mode="binary"),
             File(str(root / "bin" / "python"), "bin/python-again", prefix_placeholder="/opt/placeholder",
                  file_mode="text"),
             File(str(root / "lib" / "sub"), "lib/sub", prefix_placeholder=None, file_mode="unknown")]
    return base + extra


def test_adder_packs_what_conda_packs_packer_does(tree):
    """pack._adder (one lstat per file) against conda-pack's own Packer.add:
    the same tar, byte for byte, the same prefix records and package list."""
    files = _conda_files(tree)
    out = {}
    for how in ("packer", "adder"):
        buf = io.BytesIO()
        writer = pack._TarWriter(buf)
        packer = Packer(str(tree), writer)
        add = packer.add if how == "packer" else pack._adder(packer, writer)
        with pack._conda_pack_reads_from(None):
            for f in files:
                add(f)
        writer.close()
        out[how] = buf.getvalue(), packer.prefixes, packer.packages
    assert out["adder"] == out["packer"]
    prefixes = out["adder"][1]
    assert ("lib/conf.txt", "/opt/placeholder", "text") in prefixes
    assert ("lib/libx.so", "/opt/placeholder", "binary") in prefixes
    assert ("bin/binder", "/opt/placeholder", "text") in prefixes
    assert not any(t == "bin/conda-tool" for t, _p, _m in prefixes)  # shebang rewritten
    with tarfile.open(fileobj=io.BytesIO(out["adder"][0])) as tar:
        assert tar.extractfile("bin/conda-tool").read().startswith(b"#!/usr/bin/env python3\n")
        assert tar.getmember("bin/python-again").issym() and tar.getmember("lib/sub").isdir()


def test_adder_file_that_vanished_is_file_not_found(tree):
    writer = pack._TarWriter(io.BytesIO())
    add = pack._adder(Packer(str(tree), writer), writer)
    for mode in (None, "unknown", "text"):
        with pytest.raises(FileNotFoundError):
            add(File(str(tree / "gone"), "gone", is_conda=False, prefix_placeholder=None,
                     file_mode=mode))


def test_read_file_reads_to_the_end(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 5000)
    assert pack._read_file(str(path), 5000) == b"x" * 5000
    assert pack._read_file(str(path), 100) == b"x" * 5000  # it grew since its lstat
    assert pack._read_file(str(path), 9000) == b"x" * 5000  # it shrank
    path.write_bytes(b"")
    assert pack._read_file(str(path), 0) == b""


def test_prefetcher_runs_to_its_end_and_writes_nothing(tree):
    """The prefetch child walks the tree, follows the packer's list to the
    end and exits 0 (its errors would otherwise go unseen: its stderr is
    /dev/null); nothing in the tree changes."""
    os.mkfifo(tree / "lib" / "fifo")  # never opened for long: O_NONBLOCK, not a regular file
    before = {p: (p.lstat().st_mtime_ns, p.lstat().st_size) for p in tree.rglob("*")}
    files = [f.source for f in _files(tree)] + [str(tree / "lib" / "fifo"), str(tree / "missing")]
    pf = pack._Prefetch.start(str(tree))
    assert pf is not None
    pf.follow(files)
    pf.at(len(files))
    assert pf._proc.wait(30) == 0
    pf.close()
    pf.close()
    assert pf._shm is None
    assert {p: (p.lstat().st_mtime_ns, p.lstat().st_size) for p in tree.rglob("*")} == before


def test_prefetcher_stays_within_its_budget_of_the_packer(tree, monkeypatch):
    """In phase 2 it waits for the packer when it is its budget ahead, and
    is stopped by close() while waiting."""
    monkeypatch.setattr(pack, "_prefetch_budget", lambda: 1)
    files = [str(tree / "lib" / "big.bin")] * 3 + [f.source for f in _files(tree)]
    pf = pack._Prefetch.start(str(tree))
    pf.follow(files)
    with pytest.raises(subprocess.TimeoutExpired):
        pf._proc.wait(0.5)  # waiting for the packer to move
    pf.close()
    assert pf._proc.returncode is not None


def test_scan_lists_what_conda_pack_lists(tree):
    """pack._load_files against conda-pack's load_files: symlinks to files
    and folders (not followed), broken symlinks, empty folders, folders
    that cannot be listed, the names conda-pack ignores at the top."""
    (tree / "lib" / "empty").mkdir()
    (tree / "lib" / "deeper" / "empty2").mkdir(parents=True)
    (tree / "lib" / "dirlink").symlink_to("deeper")
    (tree / "lib" / "broken").symlink_to("nowhere")
    (tree / "toplink").symlink_to("lib")
    (tree / "topfile~").write_text("x")
    (tree / "pkgs" / "p").mkdir(parents=True)
    (tree / "pkgs" / "p" / "f").write_text("x")
    (tree / "envs").mkdir()
    (tree / "README").write_text("x")
    (tree / "lib" / "closed").mkdir()
    (tree / "lib" / "closed" / "f").write_text("x")
    os.chmod(tree / "lib" / "closed", 0)
    try:
        ours = pack._load_files(str(tree))
        assert ours == cp_core.load_files(str(tree))
    finally:
        os.chmod(tree / "lib" / "closed", 0o755)
    assert {"lib/empty", "lib/deeper/empty2", "lib/dirlink", "lib/broken", "toplink",
            "README", "bin/python", "lib/a.so"} <= ours
    assert not any(p.startswith(("pkgs", "envs", "topfile")) for p in ours)


def test_fast_scan_is_conda_packs_and_is_undone(tree):
    loader, finder = cp_core.load_files, cp_core.find_py_source
    names = ["lib/__pycache__/a.cpython-311.pyc", "lib/a.py", "a/b/c.txt", "__pycache__x/y.pyc",
             "lib/__pycache__/notpyc", "lib/__pycache__/a.pyc", "__pycache__/m.cpython-311.opt-1.pyc"]
    with pack._fast_scan():
        assert cp_core.load_files is pack._load_files
        for name in names:
            assert cp_core.find_py_source(name) == finder(name), name
    assert (cp_core.load_files, cp_core.find_py_source) == (loader, finder)


def test_prefetcher_stops_by_itself_when_the_files_are_cached(tree):
    """Files just written are in the page cache: after the first 512 of them
    the child stops (it would only take CPU time from the compressor),
    without waiting for the packer's list."""
    many = tree / "many"
    many.mkdir()
    for i in range(600):
        (many / f"f{i}").write_bytes(b"x" * 100)
    pf = pack._Prefetch.start(str(tree))
    try:
        assert pf._proc.wait(30) == 0
    finally:
        pf.close()


def _json_strategy():
    scalars = (hst.none() | hst.booleans() | hst.integers() | hst.floats(allow_nan=True)
               | hst.text())
    return hst.recursive(scalars, lambda inner: hst.lists(inner, max_size=5)
                         | hst.dictionaries(hst.text(max_size=8), inner, max_size=5),
                         max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(_json_strategy())
def test_json_dumps_sorted_is_jsons(obj):
    assert pack._json_dumps_sorted(obj) == json.dumps(obj, indent=True, sort_keys=True)


def test_conda_meta_rewrite_is_conda_packs(tmp_path):
    record = {"name": "python", "version": "3.11.7", "files": [f"lib/m{i}.py" for i in range(50)],
              "extracted_package_dir": "/pkgs/python", "package_tarball_full_path": "/pkgs/p.conda",
              "link": {"source": "/pkgs/python", "type": 1}, "depends": [], "constrains": [],
              "paths_data": {"paths": [{"_path": f"lib/m{i}.py", "path_type": "hardlink",
                                        "sha256": "ab" * 32, "size_in_bytes": i,
                                        "no_link": i % 2 == 0} for i in range(50)],
                             "paths_version": 1},
              "size": 1.5, "caf\u00e9": "\u20ac", "empty": {}, "nested": [[{"a": None}], {}]}
    path = tmp_path / "python-3.11.7-0.json"
    path.write_text(json.dumps(record))
    assert pack._rewrite_conda_meta(str(path)) == cp_core.rewrite_conda_meta(str(path))
    original = cp_core.rewrite_conda_meta
    with pack._conda_pack_reads_from(None):
        assert cp_core.rewrite_conda_meta(str(path)) == original(str(path))
    assert cp_core.rewrite_conda_meta is original


def test_output_starts_writing_back_and_passes_everything_on(tmp_path, monkeypatch):
    advised = []
    monkeypatch.setattr(pack._Output, "_EVERY", 1000)
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: (advised.append(a[1:]), real(*a))[1])
    data = os.urandom(5000)
    with open(tmp_path / "out", "wb") as fh:
        out = pack._Output(fh)
        for i in range(0, len(data), 300):
            out.write(data[i:i + 300])
        out.flush()
        assert out.name == fh.name
    assert (tmp_path / "out").read_bytes() == data
    assert len(advised) == 4 and all(a == (0, 0, os.POSIX_FADV_DONTNEED) for a in advised)


def test_conda_pack_core_first_then_the_whole_package():
    """conda_pack.core imported without conda_pack/__init__, which runs when
    anything else of the package is asked for: the same package as ever."""
    code = """if True:
        import sys
        from conda_stage import pack
        core = pack._conda_pack_core()
        assert "__version__" not in vars(sys.modules["conda_pack"])
        assert pack._conda_pack_core() is core
        import conda_pack.core
        assert conda_pack.core is core and conda_pack.core.File is core.File
        assert conda_pack.CondaEnv is core.CondaEnv and conda_pack.__version__
        from conda_pack import pack as p, CondaPackException
        assert p is core.pack and CondaPackException is core.CondaPackException
        from conda_pack.formats import ParallelGzipFileWriter
        print("ok")
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {root!r})\n"
                        + code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr


def _sidecar_cases(tmp_path):
    """(name, sidecar bytes or None) covering what ``Tarball.for_env`` reads."""
    from conda_stage.tarball import Meta

    def meta(fmt, records=()):
        m = Meta(format=fmt, archive="env." + fmt, size=1, mtime_ns=1, prefix=str(tmp_path / "env"),
                 fingerprint="f", tool_version="0", created="now", pack_seconds=0.1, files=1,
                 unpacked_bytes=1, records=[list(r) for r in records])
        return json.dumps(vars(m), separators=(",", ":")).encode()

    return [
        ("none", None), ("empty", b""), ("not json", b"{nope"),
        ("zst", meta("tar.zst")), ("gz", meta("tar.gz")),
        ("zst naming tar.gz in a record", meta("tar.zst", [("lib/a", "tar.gz", "text")])),
        ("gz, escaped", meta("tar.gz").replace(b'"tar.gz"', b'"tar\\u002egz"')),
        ("zst, escapes elsewhere", meta("tar.zst", [("lib/caf\u00e9", "/p", "text")])),
        ("gz but malformed", meta("tar.gz").replace(b'"files":1', b'"files":-1')),
        ("gz, another meta version", meta("tar.gz").replace(b'"meta_version":', b'"meta_version":9')),
    ]


def test_tarball_for_is_tarball_for_env(tmp_path):
    """The sidecar is parsed only when it could name another format than
    the default: the tarball is always the one ``Tarball.for_env`` gives."""
    from conda_stage.resolve import Env
    from conda_stage.tarball import Tarball

    env = Env(prefix=tmp_path / "env", name="env")
    (tmp_path / "env").mkdir()
    side = Tarball.at(env, formats.DEFAULT_FORMAT).meta_path
    for name, data in _sidecar_cases(tmp_path):
        if side.exists() or side.is_symlink():
            side.unlink()
        if data is not None:
            side.write_bytes(data)
        for fmt in (None, *formats.FORMATS):
            assert pack._tarball_for(env, fmt) == Tarball.for_env(env, fmt), (name, fmt)
        if name in ("gz", "gz, escaped"):  # valid sidecars naming the other format
            assert pack._tarball_for(env, None).format == "tar.gz"
    side.unlink()
    side.mkdir()  # not a file at all
    assert pack._tarball_for(env, None) == Tarball.for_env(env, None)
    assert Tarball.for_env(env, None).format == formats.DEFAULT_FORMAT


def test_no_gc_restores_the_collector():
    import gc

    assert gc.isenabled()
    with pack._no_gc():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(KeyError):
        with pack._no_gc():
            raise KeyError
    assert gc.isenabled()
    gc.disable()
    try:
        with pack._no_gc():
            pass
        assert not gc.isenabled()  # it was off: it stays off
    finally:
        gc.enable()


def test_replaced_archive_is_closed_in_a_thread(tmp_path):
    """The archive a repack replaces is held across the rename and closed
    in a thread; nothing stays open, nothing blocks (a FIFO, a missing file)."""
    import threading

    def fds():
        return len(os.listdir("/proc/self/fd"))

    before, threads = fds(), threading.active_count()
    target, new = tmp_path / "env.tar.zst", tmp_path / "new.tmp"
    target.write_bytes(b"old" * 1000)
    new.write_bytes(b"new")
    r = pack._Replaced()
    r.hold(target)
    assert fds() == before + 1
    os.replace(new, target)
    r.release()
    r.close()
    assert fds() == before and threading.active_count() == threads
    assert target.read_bytes() == b"new"
    os.mkfifo(tmp_path / "fifo")
    for path in (tmp_path / "missing", tmp_path / "fifo"):
        r = pack._Replaced()
        r.hold(path)
        r.release()
        r.close()
    r = pack._Replaced()
    r.hold(target)  # the rename failed: close() closes it
    r.close()
    assert fds() == before


def _conda_env(tmp_path):
    """An environment with conda packages from a package cache (paths.json,
    noarch: python, info/files + has_prefix), an uncached one, pip's files,
    bytecode of managed and unmanaged sources, history, conda's scripts."""
    root, pkgs = tmp_path / "cenv", tmp_path / "pkgs"
    sp = "lib/python3.11/site-packages"

    def put(path, text="x\n"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def record(name, files, source):
        put(root / "conda-meta" / f"{name}-1.0-0.json", json.dumps(
            {"name": name, "version": "1.0", "url": f"https://x/{name}", "files": files,
             "link": {"source": str(source)} if source is not None else None}))

    a = pkgs / "a-1.0-0"
    put(a / "info" / "paths.json", json.dumps({"paths": [
        {"_path": "lib/a.py", "file_mode": "text", "prefix_placeholder": "/opt/ph"},
        {"_path": "lib/__pycache__/a.cpython-311.pyc"}, {"_path": "lib/a.so",
                                                          "file_mode": "binary",
                                                          "prefix_placeholder": "/opt/ph"}]}))
    for f in ("lib/a.py", "lib/__pycache__/a.cpython-311.pyc", "lib/a.so"):
        put(root / f)
    record("a", ["lib/a.py", "lib/__pycache__/a.cpython-311.pyc", "lib/a.so"], a)
    b = pkgs / "b-1.0-0"
    put(b / "info" / "link.json", json.dumps({"noarch": {"type": "python"}}))
    put(b / "info" / "paths.json", json.dumps({"paths": [
        {"_path": "site-packages/b.py"}, {"_path": "python-scripts/bscript",
                                          "file_mode": "text", "prefix_placeholder": "/opt/ph"}]}))
    for f in (f"{sp}/b.py", f"{sp}/__pycache__/b.cpython-311.pyc", "bin/bscript"):
        put(root / f)
    record("b", [f"{sp}/b.py", f"{sp}/__pycache__/b.cpython-311.pyc", "bin/bscript",
                 f"{sp}/__pycache__/gone.cpython-311.pyc"], b)
    c = pkgs / "c-1.0-0"
    put(c / "info" / "files", "lib/c.txt\nlib/c2.txt\n")
    put(c / "info" / "has_prefix", "/opt/ph text lib/c.txt\n")
    for f in ("lib/c.txt", "lib/c2.txt"):
        put(root / f)
    record("c", ["lib/c.txt", "lib/c2.txt"], c)
    put(root / "conda-meta" / "python-3.11.0-0.json", json.dumps(
        {"name": "python", "version": "3.11.0", "url": "https://x/python", "files":
         ["bin/python3.11", ".nonadmin"], "link": {"source": str(tmp_path / "nowhere")}}))
    put(root / "bin" / "python3.11")
    put(root / "conda-meta" / "history", "==> x <==\n")
    for f in (f"{sp}/pipped/__init__.py", f"{sp}/pipped/__pycache__/__init__.cpython-311.pyc",
              f"{sp}/pipped/__pycache__/__init__.cpython-311.opt-1.pyc",
              f"{sp}/pipped/__pycache__/odd.pyc", "lib/__pycache__/a.cpython-311.opt-2.pyc",
              "lib/__pycache__/a.x.y.z.pyc", "bin/conda", "bin/activate", "bin/tool",
              f"{sp}/pipped-1.0.dist-info/METADATA", "share/empty/.keep"):
        put(root / f)
    (root / "share" / "empty" / ".keep").unlink()
    (root / "lib" / "link.py").symlink_to("a.py")
    return root


def _scan(prefix, **kw):
    """(File fields in order, warnings) of CondaEnv.from_prefix, or the error."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            files = [(f.source, f.target, f.is_conda, f.file_mode, f.prefix_placeholder)
                     for f in cp_core.CondaEnv.from_prefix(str(prefix), **kw).files]
        except cp_core.CondaPackException as exc:
            files = ("error", str(exc))
    return files, [str(w.message) for w in caught]


@pytest.mark.parametrize("case", ["as is", "missing file", "missing, ignored", "editable",
                                  "no python", "not conda", "no prefix"])
def test_load_environment_is_conda_packs(tmp_path, case):
    """pack._load_environment (used with the conda-pack it was written from)
    against conda-pack's own: the same File list in the same order, the
    same errors and warnings."""
    root = _conda_env(tmp_path)
    kw = {}
    sp = root / "lib/python3.11/site-packages"
    if case.startswith("missing"):
        (root / "lib" / "c2.txt").unlink()
        kw = {"ignore_missing_files": case.endswith("ignored")}
    elif case == "editable":
        (sp / "pipped-1.0.dist-info" / "direct_url.json").write_text(
            json.dumps({"url": "file:///x", "dir_info": {"editable": True}}))
    elif case == "no python":
        (root / "conda-meta" / "python-3.11.0-0.json").unlink()
        (root / "conda-meta" / "b-1.0-0.json").unlink()
    elif case == "not conda":
        import shutil

        shutil.rmtree(root / "conda-meta")
    elif case == "no prefix":
        root = tmp_path / "nothing"
    assert pack._known_conda_pack(cp_core)  # the conda-pack this was written from
    with pack._fast_scan():
        assert cp_core.load_environment is pack._load_environment
        ours = _scan(root, **kw)
    original = cp_core.load_environment
    with pack._fast_scan():
        cp_core.load_environment = original  # conda-pack's, with our listing
        theirs = _scan(root, **kw)
    assert ours == theirs
    assert _scan(root, **kw) == theirs  # conda-pack alone
    if case == "as is":
        targets = [f[1] for f in ours[0]]
        assert "lib/__pycache__/a.cpython-311.opt-2.pyc" not in targets  # its .py is conda's
        assert "lib/python3.11/site-packages/pipped/__pycache__/odd.pyc" in targets
        assert "bin/conda" not in targets and "bin/tool" in targets and ours[1]


def test_py_source_in_is_find_py_source_in():
    managed = {"lib/a.py", "a.py", "lib/x/b.py", ".py", "lib/.py"}
    for path in ["lib/__pycache__/a.cpython-311.pyc", "lib/__pycache__/a.opt-1.pyc",
                 "lib/__pycache__/a.cpython-311.opt-1.pyc", "lib/__pycache__/a.x.y.z.pyc",
                 "lib/__pycache__/a.pyc", "__pycache__/a.cpython-311.pyc", "lib/a.py",
                 "lib/x/__pycache__/b.cpython-311.pyc", "lib/__pycache__/.hidden.cpython-311.pyc",
                 "lib/__pycache__/__pycache__", "__pycache__", "a", "", "lib/__pycache__/b.c.pyc",
                 "lib/x/__pycache__/b.cpython-311.opt-x!.pyc"]:
        expected = cp_core.find_py_source(path) in managed
        assert pack._py_source_in(path, managed, cp_core.find_py_source) == expected, path
