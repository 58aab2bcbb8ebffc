"""Images for interactive shells (``CONDA_STAGE_SHELL_IMAGES=yes``), with real
conda, real squashfuse and a real Slurm: 'conda activate NAME' mounts the
environment's image at the path jobs mount it and 'conda deactivate'
unmounts it; two shells share one mount; a job of the same user uses a
shell's mount and its end leaves the mount to the shell; a folder another
user made in the user's place is not used (one line, the tarball is
extracted) and the user's next prolog on the node replaces it.

/dev/fuse is made usable by users for this module; ``<staging>/users`` is
made root 1733, as the admin guide says for nodes where shells mount
images."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.harness.image")

from tests.harness import image as img  # noqa: E402
from tests.harness.envs import enable_env, remove_env  # noqa: E402
from tests.harness.image import PROBE, image_meta, values  # noqa: E402
from tests.harness.sitecfg import slurm_hooks  # noqa: E402
from tests.harness.users import TEST_BASE, ensure_user  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.conda]

STAGING = TEST_BASE / "shell-image-jobs"
STATE = TEST_BASE / "shell-image-state"
HOOK_LOG = TEST_BASE / "shell-image-hooks.log"
CONDA_STAGE = str(Path(sys.prefix) / "bin" / "conda-stage")

# Where 'conda activate' landed, and whether the image's folder is gone
# after 'conda deactivate'.
CYCLE = PROBE + """folder=$(dirname "$CONDA_PREFIX")
conda deactivate
if [ -e "$folder" ]; then echo "left=yes"; fi
if [ -n "${{CONDA_PREFIX:-}}" ]; then echo "after=$CONDA_PREFIX"; fi
"""


@pytest.fixture(scope="module")
def cluster(slurm_cluster, conda_site):
    HOOK_LOG.unlink(missing_ok=True)
    with img.users_may_mount(), \
            slurm_hooks(slurm_cluster, staging_dir=STAGING, state_dir=STATE, log_file=HOOK_LOG,
                        syslog="no", conda_root=conda_site.root_prefix, keep_unused=0,
                        stage_mode="auto", shell_images="yes"):
        img.shell_users_folder(STAGING)
        yield slurm_cluster


@pytest.fixture(scope="module")
def env(cluster, conda_site, conda_user, stage_bin):
    made = enable_env(conda_site, conda_user, stage_bin, "sh-img")
    img.pack_image(conda_site, conda_user, stage_bin, made.name)
    yield made
    remove_env(conda_site, conda_user, made)


@pytest.fixture
def clean(cluster, conda_user):
    cluster.ensure_clean()
    yield
    cluster.ensure_clean()
    subprocess.run([CONDA_STAGE, "gc", "--jobs", "--all-unused"], capture_output=True,
                   timeout=300, env={**os.environ, **cluster.env})
    img.nothing_left(STAGING, STATE, uid=conda_user.uid)
    assert "drain" not in cluster.node_state(), cluster.node_reason()


def shell(site, user, stage_bin, body, **kw):
    return site.shell(user, f'export PATH="{stage_bin}:$PATH"\n{body}', **kw)


def user_folder(user) -> Path:
    return STAGING / "users" / str(user.uid)


def test_conda_activate_mounts_the_image_and_conda_deactivate_unmounts_it(
        clean, conda_site, conda_user, stage_bin, env):
    r = shell(conda_site, conda_user, stage_bin, CYCLE.format(name=env.name))
    assert r.returncode == 0, r.stderr
    v = values(r.stdout)
    expected = image_meta(env)["mount_prefix"]
    assert v["prefix"] == v["sys_prefix"] == v["exe"] == expected, (r.stdout, r.stderr)
    assert v["lib"] == f"{expected}/lib"  # the relocated binary placeholder
    assert v["mounted"] == "yes", r.stderr
    assert "left" not in v and "after" not in v, r.stdout
    assert "INFO: Mounting " in r.stderr and "Extracting" not in r.stderr, r.stderr
    assert f"Unmounting staged Conda environment: {expected}" in r.stderr
    assert img.mount_points(STAGING) == []
    # the user's folder the shell made: theirs alone
    st = user_folder(conda_user).stat()
    assert (st.st_uid, st.st_mode & 0o777) == (conda_user.uid, 0o700)
    doctor = subprocess.run([CONDA_STAGE, "doctor"], capture_output=True, text=True, timeout=120)
    assert f"ok    shell images: {STAGING}/users is root's, mode 1733" in doctor.stdout, \
        doctor.stdout


def test_two_shells_share_one_mount_and_the_last_one_unmounts(
        clean, conda_site, conda_user, stage_bin, env):
    expected = image_meta(env)["mount_prefix"]
    inner = f"conda activate {env.name}; echo inner=$CONDA_PREFIX; conda deactivate; " \
            f"if mountpoint -q {expected}; then echo kept=yes; fi"
    body = f"""conda activate {env.name}
echo "outer=$CONDA_PREFIX"
conda-stage status {env.prefix} | sed -n 's/^Mounted: */status=/p'
bash -c '. {conda_site.init_file}; {inner}'
conda deactivate
if mountpoint -q {expected}; then echo "still=yes"; fi
"""
    r = shell(conda_site, conda_user, stage_bin, body)
    assert r.returncode == 0, r.stderr
    v = values(r.stdout)
    assert v["outer"] == v["inner"] == expected, (r.stdout, r.stderr)
    assert re.fullmatch(rf"{re.escape(expected)} \(held by shell [0-9]+\)", v["status"]), r.stdout
    assert v.get("kept") == "yes", r.stderr  # the outer shell still holds it
    assert "still" not in v, r.stderr
    assert r.stderr.count("INFO: Mounting ") == 1, r.stderr
    assert "Using the image mounted on this node" in r.stderr
    assert img.mount_points(STAGING) == []


def test_a_job_uses_the_shells_mount_and_its_end_leaves_it_to_the_shell(
        clean, cluster, conda_site, conda_user, stage_bin, env):
    """A shell holds the mount while a job of the same user declares the
    environment: the prolog uses the mount, the epilog (copies kept 0 s)
    leaves it mounted for the shell, whose 'conda deactivate' then removes
    it."""
    expected = image_meta(env)["mount_prefix"]
    flag = cluster.user_workdir(conda_user.name) / "shell-image-job.done"
    flag.unlink(missing_ok=True)
    # the shell: activate, wait for the job to end, check, deactivate
    body = f"""conda activate {env.name}
