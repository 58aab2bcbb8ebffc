"""Every .pyc in a staged copy is valid for its .py (issue 11).

Unit tests on small synthetic trees (the interpreter is the one running the
tests): stale .pyc files are found and replaced in the archive, and only
those; the environment is never written to; relocated .py files get their
.pyc recompiled before the copy is sealed.  Then, against the real conda
fixture, ``python -v`` in a staged copy -- staged by the CLI and as the root
prolog's child does it -- must not compile any module of the copy from
source.
"""
import hashlib
import importlib.util
import io
import json
import marshal
import os
import py_compile
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import namedtuple
from pathlib import Path

import pytest
import zstandard

from conda_stage import bytecode, formats, pack
from conda_stage.extract import extract
from conda_stage.relocate import Relocator

TAG = sys.implementation.cache_tag
MAGIC = importlib.util.MAGIC_NUMBER
File = namedtuple("File", "source target file_mode")  # what conda-pack's File offers
TIMESTAMP = py_compile.PycInvalidationMode.TIMESTAMP
CHECKED = py_compile.PycInvalidationMode.CHECKED_HASH


def _pyc(py: Path, opt: int = 0) -> Path:
    return Path(importlib.util.cache_from_source(str(py), optimization=opt or ""))


def _compile(py: Path, opt: int = 0, mode=TIMESTAMP) -> Path:
    cfile = _pyc(py, opt)
    py_compile.compile(str(py), cfile=str(cfile), doraise=True, optimize=opt, invalidation_mode=mode)
    return cfile


