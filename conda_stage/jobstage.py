"""Prolog, task prolog and epilog logic, written once for every scheduler.

Prolog (root): make the job's folder (Slurm: ``<staging dir>/<job id>``,
root-owned, through directory file descriptors; SGE: the job's own TMPDIR),
then -- in a child that dropped to the job user, reading but never writing
the user's environment and tarball -- stage every declared, auto-stage-
enabled environment with a fresh tarball into ``<job folder>/envs/<name>``.
All of it within one time budget.  The child's report is checked like any
user input before root writes the manifest: what was staged, what to tell
the job.  Pointing conda at the copies is one variable:
``CONDA_ENVS_PATH=<job folder>/envs:...``.

Epilog (root): as the job user, stop processes still running from the job
folder; then remove it (Slurm: root, through file descriptors; SGE: the job
user, inside their TMPDIR).  Idempotent, and fine after a failed,
half-finished or absent prolog.

No user mistake makes a hook fail: the job runs unstaged and is told why
in one line per problem, unless the admin chose ``on_error = hold``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from .config import Config
from .errors import StageError
from .job import Job
from .jobdir import MANIFEST, UnsafeBase, check_manifest, one_line
from .privileges import ChildFailed, run_as

_GRACE = 15.0  # seconds past the budget before the staging child is killed


# ---------------------------------------------------------------- prolog
def prolog(job: Job, config: Config, log) -> dict | None:
    """Stage the job's environments; returns the manifest (None: nothing asked)."""
    if not job.request:
        return None
    t0 = time.monotonic()
    deadline = t0 + config.prolog_budget
    manifest = None
    try:
        if job.folder is not None:
            job.folder.create(job.account.uid, job.account.gid)
        report = run_as(job.account, _stage_envs, _job_spec(job),
                        {"conda_root": config.conda_root, "lock_timeout": config.lock_timeout,
                         "deadline": deadline},
                        timeout=config.prolog_budget + _GRACE)
        manifest = check_manifest(report)
        if _staged_paths(manifest) - _expected_paths(job):
            raise ValueError("the staging child reported copies outside the job folder")
    except UnsafeBase as exc:
        log.error(f"{job.label}: refusing the staging folder: {exc}")
        manifest = _manifest(job, _all_skipped(job, f"this node's staging folder is not safe "
                                                   f"to use ({exc}); tell your admin"))
    except ChildFailed as exc:
        log.error(f"{job.label}: staging failed: {one_line(exc)}")
        reason = (f"staging took longer than the node's budget of {config.prolog_budget:.0f} s"
                  if "timed out" in str(exc) else f"staging failed ({exc})")
        manifest = _manifest(job, _all_skipped(job, reason))
        _discard_copies(job, log)
    except (OSError, ValueError, LookupError) as exc:
        log.error(f"{job.label}: staging failed: {one_line(exc)}")
        manifest = _manifest(job, _all_skipped(job, f"internal error ({exc})"))
        _discard_copies(job, log)
    if job.folder is not None:
        try:
            job.folder.write_manifest(manifest, uid=job.account.uid)
        except (OSError, ValueError, UnsafeBase) as exc:
            log.error(f"{job.label}: cannot write the manifest: {one_line(exc)}")
    for item in manifest["results"]:
        if item["status"] == "staged":
            log.info(f"{job.label}: staged {item['original']} -> {item['path']} "
                     f"in {item['seconds']:.2f} s")
        else:
            log.warning(f"{job.label}: not staged {item['name']}: {item['reason']}")
    for problem in job.request.problems:
        log.warning(f"{job.label}: bad request: {problem}")
    log.info(f"{job.label}: prolog done in {time.monotonic() - t0:.2f} s")
    return manifest


def failed(manifest: dict | None) -> bool:
    return bool(manifest) and (bool(manifest["problems"]) or any(
        r["status"] != "staged" for r in manifest["results"]))


def _all_skipped(job: Job, reason: str) -> list:
    return [{"name": n, "status": "skipped", "reason": one_line(reason)}
            for n in job.request.names]


def _staged_paths(manifest: dict) -> set:
    return {r["path"] for r in manifest["results"] if r["status"] == "staged"}


def _expected_paths(job: Job) -> set:
    return {str(job.envs_dir / n) for n in job.request.names}


