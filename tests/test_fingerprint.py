"""The fingerprint and its quick check (conda_stage/fingerprint.py).

The quick check must never call an environment fresh when its fingerprint
changed -- also for a change in the same tick of the filesystem's clock as
the recorded stats (simulated here by a coarse clock) -- and must skip the
listings when nothing changed."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conda_stage import fingerprint as fp
from conda_stage.resolve import Env
from conda_stage.tarball import Meta, Tarball, parse_meta


def _old_fingerprint(prefix: Path) -> str:
    """The fingerprint as conda-stage computed it before the quick check
    (sidecars written then must stay fresh)."""
    prefix = Path(prefix)
    h = hashlib.sha256()

    def names(path, suffixes=None):
        try:
            ns = os.listdir(path)
        except OSError:
            return []
        return sorted(n for n in ns if suffixes is None or n.endswith(suffixes))

    def stat(path):
        try:
            s = os.stat(path)
        except OSError:
            return "-"
        return f"{s.st_size}:{s.st_mtime_ns}"

    def feed(*parts):
        h.update("\0".join(parts).encode("utf-8", "surrogateescape") + b"\n")

    meta = prefix / "conda-meta"
    feed("conda-meta", *names(meta, (".json",)))
    feed("history", stat(meta / "history"))
    feed("state", stat(meta / "state"))
    for lib in names(prefix / "lib"):
        if lib.startswith("python"):
            feed(lib, *names(prefix / "lib" / lib / "site-packages", fp._PIP_SUFFIXES))
    for hook in ("activate.d", "deactivate.d"):
        feed(hook, *names(prefix / "etc" / "conda" / hook))
    return h.hexdigest()[:32]


def make_env(prefix: Path) -> Path:
    (prefix / "conda-meta").mkdir(parents=True)
    (prefix / "conda-meta" / "python-3.11.0-0.json").write_text("{}")
    (prefix / "conda-meta" / "history").write_text("==> create <==\n")
    sp = prefix / "lib" / "python3.11" / "site-packages"
    sp.mkdir(parents=True)
    (sp / "pip-24.0.dist-info").mkdir()
    (prefix / "etc" / "conda" / "activate.d").mkdir(parents=True)
    (prefix / "etc" / "conda" / "activate.d" / "zzz.sh").write_text("")
    return prefix


# Changes the fingerprint sees, each done to an environment made by make_env.
CHANGES = {
    "conda installs a package": lambda p: (p / "conda-meta" / "numpy-1.0-0.json").write_text("{}"),
    "conda removes a package": lambda p: (p / "conda-meta" / "python-3.11.0-0.json").unlink(),
    "conda-meta/history grows": lambda p: (p / "conda-meta" / "history").open("a").write("x\n"),
    "env config vars (state)": lambda p: (p / "conda-meta" / "state").write_text("{}"),
    "pip installs": lambda p: (p / "lib" / "python3.11" / "site-packages" /
                               "six-1.0.dist-info").mkdir(),
    "pip uninstalls": lambda p: (p / "lib" / "python3.11" / "site-packages" /
                                 "pip-24.0.dist-info").rmdir(),
    "a .pth file": lambda p: (p / "lib" / "python3.11" / "site-packages" / "x.pth").write_text(""),
    "another python": lambda p: (p / "lib" / "python3.12" / "site-packages").mkdir(parents=True),
    "an activate hook": lambda p: (p / "etc" / "conda" / "activate.d" / "a.sh").write_text(""),
    "a deactivate hook": lambda p: ((p / "etc" / "conda" / "deactivate.d").mkdir(),
                                    (p / "etc" / "conda" / "deactivate.d" / "b.sh").write_text("")),
    "site-packages replaced": lambda p: (
        (p / "lib" / "python3.11" / "sp2").mkdir(),
        (p / "lib" / "python3.11" / "sp2" / "pip-24.0.dist-info").mkdir(),
        (p / "lib" / "python3.11" / "sp2" / "z.pth").write_text(""),
        (p / "lib" / "python3.11" / "site-packages").rename(p / "lib" / "python3.11" / "old"),
        (p / "lib" / "python3.11" / "sp2").rename(p / "lib" / "python3.11" / "site-packages")),
}


def _reference(tmp_path: Path) -> os.stat_result:
    """A timestamp of the filesystem, as the tarball's mtime gives one."""
    ref = tmp_path / "ref.tar.zst"
    ref.write_bytes(b"x")
    return os.stat(ref)


