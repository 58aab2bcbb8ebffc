"""Quick correctness checks of benchmarks/slowfs.py, the simulated slow shared filesystem.

Real FUSE mounts (a few seconds in all).  Skipped, with the reason, where /dev/fuse,
libfuse3, fusermount3 (non-root) or mfusepy are missing.
"""

import errno
import fcntl
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("slowfs", ROOT / "benchmarks" / "slowfs.py")
slowfs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(slowfs)

_REASON = slowfs.fuse_unavailable_reason(probe=True)
pytestmark = [
    pytest.mark.skipif(_REASON is not None, reason=f"slowfs cannot mount here: {_REASON}"),
    pytest.mark.timeout(60),
]

NOBODY = 65534


def _as_nobody(*cmd):
    """Run cmd as uid/gid 65534 with no supplementary groups (needs root + setpriv)."""
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]


@pytest.fixture(scope="module")
def tree():
    # not under tmp_path: pytest makes /tmp/pytest-of-<user> 0700, which would lock out
    # the unprivileged user of the permission test before it even reaches the mount
    base = Path(tempfile.mkdtemp(prefix="slowfs-test-"))
    base.chmod(0o755)
    src, mnt = base / "src", base / "mnt"
    (src / "d" / "sub").mkdir(parents=True)
    (src / "d" / "a").write_text("hello\n")
    (src / "d" / "a").chmod(0o640)
    os.symlink("a", src / "d" / "lnk")
    os.symlink("/nonexistent/target", src / "d" / "dangling")
    os.link(src / "d" / "a", src / "d" / "hard")
    shutil.copy2("/bin/true", src / "true")
    shutil.copy2(os.path.realpath(sys.executable), src / "python")  # a 2-7 MB ELF, mmapped
    (src / "script.sh").write_text("#!/bin/sh\necho script-ran \"$@\"\n")
    (src / "script.sh").chmod(0o755)
    (src / "secret").write_text("root only\n")
    (src / "secret").chmod(0o600)
    (src / "public").write_text("everyone\n")
    (src / "public").chmod(0o644)
    (src / "nobodydir").mkdir()
    (src / "rw").mkdir(mode=0o777)
    (src / "rw").chmod(0o777)
    if os.geteuid() == 0:
        os.chown(src / "d" / "a", 1234, 5678)
        os.chown(src / "nobodydir", NOBODY, NOBODY)
        os.lchown(src / "d" / "lnk", 4321, 8765)
    with slowfs.mounted(str(src), str(mnt), meta_latency_ms=0) as m:
        yield src, mnt, m
    assert not os.path.ismount(mnt)
    assert m.proc.returncode == 0, m.log()
    shutil.rmtree(base)


def test_stat_passthrough(tree):
    src, mnt, _ = tree
    for rel in ["d", "d/a", "d/hard", "d/lnk", "d/dangling", "true", "d/sub"]:
        s, t = os.lstat(src / rel), os.lstat(mnt / rel)
        for field in ("st_mode", "st_uid", "st_gid", "st_size", "st_nlink", "st_ino", "st_mtime_ns"):
            assert getattr(t, field) == getattr(s, field), (rel, field)
    assert os.stat(mnt / "d" / "hard").st_ino == os.stat(mnt / "d" / "a").st_ino
    assert os.stat(mnt / "d" / "lnk").st_ino == os.stat(src / "d" / "a").st_ino  # follows
    assert os.readlink(mnt / "d" / "lnk") == "a"
    assert os.readlink(mnt / "d" / "dangling") == "/nonexistent/target"
    assert (mnt / "d" / "lnk").read_text() == "hello\n"
    assert sorted(os.listdir(mnt / "d")) == sorted(os.listdir(src / "d"))
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "missing")
    ls = subprocess.run(["ls", "-a", str(mnt / "d")], capture_output=True, text=True, check=True)
    assert ls.stdout.split()[:2] == [".", ".."]


