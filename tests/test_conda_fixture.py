"""The real conda fixture works: site conda, local channel, conda create/activate as a user.

Everything runs as the unprivileged ``conda_user`` through ``runuser`` with a clean
environment, the way a login shell or a batch job would.
"""
from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

from tests.harness.conda import CHANNEL_PACKAGES, CONDA_VERSION
from tests.harness.users import run_as

pytestmark = pytest.mark.conda

# prints NAME=VALUE lines; run after `. <init file>` in bash, zsh and sh
ACTIVATE_SCRIPT = r"""
set -eu
echo "before_shlvl=$CONDA_SHLVL"
conda activate demo
echo "prefix=$CONDA_PREFIX"
echo "default_env=$CONDA_DEFAULT_ENV"
echo "shlvl=$CONDA_SHLVL"
echo "probe_active=${PREFIX_PROBE_ACTIVE:-unset}"
echo "probe_home=${PREFIX_PROBE_HOME:-unset}"
echo "python=$(command -v python)"
echo "sys_prefix=$(python -c 'import sys; print(sys.prefix)')"
prefix-probe
conda deactivate
echo "after_probe_active=${PREFIX_PROBE_ACTIVE:-unset}"
echo "after_prefix=${CONDA_PREFIX:-unset}"
echo "after_shlvl=$CONDA_SHLVL"
echo "after_path=$PATH"
"""


def _vars(stdout: str) -> dict:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


def _check(res):
    assert res.returncode == 0, f"exit {res.returncode}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}"
    return res


@pytest.fixture(scope="module")
def demo(conda_site, conda_user):
    """``conda create -n demo python pip prefix-probe``, run by the user in a shell."""
    env = conda_site.envs_dir(conda_user) / "demo"
    shutil.rmtree(env, ignore_errors=True)   # left over from an earlier run
    _check(conda_site.shell(conda_user, "conda create -y -q -n demo python pip prefix-probe",
                            timeout=600))
    return env


def test_site_is_shared_and_read_only(conda_site, conda_user):
    root = conda_site.root_prefix
    st = root.stat()
    assert st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    assert conda_site.init_file.is_file() and conda_site.conda_exe.is_file()
    # the user can run conda but cannot write to the root prefix or the channel
    assert conda_site.run(conda_user, ["test", "-w", str(root)]).returncode != 0
    assert conda_site.run(conda_user, ["test", "-w", str(conda_site.channel / "noarch")]).returncode != 0
    res = _check(conda_site.run(conda_user, ["conda", "--version"]))   # via condabin on PATH
    assert res.stdout.strip() == f"conda {CONDA_VERSION}"

    names = set()
    for sub in ("linux-64", "noarch"):
        repodata = json.loads((conda_site.channel / sub / "repodata.json").read_text())
        names |= {r["name"] for r in repodata.get("packages.conda", {}).values()}
    assert names == set(CHANNEL_PACKAGES)

    cfg = conda_site.conda_json(conda_user, "config", "--show", "channels", "envs_dirs", "pkgs_dirs",
                                "offline", "solver", "auto_activate_base")
    assert cfg["channels"] == [conda_site.channel_url]
    assert cfg["envs_dirs"][0] == str(conda_site.envs_dir(conda_user))
    assert cfg["pkgs_dirs"] == [str(conda_site.pkgs_dir(conda_user))]
    assert cfg["offline"] is True and cfg["solver"] == "classic" and cfg["auto_activate_base"] is False


def test_root_gets_a_home_under_test_base(conda_site):
    cfg = conda_site.conda_json(None, "config", "--show", "envs_dirs")
    assert cfg["envs_dirs"][0] == str(conda_site.root_home / ".conda" / "envs")
    assert str(conda_site.root_home).startswith(str(conda_site.base))


def test_conda_create_by_name(conda_site, conda_user, demo):
    assert demo == conda_user.home / ".conda" / "envs" / "demo"
    assert demo.stat().st_uid == conda_user.uid
    history = (demo / "conda-meta" / "history").read_text()
    assert "create -y -q -n demo python pip prefix-probe" in history
    assert (demo / "etc" / "prefix-probe" / "config.ini").read_text() == f"prefix={demo}\n"
    assert (demo / "bin" / "pip").read_text().splitlines()[0] == f"#!{demo}/bin/python3.11"
    envs = conda_site.conda_json(conda_user, "env", "list")["envs"]
    assert str(demo) in envs


@pytest.mark.parametrize("shell", ["bash", "zsh", "sh"])
def test_activate_deactivate(conda_site, conda_user, demo, shell):
    res = _check(conda_site.shell(conda_user, ACTIVATE_SCRIPT, shell=shell))
    v = _vars(res.stdout)
    assert v["before_shlvl"] == "0"
    assert v["prefix"] == str(demo)
    assert v["default_env"] == "demo"
    assert v["shlvl"] == "1"
    assert v["probe_active"] == "1"                                  # activate.d ran
    assert v["probe_home"] == f"{demo}/share/prefix-probe"
    assert v["python"] == f"{demo}/bin/python"
    assert v["sys_prefix"] == str(demo)
    assert f"exe:{demo}" in res.stdout.splitlines()                  # binary placeholder, exe
    assert f"lib:{demo}/lib" in res.stdout.splitlines()              # binary placeholder, .so
    assert v["after_probe_active"] == "unset"                        # deactivate.d ran
    assert v["after_prefix"] == "unset"
    assert v["after_shlvl"] == "0"
    assert f"{demo}/bin" not in v["after_path"].split(":")
    assert str(conda_site.condabin) in v["after_path"].split(":")


def test_batch_job_without_inherited_environment(conda_site, conda_user, demo):
    """Like an SGE job without -V: only HOME and a system PATH; the script sources the init."""
    script = f". {conda_site.init_file}\nconda activate demo\nprefix-probe\necho \"env=$CONDA_DEFAULT_ENV\"\n"
    res = _check(run_as(conda_user, ["/bin/sh", "-c", script], cwd=str(conda_user.home), timeout=120,
                        env={"HOME": str(conda_user.home), "PATH": "/usr/bin:/bin"}))
    assert res.stdout.splitlines() == [f"exe:{demo}", f"lib:{demo}/lib", "env=demo"]


def test_conda_env_factory_by_prefix_and_install(conda_site, conda_user, conda_env):
    scratch = conda_user.home / "conda-fixture-scratch"
    _check(run_as(conda_user, ["mkdir", "-p", str(scratch)], timeout=30))
    env = conda_env(prefix=scratch / "small", packages=("prefix-probe",))
    assert (env / "bin" / "prefix-probe").is_file()
    assert not (env / "share" / "cs-extra").exists()
    conda_site.install(conda_user, env, "cs-extra")
    assert (env / "share" / "cs-extra" / "cs-extra.txt").read_text() == "cs-extra 1.0.0\n"
    installed = {p["name"] for p in conda_site.conda_json(conda_user, "list", "-p", str(env))}
    assert installed == {"prefix-probe", "cs-extra"}
    assert env.stat().st_uid == conda_user.uid


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shell_files_pass_shellcheck(conda_site):
    from tests.harness.conda import FILES
    files = [conda_site.init_file, FILES / "conda.sh",
             FILES / "prefix-probe" / "activate.sh", FILES / "prefix-probe" / "deactivate.sh"]
    res = _check(run_as(None, ["shellcheck", *map(str, files)], timeout=60,
                        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}))
    assert res.stdout == ""
