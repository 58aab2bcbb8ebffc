"""The walkthrough, end to end, against the real conda (24.7.1) and real
environments: enable, activate (stage), deactivate (unstage), and the ways
it must fail cleanly."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest

from tests.harness.wheels import make_project, make_wheel

pytestmark = pytest.mark.conda


@pytest.fixture
def run(conda_site, conda_user, stage_bin, user_tmp):
    """Run a script in a shell as the test user, with conda's shell function
    loaded, conda-stage on PATH and TMPDIR set to a fresh folder."""

    def run(script, shell="bash", env=None):
        extra = {"TMPDIR": str(user_tmp)}
        extra.update(env or {})
        return conda_site.shell(conda_user, f'export PATH="{stage_bin}:$PATH"\n{script}',
                                shell=shell, extra_env=extra)

    return run


@pytest.fixture
def new_env(conda_env):
    """A fresh environment (real conda create); its tarball, sidecar and lock
    file are removed with it."""
    made = []

    def make(**kw):
        env = conda_env(**kw)
        made.append(env)
        return env

    yield make
    for env in made:
        for suffix in (".tar.zst", ".tar.gz", ".conda-stage.json"):
            p = env.parent / (env.name + suffix)
            if p.exists():
                p.unlink()
        lock = env.parent / f".{env.name}.conda-stage.lock"
        if lock.exists():
            lock.unlink()


@pytest.fixture
def enabled(new_env, run):
    """A fresh environment with auto-staging enabled."""

    def make(**kw):
        env = new_env(**kw)
        r = run(f"conda-stage --auto-stage=enable {shlex.quote(str(env))}")
        assert r.returncode == 0, r.stderr
        return env

    return make


def values(stdout):
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


ACTIVATE_AND_PROBE = """
conda activate {name}
echo "prefix=$CONDA_PREFIX"
echo "python=$(command -v python)"
echo "sys_prefix=$(python -c 'import sys; print(sys.prefix)')"
prefix-probe | sed 's/:/=/'
echo "config_$(cat "$CONDA_PREFIX/etc/prefix-probe/config.ini")"
echo "probe_home=$PREFIX_PROBE_HOME"
touch "$CONDA_PREFIX/new-file" 2>/dev/null && echo "writable=yes" || echo "writable=no"
conda deactivate
echo "after=${{CONDA_PREFIX:-none}}:${{PREFIX_PROBE_ACTIVE:-unset}}"
"""


@pytest.mark.parametrize("shell", ["bash", "zsh", "sh"])
def test_activate_stages_and_deactivate_unstages(shell, enabled, run, user_tmp):
    env = enabled()
    tarball = env.parent / f"{env.name}.tar.zst"
    before = os.stat(tarball)
    r = run(ACTIVATE_AND_PROBE.format(name=env.name), shell=shell)
    assert r.returncode == 0, r.stderr
    v = values(r.stdout)
    staged = v["prefix"]
    assert re.fullmatch(rf"{user_tmp}/conda-stage-[a-z0-9_]+/{env.name}", staged), staged
    assert v["python"] == f"{staged}/bin/python"
    assert v["sys_prefix"] == staged
    assert v["exe"] == staged  # binary placeholder in the executable
    assert v["lib"] == f"{staged}/lib"  # binary placeholder in the shared library
    assert v["config_prefix"] == staged  # text placeholder
    assert v["probe_home"] == f"{staged}/share/prefix-probe"  # activate.d of the copy ran
    assert v["writable"] == "no"
    assert v["after"] == "none:unset"
    # Copy and its conda-stage-XXXX parent are gone; nothing else was left.
    assert os.listdir(user_tmp) == []
    assert "INFO: Staging current Conda environment (" in r.stderr
    assert "INFO: Total extract time:" in r.stderr
    assert "INFO: Unstaging and reverting to original Conda environment" in r.stderr
    # The original environment and its tarball were not touched.
    assert not (env / ".conda-stage").exists() and not (env / "new-file").exists()
    after = os.stat(tarball)
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)


def test_conda_stage_subcommand_dispatch(new_env, run):
    env = new_env()
    r = run(f"conda stage --auto-stage=enable {env.name} && conda stage status {env.name}")
    assert r.returncode == 0, r.stderr
    assert "INFO: Enabled auto-staging" in r.stderr
    assert "Auto-staging: enabled" in r.stdout
    assert re.search(r"tar\.zst, \d+ files, .*; fresh", r.stdout), r.stdout
    r = run(f"conda stage --auto-stage=disable {env.name} && conda stage status {env.name}")
    assert r.returncode == 0, r.stderr
    assert "INFO: Removed 'conda-pack' tarball" in r.stderr
    assert "Auto-staging: disabled" in r.stdout and "Tarball:      none" in r.stdout
    assert not (env / "etc/conda/activate.d/zzz.conda-stage-auto.sh").exists()
    assert not list(env.parent.glob(f"{env.name}.*")) and not list(env.parent.glob(f".{env.name}.*"))
    r = run(f"conda activate {env.name} && echo prefix=$CONDA_PREFIX")
    assert values(r.stdout)["prefix"] == str(env)


def test_conda_install_makes_tarball_stale_and_activation_repacks(enabled, run, conda_site,
                                                                  conda_user):
    env = enabled()
    conda_site.install(conda_user, env, "cs-extra")
    r = run(f"conda-stage status {env.name}")
    assert "stale: the environment changed since it was packed" in r.stdout
    r = run(f"conda activate {env.name} && ls $CONDA_PREFIX/share/cs-extra && conda deactivate")
    assert r.returncode == 0, r.stderr
    assert "[ONCE] Packaging Conda environment, because the environment changed" in r.stderr
    assert "README" in r.stdout or r.stdout.strip(), r.stdout


def test_an_image_is_kept_current_when_the_environment_is_repacked(new_env, run, conda_site,
                                                                  conda_user):
    """--auto-stage=enable --image builds the image too; after a change, the
    activation that repacks rebuilds it (a new image id, for the new tarball),
    so jobs keep mounting; status says so; disabling removes it."""
    if not shutil.which("mksquashfs"):
        pytest.fail("mksquashfs is needed (tools/bootstrap.sh installs squashfs-tools)",
                    pytrace=False)
    env = new_env()
    image, sidecar = env.parent / f"{env.name}.sqfs", env.parent / f"{env.name}.sqfs.json"
    try:
        r = run(f"conda stage --stage --image {env.name}")
        assert r.returncode != 0 and "--image goes with --pack or --auto-stage=enable" in r.stderr
        r = run(f"conda stage --auto-stage=enable --image {env.name}")
        assert r.returncode == 0, r.stderr
        assert "INFO: Created image " in r.stderr, r.stderr
        first = json.loads(sidecar.read_text())
        r = run(f"conda stage status {env.name}")
        assert re.search(r"^Image: .*\.sqfs \(.* MB, mounted by jobs at /.*\); current$",
                         r.stdout, re.M), r.stdout
        conda_site.install(conda_user, env, "cs-extra")
        r = run(f"conda stage status {env.name}")
        # not repacked yet: the tarball is stale, the image still matches it
        assert "stale: the environment changed since it was packed" in r.stdout, r.stdout
        assert re.search(r"^Image: .*; current$", r.stdout, re.M), r.stdout
        r = run(f"conda activate {env.name} && conda deactivate")
        assert r.returncode == 0, r.stderr
        assert "[ONCE] Packaging Conda environment, because the environment changed" in r.stderr
        assert "INFO: Created image " in r.stderr, r.stderr
        second = json.loads(sidecar.read_text())
        tarball = os.stat(env.parent / f"{env.name}.tar.zst")
        assert second["image_id"] != first["image_id"]
        assert (second["tarball_size"], second["tarball_mtime_ns"]) == \
            (tarball.st_size, tarball.st_mtime_ns)
        assert second["size"] == image.stat().st_size
        r = run(f"conda stage status {env.name}")
        assert re.search(r"^Image: .*; current$", r.stdout, re.M), r.stdout
        # --pack without --image, nothing changed: the image stays as it is
        r = run(f"conda stage --pack {env.name}")
        assert r.returncode == 0, r.stderr
        assert json.loads(sidecar.read_text()) == second
        r = run(f"conda stage --auto-stage=disable {env.name}")
        assert r.returncode == 0, r.stderr
        assert not image.exists() and not sidecar.exists()
    finally:
        for p in (image, sidecar):
            p.unlink(missing_ok=True)


def test_pip_install_makes_tarball_stale(enabled, run, user_tmp):
    env = enabled()
    wheel = make_wheel(user_tmp, "tinypkg")
    r = run(f"CONDA_STAGE=false conda activate {env.name} && "
            f"pip install -q --no-index --no-deps {wheel} && conda deactivate && "
            f"conda-stage status {env.name}")
    assert r.returncode == 0, r.stderr
    assert "stale: the environment changed" in r.stdout
    r = run(f"conda activate {env.name} && python -c 'import tinypkg, sys; "
            f"print(\"mod=\" + tinypkg.__file__)' && conda deactivate")
    assert r.returncode == 0, r.stderr
    assert "[ONCE] Packaging" in r.stderr
    assert values(r.stdout)["mod"].startswith(f"{user_tmp}/conda-stage-")


def test_writable_copy(new_env, run):
    env = new_env()
    r = run(f"conda-stage --auto-stage=enable --writable {env.name} && conda activate {env.name}"
            f" && touch $CONDA_PREFIX/new-file && echo ok=yes && conda deactivate")
    assert r.returncode == 0, r.stderr
    assert values(r.stdout)["ok"] == "yes"
    assert "read-only" not in r.stderr
    assert not (env / "new-file").exists()


def test_environment_created_by_path(enabled, run, conda_user):
    prefix = conda_user.home / "projects" / "penv"
    prefix.parent.mkdir(exist_ok=True)
    os.chown(prefix.parent, conda_user.uid, conda_user.gid)
    env = enabled(prefix=prefix)
    assert (prefix.parent / "penv.tar.zst").is_file()
    r = run(f"conda activate {prefix} && echo prefix=$CONDA_PREFIX && prefix-probe && conda deactivate")
    assert r.returncode == 0, r.stderr
    staged = values(r.stdout)["prefix"]
    assert staged.endswith("/penv") and staged != str(env)
    assert f"exe:{staged}" in r.stdout


def test_conda_stage_false_bypasses_staging(enabled, run, user_tmp):
    env = enabled()
    r = run(f"CONDA_STAGE=false conda activate {env.name} && echo prefix=$CONDA_PREFIX && "
            f"CONDA_STAGE=false conda deactivate")
    assert values(r.stdout)["prefix"] == str(env)
    assert os.listdir(user_tmp) == []


def test_concurrent_pack_packs_once(new_env, run, user_tmp):
    env = new_env()
    r = run(f"""
