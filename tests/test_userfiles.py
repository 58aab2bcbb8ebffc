"""Files a user controls: non-blocking, regular-file-only, bounded reads
(.condarc, sidecar, lock file, tarball, settings, marker); strict sidecar
validation; staging deadlines; one error line from the CLI, never a
traceback.  No conda needed: environments and tarballs are made by hand."""
from __future__ import annotations

import errno
import io
import json
import math
import multiprocessing
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conda_stage import cli, output, resolve, stage as stage_mod, tarball as tarball_mod
from conda_stage.autostage import CONF, read_conf
from conda_stage.errors import LockTimeout, StageError
from conda_stage.extract import extract
from conda_stage.fingerprint import fingerprint
from conda_stage.locking import file_lock
from conda_stage.output import printable
from conda_stage.relocate import Relocator
from conda_stage.resolve import Env, envs_dirs
from conda_stage.stage import ACTIVATE_HOOK, open_tarball, stage
from conda_stage.store import MARKER, read_marker
from conda_stage.tarball import (MAX_RECORDS, MalformedSidecar, Meta, OtherMetaVersion,
                                 Tarball, parse_meta)
from conda_stage.userfiles import FileTooLarge, open_regular, open_regular_fd, read_bounded
from tests.test_units import _hold  # holds a lock in another process

REPO = Path(__file__).resolve().parent.parent
PLACEHOLDER = "/opt/conda-stage-placeholder/" + "p" * 100


# ---------------------------------------------------------------- helpers
def promptly(func, *args, timeout: float = 10, **kwargs):
    """Run ``func`` in a forked child and return ``("ok", result)`` or
    ``("raised", type name, message, base class names)``; fail the test if
    it has not returned after ``timeout`` seconds (it blocked)."""
    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)

    def child():
        try:
            writer.send(("ok", func(*args, **kwargs)))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            writer.send(("raised", type(exc).__name__, str(exc),
                         [c.__name__ for c in type(exc).__mro__]))

    proc = ctx.Process(target=child)
    proc.start()
    try:
        if not reader.poll(timeout):
            pytest.fail(f"{getattr(func, '__name__', func)} blocked for more than {timeout} s")
        return reader.recv()
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(10)


def fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def make_env(root: Path, name: str = "myenv", *, fmt: str = "tar.zst",
             records=None) -> Env:
    """An auto-stage-enabled environment with a tarball and sidecar, as
    ``conda stage --pack`` would leave them."""
    prefix = root / name
    (prefix / "conda-meta").mkdir(parents=True)
    (prefix / "conda-meta" / "history").write_text("==> 2024-01-01 <==\n")
    (prefix / "conda-meta" / "tool-1.0-0.json").write_text("{}")
    (prefix / "bin").mkdir()
    (prefix / "bin" / "tool").write_text(f"#!/bin/sh\necho {PLACEHOLDER}/lib\n")
    (prefix / "bin" / "tool").chmod(0o755)
    (prefix / "etc" / "conda" / "activate.d").mkdir(parents=True)
    (prefix / ACTIVATE_HOOK).write_text("# conda-stage hook\n")
    env = Env(prefix, name)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(prefix.rglob("*")):
            tar.add(path, str(path.relative_to(prefix)), recursive=False)
    raw = buf.getvalue()
    tb = Tarball.at(env, fmt)
    if fmt == "tar.zst":
        tb.path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    else:
        import gzip

        tb.path.write_bytes(gzip.compress(raw))
    st_ = os.stat(tb.path)
    meta = Meta(format=fmt, archive=tb.path.name, size=st_.st_size, mtime_ns=st_.st_mtime_ns,
                prefix=str(prefix), fingerprint=fingerprint(prefix), tool_version="test",
                created="2024-01-01T00:00:00+00:00", pack_seconds=0.1, files=7,
                unpacked_bytes=len(raw),
                records=[["bin/tool", PLACEHOLDER, "text"]] if records is None else records)
    tb.write_meta(meta)
    return env


def sidecar_of(env: Env) -> Path:
    return env.prefix.parent / f"{env.name}.conda-stage.json"


def good_meta_dict(env: Env) -> dict:
    return json.loads(sidecar_of(env).read_text())


@pytest.fixture
def env(tmp_path):
    return make_env(tmp_path / "envs")


@pytest.fixture
def staging(tmp_path):
    path = tmp_path / "local"
    path.mkdir()
    return path


# ---------------------------------------------------------------- userfiles
def test_regular_file_is_opened_and_read(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"x" * 100)
    with open_regular(f, what="test file") as fh:
        assert fh.read() == b"x" * 100
        flags = __import__("fcntl").fcntl(fh.fileno(), __import__("fcntl").F_GETFL)
        assert not flags & os.O_NONBLOCK and not flags & os.O_WRONLY
    assert read_bounded(f, 100, what="test file") == b"x" * 100


