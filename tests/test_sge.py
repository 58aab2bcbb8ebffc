"""SGE integration on a real Son of Grid Engine 8.1.9: `#$ -l conda_env=NAME`
(through the shipped JSV) makes the shipped root prolog stage NAME into the
node store (a copy shared by the user's jobs), `conda activate NAME` lands
on the copy, the epilog lets go of it and -- kept 0 s here -- removes it.
A job-owner prolog (no root@) stages into the job's TMPDIR instead.  After
every case: nothing left, the queue not in error, the original environment
and tarball untouched."""
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.harness.envs import job_envs
from tests.harness.sge import SubmitError
from tests.harness import sitecfg
from tests.harness.sitecfg import site_defaults, store_listing as listing
from tests.harness.users import TEST_BASE

pytestmark = [pytest.mark.sge, pytest.mark.conda]

ROOT = Path(__file__).resolve().parent.parent
HOOK_LOG = TEST_BASE / "sge-hooks.log"
STAGING = TEST_BASE / "sge-jobs"
STATE = TEST_BASE / "sge-state"


def store_copy(name):
    return sitecfg.store_copy(STAGING, name)


@pytest.fixture(scope="module")
def site_envs(conda_site, conda_user, stage_bin):
    with job_envs(conda_site, conda_user, stage_bin, "sg") as envs:
        yield envs


@pytest.fixture(scope="module")
def hooks(sge_cluster):
    folder = TEST_BASE / "sge-hooks"
    folder.mkdir(exist_ok=True)
    paths = {}
    for rel in ("prolog/sge-prolog", "epilog/sge-epilog"):
        dst = folder / Path(rel).name
        dst.write_bytes((ROOT / rel).read_bytes())
        dst.chmod(0o755)
        paths[dst.name] = dst
    return paths


@pytest.fixture(scope="module")
def cluster(sge_cluster, hooks, site_envs, conda_site):
    HOOK_LOG.unlink(missing_ok=True)
    HOOK_LOG.touch()
    with site_defaults(log_file=HOOK_LOG, syslog="no", conda_root=conda_site.root_prefix,
                       staging_dir=STAGING, state_dir=STATE, keep_unused=0) as d:
        sge_cluster.defaults = d
        yield sge_cluster


@pytest.fixture
def sge_job(cluster, sge, hooks, conda_user, conda_site, site_envs):
    before = {k: e.snapshot() for k, e in site_envs.items() if k != "plain"}
    cluster.configure(prolog=f"root@{hooks['sge-prolog']}", epilog=f"root@{hooks['sge-epilog']}")

    def submit(body, *args):
        script = f"#!/bin/bash\n#$ -S /bin/bash\n. {conda_site.init_file}\n{body}\n"
        return cluster.submit(conda_user, script, *args)

    yield submit
    assert cluster.queue_state() == "", "queue instance in error state"
    for k, snap in before.items():
        assert site_envs[k].snapshot() == snap, f"original environment {k} changed"
    leftovers = [p for p in Path("/tmp").glob("*.all.q") if (p / "conda-stage").exists()]
    assert leftovers == []
    assert listing(STAGING) == [] and listing(STATE) == [], (listing(STAGING), listing(STATE))


def values(text):
    return dict(line.split("=", 1) for line in text.splitlines() if re.match(r"^\w+=", line))


PROBE = """
echo "tmpdir=$TMPDIR"
conda activate {name}
echo "prefix=$CONDA_PREFIX"
echo "python=$(command -v python)"
echo "sys_prefix=$(python -c 'import sys; print(sys.prefix)')"
prefix-probe | sed 's/:/=/'
p=$CONDA_PREFIX
conda deactivate
test -d "$p" && echo "kept_after_deactivate=yes"
"""


def removed(jid):
    return re.search(rf"sge job {jid}(\.\d+)? \(csalice\): removed {STAGING}/{jid}\b",
                     HOOK_LOG.read_text())


