"""The README's demo command, run as a newcomer runs it: examples/demo/run.sh
replays the walkthrough as an unprivileged user, including a batch job
(conda_env=myjupyter) on the suite's single-node Slurm with conda-stage's
Prolog/TaskProlog/Epilog.  Checks what it printed, and that it tidied up:
Slurm stopped, /etc/default/conda-stage as before, nothing staged left.
About 15 s warm (its own Slurm under TEST_BASE/demo-slurm, next to the
session's cluster if that is up)."""
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.harness.sitecfg import DEFAULTS
from tests.harness.slurm import SlurmCluster
from tests.harness.users import TEST_BASE

pytestmark = [pytest.mark.slurm, pytest.mark.conda]

ROOT = Path(__file__).resolve().parent.parent
DEMO_SLURM = TEST_BASE / "demo-slurm"
DEMO_USER = "csdemo"


def _site_file():
    return DEFAULTS.read_bytes() if DEFAULTS.exists() else None


def test_demo_runs_the_walkthrough_and_its_slurm_job():
    if os.geteuid() != 0:
        pytest.skip("the demo runs as root")
    site_before = _site_file()
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": "/root", "LANG": "C.UTF-8",
           "CONDA_STAGE_TEST_BASE": str(TEST_BASE)}
    p = subprocess.run([str(ROOT / "examples" / "demo" / "run.sh")], env=env, cwd="/",
                       capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    out = p.stdout
    assert p.returncode == 0, f"{out[-6000:]}\nstderr:\n{p.stderr[-3000:]}"
    assert "DEMO FAILED" not in out + p.stderr
    assert re.search(r"^Walkthrough complete: \d+ checks passed\.$", out, re.M), out[-3000:]
    assert "==> Demo complete in " in out

    # The job: staged by the Prolog (the TaskProlog's line heads its output), ran on the copy.
    staged = re.search(r"^conda-stage: staged myjupyter to (/\S+) in [0-9.]+ s;", out, re.M)
    assert staged, out[-6000:]
    copy = staged.group(1)
    assert re.search(rf"^CONDA_PREFIX: +{re.escape(copy)}$", out, re.M)
    assert re.search(rf"^command -v python: +{re.escape(copy)}/bin/python$", out, re.M)
    jid = re.search(r"^Submitted batch job (\d+)$", out, re.M).group(1)
    assert f"ok: job {jid} completed (ExitCode=0:0)" in out
    assert re.search(rf"job {jid}: .*left the queue [0-9.]+ s after sbatch", out)
    assert f"ok: nothing of job {jid} left on the node" in out
    assert re.search(rf"slurm job {jid} \({DEMO_USER}\): removed \S+/{jid} in ", out)

    # Tidy: nothing staged left, Slurm stopped, the site file and the environment as before.
    assert not os.path.lexists(copy)
    staging = DEMO_SLURM / "jobs"
    assert not (staging / jid).exists()
    assert [e for e in (staging.iterdir() if staging.exists() else []) if e.name.isdigit()] == []
    assert not any(SlurmCluster(DEMO_SLURM).daemon_pids().values())
    assert _site_file() == site_before
    home = Path(os.path.expanduser(f"~{DEMO_USER}"))
    assert not (home / ".conda" / "envs" / "myjupyter.tar.zst").exists()  # auto-staging disabled
    assert not [d for d in Path("/tmp").glob("conda-stage-*") if d.owner() == DEMO_USER]