conda-stage --pack {env.name} 2> {user_tmp}/a.err & a=$!
conda-stage --pack {env.name} 2> {user_tmp}/b.err & b=$!
wait $a; echo "a=$?"; wait $b; echo "b=$?"
cat {user_tmp}/a.err {user_tmp}/b.err
""")
    v = values(r.stdout)
    assert (v["a"], v["b"]) == ("0", "0"), r.stdout
    assert r.stdout.count("Packing environment at") == 1, r.stdout
    meta = json.loads((env.parent / f"{env.name}.conda-stage.json").read_text())
    assert meta["size"] == os.path.getsize(env.parent / f"{env.name}.tar.zst")
    for f in ("a.err", "b.err"):
        (user_tmp / f).unlink()
    r = run(f"conda-stage --stage {env.name}")
    assert r.returncode == 0, r.stderr


def test_archive_with_parent_member_is_refused(enabled, run, user_tmp):
    env = enabled()
    tarball = env.parent / f"{env.name}.tar.zst"
    meta_path = env.parent / f"{env.name}.conda-stage.json"
    evil = user_tmp / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        tar.add(env / "conda-meta" / "history", "conda-meta/history")
        payload = user_tmp / "payload"
        payload.write_text("gotcha\n")
        tar.add(payload, "../escaped")
    import zstandard

    tarball.write_bytes(zstandard.ZstdCompressor().compress(evil.read_bytes()))
    meta = json.loads(meta_path.read_text())
    st = os.stat(tarball)
    meta.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    meta_path.write_text(json.dumps(meta))
    staging = user_tmp / "staging"
    staging.mkdir()
    os.chown(staging, os.stat(user_tmp).st_uid, os.stat(user_tmp).st_gid)
    r = run(f"conda-stage --stage {env.name}", env={"TMPDIR": str(staging)})
    assert r.returncode == 1
    assert "ERROR: Refusing archive member with '..' in its path: '../escaped'" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (user_tmp / "escaped").exists() and not (staging / "escaped").exists()
    assert os.listdir(staging) == []


def test_staging_path_longer_than_placeholder_fails_before_extracting(enabled, run, user_tmp):
    env = enabled()
    deep = user_tmp / ("d" * 200) / ("e" * 60)
    r = run(f"mkdir -p {deep} && conda-stage --stage {env.name}", env={"TMPDIR": str(deep)})
    assert r.returncode == 1
    assert re.search(r"ERROR: Cannot stage to .* bytes long, but the environment's binary files "
                     r"leave room for at most \d+", r.stderr), r.stderr
    assert "Extracting" not in r.stderr
    assert os.listdir(deep) == []


def test_editable_install_gets_a_clear_error(new_env, run, user_tmp, conda_site):
    env = new_env()
    project = make_project(user_tmp, "edpkg")
    bundled = conda_site.cpython / "lib" / "python3.11" / "ensurepip" / "_bundled"
    setuptools = next(bundled.glob("setuptools-*.whl"))
    shutil.copy(setuptools, user_tmp)
    # setuptools needs 'wheel' for PEP 660 editable installs; fetch it from PyPI.
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d",
                    str(user_tmp), "wheel<0.46"], check=True, timeout=300)
    os.system(f"chown -R {os.stat(user_tmp).st_uid} {user_tmp}")
    r = run(f"""CONDA_STAGE=false conda activate {env.name}
