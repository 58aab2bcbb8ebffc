"""Slurm integration on a real single-node Slurm 22.05: the shipped Prolog,
TaskProlog and Epilog pre-stage declared environments, `conda activate NAME`
lands on the node-local copy, and everything is gone after the job -- also
after scancel, a time-out or a SIGKILL.  After every case: nothing staged is
left, the node is not drained, the original environment and its tarball are
untouched.  Copies are shared by the user's jobs (the product's default);
this module keeps them for 0 s after their last job, so that every job's
end is checked for leftovers (test_store_slurm.py covers keeping them)."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.harness.envs import enable_env, job_envs, remove_env
from tests.harness import sitecfg
from tests.harness.sitecfg import slurm_hooks, store_listing
from tests.harness.users import TEST_BASE

pytestmark = [pytest.mark.slurm, pytest.mark.conda]

STAGING = TEST_BASE / "slurm-jobs"
STATE = TEST_BASE / "slurm-state"
HOOK_LOG = TEST_BASE / "slurm-hooks.log"


@pytest.fixture(scope="module")
def site_envs(conda_site, conda_user, stage_bin):
    with job_envs(conda_site, conda_user, stage_bin, "sl") as envs:
        yield envs


@pytest.fixture(scope="module")
def cluster(slurm_cluster, site_envs, conda_site):
    HOOK_LOG.unlink(missing_ok=True)
    with slurm_hooks(slurm_cluster, staging_dir=STAGING, state_dir=STATE, log_file=HOOK_LOG,
                     syslog="no", conda_root=conda_site.root_prefix, keep_unused=0):
        yield slurm_cluster


@pytest.fixture
def slurm_job(cluster, conda_user, conda_site, site_envs):
    """Submit a job as the test user; after the test, check nothing was left
    and nothing was harmed."""
    before = {k: e.snapshot() for k, e in site_envs.items() if k != "plain"}
    cluster.ensure_clean()
    init = conda_site.init_file

    def submit(body, *args):
        script = f"#!/bin/bash\n. {init}\n{body}\n"
        return cluster.submit(conda_user, script, *args)

    yield submit
    assert_nothing_left()
    assert "drain" not in cluster.node_state(), cluster.node_reason()
    cluster.wait_idle(timeout=30)
    for k, snap in before.items():
        assert site_envs[k].snapshot() == snap, f"original environment {k} changed"


def assert_nothing_left():
    assert store_listing(STAGING) == [], f"staged files left behind: {store_listing(STAGING)}"
    assert store_listing(STATE) == [], f"state left behind: {store_listing(STATE)}"


def store_copy(name):
    return sitecfg.store_copy(STAGING, name)


def values(text):
    return dict(line.split("=", 1) for line in text.splitlines() if re.match(r"^\w+=", line))


PROBE = """
conda activate {name}
echo "prefix=$CONDA_PREFIX"
echo "python=$(command -v python)"
echo "sys_prefix=$(python -c 'import sys; print(sys.prefix)')"
prefix-probe | sed 's/:/=/'
echo "probe_home=$PREFIX_PROBE_HOME"
p=$CONDA_PREFIX
conda deactivate
test -d "$p" && echo "kept_after_deactivate=yes"
"""


def test_declared_env_is_staged_and_activated_by_name(slurm_job, cluster, site_envs):
    env = site_envs["jup"]
    jid = slurm_job(PROBE.format(name=env.name), f"--comment=conda_env={env.name}")
    info = cluster.wait(jid)
    out = cluster.output(jid)
    assert info["JobState"] == "COMPLETED", out
    v = values(out)
    staged = v["prefix"]
    assert re.fullmatch(store_copy(env.name), staged), out
    assert v["python"] == f"{staged}/bin/python"
    assert v["sys_prefix"] == staged
    assert v["exe"] == staged and v["lib"] == f"{staged}/lib"
    assert v["probe_home"] == f"{staged}/share/prefix-probe"
    assert v["kept_after_deactivate"] == "yes"  # the epilog owns prolog-staged copies
    assert f"conda-stage: staged {env.name} to {staged} in " in out
    log = HOOK_LOG.read_text()
    assert re.search(rf"slurm job {jid} \(csalice\): staged {env.prefix} -> {staged} in "
                     rf"[0-9.]+ s \(extracted\)", log)
    assert re.search(rf"slurm job {jid} \(csalice\): released {staged} \(no job uses it now\)",
                     log)
    assert re.search(rf"slurm job {jid} \(csalice\): removed the unused copy {staged} ", log)
    assert re.search(rf"slurm job {jid} \(csalice\): removed {STAGING}/{jid}", log)


def test_two_envs_in_one_job(slurm_job, cluster, site_envs):
    a, b = site_envs["jup"], site_envs["tools"]
    body = PROBE.format(name=a.name) + PROBE.format(name=b.name).replace("prefix=", "prefix2=")
    jid = slurm_job(body, f"--comment=conda_env={a.name}:{b.name} other-tool=x")
    assert cluster.wait(jid)["JobState"] == "COMPLETED"
    v = values(cluster.output(jid))
    assert re.fullmatch(store_copy(a.name), v["prefix"])
    assert re.fullmatch(store_copy(b.name), v["prefix2"])


def test_two_concurrent_jobs_on_the_same_env_share_one_copy(slurm_job, cluster, site_envs):
    env = site_envs["jup"]
    body = PROBE.format(name=env.name) + "sleep 4\n"
    jids = [slurm_job(body, f"--comment=conda_env={env.name}") for _ in range(2)]
    prefixes = set()
    for jid in jids:
        assert cluster.wait(jid)["JobState"] == "COMPLETED"
        prefixes.add(values(cluster.output(jid))["prefix"])
    assert len(prefixes) == 1 and re.fullmatch(store_copy(env.name), prefixes.pop())


def test_array_job_tasks_all_land_on_a_staged_copy(slurm_job, cluster, site_envs):
    env = site_envs["jup"]
    jid = slurm_job(PROBE.format(name=env.name), f"--comment=conda_env={env.name}",
                    "--array=1-3", "-o", f"{cluster.user_workdir('csalice')}/array-%A_%a.out")
    cluster.wait(jid, timeout=180)
    prefixes = set()
    for task in (1, 2, 3):
        out = (cluster.user_workdir("csalice") / f"array-{jid}_{task}.out").read_text()
        prefix = values(out)["prefix"]
        assert re.fullmatch(store_copy(env.name), prefix), out
        prefixes.add(prefix)
    assert prefixes


def _wait_for_output(cluster, jid, text, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if text in cluster.output(jid, timeout=0):
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise AssertionError(f"job {jid} never printed {text!r}")


RUN_FROM_COPY = """
conda activate {name}
python -c 'import time; time.sleep(600)' &
echo ready
sleep 600
"""


def test_scancel_while_running(slurm_job, cluster, site_envs):
    env = site_envs["jup"]
    jid = slurm_job(RUN_FROM_COPY.format(name=env.name), f"--comment=conda_env={env.name}")
    _wait_for_output(cluster, jid, "ready")
    copies = list((STAGING / "users").glob(f"*/*/{env.name}/bin"))
    assert len(copies) == 1
    cluster.cancel(jid)
    assert cluster.wait(jid)["JobState"] == "CANCELLED"


def test_job_killing_itself_with_sigkill_leaves_nothing(slurm_job, cluster, site_envs):
    env = site_envs["jup"]
    # A process that escapes the job (double fork + setsid) keeps running from the copy.
    body = f"""