def _record(prefix: Path, tmp_path: Path):
    time.sleep(0.02)  # a later tick than the environment's last change
    ref = _reference(tmp_path)
    return fp.quick_record(prefix, fp.fingerprint(prefix), ref.st_mtime_ns, ref.st_dev)


def test_the_fingerprint_is_the_one_earlier_sidecars_hold(tmp_path):
    prefix = make_env(tmp_path / "env")
    (prefix / "lib" / "python3.10").mkdir()
    (prefix / "lib" / "pythonx\udcff").mkdir()
    (prefix / "lib" / "libz.so").write_text("")
    (prefix / "conda-meta" / "odd\udcfe.json").write_text("")
    assert fp.fingerprint(prefix) == _old_fingerprint(prefix)
    assert fp.fingerprint(tmp_path / "missing") == _old_fingerprint(tmp_path / "missing")
    for name, change in CHANGES.items():
        p = make_env(tmp_path / f"e{len(name)}-{hash(name) & 0xffff}")
        change(p)
        assert fp.fingerprint(p) == _old_fingerprint(p), name


class _Listings:
    def __init__(self, monkeypatch):
        self.calls = []
        real = os.listdir

        def listdir(path="."):
            self.calls.append(path)
            return real(path)

        monkeypatch.setattr(os, "listdir", listdir)


def test_an_unchanged_environment_skips_every_listing(tmp_path, monkeypatch):
    prefix = make_env(tmp_path / "env")
    quick = _record(prefix, tmp_path)
    assert quick is not None
    assert [rel for rel, _ in quick] == [*fp.QUICK_FIXED, "lib/python3.11/site-packages"]
    expected = _old_fingerprint(prefix)
    listings = _Listings(monkeypatch)
    assert fp.is_fresh(prefix, expected, quick)
    assert listings.calls == []
    # without a quick record (a sidecar of an earlier conda-stage): the listings
    assert fp.is_fresh(prefix, expected, None)
    assert len(listings.calls) == 5  # conda-meta, lib, site-packages, both hook folders


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_every_change_is_seen_by_the_quick_check(tmp_path, monkeypatch, name):
    prefix = make_env(tmp_path / "env")
    expected = fp.fingerprint(prefix)
    quick = _record(prefix, tmp_path)
    assert quick is not None
    CHANGES[name](prefix)
    assert not fp.unchanged(prefix, quick)
    assert not fp.is_fresh(prefix, expected, quick)


def test_a_record_that_is_not_of_this_fingerprint_is_not_trusted(tmp_path, monkeypatch):
    prefix = make_env(tmp_path / "env")
    quick = _record(prefix, tmp_path)
    partial = [e for e in quick if e[0] != "etc/conda/activate.d"]
    assert not fp.unchanged(prefix, partial)
    assert not fp.unchanged(prefix, [])
    listings = _Listings(monkeypatch)
    assert fp.is_fresh(prefix, _old_fingerprint(prefix), partial)
    assert listings.calls  # the full fingerprint decided


