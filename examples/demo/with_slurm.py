"""Run one command while a single-node Slurm with conda-stage's hooks is up.

    /opt/conda-stage/bin/python examples/demo/with_slurm.py --base DIR [--conda-root DIR] -- CMD [ARG...]

The demo's job path (examples/demo/run.sh).  Everything Slurm comes from the
test suite's harness, as tests/test_slurm.py uses it: tests/harness/slurm.py
installs Debian's Slurm 22.05 packages if missing and starts munged,
slurmctld and slurmd under ``--base`` (config ``DIR/etc/slurm.conf``); the
shipped ``slurm-prolog``, ``slurm-task-prolog`` and ``slurm-epilog`` are
copied into ``DIR/hooks`` and configured with ``PrologFlags=Alloc``, and the
hooks' site file ``/etc/default/conda-stage`` is written, by
tests/harness/sitecfg.slurm_hooks as tests/test_slurm.py does it (staging
folder ``DIR/jobs``, manifests in ``DIR/conda-stage-state``, log
``DIR/log/conda-stage.log``, and no unused copy kept for a later job:
``CONDA_STAGE_KEEP_UNUSED=0``).

Then CMD runs (as given: it switches to the job user itself), and, if it
succeeded, the node is shown as root sees it: the staging folder, the
state folder (manifests) and the hooks' log.  Whatever happens, the hooks
are unconfigured, ``/etc/default/conda-stage`` is restored and Slurm is
stopped again (jobs cancelled, daemons stopped, munged too if this started
it).  Exit status: CMD's, or 1.
Run it as root, with the Python of the conda-stage installation (the hooks
run that Python, see sitecfg.hook_python).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.harness.sitecfg import DEFAULTS, slurm_hooks  # noqa: E402
from tests.harness.slurm import SlurmCluster, SlurmError  # noqa: E402

def say(msg: str) -> None:
    print(msg, flush=True)


def tree(path: Path, depth: int = 3) -> list:
    """Paths below ``path`` down to ``depth`` levels, like ``find -mindepth 1 -maxdepth 3``."""
    out = []
    for root, dirs, files in os.walk(path):
        rel = Path(root).relative_to(path)
        level = len(rel.parts) + 1
        for name in sorted(dirs + files):
            out.append(str(path / rel / name))
        if level >= depth:
            dirs[:] = []
        dirs.sort()
    return out


def show_node(staging: Path, state: Path, log: Path) -> bool:
    """The node as root sees it after the job; False if a job's folder or manifest is left."""
    say("\n# The node after the job, as root sees it: no job folder, no manifest, no copy")
    ok = True
    for path, what in ((staging, "staging folder"), (state, "state folder")):
        say(f"root# find {path} -mindepth 1 -maxdepth 3")
        entries = tree(path)
        for e in entries:
            say(e)
        left = [e for e in entries if re.fullmatch(r"\d+(\.\d+)?(\.json)?", os.path.basename(e))
                and os.path.dirname(e) == str(path)]
        if left:
            say(f"DEMO FAILED: a job's folder or manifest is left in the {what}: {' '.join(left)}")
            ok = False
    say(f"root# cat {log}")
    try:
        say(log.read_text(errors="replace").rstrip("\n"))
    except OSError as exc:
        say(f"({exc.strerror})")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, type=Path, help="the cluster's folder (SlurmCluster base)")
    ap.add_argument("--conda-root", help="CONDA_STAGE_CONDA_ROOT for the hooks (the site conda)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command given")
    if os.geteuid() != 0:
        ap.error("run as root (it starts Slurm and writes /etc/default/conda-stage)")
    # A TERM (e.g. from a CI timeout) still stops Slurm and restores the site file.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    base = args.base.resolve()
    staging, state, log = base / "jobs", base / "conda-stage-state", base / "log" / "conda-stage.log"
    # keep_unused=0: a copy shared by a user's jobs goes with its last job (by default
    # it is kept a while for the user's next job), so the Epilog leaves nothing.
    settings = dict(staging_dir=staging, state_dir=state, log_file=log, syslog="no",
                    keep_unused=0)
    if args.conda_root:
        settings["conda_root"] = args.conda_root

    cluster = SlurmCluster(base, lock_timeout=60)
    t0 = time.monotonic()
    if not cluster.packages_installed():
        say("slurm: installing Debian's slurmctld, slurmd, slurm-client, munge (once; ~1 min)")
    rc = 1
    try:
        try:
            cluster.up()
            # The suite's way (tests/test_slurm.py): the shipped hooks copied into the
            # cluster and configured, the site file written; both undone on leaving.
            with slurm_hooks(cluster, **settings):
                log.unlink(missing_ok=True)  # this run's lines only
                say(f"slurm: single-node cluster up in {time.monotonic() - t0:.1f} s "
                    f"(tests/harness/slurm.py; node {cluster.node}, SLURM_CONF={cluster.conf_path})")
                for key in ("Prolog", "TaskProlog", "Epilog"):
                    say(f"slurm: {key}={cluster.hooks[key]}")
                say(f"slurm: {DEFAULTS}: " + ", ".join(f"CONDA_STAGE_{k.upper()}={v}"
                                                       for k, v in settings.items()))
                rc = subprocess.run(cmd).returncode
                if rc == 0 and not show_node(staging, state, log):
                    rc = 1
            say(f"\nslurm: hooks unconfigured, {DEFAULTS} restored")
        finally:
            t1 = time.monotonic()
            cluster.down()
            say(f"slurm: stopped in {time.monotonic() - t1:.1f} s (the daemons under {base})")
    except (SlurmError, TimeoutError, OSError) as exc:
        say(f"\nDEMO FAILED: Slurm: {exc}")
        rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
