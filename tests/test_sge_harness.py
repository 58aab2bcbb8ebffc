"""Self-test of the SGE harness and of the shipped JSV (prolog/sge-jsv).

Run: /opt/cs-dev/venv/bin/python -m pytest tests/test_sge_harness.py -x -q
"""
from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from tests.harness.sge import SubmitError
from tests.harness.users import ensure_user



pytestmark = pytest.mark.sge

SHOW = "#!/bin/bash\necho \"CSE=${CONDA_STAGE_ENVS-unset}\"\necho \"ADDED=${PROLOG_ADDED-unset}\"\n"


@pytest.fixture(scope="module")
def alice():
    return ensure_user("csalice")


def test_jsv_moves_request_into_environment(sge, alice):
    jid = sge.submit(alice, SHOW, "-h", "-l", "conda_env=foo:bar,h_rt=300")
    assert sge.hard_resources(jid) == {"h_rt": "300"}       # conda_env is gone
    assert sge.job_env(jid)["CONDA_STAGE_ENVS"] == "foo:bar"
    sge.release(jid)
    res = sge.wait(jid, timeout=60)
    assert res.ok, res.records
    assert "CSE=foo:bar" in sge.output(jid)
    assert sge.queue_state() == ""


def test_jsv_shortcut_and_directive(sge, alice):
    jid = sge.submit(alice, "#!/bin/bash\n#$ -l conda=my_env-1.2+x:tools\n" + SHOW)
    assert sge.wait(jid, timeout=60).ok
    assert "CSE=my_env-1.2+x:tools" in sge.output(jid)


@pytest.mark.parametrize("value", [
    "../x", "a/b", "a:", ":a", "a::b", "-x", ".x", "a..b", "a#b", "a;b", "a'b", "a\tb",
    "\u00e4", "x" * 129,
])
def test_jsv_rejects_invalid_names(sge, alice, value):
    cp, _ = sge.qsub(alice, SHOW, "-l", f"conda_env={value}")
    assert cp.returncode == 1
    assert cp.stdout == ""
    assert cp.stderr.startswith("Unable to run job: conda_env: invalid conda environment name(s) \""), cp.stderr
    assert not sge.jobs()


def test_jsv_rejects_with_submit_error(sge, alice):
    with pytest.raises(SubmitError) as e:
        sge.submit(alice, SHOW, "-l", "conda_env=../x")
    assert e.value.returncode == 1
    assert 'invalid conda environment name(s) "../x"' in e.value.stderr
    with pytest.raises(SubmitError):   # a user-set variable is checked as well
        sge.submit(alice, SHOW, "-v", "CONDA_STAGE_ENVS=a/b")


def test_job_without_request_passes_unchanged(sge, alice):
    jid = sge.submit(alice, SHOW, "-h", "-l", "h_rt=300")
    assert sge.hard_resources(jid) == {"h_rt": "300"}
    assert "CONDA_STAGE_ENVS" not in sge.job_env(jid)
    sge.release(jid)
    assert sge.wait(jid, timeout=60).ok
    assert "CSE=unset" in sge.output(jid)
    assert sge.queue_state() == ""


