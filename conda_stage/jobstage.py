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
from .nodestore import NodeStore, holder, valid_id
from .privileges import ChildFailed, run_as
from .procs import terminate_processes_under

_GRACE = 15.0  # seconds past the budget before the staging child is killed


# ---------------------------------------------------------------- prolog
def prolog(job: Job, config: Config, log) -> dict | None:
    """Stage the job's environments; returns the manifest (None: nothing asked)."""
    if not job.request:
        return None
    t0 = time.monotonic()
    deadline = t0 + config.prolog_budget
    store = _store(job, config)
    manifest = None
    try:
        if job.folder is not None:
            job.folder.create(job.account.uid, job.account.gid)
        if store is None:
            manifest = _run_staging(job, config, deadline, None)
        else:
            # Other users' copies past their keep time make room first
            # (only users whose lock is free right now: never a wait).
            sweep_node(store, log, job.label, wait=False, skip=job.account.uid,
                       deadline=_share(deadline, 0.1))
            # One user's prologs take turns: the first extracts, the next
            # ones find its copy and share it.
            with store.locked(job.account.uid, deadline) as mine:
                store.prepare_user(job.account.uid, job.account.gid, deadline)
                try:
                    manifest = _run_staging(job, config, deadline, store)
                    _hold_copies(job, mine, manifest)
                finally:
                    _sweep(mine, job.account, log, job.label, deadline=deadline)
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
    except (OSError, ValueError, LookupError, StageError) as exc:
        log.error(f"{job.label}: staging failed: {one_line(exc)}")
        manifest = _manifest(job, _all_skipped(job, f"internal error ({exc})"
                                               if not isinstance(exc, StageError) else str(exc)))
        _discard_copies(job, log)
    if job.folder is not None:
        try:
            job.folder.write_manifest(manifest, uid=job.account.uid)
        except (OSError, ValueError, UnsafeBase) as exc:
            log.error(f"{job.label}: cannot write the manifest: {one_line(exc)}")
    for item in manifest["results"]:
        if item["status"] == "staged":
            how = " (shared copy)" if item.get("reused") else (
                " (image mounted)" if item.get("image") else
                " (extracted)" if item.get("copy") else "")
            log.info(f"{job.label}: staged {item['original']} -> {item['path']} "
                     f"in {item['seconds']:.2f} s{how}")
        else:
            log.warning(f"{job.label}: not staged {item['name']}: {item['reason']}")
    for problem in job.request.problems:
        log.warning(f"{job.label}: bad request: {problem}")
    log.info(f"{job.label}: prolog done in {time.monotonic() - t0:.2f} s")
    return manifest


def _store(job: Job, config: Config) -> NodeStore | None:
    """The node store, when this job's copies are shared (a root-made job
    folder and sharing on)."""
    if job.folder is None or not config.share_copies:
        return None
    return NodeStore.from_config(config)


def _run_staging(job: Job, config: Config, deadline: float, store: NodeStore | None) -> dict:
    """Stage as the job user; the child's report, checked like user input."""
    spec = _job_spec(job)
    spec["store"] = str(store.user_folder(job.account.uid)) if store else None
    report = run_as(job.account, _stage_envs, spec,
                    {"conda_root": config.conda_root, "lock_timeout": config.lock_timeout,
                     "deadline": deadline, "stage_mode": config.stage_mode,
                     "image_copy": config.image_copy},
                    timeout=config.prolog_budget + _GRACE)
    manifest = check_manifest(report)
    for item in manifest["results"]:
        if item["status"] != "staged":
            continue
        if item["name"] not in job.request.names:
            raise ValueError("the staging child reported an environment nobody asked for")
        if store is not None:
            cid = store.parse_copy_path(job.account.uid, item["path"], item["name"])
            if cid is None or cid != item.get("copy"):
                raise ValueError("the staging child reported a copy outside the user's store")
        elif item["path"] != str(job.envs_dir / item["name"]):
            raise ValueError("the staging child reported copies outside the job folder")
    return manifest


def _hold_copies(job: Job, mine, manifest: dict) -> None:
    """(root, under the user's lock) This job now holds the copies it uses."""
    who = holder(job.scheduler, job.folder.key)
    for item in manifest["results"]:
        if item["status"] == "staged" and mine.copy_exists(item["copy"], item["name"]):
            mine.hold(item["copy"], who, name=item["name"], original=item["original"],
                      size=(item.get("bytes", 0), item.get("files", 0)))