@pytest.mark.parametrize("make, kind", [
    (lambda p: os.mkfifo(p), "a FIFO (named pipe)"),
    (lambda p: p.mkdir(), "a folder"),
    (lambda p: p.symlink_to("/dev/null"), "a character device"),
    (lambda p: socket.socket(socket.AF_UNIX).bind(str(p)), "a socket"),
])
def test_non_regular_files_are_refused_at_once(tmp_path, make, kind):
    path = tmp_path / "weird\nname"
    make(path)
    for func in (lambda: open_regular(path, what="test file"),
                 lambda: read_bounded(path, 10, what="test file")):
        result = promptly(func)
        assert result[0] == "raised" and result[1] == "NotRegularFile", result
        assert result[2] == f"Refusing test file {tmp_path}/weird\\x0aname: it is {kind}, " \
                            f"not a regular file"
        assert "StageError" in result[3]


def test_fstat_of_what_was_opened_decides_not_the_stat_before(tmp_path, monkeypatch):
    """A regular file swapped for a FIFO between stat and open: the open
    does not block (O_NONBLOCK) and fstat refuses it."""
    regular = tmp_path / "regular"
    regular.write_text("x")
    pipe = fifo(tmp_path / "pipe")
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: real_stat(regular)
                        if Path(p) == pipe else real_stat(p, *a, **k))
    result = promptly(read_bounded, pipe, 10, what="test file")
    assert result[:2] == ("raised", "NotRegularFile") and "FIFO" in result[2]


def test_oversized_files_are_refused(tmp_path):
    f = tmp_path / "big"
    f.write_bytes(b"x" * 1025)
    with pytest.raises(FileTooLarge, match=r"Refusing test file .*/big: it is larger than 1 KiB"):
        read_bounded(f, 1024, what="test file")
    assert len(read_bounded(f, 1025, what="test file")) == 1025


def test_reading_stops_at_the_limit_whatever_the_size_says(tmp_path):
    # /proc files say 0 bytes but have content: the read itself is bounded.
    assert os.stat("/proc/self/status").st_size == 0
    with pytest.raises(FileTooLarge):
        read_bounded("/proc/self/status", 100, what="test file")


