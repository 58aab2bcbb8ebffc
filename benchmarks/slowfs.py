#!/usr/bin/env python3
"""slowfs -- a FUSE passthrough filesystem that simulates a slow shared filesystem.

It mirrors SOURCE at MOUNTPOINT and sleeps before every *metadata* request
(lookup/getattr, opendir/readdir, open/create, readlink, statfs, access,
mkdir/rmdir/unlink/rename/link/symlink/mknod, chmod/chown/truncate/utimens,
fsync, xattr ops) -- 1 ms by default -- and, optionally, before every data read
and write (per-request latency and/or a global bandwidth cap).  The point is
to reproduce the "metadata storm" cost that makes `import`-heavy Python
startup slow on BeeGFS/Lustre/NFS, without a network filesystem.

Command line (run as root, or with ``user_allow_other`` for --allow-other)::

    python benchmarks/slowfs.py SOURCE MOUNTPOINT [--meta-latency-ms 1.0]
        [--read-latency-ms 0] [--foreground] [--allow-other] [...]
    python benchmarks/slowfs.py --measure     # built-in latency measurements

Python API::

    from benchmarks.slowfs import mounted        # or put benchmarks/ on sys.path
    with mounted("/shared/envs", "/mnt/slow", meta_latency_ms=1.0) as m:
        subprocess.run(["/mnt/slow/myenv/bin/python", "-c", "pass"])
    print(m.stats)                               # per-operation counts

The ``mounted()`` side only needs the standard library; the filesystem
process itself needs ``mfusepy`` (PyPI) and ``libfuse3.so.3`` (Debian
``libfuse3-3``), plus ``fusermount3`` (Debian ``fuse3``) for unmounting
without root and for ``auto_unmount``.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Dict, Iterator, List, Optional, Sequence

__all__ = ["mounted", "SlowMount", "SlowFSError", "fuse_unavailable_reason", "main"]

FSTYPE_SUBTYPE = "slowfs"

# Operations that get --meta-latency-ms.  Everything the kernel sends as a
# separate request and that a network FS client would turn into a metadata RPC.
META_OPS = frozenset(
    "getattr readlink opendir readdir open create access statfs mkdir rmdir unlink rename "
    "link symlink mknod chmod chown truncate utimens fsync fsyncdir "
    "getxattr listxattr setxattr removexattr".split()
)


class SlowFSError(RuntimeError):
    """The slowfs process could not be started, mounted or unmounted."""


# --------------------------------------------------------------------------------------
# helpers usable without FUSE (parent side)
# --------------------------------------------------------------------------------------


def _find_fusermount() -> Optional[str]:
    for name in ("fusermount3", "fusermount"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _mountinfo_entry(mountpoint: str) -> Optional[List[str]]:
    """The /proc/self/mountinfo fields for *mountpoint*, or None if not a mountpoint."""
    import re

    # resolve the parent only: resolving the mount point itself would be a FUSE request
    # (counted, delayed, and hanging if the daemon is stopped)
    mountpoint = os.path.abspath(mountpoint)
    target = os.fsencode(os.path.join(os.path.realpath(os.path.dirname(mountpoint)),
                                      os.path.basename(mountpoint)))
    found = None
    try:
        with open("/proc/self/mountinfo", "rb") as fh:
            for line in fh:
                fields = line.split()
                # field 4 is the mount point, with space, tab, newline, backslash as \ooo
                mp = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
                if mp == target:
                    found = [os.fsdecode(f) for f in fields]  # the last one wins (stacked mounts)
    except OSError:
        return None
    return found


def is_slowfs_mounted(mountpoint: str) -> bool:
    fields = _mountinfo_entry(mountpoint)
    if not fields:
        return False
    sep = fields.index("-")
    return fields[sep + 1] == "fuse." + FSTYPE_SUBTYPE


def fuse_unavailable_reason(python: Optional[str] = None, probe: bool = False) -> Optional[str]:
    """Why slowfs cannot run here (a human-readable string), or None if it can.

    With ``probe=True`` a real mount of an empty directory is tried as well
    (~0.2 s): containers may have /dev/fuse and a setuid fusermount3 that still
    cannot mount ("fusermount3: failed to open /dev/fuse: Permission denied").
    """
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (no FUSE support in this kernel/container)"
    if os.geteuid() != 0:
        # unprivileged mounts go through the setuid fusermount3, which opens /dev/fuse
        fusermount = _find_fusermount()
        if not fusermount:
            return "not root and no fusermount3/fusermount in PATH (Debian package: fuse3)"
        if not os.stat(fusermount).st_mode & stat.S_ISUID and not os.access("/dev/fuse", os.R_OK | os.W_OK):
            return f"not root, {fusermount} is not setuid and /dev/fuse is not accessible"
    if not (ctypes.util.find_library("fuse3") or ctypes.util.find_library("fuse")):
        return "libfuse not found (Debian package: libfuse3-3)"
    python = python or sys.executable
    probe = subprocess.run(
        [python, "-c", "import mfusepy"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_child_env(),
        text=True,
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"{python} cannot import mfusepy (pip install mfusepy): {last}"
    if probe:
        tmp = tempfile.mkdtemp(prefix="slowfs-probe-")
        try:
            os.mkdir(os.path.join(tmp, "src"))
            with mounted(os.path.join(tmp, "src"), os.path.join(tmp, "mnt"), meta_latency_ms=0,
                         python=python, timeout=15):
                pass
        except SlowFSError as exc:
            lines = [ln for ln in str(exc).splitlines()[1:] if ln.strip()] or [str(exc)]
            return "a test mount failed: " + lines[0].strip()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return None


def _child_env() -> Dict[str, str]:
    env = dict(os.environ)
    # mfusepy tries libfuse2 first; pin libfuse3 (fusermount3, max_threads, ...).
    if ctypes.util.find_library("fuse3"):
        env.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    return env


def unmount(mountpoint: str, lazy: bool = False) -> subprocess.CompletedProcess:
    """Unmount a FUSE mount with fusermount3 -u (or umount as root without it)."""
    fusermount = _find_fusermount()
    if fusermount:
        cmd = [fusermount, "-u"] + (["-z"] if lazy else []) + [mountpoint]
    else:
        cmd = ["umount"] + (["-l"] if lazy else []) + [mountpoint]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _abort_connection(mountpoint: str) -> None:
    """Abort a hung FUSE connection through /sys/fs/fuse/connections/N/abort."""
    fields = _mountinfo_entry(mountpoint)
    if not fields:
        return
    minor = fields[2].split(":")[1]
    with contextlib.suppress(OSError):
        with open(f"/sys/fs/fuse/connections/{minor}/abort", "w") as fh:
            fh.write("1")


class SlowMount:
    """What ``mounted()`` yields: where it is, the process, and statistics after exit."""

    def __init__(self, source: str, mountpoint: str, proc: subprocess.Popen, log_path: str,
                 stats_path: str) -> None:
        self.source = source
        self.mountpoint = mountpoint
        self.proc = proc
        self.pid = proc.pid
        self.log_path = log_path
        self.stats_path = stats_path
        #: per-operation request counts and injected sleep; filled in after unmount
        self.stats: Optional[dict] = None
        self.control = None  # socket: snapshot()
        self._log_text: Optional[str] = None

    def log(self) -> str:
        """What the slowfs process printed (libfuse errors, Python warnings)."""
        if self._log_text is not None:
            return self._log_text
        try:
            with open(self.log_path, "r", errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def snapshot(self, timeout: float = 30.0) -> dict:
        """The statistics so far, asked for around the filesystem (no request)."""
        self.control.settimeout(timeout)
        self.control.sendall(b"s")
        if self.control.recv(1) != b"k":
            raise SlowFSError("slowfs did not answer the request for its statistics")
        with open(self.stats_path) as fh:
            return json.load(fh)

    def __repr__(self) -> str:
        return f"SlowMount({self.source!r} -> {self.mountpoint!r}, pid={self.pid})"


def build_command(source: str, mountpoint: str, *, python: Optional[str] = None, foreground: bool = True,
                  **options) -> List[str]:
    """The argv that runs slowfs with the given ``mounted()``-style options."""
    cmd = [python or sys.executable, os.path.abspath(__file__), source, mountpoint]
    if foreground:
        cmd.append("--foreground")
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        else:
            cmd += [flag, str(value)]
    return cmd


@contextlib.contextmanager
def mounted(
    source: str,
    mountpoint: str,
    meta_latency_ms: float = 1.0,
    read_latency_ms: float = 0.0,
    write_latency_ms: float = 0.0,
    read_bandwidth_mbps: float = 0.0,
    write_bandwidth_mbps: float = 0.0,
    attr_timeout: float = 0.0,
    entry_timeout: float = 0.0,
    negative_timeout: float = 0.0,
    data_cache: str = "none",
    allow_other: Optional[bool] = None,
    max_threads: int = 16,
    single_thread: bool = False,
    xattrs: bool = False,
    python: Optional[str] = None,
    timeout: float = 30.0,
    busy_timeout: float = 3.0,
    log_path: Optional[str] = None,
    debug: bool = False,
    count_paths: bool = False,
) -> Iterator[SlowMount]:
    """Mount SOURCE at MOUNTPOINT through slowfs for the duration of the ``with`` block.

    Starts ``slowfs.py --foreground`` in a subprocess, waits until the kernel has
    sent FUSE_INIT (the mount is live), yields a :class:`SlowMount`, and on exit
    (also on exceptions) unmounts and waits for the process.  If the mount is still
    busy after *busy_timeout* seconds (a cwd or open file inside), it is detached
    lazily and the process is stopped; later access to those files gets ENOTCONN.
    ``allow_other=None`` means "if possible" (root, or ``user_allow_other`` in
    /etc/fuse.conf).  *python* runs the filesystem (default: this interpreter; it
    needs mfusepy).  After the block, ``.stats`` holds per-operation request counts
    (``count_paths``: also per operation, path and calling command, under "paths");
    ``.snapshot()`` returns them so far, inside the block.
    """
    source = os.path.abspath(source)
    mountpoint = os.path.abspath(mountpoint)
    if not os.path.isdir(source):
        raise SlowFSError(f"source {source!r} is not a directory")
    os.makedirs(mountpoint, exist_ok=True)
    if os.path.ismount(mountpoint):
        raise SlowFSError(f"{mountpoint!r} is already a mount point")
    if allow_other is None:
        allow_other = os.geteuid() == 0 or _user_allow_other()

    workdir = tempfile.mkdtemp(prefix="slowfs-")
    log_path = log_path or os.path.join(workdir, "slowfs.log")
    stats_path = os.path.join(workdir, "stats.json")
    ready_r, ready_w = os.pipe()
    import socket

    control, control_child = socket.socketpair()
    cmd = build_command(
        source, mountpoint, python=python, foreground=True,
        meta_latency_ms=meta_latency_ms, read_latency_ms=read_latency_ms,
        write_latency_ms=write_latency_ms, read_bandwidth_mbps=read_bandwidth_mbps,
        write_bandwidth_mbps=write_bandwidth_mbps, attr_timeout=attr_timeout,
        entry_timeout=entry_timeout, negative_timeout=negative_timeout, data_cache=data_cache,
        allow_other=allow_other, max_threads=max_threads, single_thread=single_thread,
        xattrs=xattrs, debug=debug, count_paths=count_paths, stats_file=stats_path,
        ready_fd=ready_w, control_fd=control_child.fileno(),
        parent_pid=os.getpid(),
    )
    log_fh = open(log_path, "ab")
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT,
            pass_fds=(ready_w, control_child.fileno()), env=_child_env(), cwd="/",
            start_new_session=True,  # a ^C in the parent doesn't kill the FS mid-unmount
        )
    except BaseException:
        os.close(ready_r)
        os.close(ready_w)
        control.close()
        control_child.close()
        log_fh.close()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    os.close(ready_w)
    control_child.close()
    log_fh.close()
    handle = SlowMount(source, mountpoint, proc, log_path, stats_path)
    handle.control = control
    try:
        _wait_ready(proc, ready_r, mountpoint, timeout, handle)
        yield handle
    finally:
        os.close(ready_r)
        control.close()
        _teardown(handle, timeout, busy_timeout)
        with contextlib.suppress(OSError, ValueError):
            with open(stats_path) as fh:
                handle.stats = json.load(fh)
        handle._log_text = handle.log()  # the temporary directory goes away now
        shutil.rmtree(workdir, ignore_errors=True)


def _user_allow_other() -> bool:
    try:
        with open("/etc/fuse.conf") as fh:
            return any(line.strip() == "user_allow_other" for line in fh)
    except OSError:
        return False


def _wait_ready(proc: subprocess.Popen, ready_r: int, mountpoint: str, timeout: float,
                handle: SlowMount) -> None:
    import select

    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SlowFSError(f"slowfs did not come up within {timeout}s; log:\n{handle.log()}")
        readable, _, _ = select.select([ready_r], [], [], min(left, 0.2))
        if readable:
            data = os.read(ready_r, 64)
            if data.startswith(b"ready"):
                break
            # EOF: the process closed the pipe without init -> it died or failed
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            raise SlowFSError(
                f"slowfs exited with status {proc.returncode} before mounting; log:\n{handle.log()}")
        if proc.poll() is not None:
            raise SlowFSError(
                f"slowfs exited with status {proc.returncode} before mounting; log:\n{handle.log()}")
    # INIT has been answered; make sure the mount is visible in this namespace.
    while not is_slowfs_mounted(mountpoint):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SlowFSError(f"{mountpoint} is not a slowfs mount after init; log:\n{handle.log()}")
        time.sleep(0.01)


def _teardown(handle: SlowMount, timeout: float, busy_wait: float = 3.0) -> None:
    """Unmount and reap the process; never leaves a mount or a process behind."""
    proc, mountpoint = handle.proc, handle.mountpoint
    notes = []
    if is_slowfs_mounted(mountpoint):
        deadline = time.monotonic() + busy_wait
        while True:
            res = unmount(mountpoint)
            if res.returncode == 0 or not is_slowfs_mounted(mountpoint):
                break
            if time.monotonic() > deadline:
                # still busy (a cwd or an open file inside): detach it now; the process
                # would only exit after the last user, so it is told to stop right away
                notes.append(f"unmount failed ({res.stdout.strip()}); lazy unmount + SIGTERM")
                unmount(mountpoint, lazy=True)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.1)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        notes.append("slowfs did not exit after unmount; SIGTERM")
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            notes.append("slowfs ignored SIGTERM; aborting the connection and SIGKILL")
            _abort_connection(mountpoint)
            proc.kill()
            proc.wait()
    if is_slowfs_mounted(mountpoint):  # process gone but the mount stayed
        _abort_connection(mountpoint)
        unmount(mountpoint, lazy=True)
    if notes:
        sys.stderr.write(f"slowfs teardown of {mountpoint}: " + "; ".join(notes) + "\n")


# --------------------------------------------------------------------------------------
# the filesystem (child side; imports mfusepy lazily)
# --------------------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _libc_call(ret: int, what: str, path: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


class _Throttle:
    """Serialises transfers through one pipe of *bytes_per_s* shared by all threads."""

    def __init__(self, bytes_per_s: float) -> None:
        self.rate = bytes_per_s
        self.lock = threading.Lock()
        self.next_free = 0.0

    def __call__(self, nbytes: int) -> float:
        if self.rate <= 0 or nbytes <= 0:
            return 0.0
        with self.lock:
            start = max(time.monotonic(), self.next_free)
            self.next_free = done = start + nbytes / self.rate
        wait = done - time.monotonic()
        if wait > 0:
            time.sleep(wait)
            return wait
        return 0.0


def make_operations(args: argparse.Namespace):  # noqa: C901 - one class, many small methods
    import mfusepy

    class SlowFS(mfusepy.Operations):
        use_ns = True  # times as integer nanoseconds

        def __init__(self) -> None:
            self.root = os.path.realpath(args.source).rstrip("/")
            self.meta_s = max(0.0, args.meta_latency_ms) / 1000.0
            self.read_s = max(0.0, args.read_latency_ms) / 1000.0
            self.write_s = max(0.0, args.write_latency_ms) / 1000.0
            self.read_bw = _Throttle(args.read_bandwidth_mbps * 1e6)
            self.write_bw = _Throttle(args.write_bandwidth_mbps * 1e6)
            self.counts: Counter = Counter()
            self.paths: Counter = Counter()  # --count-paths
            self.bytes = Counter()
            self.slept = 0.0
            self.mutex = threading.Lock()  # NB: an attribute named 'lock' would register the FUSE lock op
            self.am_root = os.geteuid() == 0
            self.overshoot = 0.0  # seconds time.sleep() tends to oversleep, see _sleep()
            self.started = time.time()

        # ---- bookkeeping ---------------------------------------------------------
        def _p(self, path: str) -> str:
            return self.root + path

        def _meta(self, op: str, path: str) -> None:
            with self.mutex:
                self.counts[op] += 1
                self.slept += self.meta_s
            if args.count_paths:
                self._count_path(op, path)
            if self.meta_s:
                self._sleep(self.meta_s)

        def _data(self, op: str, nbytes: int, latency: float, throttle: _Throttle,
                  path: str) -> None:
            with self.mutex:
                self.counts[op] += 1
                self.bytes[op] += nbytes
                self.slept += latency
            if args.count_paths:
                self._count_path(op, path)
            if latency:
                self._sleep(latency)
            waited = throttle(nbytes)
            if waited:
                with self.mutex:
                    self.slept += waited

        def _count_path(self, op: str, path: str) -> None:
            """--count-paths: the request under "op path (command of the caller)";
            the kernel's own requests (revalidation, readahead) carry the pid
            of the process whose access caused them."""
            _uid, _gid, pid = mfusepy.fuse_get_context()
            try:
                with open(f"/proc/{pid}/comm") as fh:
                    comm = fh.read().strip()
            except OSError:
                comm = "?"
            with self.mutex:
                self.paths[f"{op} {path} ({comm})"] += 1

        def _serve_snapshots(self, fd: int) -> None:
            """--control-fd: each byte received on the socket writes the stats
            file, then a byte answers (``SlowMount.snapshot()``); asking goes
            around the filesystem, so it adds no request."""
            import socket

            sock = socket.socket(fileno=fd)

            def serve() -> None:
                with sock:
                    while sock.recv(1):
                        self._write_stats()
                        sock.sendall(b"k")

            threading.Thread(target=serve, daemon=True, name="slowfs-control").start()

        def _write_stats(self) -> None:
            if not args.stats_file:
                return
            with self.mutex:  # also serialises writers of the file
                data = {
                    "counts": dict(self.counts),
                    "bytes": dict(self.bytes),
                    "meta_requests": sum(v for k, v in self.counts.items() if k in META_OPS),
                    "injected_sleep_s": round(self.slept, 6),
                    "uptime_s": round(time.time() - self.started, 3),
                    "options": {k: v for k, v in vars(args).items()
                                if k not in ("ready_fd", "control_fd")},
                }
                if args.count_paths:
                    data["paths"] = dict(self.paths)
                tmp = args.stats_file + ".tmp"
                with open(tmp, "w") as fh:
                    json.dump(data, fh, indent=1, sort_keys=True)
                os.replace(tmp, args.stats_file)

        def _sleep(self, seconds: float) -> None:
            """Sleep *seconds*, correcting for the wake-up overshoot of time.sleep().

            On a loaded VM a 1 ms sleep ends ~0.05-0.3 ms late; the running estimate of
            that overshoot is subtracted so the injected delay averages what was asked.
            """
            deadline = time.perf_counter() + seconds
            ahead = seconds - self.overshoot
            if ahead > 0:
                time.sleep(ahead)
            late = time.perf_counter() - deadline
            # benign race between threads: it is only an estimate
            self.overshoot = min(max(self.overshoot + 0.1 * late, 0.0), seconds / 2)

        def _give_to_caller(self, path: str, fd: Optional[int] = None) -> None:
            """Files created through the mount belong to the caller, not to root."""
            if not self.am_root:
                return
            uid, gid, _pid = mfusepy.fuse_get_context()
            if uid == 0 and gid == 0:
                return
            parent = os.lstat(os.path.dirname(path) or "/")
            if parent.st_mode & stat.S_ISGID:
                gid = -1  # BSD group semantics of a setgid directory: keep inherited group
            if fd is not None:
                os.fchown(fd, uid, gid)
            else:
                os.lchown(path, uid, gid)

        # ---- lifecycle -----------------------------------------------------------
        def init(self, path: str) -> None:
            if args.control_fd is not None:
                self._serve_snapshots(args.control_fd)
            if args.ready_fd is not None:
                with contextlib.suppress(OSError):
                    os.write(args.ready_fd, b"ready\n")
                    os.close(args.ready_fd)

        def destroy(self, path: str) -> None:
            self._write_stats()

        # ---- metadata ------------------------------------------------------------
        def getattr(self, path: str, fh: Optional[int] = None) -> dict:
            self._meta("getattr", path)
            st = os.fstat(fh) if fh is not None else os.lstat(self._p(path))
            return {
                "st_mode": st.st_mode, "st_ino": st.st_ino, "st_nlink": st.st_nlink,
                "st_uid": st.st_uid, "st_gid": st.st_gid, "st_size": st.st_size,
                "st_rdev": st.st_rdev, "st_blksize": st.st_blksize, "st_blocks": st.st_blocks,
                "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns,
            }

        def readlink(self, path: str) -> str:
            self._meta("readlink", path)
            return os.readlink(self._p(path))

        def access(self, path: str, amode: int) -> int:
            self._meta("access", path)
            if not os.access(self._p(path), amode, follow_symlinks=False):
                raise OSError(errno.EACCES, "access denied")
            return 0

        def statfs(self, path: str) -> dict:
            self._meta("statfs", path)
            sv = os.statvfs(self._p(path))
            return {k: getattr(sv, k) for k in (
                "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                "f_favail", "f_flag", "f_namemax")}

        def opendir(self, path: str) -> int:
            self._meta("opendir", path)
            # check it exists and is a readable directory, like the real opendir
            fd = os.open(self._p(path), os.O_RDONLY | os.O_DIRECTORY)
            os.close(fd)
            return 0

        def readdir(self, path: str, fh: int):
            self._meta("readdir", path)
            p = self._p(path)
            # d_ino 0 makes glibc's readdir() skip the entry, so give . and .. real numbers
            entries = [(".", {"st_mode": stat.S_IFDIR, "st_ino": os.lstat(p).st_ino}, 0),
                       ("..", {"st_mode": stat.S_IFDIR, "st_ino": os.lstat(os.path.dirname(p) or "/").st_ino}, 0)]
            with os.scandir(p) as it:
                for entry in it:
                    # d_type only, like getdents: no stat per entry
                    if entry.is_symlink():
                        kind = stat.S_IFLNK
                    elif entry.is_dir(follow_symlinks=False):
                        kind = stat.S_IFDIR
                    elif entry.is_file(follow_symlinks=False):
                        kind = stat.S_IFREG
                    else:
                        try:
                            kind = stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode)
                        except OSError:
                            continue
                    entries.append((entry.name, {"st_mode": kind, "st_ino": entry.inode()}, 0))
            return entries

        def releasedir(self, path: str, fh: int) -> int:
            return 0

        def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
            self._meta("fsyncdir", path)
            fd = os.open(self._p(path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return 0

        def mkdir(self, path: str, mode: int) -> int:
            self._meta("mkdir", path)
            p = self._p(path)
            os.mkdir(p, mode)
            self._give_to_caller(p)
            return 0

        def rmdir(self, path: str) -> int:
            self._meta("rmdir", path)
            os.rmdir(self._p(path))
            return 0

        def mknod(self, path: str, mode: int, dev: int) -> int:
            self._meta("mknod", path)
            p = self._p(path)
            os.mknod(p, mode, dev)
            self._give_to_caller(p)
            return 0

        def unlink(self, path: str) -> int:
            self._meta("unlink", path)
            os.unlink(self._p(path))
            return 0

        def symlink(self, target: str, source: str) -> int:
            # mfusepy: symlink(link_path, link_contents)
            self._meta("symlink", target)
            p = self._p(target)
            os.symlink(source, p)
            self._give_to_caller(p)
            return 0

        def link(self, target: str, source: str) -> int:
            # mfusepy: link(new_path, existing_path)
            self._meta("link", target)
            os.link(self._p(source), self._p(target), follow_symlinks=False)
            return 0

        def rename(self, old: str, new: str, flags: int = 0) -> int:
            self._meta("rename", old)
            if flags:
                fn = _libc.renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                _libc_call(fn(_AT_FDCWD, os.fsencode(self._p(old)), _AT_FDCWD,
                              os.fsencode(self._p(new)), flags), "renameat2", new)
            else:
                os.rename(self._p(old), self._p(new))
            return 0

        def chmod(self, path: str, mode: int) -> int:
            self._meta("chmod", path)
            os.chmod(self._p(path), mode)
            return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            self._meta("chown", path)
            os.lchown(self._p(path), uid, gid)
            return 0

        def truncate(self, path: str, length: int, fh: Optional[int] = None) -> int:
            self._meta("truncate", path)
            if fh is not None:
                os.ftruncate(fh, length)
            else:
                os.truncate(self._p(path), length)
            return 0

        def utimens_raw(self, path: str, times) -> int:
            """times: None (now) or ((a_sec, a_nsec), (m_sec, m_nsec)) incl. UTIME_NOW/OMIT."""
            self._meta("utimens", path)
            p = self._p(path)
            if times is None:
                ts = None
            else:
                ts = (_Timespec * 2)(_Timespec(*times[0]), _Timespec(*times[1]))
            fn = _libc.utimensat
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
            _libc_call(fn(_AT_FDCWD, os.fsencode(p), ts, _AT_SYMLINK_NOFOLLOW), "utimensat", p)
            return 0

        # present so that mfusepy registers the callback; _FUSE routes it to utimens_raw
        def utimens(self, path: str, times=None) -> int:
            raise OSError(errno.ENOSYS, "use utimens_raw")

        # ---- files ---------------------------------------------------------------
        def open(self, path: str, flags: int) -> int:
            self._meta("open", path)
            return os.open(self._p(path), flags & ~os.O_CREAT)

        def create(self, path: str, mode: int, flags: int) -> int:
            self._meta("create", path)
            p = self._p(path)
            fd = os.open(p, flags | os.O_CREAT, mode)
            try:
                self._give_to_caller(p, fd)
            except OSError:
                os.close(fd)
                raise
            return fd

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            data = os.pread(fh, size, offset)
            self._data("read", len(data), self.read_s, self.read_bw, path)
            return data

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            self._data("write", len(data), self.write_s, self.write_bw, path)
            return os.pwrite(fh, data, offset)

        def flush(self, path: str, fh: int) -> int:
            # close(2) semantics for this file descriptor without closing our handle
            os.close(os.dup(fh))
            return 0

        def release(self, path: str, fh: int) -> int:
            os.close(fh)
            return 0

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            self._meta("fsync", path)
            if datasync:
                os.fdatasync(fh)
            else:
                os.fsync(fh)
            return 0

    if args.xattrs:
        def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
            self._meta("getxattr", path)
            return os.getxattr(self._p(path), name, follow_symlinks=False)

        def listxattr(self, path: str):
            self._meta("listxattr", path)
            return os.listxattr(self._p(path), follow_symlinks=False)

        def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
            self._meta("setxattr", path)
            os.setxattr(self._p(path), name, value, options, follow_symlinks=False)
            return 0

        def removexattr(self, path: str, name: str) -> int:
            self._meta("removexattr", path)
            os.removexattr(self._p(path), name, follow_symlinks=False)
            return 0

        for fn in (getxattr, listxattr, setxattr, removexattr):
            setattr(SlowFS, fn.__name__, fn)

    class _FUSE(mfusepy.FUSE):
        """mfusepy.FUSE with two libfuse3 callbacks fixed for passthrough use."""

        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
            # mfusepy drops the RENAME_NOREPLACE/RENAME_EXCHANGE flags; forward them
            return self.operations.rename(old.decode(self.encoding, self.errors),
                                          new.decode(self.encoding, self.errors), flags)

        def utimens_fuse_3(self, path, buf, fip) -> int:
            # mfusepy folds UTIME_NOW/UTIME_OMIT into nanoseconds; keep them raw
            times = None
            if buf:
                a, m = buf.contents.actime, buf.contents.modtime
                times = ((a.tv_sec, a.tv_nsec), (m.tv_sec, m.tv_nsec))
            return self.operations.utimens_raw(path.decode(self.encoding, self.errors), times)

    return SlowFS(), _FUSE


def _watch_parent(parent_pid: int, mountpoint: str) -> None:
    """If the process that started us dies without unmounting (SIGKILL, crash), unmount.

    A lazy unmount ends the FUSE session once the last user is gone, which makes
    fuse_main return, so no orphaned slowfs process or dead mount is left behind.
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        unmount(mountpoint, lazy=True)

    threading.Thread(target=watch, name="slowfs-parent-watch", daemon=True).start()