def _discard_copies(job: Job, log) -> None:
    """After a killed or failed staging child: no half-made copy stays."""
    try:
        if job.folder is not None:
            job.folder.remove_envs()
        else:
            run_as(job.account, _teardown, str(job.workdir), True, timeout=120)
    except (OSError, ChildFailed, UnsafeBase) as exc:
        log.error(f"{job.label}: cannot remove partial copies: {one_line(exc)}")


def _job_spec(job: Job) -> dict:
    return {"names": job.request.names, "problems": job.request.problems,
            "workdir": str(job.workdir), "job_id": job.job_id, "task_id": job.task_id,
            "label": job.label, "environ": job.environ, "home": job.account.home,
            "user": job.account.name, "root_folder": job.folder is not None}


def _manifest(job_or_spec, results) -> dict:
    spec = job_or_spec if isinstance(job_or_spec, dict) else _job_spec(job_or_spec)
    workdir = Path(spec["workdir"])
    staged = [r for r in results if r["status"] == "staged"]
    messages = [f"conda-stage: ignoring part of the request: {one_line(p)}"
                for p in spec["problems"]]
    for r in results:
        if r["status"] == "staged":
            messages.append(f"conda-stage: staged {r['name']} to {r['path']} in "
                            f"{r['seconds']:.1f} s; 'conda activate {r['name']}' uses it")
        else:
            messages.append(f"conda-stage: not staging {r['name']}: {one_line(r['reason'])}; "
                            f"the job runs without a staged copy of it")
    return {"job_id": spec["job_id"], "task_id": spec["task_id"], "user": spec["user"],
            "workdir": str(workdir), "envs_dir": str(workdir / "envs") if staged else None,
            "results": results, "problems": [one_line(p) for p in spec["problems"]],
            "messages": messages, "created": time.time()}


def _stage_envs(spec: dict, conf: dict) -> dict:
    """Runs as the job user: stage each environment, each on its own (one
    failing never fails another)."""
    from . import output
    from .autostage import is_enabled
    from .errors import NotEnabled, StageError
    from .resolve import resolve
    from .stage import stage

    workdir = Path(spec["workdir"])
    envs = workdir / "envs"
    if not spec["root_folder"]:  # SGE: our own folder in the job's TMPDIR
        workdir.mkdir(mode=0o700, exist_ok=True)
        envs.mkdir(mode=0o755, exist_ok=True)
    environ = dict(spec["environ"], HOME=spec["home"])
    if conf["conda_root"]:
        environ.setdefault("CONDA_ROOT_PREFIX", conf["conda_root"])
    deadline = conf["deadline"]
    results = []
    for name in spec["names"]:
        t0 = time.monotonic()
        try:
            if t0 >= deadline:
                raise StageError("the node's time budget for staging ran out before its turn")
            env = resolve(name, environ=environ, home=Path(spec["home"]))
            if not is_enabled(env.prefix):
                raise NotEnabled(f"{env.prefix} is not enabled for auto-staging (enable it "
                                 f"once with: conda stage --auto-stage=enable {name})")
            # repack=False: a hook never writes to the user's environment or
            # tarball; a stale tarball is reported, the job runs unstaged.
            path = stage(env, path=envs / name, name=name, mode="job",
                         job_id=spec["job_id"], repack=False,
                         lock_timeout=conf["lock_timeout"], deadline=deadline)
            results.append({"name": name, "status": "staged", "path": str(path),
                            "original": str(env.prefix),
                            "seconds": round(time.monotonic() - t0, 3)})
        except Exception as exc:  # noqa: BLE001 -- isolate environments from each other
            reason = str(exc) if isinstance(exc, StageError) else _oserror_line(exc)
            output.warn(one_line(reason))
            results.append({"name": name, "status": "skipped", "reason": one_line(reason)})
    try:
        os.chmod(envs, 0o555)  # so that 'conda create' never picks it as a target
    except OSError:
        pass
    manifest = _manifest(spec, results)
    if not spec["root_folder"]:
        from .tarball import atomic_write
        import json

        atomic_write(workdir / MANIFEST, json.dumps(manifest, indent=1).encode(), mode=0o644)
    return manifest