def test_missing_file_is_an_oserror_for_the_caller(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_bounded(tmp_path / "nope", 10, what="test file")
    fd = open_regular_fd(tmp_path / "new", what="lock file", flags=os.O_RDWR | os.O_CREAT)
    os.close(fd)
    assert (tmp_path / "new").is_file()


def test_printable_escapes_control_characters():
    assert printable("plain /path é") == "plain /path é"
    assert printable("a\nb\x1b[31m\r\x7f") == "a\\x0ab\\x1b[31m\\x0d\\x7f"
    assert printable("bidi\u202eevil\u2028") == "bidi\\u202eevil\\u2028"
    assert printable(os.fsdecode(b"bad\xff")) == "bad\\xff"


# ---------------------------------------------------------------- .condarc
def _condarc_env(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    return home, {"HOME": str(home), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}


@pytest.mark.parametrize("where", [".condarc", ".conda/condarc", ".conda/condarc.d/a.yml",
                                   ".config/conda/.condarc"])
def test_fifo_condarc_never_blocks_and_is_skipped(tmp_path, where, capsys):
    home, environ = _condarc_env(tmp_path)
    fifo(home / where)
    (home / ".conda").mkdir(exist_ok=True)
    (home / ".conda" / ".condarc").write_text("envs_dirs: [/from/good/condarc]\n")
    result = promptly(envs_dirs, environ, home)
    assert result[0] == "ok", result
    assert Path("/from/good/condarc") in result[1]
    output.configure(debug=True)  # it returns: now see what it says, in this process
    try:
        envs_dirs(environ, home)
    finally:
        output.configure(debug=False)
    assert "it is a FIFO (named pipe), not a regular file" in capsys.readouterr().err


def test_fifo_condarc_given_by_condarc_variable_never_blocks(tmp_path):
    home, environ = _condarc_env(tmp_path)
    environ["CONDARC"] = str(fifo(tmp_path / "rc"))
    assert promptly(envs_dirs, environ, home)[0] == "ok"


def test_oversized_and_broken_condarc_are_skipped(tmp_path, monkeypatch):
    home, environ = _condarc_env(tmp_path)
    (home / ".condarc").write_text("envs_dirs: [/big]\n" + "#" * resolve.CONDARC_LIMIT)
    (home / ".conda").mkdir()
    (home / ".conda" / "condarc").write_text("envs_dirs: [unclosed\n")
    (home / ".conda" / ".condarc").write_bytes(b"envs_dirs: [/ok, 5, null]\n")
    dirs = envs_dirs(environ, home)
    assert Path("/ok") in dirs and Path("/big") not in dirs


def test_condarc_total_and_folder_are_bounded(tmp_path, monkeypatch):
    home, environ = _condarc_env(tmp_path)
    d = home / ".conda" / "condarc.d"
    d.mkdir(parents=True)
    for i in range(resolve.CONDARC_D_FILES + 5):
        (d / f"{i:04}.yml").write_text(f"envs_dirs: [/d{i}]\n")
    dirs = envs_dirs(environ, home)
    assert Path("/d0") in dirs and Path(f"/d{resolve.CONDARC_D_FILES}") not in dirs
    monkeypatch.setattr(resolve, "CONDARC_TOTAL", 40)
    (home / ".condarc").write_text("envs_dirs: [/first]\n" + "#" * 15)
    dirs = envs_dirs(environ, home)
    assert Path("/first") in dirs and Path("/d0") not in dirs


def test_condarc_variables_expand_from_the_given_environment(tmp_path):
    home, environ = _condarc_env(tmp_path)
    (home / ".condarc").write_text("envs_dirs:\n  - $PROJECT/envs\n  - ${PROJECT}/more\n"
                                   "  - $UNSET_X/e\n")
    environ["PROJECT"] = "/proj"
    dirs = envs_dirs(environ, home)
    assert dirs[:2] == [Path("/proj/envs"), Path("/proj/more")]
    assert Path(os.path.abspath("$UNSET_X/e")) in dirs


# ---------------------------------------------------------------- lock files
@pytest.mark.parametrize("shared", [True, False])
def test_fifo_lock_file_is_refused_not_waited_on(tmp_path, shared):
    lock = fifo(tmp_path / "lock")

    def take():
        with file_lock(lock, shared=shared, timeout=60):
            return "locked"

    result = promptly(take)
    assert result[:2] == ("raised", "NotRegularFile"), result
    assert result[2] == f"Refusing lock file {lock}: it is a FIFO (named pipe), not a regular file"


def test_lock_file_that_cannot_be_created_is_one_line(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    with pytest.raises(StageError, match=r"Cannot create or open lock file .*/ro/missing/lock: "
                                         r"No such file or directory"):
        with file_lock(folder / "missing" / "lock"):
            pass


def test_lock_wait_ends_at_the_deadline(tmp_path):
    lock = tmp_path / "lock"
    started = multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold, args=(lock, 5, started))
    holder.start()
    try:
        assert started.wait(10)
        t0 = time.monotonic()
        with pytest.raises(LockTimeout, match="Gave up waiting for lock .*: the time allowed "
                                              "for staging ran out"):
            with file_lock(lock, shared=True, timeout=600, deadline=time.monotonic() + 0.5):
                pass
        assert 0.4 < time.monotonic() - t0 < 2
        with pytest.raises(LockTimeout, match="Timed out after 0 s"):
            with file_lock(lock, timeout=0.3, deadline=time.monotonic() + 60):
                pass
    finally:
        holder.kill()
        holder.join(10)


# ---------------------------------------------------------------- sidecar
def test_valid_sidecar_round_trips(env):
    tb, side = Tarball.load(env)
    assert side.meta is not None and not side.malformed
    assert side.meta == parse_meta(json.dumps(asdict(side.meta)).encode())
    assert tb.read_meta() == side.meta and tb.read_sidecar().stale_reason(env) is None


def test_sidecar_is_read_once_per_stage(env, staging, monkeypatch):
    reads = []
    real = tarball_mod.read_bounded
    monkeypatch.setattr(tarball_mod, "read_bounded",
                        lambda path, *a, **k: reads.append(path) or real(path, *a, **k))
    staged = stage(env, base=staging, repack=False)
    assert reads == [sidecar_of(env)]
    assert (staged / "bin" / "tool").read_text() == f"#!/bin/sh\necho {staged}/lib\n"
    assert read_marker(staged).original == str(env.prefix)


def test_tar_gz_sidecar_names_the_format(tmp_path, staging):
    env = make_env(tmp_path / "envs", "gzenv", fmt="tar.gz")
    tb, side = Tarball.load(env)
    assert tb.path.name == "gzenv.tar.gz" and side.meta.format == tb.format == "tar.gz"
    assert Tarball.for_env(env).path == tb.path
    assert stage(env, base=staging, repack=False).name == "gzenv"


def _bad(key, value):
    return lambda m: m.update({key: value})


def _bad_record(value):
    return lambda m: m.update(records=m["records"] + [value])


MALFORMED = {
    "record pair": (_bad_record(["bin/x", "/ph"]), "record 1 must be a [path, placeholder, mode]"),
    "record not a list": (_bad_record("bin/x"), "record 1 must be"),
    "record null": (_bad_record(None), "record 1 must be"),
    "record absolute path": (_bad_record(["/etc/passwd", "/ph", "text"]), "not a clean relative"),
    "record dotdot": (_bad_record(["a/../../b", "/ph", "text"]), "not a clean relative"),
    "record double slash": (_bad_record(["a//b", "/ph", "text"]), "not a clean relative"),
    "record dot": (_bad_record(["./a", "/ph", "text"]), "not a clean relative"),
    "record empty path": (_bad_record(["", "/ph", "text"]), "not a clean relative"),
    "record NUL path": (_bad_record(["a\0b", "/ph", "text"]), "contains a NUL"),
    "record int path": (_bad_record([1, "/ph", "text"]), "must be a string"),
    "record relative placeholder": (_bad_record(["a", "ph", "text"]), "must be an absolute"),
    "record empty placeholder": (_bad_record(["a", "", "text"]), "must be an absolute"),
    "record root placeholder": (_bad_record(["a", "/", "binary"]), "must be an absolute"),
    "record long placeholder": (_bad_record(["a", "/" + "p" * 5000, "text"]), "longer than"),
    "record surrogate placeholder": (_bad_record(["a", "/p\ud800", "text"]), "not valid text"),
    "record mode": (_bad_record(["a", "/ph", "exec"]), "mode must be 'text' or 'binary'"),
    "records dict": (_bad("records", {"a": 1}), "records must be a list"),
    "size negative": (_bad("size", -1), "size is out of range"),
    "size string": (_bad("size", "12"), "size must be a whole number"),
    "size float": (_bad("size", 1.5), "size must be a whole number"),
    "size bool": (_bad("size", True), "size must be a whole number"),
    "size huge": (_bad("size", 2 ** 64), "size is out of range"),
    "mtime null": (_bad("mtime_ns", None), "mtime_ns must be a whole number"),
    "files negative": (_bad("files", -3), "files is out of range"),
    "unpacked string": (_bad("unpacked_bytes", "0"), "unpacked_bytes must be a whole number"),
    "format zip": (_bad("format", "zip"), "format must be one of"),
    "format int": (_bad("format", 3), "format must be a string"),
    "archive path": (_bad("archive", "../x.tar.zst"), "archive must be a file name"),
    "archive empty": (_bad("archive", ""), "archive must be a file name"),
    "prefix int": (_bad("prefix", 5), "prefix must be a string"),
    "prefix NUL": (_bad("prefix", "/a\0b"), "prefix contains a NUL"),
    "fingerprint null": (_bad("fingerprint", None), "fingerprint must be a string"),
    "seconds string": (_bad("pack_seconds", "1"), "pack_seconds must be a number"),
    "seconds nan": (_bad("pack_seconds", math.nan), "pack_seconds must be a number"),
    "seconds negative": (_bad("pack_seconds", -1), "pack_seconds must be a number"),
    "version string": (_bad("meta_version", "1"), "meta_version must be a whole number"),
    "version missing": (lambda m: m.pop("meta_version"), "meta_version must be a whole number"),
    "unknown field name": (_bad("Extra-Field", 1), "unknown field 'Extra-Field' is not a field"),
    "unknown field long": (_bad("x" * 33, 1), "is not a field name"),
    "unknown fields many": (lambda m: m.update({f"later_{i}": i for i in range(17)}),
                            "more than 16 fields this conda-stage does not know"),
    "missing field": (lambda m: m.pop("size"), "field 'size' is missing"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_sidecar_is_one_line_for_that_environment(tmp_path, staging, name):
    mutate, reason = MALFORMED[name]
    good = make_env(tmp_path / "envs", "good")
    bad = make_env(tmp_path / "envs", "bad")
    meta = good_meta_dict(bad)
    mutate(meta)
    sidecar_of(bad).write_text(json.dumps(meta))
    with pytest.raises(MalformedSidecar, match=reason.replace("[", r"\[")):
        parse_meta(sidecar_of(bad).read_bytes())
    with pytest.raises(StageError) as info:
        stage(bad, base=staging, repack=False)
    message = str(info.value)
    assert message.startswith(f"its sidecar {sidecar_of(bad)} is malformed: ")
    assert reason in message and message.endswith(
        f"; run 'conda stage --pack --force {bad.prefix}'")
    assert "\n" not in message
    # The other environment of the same job is not affected.
    assert stage(good, base=staging, repack=False).name == "good"


@pytest.mark.parametrize("data, reason", [
    (b"", "not valid JSON"),
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b"[1, 2]", "not a JSON object but list"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"{" + b'"a":[],' * (MAX_RECORDS + 100) + b'"b":1}', "more values than"),
    (b"[0" + b",0" * (4 * MAX_RECORDS + 100) + b"]", "more values than"),
])
def test_sidecar_that_is_not_a_json_object(tmp_path, data, reason):
    with pytest.raises(MalformedSidecar, match=reason):
        parse_meta(data)


def test_fields_of_a_later_version_are_ignored(tmp_path, staging):
    """A rolling upgrade: a sidecar written by a later conda-stage of the same
    format version, with fields this one does not know, still stages."""
    env = make_env(tmp_path / "envs", "later")
    meta = good_meta_dict(env)
    plain = parse_meta(json.dumps(meta).encode())
    meta.update({"compression_level": 3, "later_info": {"nested": [1, 2]}, "note": None})
    sidecar_of(env).write_text(json.dumps(meta))
    assert parse_meta(sidecar_of(env).read_bytes()) == plain
    assert stage(env, base=staging, repack=False).name == "later"


def test_sidecar_of_another_version_needs_a_repack_not_a_force(env, staging):
    meta = good_meta_dict(env)
    meta["meta_version"] = 2
    sidecar_of(env).write_text(json.dumps(meta))
    with pytest.raises(OtherMetaVersion):
        parse_meta(sidecar_of(env).read_bytes())
    with pytest.raises(StageError, match=r"its tarball must be rebuilt first, because its "
                                         r"sidecar was written by another conda-stage version"):
        stage(env, base=staging, repack=False)


def test_sidecar_describing_another_tarball(env, staging):
    meta = good_meta_dict(env)
    meta["archive"] = "other.tar.zst"
    sidecar_of(env).write_text(json.dumps(meta))
    with pytest.raises(StageError, match=r"because its sidecar describes another tarball "
                                         r"\(other.tar.zst, not myenv.tar.zst\)"):
        stage(env, base=staging, repack=False)


def test_sidecar_not_matching_its_tarball(env, staging):
    meta = good_meta_dict(env)
    meta["size"] += 1
    sidecar_of(env).write_text(json.dumps(meta))
    with pytest.raises(StageError, match=r"because its tarball changed after it was packed"):
        stage(env, base=staging, repack=False)


def test_missing_sidecar_and_tarball(tmp_path, staging):
    env = make_env(tmp_path / "envs")
    sidecar_of(env).unlink()
    with pytest.raises(StageError, match="because its tarball has no valid conda-stage metadata"):
        stage(env, base=staging, repack=False)
    Tarball.at(env, "tar.zst").path.unlink()
    with pytest.raises(StageError, match="because it hasn't been done before"):
        stage(env, base=staging, repack=False)


def test_stale_tarball_message_is_unchanged(env, staging):
    (env.prefix / "conda-meta" / "other-2.0-0.json").write_text("{}")
    with pytest.raises(StageError, match=r"^its tarball must be rebuilt first, because the "
                                         r"environment changed since it was packed \(run "
                                         r"'conda stage --pack "):
        stage(env, base=staging, repack=False)


@pytest.mark.parametrize("make, reason", [
    (fifo, "it is a FIFO (named pipe), not a regular file"),
    (lambda p: p.write_bytes(b" " * 2048), "it is larger than 1 KiB"),
])
def test_fifo_or_oversized_sidecar(env, staging, monkeypatch, make, reason):
    monkeypatch.setattr(tarball_mod, "SIDECAR_LIMIT", 1024)
    sidecar_of(env).unlink()
    make(sidecar_of(env))
    result = promptly(stage, env, base=staging, repack=False)
    assert result[:2] == ("raised", "StageError"), result
    assert result[2] == (f"its sidecar {sidecar_of(env)} is malformed: {reason}; "
                         f"run 'conda stage --pack --force {env.prefix}'")


def test_fifo_tarball_is_refused_not_waited_on(env, staging):
    tb = Tarball.at(env, "tar.zst")
    tb.path.unlink()
    fifo(tb.path)
    result = promptly(stage, env, base=staging, repack=False)
    assert result[:2] == ("raised", "NotRegularFile"), result
    assert result[2] == f"Refusing tarball {tb.path}: it is a FIFO (named pipe), not a regular file"
    assert os.listdir(staging) == []


def test_fifo_lock_file_fails_staging_promptly(env, staging):
    fifo(Tarball.lock_for(env))
    result = promptly(stage, env, base=staging, repack=False)
    assert result[:2] == ("raised", "NotRegularFile"), result
    assert "Refusing lock file" in result[2]


# -- property tests
_json = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2 ** 70, max_value=2 ** 70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=4),
    max_leaves=12)
_FIELDS = [f for f in Meta.__dataclass_fields__] + ["extra"]
_path_part = st.sampled_from(["bin", "lib", "a b", "..", ".", "", "x\0y", "é", "/"])
_record = st.one_of(
    _json,
    st.lists(st.one_of(st.text(max_size=10), _json), min_size=0, max_size=4),
    st.tuples(st.lists(_path_part, min_size=1, max_size=4).map("/".join),
              st.one_of(st.text(max_size=20), st.just(PLACEHOLDER), _json),
              st.sampled_from(["text", "binary", "", "TEXT", None])).map(list),
)


def _mutations():
    field_change = st.tuples(st.just("set"), st.sampled_from(_FIELDS), _json)
    drop = st.tuples(st.just("drop"), st.sampled_from(_FIELDS), st.none())
    record = st.tuples(st.just("record"), st.just("records"), _record)
    return st.lists(st.one_of(field_change, drop, record), min_size=1, max_size=4)


def _apply(meta: dict, mutations) -> dict:
    meta = json.loads(json.dumps(meta))
    for op, key, value in mutations:
        if op == "set":
            meta[key] = value
        elif op == "drop":
            meta.pop(key, None)
        else:
            meta["records"] = meta.get("records", []) + [value] \
                if isinstance(meta.get("records"), list) else [value]
    return meta


def _assert_sane(meta: Meta) -> None:
    """What staging relies on, for any Meta parse_meta returns."""
    for key in ("size", "mtime_ns", "files", "unpacked_bytes"):
        value = getattr(meta, key)
        assert type(value) is int and 0 <= value < 2 ** 63
    assert meta.format in ("tar.zst", "tar.gz")
    assert isinstance(meta.pack_seconds, float) and math.isfinite(meta.pack_seconds)
    for key in ("archive", "prefix", "fingerprint", "tool_version", "created"):
        assert isinstance(getattr(meta, key), str) and "\0" not in getattr(meta, key)
    for path, placeholder, mode in meta.records:
        assert path and not path.startswith("/") and all(
            p not in ("", ".", "..") for p in path.split("/"))
        assert placeholder.startswith("/") and len(placeholder) > 1 and mode in ("text", "binary")
    meta.max_prefix_length
    Relocator(meta.records, "/new/prefix")


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=_mutations())
def test_parse_meta_accepts_only_sane_sidecars(env, mutations):
    data = json.dumps(_apply(good_meta_dict(env), mutations)).encode()
    try:
        meta = parse_meta(data)
    except (MalformedSidecar, OtherMetaVersion) as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    _assert_sane(meta)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300) | _json.map(lambda v: json.dumps(v).encode()))
