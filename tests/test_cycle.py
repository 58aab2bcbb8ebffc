"""The interactive cycle with the real conda (24.7.1) and real shells:
'conda activate' of an auto-staged environment lands on the staged copy with
no second conda run (the activate.d hook turns conda's activation of the
original into one of the copy), and a plain 'conda deactivate' leaves the
copy, removes it and restores the shell exactly -- also when activations are
nested or stacked, when another environment is activated on top of the copy,
under 'set -eu', and never for 'conda run' or CONDA_STAGE=false."""
import os
import re
import shlex

import pytest

from tests.test_core import enabled, new_env, run, values  # noqa: F401 (fixtures)

pytestmark = pytest.mark.conda

HOOK = "etc/conda/activate.d/zzz.conda-stage-auto.sh"

# Snapshots of everything a cycle may touch: the exported environment, the
# (unexported) prompt, and any shell variable the hooks could leave behind.
SNAP = r"""
snap() {
    { env | LC_ALL=C sort | grep -v '^_='
      echo "PS1=[${PS1-<unset>}]"
      set | grep '^__conda_stage' || :
    } > "$TMPDIR/snap.$1"
}
"""

# Counts the conda processes the shell function starts (the site's conda.sh
# runs every 'conda activate/deactivate' through __conda_exe).
COUNT = r"""
__conda_exe() (
    echo run >> "$TMPDIR/conda-runs"
    exec "$CONDA_EXE" ${_CE_M:+"$_CE_M"} ${_CE_CONDA:+"$_CE_CONDA"} "$@"
)
"""


def copies(user_tmp):
    return sorted(p.name for p in user_tmp.iterdir() if p.name.startswith("conda-stage-"))


def diff(user_tmp, a, b):
    left = (user_tmp / f"snap.{a}").read_text().splitlines()
    right = (user_tmp / f"snap.{b}").read_text().splitlines()
    return [f"-{x}" for x in left if x not in right] + [f"+{x}" for x in right if x not in left]


def _add_hooks(env, conda_user, scripts):
    for rel, text in scripts.items():
        path = env / "etc/conda" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        for p in (path, path.parent):
            os.chown(p, conda_user.uid, conda_user.gid)


# An activate.d script that backs up a variable and one that sorts after the
# auto-stage hook ('zzz_' > 'zzz.'): both must see the copy's prefix, run once,
# and be undone exactly by the copy's deactivate.d.
EXTRA_HOOKS = {
    "activate.d/cs-backup.sh": 'export CS_BACKUP_X="$CS_X"; export CS_X="$CONDA_PREFIX/x"\n',
    "deactivate.d/cs-backup.sh": 'export CS_X="$CS_BACKUP_X"; unset CS_BACKUP_X\n',
    "activate.d/zzz_late.sh": 'export CS_LATE="${CS_LATE:-}+$CONDA_PREFIX"\n',
    "deactivate.d/zzz_late.sh": "unset CS_LATE\n",
}


@pytest.mark.parametrize("shell", ["bash", "zsh", "sh"])
def test_cycle_lands_on_the_copy_with_one_conda_run_and_restores_the_shell(
        shell, new_env, run, user_tmp, conda_user):
    env = new_env()
    _add_hooks(env, conda_user, EXTRA_HOOKS)
    r = run(f"conda-stage --auto-stage=enable {env.name}")
    assert r.returncode == 0, r.stderr
    # A PATH with a duplicate and an empty entry, a prompt, a variable the
    # backup hook saves and restores.
    r = run(SNAP + COUNT + f"""
PATH="/usr/bin:$PATH::/usr/bin"; export PATH
PS1='$ '
CS_X=before; export CS_X
snap 0
CONDA_STAGE=false conda activate {env.name}
CONDA_STAGE=false conda deactivate
snap plain
rm "$TMPDIR/conda-runs"
conda activate {env.name}
echo "runs_activate=$(wc -l < "$TMPDIR/conda-runs")"
echo "prefix=$CONDA_PREFIX"
echo "python=$(command -v python)"
echo "path0=${{PATH%%:*}}"
echo "shlvl=$CONDA_SHLVL"
echo "default_env=$CONDA_DEFAULT_ENV"
echo "modifier=$CONDA_PROMPT_MODIFIER"
echo "ps1=$PS1"
echo "probe_home=$PREFIX_PROBE_HOME"
echo "cs_x=$CS_X"
echo "cs_late=$CS_LATE"
echo "leftover=$(set | grep -c '^__conda_stage')"
conda deactivate
echo "runs=$(wc -l < "$TMPDIR/conda-runs")"
snap 1
""", shell=shell)
    assert r.returncode == 0, r.stderr
    v = values(r.stdout)
    staged = v["prefix"]
    assert re.fullmatch(rf"{user_tmp}/conda-stage-[a-z0-9_]+/{env.name}", staged), staged
    # One conda run to activate (none inside the hook), one to deactivate.
    assert (v["runs_activate"], v["runs"]) == ("1", "2"), r.stderr
    assert v["python"] == f"{staged}/bin/python"
    assert v["path0"] == f"{staged}/bin"
    assert v["shlvl"] == "1"
    # What 'conda activate <copy>' would show.
    assert v["default_env"] == staged
    assert v["modifier"] == f"({staged}) "
    assert v["ps1"] == f"({staged}) $ "
    # The copy's activate.d scripts ran with its prefix, the original's were undone.
    assert v["probe_home"] == f"{staged}/share/prefix-probe"
    assert v["cs_x"] == f"{staged}/x"
    assert v["cs_late"] == f"+{staged}"
    assert v["leftover"] == "0"
    assert "INFO: Activating staged Conda environment" in r.stderr
    assert "INFO: Removing staged Conda environment" in r.stderr
    # Restored exactly as by a cycle without staging (PATH byte for byte, CS_X
    # from the backup hook, PS1); conda itself writes PATH's empty entry as '.'.
    assert diff(user_tmp, "plain", 1) == []
    assert [line.split("=")[0] for line in diff(user_tmp, 0, "plain")] == ["-PATH", "+PATH"]
    assert copies(user_tmp) == []