def test_a_recent_change_records_no_quick_check(tmp_path):
    prefix = make_env(tmp_path / "env")
    # the reference (tarball mtime) in the same tick as the last change
    ctime = os.stat(prefix / "conda-meta").st_ctime_ns
    dev = os.stat(prefix).st_dev
    assert fp.quick_record(prefix, fp.fingerprint(prefix), ctime, dev) is None
    assert fp.quick_record(prefix, fp.fingerprint(prefix), ctime + 1, dev) is not None or \
        max(os.stat(prefix / p).st_ctime_ns for p in ("lib", "etc/conda/activate.d")) > ctime
    # another filesystem's clock, or a fingerprint the listings do not give
    far = time.time_ns() + 10**12
    assert fp.quick_record(prefix, fp.fingerprint(prefix), far, dev + 1) is None
    assert fp.quick_record(prefix, "0" * 32, far, dev) is None
    assert fp.quick_record(prefix, fp.fingerprint(prefix), far, dev) is not None


# ------------------------------------------------- a coarse filesystem clock
TICK_NS = 40_000_000  # 40 ms: timestamps as a filesystem that keeps 40 ms would


class _Coarse:
    """os.stat with every timestamp cut down to TICK_NS, as on a filesystem
    with a coarse clock: changes in one tick leave the same times."""

    def __init__(self, st):
        self._st = st

    def __getattr__(self, name):
        value = getattr(self._st, name)
        if name in ("st_mtime_ns", "st_ctime_ns", "st_atime_ns"):
            return value - value % TICK_NS
        return value


@pytest.fixture
def coarse_clock(monkeypatch):
    real = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **kw: _Coarse(real(*a, **kw)))


def _next_tick(probe_dir: Path | None = None) -> int:
    """Sleep to just after the start of the next tick -- by the clock the
    filesystem stamps files with (``probe_dir``: checked there), which may
    lag the precise clock by a jiffy; returns that tick."""
    now = time.time_ns()
    tick = now - now % TICK_NS + TICK_NS
    time.sleep((tick - now) / 1e9 + 0.002)
    if probe_dir is not None:
        probe = probe_dir / ".tick-probe"
        for _ in range(50):
            probe.write_bytes(b"")
            if os.stat(probe).st_mtime_ns >= tick:  # coarse: cut to the tick
                break
            time.sleep(0.001)
        probe.unlink()
    return tick


def _pack(prefix: Path, tmp_path: Path):
    """What a pack records: the fingerprint, then (after the tarball is
    written, its mtime the reference) the quick check."""
    expected = fp.fingerprint(prefix)
    ref = _reference(tmp_path)
    return expected, fp.quick_record(prefix, expected, ref.st_mtime_ns, ref.st_dev)


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_a_change_in_the_same_tick_as_the_pack_is_caught(tmp_path, coarse_clock, name):
    prefix = make_env(tmp_path / "env")
    tick = _next_tick(tmp_path)
    expected, quick = _pack(prefix, tmp_path)  # the environment is from an earlier tick
    CHANGES[name](prefix)  # ... the change in the pack's tick
    if os.stat(tmp_path / "ref.tar.zst").st_mtime_ns != tick or \
            time.time_ns() // TICK_NS * TICK_NS != tick:
        pytest.skip("the tick ended during the test (a slow machine); nothing to show")
    assert quick is not None
    assert not fp.is_fresh(prefix, expected, quick)


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_a_pack_in_the_tick_of_the_last_change_records_no_quick_check(tmp_path, coarse_clock,
                                                                       name):
    prefix = make_env(tmp_path / "env")
    tick = _next_tick(tmp_path)  # the change is stamped in this tick or later
    CHANGES[name](prefix)
    expected, quick = _pack(prefix, tmp_path)
    if os.stat(tmp_path / "ref.tar.zst").st_mtime_ns != tick:
        pytest.skip("the tick ended between the change and the pack (a loaded machine); "
                    "nothing to show")
    assert quick is None  # racy: the next change could keep the same times
    (prefix / "conda-meta" / "later-1.0-0.json").write_text("{}")
    assert not fp.is_fresh(prefix, expected, quick)


_steps = st.lists(st.sampled_from(sorted(CHANGES) + ["pack", "tick", "check"]),
                  min_size=1, max_size=12)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=_steps)
