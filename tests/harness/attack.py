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
  :func:`stage_lines`, :func:`one_line`);
* the node store (``<staging_dir>/users/<uid>/<id>/<name>``, records in
  ``<state_dir>/users``): :func:`store_listing` (what is left but the
  ``users`` folders that stay), :func:`copy_pattern`, :func:`read_record`,
  :func:`force_remove` (no recursion: a deep tree an attack planted);
* :class:`Attack` -- one test's attack, everything that does not depend on
  the scheduler (site settings for the test, snapshots, submission timing
  against the prolog budget, the effect checks -- one staged-copy check and
  one 'nothing left' check for both schedulers, which share the store
  layout --, cleanup); each test module subclasses it for its scheduler
  (submission, output, waiting, health);
* the attacks both suites run (:func:`fifo_instead_of_a_user_file`,
  :func:`memory_bomb`, ... down to :func:`submit_to_hold`) with their
  parameters (:data:`FIFO_PLACES`, :data:`BOMBS`, :data:`SHORT_OF`): each
  module's test of the same name calls them with its :class:`Attack`; the
  attacks on the node store (:func:`store_tampering` with
  :data:`STORE_TAMPERING`, :func:`victims_copy_by_name`,
  :func:`state_dir_is_root_only`).

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
from .users import TEST_BASE, User, ensure_user, run_as

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
JOB_HEAD = ('echo "cs_start=$(date +%s.%N)"\n'
            'cs_task="${SGE_TASK_ID:-undefined}"; [ "$cs_task" = undefined ] && cs_task=\n'
            'echo "cs_key=${SLURM_JOB_ID:-$JOB_ID}${cs_task:+.$cs_task}"\n'
            'echo "cs_uid=$(id -u)"\n')
# cs_copies: the names in the job folder's envs/ (private copies, SGE
# job-owner prologs) and every copy in the user's own folder of the node
# store (the product's, @STORE@, and the one next to the job folder) --
# whatever CONDA_ENVS_PATH says.
JOB_TAIL = ('job_dir="${CONDA_STAGE_JOB_DIR:-${TMPDIR:-/nonexistent}/conda-stage}"\n'
            'echo "cs_copies=$( (ls -A "$job_dir/envs"; '
            'for st in "@STORE@/$(id -u)" "$(dirname "$job_dir")/users/$(id -u)"; do '
            'for f in "$st"/*/; do [ -d "$f" ] && ls -A "$f"; done; done) 2>/dev/null '
            '| tr "\\n" " ")"\n'
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



# ----------------------------------------------------------------- the node store
USERS = "users"
COPY_ID = r"[0-9a-f]{16}"


def product_dirs() -> tuple[Path, Path]:
    """The product's default staging and state folders (the attack suites
    do not override them)."""
    from conda_stage.config import Config

    config = Config()
    return Path(config.staging_dir), Path(config.state_dir)


def store_listing(folder: Path) -> list[str]:
    """Everything under ``folder`` (relative paths) but its ``users``
    folder of the node store while that is empty (it is made once and
    stays); without descending (an attack may have planted a deep tree)."""
    if not os.path.isdir(folder) or os.path.islink(folder):
        return []
    out = []
    for name in sorted(os.listdir(folder)):
        p = os.path.join(folder, name)
        if name == USERS and os.path.isdir(p) and not os.path.islink(p):
            out += [f"{USERS}/{n}" for n in sorted(os.listdir(p))]
        else:
            out.append(name)
    return out


def copy_pattern(staging: Path, uid: int, name: str) -> str:
    """A shared copy of ``uid``'s ``name``: ``<staging>/users/<uid>/<id>/<name>``."""
    return rf"{re.escape(str(staging))}/{USERS}/{uid}/{COPY_ID}/{re.escape(name)}"


def record_path(state: Path, copy: str) -> Path:
    """Root's record of the shared copy at ``copy`` (``.../users/<uid>/<id>/<name>``)."""
    cid = Path(copy).parent.name
    uid = Path(copy).parent.parent.name
    return state / USERS / uid / f"{cid}.json"


def read_record(state: Path, copy: str) -> dict:
    """The record of ``copy``, checked to be root's (0644, a regular file)."""
    path = record_path(state, copy)
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o644, \
        f"{path}: not root's 0644 file: {st}"
    return json.loads(path.read_text())


def force_remove(path: Path) -> None:
    """Remove ``path`` whatever it is, without recursion (GNU rm) and
    without following symlinks."""
    if os.path.lexists(path):
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=False,
                       timeout=300, capture_output=True)


def mode_owner(path: Path) -> tuple[int, int, int]:
    """(file type, owner uid, permission bits) of ``path`` itself."""
    st = os.lstat(path)
    return stat.S_IFMT(st.st_mode), st.st_uid, stat.S_IMODE(st.st_mode)