def test_declared_env_is_staged_into_the_node_store(sge_job, cluster, site_envs):
    env = site_envs["jup"]
    jid = sge_job(PROBE.format(name=env.name), "-l", f"conda_env={env.name}")
    res = cluster.wait(jid)
    out = cluster.output(jid)
    v = values(out)
    staged = v["prefix"]
    assert re.fullmatch(store_copy(env.name), staged), out
    assert v["python"] == f"{staged}/bin/python"
    assert v["sys_prefix"] == staged and v["exe"] == staged and v["lib"] == f"{staged}/lib"
    assert v["kept_after_deactivate"] == "yes"
    # The prolog's messages are in the job's output, as the walkthrough's INFO lines.
    assert f"INFO: Staging current Conda environment ({env.prefix}) to local disk ..." in out
    assert "INFO: Total extract time:" in out
    assert f"conda-stage: staged {env.name} to {staged} in " in out
    assert res.exit_status == 0
    assert removed(jid)


def test_two_envs(sge_job, cluster, site_envs):
    a, b = site_envs["jup"], site_envs["tools"]
    body = PROBE.format(name=a.name) + PROBE.format(name=b.name).replace("prefix=", "prefix2=")
    jid = sge_job(body, "-l", f"conda_env={a.name}:{b.name}")
    cluster.wait(jid)
    v = values(cluster.output(jid))
    assert re.fullmatch(store_copy(a.name), v["prefix"])
    assert re.fullmatch(store_copy(b.name), v["prefix2"])


def test_array_job_tasks_land_on_the_node_store(sge_job, cluster, site_envs):
    env = site_envs["jup"]
    mark = HOOK_LOG.stat().st_size
    jid = sge_job(PROBE.format(name=env.name) + "sleep 3", "-l", f"conda_env={env.name}",
                  "-t", "1-3")
    cluster.wait(jid, timeout=180)
    prefixes = {values(cluster.output(jid, task=t))["prefix"] for t in (1, 2, 3)}
    assert all(re.fullmatch(store_copy(env.name), p) for p in prefixes), prefixes
    log = HOOK_LOG.read_text()[mark:]
    for t in (1, 2, 3):  # each task holds and lets go under its own name
        assert re.search(rf"sge job {jid}\.{t} \(csalice\): staged ", log), log
        assert re.search(rf"sge job {jid}\.{t} \(csalice\): released ", log), log


def test_two_concurrent_jobs_share_one_copy(sge_job, cluster, site_envs):
    env = site_envs["jup"]
    jids = [sge_job(PROBE.format(name=env.name) + "sleep 4", "-l", f"conda_env={env.name}")
            for _ in range(2)]
    prefixes = set()
    for jid in jids:
        cluster.wait(jid)
        prefixes.add(values(cluster.output(jid))["prefix"])
    assert len(prefixes) == 1 and re.fullmatch(store_copy(env.name), prefixes.pop())


RUN_FROM_COPY = """
conda activate {name}
python -c 'import time; time.sleep(600)' &
echo ready
sleep 600
"""


def _wait_ready(cluster, jid, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if "ready" in cluster.output(jid):
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"job {jid} never got ready")


@pytest.mark.parametrize("how", ["qdel", "h_rt", "sigkill"])
def test_job_ended_early_leaves_nothing(how, sge_job, cluster, site_envs):
    env = site_envs["jup"]
    args = ["-l", f"conda_env={env.name}"] + (["-l", "h_rt=8"] if how == "h_rt" else [])
    jid = sge_job(RUN_FROM_COPY.format(name=env.name), *args)
    _wait_ready(cluster, jid)
    assert len(list((STAGING / "users").glob(f"*/*/{env.name}/bin"))) == 1
    if how == "qdel":
        cluster.delete(jid)
    elif how == "sigkill":
        os.kill(cluster.job_pids(jid)["shell"], signal.SIGKILL)
    res = cluster.wait(jid, timeout=120)
    assert res.exit_status == 137, res
    assert removed(jid)


@pytest.mark.parametrize("kind", ["unknown", "not-enabled"])
def test_user_mistakes_run_the_job_unstaged_with_a_message(kind, sge_job, cluster, site_envs):
    name = {"unknown": "no-such-env", "not-enabled": site_envs["plain"].name}[kind]
    jid = sge_job('echo "envs_path=${CONDA_ENVS_PATH:-unset}"', "-l", f"conda_env={name}")
    res = cluster.wait(jid)
    out = cluster.output(jid)
    assert res.exit_status == 0, out
    assert values(out)["envs_path"] == "unset"
    expected = {
        "unknown": "conda-stage: not staging no-such-env: Conda environment 'no-such-env' not found",
        "not-enabled": f"conda-stage: not staging {name}: {site_envs['plain'].prefix} is not "
                       f"enabled for auto-staging",
    }[kind]
    assert expected in out


