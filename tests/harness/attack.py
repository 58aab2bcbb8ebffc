"""Helpers of the adversarial suite (tests/test_attack_slurm.py, tests/test_attack_sge.py).

The suite plays an ordinary cluster user with bad intent (``csmallory``)
against the root hooks, and checks *effects*, not messages alone:

* :class:`Proof` -- a world-writable folder that evil scripts (and the evil
  shared object :func:`evil_so`) drop a file into whenever they run, named
  ``TAG.<uid>.<pid>.<ns>``: a file with uid 0 means root ran the
  attacker's code, one with the victim's uid means the victim did;
* :class:`Watch` -- snapshots of sensitive places (``/etc``, ``/root``'s
  entries, the victim's and the attacker's homes, the test base, the
  staging area's parent) taken before and compared after a job: root must
  have created, changed, chowned or deleted nothing there;
* :class:`RssSampler` -- peak resident memory of the hooks' Python
  processes (root's and the forked job-user child) while a prolog runs;
* tarball crafting (:func:`write_tarball` and the ``*_tar`` builders): a
  real environment is packed by the real ``conda stage``, then its tarball
  is replaced by a hostile one and the sidecar's ``size``/``mtime_ns`` are
  rewritten to match, so that only the archive's content is hostile (a
  benign re-craft must still stage: :func:`recraft_benign` is the control);
* FIFOs where user files belong (:func:`make_fifo`,
  :func:`release_fifo_readers`), a lock held forever by the attacker's own
  process (:class:`LockHolder`), small tmpfs staging filesystems
  (:func:`small_tmpfs`);
* parsing what a job printed (:func:`job_values`, :func:`job_env`,
  :func:`stage_lines`, :func:`one_line`).

PYTEST_DONT_REWRITE is not set: the test modules register this module for
assertion rewriting before importing it.
"""
from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .envs import EnabledEnv, enable_env, remove_env
from .users import TEST_BASE, User, ensure_user

ATTACKER_NAME = "csmallory"
VICTIM_NAME = "csvictim"   # its own user: a failing product may empty the victim's home
ATTACK_BASE = TEST_BASE / "attack"          # root-owned: evil.so, hard-link targets
PROOF_DIR = TEST_BASE / "attack-proof"      # 1777: evil code leaves its uid here
SANE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EVIL_TOOLS = ("qstat", "qalter", "qhold", "qmod", "qconf", "qrls", "scontrol", "squeue", "sinfo",
              "python", "python3", "bash", "env", "mkdir", "rm", "chown", "chmod", "cat", "sed",
              "grep", "hostname", "getent", "runuser", "su", "sudo", "flock", "ps", "pgrep",
              "kill", "tar", "zstd", "conda", "stat", "ls", "mv", "cp", "find", "logger",
              "setpriv", "install", "mount", "umount", "id", "test")
MAX_PROLOG_RSS = 300 << 20
SLACK = 15.0   # seconds a job may take beyond the prolog budget to start (scheduling)


@dataclass(frozen=True)
class Cast:
    attacker: User
    victim: User


def cast() -> Cast:
    return Cast(ensure_user(ATTACKER_NAME), ensure_user(VICTIM_NAME))


def chown(path: Path | str, user: User) -> None:
    os.lchown(path, user.uid, user.gid)