class Flag:
    """A file the test makes to let a waiting job go on (root's folder,
    readable by all; jobs poll for it)."""

    def __init__(self, tag: str):
        ATTACK_BASE.mkdir(parents=True, exist_ok=True)
        os.chmod(ATTACK_BASE, 0o755)
        self.path = ATTACK_BASE / f"go-{tag}-{os.getpid()}-{time.monotonic_ns()}"
        self.path.unlink(missing_ok=True)

    def wait_line(self, seconds: int = 150) -> str:
        """Shell lines: wait until the flag exists (at most ``seconds``)."""
        return (f'i=0; while [ ! -e "{self.path}" ] && [ $i -lt {seconds * 5} ]; do '
                f"sleep 0.2; i=$((i+1)); done\n")

    def set(self) -> None:
        self.path.touch()
        os.chmod(self.path, 0o644)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# ----------------------------------------------------------------- the attack
BUDGET = 20   # the prolog budget (seconds) of the attack suites' site file


@contextlib.contextmanager
def hook_site(site, hook_log: Path):
    """The site file of an attack suite for the ``with`` block: the hooks log
    to ``hook_log`` (emptied first), not to syslog, use the test conda and
    the prolog budget :data:`BUDGET`, and keep no unused shared copy
    (``keep_unused=0``: each job's end removes the copies nobody else holds,
    so that every test can check that nothing is left).  Yields the site
    file's handle."""
    from .sitecfg import site_defaults

    hook_log.unlink(missing_ok=True)
    hook_log.touch()
    with site_defaults(log_file=hook_log, syslog="no", conda_root=site.root_prefix,
                       prolog_budget=BUDGET, keep_unused=0) as defaults:
        yield defaults


