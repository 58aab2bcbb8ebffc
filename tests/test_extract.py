"""Safe extraction and in-flight relocation, on archives built in memory."""
import io
import os
import stat
import tarfile

import pytest
import zstandard

from conda_stage import formats
from conda_stage.errors import PrefixTooLong, UnsafeArchive
from conda_stage.extract import extract
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
