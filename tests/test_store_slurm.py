"""The node store on a real Slurm: a user's jobs share one copy per
environment and tarball, kept for the next wave of an array job and then
collected; never shared between users; a repack gives new jobs a new copy;
a slurmd killed mid-job or a staging disk too small leave nothing behind.
The product's defaults hold here (copies kept 300 s after their last job);
each test ends with the admin's 'conda-stage gc --jobs --all-unused' and
proof that nothing is left."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness.envs import enable_env, job_envs, remove_env
from tests.harness.sitecfg import slurm_hooks, store_listing as listing
from tests.harness.users import TEST_BASE, ensure_user

pytestmark = [pytest.mark.slurm, pytest.mark.conda]

STAGING = TEST_BASE / "store-jobs"
STATE = TEST_BASE / "store-state"
HOOK_LOG = TEST_BASE / "store-hooks.log"
CONDA_STAGE = str(Path(sys.prefix) / "bin" / "conda-stage")


@pytest.fixture(scope="module")
def site_envs(conda_site, conda_user, stage_bin):
    with job_envs(conda_site, conda_user, stage_bin, "st") as envs:
        yield envs


@pytest.fixture(scope="module")
def cluster(slurm_cluster, site_envs, conda_site):
    HOOK_LOG.unlink(missing_ok=True)
    with slurm_hooks(slurm_cluster, staging_dir=STAGING, state_dir=STATE, log_file=HOOK_LOG,
                     syslog="no", conda_root=conda_site.root_prefix):
        yield slurm_cluster


def gc(cluster, *args):
    r = subprocess.run([CONDA_STAGE, "gc", "--jobs", *args], capture_output=True, text=True,
                       timeout=300, env={**os.environ, **cluster.env})
    assert r.returncode == 0, r.stderr
    return r.stderr


def node_status(cluster):
    r = subprocess.run([CONDA_STAGE, "status", "--node", "--json"], capture_output=True,
                       text=True, timeout=60, env={**os.environ, **cluster.env})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def job(cluster, conda_user, conda_site):
    """Submit jobs (as the test user by default); afterwards every job has
    let go of its copies, and the admin's gc leaves nothing."""
    cluster.ensure_clean()
    init = conda_site.init_file
    cluster.defaults.update(keep_unused=300)

    def submit(body, *args, user=conda_user):
        return cluster.submit(user, f"#!/bin/bash\n. {init}\n{body}\n", *args)

    yield submit
    cluster.ensure_clean()
    held = [c for c in node_status(cluster)["copies"] if c["jobs"]]
    assert held == [], f"copies still held after every job ended: {held}"
    gc(cluster, "--all-unused")
    assert listing(STAGING) == [], f"left behind: {listing(STAGING)}"
    assert listing(STATE) == [], f"state left behind: {listing(STATE)}"
    assert "drain" not in cluster.node_state(), cluster.node_reason()


def values(text):
    return dict(line.split("=", 1) for line in text.splitlines() if re.match(r"^\w+=", line))


def log_since(mark):
    return HOOK_LOG.read_text()[mark:] if HOOK_LOG.exists() else ""


def log_mark():
    return HOOK_LOG.stat().st_size if HOOK_LOG.exists() else 0


PROBE = """
conda activate {name}
echo "prefix=$CONDA_PREFIX"
echo "sys_prefix=$(python -c 'import sys; print(sys.prefix)')"
"""


def test_array_job_of_20_tasks_extracts_once_on_the_node(job, cluster, site_envs, conda_user):
    env = site_envs["jup"]
    mark = log_mark()
    out_dir = cluster.user_workdir(conda_user.name)
    jid = job(PROBE.format(name=env.name), f"--comment=conda_env={env.name}", "--array=1-20",
              "-o", f"{out_dir}/store-array-%A_%a.out")
    cluster.wait(jid, timeout=600)
    prefixes = set()
    for task in range(1, 21):
        out = (out_dir / f"store-array-{jid}_{task}.out").read_text()
        v = values(out)
        assert v["prefix"] == v["sys_prefix"], out
        prefixes.add(v["prefix"])
    assert len(prefixes) == 1, prefixes
    log = log_since(mark)
    extracted = re.findall(rf"staged {env.prefix} -> .* \(extracted\)", log)
    shared = re.findall(rf"staged {env.prefix} -> .* \(shared copy\)", log)
    assert (len(extracted), len(shared)) == (1, 19), log
    # kept for the next job of this user, held by none
    copies = node_status(cluster)["copies"]
    assert [(c["path"], c["jobs"], c["user"]) for c in copies] == \
        [(prefixes.pop(), [], conda_user.name)]
    mine = json.loads(subprocess.run(
        ["runuser", "-u", conda_user.name, "--", CONDA_STAGE, "status", "--node", "--json"],
        capture_output=True, text=True, timeout=60, check=True, cwd="/").stdout)
    assert [c["path"] for c in mine["copies"]] == [c["path"] for c in copies]  # as the user
    assert "Nothing to collect" in gc(cluster)  # within its keep time: kept