def test_parse_meta_of_arbitrary_bytes_never_crashes(data):
    try:
        _assert_sane(parse_meta(data))
    except (MalformedSidecar, OtherMetaVersion):
        pass


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=_mutations())
def test_staging_with_any_sidecar_fails_only_with_a_stage_error(env, tmp_path, mutations):
    meta = _apply(good_meta_dict(env), mutations)
    sidecar_of(env).write_text(json.dumps(meta))
    base = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        staged = stage(env, base=base, repack=False)
    except StageError as exc:
        assert "\n" not in str(exc)
    else:
        assert (staged / MARKER).is_file()


# ---------------------------------------------------------------- stage
def test_deadline_passed_before_staging(env, staging):
    with pytest.raises(StageError, match="the time allowed for staging ran out before its "
                                         "tarball could be read"):
        stage(env, base=staging, repack=False, deadline=time.monotonic() - 1)
    assert os.listdir(staging) == []


def test_deadline_bounds_the_wait_for_a_packing_process(env, staging):
    started = multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold, args=(Tarball.lock_for(env), 30, started))
    holder.start()
    try:
        assert started.wait(10)
        result = promptly(stage, env, base=staging, repack=False, lock_timeout=600,
                          deadline=time.monotonic() + 0.5, timeout=5)
        assert result[:2] == ("raised", "LockTimeout"), result
    finally:
        holder.kill()
        holder.join(10)