def _sweep(mine, account, log, label: str, *, deadline=None, keep=None, over=None) -> list:
    """(root, under the user's lock) Remove the user's copies nobody holds
    that are past their keep time (or over the disk budget), after stopping
    the user's processes still running from them."""
    from .image import mounts_under

    doomed = mine.unused(keep=keep, over_budget=over)
    folder = mine.store.user_folder(mine.uid)
    gone = {r.id for r in doomed}
    records = mine.records()
    live = [r.path for r in records.values() if r.id not in gone]
    stray = [p for p in mounts_under(folder) if str(p) not in live]
    unrecorded = [c for c in mine._copy_ids() if c not in records]
    spared: set[str] = set()
    if doomed or stray or unrecorded:
        try:
            result = run_as(account, _terminate_under,
                            [str(mine.store.copy_folder(mine.uid, r.id)) for r in doomed],
                            str(folder), live, sorted(records),
                            timeout=60 if deadline is None else
                            max(1.0, min(60.0, deadline - time.monotonic())))
            spared = {c for c in result.get("spared", ()) if valid_id(c)} \
                if isinstance(result, dict) else set()
        except (ChildFailed, OSError) as exc:
            log.error(f"{label}: stopping processes before removing copies failed: "
                      f"{one_line(exc)}")
    removed = []
    for rec in doomed:
        if rec.id in spared:
            log.info(f"{label}: kept the unused copy {rec.path} for now: a shell of uid "
                     f"{mine.uid} still uses it")
            continue
        try:
            mine.remove(rec, deadline)
            removed.append(rec)
            log.info(f"{label}: removed the unused copy {rec.path} of {rec.original}")
        except Exception as exc:  # noqa: BLE001 -- one copy never stops the others
            log.error(f"{label}: could not remove {rec.path}: {one_line(exc)}")
    try:
        mine.tidy(deadline)
    except Exception as exc:  # noqa: BLE001
        log.error(f"{label}: could not tidy uid {mine.uid}'s store folder: {one_line(exc)}")
    return removed


def _terminate_under(paths: list, folder: str, live=(), recorded=()) -> dict:
    """(user) Stop the user's processes running from the copy folders
    ``paths`` and unmount the images mounted there: the FUSE processes exit
    with their mounts.  An image nothing uses is unmounted first (a busy one
    would refuse), which leaves no process to look for but its FUSE process,
    gone with it.  Images that live shells of the user hold are left alone
    (``spared``: root keeps them for now), and image folders neither held
    nor ``recorded`` by root go (:func:`shellimage.sweep`).  Then every other mount in the
    user's store ``folder`` but the ``live`` copies' and the shells' goes
    too (the user's own, or an image moved out of its copy folder): root
    removes nothing through a mount."""
    from .image import mounts_under, unmount, unmount_all
    from .shellimage import sweep

    paths = [Path(p) for p in paths]
    live_ids = {Path(p).parent.name for p in live}
    held = sweep(Path(folder), set(recorded) | live_ids, live_ids)
    spared = [p.name for p in paths if p.name in held]
    stopped = 0
    for path in paths:
        if path.name in spared:
            continue
        for point in mounts_under(path):
            unmount(point, listed=True, lazy=False)
        stopped += terminate_processes_under(path)
    keep = set(live) | {str(p) for p in mounts_under(Path(folder))
                        if p.parent.parent == Path(folder) and p.parent.name in held}
    unmount_all(Path(folder), keep=keep)  # the doomed copies are under it, not live
    return {"stopped": stopped, "spared": spared}


def failed(manifest: dict | None) -> bool:
    return bool(manifest) and (bool(manifest["problems"]) or any(
        r["status"] != "staged" for r in manifest["results"]))


def _all_skipped(job: Job, reason: str) -> list:
    return [{"name": n, "status": "skipped", "reason": one_line(reason)}
            for n in job.request.names]


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
            "scheduler": job.scheduler,
            "user": job.account.name, "root_folder": job.folder is not None}


