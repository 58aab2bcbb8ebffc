"""Benchmark of the node store (issue: one owner of node-local state).

Side by side, in one run, alternating, on the benchmark's jupyter
environment (~17,750 files, ~277 MB; built by ``benchenv.py``) on local disk:

* **array tasks 2..N**: the root prolog's work for one job -- exactly
  ``conda_stage.jobstage.prolog`` and ``epilog``, as the Slurm hooks call
  them, without the bash wrapper -- for a task that finds its user's shared
  copy, against a task that extracts (sharing off: every task; sharing on:
  task 1 only).  Reference: the extraction itself is the floor of an
  unshared task.
* **interactive**: ``conda-stage --stage --owner-pid PID`` when another
  shell of the user holds a live copy of the same tarball, against the
  same call extracting, and the full ``conda activate``/``conda deactivate``
  cycle in both cases (real conda).

Run as root: ``/opt/conda-stage/bin/python benchmarks/store.py [--reps N]``.
Prints a markdown table; ``--out FILE`` also writes the samples as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import benchenv  # noqa: E402
from conda_stage.config import Config  # noqa: E402
from conda_stage.job import Job  # noqa: E402
from conda_stage.jobdir import JobDir  # noqa: E402
from conda_stage import jobstage  # noqa: E402
from conda_stage.privileges import Account  # noqa: E402
from conda_stage.request import parse_value  # noqa: E402


class _Log:
    lines: list = []

    def info(self, msg):
        self.lines.append(msg)

    warning = error = info


def _job(config, account, job_id, env: Path):
    folder = JobDir(config.staging_dir, config.state_dir, str(job_id))
    return Job(scheduler="slurm", job_id=str(job_id), task_id=None, account=account,
               request=parse_value(env.name), workdir=folder.path, folder=folder,
               environ={"CONDA_ENVS_PATH": str(env.parent)})


def prolog_seconds(config, account, job_id, name) -> tuple[float, dict]:
    job = _job(config, account, job_id, name)
    t0 = time.perf_counter()
    manifest = jobstage.prolog(job, config, _Log())
    took = time.perf_counter() - t0
    item = manifest["results"][0]
    assert item["status"] == "staged", item
    return took, item


def epilog(config, account, job_id, name) -> None:
    jobstage.epilog(_job(config, account, job_id, name), config, _Log())


def array_rows(base: Path, account, name, reps: int) -> dict:
    """Per-task prolog time: shared (tasks 2..N find the copy) vs extracting."""
    samples = {"shared_task": [], "extracting_task": [], "first_task": []}
    job_id = 900000
    for _ in range(reps):
        for share in (True, False):
            config = Config(staging_dir=str(base / "jobs"), state_dir=str(base / "state"),
                            share_copies=share, keep_unused=300.0, syslog=False,
                            conda_root="")
            ids = []
            for task in range(3):  # tasks 1..3 of an array, one after the other
                job_id += 1
                ids.append(job_id)
                took, item = prolog_seconds(config, account, job_id, name)
                if not share:
                    samples["extracting_task"].append(took)
                elif task == 0:
                    assert not item.get("reused"), item
                    samples["first_task"].append(took)
                else:
                    assert item.get("reused"), item
                    samples["shared_task"].append(took)
            for jid in ids:
                epilog(config, account, jid, name)
            if share:
                config.keep_unused = 0.0
                jobstage.sweep_node(jobstage.NodeStore.from_config(config), _Log(), "bench",
                                    wait=True)
    return samples


def interactive_rows(site, user, stage_bin: Path, env: Path, reps: int) -> dict:
    samples = {"stage_join": [], "stage_extract": [], "cycle_join": [], "cycle_extract": []}
    tmp = Path(tempfile.mkdtemp(prefix="cs-bench-store-", dir="/var/tmp"))
    os.chown(tmp, user.uid, user.gid)
    path = f'export PATH="{stage_bin}:$PATH"; export TMPDIR={tmp}\n'

    def timed(script: str) -> float:
        r = site.shell(user, path + script, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        t0, t1 = map(float, r.stdout.strip().splitlines()[-1].split())
        return t1 - t0

    now = "$(date +%s.%N)"
    for _ in range(reps):
        # no live copy: extract, then let go (removed)
        samples["stage_extract"].append(timed(f"""sleep 600 & h=$!