conda activate {env.name}
( setsid python -c 'import time; time.sleep(600)' > /dev/null 2>&1 & )
sleep 1
echo "escaped=$(pgrep -u $(id -u) -f 'time.sleep\\(600\\)' | head -1)"
kill -9 $$
"""
    jid = slurm_job(body, f"--comment=conda_env={env.name}")
    info = cluster.wait(jid)
    assert info["JobState"] in ("FAILED", "CANCELLED"), info
    escaped = int(values(cluster.output(jid))["escaped"])
    assert not psutil.pid_exists(escaped) or psutil.Process(escaped).status() == "zombie"


def test_job_exceeding_its_time_limit(slurm_job, cluster, site_envs):
    env = site_envs["jup"]
    jid = slurm_job(RUN_FROM_COPY.format(name=env.name), f"--comment=conda_env={env.name}",
                    "--time=1")
    assert cluster.wait(jid, timeout=240)["JobState"] == "TIMEOUT"


@pytest.mark.parametrize("kind", ["unknown", "not-enabled", "invalid"])
def test_user_mistakes_run_the_job_unstaged_with_a_message(kind, slurm_job, cluster, site_envs):
    name = {"unknown": "no-such-env", "not-enabled": site_envs["plain"].name,
            "invalid": "../etc"}[kind]
    jid = slurm_job('echo "envs_path=${CONDA_ENVS_PATH:-unset}"', f"--comment=conda_env={name}")
    info = cluster.wait(jid)
    out = cluster.output(jid)
    assert info["JobState"] == "COMPLETED", out
    assert values(out)["envs_path"] == "unset"
    expected = {
        "unknown": "conda-stage: not staging no-such-env: Conda environment 'no-such-env' not found",
        "not-enabled": f"conda-stage: not staging {name}: {site_envs['plain'].prefix} is not "
                       f"enabled for auto-staging (enable it once with: conda stage "
                       f"--auto-stage=enable {name})",
        "invalid": "conda-stage: ignoring part of the request: invalid environment name '../etc'",
    }[kind]
    assert expected in out


def test_job_declaring_nothing_costs_one_shell_start(slurm_job, cluster):
    mark = HOOK_LOG.stat().st_size if HOOK_LOG.exists() else 0
    jid = slurm_job('echo "envs_path=${CONDA_ENVS_PATH:-unset}"')
    assert cluster.wait(jid)["JobState"] == "COMPLETED"
    assert values(cluster.output(jid))["envs_path"] == "unset"
    new_log = HOOK_LOG.read_text()[mark:] if HOOK_LOG.exists() else ""
    assert f"job {jid} " not in new_log  # Python never started for this job


def test_activation_touches_nothing_in_the_original_prefix(slurm_job, cluster, site_envs,
                                                           conda_site):
    env = site_envs["jup"]
    body = f"""