def test_nested_and_stacked_activations_return_to_the_environment_below(enabled, run, user_tmp):
    env = enabled()
    r = run(SNAP + f"""
conda activate base
snap 0
conda activate {env.name}
echo "replace_prefix=$CONDA_PREFIX"
echo "replace_below=$CONDA_PREFIX_1"
echo "replace_shlvl=$CONDA_SHLVL"
conda deactivate
snap 1
conda activate --stack {env.name}
echo "stack_prefix=$CONDA_PREFIX"
echo "stack_path=$PATH"
echo "stacked=$CONDA_STACKED_2"
conda deactivate
snap 2
echo "base=$CONDA_PREFIX"
conda deactivate
""")
    assert r.returncode == 0, r.stderr
    v = values(r.stdout)
    base = v["base"]
    assert v["replace_prefix"].startswith(f"{user_tmp}/conda-stage-")
    assert (v["replace_below"], v["replace_shlvl"]) == (base, "2")
    assert v["stack_prefix"].startswith(f"{user_tmp}/conda-stage-")
    assert v["stack_path"].startswith(f"{v['stack_prefix']}/bin:{base}/bin:")
    assert v["stacked"] == "true"
    assert diff(user_tmp, 0, 1) == [] and diff(user_tmp, 0, 2) == []
    assert copies(user_tmp) == []


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_activating_another_environment_keeps_the_copy_until_it_is_left(
        shell, enabled, new_env, run, user_tmp):
    env = enabled()
    other = new_env()
    r = run(SNAP + f"""
snap 0
conda activate {env.name}
echo "staged=$CONDA_PREFIX"
conda activate {other.name}
echo "other=$CONDA_PREFIX"
echo "below=$CONDA_PREFIX_1"
echo "copies_on_other=$(ls "$TMPDIR" | grep -c conda-stage-)"
conda deactivate
echo "back=$CONDA_PREFIX"
echo "back_python=$(python -c 'import sys; print(sys.prefix)')"
echo "back_probe_home=$PREFIX_PROBE_HOME"
conda deactivate
snap 1
""", shell=shell)
    assert r.returncode == 0, r.stderr
    v = values(r.stdout)
    staged = v["staged"]
    assert staged.startswith(f"{user_tmp}/conda-stage-")
    assert (v["other"], v["below"], v["copies_on_other"]) == (str(other), staged, "1")
    assert v["back"] == v["back_python"] == staged
    assert v["back_probe_home"] == f"{staged}/share/prefix-probe"
    assert diff(user_tmp, 0, 1) == []
    assert copies(user_tmp) == []


def test_activating_the_staged_environment_twice(enabled, run, user_tmp):
    env = enabled()
    r = run(SNAP + f"""
snap 0
conda activate {env.name}
echo "one=$CONDA_PREFIX"
conda activate {env.name}
echo "two=$CONDA_PREFIX"
echo "below=$CONDA_PREFIX_1"
conda deactivate
echo "back=$CONDA_PREFIX"
echo "back_exists=$(test -x "$CONDA_PREFIX/bin/python" && echo yes)"
conda deactivate
snap 1
""")
    assert r.returncode == 0, r.stderr
    v = values(r.stdout)
    assert v["one"].startswith(f"{user_tmp}/conda-stage-")
    assert v["two"].startswith(f"{user_tmp}/conda-stage-")
    assert (v["below"], v["back"], v["back_exists"]) == (v["one"], v["one"], "yes")
    assert diff(user_tmp, 0, 1) == []
    assert copies(user_tmp) == []


