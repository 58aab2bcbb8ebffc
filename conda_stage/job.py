"""One view of a batch job, whatever the scheduler, and one adapter per
scheduler holding both what the hooks take from it and what they ask of it.

Each adapter maps *its* variables onto :class:`Job` through one declarative
table -- nothing else in conda-stage reads scheduler variables -- and
carries the scheduler's actions: hand variables to the job, hold it, tell
whether a job still runs.  What a root hook takes from its environment is
exactly the table, validated; everything else there is ignored (SGE passes
the job owner's ``qsub -v`` variables to ``root@`` prologs).
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .config import Config
from .errors import StageError
from .jobdir import JobDir
from .privileges import Account
from .request import Request, parse_text, parse_value

# Job variables that influence how conda finds environments by name; they
# are handed to the staging child, which runs as the job user.
CONDA_VARS = ("CONDA_ENVS_PATH", "CONDA_ENVS_DIRS", "CONDARC", "CONDA_EXE",
              "CONDA_ROOT_PREFIX", "CONDA_ROOT", "XDG_CONFIG_HOME")
_ID = re.compile(r"^[0-9]{1,20}$")
_MAX_VALUE = 4096


class NotAJob(StageError):
    """The hook did not run where a scheduler runs it (or was lied to)."""


@dataclass
class Job:
    scheduler: str
    job_id: str
    task_id: str | None
    account: Account
    request: Request
    workdir: Path  # the folder the job's copies are staged under
    folder: JobDir | None = None  # root-made job folder (Slurm)
    node: str = ""
    spool_dir: Path | None = None
    environ: dict = field(default_factory=dict)  # job variables relevant to conda
    scheduler_env: dict = field(default_factory=dict)  # for the scheduler's own commands

    @property
    def label(self) -> str:
        task = f".{self.task_id}" if self.task_id else ""
        return f"{self.scheduler} job {self.job_id}{task} ({self.account.name})"

    @property
    def envs_dir(self) -> Path:
        return self.workdir / "envs"


def _conda_vars(environ: Mapping[str, str]) -> dict:
    return {k: environ[k] for k in CONDA_VARS
            if environ.get(k) and len(environ[k]) <= _MAX_VALUE and "\0" not in environ[k]}


def _job_id(value: str | None, var: str) -> str:
    if not value or not _ID.match(value):
        raise NotAJob(f"{var}={value!r} is not a job id: not running as a scheduler hook")
    return value


# ----------------------------------------------------------------- Slurm
class SlurmAdapter:
    name = "slurm"
    # Slurm builds its hooks' environment itself: no user variable reaches a
    # Prolog/Epilog, and the comment is the user's free text (parsed, never
    # used as a path).
    _env = {
        "job_id": "SLURM_JOB_ID",
        "uid": "SLURM_JOB_UID",
        "gid": "SLURM_JOB_GID",
        "comment": "SLURM_JOB_COMMENT",
        "extra": "SLURM_JOB_EXTRA",
        "node": "SLURMD_NODENAME",
        "conf": "SLURM_CONF",  # where scontrol finds the cluster (set by slurmd)
    }

    @classmethod
    def job(cls, environ: Mapping[str, str], config: Config) -> Job:
        v = {key: environ.get(var) for key, var in cls._env.items()}
        job_id = _job_id(v["job_id"], "SLURM_JOB_ID")
        if os.geteuid() == 0:
            uid = _job_id(v["uid"], "SLURM_JOB_UID")
            account = Account.lookup(uid=int(uid), gid=_job_id(v["gid"], "SLURM_JOB_GID"))
        else:  # TaskProlog: runs as the job user
            account = Account.lookup(uid=os.getuid(), gid=os.getgid())
        folder = JobDir(config.staging_dir, config.state_dir, job_id)
        return Job(scheduler=cls.name, job_id=job_id, task_id=None, account=account,
                   request=parse_text(v["comment"], v["extra"]), workdir=folder.path,
                   folder=folder, node=v["node"] or "",
                   scheduler_env={"SLURM_CONF": v["conf"]} if v["conf"] else {})

    @staticmethod
    def hold(job: Job, reason: str, log) -> int:
        log.warning(f"{job.label}: holding the job (on_error = hold): {reason}")
        try:
            r = subprocess.run(["scontrol", "requeuehold", job.job_id], timeout=60,
                               capture_output=True, text=True,
                               env={**os.environ, **job.scheduler_env})
            if r.returncode != 0:
                log.error(f"{job.label}: scontrol requeuehold failed: {r.stderr.strip()}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.error(f"{job.label}: scontrol requeuehold failed: {exc}")
        return 0

    command = "squeue"

    @staticmethod
    def is_alive(job_id: str, config: Config | None = None) -> bool:
        """Whether Slurm still knows ``job_id`` as pending, running or completing."""
        try:
            r = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                               text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise StageError(f"Cannot ask Slurm about job {job_id}: {exc}") from None
        if r.returncode != 0:
            if "Invalid job id" in r.stderr:
                return False
            raise StageError(f"Cannot ask Slurm about job {job_id}: {r.stderr.strip()}")
        return bool(r.stdout.strip())


# ------------------------------------------------------------------- SGE
class SgeAdapter:
    name = "sge"
    # Only the request comes from the job's environment (the JSV put it
    # there; the names are validated again).  Who the job is comes from the
    # shepherd's spool folder, which execd wrote and the user cannot.
    _env = {
        "envs": "CONDA_STAGE_ENVS",
        "job_id": "JOB_ID",
        "task_id": "SGE_TASK_ID",
        "tmpdir": "TMPDIR",
        "tmp": "TMP",
        "spool": "SGE_JOB_SPOOL_DIR",
        "node": "HOSTNAME",
    }
    # Keys of the spool folder's ``config`` file.
    _spool = {"job_id": "job_id", "task_id": "ja_task_id", "owner": "job_owner",
              "tmpdir": "tmpdir"}

    @classmethod
    def job(cls, environ: Mapping[str, str], config: Config) -> Job:
        v = {key: environ.get(var) for key, var in cls._env.items()}
        if os.geteuid() == 0:
            spool = shepherd_spool_dir()
            conf = read_spool_config(spool)
            job_id = _job_id(conf.get(cls._spool["job_id"]), f"{spool}/config job_id")
            task = conf.get(cls._spool["task_id"])
            account = Account.lookup(user=conf.get(cls._spool["owner"]) or "")
            tmpdir = conf.get(cls._spool["tmpdir"])
        else:  # a job-owner prolog: acts for whoever runs it, nobody else
            job_id = _job_id(v["job_id"], "JOB_ID")
            task = v["task_id"]
            spool = Path(v["spool"]) if v["spool"] else None
            account = Account.lookup(uid=os.getuid(), gid=os.getgid())
            tmpdir = v["tmpdir"] or v["tmp"]
        task = task if task and task not in ("0", "undefined") and _ID.match(task) else None
        if v["envs"] is not None:
            request = parse_value(v["envs"])
        elif config.sge_read_qstat:
            request = parse_value(qstat_conda_env(job_id, config))
        else:
            request = Request()
        folder = None
        if os.geteuid() == 0:  # a root@ prolog: the root-made job folder and the node store
            folder = JobDir(config.staging_dir, config.state_dir,
                            f"{job_id}.{task}" if task else job_id)
            workdir = folder.path
        elif not tmpdir or not os.path.isabs(tmpdir) or not tmpdir.isprintable() or ":" in tmpdir:
            raise NotAJob(f"no usable TMPDIR for SGE job {job_id}: {tmpdir!r}")
        else:  # a job-owner prolog: private copies in the job's own TMPDIR
            workdir = Path(tmpdir) / "conda-stage"
        return Job(scheduler=cls.name, job_id=job_id, task_id=task, account=account,
                   request=request, workdir=workdir, folder=folder,
                   node=v["node"] or "", spool_dir=spool, environ=_conda_vars(environ))

    @staticmethod
    def hold(job: Job, reason: str, log) -> int:
        print("conda-stage: holding the job (error state; 'qmod -cj' reruns it after a fix)",
              flush=True)
        log.warning(f"{job.label}: holding the job (on_error = hold): {reason}")
        return 100


    command = "qstat"

    @staticmethod
    def is_alive(job_id: str, config: Config | None = None) -> bool:
        """Whether SGE still knows ``job_id`` (any of its tasks)."""
        config = config or Config()
        env = {"PATH": os.environ.get("PATH", ""), "SGE_ROOT": config.sge_root,
               "SGE_CELL": config.sge_cell, "LC_ALL": "C"}
        try:
            r = subprocess.run(["qstat", "-j", job_id], capture_output=True, text=True,
                               timeout=60, env=env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise StageError(f"Cannot ask SGE about job {job_id}: {exc}") from None
        if r.returncode == 0:
            return True
        if "do not exist" in r.stdout + r.stderr:
            return False
        raise StageError(f"Cannot ask SGE about job {job_id}: {(r.stderr or r.stdout).strip()}")


def shepherd_spool_dir() -> Path:
    """The active-job spool folder of the ``sge_shepherd`` this hook runs
    under: the shepherd's working folder (execd starts it there).  Taken
    from the process tree, which a job owner cannot forge, not from
    ``SGE_JOB_SPOOL_DIR``, which ``qsub -v`` can."""
    import psutil

    proc = psutil.Process(os.getpid())
    for _ in range(8):
        proc = proc.parent()
        if proc is None:
            break
        try:
            if proc.name() == "sge_shepherd" and proc.uids().real == 0:
                spool = Path(proc.cwd())
                st = os.stat(spool)
                if st.st_mode & 0o022:
                    raise NotAJob(f"{spool} is writable by others")
                return spool
        except psutil.Error:
            continue
    raise NotAJob("no sge_shepherd above this hook: not running as an SGE root prolog/epilog")


def read_spool_config(spool: Path) -> dict[str, str]:
    """``key=value`` lines of ``<spool>/config`` (execd's, bounded)."""
    conf: dict[str, str] = {}
    fd = os.open(spool / "config", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(1 << 20)
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            conf[key] = value
    return conf


def qstat_conda_env(job_id: str, config: Config) -> str | None:
    """The ``conda_env`` value of a job's hard resource list (no-JSV setups)."""
    env = {"PATH": os.environ.get("PATH", ""), "SGE_ROOT": config.sge_root,
           "SGE_CELL": config.sge_cell, "LC_ALL": "C"}
    try:
        out = subprocess.run(["qstat", "-j", job_id], capture_output=True, text=True,
                             timeout=30, env=env).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        if line.startswith("hard resource_list:"):
            for item in line.split(":", 1)[1].strip().split(","):
                key, _, value = item.partition("=")
                if key.strip() in ("conda_env", "conda"):
                    return value.strip()
    return None


ADAPTERS = {"slurm": SlurmAdapter, "sge": SgeAdapter}


def node_is_running(config: Config):
    """``is_alive(job_id, scheduler=None)`` asking the scheduler that ran the
    job, or, when that is not known, the schedulers this node has (their
    command is on PATH) that answer: a job runs if one of them says so.
    An error when none can answer: gc then keeps what it cannot judge."""
    import shutil

    present = {name: a for name, a in ADAPTERS.items() if shutil.which(a.command)}
    if not present:
        raise StageError("neither squeue nor qstat is on PATH: cannot tell which jobs run")

    def is_alive(job_id: str, scheduler: str | None = None) -> bool:
        if scheduler in present:
            return present[scheduler].is_alive(job_id, config)
        # Not known whose job it is: the schedulers that answer decide (a
        # node runs one; an installed but stopped one does not count).
        answers, problems = [], []
        for adapter in present.values():
            try:
                answers.append(adapter.is_alive(job_id, config))
            except StageError as exc:
                problems.append(str(exc))
        if not answers:
            raise StageError("; ".join(problems))
        return any(answers)

    return is_alive