def run_filesystem(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="slowfs[%(process)d] %(levelname)s %(name)s: %(message)s")
    try:
        ops, fuse_cls = make_operations(args)
    except OSError as exc:  # libfuse missing
        sys.stderr.write(f"slowfs: cannot load libfuse: {exc}\n")
        return 2
    os.umask(0)  # the kernel already applied the caller's umask to create/mkdir modes
    # Default timer slack (50 us) makes a 1 ms sleep take ~1.1 ms; the worker threads
    # libfuse starts inherit this setting.  PR_SET_TIMERSLACK = 29.
    with contextlib.suppress(Exception):
        _libc.prctl(29, 1, 0, 0, 0)
    options = dict(
        fsname=f"slowfs:{os.path.realpath(args.source)}",
        subtype=FSTYPE_SUBTYPE,
        default_permissions=True,  # kernel checks modes/ownership as for the caller
        use_ino=True,  # st_ino from the source (hardlinks show the same inode number)
        attr_timeout=args.attr_timeout,
        entry_timeout=args.entry_timeout,
        negative_timeout=args.negative_timeout,
        foreground=args.foreground,
        nothreads=args.single_thread,
        debug=args.debug,
    )
    if args.data_cache == "always":
        options["kernel_cache"] = True
    elif args.data_cache == "auto":
        options["auto_cache"] = True
    if args.allow_other:
        options["allow_other"] = True
    if not args.single_thread:
        options["max_threads"] = args.max_threads
        options["max_idle_threads"] = args.max_threads
    if args.auto_unmount and _find_fusermount():
        options["auto_unmount"] = True
    if args.parent_pid and args.foreground:
        _watch_parent(args.parent_pid, args.mountpoint)
    try:
        fuse_cls(ops, args.mountpoint, **options)
    except RuntimeError as exc:
        code = exc.args[0] if exc.args else None
        if code == 8:
            # fuse_main_real() returns 8 when its loop ended on SIGTERM/SIGINT/SIGHUP (or a
            # loop error); the filesystem has been unmounted and destroy() has run.
            sys.stderr.write("slowfs: session loop ended by a signal (libfuse code 8); unmounted\n")
            return 0
        sys.stderr.write(f"slowfs: fuse_main failed with code {code} "
                         "(libfuse3: 1 = bad options, 4 = mount failed); see the messages above\n")
        return 1
    return 0