def valid(py: Path, pyc: Path) -> bool:
    """Whether Python would use ``pyc`` for ``py`` (importlib's checks)."""
    head = pyc.read_bytes()[:16]
    if len(head) < 16 or head[:4] != MAGIC:
        return False
    flags = int.from_bytes(head[4:8], "little")
    if flags & 1:
        return head[8:16] == importlib.util.source_hash(py.read_bytes())
    st = py.stat()
    return (head[8:12] == (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
            and head[12:16] == (st.st_size & 0xFFFFFFFF).to_bytes(4, "little"))


def snapshot(root: Path) -> dict:
    """Every entry below ``root``: type, mode, mtime, size and content hash."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            digest = None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as fh:
                    digest = hashlib.sha1(fh.read()).hexdigest()
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_mtime_ns, st.st_size, digest)
    return out


def test_header_checks():
    key = (1_700_000_000, 123)

    def head(magic=MAGIC, flags=0, mtime=key[0], size=key[1]):
        return magic + flags.to_bytes(4, "little") + mtime.to_bytes(4, "little") + size.to_bytes(4, "little")

    assert not bytecode.header_is_stale(head(), MAGIC, *key)
    assert bytecode.header_is_stale(head(mtime=key[0] + 1), MAGIC, *key)
    assert bytecode.header_is_stale(head(size=key[1] + 1), MAGIC, *key)
    assert bytecode.header_is_stale(head(magic=b"\0\0\r\n"), MAGIC, *key)
    assert bytecode.header_is_stale(head()[:12], MAGIC, *key)
    assert bytecode.header_is_stale(head(flags=4), MAGIC, *key)  # Python refuses unknown flags
    assert not bytecode.header_is_stale(head(flags=1, mtime=0, size=0), MAGIC, *key)  # hash-based
    assert not bytecode.header_is_stale(head(flags=3, mtime=0, size=0), MAGIC, *key)
    # Python compares the low 32 bits of the whole-second mtime and of the size
    assert not bytecode.header_is_stale(head(mtime=5), MAGIC, (1 << 32) + 5, key[1])


def test_candidates_are_pairs_packed_as_they_are():
    files = [File("/c/a.py", "lib/a.py", None), File("/c/a.pyc", f"lib/__pycache__/a.{TAG}.pyc", None),
             File("/c/a1.pyc", f"lib/__pycache__/a.{TAG}.opt-1.pyc", None),
             File("/c/o.pyc", "lib/__pycache__/a.cpython-27.pyc", None),  # another Python's
             File("/c/n.pyc", f"lib/__pycache__/nosource.{TAG}.pyc", None),
             File("/c/t.py", "t.py", "text"), File("/c/t.pyc", f"__pycache__/t.{TAG}.pyc", None),
             File("/c/s.py", "bin/s.py", "text"),  # conda-pack may rewrite its shebang
             File("/c/s.pyc", f"bin/__pycache__/s.{TAG}.pyc", None),
             File("/c/u.py", "bin/u.py", "unknown"),
             File("/c/u.pyc", f"bin/__pycache__/u.{TAG}.pyc", None)]
    found = {(c.pyc_target, c.py_target, c.opt) for c in bytecode.candidates(files, TAG)}
    assert found == {(f"lib/__pycache__/a.{TAG}.pyc", "lib/a.py", 0),
                     (f"lib/__pycache__/a.{TAG}.opt-1.pyc", "lib/a.py", 1),
                     (f"__pycache__/t.{TAG}.pyc", "t.py", 0)}


@pytest.fixture
def env(tmp_path):
    """A small 'environment' whose bin/python is the interpreter running the
    tests, with fresh, stale and hash-based .pyc files."""
    root = tmp_path / "env"
    lib = root / "lib"
    (root / "bin").mkdir(parents=True)
    os.symlink(sys.executable, root / "bin/python")
    (lib / "pkg").mkdir(parents=True)
    t = 1_700_000_000

    def module(name, text, at=t):
        py = lib / name
        py.write_text(text)
        os.utime(py, (at + 0.5, at + 0.5))
        return py

    _compile(module("fresh.py", "X = 'fresh'\n"))
    touched = module("touched.py", "X = 'touched'\n")
    _compile(touched)
    os.utime(touched, (t + 100, t + 100))  # stale: source mtime
    resized = module("resized.py", "X = 'resized'\n")
    _compile(resized)
    module("resized.py", "X = 'resized, longer'\n")  # stale: size (same mtime)
    opt = module("optimized.py", "X = 'optimized'\nassert X, 'left out with -O'\n", at=t - 50)
    _compile(opt, 1)  # stale: compiled for the older mtime
    os.utime(opt, (t, t))
    _compile(opt)  # fresh
    hashed = module("hashed.py", "X = 'hashed'\n")
    _compile(hashed, mode=CHECKED)
    module("hashed.py", "X = 'hashed, changed'\n")  # left alone: hash-based
    init = module("pkg/__init__.py", "X = 'pkg'\n")
    _compile(init)
    os.utime(init, (t + 7, t + 7))
    magic = module("magic.py", "X = 'magic'\n")
    pyc = _compile(magic)
    pyc.write_bytes(b"\0\0\r\n" + pyc.read_bytes()[4:])  # another Python's magic number
    broken = module("broken.py", "def broken(:\n")
    _pyc(broken).write_bytes(_pyc(lib / "fresh.py").read_bytes())  # stale, and cannot compile
    orphan = module("orphan.py", "X = 'orphan'\n")
    _compile(orphan)
    orphan.unlink()  # a .pyc without its source: not ours to judge
    os.chmod(_pyc(touched), 0o444)
    # conda-pack takes conda's files from the package cache: stale there, but
    # Python already rewrote the environment's copy (valid: packed as it is) --
    # unless that copy is hash-based (its validity is not known: compiled).
    for name, mode in (("reused.py", TIMESTAMP), ("hashenv.py", CHECKED)):
        py = module(name, f"X = {name!r}\n")
        cached = tmp_path / "pkgs" / "lib" / name
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(py, cached)
        _pyc(cached).parent.mkdir(exist_ok=True)
        _pyc(cached).write_bytes(_pyc(lib / "fresh.py").read_bytes())  # stale
        _compile(py, mode=mode)
    return root


#: Files whose source is in the package cache (``tmp_path/pkgs``).
CACHED = {f"lib/{n}.py" for n in ("reused", "hashenv")} | {
    f"lib/__pycache__/{n}.{TAG}.pyc" for n in ("reused", "hashenv")}


def _files(root: Path) -> list:
    out = []
    for dirpath, _dirs, names in os.walk(root):
        for name in sorted(names):
            target = os.path.relpath(os.path.join(dirpath, name), root)
            base = root.parent / "pkgs" if target in CACHED else root
            out.append(File(str(base / target), target, None))
    return out


def _pack(root: Path, threads: int = 1) -> tuple[bytes, bytecode.PackRepair]:
    files = _files(root)
    repair = bytecode.PackRepair.start(root)
    assert repair is not None
    try:
        assert repair.plan(files, threads=threads)
        buf = io.BytesIO()
        writer = pack._TarWriter(buf, None, repair)
        for f in files:
            writer.add(f.source, f.target)
        writer.add_deferred()
        writer.close()
        assert writer.files == len(files)
    finally:
        repair.close()
    return buf.getvalue(), repair


def test_stale_pyc_are_replaced_in_the_archive_and_only_they(env, tmp_path, monkeypatch, capsys):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    before = snapshot(env), snapshot(tmp_path / "pkgs")
    data, repair = _pack(env)
    assert (snapshot(env), snapshot(tmp_path / "pkgs")) == before, \
        "packing wrote into the environment or the package cache"
    assert os.listdir(scratch) == [], "the temporary folder was left behind"

    out = tmp_path / "out"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        tar.extractall(out)
    assert sorted(names) == sorted(f.target for f in _files(env))  # each once, nothing added
    lib, orig = out / "lib", env / "lib"

    def same(py, opt=0):
        return _pyc(lib / py, opt).read_bytes() == _pyc(orig / py, opt).read_bytes()

    for py, opt in (("touched.py", 0), ("resized.py", 0), ("optimized.py", 1),
                    ("pkg/__init__.py", 0), ("magic.py", 0)):
        assert not valid(orig / py, _pyc(orig / py, opt)), py  # the fixture is stale ...
        assert valid(lib / py, _pyc(lib / py, opt)), py  # ... the archive is not
    cache = tmp_path / "pkgs" / "lib"
    for py in ("reused.py", "hashenv.py"):
        assert not valid(cache / py, _pyc(cache / py)) and valid(lib / py, _pyc(lib / py)), py
    assert same("reused.py")  # the environment's own valid copy, not compiled again
    assert not same("hashenv.py")  # compiled
    # the seven above, and broken.py; one of them taken from the environment
    assert (repair.stale, repair.checked, repair.reused) == (8, 11, 1)
    for py, opt in (("fresh.py", 0), ("optimized.py", 0), ("hashed.py", 0), ("broken.py", 0)):
        assert same(py, opt), py  # valid, hash-based, or not compilable: as they were
    assert _pyc(lib / "orphan.py").read_bytes() == _pyc(orig / "orphan.py").read_bytes()
    assert stat.S_IMODE(os.stat(_pyc(lib / "touched.py")).st_mode) == 0o444  # mode kept
    err = capsys.readouterr().err
    assert len([ln for ln in err.splitlines() if "broken.py" in ln]) == 1, err
    assert "WARNING: Could not compile fresh bytecode for lib/broken.py (SyntaxError" in err

    # Python itself agrees: nothing in the extracted tree is compiled from source.
    for flags, mods in (([], "fresh, touched, resized, optimized, pkg, magic, reused, hashenv"),
                        (["-O"], "optimized")):
        r = subprocess.run([sys.executable, "-B", "-v", *flags, "-c", f"import {mods}"], cwd=out,
                           env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(lib)},
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert not from_source(r.stderr, out), from_source(r.stderr, out)
        assert f"{_pyc(lib / 'optimized.py', 1 if flags else 0)} matches" in r.stderr


def test_checks_in_threads_pack_the_same(env, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    one, r1 = _pack(env)
    many, r8 = _pack(env, threads=8)
    assert one == many and (r1.stale, r1.checked, r1.reused) == (r8.stale, r8.checked, r8.reused)


def test_the_interpreters_answer_is_checked_again(env, tmp_path, monkeypatch):
    """The interpreter only points at candidates: a .pyc it calls stale that
    is valid is packed as it is; finish() reads its answer when nothing was
    packed."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    files = _files(env)
    repair = bytecode.PackRepair.start(env)
    try:
        assert repair.plan(files)
        every = list(range(repair.checked))
        fresh = [c.pyc_target for c in repair._found if c.pyc_target.endswith(f"fresh.{TAG}.pyc")]
        with monkeypatch.context() as m:
            m.setattr(bytecode, "_read_line", lambda proc, deadline: json.dumps(
                {"stale": every + [-1, 10 ** 6]}).encode())
            assert fresh and not repair.defer(fresh[0])
        assert repair.stale == 0 and repair._stale  # the stale ones are, this one is not
    finally:
        repair.close()
    repair = bytecode.PackRepair.start(env)
    try:
        assert repair.plan(files)
        t0 = time.monotonic()
        assert list(repair.finish()) == [] and time.monotonic() - t0 < 30
    finally:
        repair.close()


def test_environment_without_python_is_packed_as_it_is(tmp_path):
    (tmp_path / "env/bin").mkdir(parents=True)
    assert bytecode.PackRepair.start(tmp_path / "env") is None


def test_no_temporary_folder_means_bytecode_packed_as_it_is(env, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    assert bytecode.PackRepair.start(env) is None
    assert "WARNING: Not checking the bytecode of" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_root_does_not_run_another_users_python(env, capsys):
    os.chown(env, 65534, 65534)
    assert bytecode.PackRepair.start(env) is None
    assert "does not run another user's Python" in capsys.readouterr().err
    assert bytecode.recompile_relocated(str(env), "/x", ["lib/touched.py"],
                                        original_prefix=env) == 0


# ------------------------------------------------------------------ staging
PLACEHOLDER = "/opt/placeholder_" + "x" * 60
MTIME = 1_600_000_000


def _member(tar, name, data: bytes, mode=0o644):
    ti = tarfile.TarInfo(name)
    ti.mtime, ti.mode, ti.size = MTIME, mode, len(data)
    tar.addfile(ti, io.BytesIO(data))


def _archive(tmp_path) -> bytes:
    """An archive as conda-pack would make it: .py files holding the
    placeholder, with .pyc files valid for them as packed."""
    src = tmp_path / "src"
    (src / "lib").mkdir(parents=True)
    sources = {
        "reloc.py": f"PREFIX = {PLACEHOLDER!r}\n",
        "hashed.py": f"PREFIX = {PLACEHOLDER!r}\n",
        "plain.py": "PREFIX = None\n",
        "nopyc.py": f"PREFIX = {PLACEHOLDER!r}\n",
        "bad.py": f"PREFIX = {PLACEHOLDER!r}\ndef bad(:\n",
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _member(tar, "bin/python", f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n".encode(),
                0o755)
        for name, text in sources.items():
            py = src / "lib" / name
            py.write_text(text)
            os.utime(py, (MTIME, MTIME))
            _member(tar, f"lib/{name}", text.encode())
            if name == "nopyc.py":
                continue
            if name == "bad.py":
                pyc_data = b"not really bytecode"
            else:
                pyc_data = _compile(py, mode=CHECKED if name == "hashed.py" else TIMESTAMP).read_bytes()
            _member(tar, f"lib/__pycache__/{name[:-3]}.{TAG}.pyc", pyc_data, 0o444)
    return zstandard.ZstdCompressor().compress(buf.getvalue())


def _stage(tmp_path, hook):
    records = [(f"lib/{n}", PLACEHOLDER, "text") for n in
               ("reloc.py", "hashed.py", "plain.py", "nopyc.py", "bad.py")]
    dest = tmp_path / "copy"
    final = "/final/prefix"
    with formats.decompressor(io.BytesIO(_archive(tmp_path)), "tar.zst") as stream:
        stats = extract(stream, str(dest), relocator=Relocator(records, final), before_seal=hook)
    return dest, final, stats


def test_relocated_sources_get_fresh_bytecode_before_the_copy_is_sealed(tmp_path, capsys):
    seen = {}

    def hook(dest, stats):
        seen["writable"] = os.stat(os.path.join(dest, "lib/__pycache__")).st_mode & 0o200
        seen["done"] = bytecode.recompile_relocated(dest, final, stats.rewritten,
                                                    original_prefix=dest)

    final = "/final/prefix"
    dest, final, stats = _stage(tmp_path, hook)
    lib = dest / "lib"
    assert sorted(stats.rewritten) == ["lib/bad.py", "lib/hashed.py", "lib/nopyc.py", "lib/reloc.py"]
    assert seen == {"writable": 0o200, "done": 2}
    assert not os.stat(lib / "__pycache__").st_mode & 0o222  # sealed afterwards

    reloc = _pyc(lib / "reloc.py").read_bytes()
    assert valid(lib / "reloc.py", _pyc(lib / "reloc.py"))
    assert reloc[4:8] == b"\0\0\0\0"  # still timestamp-based
    code = marshal.loads(reloc[16:])
    assert code.co_filename == "/final/prefix/lib/reloc.py"
    scope = {}
    exec(code, scope)
    assert scope["PREFIX"] == final  # compiled from the relocated source
    hashed = _pyc(lib / "hashed.py").read_bytes()
    assert hashed[4:8] == (3).to_bytes(4, "little") and valid(lib / "hashed.py", _pyc(lib / "hashed.py"))
    for name in ("reloc.py", "hashed.py"):
        assert stat.S_IMODE(os.stat(_pyc(lib / name)).st_mode) == 0o444
    assert valid(lib / "plain.py", _pyc(lib / "plain.py"))  # not rewritten, not touched
    assert _pyc(lib / "bad.py").read_bytes() == b"not really bytecode"
    assert not _pyc(lib / "nopyc.py").exists()  # no .pyc is made where there was none
    assert sorted(os.listdir(lib / "__pycache__")) == sorted(
        f"{n}.{TAG}.pyc" for n in ("reloc", "hashed", "plain", "bad"))  # no temporary files
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "WARNING" in ln]
    assert len(lines) == 1 and "lib/bad.py" in lines[0] and "SyntaxError" in lines[0], err


def test_recompiling_stops_at_the_deadline(tmp_path, capsys):
    def hook(dest, stats):
        assert bytecode.recompile_relocated(dest, "/final/prefix", stats.rewritten,
                                            original_prefix=dest,
                                            deadline=time.monotonic() - 1) == 0

    dest, _, _ = _stage(tmp_path, hook)
    assert not valid(dest / "lib/reloc.py", _pyc(dest / "lib/reloc.py"))
    assert "the time budget ended" in capsys.readouterr().err


def test_a_copy_without_python_is_left_alone(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib/x.py").write_text("X = 1\n")
    assert bytecode.recompile_relocated(str(tmp_path), "/f", ["lib/x.py"],
                                        original_prefix=tmp_path) == 0


# ------------------------------------------------------------------ real conda
#: ``site`` (imported anyway), the relocated ``_sysconfigdata`` (through
#: sysconfig), standard-library modules whose .pyc the fixture's python
#: package ships stale, and pip (noarch: compiled when installed).
IMPORTS = ("import site, sysconfig, json, logging, argparse, concurrent.futures, ctypes, "
           "sqlite3, ssl, pip; sysconfig.get_config_vars(); import pip._internal.cli.main")


def from_source(verbose: str, root: Path) -> list:
    """Lines of ``python -v`` output showing that a module under ``root`` was
    compiled from source instead of loaded from its .pyc."""
    bad = []
    for line in verbose.splitlines():
        if re.search(r"bytecode is stale|bad magic number|could not create", line):
            bad.append(line)
        m = re.match(r"# code object from (.*)$", line)
        if m and not m.group(1).startswith("'") and m.group(1).startswith(f"{root}/"):
            bad.append(line)
    return bad


def check_copy(conda_site, conda_user, copy: Path) -> None:
    r = conda_site.run(conda_user, [copy / "bin/python", "-v", "-c", IMPORTS], cwd=copy)
    assert r.returncode == 0, r.stderr[-3000:]
    bad = from_source(r.stderr, copy)
    assert not bad, f"python -v shows bytecode not used ({len(bad)} lines):\n" + "\n".join(bad[:40])
    lib = copy / "lib/python3.11"
    matches = re.findall(r"^# (\S+) matches (\S+)$", r.stderr, re.M)
    sources = {src for _pyc_path, src in matches}
    for name in ("_sysconfigdata__linux_x86_64-linux-gnu.py", "logging/__init__.py",
                 "concurrent/futures/_base.py", "argparse.py"):
        assert str(lib / name) in sources, name  # loaded from a valid .pyc, in the copy
    assert any("/site-packages/pip/" in s for s in sources)


@pytest.fixture(scope="module")
def packed_env(conda_site, conda_user, stage_bin):
    """A fresh environment, packed by its owner with the CLI; packing must
    not write into it."""
    env = conda_site.create_env(conda_user)
    try:
        before = snapshot(env)
        r = conda_site.shell(conda_user, f'export PATH="{stage_bin}:$PATH"\n'
                                         f'conda-stage --pack {shlex.quote(str(env))}')
        assert r.returncode == 0, r.stderr
        assert snapshot(env) == before, "packing wrote into the environment"
        assert re.search(r"INFO: Packed fresh bytecode for \d+ stale \.pyc files", r.stderr), r.stderr
        yield env
    finally:
        shutil.rmtree(env, ignore_errors=True)
        for name in (f"{env.name}.tar.zst", f"{env.name}.conda-stage.json",
                     f".{env.name}.conda-stage.lock"):
            (env.parent / name).unlink(missing_ok=True)


@pytest.mark.conda
def test_copy_staged_by_the_cli_compiles_nothing_from_source(packed_env, conda_site, conda_user,
                                                             stage_bin, user_tmp):
    copy = user_tmp / "copy"
    r = conda_site.shell(conda_user, f'export PATH="{stage_bin}:$PATH"\n'
                                     f'conda-stage --stage --path {copy} {packed_env}')
    assert r.returncode == 0, r.stderr
    assert re.search(r"INFO: Recompiled [1-9]\d* \.pyc files of relocated \.py files", r.stderr), \
        r.stderr
    assert not os.stat(copy / "lib/python3.11/__pycache__").st_mode & 0o222
    check_copy(conda_site, conda_user, copy)


def _stage_like_the_prolog(prefix: str, dest: str, deadline: float) -> str:
    """Runs in the root prolog's way: a forked child, dropped to the job
    user, with the environment cleared."""
    from conda_stage.resolve import Env
    from conda_stage.stage import stage

    os.environ.clear()
    os.environ["PATH"] = "/usr/bin:/bin"
    path = stage(Env(Path(prefix), Path(prefix).name), path=Path(dest), name=Path(dest).name,
                 mode="job", job_id="4242", repack=False, deadline=deadline)
    return str(path)


@pytest.mark.conda
def test_copy_staged_by_the_prolog_child_compiles_nothing_from_source(
        packed_env, conda_site, conda_user, user_tmp, capfd):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    from conda_stage.privileges import Account, run_as

    copy = user_tmp / "job-copy"
    got = run_as(Account.lookup(conda_user.name), _stage_like_the_prolog, str(packed_env),
                 str(copy), time.monotonic() + 120, timeout=150)
    assert got == str(copy)
    assert os.stat(copy / "bin/python").st_uid == conda_user.uid
    assert re.search(r"Recompiled [1-9]\d* \.pyc files of relocated", capfd.readouterr().err)
    check_copy(conda_site, conda_user, copy)