def _manifest(job_or_spec, results) -> dict:
    spec = job_or_spec if isinstance(job_or_spec, dict) else _job_spec(job_or_spec)
    workdir = Path(spec["workdir"])
    staged = [r for r in results if r["status"] == "staged"]
    messages = [f"conda-stage: ignoring part of the request: {one_line(p)}"
                for p in spec["problems"]]
    for r in results:
        if r.get("note"):
            messages.append(f"conda-stage: {r['name']}: {r['note']}")
        if r["status"] == "staged" and r.get("reused"):
            messages.append(f"conda-stage: {r['name']} is staged at {r['path']} (a copy this "
                            f"node already had, shared with your other jobs); "
                            f"'conda activate {r['name']}' uses it")
        elif r["status"] == "staged" and r.get("image"):
            messages.append(f"conda-stage: mounted the image of {r['name']} at {r['path']} in "
                            f"{r['seconds']:.1f} s; 'conda activate {r['name']}' uses it")
        elif r["status"] == "staged":
            messages.append(f"conda-stage: staged {r['name']} to {r['path']} in "
                            f"{r['seconds']:.1f} s; 'conda activate {r['name']}' uses it")
        else:
            messages.append(f"conda-stage: not staging {r['name']}: {one_line(r['reason'])}; "
                            f"the job runs without a staged copy of it")
    return {"job_id": spec["job_id"], "task_id": spec["task_id"], "user": spec["user"],
            "scheduler": spec["scheduler"],
            "workdir": str(workdir),
            "envs_dir": os.path.dirname(staged[0]["path"]) if staged else None,
            "results": results, "problems": [one_line(p) for p in spec["problems"]],
            "messages": messages, "created": time.time()}


def _stage_envs(spec: dict, conf: dict) -> dict:
    """Runs as the job user: stage each environment, each on its own (one
    failing never fails another)."""
    from . import output
    from .autostage import is_enabled
    from .errors import NotEnabled, StageError
    from .resolve import resolve
    from .stage import stage, stage_shared

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
            if spec.get("store"):
                shared = stage_shared(env, Path(spec["store"]), name, job_id=spec["job_id"],
                                      lock_timeout=conf["lock_timeout"], deadline=deadline,
                                      mode=conf.get("stage_mode", "extract"),
                                      copy_image=conf.get("image_copy", True))
                _read_only(shared.path.parent)  # 'conda create' never picks it
                item = {"path": str(shared.path), "copy": shared.copy_id,
                        "reused": shared.reused, "bytes": shared.bytes, "files": shared.files,
                        "image": shared.image}
                if shared.note:
                    item["note"] = one_line(shared.note)
            else:
                path = stage(env, path=envs / name, name=name, mode="job",
                             job_id=spec["job_id"], repack=False,
                             lock_timeout=conf["lock_timeout"], deadline=deadline)
                item = {"path": str(path)}
            results.append({"name": name, "status": "staged", **item,
                            "original": str(env.prefix),
                            "seconds": round(time.monotonic() - t0, 3)})
        except Exception as exc:  # noqa: BLE001 -- isolate environments from each other
            reason = str(exc) if isinstance(exc, StageError) else _oserror_line(exc)
            output.warn(one_line(reason))
            results.append({"name": name, "status": "skipped", "reason": one_line(reason)})
    _read_only(envs)
    manifest = _manifest(spec, results)
    if not spec["root_folder"]:
        from .tarball import atomic_write
        import json

        atomic_write(workdir / MANIFEST, json.dumps(manifest, indent=1).encode(), mode=0o644)
    return manifest


def _read_only(folder: Path) -> None:
    """So that 'conda create' never picks an envs folder as its target."""
    try:
        os.chmod(folder, 0o555)
    except OSError:
        pass


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
    """Variables that point the job's conda at the staged copies: the
    folder of each copy first in CONDA_ENVS_PATH (values are single-line;
    entries of the job's own CONDA_ENVS_PATH that are not are dropped)."""
    if not manifest:
        return {}
    folders = []
    for item in manifest["results"]:
        folder = os.path.dirname(item["path"]) if item["status"] == "staged" else None
        if folder and folder not in folders:
            folders.append(folder)
    if not folders:
        return {}
    current = [p for p in environ.get("CONDA_ENVS_PATH", "").split(os.pathsep)
               if p and p.isprintable() and p not in folders]
    return {"CONDA_ENVS_PATH": os.pathsep.join(folders + current),
            "CONDA_STAGE_JOB_DIR": manifest["workdir"]}


# ---------------------------------------------------------------- epilog
def epilog(job: Job, config: Config, log) -> None:
    t0 = time.monotonic()
    deadline = t0 + config.epilog_budget
    # SGE: the folder is in the job's TMPDIR, the user's: only the user looks
    # at it (root would ask a FUSE mount the user put there)
    staged = job.folder.exists() if job.folder is not None else None
    result: dict = {}
    try:
        result = run_as(job.account, _teardown, str(job.workdir) if staged is not False
                        else None, job.folder is None, timeout=config.epilog_budget)
        if result["killed"]:
            log.info(f"{job.label}: terminated {result['killed']} leftover processes "
                     f"running from {job.workdir}")
        for path in result["collected"]:
            log.info(f"{job.label}: removed {path}, staged by a shell that has exited")
    except (ChildFailed, OSError) as exc:
        log.error(f"{job.label}: cleaning up as the job user failed: {one_line(exc)}")
    if job.folder is not None:  # half the time left, the rest for the job's folder
        _release(job, config, log, _share(deadline, 0.5))
    if staged is None:
        staged = result.get("existed", False)
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
    elif result.get("left", True):
        log.error(f"{job.label}: could not remove {job.workdir}")
        return
    log.info(f"{job.label}: removed {job.workdir} in {time.monotonic() - t0:.2f} s")