class Attack:
    """One attack: setup helpers, job submission and timing, the effect checks.

    What does not depend on the scheduler lives here; a subclass per
    scheduler provides how a job is sent (:meth:`_send`), read
    (:meth:`output`), waited for (:meth:`finish`, :meth:`completed`),
    described when late (:meth:`describe`), what a healthy scheduler and an
    empty staging area are (:meth:`healthy`, :meth:`nothing_left`), how a
    staging area is moved onto a filesystem (:meth:`staging_on`), how the
    jobs are cleared (:meth:`clear_jobs`) and where a staged copy is
    (:meth:`staged_copy`).  ``cluster.defaults`` is the site file's handle
    (:func:`hook_site`)."""

    kind = ""          # "slurm" / "sge", as in the hooks' log lines
    directives = ""    # job script lines after the shebang
    prelude = ""       # job script lines after the start time

    def __init__(self, cluster, people: Cast, envs: dict, site, *, hook_log: Path,
                 staging: Path, state: Path, volatile: Iterable[Path] = ()):
        self.cluster, self.people, self.envs, self.site = cluster, people, envs, site
        self.hook_log = hook_log
        self.store_staging = staging              # the product's staging folder (the store)
        self.state = state                        # the product's state folder
        self.staging = staging                    # the staging area (its parent is watched)
        self.volatile = [hook_log, *volatile]     # test-base entries that may change
        self.proof = Proof()
        self.cleanups: list = []
        self.jobs: list[str] = []
        self.submitted: dict[str, float] = {}
        self.watch = None
        self.before = None
        self.saved = {k: save_env_files(e) for k, e in envs.items()}
        self.closed = False
        self.proof.reset()

    def __enter__(self) -> "Attack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------- setup
    def setting(self, **values) -> None:
        """Change site settings for this test only (None: remove the line)."""
        handle = self.cluster.defaults
        old = {k: handle.values.get(k) for k in values}

        def apply(changes):
            for k, v in changes.items():
                if v is None:
                    handle.values.pop(k, None)
                else:
                    handle.values[k] = v
            handle.update()
        self.cleanups.append(lambda: apply(old))
        apply(values)

    def remove_later(self, *paths: Path) -> None:
        """Remove these folders when the test is done."""
        for path in paths:
            self.cleanups.append(lambda path=path: shutil.rmtree(path, ignore_errors=True))

    def decoy(self, folder: Path, names: Iterable[str]) -> Path:
        """A fresh folder of root's with ``NAME/precious`` for each name
        (removed afterwards)."""
        if folder.exists():
            shutil.rmtree(folder)
        for name in names:
            (folder / name).mkdir(parents=True)
            (folder / name / "precious").write_text("root's\n")
        self.remove_later(folder)
        return folder

    def begin(self, *, extra=(), volatile=()) -> None:
        """Snapshot the sensitive places (call after the attacker's setup)."""
        self.watch = sensitive_places(self.people, self.staging, extra=extra,
                                      volatile=[*self.volatile, *volatile])
        self.before = self.watch.take()

    # -------------------------------------------------------- jobs
    def submit(self, user: User, body: str = "", names=(), *args: str, **how) -> str:
        """Submit ``body`` as ``user``'s job requesting the environments
        ``names`` (``args``: more submission arguments)."""
        tail = JOB_TAIL.replace("@STORE@", f"{self.store_staging}/{USERS}")
        script = "#!/bin/bash\n" + self.directives + JOB_HEAD + self.prelude + body + tail
        jid, t0 = self._send(user, script, list(names), args, **how)
        self.jobs.append(jid)
        self.submitted[jid] = t0
        return jid

    def run(self, user: User, body: str = "", names=(), *args: str, **how) -> tuple[str, str]:
        """Submit, check the job started within the budget, wait until it
        left the queue: its id and output."""
        jid = self.submit(user, body, names, *args, **how)
        self.started_within_budget(jid)
        return jid, self.finish(jid)

    def started_within_budget(self, jid: str, since: float | None = None) -> float:
        """Seconds from submission (or ``since``) until the job script ran;
        fails when that exceeds the prolog budget plus scheduling slack."""
        t0 = since or self.submitted[jid]
        limit = BUDGET + SLACK
        sleep_until(lambda: "cs_start=" in self.output(jid), limit + 10)
        start = job_values(self.output(jid)).get("cs_start")
        assert start is not None, (
            f"job {jid} had not started {limit + 10:.0f} s after submission (prolog budget "
            f"{BUDGET} s): {self.describe(jid)}")
        elapsed = float(start) - t0
        assert elapsed <= limit, f"job {jid} started {elapsed:.1f} s after submission " \
                                 f"(budget {BUDGET} s + {SLACK} s)"
        return elapsed

    # -------------------------------------------------------- effects
    def verify(self) -> None:
        """What must hold after every attack (jobs done, epilogs run)."""
        root_ran = self.proof.ran_as(0)
        assert not root_ran, f"root ran the attacker's code: {root_ran}"
        victim_ran = self.proof.ran_as(self.people.victim.uid)
        assert not victim_ran, f"the victim ran the attacker's code: {victim_ran}"
        changes = self.watch.changes(self.before)
        assert not changes, "outside the staging area:\n" + "\n".join(changes[:40])
        self.healthy()
        self.nothing_left()

    def close(self) -> None:
        """Undo the test's setup, clear its jobs, put the environments'
        files back."""
        if self.closed:
            return
        self.closed = True
        errors = []
        for undo in reversed(self.cleanups):
            try:
                undo()
            except Exception as exc:  # noqa: BLE001 - run every cleanup
                errors.append(exc)
        try:
            self.clear_jobs()
        finally:
            for saved in self.saved.values():
                restore_env_files(saved)
            self.scrub()
        if errors:
            raise errors[0]

    def scrub(self) -> None:
        """After the test (its checks already made): remove what a failing
        product left in the store, the job folders and the state folder, so
        that the next test starts clean (the empty ``users`` folders stay)."""
        for folder in {self.store_staging, self.staging, self.state}:
            if not folder.is_dir() or folder.is_symlink():
                continue
            for name in store_listing(folder):
                if name.split("/")[0] == USERS or re.fullmatch(r"\d+(\.\d+)?(\.json|\.told)?",
                                                               name):
                    force_remove(folder / name)

    def store_left(self) -> list[str]:
        """What is left in the staging and state folders (the store's empty
        ``users`` folders aside)."""
        left = []
        for folder in {self.store_staging, self.staging, self.state}:
            left += [f"{folder}/{n}" for n in store_listing(folder)]
        return left

    def assert_store_modes(self) -> None:
        """The store's folders as the product makes them: ``users`` of the
        staging folder root 0755, of the state folder root 0711."""
        for folder, mode in ((self.store_staging, 0o755), (self.state, 0o711)):
            top = folder / USERS
            if os.path.lexists(top):
                assert mode_owner(top) == (stat.S_IFDIR, 0, mode), (top, mode_owner(top))

    def env_args(self, variables: dict) -> tuple[tuple, dict]:
        """Submission arguments and keywords putting ``variables`` into the
        job's environment."""
        raise NotImplementedError

    def nothing_left(self) -> None:
        """Assert nothing staged is left: no job folder, no copy, no record,
        no lock, no manifest (the empty ``users`` folders stay)."""
        left = self.store_left()
        assert left == [], f"left behind: {left[:20]}"
        self.assert_store_modes()

    def staged_copy(self, out: str, name: str) -> str:
        """Assert ``conda activate NAME`` in the job gave a shared copy in
        the job user's own folder of the node store, that the copy's folder
        leads CONDA_ENVS_PATH, and that CONDA_STAGE_JOB_DIR is the job's
        folder; the copy's prefix."""
        vals = job_values(out)
        prefix = vals.get(f"cs_prefix:{name}", "")
        env = job_env(out)
        assert re.fullmatch(copy_pattern(self.store_staging, int(vals["cs_uid"]), name), prefix), \
            f"{name} not staged into the node store:\n{out}"
        first = [p for p in env.get("CONDA_ENVS_PATH", "").split(":")
                 if p.startswith(f"{self.store_staging}/{USERS}/")]
        assert os.path.dirname(prefix) in first, env.get("CONDA_ENVS_PATH")
        assert env.get("CONDA_ENVS_PATH", "").startswith(first[0]), env.get("CONDA_ENVS_PATH")
        assert env.get("CONDA_STAGE_JOB_DIR") == f"{self.store_staging}/{vals['cs_key']}", \
            (env.get("CONDA_STAGE_JOB_DIR"), vals["cs_key"])
        assert name in vals.get("cs_copies", "").split(), out
        return prefix

    # -------------------------------------------------------- per scheduler
    def _send(self, user: User, script: str, names: list[str], args, **how) -> tuple[str, float]:
        """Submit ``script``: the job id and the time just before submitting."""
        raise NotImplementedError

    def output(self, jid: str) -> str:
        """What the job printed so far ("" when nothing yet)."""
        raise NotImplementedError

    def describe(self, jid: str) -> str:
        """The job's and the scheduler's state, for a job that is late."""
        raise NotImplementedError

    def finish(self, jid: str) -> str:
        """Wait until the job left the queue (epilog done); its output."""
        raise NotImplementedError

    def completed(self, jid: str) -> None:
        """Assert the finished job completed as the scheduler reports it."""
        raise NotImplementedError

    def healthy(self) -> None:
        """Assert the node / queue took no harm."""
        raise NotImplementedError

    def staging_on(self, mount: Path):
        """A context manager: the staging area on the filesystem ``mount``."""
        raise NotImplementedError

    def clear_jobs(self) -> None:
        """Remove the test's jobs still queued; wait for the node / queue."""
        raise NotImplementedError


