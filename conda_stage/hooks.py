"""Entry points of the scheduler hooks: ``python -m conda_stage.hooks NAME``.

The executables in ``prolog/`` and ``epilog/`` are thin shell wrappers around
these.  A hook never fails because of a user's mistake: Slurm drains a node
whose Prolog/Epilog exits non-zero, SGE puts the queue in error on prolog
exit codes other than 0, 99 and 100.  Every hook exits 0, except an SGE
prolog told to hold jobs (``on_error = hold``), which exits 100 (the job goes
to error state, the queue stays usable).
"""
from __future__ import annotations

import os
import subprocess
import sys
import traceback


def _setup():
    from .config import Config
    from .joblog import hook_logger

    config = Config.load()
    return config, hook_logger(config)


def slurm_prolog() -> int:
    from .job import SlurmAdapter
    from .jobstage import failed, prolog

    config, log = _setup()
    job = SlurmAdapter.job(os.environ, config)
    manifest = prolog(job, config, log)
    if failed(manifest) and config.on_error == "hold":
        reason = "; ".join(manifest["messages"])[:200]
        log.warning(f"{job.label}: holding the job (on_error = hold): {reason}")
        subprocess.run(["scontrol", "requeuehold", job.job_id], timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return 0


def slurm_task_prolog() -> int:
    """Runs as the job user before every task; its stdout is read by Slurm
    (``export NAME=value`` sets a variable, ``print text`` reaches the job's
    output)."""
    from .config import Config
    from .job import SlurmAdapter
    from .jobstage import exports, read_manifest

    config = Config.load()
    job = SlurmAdapter.job(os.environ, config)
    manifest = read_manifest(job.workdir)
    if manifest is None:
        return 0
    lines = [f"export {k}={v}" for k, v in exports(manifest, os.environ).items()]
    if config.set_tmpdir:
        tmp = job.workdir / "tmp"
        tmp.mkdir(mode=0o700, exist_ok=True)
        lines.append(f"export TMPDIR={tmp}")
    try:  # tell the user once per job, not once per task
        fd = os.open(job.workdir / ".told", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        lines += [f"print {m}" for m in manifest["messages"]]
    except OSError:
        pass
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


def slurm_epilog() -> int:
    from .job import SlurmAdapter
    from .jobstage import epilog

    config, log = _setup()
    epilog(SlurmAdapter.job(os.environ, config), config, log)
    return 0


def sge_prolog() -> int:
    from .job import SgeAdapter
    from .jobstage import exports, failed, prolog
    from .sge import export_to_job

    config, log = _setup()
    job = SgeAdapter.job(os.environ, config)
    manifest = prolog(job, config, log)
    if not manifest:
        return 0
    for message in manifest["messages"]:
        print(message, flush=True)
    variables = exports(manifest, os.environ)
    if variables:
        export_to_job(job, variables, log)
    if failed(manifest) and config.on_error == "hold":
        print("conda-stage: holding the job (error state; 'qmod -cj' reruns it after a fix)",
              flush=True)
        return 100
    return 0


def sge_epilog() -> int:
    from .job import SgeAdapter
    from .jobstage import epilog

    config, log = _setup()
    epilog(SgeAdapter.job(os.environ, config), config, log)
    return 0


HOOKS = {
    "slurm-prolog": slurm_prolog,
    "slurm-task-prolog": slurm_task_prolog,
    "slurm-epilog": slurm_epilog,
    "sge-prolog": sge_prolog,
    "sge-epilog": sge_epilog,
}


def main(argv=None) -> int:
    argv = sys.argv if argv is None else argv
    name = argv[1] if len(argv) > 1 else ""
    hook = HOOKS.get(name)
    if hook is None:
        print(f"usage: python -m conda_stage.hooks {{{','.join(HOOKS)}}}", file=sys.stderr)
        return 0  # even a miswired hook must not take a node down
    try:
        return hook()
    except BaseException as exc:  # fail open, loudly, for the admin
        print(f"conda-stage {name}: internal error: {exc}", file=sys.stderr)
        try:
            from .config import Config
            from .joblog import hook_logger

            hook_logger(Config.load()).error(
                f"{name}: internal error: {exc}\n{traceback.format_exc()}")
        except BaseException:
            traceback.print_exc()
        return 0


if __name__ == "__main__":
    sys.exit(main())