echo "shell=$CONDA_PREFIX"
n=0; while [ ! -e {flag} ] && [ $n -lt 600 ]; do sleep 0.2; n=$((n+1)); done
if mountpoint -q "$CONDA_PREFIX"; then echo "after_job=mounted"; fi
python -c 'import json, sqlite3' && echo "python=ok"
conda deactivate
"""
    script = (f"#!/bin/bash\n. {conda_site.init_file}\n" + PROBE.format(name=env.name))
    proc = subprocess.Popen(
        ["runuser", "-u", conda_user.name, "--", "env", "-i", f"HOME={conda_user.home}",
         "PATH=/usr/local/bin:/usr/bin:/bin", "bash", "-c",
         f'. {conda_site.init_file}\nexport PATH="{stage_bin}:$PATH"\n{body}'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not img.mount_points(STAGING) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert img.mount_points(STAGING) == [expected]
        mark = HOOK_LOG.stat().st_size if HOOK_LOG.exists() else 0
        jid = cluster.submit(conda_user, script, f"--comment=conda_env={env.name}")
        assert cluster.wait(jid)["JobState"] == "COMPLETED"
        out = cluster.output(jid)
        assert values(out)["sys_prefix"] == expected, out
        log = HOOK_LOG.read_text()[mark:]
        assert re.search(rf"staged {env.prefix} -> {re.escape(expected)} in [0-9.]+ s "
                         rf"\(shared copy\)", log), log
        assert "a shell of uid" in log and "still uses it" in log, log
        assert img.mount_points(STAGING) == [expected]  # the epilog left it to the shell
    finally:
        flag.touch()
        stdout, stderr = proc.communicate(timeout=120)
    v = values(stdout)
    assert v["shell"] == expected and v["after_job"] == "mounted" and v["python"] == "ok", \
        (stdout, stderr)
    assert f"Unmounting staged Conda environment: {expected}" in stderr, stderr
    assert img.mount_points(STAGING) == []


def test_a_folder_someone_else_made_is_not_used_and_the_next_prolog_replaces_it(
        clean, cluster, conda_site, conda_user, stage_bin, env):
    """Another user makes ``users/<uid>`` of the victim first (the folder is
    sticky and writable by all): the victim's shell says so in one line and
    extracts; the victim's next job gets its folder back and the image."""
    squatter = ensure_user("csbob")
    folder = user_folder(conda_user)
    subprocess.run(["runuser", "-u", squatter.name, "--", "mkdir", "-m", "0777", str(folder)],
                   check=True)
    try:
        r = shell(conda_site, conda_user, stage_bin, CYCLE.format(name=env.name))
        assert r.returncode == 0, r.stderr
        lines = [x for x in r.stderr.splitlines() if "not mounting its image" in x]
        assert len(lines) == 1 and f"uid {squatter.uid} made it" in lines[0], r.stderr
        assert "Extracting" in r.stderr
        assert not values(r.stdout)["prefix"].startswith(str(STAGING)), r.stdout
        jid = cluster.submit(conda_user, f"#!/bin/bash\n. {conda_site.init_file}\n"
                             + PROBE.format(name=env.name), f"--comment=conda_env={env.name}")
        assert cluster.wait(jid)["JobState"] == "COMPLETED"
        assert values(cluster.output(jid))["sys_prefix"] == image_meta(env)["mount_prefix"]
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(folder)], check=False)


def test_a_writable_copy_is_extracted_and_says_why(clean, conda_site, conda_user, stage_bin, env):
    r = shell(conda_site, conda_user, stage_bin,
              f'p=$(conda-stage --stage --writable --owner-pid $$ {env.name}) && echo "path=$p"\n'
              f'touch "$p/written" && echo "writable=yes"\n'
              f'conda-stage --unstage --owner-pid $$ "$p"')
    assert r.returncode == 0, r.stderr
    v = values(r.stdout)
    assert v["writable"] == "yes" and not v["path"].startswith(str(STAGING)), r.stdout
    lines = [x for x in r.stderr.splitlines() if "Not mounting its image" in x]
    assert lines == ["INFO: Not mounting its image: a writable copy was asked for (--writable); "
                     "extracting it instead"], r.stderr
    assert not Path(v["path"]).exists()


def test_the_mount_of_a_shell_killed_without_deactivate_goes_with_gc(
        clean, conda_site, conda_user, stage_bin, env):
    expected = image_meta(env)["mount_prefix"]
    r = shell(conda_site, conda_user, stage_bin,
              f"conda activate {env.name}\necho \"prefix=$CONDA_PREFIX\"\nkill -9 $$")
    assert values(r.stdout)["prefix"] == expected, (r.stdout, r.stderr)
    assert img.mount_points(STAGING) == [expected]  # its shell is gone, not its mount
    r = shell(conda_site, conda_user, stage_bin, "conda-stage gc")
    assert r.returncode == 0, r.stderr
    assert f"Removing {Path(expected).parent} (its shells are gone)" in r.stderr, r.stderr
    assert img.mount_points(STAGING) == [] and not Path(expected).parent.exists()
