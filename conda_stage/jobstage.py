"""Prolog, task prolog and epilog logic, written once for every scheduler.

Prolog (root): create the job's node-local folder, then -- as the job user,
reading but never writing the user's environment and tarball -- stage every
declared, auto-stage-enabled environment with a fresh tarball into
``<job folder>/envs/<name>`` and write a manifest of what was staged, how
long it took, and what to tell the user.  Pointing conda at the copies is
one variable: ``CONDA_ENVS_PATH=<job folder>/envs:...`` makes ``conda
activate <name>`` find the copy before the original, whatever shell
function or hook order the user has.

Epilog (root): as the job user, stop processes still running from the job
folder and delete it; then remove what is left as root.  Idempotent, and
fine after a failed, half-finished or absent prolog.

No user mistake makes a hook fail: the job runs unstaged and is told why,
unless the admin chose ``on_error = hold``.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path

from .config import Config
from .job import Job
from .privileges import ChildFailed, run_as

MANIFEST = "manifest.json"


# ---------------------------------------------------------------- prolog
def prolog(job: Job, config: Config, log) -> dict | None:
    """Stage the job's environments; returns the manifest (None: nothing asked)."""
    if not job.request:
        return None
    t0 = time.monotonic()
    try:
        if job.workdir_owned_by_root:
            _make_root_workdir(job, config)
        manifest = run_as(job.account, _stage_envs, _job_spec(job), _config_spec(config))
    except (ChildFailed, OSError, ValueError) as exc:
        log.error(f"{job.label}: staging failed: {exc}")
        manifest = _manifest(job, [{"name": n, "status": "skipped",
                                     "reason": f"internal error: {exc}"}
                                    for n in job.request.names])
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


def _job_spec(job: Job) -> dict:
    return {"names": job.request.names, "problems": job.request.problems,
            "workdir": str(job.workdir), "job_id": job.job_id, "task_id": job.task_id,
            "label": job.label, "environ": job.environ, "home": job.account.home,
            "user": job.account.name}


def _config_spec(config: Config) -> dict:
    return {"conda_root": config.conda_root, "lock_timeout": config.lock_timeout}


def _make_root_workdir(job: Job, config: Config) -> None:
    """``<staging_dir>/<job id>``, owned by the job user, in a root-owned base."""
    base = Path(config.staging_dir)
    base.mkdir(mode=0o755, parents=True, exist_ok=True)
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise ValueError(f"staging_dir {base} must be a folder owned by root and not "
                         f"writable by others")
    if os.path.lexists(job.workdir):  # left over from an earlier job with this id
        _remove_as_root(job.workdir)
    os.mkdir(job.workdir, 0o700)
    os.chown(job.workdir, job.account.uid, job.account.gid)


def _manifest(job_or_spec, results) -> dict:
    spec = job_or_spec if isinstance(job_or_spec, dict) else _job_spec(job_or_spec)
    workdir = Path(spec["workdir"])
    staged = [r for r in results if r["status"] == "staged"]
    messages = [f"conda-stage: ignoring part of the request: {p}" for p in spec["problems"]]
    for r in results:
        if r["status"] == "staged":
            messages.append(f"conda-stage: staged {r['name']} to {r['path']} in "
                            f"{r['seconds']:.1f} s; 'conda activate {r['name']}' uses it")
        else:
            messages.append(f"conda-stage: not staging {r['name']}: {r['reason']}; "
                            f"the job runs without a staged copy of it")
    return {"job_id": spec["job_id"], "task_id": spec["task_id"], "user": spec["user"],
            "workdir": str(workdir), "envs_dir": str(workdir / "envs") if staged else None,
            "results": results, "problems": spec["problems"], "messages": messages,
            "created": time.time()}