def test_deadline_is_passed_on_to_extract(env, staging, monkeypatch):
    seen = {}

    def fake_extract(stream, dest, **kwargs):
        seen.update(kwargs)
        return extract(stream, dest, **kwargs)

    monkeypatch.setattr(stage_mod, "extract", fake_extract)
    deadline = time.monotonic() + 600
    stage(env, base=staging, repack=False, deadline=deadline)
    assert seen["deadline"] == deadline


def test_extraction_past_the_deadline_leaves_nothing(env, staging, monkeypatch):
    def late(stream, dest, **kwargs):
        time.sleep(max(0.0, kwargs["deadline"] - time.monotonic()) + 0.05)
        return extract(stream, dest, **kwargs)

    monkeypatch.setattr(stage_mod, "extract", late)
    with pytest.raises(StageError):
        stage(env, base=staging, repack=False, deadline=time.monotonic() + 1)
    assert os.listdir(staging) == []


def test_space_check_uses_at_least_the_tarball_whatever_the_sidecar_says(env, staging,
                                                                         monkeypatch):
    meta = good_meta_dict(env)
    meta["unpacked_bytes"] = 0  # used to turn the check off
    sidecar_of(env).write_text(json.dumps(meta))
    asked, real = [], stage_mod._check_space
    monkeypatch.setattr(stage_mod, "_check_space", lambda folder, n, files: asked.append((n, files)))
    stage(env, base=staging, repack=False)
    assert asked == [(Tarball.at(env, "tar.zst").path.stat().st_size, meta["files"])]
    with pytest.raises(StageError, match=r"not enough free space on the local disk \(.*\): the "
                                         r"copy needs \d+ MB, \d+ MB are free"):
        real(staging, 1 << 62, 0)
    with pytest.raises(StageError, match=r"not enough free inodes on the local disk \(.*\): "
                                         r"the copy needs \d+ files"):
        real(staging, 0, 1 << 62)


