"""Entry points of the scheduler hooks: ``python -I -m conda_stage.hooks NAME``,
started by the wrappers in ``prolog/`` and ``epilog/``.

A small router: each hook name maps to the scheduler's adapter and one of
the three jobs written once in :mod:`conda_stage.jobstage` (prolog, task
prolog, epilog).  Before anything else the environment is cleared to a fixed
``PATH``: the adapter reads its own variable table from the saved copy, and
nothing a job owner exported reaches a subprocess or a setting.

A hook never fails because of a user's mistake: Slurm drains a node whose
Prolog/Epilog exits non-zero, SGE puts the queue in error on prolog exit
codes other than 0, 99 and 100.  Every hook exits 0, except an SGE prolog
told to hold jobs (``on_error = hold``), which exits 100 (the job goes to
error state, the queue stays usable).
"""
from __future__ import annotations

import os
import sys
import traceback

SAFE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def _clean_environment() -> dict:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(PATH=SAFE_PATH, LC_ALL="C.UTF-8")
    return saved


def _setup():
    from .config import Config
    from .joblog import hook_logger

    config = Config.load()
    return config, hook_logger(config)


def prolog(adapter, environ) -> int:
    from .jobstage import failed, prolog as stage_job

    config, log = _setup()
    job = adapter.job(environ, config)
    manifest = stage_job(job, config, log)
    if not manifest:
        return 0
    if adapter.name == "sge":  # the prolog's output is the job's output
        for message in manifest["messages"]:
            print(message, flush=True)
        from .jobstage import exports
        from .sge import export_to_job

        variables = exports(manifest, job.environ)
        if variables:
            export_to_job(job, variables, log)
    if failed(manifest) and config.on_error == "hold":
        return adapter.hold(job, "; ".join(manifest["messages"])[:200], log)
    return 0


def task_prolog(adapter, environ) -> int:
    """Slurm TaskProlog, as the job user, before every task: its stdout is
    read by Slurm (``export NAME=value`` sets a variable, ``print text``
    reaches the job's output)."""
    from .config import Config
    from .jobstage import exports

    config = Config.load()
    job = adapter.job(environ, config)
    manifest = job.folder.read_manifest()
    if manifest is None or manifest["user"] != job.account.name:
        return 0
    lines = [f"export {k}={v}" for k, v in exports(manifest, environ).items()]
    tmp = job.folder.user_tmp() if config.set_tmpdir else None
    if tmp is not None:
        lines.append(f"export TMPDIR={tmp}")
    if job.folder.claim_telling():  # tell the user once per job, not once per task
        lines += [f"print {m}" for m in manifest["messages"]]
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


def epilog(adapter, environ) -> int:
    from .jobstage import epilog as clean_job

    config, log = _setup()
    clean_job(adapter.job(environ, config), config, log)
    return 0


def _routes():
    from .job import SgeAdapter, SlurmAdapter

    return {
        "slurm-prolog": (SlurmAdapter, prolog),
        "slurm-task-prolog": (SlurmAdapter, task_prolog),
        "slurm-epilog": (SlurmAdapter, epilog),
        "sge-prolog": (SgeAdapter, prolog),
        "sge-epilog": (SgeAdapter, epilog),
    }


HOOKS = ("slurm-prolog", "slurm-task-prolog", "slurm-epilog", "sge-prolog", "sge-epilog")


def main(argv=None) -> int:
    environ = _clean_environment()
    argv = sys.argv if argv is None else argv
    name = argv[1] if len(argv) > 1 else ""
    if name not in HOOKS:
        print(f"usage: python -m conda_stage.hooks {{{','.join(HOOKS)}}}", file=sys.stderr)
        return 0  # even a miswired hook must not take a node down
    adapter, hook = _routes()[name]
    try:
        return hook(adapter, environ)
    except BaseException as exc:  # fail open, loudly, for the admin
        from .jobdir import one_line

        line = one_line(f"conda-stage {name}: {_describe(exc)}")
        print(line, file=sys.stdout if name == "sge-prolog" else sys.stderr, flush=True)
        _log_failure(name, exc)
        return 0


def _describe(exc: BaseException) -> str:
    from .errors import StageError

    if isinstance(exc, StageError):
        return f"not staging: {exc}"
    return f"internal error: {type(exc).__name__}: {exc}"


def _log_failure(name: str, exc: BaseException) -> None:
    """To syslog and, if the site file can be trusted, its log file."""
    from .jobdir import one_line

    try:
        from .config import Config
        from .joblog import hook_logger

        try:
            config = Config.load()
        except Exception:  # noqa: BLE001 -- an untrusted site file: syslog only
            config = Config(log_file="")
        hook_logger(config).error(one_line(f"{name}: {_describe(exc)}") + " | "
                                  + one_line(traceback.format_exc(), 4000))
    except BaseException:  # noqa: BLE001
        pass


if __name__ == "__main__":
    sys.exit(main())
