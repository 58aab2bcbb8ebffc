"""SGE specifics that the Job view cannot hide: handing variables to the job.

The shepherd reads the job's environment from ``$SGE_JOB_SPOOL_DIR/environment``
when it starts each child (prolog, job, epilog), so a root prolog that
rewrites that file sets variables in the job it precedes -- the SGE
counterpart of a Slurm TaskProlog's ``export`` lines.
"""
from __future__ import annotations

import os
import tempfile

from .job import Job


def export_to_job(job: Job, variables: dict[str, str], log) -> bool:
    if job.spool_dir is None:
        log.warning(f"{job.label}: no SGE_JOB_SPOOL_DIR; cannot pass {', '.join(variables)} to the job")
        return False
    path = job.spool_dir / "environment"
    try:
        st = os.stat(path)
        with open(path, errors="surrogateescape") as fh:
            lines = fh.read().splitlines()
        keep = [ln for ln in lines if ln.partition("=")[0] not in variables]
        keep += [f"{k}={v}" for k, v in variables.items()]
        fd, tmp = tempfile.mkstemp(prefix=".environment.", dir=job.spool_dir)
        with os.fdopen(fd, "w", errors="surrogateescape") as fh:
            fh.write("\n".join(keep) + "\n")
        os.chown(tmp, st.st_uid, st.st_gid)
        os.chmod(tmp, st.st_mode & 0o7777)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning(f"{job.label}: cannot pass {', '.join(variables)} to the job "
                    f"({path}: {exc.strerror}); run the prolog as root@")
        return False
    return True