def test_failed_extraction_leaves_no_partial_folder(env, staging, monkeypatch):
    def broken(stream, dest, **kwargs):
        os.mkdir(dest)
        (Path(dest) / "half").write_text("x")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stage_mod, "extract", broken)
    with pytest.raises(OSError):
        stage(env, base=staging, repack=False)
    assert os.listdir(staging) == []


def test_partial_folder_name(env, staging, monkeypatch):
    names = []

    def spy(stream, dest, **kwargs):
        names.append(dest)
        return extract(stream, dest, **kwargs)

    monkeypatch.setattr(stage_mod, "extract", spy)
    staged = stage(env, base=staging, repack=False)
    assert names == [str(staged.parent / f".{env.name}.partial-{os.getpid()}")]
    assert staged.parent.parent == staging and staged.parent.name.startswith("conda-stage-")


def test_open_tarball_reports_why_not(env):
    Tarball.at(env, "tar.zst").path.unlink()
    opened = open_tarball(env)
    assert opened.fh is None and opened.sidecar.problem == "its tarball is missing"


# ---------------------------------------------------------------- settings, marker
def test_fifo_auto_stage_conf_is_refused(env):
    conf = env.prefix / CONF
    fifo(conf)
    result = promptly(read_conf, env.prefix)
    assert result[:2] == ("raised", "NotRegularFile") and "auto-staging settings" in result[2]
    conf.unlink()
    assert read_conf(env.prefix) == {}
    conf.write_text("quiet=1\nwritable=0\n")
    assert read_conf(env.prefix) == {"quiet": "1", "writable": "0"}