def _release(job: Job, config: Config, log, deadline: float) -> None:
    """(root) The job lets go of its shared copies; those nobody holds go
    once past their keep time -- this user's, and other users' whose lock
    is free right now (the full pass with the scheduler's view of running
    jobs is 'conda-stage gc --jobs')."""
    store = NodeStore.from_config(config)
    uid = job.account.uid
    try:
        if store.records(uid) or store.has_folder(uid):
            with store.locked(uid, deadline) as mine:
                for rec in mine.release(holder(job.scheduler, job.folder.key)):
                    left = f"{len(rec.holders)} other job(s) still use it" if rec.holders else \
                        "no job uses it now"
                    log.info(f"{job.label}: released {rec.path} ({left})")
                _sweep(mine, job.account, log, job.label, deadline=deadline)
        sweep_node(store, log, job.label, wait=False, skip=uid, deadline=_share(deadline, 0.2))
    except Exception as exc:  # noqa: BLE001 -- the job folder is still removed below
        log.error(f"{job.label}: releasing shared copies failed: {one_line(exc)}")


def _share(deadline: float, part: float) -> float:
    """A deadline ``part`` of the way from now to ``deadline``."""
    now = time.monotonic()
    return now + max(0.0, deadline - now) * part


def sweep_node(store: NodeStore, log, label: str, *, wait: bool, skip=None,
               is_gone=None, deadline: float | None = None) -> list:
    """(root) Every user's unused copies past their keep time or over the
    disk budget.  ``wait``: wait for busy users' locks (gc), else skip them
    (hooks).  ``is_gone(holder)``: drop holders whose job no longer runs.
    Past ``deadline`` (hooks) removals stop: the next sweep or gc finishes."""
    from .nodestore import over_budget
    from .privileges import Account

    now = time.time()
    everyone = [r for uid in store.uids() for r in store.records(uid)]
    over = over_budget(store, everyone, now)
    removed = []
    for uid in store.uids():
        if uid == skip:
            continue
        if deadline is not None and time.monotonic() >= deadline:
            break
        try:
            account = Account.lookup(uid=uid)
        except KeyError:
            account = None
        try:
            with store.locked(uid, time.monotonic() + (300 if wait else 0)) as mine:
                if is_gone is not None:
                    for cid, who in mine.drop_holders(is_gone):
                        log.info(f"{label}: dropped {who} from copy {cid} of uid {uid}: "
                                 f"that job no longer runs here")
                if account is None:
                    account = Account(name=str(uid), uid=uid, gid=uid, home="/", groups=())
                removed += _sweep(mine, account, log, label, over=over, deadline=deadline)
        except StageError as exc:
            if "another job of the same user" not in str(exc):
                log.error(f"{label}: sweeping uid {uid}'s copies failed: {one_line(exc)}")
            continue  # busy: its own hooks or the next pass sweep it
        except Exception as exc:  # noqa: BLE001 -- one user's folder never stops the others
            log.error(f"{label}: sweeping uid {uid}'s copies failed: {one_line(exc)}")
    return removed


def _teardown(workdir: str | None, remove: bool) -> dict:
    """Runs as the job user: stop what runs from the job folder and (SGE,
    where the folder is the user's) remove it; then collect the user's
    interactive copies in /tmp whose shell is gone -- e.g. made by a
    'conda activate' in this job that never reached 'conda deactivate'."""
    from . import output
    from .gc import collect
    from .store import remove_tree

    existed = bool(workdir) and os.path.lexists(workdir)
    killed = terminate_processes_under(Path(workdir)) if existed else 0
    if existed:  # e.g. an image's folder the job moved in here
        from .image import unmount_all

        unmount_all(Path(workdir))
    if existed and remove:
        remove_tree(Path(workdir))
    quiet = output.is_quiet()
    output.configure(quiet=True)
    try:
        collected = collect(Path("/tmp"))
    finally:
        output.configure(quiet=quiet)
    return {"killed": killed, "collected": [str(p) for p in collected], "existed": existed,
            "left": bool(existed and remove and os.path.lexists(workdir))}
