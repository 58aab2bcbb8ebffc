"""Pure logic: job requests, site settings, conda-style name resolution,
fingerprints and locks."""
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from conda_stage.config import SITE_FILE, Config, UntrustedSettings
from conda_stage.errors import EnvNotFound, UsageError
from conda_stage.fingerprint import fingerprint
from conda_stage.locking import file_lock
from conda_stage.request import parse_text, parse_value
from conda_stage.resolve import envs_dirs, is_valid_name, resolve


# ---------------------------------------------------------------- requests
@pytest.mark.parametrize("text, names", [
    ("conda_env=myjupyter", ["myjupyter"]),
    ("conda_env=a:b other-tool=x", ["a", "b"]),
    ("project=42 conda_env=a,x=1", ["a"]),
    ("conda_env=a:a:b", ["a", "b"]),
    ("nothing here", []),
    ("my_conda_env=a", []),
    (None, []),
])
def test_parse_text_finds_requests_among_other_text(text, names):
    req = parse_text(text)
    assert req.names == names and req.problems == []


@pytest.mark.parametrize("value, problem", [
    ("../etc", "invalid environment name '../etc'"),
    ("/abs/path", "invalid environment name '/abs/path'"),
    ("-rf", "invalid environment name '-rf'"),
    ("a;b", "invalid environment name 'a;b'"),
    ("$(id)", "invalid environment name '$(id)'"),
    ("a\x1bb", "invalid environment name 'a\\x1bb'"),
    ("a::b", "empty name"),
    ("", "empty conda_env= request"),
    ("x" * 129, "invalid environment name"),
])
def test_bad_names_are_problems_never_paths(value, problem):
    req = parse_value(value)
    assert any(problem in p for p in req.problems), req.problems
    assert all(is_valid_name(n) for n in req.names)


def test_too_many_names_are_capped():
    req = parse_value(":".join(f"e{i}" for i in range(20)))
    assert len(req.names) == 16 and "more than 16" in req.problems[0]


# ---------------------------------------------------------------- config
def _site(tmp_path, text, mode=0o644):
    folder = tmp_path / "default"
    folder.mkdir(mode=0o755, exist_ok=True)
    site = folder / "conda-stage"
    site.write_text(text)
    site.chmod(mode)
    return site


def test_site_file_is_the_only_source_of_settings(tmp_path, monkeypatch):
    site = _site(tmp_path, "# site settings\nCONDA_STAGE_STAGING_DIR=/local/cs\n"
                           "export CONDA_STAGE_ON_ERROR='hold'\nCONDA_STAGE_SET_TMPDIR=yes # comment\n"
                           "CONDA_STAGE_PYTHON=/opt/conda-stage/bin/python\n")
    # What a job owner could put into a root hook's environment changes nothing.
    monkeypatch.setenv("CONDA_STAGE_DEFAULTS", str(tmp_path / "evil"))
    monkeypatch.setenv("CONDA_STAGE_STAGING_DIR", "/home/evil")
    monkeypatch.setenv("CONDA_STAGE_LOCK_TIMEOUT", "1")
    config = Config.load(str(site))
    assert config.staging_dir == "/local/cs" and config.on_error == "hold"
    assert config.set_tmpdir is True and config.lock_timeout == Config().lock_timeout
    assert Config.load(str(tmp_path / "missing")) == Config()


@pytest.mark.parametrize("change, problem", [
    (lambda site: site.chmod(0o664), "writable by group or others"),
    (lambda site: os.chown(site, 65534, 0), "owned by uid 65534"),
    (lambda site: site.parent.chmod(0o777), "writable by group or others"),
    (lambda site: os.chown(site.parent, 65534, 0), "owned by uid 65534"),
    (lambda site: (site.rename(site.with_name("real")), site.symlink_to("real")), "is a symlink"),
])
def test_site_file_a_user_could_change_is_refused(tmp_path, change, problem):
    site = _site(tmp_path, "CONDA_STAGE_STAGING_DIR=/local/cs\n")
    change(site)
    with pytest.raises(UntrustedSettings, match=problem):
        Config.load(str(site))


@pytest.mark.parametrize("line, message", [
    ("CONDA_STAGE_ON_ERROR=explode", "must be 'continue' or 'hold'"),
    ("CONDA_STAGE_SYSLOG=maybe", "must be yes or no"),
    ("not a setting", "expected KEY=value"),
    ("CONDA_STAGE_STAGING_DIR=relative/dir", "must be an absolute path"),
    ("CONDA_STAGE_PROLOG_BUDGET=0", "must be positive"),
])
def test_bad_settings_are_reported(tmp_path, line, message):
    with pytest.raises(UsageError, match=message):
        Config.load(str(_site(tmp_path, line + "\n")))


def test_wrapper_defaults_agree_with_config():
    """The hook script's built-in defaults are conda-stage's."""
    text = (Path(__file__).parent.parent / "prolog" / "conda-stage-hook.sh").read_text()
    assert f"python={Config().python}\n" in text
    assert f"state_dir={Config().state_dir}\n" in text
    assert "read_qstat=no\n" in text and Config().sge_read_qstat is False
    assert f"site={SITE_FILE}\n" in text
    # The epilog's glob for interactive copies matches the folders the store makes.
    import fnmatch
    import tempfile

    from conda_stage.store import new_parent

    with tempfile.TemporaryDirectory() as tmp:
        made = new_parent(Path(tmp)).name
    assert '"/tmp/conda-stage-????????"' in text and fnmatch.fnmatch(made, "conda-stage-????????")
    # The fast paths look for the manifests where the job folders' owner writes them:
    # <state dir>/<job id>.json (Slurm), <state dir>/<job id>[.<task id>].json (SGE root@).
    from conda_stage.jobdir import JobDir

    assert JobDir("/b", "/s", "12").manifest_path == Path("/s/12.json")
    assert JobDir("/b", "/s", "12.3").manifest_path == Path("/s/12.3.json")
    assert '"$state_dir/${SLURM_JOB_ID:-none}.json"' in text
    assert 'key=$key.$SGE_TASK_ID' in text and '"$state_dir/$key.json"' in text