def unstaged(out: str, name: str) -> None:
    copies = job_values(out).get("cs_copies", "").split()
    assert name not in copies, f"{name} was staged: {copies}\n{out}"


# ----------------------------------------------------------------- attacks on either scheduler
# The bodies of the tests both suites run; each test module names the test
# (and says what is particular to its scheduler in the docstring).
FIFO_PLACES = ["condarc", "lock", "tarball"]
BOMBS = ["tarball", "sidecar"]
SHORT_OF = ["bytes", "inodes"]
FORGED = "1999-01-01T00:00:00 node conda-stage[1] INFO: {kind} job 1 (root): cs-attack forged"


def job_tampering(atk: Attack, decoy: Path) -> None:
    """During its job the attacker replaces its shared copy (in its own
    folder of the node store, ``users/<uid>/<id>/<name>``) by a symlink to a
    folder of root's (``decoy``), moving the real copy into the job folder's
    ``tmp/`` and leaving a process running from it; adds symlinks to the
    victim's home and /etc (next to the copy, in the job folder's ``envs/``
    and ``tmp/``), FIFOs and a read-only tree.  The root epilog removes the
    job folder and the copy without following any of it."""
    victim, attacker = atk.people.victim, atk.people.attacker
    one = atk.envs["one"]
    atk.decoy(decoy, ["sub"])
    body = f"""d="$CONDA_STAGE_JOB_DIR"; s="${{CONDA_ENVS_PATH%%:*}}"
echo "cs_job_dir=$d"; echo "cs_store_dir=$s"
chmod u+w "$s"; chmod -R u+w "$s/{one.name}"
mv "$s/{one.name}" "$d/tmp/moved" && ln -s {decoy} "$s/{one.name}" && echo cs_swapped=1
ln -s {victim.home} "$s/home"; ln -s {victim.home} "$d/envs/home"
ln -s /etc "$d/tmp/etc"; ln -s {decoy}/sub "$d/tmp/sub"
mkfifo "$d/tmp/fifo" "$s/fifo"
mkdir -p "$d/tmp/ro/a/b" && touch "$d/tmp/ro/a/b/f" && chmod -R a-w "$d/tmp/ro"
(cd "$d/tmp/moved" && setsid sleep 300 >/dev/null 2>&1 &)
"""
    atk.begin(extra=[Place(decoy)])

    jid, out = atk.run(attacker, body, [one.name])
    atk.verify()
    vals = job_values(out)
    assert vals.get("cs_swapped") == "1", f"the job could not tamper:\n{out}"
    assert re.fullmatch(copy_pattern(atk.store_staging, attacker.uid, one.name),
                        vals.get("cs_store_dir", "") + f"/{one.name}"), out
    assert vals.get("cs_job_dir") == f"{atk.store_staging}/{vals['cs_key']}", out
    atk.completed(jid)


# ----------------------------------------------------------------- the node store
STORE_TAMPERING = ["id_to_decoy", "id_to_etc", "copy_to_victims", "plants", "deep_tree"]
DEEP = 1500   # levels of the planted deep tree (beyond Python's recursion limit; < PATH_MAX)


def _victim_holding(atk: Attack, flag: Flag) -> tuple[str, str]:
    """The victim's job, started first: stages ``vic`` (a shared copy it
    holds), prints where, waits for ``flag``, then runs the copy's program.
    Its id and the copy's prefix."""
    vic = atk.envs["vic"]
    init = atk.site.init_file
    body = (activate_lines(init, [vic.name]) + 'echo "cs_vic_waiting=1"\n' + flag.wait_line()
            + f". {init}\nconda activate {vic.name} && prefix-probe >/dev/null && "
              f'echo "cs_vic_ok=$CONDA_PREFIX"\n')
    jid = atk.submit(atk.people.victim, body, [vic.name])
    atk.started_within_budget(jid)
    assert sleep_until(lambda: "cs_vic_waiting=1" in atk.output(jid), 60), atk.describe(jid)
    copy = job_values(atk.output(jid)).get(f"cs_prefix:{vic.name}", "")
    assert re.fullmatch(copy_pattern(atk.store_staging, atk.people.victim.uid, vic.name), copy), \
        f"the victim's {vic.name} not staged:\n{atk.output(jid)}"
    return jid, copy