def _oserror_line(exc: Exception) -> str:
    import errno

    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        if exc.errno == errno.ENOSPC:
            return f"no space left on the node's local disk{where}"
        if exc.errno == errno.EDQUOT:
            return f"disk quota exceeded{where}"
        return f"{exc.strerror or exc}{where}"
    return f"internal error ({type(exc).__name__}: {exc})"


# ------------------------------------------------------------ task prolog
def exports(manifest: dict | None, environ) -> dict[str, str]:
    """Variables that point the job's conda at the staged copies (values
    are single-line; entries of the job's own CONDA_ENVS_PATH that are not
    are dropped)."""
    if not manifest or not manifest.get("envs_dir"):
        return {}
    envs_dir = manifest["envs_dir"]
    current = [p for p in environ.get("CONDA_ENVS_PATH", "").split(os.pathsep)
               if p and p.isprintable() and p != envs_dir]
    return {"CONDA_ENVS_PATH": os.pathsep.join([envs_dir] + current),
            "CONDA_STAGE_JOB_DIR": manifest["workdir"]}


# ---------------------------------------------------------------- epilog
def epilog(job: Job, config: Config, log) -> None:
    t0 = time.monotonic()
    deadline = t0 + config.epilog_budget
    staged = job.folder.exists() if job.folder is not None else os.path.lexists(job.workdir)
    try:
        result = run_as(job.account, _teardown, str(job.workdir) if staged else None,
                        staged and job.folder is None, timeout=config.epilog_budget)
        if result["killed"]:
            log.info(f"{job.label}: terminated {result['killed']} leftover processes "
                     f"running from {job.workdir}")
        for path in result["collected"]:
            log.info(f"{job.label}: removed {path}, staged by a shell that has exited")
    except (ChildFailed, OSError) as exc:
        log.error(f"{job.label}: cleaning up as the job user failed: {one_line(exc)}")
    if not staged:
        return
    if job.folder is not None:
        try:
            job.folder.remove(deadline)
        except (OSError, StageError) as exc:
            log.error(f"{job.label}: could not remove {job.workdir}: {one_line(exc)}")
            return
        if job.folder.exists():
            log.error(f"{job.label}: left {job.workdir} alone: the staging folder is not "
                      f"root's alone")
            return
    elif os.path.lexists(job.workdir):
        log.error(f"{job.label}: could not remove {job.workdir}")
        return
    log.info(f"{job.label}: removed {job.workdir} in {time.monotonic() - t0:.2f} s")


def _teardown(workdir: str | None, remove: bool) -> dict:
    """Runs as the job user: stop what runs from the job folder and (SGE,
    where the folder is the user's) remove it; then collect the user's
    interactive copies in /tmp whose shell is gone -- e.g. made by a
    'conda activate' in this job that never reached 'conda deactivate'."""
    from . import output
    from .gc import collect
    from .store import remove_tree

    killed = terminate_processes_under(Path(workdir)) if workdir else 0
    if workdir and remove:
        remove_tree(Path(workdir))
    quiet = output.is_quiet()
    output.configure(quiet=True)
    try:
        collected = collect(Path("/tmp"))
    finally:
        output.configure(quiet=quiet)
    return {"killed": killed, "collected": [str(p) for p in collected]}


def terminate_processes_under(folder: Path, grace: float = 3.0) -> int:
    """Terminate this user's processes that run from, work in or hold open
    files under ``folder``; SIGKILL those still alive after ``grace`` s."""
    import psutil

    root = str(folder).rstrip("/") + "/"
    me = {os.getpid(), os.getppid()}
    uid = os.getuid()

    def inside(path: str | None) -> bool:
        return bool(path) and (path + "/").startswith(root)

    victims = []
    for proc in psutil.process_iter(["pid", "uids", "exe", "cwd", "cmdline"]):
        try:
            info = proc.info
            if info["pid"] in me or not info["uids"] or info["uids"].real != uid:
                continue
            hit = inside(info["exe"]) or inside(info["cwd"]) or any(
                inside(a) for a in (info["cmdline"] or [])[:2])
            if not hit:
                hit = any(inside(f.path) for f in proc.open_files())
            if hit:
                victims.append(proc)
        except (psutil.Error, OSError):
            continue
    for proc in victims:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _gone, alive = psutil.wait_procs(victims, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)
    return len(victims)