@pytest.mark.parametrize("content", [
    None,  # a FIFO
    b"[]", b"{not json", b'{"original": 1, "name": "x", "mode": "interactive"}',
    b'{"original": "/o", "name": "x", "mode": "weird"}',
    b'{"original": "/o", "name": "x", "mode": "interactive", "owner_pid": -5}',
    b'{"original": "/o", "name": "x", "mode": "interactive", "owner_pid": "12"}',
    b'{"original": "/o", "name": "x", "mode": "interactive", "owner_start": NaN}',
    b'{"original": "/o", "name": "x", "mode": "job", "unknown": 1}',
    b'{"original": "/o", "mode": "job"}',
    b'{"original": "/o", "name": "x", "mode": "job"}' + b" " * (64 << 10),
])
def test_bad_markers_are_no_markers(tmp_path, content):
    copy = tmp_path / "copy"
    copy.mkdir()
    if content is None:
        fifo(copy / MARKER)
    else:
        (copy / MARKER).write_bytes(content)
    assert promptly(read_marker, copy) == ("ok", None)


def test_good_marker_is_read(tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / MARKER).write_text(json.dumps({"original": "/o", "name": "x", "mode": "interactive",
                                           "owner_pid": 12, "owner_start": 1.5}))
    assert read_marker(copy).owner_pid == 12


# ---------------------------------------------------------------- CLI
def _cli(argv, *, user=None, env=None, timeout=60):
    """Run the checkout's conda-stage, as ``user`` (via runuser) or root."""
    environ = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": "/nonexistent",
               **(env or {})}
    cmd = ["env", "-i"] + [f"{k}={v}" for k, v in environ.items()] + \
          [sys.executable, "-m", "conda_stage"] + argv
    if user is not None:
        cmd = ["runuser", "-u", user, "--"] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")