def _victim_done(atk: Attack, jid: str, copy: str, flag: Flag, snapshot: dict,
                 holders: set) -> None:
    """While the victim's job still runs: its copy exactly as before and held
    by its job alone; then let it go on: its copy still works."""
    vic_place = Place(Path(copy).parent)
    assert vic_place.state() == snapshot, "the victim's copy changed during the attack"
    assert set(read_record(atk.state, copy)["holders"]) == holders, read_record(atk.state, copy)
    flag.set()
    out = atk.finish(jid)
    atk.completed(jid)
    assert job_values(out).get("cs_vic_ok") == copy, f"the victim's copy broke:\n{out}"
    assert atk.staged_copy(out, atk.envs["vic"].name) == copy
    key = job_values(out)["cs_key"]
    left = [str(p) for p in (atk.store_staging / key, atk.state / f"{key}.json",
                             Path(copy).parent) if os.path.lexists(p)]
    assert left == [], f"the victim's epilog did not finish after the attack: {left}"


def store_tampering(atk: Attack, how: str, decoy: Path) -> None:
    """While a victim's job holds its shared copy, the attacker's job tampers
    with its own part of the node store (``users/<uid>``, the user's own):
    ``id_to_decoy``: its copy's ``<id>`` folder becomes a symlink to a folder
    of root's (the real one moved into the job folder); ``id_to_etc``: a
    symlink to /etc (the real one moved aside in ``users/<uid>``);
    ``copy_to_victims``: the copy becomes a symlink to the victim's copy,
    and an entry named like a copy id a symlink to the victim's copy folder;
    ``plants``: FIFOs (one named like a copy id), a file named like a
    record, symlinks to /etc and the victim's home named like copy ids, a
    read-only tree and extra entries in the copy's folder; ``deep_tree``: a
    tree ``DEEP`` levels deep in ``users/<uid>`` and in the copy's folder.
    The root epilog (and ``gc``) remove exactly the attacker's things,
    follow nothing: the decoy, /etc, the victim's copy and its record are
    untouched, the victim's job keeps its copy, nothing is left."""
    attacker, victim = atk.people.attacker, atk.people.victim
    one = atk.envs["one"]
    atk.decoy(decoy, ["sub"])
    flag = Flag("victim")
    atk.cleanups.append(flag.remove)
    atk.begin(extra=[Place(decoy)])
    vjid, vcopy = _victim_holding(atk, flag)
    snapshot = Place(Path(vcopy).parent).state()
    holders = set(read_record(atk.state, vcopy)["holders"])
    assert holders == {f"{atk.kind}:{vjid}"}, holders

    fake = "0123456789abcdef"
    head = f"""s="${{CONDA_ENVS_PATH%%:*}}"; u="$(dirname "$s")"; n={one.name}
echo "cs_store_dir=$s"
chmod u+w "$s" && chmod -R u+w "$s/$n"
"""
    body = {
        "id_to_decoy": f"""mv "$s" "$CONDA_STAGE_JOB_DIR/tmp/moved" && ln -s {decoy} "$s" &&
echo cs_swapped=1
(cd "$CONDA_STAGE_JOB_DIR/tmp/moved" && setsid sleep 300 >/dev/null 2>&1 &)
""",
        "id_to_etc": """mv "$s" "$u/moved-away" && ln -s /etc "$s" && echo cs_swapped=1
ln -s /etc "$u/moved-away/$n.etc"
""",
        "copy_to_victims": f"""mv "$s/$n" "$s/.$n.old" && ln -s {vcopy} "$s/$n" && echo cs_swapped=1
ln -s {Path(vcopy).parent} "$u/{fake}"; ln -s {vcopy} "$u/{Path(vcopy).parent.name}"
""",
        "plants": f"""mkfifo "$u/{fake}" "$u/fifo" "$s/fifo" && echo cs_swapped=1
echo '{{"id": "{fake}"}}' > "$u/{fake}.json"
ln -s /etc "$u/fedcba9876543210"; ln -s {victim.home} "$u/aaaaaaaaaaaaaaaa"
ln -s /etc "$s/etc"; ln -s {victim.home} "$s/home"; touch "$s/extra" "$s/$n/extra"
mkdir -p "$u/ro/a/b" "$s/ro/a/b" && touch "$u/ro/a/b/f" "$s/ro/a/b/f" &&
chmod -R a-w "$u/ro" "$s/ro"
""",
        "deep_tree": f"""deep="$(printf 'd/%.0s' $(seq {DEEP}))"
mkdir -p "$u/x/$deep" "$s/x/$deep" && (cd "$u/x/$deep" && touch f) && echo cs_swapped=1
""",
    }[how]
    jid, out = atk.run(attacker, head + body, [one.name])
    try:
        atk.completed(jid)
        assert job_values(out).get("cs_swapped") == "1", f"the job could not tamper:\n{out}"
        assert re.fullmatch(copy_pattern(atk.store_staging, attacker.uid, one.name),
                            job_values(out).get("cs_store_dir", "") + f"/{one.name}"), out
        _victim_done(atk, vjid, vcopy, flag, snapshot, holders)
    finally:
        flag.set()
    atk.verify()