# ---------------------------------------------------------------- resolution
def _env(path):
    (path / "conda-meta").mkdir(parents=True)
    return path


def test_names_resolve_like_conda(tmp_path):
    home, root = tmp_path / "home", tmp_path / "root"
    _env(root)
    (root / ".condarc").write_text("envs_dirs:\n  - /site/envs\n")
    (home / ".condarc").parent.mkdir(parents=True)
    (home / ".condarc").write_text("envs_dirs: [~/projects/envs]\n")
    environ = {"HOME": str(home), "CONDA_ROOT_PREFIX": str(root),
               "CONDA_ENVS_PATH": f"{tmp_path}/first:{tmp_path}/second"}
    dirs = envs_dirs(environ)
    assert dirs[:4] == [tmp_path / "first", tmp_path / "second",
                        home / "projects" / "envs", Path("/site/envs")]
    assert set(dirs[4:]) == {home / ".conda" / "envs", root / "envs"}
    mine = _env(home / "projects" / "envs" / "tools")
    _env(home / ".conda" / "envs" / "tools")
    assert resolve("tools", environ).prefix == mine
    assert resolve("base", environ).prefix == root
    assert resolve(str(mine), environ).name == "tools"
    with pytest.raises(EnvNotFound, match="'nope' not found"):
        resolve("nope", environ)
    with pytest.raises(EnvNotFound, match="Not a valid Conda environment name"):
        resolve("a;b", environ)
    with pytest.raises(EnvNotFound, match="Not a Conda environment"):
        resolve(str(tmp_path), environ)


# ---------------------------------------------------------------- fingerprint
def test_fingerprint_follows_conda_and_pip_changes(tmp_path):
    env = _env(tmp_path / "env")
    site = env / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (env / "conda-meta" / "history").write_text("==> 2024 <==\n")
    first = fingerprint(env)
    (site / "__pycache__").mkdir()  # importing modules must not look like a change
    assert fingerprint(env) == first
    (site / "tiny-1.0.dist-info").mkdir()  # pip install
    second = fingerprint(env)
    assert second != first
    (env / "conda-meta" / "pkg-1.0-0.json").write_text("{}")  # conda install
    assert fingerprint(env) != second


# ---------------------------------------------------------------- locks
def _hold(path, seconds, started):
    with file_lock(path):
        started.set()
        time.sleep(seconds)


def test_exclusive_lock_waits_and_times_out(tmp_path):
    lock = tmp_path / "lock"
    started = multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold, args=(lock, 1.5, started))
    holder.start()
    try:
        assert started.wait(10)
        from conda_stage.errors import LockTimeout

        with pytest.raises(LockTimeout):
            with file_lock(lock, timeout=0.3):
                pass
        t0 = time.monotonic()
        with file_lock(lock, shared=True):
            waited = time.monotonic() - t0
        assert waited > 0.5
    finally:
        holder.join(10)


def test_lock_file_replaced_while_waiting_is_relocked(tmp_path):
    lock = tmp_path / "lock"
    with file_lock(lock) as fd:
        assert fd is not None
        os.unlink(lock)
    with file_lock(lock):
        assert lock.exists()


def test_every_setting_is_documented_with_its_default():
    from dataclasses import fields

    text = (Path(__file__).parent.parent / "examples" / "admin" / "conda-stage.defaults").read_text()
    config = Config()
    for f in fields(Config):
        value = getattr(config, f.name)
        if isinstance(value, bool):
            value = "yes" if value else "no"
        elif isinstance(value, float):
            value = f"{value:g}"
        line = f"#CONDA_STAGE_{f.name.upper()}=" + (f"{value}\n" if value != "" else "")
        assert line in text, f.name  # (an empty default is shown with an example)


def test_own_parents_tells_trash_from_copies_and_follows_no_link(tmp_path):
    from conda_stage.gc import _dead_partials
    from conda_stage.store import PARENT_PREFIX, TRASH_SUFFIX, find_trash, own_parents

    (tmp_path / f"{PARENT_PREFIX}aaaa").mkdir()
    (tmp_path / f"{PARENT_PREFIX}aaaa" / ".x.partial-999999999").mkdir()
    (tmp_path / f"{PARENT_PREFIX}bbbb{TRASH_SUFFIX}").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / f"{PARENT_PREFIX}link").symlink_to(tmp_path / "other")
    assert own_parents(tmp_path) == [tmp_path / f"{PARENT_PREFIX}aaaa"]
    assert find_trash(tmp_path) == [tmp_path / f"{PARENT_PREFIX}bbbb{TRASH_SUFFIX}"]
    assert list(_dead_partials(tmp_path)) == [tmp_path / f"{PARENT_PREFIX}aaaa" /
                                              ".x.partial-999999999"]
    assert own_parents(tmp_path / "missing") == []