strace -f -qq -e trace=%file,%process -o "$TMPDIR/trace.$SLURM_JOB_ID" \\
    bash -c '. {conda_site.init_file}; conda activate {env.name}; python -c "import json, sqlite3"; prefix-probe'
echo "strace_rc=$?"
echo "lines=$(wc -l < "$TMPDIR/trace.$SLURM_JOB_ID")"
echo "into_copy=$(grep -c "${{CONDA_ENVS_PATH%%:*}}" "$TMPDIR/trace.$SLURM_JOB_ID")"
echo "into_original=$(grep -c "{env.prefix}" "$TMPDIR/trace.$SLURM_JOB_ID")"
grep "{env.prefix}" "$TMPDIR/trace.$SLURM_JOB_ID" | head -5
rm -f "$TMPDIR/trace.$SLURM_JOB_ID"
"""
    jid = slurm_job(body, f"--comment=conda_env={env.name}")
    assert cluster.wait(jid)["JobState"] == "COMPLETED"
    out = cluster.output(jid)
    v = values(out)
    assert v["strace_rc"] == "0", out
    assert int(v["into_copy"]) > 100, out
    assert v["into_original"] == "0", out


def test_on_error_hold_holds_the_job_without_draining(slurm_job, cluster):
    cluster.defaults.update(on_error="hold")
    try:
        jid = slurm_job("echo ran", "--comment=conda_env=no-such-env")
        cluster.wait_for(lambda: "held" in cluster.job_info(jid).get("Reason", "").lower()
                         or cluster.job_info(jid).get("Reason") == "JobHeldAdmin",
                         timeout=60, what="job held")
        assert "drain" not in cluster.node_state(), cluster.node_reason()
        cluster.cancel(jid)
        cluster.wait(jid)
    finally:
        cluster.defaults.update(on_error="continue")


def test_stale_tarball_is_reported_never_rebuilt_by_the_prolog(slurm_job, cluster, conda_site,
                                                                conda_user, stage_bin):
    env = enable_env(conda_site, conda_user, stage_bin, "sl-stale", packages=("prefix-probe",))
    try:
        conda_site.install(conda_user, env.prefix, "cs-extra")  # the tarball is now stale
        before = env.snapshot()
        jid = slurm_job('echo "envs_path=${CONDA_ENVS_PATH:-unset}"',
                        f"--comment=conda_env={env.name}")
        assert cluster.wait(jid)["JobState"] == "COMPLETED"
        out = cluster.output(jid)
        assert values(out)["envs_path"] == "unset"
        assert (f"conda-stage: not staging {env.name}: its tarball must be rebuilt first, because "
                f"the environment changed since it was packed (run 'conda stage --pack "
                f"{env.prefix}'") in out
        assert env.snapshot() == before
    finally:
        remove_env(conda_site, conda_user, env)


def test_hostile_tarball_is_refused_by_the_root_prolog(slurm_job, cluster, conda_site, conda_user,
                                                       stage_bin, tmp_path):
    """A user crafts a tarball (and a matching sidecar) with members escaping
    the job folder: the prolog refuses it, nothing is written outside, the
    job runs unstaged and the node stays up."""
    import io
    import json
    import tarfile

    import zstandard

    env = enable_env(conda_site, conda_user, stage_bin, "sl-hostile", packages=("prefix-probe",))
    target = STAGING / "planted"
    try:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, kind in (("conda-meta/history", "file"), ("lib", "dir"),
                               ("lib/escape", "sym"), ("lib/escape/planted", "file")):
                ti = tarfile.TarInfo(name)
                if kind == "file":
                    ti.size = 6
                    tar.addfile(ti, io.BytesIO(b"owned\n"))
                elif kind == "dir":
                    ti.type = tarfile.DIRTYPE
                    tar.addfile(ti)
                else:
                    ti.type, ti.linkname = tarfile.SYMTYPE, "../../.."
                    tar.addfile(ti)
        env.tarball.write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
        sidecar = env.prefix.parent / f"{env.name}.conda-stage.json"
        meta = json.loads(sidecar.read_text())
        st = os.stat(env.tarball)
        meta.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        sidecar.write_text(json.dumps(meta))
        os.chown(env.tarball, conda_user.uid, conda_user.gid)
        os.chown(sidecar, conda_user.uid, conda_user.gid)
        jid = slurm_job('echo "envs_path=${CONDA_ENVS_PATH:-unset}"',
                        f"--comment=conda_env={env.name}")
        assert cluster.wait(jid)["JobState"] == "COMPLETED"
        out = cluster.output(jid)
        assert values(out)["envs_path"] == "unset"
        assert (f"conda-stage: not staging {env.name}: Refusing symlink 'lib/escape' -> "
                f"'../../..': it points outside the environment") in out
        assert not target.exists()
    finally:
        remove_env(conda_site, conda_user, env)


def test_gc_jobs_removes_folders_of_jobs_slurm_no_longer_runs(slurm_job, cluster, site_envs):
    env = site_envs["jup"]
    jid = slurm_job(RUN_FROM_COPY.format(name=env.name), f"--comment=conda_env={env.name}")
    _wait_for_output(cluster, jid, "ready")
    # What a crash that skipped the epilog leaves behind, for a job long gone:
    orphan = STAGING / "7"
    (orphan / "envs" / "x" / "bin").mkdir(parents=True)
    for p in (orphan / "envs" / "x" / "bin", orphan / "envs" / "x", orphan / "envs"):
        p.chmod(0o555)
    (STATE / "7.json").write_text("{}")
    r = subprocess.run([str(Path(sys.prefix) / "bin" / "conda-stage"), "gc", "--jobs"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, **cluster.env})
    assert r.returncode == 0, r.stderr
    assert f"INFO: Removed {orphan} (job 7 is not running)" in r.stderr
    assert not orphan.exists() and not (STATE / "7.json").exists()
    assert list((STAGING / "users").glob(f"*/*/{env.name}/bin"))  # running: kept
    cluster.cancel(jid)
    cluster.wait(jid)


def test_epilog_collects_a_copy_the_job_staged_itself(slurm_job, cluster, site_envs):
    """A job that did not declare the environment but activated it (so the
    activate hook staged it into /tmp) and ended without 'conda deactivate':
    the epilog removes that copy too."""
    env = site_envs["jup"]
    jid = slurm_job(f'conda activate {env.name}\necho "prefix=$CONDA_PREFIX"')
    assert cluster.wait(jid)["JobState"] == "COMPLETED"
    out = cluster.output(jid)
    copy = values(out)["prefix"]
    assert re.fullmatch(rf"/tmp/conda-stage-[a-z0-9_]+/{env.name}", copy), out
    assert not os.path.exists(copy) and not os.path.exists(os.path.dirname(copy))
    assert re.search(rf"slurm job {jid} \(csalice\): removed {re.escape(copy)}, staged by a "
                     rf"shell that has exited", HOOK_LOG.read_text())