@pytest.mark.parametrize("shell", ["bash", "zsh", "sh"])
def test_cycle_under_set_eu(shell, enabled, run, user_tmp):
    env = enabled()
    r = run(SNAP + f"""
snap 0
set -eu
conda activate {env.name}
echo "prefix=$CONDA_PREFIX"
conda deactivate
set +eu
snap 1
echo done=yes
""", shell=shell)
    assert r.returncode == 0, r.stderr
    v = values(r.stdout)
    assert v["done"] == "yes"
    assert v["prefix"].startswith(f"{user_tmp}/conda-stage-")
    assert diff(user_tmp, 0, 1) == []
    assert copies(user_tmp) == []


def test_conda_run_and_conda_stage_false_stay_unstaged(enabled, run, user_tmp):
    env = enabled()
    r = run(SNAP + f"""
snap 0
conda run -n {env.name} python -c 'import sys; print("run=" + sys.prefix)'
CONDA_STAGE=false conda activate {env.name}
echo "nostage=$CONDA_PREFIX"
CONDA_STAGE=false conda deactivate
snap 1
""")
    assert r.returncode == 0, r.stderr
    v = values(r.stdout)
    assert (v["run"], v["nostage"]) == (str(env), str(env))
    assert "Staging" not in r.stderr
    assert diff(user_tmp, 0, 1) == []
    assert copies(user_tmp) == []


def test_reenabling_with_changed_hooks_repacks(enabled, run, user_tmp):
    env = enabled()
    hook = env / HOOK
    tarball = env.parent / f"{env.name}.tar.zst"
    before = os.stat(tarball).st_mtime_ns
    with open(hook, "a") as fh:
        fh.write("# an older conda-stage's hook\n")
    r = run(f"conda-stage --auto-stage=enable {shlex.quote(str(env))}")
    assert r.returncode == 0, r.stderr
    assert "Replaced the auto-staging hooks" in r.stderr
    assert "[ONCE] Packaging Conda environment" in r.stderr
    assert os.stat(tarball).st_mtime_ns != before
    assert "an older conda-stage" not in hook.read_text()
    # Unchanged hooks: no repack.
    r = run(f"conda-stage --auto-stage=enable {shlex.quote(str(env))}")
    assert r.returncode == 0, r.stderr
    assert "Replaced" not in r.stderr and "[ONCE]" not in r.stderr


def test_reactivating_the_copy_keeps_it(enabled, run, user_tmp):
    """conda sources the copy's deactivate.d when it reactivates it: for
    'conda activate <copy>' (with 'activate' as the shell function's
    arguments) and after 'conda install' (the site's conda function runs
    '__conda_eval reactivate', conda's own conda.sh '__conda_reactivate')."""
    env = enabled()
    r = run(SNAP + f"""
snap 0
conda activate {env.name}
p=$CONDA_PREFIX
conda activate "$p"
echo "after_activate_copy=$CONDA_PREFIX:$PREFIX_PROBE_HOME"
test -d "$p" && echo "kept_activate=yes"
__conda_eval reactivate
echo "after_reactivate=$CONDA_PREFIX:$PREFIX_PROBE_HOME"
test -d "$p" && echo "kept_reactivate=yes"
conda deactivate
test -d "$p" || echo "removed=yes"
unset p
snap 1
""")
    assert r.returncode == 0, r.stderr
    v = values(r.stdout)
    staged = v["after_activate_copy"].split(":")[0]
    assert staged.startswith(f"{user_tmp}/conda-stage-")
    probe = f"{staged}:{staged}/share/prefix-probe"
    assert (v["after_activate_copy"], v["after_reactivate"]) == (probe, probe)
    assert (v["kept_activate"], v["kept_reactivate"], v["removed"]) == ("yes", "yes", "yes")
    assert diff(user_tmp, 0, 1) == []
    assert copies(user_tmp) == []