@pytest.fixture
def shared_env():
    """An environment owned by root in a folder others can read but not write."""
    base = Path(tempfile.mkdtemp(prefix="cs-userfiles-", dir="/var/tmp"))
    base.chmod(0o755)
    env = make_env(base / "envs", "rootenv")
    for p in [base / "envs", *(base / "envs").rglob("*")]:
        if p.is_dir():
            p.chmod(0o755)
    tmp = base / "nobody-tmp"
    tmp.mkdir()
    os.chown(tmp, 65534, 65534)
    yield env, tmp
    subprocess.run(["rm", "-rf", str(base)], check=False)


def _one_error(r) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another user")
def test_other_users_environment_gives_one_line_no_traceback(shared_env):
    env, tmp = shared_env
    user_env = {"TMPDIR": str(tmp)}
    # Fresh tarball: staging someone else's environment just works.
    r = _cli(["--stage", str(env.prefix)], user="nobody", env=user_env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(f"{tmp}/conda-stage-")
    # Stale tarball: it cannot be rebuilt by this user; one line says so.
    (env.prefix / "conda-meta" / "new-1.0-0.json").write_text("{}")
    r = _cli(["--stage", str(env.prefix)], user="nobody", env=user_env)
    assert r.returncode == 1
    line = _one_error(r)
    assert "its tarball must be rebuilt, because the environment changed since it was packed, " \
           f"but you cannot write to {env.prefix.parent}; ask the environment's owner" in line
    r = _cli(["--pack", str(env.prefix)], user="nobody", env=user_env)
    assert r.returncode == 1
    assert "Permission denied" in _one_error(r)
    r = _cli(["--auto-stage=disable", str(env.prefix)], user="nobody", env=user_env)
    assert r.returncode == 1
    assert _one_error(r).startswith("ERROR: Cannot create or open lock file ")
    r = _cli(["status", str(env.prefix)], user="nobody", env=user_env)
    assert r.returncode == 0 and "stale: the environment changed" in r.stdout


def test_cli_with_fifo_condarc_returns(tmp_path):
    home = tmp_path / "home"
    fifo(home / ".condarc")
    r = _cli(["status", "no-such-env"], env={"HOME": str(home)}, timeout=30)
    assert r.returncode == 1
    assert _one_error(r).startswith("ERROR: Conda environment 'no-such-env' not found")


def test_cli_malformed_sidecar_is_one_line(env):
    meta = good_meta_dict(env)
    meta["records"].append(["bin/x", "/ph"])
    sidecar_of(env).write_text(json.dumps(meta))
    r = _cli(["status", str(env.prefix)])
    assert r.returncode == 0, r.stderr
    assert f"its sidecar {sidecar_of(env)} is malformed: record 1 must be" in r.stdout


def test_cli_oserrors_are_one_line_even_einval(env, monkeypatch, capsys):
    import conda_stage.status as status

    for err in (errno.EINVAL, errno.EIO, errno.EACCES):
        def boom(env, base=None, err=err):
            raise OSError(err, os.strerror(err), "/some/where\nforged")

        monkeypatch.setattr(status, "status_lines", boom)
        code = cli.main(["conda-stage", "status", str(env.prefix)])
        captured = capsys.readouterr().err
        assert code == 1, captured
        assert captured.strip().splitlines()[-1] == \
            f"ERROR: {os.strerror(err)}: /some/where\\x0aforged"


def test_cli_unexpected_error_is_one_line(env, monkeypatch, capsys):
    import conda_stage.status as status

    monkeypatch.setattr(status, "status_lines", lambda env, base=None: 1 / 0)
    code = cli.main(["conda-stage", "status", str(env.prefix)])
    err = capsys.readouterr().err
    assert code == 70 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("ERROR: Internal error: ZeroDivisionError")


def test_tarball_or_sidecar_planted_by_someone_else_is_refused(tmp_path):
    """Next to a shared environment, another user's tarball or sidecar (or a
    world-writable one) is never staged from."""
    from conda_stage.resolve import Env
    from conda_stage.userfiles import check_planted as _check_planted
    from conda_stage.tarball import Tarball

    prefix = tmp_path / "envs" / "shared"
    (prefix / "conda-meta").mkdir(parents=True)
    env = Env(prefix, "shared")
    tarball = Tarball.at(env, "tar.zst")
    tarball.path.write_bytes(b"x")
    tarball.meta_path.write_text("{}")
    _check_planted(env, tarball, os.stat(tarball.path))  # the owner's own: fine
    for path, change in ((tarball.path, lambda p: os.chown(p, 65534, 65534)),
                         (tarball.meta_path, lambda p: os.chown(p, 65534, 65534)),
                         (tarball.path, lambda p: p.chmod(0o666))):
        change(path)
        with pytest.raises(StageError, match="Not using the"):
            _check_planted(env, tarball, os.stat(tarball.path))
        os.chown(path, 0, 0)
        path.chmod(0o644)