def test_two_users_with_same_named_envs_never_share(job, cluster, conda_site, conda_user,
                                                    stage_bin):
    bob = ensure_user("csbob")
    name = "st-same"
    mine = enable_env(conda_site, conda_user, stage_bin, name)
    theirs = enable_env(conda_site, bob, stage_bin, name)
    try:
        body = PROBE.format(name=name) + "echo \"uid=$(id -u)\"\nsleep 3\n"
        jobs = [job(body, f"--comment=conda_env={name}"),
                job(body, f"--comment=conda_env={name}", user=bob)]
        seen = {}
        for jid in jobs:
            assert cluster.wait(jid)["JobState"] == "COMPLETED"
            v = values(cluster.output(jid))
            seen[v["uid"]] = v["sys_prefix"]
        assert set(seen) == {str(conda_user.uid), str(bob.uid)}
        for uid, prefix in seen.items():
            assert prefix.startswith(f"{STAGING}/users/{uid}/"), seen
            st = os.stat(f"{STAGING}/users/{uid}")
            assert (st.st_uid, st.st_mode & 0o777) == (int(uid), 0o700)
    finally:
        cluster.ensure_clean()
        remove_env(conda_site, conda_user, mine)
        remove_env(conda_site, bob, theirs)


RUN = """
conda activate {name}
echo "prefix=$CONDA_PREFIX"
echo ready
sleep 600
"""


def _wait_for_output(cluster, jid, text, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if text in cluster.output(jid, timeout=0):
                return cluster.output(jid)
        except Exception:
            pass
        time.sleep(0.2)
    raise AssertionError(f"job {jid} never printed {text!r}")


def test_a_repack_gives_new_jobs_a_new_copy_and_the_old_goes_with_its_last_job(
        job, cluster, conda_site, conda_user, stage_bin):
    env = enable_env(conda_site, conda_user, stage_bin, "st-repack")
    try:
        first = job(RUN.format(name=env.name), f"--comment=conda_env={env.name}")
        old = values(_wait_for_output(cluster, first, "ready"))["prefix"]
        r = conda_site.shell(conda_user, f'export PATH="{stage_bin}:$PATH"\n'
                                         f"conda stage --pack --force {env.name}")
        assert r.returncode == 0, r.stderr
        second = job(RUN.format(name=env.name), f"--comment=conda_env={env.name}")
        new = values(_wait_for_output(cluster, second, "ready"))["prefix"]
        assert new != old and os.path.isdir(old) and os.path.isdir(new)
        cluster.defaults.update(keep_unused=0)  # the old copy goes with its last job
        cluster.cancel(first)
        cluster.wait(first)
        assert not os.path.exists(old) and os.path.isdir(new)
        cluster.cancel(second)
        cluster.wait(second)
        assert not os.path.exists(new)
    finally:
        cluster.ensure_clean()
        remove_env(conda_site, conda_user, env)


def test_slurmd_killed_during_a_job_then_restarted_leaves_nothing(job, cluster, site_envs):
    env = site_envs["jup"]
    jid = job(RUN.format(name=env.name), f"--comment=conda_env={env.name}")
    copy = values(_wait_for_output(cluster, jid, "ready"))["prefix"]
    os.kill(cluster.daemon_pids()["slurmd"], signal.SIGKILL)
    time.sleep(1)
    cluster._start_daemon(["slurmd", "-f", str(cluster.conf_path), "-N", cluster.node],
                          "slurmd", cluster.slurmd_log)
    cluster.cancel(jid)
    cluster.wait(jid, timeout=180)
    cluster.wait_idle(timeout=60, resume=True)
    gc(cluster)  # whatever the epilog could not do: the job no longer runs
    recs = node_status(cluster)["copies"]
    assert all(not c["jobs"] for c in recs), recs
    gc(cluster, "--all-unused")
    assert not os.path.exists(copy)


@pytest.fixture
def small_disk(cluster):
    """The staging folder on a tmpfs of its own, made small by the test."""
    mount = TEST_BASE / "store-small"
    mount.mkdir(exist_ok=True)
    mounted = []

    def make(**opts):
        options = ",".join(["mode=755"] + [f"{k}={v}" for k, v in opts.items()])
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "cs-small", str(mount)],
                       check=True)
        mounted.append(mount)
        cluster.defaults.update(staging_dir=mount / "jobs")
        return mount

    yield make
    cluster.defaults.update(staging_dir=STAGING)
    for m in mounted:
        leftovers = listing(m / "jobs")
        subprocess.run(["umount", str(m)], check=True)
        assert leftovers == [], f"left on the small disk: {leftovers}"


@pytest.mark.parametrize("limit, problem", [
    ({"size": "24m"}, "not enough free space on the local disk"),
    ({"size": "1g", "nr_inodes": "400"}, "not enough free inodes on the local disk"),
])
def test_a_staging_disk_too_small_gives_one_line_and_leaves_nothing(
        limit, problem, job, cluster, site_envs, small_disk):
    small_disk(**limit)
    env = site_envs["jup"]
    jid = job('echo "envs_path=${CONDA_ENVS_PATH:-unset}"', f"--comment=conda_env={env.name}")
    info = cluster.wait(jid)
    out = cluster.output(jid)
    lines = [line for line in out.splitlines() if line.startswith("conda-stage:")]
    assert len(lines) == 1 and problem in lines[0], out
    assert f"conda-stage: not staging {env.name}: " in lines[0]
    assert info["JobState"] == "COMPLETED", out  # ran, unstaged
    assert values(out)["envs_path"] == "unset", out