def _stage_envs(spec: dict, conf: dict) -> dict:
    """Runs as the job user."""
    from . import output
    from .autostage import is_enabled
    from .errors import NotEnabled, StageError
    from .resolve import resolve
    from .stage import stage
    from .tarball import atomic_write

    workdir = Path(spec["workdir"])
    workdir.mkdir(mode=0o700, exist_ok=True)
    envs = workdir / "envs"
    envs.mkdir(mode=0o755, exist_ok=True)
    environ = dict(spec["environ"], HOME=spec["home"])
    if conf["conda_root"]:
        environ.setdefault("CONDA_ROOT_PREFIX", conf["conda_root"])
    results = []
    for name in spec["names"]:
        t0 = time.monotonic()
        try:
            env = resolve(name, environ=environ, home=Path(spec["home"]))
            if not is_enabled(env.prefix):
                raise NotEnabled(f"{env.prefix} is not enabled for auto-staging (enable it "
                                 f"once with: conda stage --auto-stage=enable {name})")
            # repack=False: a hook never writes to the user's environment or
            # tarball; a stale tarball is reported, the job runs unstaged.
            path = stage(env, path=envs / name, name=name, mode="job",
                         job_id=spec["job_id"], repack=False,
                         lock_timeout=conf["lock_timeout"])
            results.append({"name": name, "status": "staged", "path": str(path),
                            "original": str(env.prefix),
                            "seconds": round(time.monotonic() - t0, 3)})
        except StageError as exc:
            output.warn(str(exc))
            results.append({"name": name, "status": "skipped", "reason": str(exc)})
    os.chmod(envs, 0o555)  # so that 'conda create' never picks it as a target
    manifest = _manifest(spec, results)
    atomic_write(workdir / MANIFEST, json.dumps(manifest, indent=1).encode(), mode=0o644)
    return manifest


def read_manifest(workdir: Path) -> dict | None:
    try:
        with open(Path(workdir) / MANIFEST, "rb") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def exports(manifest: dict | None, environ) -> dict[str, str]:
    """Variables that point the job's conda at the staged copies."""
    if not manifest or not manifest.get("envs_dir"):
        return {}
    envs_dir = manifest["envs_dir"]
    current = [p for p in environ.get("CONDA_ENVS_PATH", "").split(os.pathsep) if p]
    return {"CONDA_ENVS_PATH": os.pathsep.join([envs_dir] + [p for p in current if p != envs_dir]),
            "CONDA_STAGE_JOB_DIR": manifest["workdir"]}


# ---------------------------------------------------------------- epilog
def epilog(job: Job, config: Config, log) -> None:
    if not os.path.lexists(job.workdir):
        return
    t0 = time.monotonic()
    try:
        result = run_as(job.account, _teardown, str(job.workdir),
                        not job.workdir_owned_by_root, timeout=300)
        if result["killed"]:
            log.info(f"{job.label}: terminated {result['killed']} leftover processes "
                     f"running from {job.workdir}")
    except (ChildFailed, OSError) as exc:
        log.error(f"{job.label}: removing {job.workdir} as the job user failed: {exc}")
    if job.workdir_owned_by_root and os.path.lexists(job.workdir):
        _remove_as_root(job.workdir)
    if os.path.lexists(job.workdir):
        log.error(f"{job.label}: could not remove {job.workdir}")
    else:
        log.info(f"{job.label}: removed {job.workdir} in {time.monotonic() - t0:.2f} s")


def _remove_as_root(path: Path) -> None:
    """Root removes what the job user could not (e.g. the folder itself).
    shutil.rmtree works on file descriptors and never follows symlinks, and
    root needs no write permission: nothing is chmod-ed."""
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        shutil.rmtree(path)


def _teardown(workdir: str, remove_self: bool) -> dict:
    """Runs as the job user."""
    from .store import remove_tree

    killed = terminate_processes_under(Path(workdir))
    if remove_self:
        remove_tree(Path(workdir))
    else:
        try:
            entries = os.listdir(workdir)
        except OSError:
            entries = []
        try:
            os.chmod(workdir, 0o700)
        except OSError:
            pass
        for entry in entries:
            remove_tree(Path(workdir) / entry)
    return {"killed": killed}


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