def test_invalid_name_is_rejected_at_submission(sge_job):
    with pytest.raises(SubmitError) as err:
        sge_job("echo never", "-l", "conda_env=../etc")
    assert "invalid conda environment name(s) \"../etc\"" in err.value.stderr


def test_job_without_env_runs_without_python(sge_job, cluster):
    mark = HOOK_LOG.stat().st_size
    jid = sge_job('echo "envs_path=${CONDA_ENVS_PATH:-unset}"')
    assert cluster.wait(jid).exit_status == 0
    assert values(cluster.output(jid))["envs_path"] == "unset"
    assert f"job {jid}" not in HOOK_LOG.read_text()[mark:]


def test_on_error_hold_puts_the_job_in_error_state_not_the_queue(sge_job, cluster):
    cluster.defaults.update(on_error="hold")
    try:
        jid = sge_job("echo ran", "-l", "conda_env=no-such-env")
        cluster.wait_state(jid, "Eqw", timeout=60)
        assert cluster.queue_state() == ""
        cluster.delete(jid)
        cluster.wait(jid)
    finally:
        cluster.defaults.update(on_error="continue")


def test_job_owner_prolog_without_root(sge_job, cluster, hooks, site_envs):
    """Without root@ the prolog cannot set the job's variables; the
    auto-stage hook of the original environment finds the prolog's copy
    instead of extracting again."""
    env = site_envs["jup"]
    cluster.configure(prolog=str(hooks["sge-prolog"]), epilog=str(hooks["sge-epilog"]))
    jid = sge_job(PROBE.format(name=env.name), "-l", f"conda_env={env.name}")
    cluster.wait(jid)
    out = cluster.output(jid)
    v = values(out)
    assert v["prefix"] == f"{v['tmpdir']}/conda-stage/envs/{env.name}", out
    assert "INFO: Using the copy staged for this job:" in out
    assert out.count("INFO: Total extract time:") == 1


def test_without_the_jsv_the_prolog_reads_the_request_with_qstat(sge_job, cluster, site_envs):
    """The documented fallback: the complex attached to the queue with a
    fixed value, no JSV, CONDA_STAGE_SGE_READ_QSTAT=yes."""
    env = site_envs["jup"]
    cluster.configure(jsv=None)
    cluster.qconf("-mattr", "queue", "complex_values", f"conda_env={env.name}", "all.q")
    cluster.defaults.update(sge_read_qstat="yes")
    try:
        jid = sge_job(PROBE.format(name=env.name), "-l", f"conda_env={env.name}")
        cluster.wait(jid)
        v = values(cluster.output(jid))
        assert re.fullmatch(store_copy(env.name), v["prefix"])
    finally:
        cluster.defaults.update(sge_read_qstat="no")
        cluster.qconf("-rattr", "queue", "complex_values", "NONE", "all.q")


def test_array_job_extracts_once_and_gc_collects_the_kept_copy(sge_job, cluster, site_envs):
    """With the product's keep time, the tasks of an array job share one
    extraction; after the job the copy is kept, held by nobody, and the
    admin's gc removes it."""
    import json
    import subprocess
    import sys

    env = site_envs["jup"]
    cluster.defaults.update(keep_unused=300)
    stage = str(Path(sys.prefix) / "bin" / "conda-stage")
    try:
        mark = HOOK_LOG.stat().st_size
        jid = sge_job(PROBE.format(name=env.name), "-l", f"conda_env={env.name}", "-t", "1-6")
        cluster.wait(jid, timeout=300)
        prefixes = {values(cluster.output(jid, task=t))["sys_prefix"] for t in range(1, 7)}
        assert len(prefixes) == 1, prefixes
        log = HOOK_LOG.read_text()[mark:]
        assert len(re.findall(rf"staged {env.prefix} -> .* \(extracted\)", log)) == 1, log
        assert len(re.findall(rf"staged {env.prefix} -> .* \(shared copy\)", log)) == 5, log
        status = json.loads(subprocess.run([stage, "status", "--node", "--json"], check=True,
                                           capture_output=True, text=True).stdout)
        assert [(c["path"], c["jobs"]) for c in status["copies"]] == [(prefixes.pop(), [])]
    finally:
        cluster.defaults.update(keep_unused=0)
        r = subprocess.run([stage, "gc", "--jobs", "--all-unused"], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