def test_exec_through_mount(tree):
    _, mnt, _ = tree
    assert subprocess.run([str(mnt / "true")]).returncode == 0
    out = subprocess.run([str(mnt / "script.sh"), "x"], capture_output=True, text=True, check=True)
    assert out.stdout == "script-ran x\n"
    out = subprocess.run([str(mnt / "python"), "-c", "import sys, json; print(sys.executable)"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == str(mnt / "python"), out.stderr


def test_writes_rename_and_times(tree):
    src, mnt, _ = tree
    w = mnt / "rw"
    (w / "new").write_bytes(b"abc")
    with open(w / "new", "ab") as fh:
        fh.write(b"def")
    assert (src / "rw" / "new").read_bytes() == b"abcdef"
    os.truncate(w / "new", 2)
    assert (src / "rw" / "new").read_bytes() == b"ab"
    # atomic replace over an existing file (what a tarball writer does)
    (w / "tmp").write_bytes(b"v2")
    os.replace(w / "tmp", w / "new")
    assert (src / "rw" / "new").read_bytes() == b"v2" and not (src / "rw" / "tmp").exists()
    # renameat2(RENAME_NOREPLACE) must not clobber
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    (w / "other").write_bytes(b"o")
    rc = libc.renameat2(-100, bytes(w / "other"), -100, bytes(w / "new"), 1)
    assert rc == -1 and ctypes.get_errno() == errno.EEXIST
    assert (src / "rw" / "new").read_bytes() == b"v2"
    os.chmod(w / "new", 0o604)
    assert (src / "rw" / "new").stat().st_mode & 0o777 == 0o604
    os.utime(w / "new", ns=(1_000_000_123, 2_000_000_456))
    st = (src / "rw" / "new").stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    subprocess.run(["touch", "-a", str(w / "new")], check=True)  # UTIME_OMIT for mtime
    assert (src / "rw" / "new").stat().st_mtime_ns == 2_000_000_456
    os.mkdir(w / "dir", 0o750)
    assert (src / "rw" / "dir").stat().st_mode & 0o777 == 0o750
    os.symlink("new", w / "sl")
    os.link(w / "new", w / "hl")
    assert os.readlink(src / "rw" / "sl") == "new"
    assert (src / "rw" / "hl").stat().st_ino == (src / "rw" / "new").stat().st_ino
    for name in ("new", "other", "sl", "hl"):
        os.unlink(w / name)
    os.rmdir(w / "dir")
    assert os.listdir(src / "rw") == []


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_other_users_permissions_and_ownership(tree):
    src, mnt, _ = tree
    ok = subprocess.run(_as_nobody("cat", str(mnt / "public")), capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout == "everyone\n", ok.stderr
    denied = subprocess.run(_as_nobody("cat", str(mnt / "secret")), capture_output=True, text=True)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    denied = subprocess.run(_as_nobody("touch", str(mnt / "d" / "x")), capture_output=True, text=True)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    made = subprocess.run(_as_nobody("sh", "-c", f"umask 027; echo hi > {mnt}/nobodydir/f; mkdir {mnt}/nobodydir/g"),
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    for name, mode in (("f", 0o640), ("g", 0o750)):
        st = (src / "nobodydir" / name).lstat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (NOBODY, NOBODY, mode), name
    chmod = subprocess.run(_as_nobody("chmod", "777", str(mnt / "public")), capture_output=True, text=True)
    assert chmod.returncode != 0  # not the owner
    assert (src / "public").stat().st_mode & 0o777 == 0o644


def _hold_lock(path, kind):
    code = f"""
import fcntl, sys
f = open({str(path)!r}, 'r+')
if {kind!r} == 'posix':
    fcntl.lockf(f, fcntl.LOCK_EX)
else:
    fcntl.flock(f, fcntl.LOCK_EX)
print('locked', flush=True)
sys.stdin.read()
"""
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("kind", ["posix", "flock"])
def test_locks_between_processes_on_the_mount(tree, kind):
    src, mnt, _ = tree
    path = mnt / "rw" / f"lock-{kind}"
    path.write_text("")
    holder = _hold_lock(path, kind)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with open(path, "r+") as fh:
            with pytest.raises(OSError) as exc:
                if kind == "posix":
                    fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                else:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert exc.value.errno in (errno.EAGAIN, errno.EACCES)
    finally:
        holder.stdin.close()
        holder.wait(10)
    with open(path, "r+") as fh:  # free again once the holder is gone
        (fcntl.lockf if kind == "posix" else fcntl.flock)(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    path.unlink()


def test_latency_is_injected_and_parallel(tmp_path):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    for i in range(8):
        (src / f"f{i}").write_text("x")
    lat = 0.05
    with slowfs.mounted(str(src), str(mnt), meta_latency_ms=lat * 1000) as m:
        os.stat(mnt)  # root inode: getattr only
        t0 = time.perf_counter()
        os.stat(mnt / "f0")  # lookup (+ getattr): >= 1 request
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        threads = [threading.Thread(target=os.stat, args=(mnt / f"f{i}",)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        eight = time.perf_counter() - t0
    assert one >= lat
    # 8 serial stats would take >= 8 * one; the FS serves them concurrently
    assert eight < 4 * one, (one, eight)
    assert m.stats["counts"]["getattr"] >= 9
    assert m.stats["options"]["meta_latency_ms"] == lat * 1000


def test_unmounts_on_exception(tmp_path):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        with slowfs.mounted(str(src), str(mnt), meta_latency_ms=0, busy_timeout=0.3) as m:
            assert os.path.ismount(mnt)
            fh = open(mnt / "busy", "w")  # an open file makes a plain unmount fail with EBUSY
            raise RuntimeError("boom")
    with pytest.raises(OSError):  # the connection is gone
        fh.write("x")
        fh.close()
    assert not os.path.ismount(mnt)
    assert m.proc.poll() is not None


def test_failed_mount_reports_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(slowfs.SlowFSError):
        with slowfs.mounted(str(src), str(src / "missing-parent" / "mnt"), meta_latency_ms=0, timeout=10,
                            python="/bin/false"):
            pass
