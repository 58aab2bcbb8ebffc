"""One view of a batch job, whatever the scheduler.

Each scheduler adapter maps *its* environment variables onto :class:`Job`
through a declarative table; nothing else in conda-stage reads scheduler
variables.  The prolog/epilog logic (``jobstage``) is written once against
this view.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .config import Config
from .privileges import Account
from .request import Request, parse_text, parse_value


@dataclass
class Job:
    scheduler: str
    job_id: str
    task_id: str | None
    account: Account
    request: Request
    workdir: Path  # node-local folder for this job's staged copies
    workdir_owned_by_root: bool  # created (and finally removed) by the root hook
    node: str = ""
    tmpdir: Path | None = None
    spool_dir: Path | None = None
    environ: dict = field(default_factory=dict)  # job variables relevant to conda

    @property
    def label(self) -> str:
        task = f".{self.task_id}" if self.task_id else ""
        return f"{self.scheduler} job {self.job_id}{task} ({self.account.name})"

    @property
    def envs_dir(self) -> Path:
        return self.workdir / "envs"


# Job variables that influence how conda finds environments by name.
CONDA_VARS = ("CONDA_ENVS_PATH", "CONDA_ENVS_DIRS", "CONDARC", "CONDA_EXE",
              "CONDA_ROOT_PREFIX", "CONDA_ROOT", "XDG_CONFIG_HOME")


class SlurmAdapter:
    _env = {
        "job_id": "SLURM_JOB_ID",
        "uid": "SLURM_JOB_UID",
        "gid": "SLURM_JOB_GID",
        "user": "SLURM_JOB_USER",
        "comment": "SLURM_JOB_COMMENT",
        "extra": "SLURM_JOB_EXTRA",
        "node": "SLURMD_NODENAME",
    }

    @classmethod
    def job(cls, environ: Mapping[str, str], config: Config) -> Job:
        v = {key: environ.get(var) for key, var in cls._env.items()}
        if not v["job_id"]:
            raise KeyError("SLURM_JOB_ID is not set: not running as a Slurm hook")
        if v["uid"] is not None:
            account = Account.lookup(uid=int(v["uid"]), gid=v["gid"])
        else:  # TaskProlog: runs as the job user
            account = Account.lookup(uid=os.getuid(), gid=os.getgid())
        return Job(
            scheduler="slurm", job_id=v["job_id"], task_id=None, account=account,
            request=parse_text(v["comment"], v["extra"]),
            workdir=Path(config.staging_dir) / v["job_id"], workdir_owned_by_root=True,
            node=v["node"] or "",
            environ={k: environ[k] for k in CONDA_VARS if environ.get(k)})


class SgeAdapter:
    _env = {
        "job_id": "JOB_ID",
        "task_id": "SGE_TASK_ID",
        "user": "USER",
        "envs": "CONDA_STAGE_ENVS",
        "spool": "SGE_JOB_SPOOL_DIR",
        "tmpdir": "TMPDIR",
        "tmp": "TMP",
        "node": "HOSTNAME",
    }

    @classmethod
    def job(cls, environ: Mapping[str, str], config: Config) -> Job:
        v = {key: environ.get(var) for key, var in cls._env.items()}
        if not v["job_id"]:
            raise KeyError("JOB_ID is not set: not running as an SGE prolog/epilog")
        spool = Path(v["spool"]) if v["spool"] else None
        spool_conf = _read_spool_config(spool)
        owner = spool_conf.get("job_owner") or v["user"]
        account = Account.lookup(user=owner)
        # A root prolog loses TMPDIR (glibc secure-exec); TMP survives.
        tmpdir = v["tmpdir"] or v["tmp"] or spool_conf.get("tmpdir")
        if v["envs"] is not None:
            request = parse_value(v["envs"])
        elif config.sge_read_qstat:
            request = parse_value(_qstat_conda_env(v["job_id"]))
        else:
            request = Request()
        task = v["task_id"] if v["task_id"] not in (None, "", "undefined") else None
        return Job(
            scheduler="sge", job_id=v["job_id"], task_id=task, account=account,
            request=request,
            workdir=Path(tmpdir) / "conda-stage" if tmpdir else Path("/nonexistent"),
            workdir_owned_by_root=False, node=v["node"] or "",
            tmpdir=Path(tmpdir) if tmpdir else None, spool_dir=spool,
            environ={k: environ[k] for k in CONDA_VARS if environ.get(k)})


def _read_spool_config(spool: Path | None) -> dict[str, str]:
    conf: dict[str, str] = {}
    if spool is None:
        return conf
    try:
        with open(spool / "config", errors="replace") as fh:
            for line in fh:
                key, sep, value = line.rstrip("\n").partition("=")
                if sep:
                    conf[key] = value
    except OSError:
        pass
    return conf


def _qstat_conda_env(job_id: str) -> str | None:
    """The ``conda_env`` value of a job's hard resource list (no-JSV setups)."""
    try:
        out = subprocess.run(["qstat", "-j", job_id], capture_output=True, text=True,
                             timeout=30).stdout
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