def _wait_gone(user_tmp, timeout=120.0):
    """Wait until conda-stage's removal in the background has left nothing
    in ``user_tmp``; returns what is still there after ``timeout``."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        left = os.listdir(user_tmp)
        if not left:
            return []
        time.sleep(0.05)
    return os.listdir(user_tmp)


def test_deactivate_removes_the_copy_in_the_background_and_nothing_is_left(enabled, run,
                                                                          user_tmp):
    """'conda deactivate' renames the copy's folder out of the way before it
    returns (the copy's path is gone at once) and a detached process deletes
    it; with stderr going to a file nothing waits for that process, and yet
    every file goes."""
    env = enabled()
    r = run(f"""
conda activate {env.name}
p=$CONDA_PREFIX
conda deactivate 2> "$TMPDIR/deactivate.err"
test -e "$p" && echo "copy_path_right_after=exists" || echo "copy_path_right_after=gone"
test -e "${{p%/*}}" && echo "folder_right_after=exists" || echo "folder_right_after=gone"
cat "$TMPDIR/deactivate.err" >&2; rm -f "$TMPDIR/deactivate.err"
echo "prefix=$p"
""")
    assert r.returncode == 0, r.stderr
    v = values(r.stdout)
    assert v["prefix"].startswith(f"{user_tmp}/conda-stage-")
    assert (v["copy_path_right_after"], v["folder_right_after"]) == ("gone", "gone")
    assert "(in the background)" in r.stderr
    assert _wait_gone(user_tmp) == []


def test_gc_removes_a_copy_whose_removal_did_not_finish(enabled, run, user_tmp):
    """A remover that dies leaves the renamed folder (conda-stage-*.trash)
    with its lock free: gc removes it -- but not while a process holds its
    lock (a remover still at work)."""
    env = enabled()
    r = run(f"""sleep 300 & a=$!
p=$(conda-stage --stage --owner-pid $a {env.name})
d=${{p%/*}}
# the state a remover killed right after the rename leaves behind
mv "$d" "$d.trash"
( exec 9< "$d.trash"; flock 9; exec sleep 300 ) > /dev/null 2>&1 & holder=$!
for i in $(seq 100); do flock -n "$d.trash" true || break; sleep 0.05; done
echo "busy=$(conda-stage gc 2>&1 | tr '\\n' ' ')"
test -d "$d.trash/{env.name}" && echo "kept_while_locked=yes"
kill $holder; wait $holder 2> /dev/null
echo "dead=$(conda-stage gc 2>&1 | tr '\\n' ' ')"
test -e "$d.trash" || echo "collected=yes"
kill $a; wait $a 2> /dev/null
ls -A "$TMPDIR" | wc -l | sed 's/^/left=/'""")
    assert r.returncode == 0, r.stderr
    v = values(r.stdout)
    assert "is removing it" in v["busy"] and v["kept_while_locked"] == "yes", r.stdout
    assert "a copy whose removal did not finish" in v["dead"], r.stdout
    assert v["collected"] == "yes" and v["left"] == "0", r.stdout + r.stderr


def test_the_hooks_calls_are_parsed_without_plumbum_and_nothing_else_is():
    import subprocess
    import sys

    from conda_stage.cli import _hook_call

    assert _hook_call(["--stage", "--owner-pid", "12", "/e"]) == ("--stage", "/e", 12, False,
                                                                  False, False)
    assert _hook_call(["--unstage", "--background", "--owner-pid=7", "/c"]) == \
        ("--unstage", "/c", 7, True, False, False)
    assert _hook_call(["-q", "--stage", "/e"]) == ("--stage", "/e", None, False, True, False)
    assert _hook_call(["--pack", "--force", "/e"]) == ("--pack", "/e", None, True, False, False)
    assert _hook_call(["--pack", "-q", "/e"]) == ("--pack", "/e", None, False, True, False)
    for other in (["--stage"], ["--stage", "a", "b"], ["--stage", "--background", "/e"],
                  ["--stage", "--unstage", "/e"], ["--stage", "--stage", "/e"],
                  ["--stage", "--owner-pid", "1e3", "/e"], ["--stage", "--owner-pid", "-1", "/e"],
                  ["--stage", "--owner-pid"], ["--stage", "--", "/e"], ["--stage", "--path", "x", "/e"],
                  ["--stage", "--writable", "/e"], ["--unstage", "--force", "/c"], ["--help"],
                  ["status", "/e"], ["--stage", "-"], ["--pack"], ["--pack", "--image", "/e"],
                  ["--pack", "--owner-pid", "3", "/e"], ["--pack", "--background", "/e"],
                  ["--pack", "--format", "tar.gz", "/e"], ["--stage", "--force", "/e"]):
        assert _hook_call(other) is None, other
    # The hooks' calls do not import plumbum (nor conda-pack, psutil, yaml).
    code = ("import sys; from conda_stage import cli\n"
            "cli.main(['conda-stage', '--unstage', '--background', '--owner-pid', '1', '/nonexistent'])\n"
            "print(sorted(m for m in ('plumbum', 'conda_pack', 'psutil', 'yaml') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
    assert "ERROR: Does not look like a staged environment" in r.stderr
