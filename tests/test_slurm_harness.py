"""Self-test of tests/harness/slurm.py against a real single-node Slurm 22.05 cluster.

Uses tests/harness/files/slurm/loghook.sh as Prolog, Epilog, TaskProlog and TaskEpilog; it logs
each run's uid and environment, so the assertions below check what a real hook sees.
"""
from __future__ import annotations

import shutil
import time

import pytest

from tests.harness.slurm import LogHook, SlurmCluster
from tests.harness.users import TEST_BASE, ensure_user

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def logged(slurm_cluster):
    """The session cluster with loghook.sh as all four hooks (restored to no hooks afterwards)."""
    hook = LogHook(slurm_cluster)
    p = str(hook.path)
    with slurm_cluster.hooks_configured(prolog=p, epilog=p, task_prolog=p, task_epilog=p):
        yield slurm_cluster, hook


@pytest.fixture(scope="module")
def alice():
    return ensure_user("csalice")


def _one(hook: LogHook, jobid: str, name: str):
    runs = hook.runs(jobid, name)
    assert len(runs) == 1, f"{name} runs for job {jobid}: {runs}"
    return runs[0]


def _output_now(cluster: SlurmCluster, jobid: str) -> str:
    try:
        return cluster.output(jobid, timeout=0)
    except FileNotFoundError:
        return ""


def test_hooks_see_the_job(logged, alice):
    cluster, hook = logged
    cluster.ensure_clean()
    script = ("#SBATCH --comment=conda_env=foo\n"
              'echo "SCRIPT start=$(date +%s.%N) uid=$(id -u) X=$CS_HARNESS_TASKPROLOG pwd=$PWD"\n')
    jid = cluster.submit(alice, script)
    info = cluster.wait(jid, timeout=60)
    out = cluster.output(jid)
    assert info["JobState"] == "COMPLETED", (info, out)
    assert info["ExitCode"] == "0:0"
    assert info["Comment"] == "conda_env=foo"
    assert info["UserId"].startswith("csalice(")

    prolog = _one(hook, jid, "prolog_slurmd")
    assert prolog.uid == 0
    assert prolog.env["SLURM_JOB_COMMENT"] == "conda_env=foo"
    assert prolog.env["SLURM_JOB_UID"] == str(alice.uid)
    assert prolog.env["SLURM_JOB_USER"] == "csalice"
    assert prolog.env["SLURM_CONF"] == str(cluster.conf_path)

    task_prolog = _one(hook, jid, "prolog_task")
    assert task_prolog.uid == alice.uid
    assert "SLURM_JOB_COMMENT" not in task_prolog.env

    # the TaskProlog's "export" reached the job, its "print" went to the job's stdout
    line = next(l for l in out.splitlines() if l.startswith("SCRIPT "))
    fields = dict(kv.split("=", 1) for kv in line.split()[1:])
    assert fields["X"] == f"job_{jid}"
    assert fields["uid"] == str(alice.uid)
    assert fields["pwd"] == str(cluster.user_workdir(alice))
    assert f"CS_HARNESS task prolog print line for job {jid}" in out
    # PrologFlags=Alloc: the Prolog finished before the batch script started
    assert prolog.end is not None and prolog.end <= float(fields["start"])

    epilog = _one(hook, jid, "epilog_slurmd")
    assert epilog.uid == 0
    assert epilog.env["SLURM_JOB_COMMENT"] == "conda_env=foo"
    assert epilog.start >= float(fields["start"])
    assert _one(hook, jid, "epilog_task").uid == alice.uid
    assert cluster.node_state() == "idle"


def test_scancel_running_job_still_runs_epilog(logged, alice):
    cluster, hook = logged
    cluster.ensure_clean()
    jid = cluster.submit(alice, "#SBATCH --comment=conda_env=foo\necho started\nsleep 300\n")
    cluster.wait_started(jid, timeout=30)
    cluster.wait_for(lambda: "started" in _output_now(cluster, jid), 30, "job script running")
    assert cluster.job_state(jid) == "RUNNING"
    cluster.cancel(jid)
    info = cluster.wait(jid, timeout=30)
    assert info["JobState"] == "CANCELLED"
    epilog = _one(hook, jid, "epilog_slurmd")
    assert epilog.uid == 0 and epilog.env["SLURM_JOB_COMMENT"] == "conda_env=foo"
    assert cluster.node_state() == "idle"


def test_prolog_failure_drains_node_and_recovers(logged, alice):
    cluster, hook = logged
    cluster.ensure_clean()
    hook.marker("FAIL_prolog_slurmd")
    try:
        jid = cluster.submit(alice, "echo ran\n")
        cluster.wait_for(lambda: cluster.node_state().startswith("drain"), 30, "node drained")
        assert cluster.node_reason() == "Prolog error"
        # the job shows Reason "launch failed requeued held" while still COMPLETING (Epilog running),
        # then PENDING
        def held() -> bool:
            info = cluster.job_info(jid)
            return info.get("JobState") == "PENDING" and "held" in info.get("Reason", "")
        cluster.wait_for(held, 30, "job requeued and held")
        assert hook.runs(jid, "epilog_slurmd"), "no Epilog after the failed Prolog"
        assert _one(hook, jid, "prolog_slurmd").meta["rc"] == "7"
    finally:
        hook.marker("FAIL_prolog_slurmd", None)
    cluster.resume_node()
    assert cluster.node_state() == "idle"
    assert cluster.node_reason() == ""
    cluster.release(jid)
    info = cluster.wait(jid, timeout=60)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1"
    assert "ran" in cluster.output(jid)


def test_configure_hooks_applies_to_next_job(logged, alice):
    cluster, hook = logged
    cluster.ensure_clean()
    other = cluster.install_file(hook.path, "loghook-other.sh")
    p = str(hook.path)
    try:
        t0 = time.monotonic()
        cluster.configure_hooks(prolog=str(other), epilog=p, task_prolog=p, task_epilog=p)
        assert time.monotonic() - t0 < 10
        assert cluster.show_config()["Prolog"] == str(other)
        res = cluster.run_job(alice, "true\n", timeout=60)
        assert res.state == "COMPLETED"
        assert _one(hook, res.jobid, "prolog_slurmd").meta["script"] == str(other)
        assert _one(hook, res.jobid, "epilog_slurmd").meta["script"] == p
    finally:
        cluster.configure_hooks(prolog=p, epilog=p, task_prolog=p, task_epilog=p)


def test_second_cluster_up_down(slurm_cluster):
    """Another cluster next to the session one: other ports, failed up() and double down() are safe."""
    c2 = SlurmCluster(base=TEST_BASE / "slurm-selftest2")
    with pytest.raises(FileNotFoundError):
        c2.up(prolog="/nonexistent/prolog")
    c2.down()
    c2.up()
    try:
        assert c2.ctld_port != slurm_cluster.ctld_port
        assert not c2.started_munged  # the session cluster's munged is shared, not ours
        pids = c2.daemon_pids()
        assert pids["slurmctld"] and pids["slurmd"]
        res = c2.run_job(None, "echo root-job-$SLURM_JOB_ID\n", timeout=60)
        assert res.state == "COMPLETED"
        assert f"root-job-{res.jobid}" in res.output
        assert int(res.jobid) >= c2.first_job_id
    finally:
        c2.down()
    c2.down()
    assert not any(c2.daemon_pids().values())
    shutil.rmtree(c2.base, ignore_errors=True)
    assert slurm_cluster.node_state() == "idle"
    assert slurm_cluster.is_up()