def victims_copy_by_name(atk: Attack) -> None:
    """While the victim's job holds its shared copy, the attacker's job asks
    for the victim's environment by its name, with CONDA_ENVS_PATH naming
    the victim's copy folder and the victim's own envs folder first; in the
    job it tries to list the victim's part of the store and to activate the
    victim's copy by path.  The attacker's job neither uses nor holds the
    victim's copy: the victim's record names the victim's job alone
    (checked while the attacker's job runs and after), any copy the
    attacker got is in its own folder, the victim's copy is unchanged and
    the victim's job keeps it."""
    attacker = atk.people.attacker
    vic = atk.envs["vic"]
    init = atk.site.init_file
    flag, go = Flag("victim"), Flag("attacker")
    atk.cleanups += [flag.remove, go.remove]
    atk.begin()
    vjid, vcopy = _victim_holding(atk, flag)
    vfolder = Path(vcopy).parent
    snapshot = Place(vfolder).state()
    holders = set(read_record(atk.state, vcopy)["holders"])
    assert holders == {f"{atk.kind}:{vjid}"}, holders

    body = (activate_lines(init, [vic.name])
            + f'ls -A "{vfolder.parent}" >/dev/null 2>&1 && echo cs_peek=1\n'
            + f'ls -A "{vfolder}" >/dev/null 2>&1 && echo cs_peek=1\n'
            + f'(. {init}; conda activate "{vcopy}" >/dev/null 2>&1 && '
              f'prefix-probe >/dev/null 2>&1 && echo cs_used_victims=1)\n'
            + 'echo "cs_waiting=1"\n' + go.wait_line())
    args, how = atk.env_args({"CONDA_ENVS_PATH": f"{vfolder}:{vic.prefix.parent}"})
    jid = atk.submit(attacker, body, [vic.name], *args, **how)
    try:
        atk.started_within_budget(jid)
        assert sleep_until(lambda: "cs_waiting=1" in atk.output(jid), 60), atk.describe(jid)
        # While the attacker's job runs (after its prolog): the victim's copy held by its job alone.
        assert set(read_record(atk.state, vcopy)["holders"]) == holders
        mine = atk.state / USERS / str(attacker.uid)
        for rec in sorted(mine.glob("*.json")) if mine.is_dir() else []:
            assert not json.loads(rec.read_text())["path"].startswith(f"{vfolder}"), rec
    finally:
        go.set()
    out = atk.finish(jid)
    atk.completed(jid)
    vals = job_values(out)
    assert "cs_peek" not in vals and "cs_used_victims" not in vals, out
    got = vals.get(f"cs_prefix:{vic.name}", "")
    # (conda may activate the victim's world-readable original by name: not a copy)
    assert not got.startswith(f"{atk.store_staging}/{USERS}/{atk.people.victim.uid}/"), out
    if got.startswith(f"{atk.store_staging}/"):   # then a copy of the attacker's own
        assert re.fullmatch(copy_pattern(atk.store_staging, attacker.uid, vic.name), got), out
    one_line(out, vic.name)
    try:
        _victim_done(atk, vjid, vcopy, flag, snapshot, holders)
    finally:
        flag.set()
    atk.verify()


STATE_PLANTS = {
    # what the attacker's job tries in the state folder (``S``), as shell
    "list_users": 'ls -A "$S/users"',
    "lock_replace": 'ln -sf /etc/shadow "$S/users/$U.lock"',
    "lock_open": 'exec 9<"$S/users/$U.lock" && flock -n 9',
    "lock_new": 'touch "$S/users/$U.lock.new"',
    "records_dir": 'mkdir -p "$S/users/$U" && touch "$S/users/$U/cs-attack.json"',
    "record_new": 'cp "$R" "$S/users/$U/0123456789abcdef.json"',
    "record_edit": 'echo "{}" >> "$R"',
    "record_replace": 'ln -sf /etc/passwd "$R"',
    "record_chmod": 'chmod 666 "$R"',
    "victim_records": 'ls -A "$S/users/$V"',
    "manifest": 'echo "{}" >> "$S/$K.json"',
    "manifest_new": 'touch "$S/cs-attack.json"',
}