def write_as(path: Path, data: bytes | str, user: User, mode: int = 0o644) -> Path:
    """Write ``path`` (replacing whatever is there) as if ``user`` had."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists() and not path.is_dir():
        path.unlink()
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)
    chown(path, user)
    return path


def user_dir(path: Path, user: User, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    chown(path, user)
    return path


# ----------------------------------------------------------------- proof
@dataclass(frozen=True)
class ProofRecord:
    tag: str
    uid: int
    path: Path

    @property
    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace").strip()
        except OSError:
            return ""


class Proof:
    """The folder evil code writes into.  ``cmd(tag)`` is a shell line that
    records who ran it; nothing else writes here."""

    def __init__(self, folder: Path = PROOF_DIR):
        self.dir = folder

    def reset(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        os.chmod(self.dir, 0o1777)

    def cmd(self, tag: str) -> str:
        return (f'/usr/bin/id > "{self.dir}/{tag}.$(/usr/bin/id -u).$$.$(/usr/bin/date +%s%N)" '
                f'2>/dev/null')

    def records(self) -> list[ProofRecord]:
        out = []
        for p in sorted(self.dir.iterdir()) if self.dir.is_dir() else []:
            m = re.fullmatch(r"([^.]+)\.(\d+)\.\d+\.\d+", p.name)
            if m:
                out.append(ProofRecord(m.group(1), int(m.group(2)), p))
            else:   # something else appeared: count it as root's if root owns it
                out.append(ProofRecord(f"?{p.name}", os.lstat(p).st_uid, p))
        return out

    def ran_as(self, uid: int) -> list[str]:
        return [f"{r.tag} ({r.text})" for r in self.records() if r.uid == uid]

    def tags(self) -> set[str]:
        return {r.tag for r in self.records()}


def evil_script(path: Path, tag: str, owner: User, proof: Proof, *, real: str | None = None,
                sourced: bool = False) -> Path:
    """A script that leaves a proof and then execs ``real`` (so that the
    attacker's own job keeps working) or exits 0.  ``sourced``: no shebang,
    no exec (for BASH_ENV / a sourced defaults file)."""
    lines = [] if sourced else ["#!/bin/sh"]
    lines.append(proof.cmd(tag))
    if not sourced:
        lines.append(f'exec {real} "$@"' if real else "exit 0")
    return write_as(path, "\n".join(lines) + "\n", owner, 0o755)


def evil_tool_dir(folder: Path, owner: User, proof: Proof) -> Path:
    """A folder of evil ``qstat``, ``scontrol``, ``python``, ... for PATH."""
    user_dir(folder, owner)
    for name in EVIL_TOOLS:
        real = shutil.which(name, path=SANE_PATH)
        evil_script(folder / name, f"path-{name}", owner, proof, real=real)
    return folder


_EVIL_C = r"""
#include <stdio.h>
#include <time.h>
#include <unistd.h>
__attribute__((constructor)) static void cs_evil(void) {
    char path[1024];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    snprintf(path, sizeof path, "%s/ldpreload.%d.%d.%ld%09ld", PROOF, (int)getuid(), (int)getpid(),
             (long)ts.tv_sec, (long)ts.tv_nsec);
    FILE *f = fopen(path, "w");
    if (f) { fprintf(f, "uid=%d euid=%d\n", (int)getuid(), (int)geteuid()); fclose(f); }
}
"""


def evil_so(proof: Proof) -> Path:
    """A shared object whose constructor leaves a proof ``ldpreload.<uid>...``
    (world-readable, for LD_PRELOAD)."""
    ATTACK_BASE.mkdir(parents=True, exist_ok=True)
    os.chmod(ATTACK_BASE, 0o755)
    src = ATTACK_BASE / "evil.c"
    out = ATTACK_BASE / "evil.so"
    code = _EVIL_C.replace("PROOF", json.dumps(str(proof.dir)))
    if not out.exists() or not src.exists() or src.read_text() != code:
        src.write_text(code)
        subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(out), str(src)], check=True,
                       capture_output=True, timeout=120)
        os.chmod(out, 0o755)
    return out


# ----------------------------------------------------------------- snapshots
def _entry(st: os.stat_result, path: str, meta_only: bool):
    kind = stat.S_IFMT(st.st_mode)
    base = (kind, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
    if meta_only or stat.S_ISDIR(st.st_mode):
        return base
    if stat.S_ISLNK(st.st_mode):
        return base + (os.readlink(path),)
    return base + (st.st_size, st.st_mtime_ns, st.st_ino, st.st_nlink)


@dataclass
class Place:
    """One sensitive place: ``top`` walked ``depth`` levels deep (None: all),
    without following symlinks.  ``meta_only`` compares kind, owner and mode
    (and presence) only; ``skip(path)`` leaves a path (and what is under it)
    out; ``may_appear(path)`` allows a new entry there."""

    top: Path
    depth: int | None = None
    meta_only: bool = False
    skip: Callable[[str], bool] = lambda p: False
    may_appear: Callable[[str], bool] = lambda p: False
    shared: bool = False   # others work here as root: only users' entries and attack names count

    def state(self) -> dict:
        out: dict = {}
        top = str(self.top)
        try:
            out[top] = _entry(os.lstat(top), top, self.meta_only)
        except FileNotFoundError:
            return out
        if not stat.S_ISDIR(os.lstat(top).st_mode):
            return out

        def walk(folder: str, level: int):
            try:
                names = os.listdir(folder)
            except OSError:
                return
            for name in names:
                p = os.path.join(folder, name)
                if self.skip(p):
                    continue
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                out[p] = _entry(st, p, self.meta_only)
                if stat.S_ISDIR(st.st_mode) and (self.depth is None or level < self.depth):
                    walk(p, level + 1)
        walk(top, 1)
        return out


class Watch:
    """Snapshots of several places; ``changes(before)`` lists what differs."""

    def __init__(self, places: list[Place]):
        self.places = places

    def take(self) -> list[dict]:
        return [p.state() for p in self.places]

    def changes(self, before: list[dict]) -> list[str]:
        after = self.take()
        out = []
        for place, b, a in zip(self.places, before, after):
            for p in sorted(set(b) | set(a)):
                if (place.shared and p != str(place.top)
                        and not _counts_in_shared(p, b.get(p), a.get(p))):
                    continue
                if p not in a:
                    out.append(f"deleted: {p} {b[p]}")
                elif p not in b:
                    if not place.may_appear(p):
                        out.append(f"created: {p} {a[p]}")
                elif a[p] != b[p]:
                    out.append(f"changed: {p} {b[p]} -> {a[p]}")
        return out


ATTACK_NAMES = re.compile(r"cs-evil|cs-attack|ldpreload")


def _counts_in_shared(path: str, before, after) -> bool:
    """In a folder where other people work as root at the same time (/tmp):
    an entry counts if a non-root user owned it before or after (root
    chowned, changed or deleted a user's file) or if its name is one the
    attacker chose."""
    owners = {e[1] for e in (before, after) if e is not None}
    return bool(owners - {0}) or bool(ATTACK_NAMES.search(os.path.basename(path)))


def _noise_tmp(p: str) -> bool:
    name = os.path.basename(p)
    return bool(re.match(r"(tmp|pytest-of-|hypothesis|conda-stage-bootstrap|\.X|systemd-)", name)
                or re.fullmatch(r"\d+\.\d+\.[\w.-]+", name))   # SGE job TMPDIRs


def sensitive_places(cast: Cast, staging: Path, *, extra: Iterable[Place] = (),
                     volatile: Iterable[Path] = ()) -> Watch:
    """/etc; /root's entries; both users' homes; the test base's entries;
    the staging area's parent (``staging`` itself and the folders leading
    to it may appear: the prolog makes them)."""
    volatile = {str(v) for v in volatile}
    staging = Path(staging)
    chain = {str(p) for p in [staging, *staging.parents]}
    parent = staging.parent
    places = [
        Place(Path("/etc"), skip=lambda p: p.startswith("/etc/default/conda-stage")),
        Place(Path("/root"), depth=1, meta_only=True, shared=True),
        Place(cast.victim.home),
        Place(cast.attacker.home, skip=lambda p: "/.conda/pkgs/" in p),
        Place(TEST_BASE, depth=1, meta_only=True,
              skip=lambda p: p in volatile or p == str(PROOF_DIR) or p == str(staging)),
        Place(parent, depth=1, meta_only=True,
              skip=lambda p: p == str(staging) or p in volatile or
              (str(parent) == "/tmp" and _noise_tmp(p)),
              may_appear=lambda p: p in chain, shared=str(parent) == "/tmp"),
    ]
    if str(parent) != "/tmp":
        places.append(Place(Path("/tmp"), depth=1, meta_only=True, skip=_noise_tmp, shared=True))
    places += list(extra)
    return Watch(places)


# ----------------------------------------------------------------- memory
class RssSampler:
    """Peak RSS of the hooks' Python processes while the ``with`` block
    runs: processes running ``-m conda_stage...`` (root's prolog and its
    forked job-user child) and any Python of ``uids``."""

    def __init__(self, uids: Iterable[int] = (), interval: float = 0.03):
        self.uids = set(uids)
        self.interval = interval
        self.peak = 0
        self.peak_what = ""
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._me = os.getpid()

    def _match(self, info) -> bool:
        cmd = info.get("cmdline") or []
        if any(a.startswith("conda_stage") for a in cmd[:4]):
            return True
        uids = info.get("uids")
        name = info.get("name") or ""
        return bool(uids) and uids.real in self.uids and name.startswith("python")

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            for proc in psutil.process_iter(["pid", "name", "cmdline", "uids", "memory_info"]):
                info = proc.info
                if info["pid"] == self._me or not info.get("memory_info"):
                    continue
                try:
                    if self._match(info):
                        self.samples += 1
                        rss = info["memory_info"].rss
                        if rss > self.peak:
                            self.peak = rss
                            self.peak_what = f"pid {info['pid']} uid {info['uids'].real}: " \
                                             f"{' '.join((info['cmdline'] or [])[:4])}"
                except Exception:  # noqa: BLE001 - a process that just exited
                    continue
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


# ----------------------------------------------------------------- environments
@contextlib.contextmanager
def attack_envs(site, stage_bin: Path, cast: Cast, prefix: str):
    """Small auto-stage-enabled environments (prefix-probe only): the
    attacker's ``one`` and ``two``, the victim's ``vic``; names start with
    ``prefix``.  Removed afterwards."""
    made: dict[str, tuple[User, EnabledEnv]] = {}
    try:
        for key, user in (("one", cast.attacker), ("two", cast.attacker), ("vic", cast.victim)):
            made[key] = (user, enable_env(site, user, stage_bin, f"{prefix}-{key}",
                                          packages=("prefix-probe",)))
        yield {k: e for k, (_u, e) in made.items()}
    finally:
        for user, env in made.values():
            with contextlib.suppress(Exception):
                remove_env(site, user, env)


def sidecar_path(env: EnabledEnv) -> Path:
    return env.prefix.parent / f"{env.name}.conda-stage.json"


def lock_path(env: EnabledEnv) -> Path:
    return env.prefix.parent / f".{env.name}.conda-stage.lock"


@dataclass
class SavedFiles:
    files: dict = field(default_factory=dict)   # path -> (bytes | None, stat | None)


def save_env_files(env: EnabledEnv) -> SavedFiles:
    saved = SavedFiles()
    for p in (env.tarball, sidecar_path(env), lock_path(env)):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            saved.files[p] = (None, None)
            continue
        saved.files[p] = (p.read_bytes() if stat.S_ISREG(st.st_mode) else None, st)
    return saved


def restore_env_files(saved: SavedFiles) -> None:
    """Put tarball, sidecar and lock file back exactly (content, owner,
    mode, times), whatever the test left there (FIFOs included)."""
    for p, (data, st) in saved.files.items():
        if os.path.lexists(p):
            os.unlink(p)
        if st is None or data is None or not p.parent.is_dir():
            continue   # (a folder gone with its owner's home: nothing to put back)
        p.write_bytes(data)
        os.chown(p, st.st_uid, st.st_gid)
        os.chmod(p, stat.S_IMODE(st.st_mode))
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


# ----------------------------------------------------------------- tarballs
def original_tar(env: EnabledEnv) -> bytes:
    """The decompressed tar of ``env``'s (real, packed) tarball."""
    import zstandard

    with open(env.tarball, "rb") as fh:
        return zstandard.ZstdDecompressor().stream_reader(fh).read()


def tar_layout(tar: bytes) -> tuple[list[int], int]:
    """Header offsets of the members and the offset where the end-of-archive
    marker starts."""
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        members = tf.getmembers()
        end = tf.offset
    return [m.offset for m in members], end


def body_of(tar: bytes) -> bytes:
    """The members of ``tar`` without its end-of-archive marker."""
    return tar[:tar_layout(tar)[1]]


EOF_BLOCKS = b"\0" * 1024


def header(name: str, *, kind: bytes = tarfile.REGTYPE, size: int = 0, linkname: str = "",
           mode: int = 0o644) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.linkname, ti.mode, ti.mtime = kind, size, linkname, mode, 1_700_000_000
    return ti.tobuf(format=tarfile.PAX_FORMAT)


def file_member(name: str, data: bytes = b"", mode: int = 0o644) -> bytes:
    return header(name, size=len(data), mode=mode) + data + b"\0" * (-len(data) % 512)


def write_tarball(env: EnabledEnv, owner: User, chunks: Iterable[bytes] | None = None, *,
                  raw: bytes | None = None, sidecar: dict | None = None,
                  sidecar_edit: Callable[[dict], None] | None = None) -> int:
    """Replace ``env``'s tarball by the zstd of ``chunks`` (or by ``raw``
    bytes as they are), then rewrite its sidecar's size and mtime_ns to
    match (plus ``sidecar`` updates / ``sidecar_edit``).  Returns the size."""
    import zstandard

    tmp = env.tarball.with_name(env.tarball.name + ".craft")
    with open(tmp, "wb") as fh:
        if raw is not None:
            fh.write(raw)
        else:
            writer = zstandard.ZstdCompressor(level=3).stream_writer(fh, closefd=False)
            for chunk in chunks or ():
                writer.write(chunk)
            writer.flush(zstandard.FLUSH_FRAME)
            writer.close()
    os.chmod(tmp, 0o644)
    chown(tmp, owner)
    os.replace(tmp, env.tarball)
    st = os.stat(env.tarball)
    edit_sidecar(env, owner, size=st.st_size, mtime_ns=st.st_mtime_ns, **(sidecar or {}))
    if sidecar_edit is not None:
        meta = json.loads(sidecar_path(env).read_text())
        sidecar_edit(meta)
        write_as(sidecar_path(env), json.dumps(meta, indent=1), owner)
    return st.st_size


def edit_sidecar(env: EnabledEnv, owner: User, **updates) -> dict:
    path = sidecar_path(env)
    meta = json.loads(path.read_text())
    meta.update(updates)
    write_as(path, json.dumps(meta, indent=1), owner)
    return meta


def recraft_benign(env: EnabledEnv, owner: User) -> None:
    """The control: the same crafting, with the original content."""
    write_tarball(env, owner, [original_tar(env)])


def bomb_chunks(tar: bytes, *, declared: int = 1 << 43, actual: int = 640 << 20) -> Iterator[bytes]:
    """A regular file whose pax header declares ``declared`` bytes, followed
    by ``actual`` zero bytes (a few KB compressed) and no end of archive."""
    yield body_of(tar)
    yield header("share/cs-bomb.bin", size=declared)
    zeros = bytes(1 << 20)
    for _ in range(actual >> 20):
        yield zeros


def huge_sidecar(env: EnabledEnv, owner: User, *, records: int = 499_990,
                 total: int = 64_000_000) -> int:
    """Rewrite ``env``'s sidecar (tarball unchanged and still matching) with
    ``records`` well-formed prefix records padding it to about ``total``
    bytes: the most a sidecar may plausibly hold, parsed by the prolog."""
    meta = json.loads(sidecar_path(env).read_text())
    meta["records"] = []
    fixed = len(json.dumps(meta, separators=(",", ":")))
    per = (total - fixed) // records - len(json.dumps(["", "/", "text"])) - 1
    a = max(8, per // 2)
    b = max(2, per - a)
    meta["records"] = [["l" * (a - 7) + f"{i:07d}", "/" + "p" * (b - 1), "text"]
                       for i in range(records)]
    data = json.dumps(meta, separators=(",", ":"))
    write_as(sidecar_path(env), data, owner)
    return len(data)


def chain_members(outside: Path, depth: int = 12) -> bytes:
    """``s1 -> .``, ``s2 -> s1/..``, ``s3 -> s2/..`` ... (each link checked
    alone stays inside; on disk ``s{depth}`` is ``/`` from any folder less
    than ``depth`` deep), then a hard link through the chain to ``outside``
    and a symlink through it to the same file."""
    out = [header("s1", kind=tarfile.SYMTYPE, linkname=".")]
    for i in range(2, depth + 1):
        out.append(header(f"s{i}", kind=tarfile.SYMTYPE, linkname=f"s{i - 1}/.."))
    rel = str(outside).lstrip("/")
    out.append(header("share/cs-hardlink", kind=tarfile.LNKTYPE, linkname=f"s{depth}/{rel}"))
    out.append(header("share/cs-symlink", kind=tarfile.SYMTYPE, linkname=f"../s{depth}/{rel}"))
    out.append(file_member("share/cs-after", b"after\n"))
    return b"".join(out)


def truncated_at_header(tar: bytes, keep: float = 0.5) -> bytes:
    """``tar`` cut exactly where a member's header starts (no end marker)."""
    offsets, _end = tar_layout(tar)
    cut = offsets[max(1, int(len(offsets) * keep))]
    assert cut % 512 == 0 and 0 < cut < len(tar)
    return tar[:cut]


def truncated_frame(tar: bytes, keep: float = 0.6) -> bytes:
    """The zstd of the complete ``tar``, cut inside the frame."""
    import zstandard

    data = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(tar)
    return data[:int(len(data) * keep)]


def filler_chunks(tar: bytes, *, files: int = 0, big: int = 0) -> Iterator[bytes]:
    """The real members plus ``files`` empty files and one ``big``-byte file."""
    yield body_of(tar)
    for i in range(files):
        yield file_member(f"share/cs-many/f{i:05d}")
    if big:
        yield header("share/cs-big.bin", size=big)
        zeros = bytes(1 << 20)
        left = big
        while left:
            n = min(left, len(zeros))
            yield zeros[:n]
            left -= n
        yield b"\0" * (-big % 512)
    yield EOF_BLOCKS


# ----------------------------------------------------------------- blocking things
def make_fifo(path: Path, owner: User) -> Path:
    if os.path.lexists(path):
        os.unlink(path)
    os.mkfifo(path, 0o644)
    chown(path, owner)
    return path


def release_fifo_readers(path: Path, seconds: float = 1.5) -> int:
    """Give every process blocked opening/reading the FIFO ``path`` an EOF
    (open it for writing, close it), for ``seconds``; returns how often."""
    n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno not in (errno.ENXIO, errno.ENOENT):
                raise
            time.sleep(0.05)
            continue
        os.close(fd)
        n += 1
        time.sleep(0.05)
    return n


_LOCK_HOLDER = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.lockf(fd, fcntl.LOCK_EX)    # POSIX record lock (what NFS forwards)
fcntl.flock(fd, fcntl.LOCK_EX)    # and a BSD lock: whichever the product takes
print("locked", flush=True)
time.sleep(3600)
"""


class LockHolder:
    """The attacker's own process holding ``path`` locked (lockf and flock,
    exclusive) until :meth:`stop`."""

    def __init__(self, user: User, path: Path):
        self.user, self.path = user, Path(path)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "LockHolder":
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _LOCK_HOLDER, str(self.path)],
            user=self.user.uid, group=self.user.gid, extra_groups=[],
            env={"PATH": SANE_PATH, "HOME": str(self.user.home)}, cwd="/",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        line = self.proc.stdout.readline()
        if line.strip() != "locked":
            self.stop()
            raise RuntimeError(f"lock holder failed: {line!r} {self.proc.stderr.read()!r}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


_RACER = r"""
import os, sys, time
base, decoy, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
real = base + ".real"
end = time.time() + seconds
swaps = 0
while time.time() < end:
    try:
        os.rename(base, real)            # root's folder out of the way ...
    except OSError:
        time.sleep(0.0005)
        continue
    try:
        os.symlink(decoy, base)          # ... a symlink in its place ...
        os.unlink(base)
    except OSError:
        pass
    try:
        os.rename(real, base)            # ... and back
    except OSError:
        pass
    swaps += 1
print(swaps, flush=True)
"""


class Racer:
    """The attacker's process swapping ``base`` (in a folder the attacker
    can write) with a symlink to ``decoy`` as fast as it can."""

    def __init__(self, user: User, base: Path, decoy: Path, seconds: float = 120):
        self.user, self.base, self.decoy, self.seconds = user, Path(base), Path(decoy), seconds
        self.proc: subprocess.Popen | None = None
        self.swaps = None

    def start(self) -> "Racer":
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _RACER, str(self.base), str(self.decoy),
             str(self.seconds)],
            user=self.user.uid, group=self.user.gid, extra_groups=[],
            env={"PATH": SANE_PATH}, cwd="/", stdout=subprocess.PIPE, text=True,
            start_new_session=True)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            out, _ = self.proc.communicate(timeout=10)
            self.swaps = out.strip() or None
            self.proc = None
        real = Path(str(self.base) + ".real")
        if self.base.is_symlink():
            self.base.unlink()
        if real.exists() and not os.path.lexists(self.base):
            os.rename(real, self.base)


# ----------------------------------------------------------------- small filesystems
@contextlib.contextmanager
def small_tmpfs(path: Path, *, size: str = "64m", nr_inodes: int | None = None):
    """A root-owned (0755) tmpfs at ``path`` for the ``with`` block."""
    path.mkdir(parents=True, exist_ok=True)
    if os.path.ismount(path):
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)
    opts = f"size={size},mode=0755,uid=0,gid=0" + (f",nr_inodes={nr_inodes}" if nr_inodes else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "cs-attack", str(path)], check=True,
                   timeout=30, capture_output=True)
    try:
        yield path
    finally:
        for _ in range(20):
            done = subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
            if done.returncode == 0:
                break
            time.sleep(0.5)
        else:
            subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)
        with contextlib.suppress(OSError):
            path.rmdir()


def listing(folder: Path) -> list[str]:
    """Everything under ``folder`` (relative paths), for 'nothing left'."""
    out = []
    for root, dirs, files in os.walk(folder):
        for n in dirs + files:
            out.append(os.path.relpath(os.path.join(root, n), folder))
    return sorted(out)


# ----------------------------------------------------------------- job output
JOB_HEAD = 'echo "cs_start=$(date +%s.%N)"\n'
JOB_TAIL = ('job_dir="${CONDA_STAGE_JOB_DIR:-${TMPDIR:-/nonexistent}/conda-stage}"\n'
            'echo "cs_copies=$(ls -A "$job_dir/envs" 2>/dev/null | tr "\\n" " ")"\n'
            'echo "cs_env=$(env -0 | base64 -w0)"\n')


def activate_lines(init: Path, names: Iterable[str]) -> str:
    out = [f". {init}"]
    for n in names:
        out.append(f'conda activate {n} >/dev/null 2>&1 && echo "cs_prefix:{n}=$CONDA_PREFIX"; '
                   f"conda deactivate >/dev/null 2>&1")
    return "\n".join(out) + "\n"


def job_values(out: str) -> dict[str, str]:
    vals = {}
    for line in out.splitlines():
        m = re.match(r"^(cs_[^=\s]+)=(.*)$", line)
        if m:
            vals[m.group(1)] = m.group(2)
    return vals


def job_env(out: str) -> dict[str, str]:
    """The job's environment as the job printed it (``env -0 | base64``)."""
    raw = job_values(out).get("cs_env")
    assert raw is not None, f"the job printed no environment:\n{out}"
    env = {}
    for item in base64.b64decode(raw).decode("utf-8", "replace").split("\0"):
        k, sep, v = item.partition("=")
        if sep:
            env[k] = v
    return env


def stage_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("conda-stage:")]


def one_line(out: str, name: str) -> str:
    """The one clear ``conda-stage:`` line about ``name``."""
    word = re.compile(rf"(?<![\w.+-]){re.escape(name)}(?![\w.+-])")
    lines = [line for line in stage_lines(out) if word.search(line)]
    assert len(lines) == 1, f"expected one 'conda-stage:' line about {name}, got {lines}:\n{out}"
    line = lines[0]
    assert line.isprintable(), f"control characters in {line!r}"
    assert "internal error" not in line.lower() and "Traceback" not in out, out
    return line


def attacker_vars(env: dict) -> dict:
    """What an attacker tried to plant in a job's environment."""
    return {k: v for k, v in env.items() if k.startswith(("LD_", "CS_ATTACK")) or "cs-attack" in v}


def assert_no_traceback(out: str) -> None:
    assert "Traceback (most recent call last)" not in out, out


def hook_log_lines(path: Path, start: int = 0) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            return fh.read().decode("utf-8", "replace").split("\n")
    except FileNotFoundError:
        return []


def size_of(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def sleep_until(cond: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()