def test_the_quick_check_never_says_fresh_when_the_fingerprint_changed(tmp_path_factory,
                                                                        coarse_clock, steps):
    """Any interleaving of changes, packs and ticks of the (coarse) clock:
    whenever the quick check says "unchanged", the fingerprint is the packed one."""
    tmp = tmp_path_factory.mktemp("prop")
    prefix = make_env(tmp / "env")
    expected, quick = _pack(prefix, tmp)
    done = set()
    for step in steps:
        if step == "pack":
            expected, quick = _pack(prefix, tmp)
        elif step == "tick":
            _next_tick()
        elif step == "check" or step in done:  # each change once: some cannot repeat
            pass
        else:
            done.add(step)
            CHANGES[step](prefix)
        current = fp.fingerprint(prefix)
        if fp.unchanged(prefix, quick):
            assert current == expected, steps
        assert fp.is_fresh(prefix, expected, quick) == (current == expected), steps


# ----------------------------------------------------- the sidecar's record
def _env(prefix: Path) -> Env:
    return Env(name=prefix.name, prefix=prefix)


def test_a_pack_writes_the_quick_record_and_a_check_uses_it(tmp_path, monkeypatch):
    prefix = make_env(tmp_path / "env")
    env = _env(prefix)
    tb = Tarball.at(env, "tar.zst")
    time.sleep(0.02)
    tb.path.write_bytes(b"packed")
    st_ = os.stat(tb.path)
    meta = Meta(format="tar.zst", archive=tb.path.name, size=st_.st_size,
                mtime_ns=st_.st_mtime_ns, prefix=str(prefix), fingerprint=fp.fingerprint(prefix),
                tool_version="test", created="now", pack_seconds=0.1, files=1,
                unpacked_bytes=1)
    tb.write_meta(meta)
    data = json.loads(tb.meta_path.read_bytes())
    assert [rel for rel, _ in data["quick"]] == [*fp.QUICK_FIXED,
                                                 "lib/python3.11/site-packages"]
    side = tb.read_sidecar()
    assert side.meta is not None and side.meta.quick == data["quick"]
    listings = _Listings(monkeypatch)
    assert side.stale_reason(env) is None
    assert listings.calls == []
    CHANGES["pip installs"](prefix)
    assert side.stale_reason(env) == "the environment changed since it was packed"


def test_a_sidecar_without_a_quick_record_is_checked_by_the_fingerprint(tmp_path, monkeypatch):
    prefix = make_env(tmp_path / "env")
    env = _env(prefix)
    tb = Tarball.at(env, "tar.zst")
    tb.path.write_bytes(b"packed")
    st_ = os.stat(tb.path)
    old = {"format": "tar.zst", "archive": tb.path.name, "size": st_.st_size,
           "mtime_ns": st_.st_mtime_ns, "prefix": str(prefix),
           "fingerprint": _old_fingerprint(prefix), "tool_version": "0.1.0", "created": "then",
           "pack_seconds": 1.0, "files": 1, "unpacked_bytes": 1, "records": [],
           "meta_version": 1}
    tb.meta_path.write_text(json.dumps(old))
    side = tb.read_sidecar()
    assert side.meta is not None and side.meta.quick is None
    listings = _Listings(monkeypatch)
    assert side.stale_reason(env) is None
    assert listings.calls
    CHANGES["an activate hook"](prefix)
    assert side.stale_reason(env) is not None


def test_a_tarball_that_is_not_the_described_one_gets_no_quick_record(tmp_path):
    prefix = make_env(tmp_path / "env")
    tb = Tarball.at(_env(prefix), "tar.zst")
    tb.path.write_bytes(b"packed")
    meta = parse_meta(json.dumps({
        "format": "tar.zst", "archive": tb.path.name, "size": 1, "mtime_ns": 1,
        "prefix": str(prefix), "fingerprint": fp.fingerprint(prefix), "tool_version": "t",
        "created": "c", "pack_seconds": 1, "files": 1, "unpacked_bytes": 1,
        "meta_version": 1}).encode())
    assert tb.quick_record(meta) is None