def state_dir_is_root_only(atk: Attack) -> None:
    """The attacker's job (holding its shared copy) tries to plant or edit
    its copy's record, its lock and its manifest in the state folder, to
    make a records folder for itself, to hold its lock, to list other
    users' records; and puts a fake record and a fake copy folder into its
    own part of the staging store.  Every attempt in the state folder fails,
    its modes are root's (``users`` 0711, lock 0600, record 0644) while the
    job runs, and the epilog removes everything, fake things included."""
    attacker, victim = atk.people.attacker, atk.people.victim
    one = atk.envs["one"]
    go = Flag("attacker")
    atk.cleanups.append(go.remove)
    tries = "\n".join(f'( {cmd} ) >/dev/null 2>&1 && echo "cs_plant_{name}=1"'
                       for name, cmd in STATE_PLANTS.items())
    fake = "0123456789abcdef"
    body = f"""S="{atk.state}"; U=$(id -u); V={victim.uid}
K=$(basename "$CONDA_STAGE_JOB_DIR")
s="${{CONDA_ENVS_PATH%%:*}}"; u="$(dirname "$s")"
R="$S/users/$U/$(basename "$s").json"
echo "cs_store_dir=$s"
{tries}
mkdir -p "$u/{fake}/{one.name}/conda-meta" && echo '{{"id": "{fake}"}}' > "$u/{fake}.json"
cp "$R" "$u/$(basename "$s").json" 2>/dev/null
echo "cs_waiting=1"
{go.wait_line()}"""
    atk.begin()
    jid = atk.submit(attacker, body, [one.name])
    try:
        atk.started_within_budget(jid)
        assert sleep_until(lambda: "cs_waiting=1" in atk.output(jid), 60), atk.describe(jid)
        copy = job_values(atk.output(jid))["cs_store_dir"] + f"/{one.name}"
        assert re.fullmatch(copy_pattern(atk.store_staging, attacker.uid, one.name), copy)
        users = atk.state / USERS
        assert mode_owner(users) == (stat.S_IFDIR, 0, 0o711)
        folder = mode_owner(users / str(attacker.uid))
        assert folder[:2] == (stat.S_IFDIR, 0) and not folder[2] & 0o022, folder
        assert mode_owner(users / f"{attacker.uid}.lock") == (stat.S_IFREG, 0, 0o600)
        assert set(read_record(atk.state, copy)["holders"]) == {f"{atk.kind}:{jid}"}
        assert [p.name for p in (users / str(attacker.uid)).iterdir()] == \
            [record_path(atk.state, copy).name]
        assert not (atk.state / "cs-attack.json").exists()
        st = mode_owner(atk.store_staging / USERS / str(attacker.uid))
        assert st == (stat.S_IFDIR, attacker.uid, 0o700), st
        assert mode_owner(Path(copy).parent)[1:] == (attacker.uid, 0o555), mode_owner(
            Path(copy).parent)
    finally:
        go.set()
    out = atk.finish(jid)
    atk.verify()
    atk.completed(jid)
    planted = sorted(k for k in job_values(out) if k.startswith("cs_plant_"))
    assert planted == [], f"the attacker's job could write in the state folder: {planted}\n{out}"


def fifo_instead_of_a_user_file(atk: Attack, where: str) -> None:
    """A FIFO at ~/.condarc, at the lock file or at the tarball (the sidecar
    made to match it): nobody ever writes to it, so whoever opens it for
    reading blocks forever.  The prolog returns within its budget."""
    attacker = atk.people.attacker
    one = atk.envs["one"]
    target = {"condarc": attacker.home / ".condarc", "lock": lock_path(one),
              "tarball": one.tarball}[where]
    make_fifo(target, attacker)
    atk.cleanups.append(lambda: target.unlink(missing_ok=True))
    atk.cleanups.append(lambda: release_fifo_readers(target))
    if where == "tarball":
        edit_sidecar(one, attacker, size=0, mtime_ns=os.stat(target).st_mtime_ns)
    atk.begin()

    jid, out = atk.run(attacker, "", [one.name])
    atk.verify()
    atk.completed(jid)
    one_line(out, one.name)
    if where == "tarball":
        unstaged(out, one.name)


def _bad_and_good(atk: Attack, *, bad: EnabledEnv, good: EnabledEnv, names: list[str]) -> None:
    """The attacker's job asks for ``names`` (and activates ``good``): the
    bad one gets one line and no copy, the good one one line and a copy."""
    jid, out = atk.run(atk.people.attacker, activate_lines(atk.site.init_file, [good.name]),
                       names)
    atk.verify()
    atk.completed(jid)
    one_line(out, bad.name)
    unstaged(out, bad.name)
    one_line(out, good.name)
    atk.staged_copy(out, good.name)


def lock_held_forever(atk: Attack) -> None:
    """The attacker's own process holds the lock of one environment forever
    (lockf and flock); the job asks for a good one first.  The prolog stops
    waiting at its budget; the good one is staged."""
    attacker = atk.people.attacker
    one, two = atk.envs["one"], atk.envs["two"]
    holder = LockHolder(attacker, lock_path(one)).start()
    atk.cleanups.append(holder.stop)
    atk.begin()
    _bad_and_good(atk, bad=one, good=two, names=[two.name, one.name])


def memory_bomb(atk: Attack, bomb: str) -> None:
    """``tarball``: a tiny tar.zst whose pax header declares an 8 TiB member
    followed by 640 MB of zeros (and no end).  ``sidecar``: a well-formed
    sidecar of half a million prefix records (64 MB) next to the real
    tarball.  Either way the prolog's memory stays bounded."""
    attacker = atk.people.attacker
    one = atk.envs["one"]
    if bomb == "tarball":
        size = write_tarball(one, attacker, bomb_chunks(original_tar(one)))
        assert size < 1 << 20, f"the bomb is {size} bytes"
    else:
        huge_sidecar(one, attacker)
    atk.begin()

    with RssSampler([attacker.uid]) as rss:
        jid = atk.submit(attacker, "", [one.name])
        atk.started_within_budget(jid)
    out = atk.finish(jid)
    atk.verify()
    assert rss.samples > 0, "the sampler never saw the prolog's Python"
    assert rss.peak < MAX_PROLOG_RSS, f"prolog RSS peaked at {rss.peak >> 20} MB " \
                                      f"({rss.peak_what})"
    atk.completed(jid)
    one_line(out, one.name)
    if bomb == "tarball":
        unstaged(out, one.name)