pip install -q --no-index {user_tmp}/*.whl
pip install -q --no-index --no-build-isolation -e {project} || exit 9
conda-stage --pack {env.name}""")
    assert r.returncode == 1, r.stdout + r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR:")]
    assert len(errors) == 1
    assert "editable pip installs (edpkg)" in errors[0]
    assert "Traceback" not in r.stderr


def test_gc_removes_copies_of_dead_shells(enabled, run, user_tmp):
    env = enabled()
    r = run(f"""sh -c 'exit 0' & dead=$!; wait $dead
conda-stage --stage --owner-pid $dead {env.name} > /dev/null
conda-stage --stage --owner-pid $$ {env.name} > /dev/null
conda-stage gc""")
    assert r.returncode == 0, r.stderr
    assert len(re.findall(r"INFO: Removing .* \(shell \d+ is gone\)", r.stderr)) == 1
    # The copy of the live shell (gone now too, but it was alive during gc) stays.
    assert len(os.listdir(user_tmp)) == 1


def test_usage_errors_are_one_line(run):
    r = run("conda-stage --stage --unstage myenv")
    assert r.returncode == 2
    assert r.stderr.strip() == "ERROR: Choose one action, not --stage and --unstage"
    r = run("conda-stage --auto-stage=enable no-such-env-here")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith(
        "ERROR: Conda environment 'no-such-env-here' not found (looked in: ")


def test_tar_gz_format_packs_and_stages(new_env, run, user_tmp):
    env = new_env()
    r = run(f"conda-stage --pack --format tar.gz {env.name} && conda-stage status {env.name} && "
            f"conda-stage --stage {env.name}")
    assert r.returncode == 0, r.stderr
    assert (env.parent / f"{env.name}.tar.gz").is_file()
    assert not (env.parent / f"{env.name}.tar.zst").exists()
    assert "tar.gz, " in r.stdout
    staged = r.stdout.strip().splitlines()[-1]
    assert staged.startswith(f"{user_tmp}/conda-stage-") and os.path.isdir(f"{staged}/conda-meta")


def test_files_deleted_behind_conda_get_a_clear_error(new_env, run):
    env = new_env()
    os.unlink(env / "etc" / "prefix-probe" / "config.ini")  # as pip clobbering would
    r = run(f"conda-stage --pack {env.name}")
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR:")]
    assert len(errors) == 1 and "deleted or overwritten" in errors[0]
    assert "prefix-probe 1.0.0" in errors[0] and "--ignore-missing-files" in errors[0]
    r = run(f"conda-stage --pack --ignore-missing-files {env.name}")
    assert r.returncode == 0, r.stderr