t0={now}; p=$(conda-stage -q --stage --owner-pid $h {env}); t1={now}
conda-stage -q --unstage --owner-pid $h "$p"; kill $h
echo "$t0 $t1"
"""))
        # a live copy held by another shell: join it
        samples["stage_join"].append(timed(f"""sleep 600 & a=$!; sleep 600 & b=$!
p=$(conda-stage -q --stage --owner-pid $a {env})
t0={now}; conda-stage -q --stage --owner-pid $b {env} > /dev/null; t1={now}
conda-stage -q --unstage --owner-pid $b "$p"; conda-stage -q --unstage --owner-pid $a "$p"
kill $a $b; echo "$t0 $t1"
"""))
        samples["cycle_extract"].append(timed(f"""t0={now}
conda activate {env} 2> /dev/null; conda deactivate 2> /dev/null; t1={now}
echo "$t0 $t1"
"""))
        samples["cycle_join"].append(timed(f"""sleep 600 & a=$!
p=$(conda-stage -q --stage --owner-pid $a {env})
t0={now}; conda activate {env} 2> /dev/null; conda deactivate 2> /dev/null; t1={now}
conda-stage -q --unstage --owner-pid $a "$p"; kill $a
echo "$t0 $t1"
"""))
    shutil.rmtree(tmp, ignore_errors=True)
    return samples


def bench_args(doc: str, argv=None):
    """``--reps N --out FILE``, as root; then the benchmark's environments."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("run as root")
    return (args, *benchenv.setup())


def main(argv=None) -> int:
    args, lay, site, user = bench_args(__doc__, argv)
    env = lay.native_env
    stage_bin = Path(tempfile.mkdtemp(prefix="cs-bench-bin-", dir="/var/tmp"))
    os.chmod(stage_bin, 0o755)
    (stage_bin / "conda-stage").symlink_to(Path(sys.prefix) / "bin" / "conda-stage")
    r = site.shell(user, f'export PATH="{stage_bin}:$PATH"\n'
                         f"conda-stage -q --auto-stage=enable {env}", timeout=900)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    base = Path(tempfile.mkdtemp(prefix="cs-bench-node-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    account = Account.lookup(user=user.name)
    try:
        samples = array_rows(base, account, env, args.reps)
        samples.update(interactive_rows(site, user, stage_bin, env, args.reps))
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)
        # The environment is the other benchmarks' native reference: no hooks stay.
        site.shell(user, f'export PATH="{stage_bin}:$PATH"\n'
                         f"conda-stage -q --auto-stage=disable {env}", timeout=300)
        shutil.rmtree(stage_bin, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    rows = [
        ("array task 2..N: prolog", "shared copy found", med["shared_task"],
         "sharing off: every task extracts", med["extracting_task"]),
        ("array task 1: prolog (sharing on)", "extracts", med["first_task"],
         "sharing off", med["extracting_task"]),
        ("interactive `--stage`", "joins a live copy", med["stage_join"],
         "extracts", med["stage_extract"]),
        ("interactive activate + deactivate", "joins a live copy", med["cycle_join"],
         "extracts + removes", med["cycle_extract"]),
    ]
    print(f"\n{len(samples['shared_task'])} samples per row, medians, alternated; "
          f"environment {env} ({benchenv.tree_size(env)})\n")
    print("| what | conda-stage | s | reference | s | ratio |")
    print("|---|---|---|---|---|---|")
    for what, mine, a, ref, b in rows:
        print(f"| {what} | {mine} | {a:.3f} | {ref} | {b:.3f} | {b / a:.1f}x faster |"
              if a < b else f"| {what} | {mine} | {a:.3f} | {ref} | {b:.3f} | {a / b:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps({"samples": samples, "medians": med}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