def symlink_chain_and_hard_link(atk: Attack) -> None:
    """``s1 -> .``, ``s2 -> s1/..``, ``s3 -> s2/..`` ... each harmless as
    text, together ``/``; then a hard link and a symlink through the chain
    to a file outside.  The archive is refused; nothing outside is linked."""
    attacker = atk.people.attacker
    one = atk.envs["one"]
    ATTACK_BASE.mkdir(parents=True, exist_ok=True)
    outside = write_as(ATTACK_BASE / f"outside-{attacker.name}", "outside\n", attacker)
    write_tarball(one, attacker, [body_of(original_tar(one)), chain_members(outside),
                                  EOF_BLOCKS])
    atk.begin(extra=[Place(outside)])

    jid, out = atk.run(attacker, f'echo "cs_nlink=$(stat -c %h {outside})"\n', [one.name])
    atk.verify()
    assert job_values(out)["cs_nlink"] == "1", f"{outside} was hard-linked during the job"
    atk.completed(jid)
    one_line(out, one.name)
    unstaged(out, one.name)


def truncated_tarballs(atk: Attack) -> None:
    """One tarball is a complete zstd frame of a tar cut exactly at a member
    header (no end-of-archive marker), the other a zstd frame cut short.
    Neither stages (as an empty or partial environment)."""
    attacker = atk.people.attacker
    one, two = atk.envs["one"], atk.envs["two"]
    write_tarball(one, attacker, [truncated_at_header(original_tar(one))])
    write_tarball(two, attacker, raw=truncated_frame(original_tar(two)))
    atk.begin()

    jid, out = atk.run(attacker, "", [one.name, two.name])
    atk.verify()
    atk.completed(jid)
    for env in (one, two):
        one_line(out, env.name)
        unstaged(out, env.name)


def malformed_sidecar_record(atk: Attack) -> None:
    """Env A's sidecar has one malformed prefix record; env B (re-crafted
    the way every hostile tarball here is, with its original content -- the
    control that crafting leaves a usable tarball) is fine.  B is staged, A
    gets one line."""
    attacker = atk.people.attacker
    one, two = atk.envs["one"], atk.envs["two"]
    recraft_benign(two, attacker)
    edit_sidecar(one, attacker, records=[["lib/cs-attack", None, "binary"]])
    atk.begin()
    _bad_and_good(atk, bad=one, good=two, names=[one.name, two.name])


def newline_in_condarc(atk: Attack, missing: str) -> None:
    """~/.condarc's envs_dirs holds a path with a newline followed by a
    fake log line; the job asks for an environment that does not exist
    (``missing``, so the searched folders are reported).  No line of the
    hooks' log or of the job's output starts with the forged text."""
    attacker = atk.people.attacker
    one = atk.envs["one"]
    forged_line = FORGED.format(kind=atk.kind)
    condarc = attacker.home / ".condarc"
    write_as(condarc, json.dumps({"envs_dirs": [f"/nonexistent-cs\n{forged_line}",
                                                "~/.conda/envs"]}), attacker)
    atk.cleanups.append(lambda: condarc.unlink(missing_ok=True))
    mark = size_of(atk.hook_log)
    atk.begin()

    jid, out = atk.run(attacker, "", [missing, one.name])
    atk.verify()
    forged = [line for line in hook_log_lines(atk.hook_log, mark)
              if line.startswith(forged_line[:19])]
    assert forged == [], f"forged line in {atk.hook_log}: {forged}"
    assert not [line for line in out.splitlines() if line.startswith(forged_line[:19])], out
    atk.completed(jid)
    one_line(out, missing)


def staging_filesystem_too_small(atk: Attack, short: str, mount: Path) -> None:
    """The staging area is a tmpfs at ``mount`` too small for the
    environment, in bytes or in inodes (``short``), and the sidecar claims
    it unpacks to 0 bytes.  One line, nothing left on the filesystem."""
    attacker = atk.people.attacker
    one = atk.envs["one"]
    chunks = (filler_chunks(original_tar(one), big=48 << 20) if short == "bytes"
              else filler_chunks(original_tar(one), files=2000))
    write_tarball(one, attacker, chunks, sidecar={"unpacked_bytes": 0})
    opts = {"size": "16m"} if short == "bytes" else {"size": "64m", "nr_inodes": 300}
    with small_tmpfs(mount, **opts), atk.staging_on(mount):
        atk.begin()
        jid, out = atk.run(attacker, "", [one.name])
        atk.verify()
        assert store_listing(mount) == [], store_listing(mount)
        atk.completed(jid)
        one_line(out, one.name)
        unstaged(out, one.name)
        atk.close()   # settings back before the filesystem goes


def submit_to_hold(atk: Attack) -> str:
    """The site says CONDA_STAGE_ON_ERROR=hold and the attacker's tarball
    is truncated: submit the job (after the snapshot); its id."""
    attacker = atk.people.attacker
    one = atk.envs["one"]
    write_tarball(one, attacker, [truncated_at_header(original_tar(one))])
    atk.setting(on_error="hold")
    atk.begin()
    return atk.submit(attacker, "", [one.name])


def as_attacker(atk, script: str, timeout: float = 300) -> str:
    """Run a bash script as ``atk``'s attacker (outside any job); its stdout."""
    r = run_as(atk.people.attacker, ["bash", "-c", "set -e\n" + script], timeout=timeout,
               env={"PATH": SANE_PATH, "HOME": str(atk.people.attacker.home)})
    assert r.returncode == 0, f"the attacker's setup failed: {r.stdout}{r.stderr}"
    return r.stdout