# --------------------------------------------------------------------------------------
# measurements (python benchmarks/slowfs.py --measure)
# --------------------------------------------------------------------------------------


def _copy_python_prefix(dest: str) -> str:
    """A relocatable copy of this Debian CPython: bin/python3.X + lib/python3.X."""
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    exe = os.path.realpath(f"/usr/bin/{ver}")
    stdlib = os.path.join(sys.base_prefix, "lib", ver)
    os.makedirs(os.path.join(dest, "bin"))
    shutil.copy2(exe, os.path.join(dest, "bin", ver))
    os.symlink(ver, os.path.join(dest, "bin", "python3"))
    shutil.copytree(stdlib, os.path.join(dest, "lib", ver), symlinks=True,
                    ignore=shutil.ignore_patterns("site-packages", "dist-packages", "test", "__pycache__"))
    # byte-compile like an installed env (conda envs ship .pyc files)
    subprocess.run([os.path.join(dest, "bin", ver), "-m", "compileall", "-q", "-j0",
                    os.path.join(dest, "lib", ver)], check=False, stdout=subprocess.DEVNULL)
    return os.path.join(dest, "bin", "python3")


def measure(rounds: int = 3, nstat: int = 1000, latencies: Sequence[float] = (0.0, 1.0),
            python_code: str = "import json, email, http.client") -> dict:
    """Direct vs. slowfs: os.stat latency and the start-up of a Python copied onto the source."""
    import statistics

    def timed(fn, *a) -> float:
        t0 = time.perf_counter()
        fn(*a)
        return time.perf_counter() - t0

    def stats_loop(paths: Sequence[str]) -> None:
        for _ in range(max(1, nstat // len(paths))):
            for p in paths:
                os.stat(p)

    def run_py(exe: str, n: int = 1) -> None:
        procs = [subprocess.Popen([exe, "-s", "-E", "-c", python_code]) for _ in range(n)]
        if any(p.wait() for p in procs):
            raise SlowFSError(f"{exe} -c {python_code!r} failed")

    results: dict = {"python_code": python_code, "machine_cpus": os.cpu_count()}
    base = tempfile.mkdtemp(prefix="slowfs-measure-")
    try:
        os.chmod(base, 0o755)
        src, mnt = os.path.join(base, "src"), os.path.join(base, "mnt")
        os.makedirs(os.path.join(src, "d"))
        files = []
        for i in range(100):
            files.append(os.path.join(src, "d", f"f{i}"))
            with open(files[-1], "w") as fh:
                fh.write("x")
        py = _copy_python_prefix(os.path.join(src, "py"))

        def one_config(root: str, py_exe: str) -> dict:
            where = [os.path.join(root, os.path.relpath(p, src)) for p in files]
            run_py(py_exe)  # warm the local page cache
            n_root = max(1, nstat // 10)
            return {
                "stat_root_us": 1e6 * min(timed(lambda: [os.stat(root) for _ in range(n_root)])
                                          for _ in range(rounds)) / n_root,
                "stat_d_f_us": 1e6 * min(timed(stats_loop, where) for _ in range(rounds))
                / (max(1, nstat // len(files)) * len(files)),
                "python_s": statistics.median(timed(run_py, py_exe) for _ in range(rounds)),
                "python_x4_parallel_s": statistics.median(timed(run_py, py_exe, 4) for _ in range(rounds)),
            }

        results["direct"] = one_config(src, py)
        for lat in latencies:
            with mounted(src, mnt, meta_latency_ms=lat):
                results[f"slowfs_{lat:g}ms"] = one_config(mnt, os.path.join(mnt, os.path.relpath(py, src)))
        with mounted(src, mnt, meta_latency_ms=0) as m:  # requests of one start, alone
            run_py(os.path.join(mnt, os.path.relpath(py, src)))
        results["requests_per_python_start"] = (m.stats or {}).get("counts", {})
        with mounted(src, mnt, meta_latency_ms=0) as m:
            os.stat(os.path.join(mnt, "d", "f0"))
        results["requests_per_stat_d_f"] = (m.stats or {}).get("counts", {})
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return results


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="slowfs.py",
        description="FUSE passthrough mirror of SOURCE at MOUNTPOINT with injected latency "
                    "(a simulated slow shared filesystem).",
    )
    ap.add_argument("source", nargs="?", help="directory to mirror")
    ap.add_argument("mountpoint", nargs="?", help="where to mount it")
    ap.add_argument("--meta-latency-ms", type=float, default=1.0,
                    help="sleep before every metadata request (default 1.0)")
    ap.add_argument("--read-latency-ms", type=float, default=0.0,
                    help="sleep before every read request (<=128 KiB each; default 0)")
    ap.add_argument("--write-latency-ms", type=float, default=0.0,
                    help="sleep before every write request (default 0)")
    ap.add_argument("--read-bandwidth-mbps", type=float, default=0.0,
                    help="cap reads at this many MB/s, shared by all threads (0 = no cap)")
    ap.add_argument("--write-bandwidth-mbps", type=float, default=0.0,
                    help="cap writes at this many MB/s, shared by all threads (0 = no cap)")
    ap.add_argument("--attr-timeout", type=float, default=0.0,
                    help="seconds the kernel may cache attributes (default 0: every stat reaches slowfs)")
    ap.add_argument("--entry-timeout", type=float, default=0.0,
                    help="seconds the kernel may cache name lookups (default 0)")
    ap.add_argument("--negative-timeout", type=float, default=0.0,
                    help="seconds the kernel may cache 'no such file' (default 0)")
    ap.add_argument("--data-cache", choices=("none", "auto", "always"), default="none",
                    help="kernel page cache across opens: none (default, re-read on every open), "
                         "auto (keep while mtime/size unchanged, like NFS), always")
    ap.add_argument("--foreground", "-f", action="store_true", help="do not daemonize")
    ap.add_argument("--allow-other", action="store_true",
                    help="let other users use the mount (root, or user_allow_other in /etc/fuse.conf)")
    ap.add_argument("--max-threads", type=int, default=16,
                    help="libfuse worker threads, i.e. requests served concurrently (default 16)")
    ap.add_argument("--single-thread", action="store_true", help="serve one request at a time")
    ap.add_argument("--xattrs", action="store_true",
                    help="pass extended attributes through (off: ENOTSUP, and no per-write "
                         "security.capability lookups)")
    ap.add_argument("--no-auto-unmount", dest="auto_unmount", action="store_false",
                    help="do not ask fusermount3 to unmount if this process dies")
    ap.add_argument("--stats-file", help="write per-operation counts as JSON here at unmount")
    ap.add_argument("--count-paths", action="store_true",
                    help="also count requests per operation, path and calling command (stats "
                         "file: 'paths')")
    ap.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--control-fd", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--parent-pid", type=int,
                    help="(foreground) lazily unmount when this process, our parent, has died")
    ap.add_argument("--debug", "-d", action="store_true", help="libfuse debug output (foreground)")
    ap.add_argument("--measure", action="store_true",
                    help="instead of mounting: measure stat and python startup direct vs. slowfs")
    args = ap.parse_args(argv)
    if not args.measure and (not args.source or not args.mountpoint):
        ap.error("SOURCE and MOUNTPOINT are required")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.measure:
        reason = fuse_unavailable_reason()
        if reason:
            sys.stderr.write(f"slowfs: cannot measure: {reason}\n")
            return 2
        print(json.dumps(measure(), indent=1))
        return 0
    if not os.path.isdir(args.source):
        sys.stderr.write(f"slowfs: source {args.source!r} is not a directory\n")
        return 2
    if not os.path.isdir(args.mountpoint):
        sys.stderr.write(f"slowfs: mountpoint {args.mountpoint!r} is not a directory\n")
        return 2
    args.source = os.path.abspath(args.source)
    args.mountpoint = os.path.abspath(args.mountpoint)
    if args.stats_file:
        args.stats_file = os.path.abspath(args.stats_file)
    return run_filesystem(args)


if __name__ == "__main__":
    sys.exit(main())