def test_root_prolog_hands_variables_to_array_tasks(sge, alice):
    """JSV -> prolog -> job for every task; a root prolog appending NAME=value
    to $SGE_JOB_SPOOL_DIR/environment sets it for the job; TMPDIR (found by the
    root prolog without TMPDIR) is removed by execd, even with root-owned
    read-only contents."""
    sge.configure(prolog=sge.probe_hook("prolog"))
    sge.probe_control("prolog", append="PROLOG_ADDED=hello world\n",
                      sh="mkdir -p $HOOK_TMPDIR/ro/d && touch $HOOK_TMPDIR/ro/d/f && "
                         "chmod 444 $HOOK_TMPDIR/ro/d/f && chmod -R a-w $HOOK_TMPDIR/ro\n"
                         "echo CONFIG_TMPDIR=$(sed -n 's/^tmpdir=//p' $SGE_JOB_SPOOL_DIR/config)\n")
    jid = sge.submit(alice, SHOW + 'echo "TMPDIR=$TMPDIR"\n', "-t", "1-3", "-l", "conda_env=foo:bar")
    res = sge.wait(jid, timeout=60)
    assert res.ok and len(res.records) == 3, res.records
    for task in (1, 2, 3):
        out = sge.output(jid, task)
        assert "CSE=foo:bar" in out and "ADDED=hello world" in out, out
        log = sge.probe_log("prolog", jid, task)
        assert log["id"].startswith("uid=0(root)")
        assert log["append"].strip() == "ok"
        assert log["vars"]["CONDA_STAGE_ENVS"] == "foo:bar"
        assert log["vars"]["SGE_TASK_ID"] == str(task)
        assert "TMPDIR" not in log["vars"]                   # secure-exec strips it
        tmpdir = log["tmpdir"].splitlines()[0]
        assert tmpdir == f"/tmp/{jid}.{task}.all.q" == log["vars"]["TMP"]
        assert f"TMPDIR={tmpdir}" in out and f"CONFIG_TMPDIR={tmpdir}" in out
        assert log["tmpdir"].splitlines()[1] == f"{alice.name} {alice.name} 755"   # owner, mode
        assert not os.path.exists(tmpdir)
    assert sge.queue_state() == ""


def test_job_owner_prolog_cannot_write_environment(sge, alice):
    sge.configure(prolog=sge.probe_hook("uprolog", root=False))
    sge.probe_control("uprolog", append="PROLOG_ADDED=user\n")
    jid = sge.submit(alice, SHOW)
    assert sge.wait(jid, timeout=60).ok
    log = sge.probe_log("uprolog", jid)
    assert log["id"].startswith(f"uid={alice.uid}(")
    assert "Permission denied" in log["append"]
    assert "ADDED=unset" in sge.output(jid)


def test_prolog_exit_100_holds_only_the_job(sge, alice):
    sge.configure(prolog=sge.probe_hook("prolog"))
    sge.probe_control("prolog", exit=100)
    jid = sge.submit(alice, SHOW)
    assert sge.wait_state(jid, "Eqw", timeout=30) == "Eqw"
    assert "exit_status of prolog = 100" in sge.qstat_j(jid)
    assert sge.queue_state() == ""
    sge.delete(jid)
    sge.wait(jid, timeout=30)


def test_prolog_exit_1_puts_queue_in_error(sge, alice):
    sge.configure(prolog=sge.probe_hook("prolog"))
    sge.probe_control("prolog", exit=1)
    jid = sge.submit(alice, SHOW)
    sge.wait_until(lambda: sge.queue_state() == "E", 30, "queue error state")
    assert "exit_status of prolog = 1" in sge.qstat_j(jid)   # job re-queued
    sge.delete(jid)
    sge.clear_queue_error()
    assert sge.queue_state() == ""


def test_kill_job_shell(sge, alice):
    jid = sge.submit(alice, "#!/bin/bash\nsleep 300\n")
    pids = sge.job_pids(jid)
    shell = psutil.Process(pids["shell"])
    assert shell.name() == "bash" and shell.username() == "csalice"
    assert psutil.Process(pids["shepherd"]).name() == "sge_shepherd"
    deadline = time.monotonic() + 10
    while not [c for c in shell.children() if c.name() == "sleep"]:
        assert time.monotonic() < deadline, "job never started sleep"
        time.sleep(0.1)
    child = [c for c in shell.children() if c.name() == "sleep"][0]
    os.kill(pids["shell"], signal.SIGKILL)
    res = sge.wait(jid, timeout=60)
    assert res.exit_status == 137
    assert res.failed.startswith("100")       # "100 : assumedly after job"
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert sge.queue_state() == ""
