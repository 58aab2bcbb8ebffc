"""SGE specifics that the Job view cannot hide: handing variables to the job.

The shepherd reads the job's environment from ``<spool>/environment`` when
it starts each child (prolog, job, epilog), so a root prolog that rewrites
that file sets variables in the job it precedes -- the SGE counterpart of a
Slurm TaskProlog's ``export`` lines.  The file holds one ``NAME=value`` per
line and has no escapes: a value with a newline or another control
character would add lines of its own, so such values are refused, never
written.  The spool folder comes from the process tree (see
:func:`conda_stage.job.shepherd_spool_dir`) and is worked on through a
directory file descriptor.
"""
from __future__ import annotations

import os
import stat

from .job import Job
from .jobdir import one_line

_MAX_ENV_FILE = 8 << 20


def env_file_line(name: str, value: str) -> str:
    """``NAME=value`` for the environment file; ValueError if it cannot be
    written as exactly one line."""
    if not name.replace("_", "").isalnum() or not value.isprintable():
        raise ValueError(f"{name}={value!r} cannot be written as one line")
    return f"{name}={value}"


def export_to_job(job: Job, variables: dict[str, str], log) -> bool:
    if job.spool_dir is None:
        log.warning(f"{job.label}: no spool folder; cannot pass {', '.join(variables)} to the job")
        return False
    try:
        new = [env_file_line(k, v) for k, v in variables.items()]
    except ValueError as exc:
        log.error(f"{job.label}: not passing variables to the job: {one_line(exc)}")
        return False
    try:
        spool = os.open(job.spool_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        log.warning(f"{job.label}: cannot open {job.spool_dir}: {exc.strerror}")
        return False
    tmp = f".environment.conda-stage.{os.getpid()}"
    try:
        fd = os.open("environment", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=spool)
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise OSError(0, "not a regular file")
            data = fh.read(_MAX_ENV_FILE + 1)
        if len(data) > _MAX_ENV_FILE:
            raise OSError(0, "larger than expected")
        lines = data.decode("utf-8", "surrogateescape").splitlines()
        keep = [ln for ln in lines if ln.partition("=")[0] not in variables]
        text = "\n".join(keep + new) + "\n"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600, dir_fd=spool)
        with os.fdopen(out, "wb") as fh:
            fh.write(text.encode("utf-8", "surrogateescape"))
            os.fchown(fh.fileno(), st.st_uid, st.st_gid)
            os.fchmod(fh.fileno(), stat.S_IMODE(st.st_mode))
        os.replace(tmp, "environment", src_dir_fd=spool, dst_dir_fd=spool)
    except OSError as exc:
        try:
            os.unlink(tmp, dir_fd=spool)
        except OSError:
            pass
        log.warning(f"{job.label}: cannot pass {', '.join(variables)} to the job "
                    f"({job.spool_dir}/environment: {exc.strerror or exc}); run the prolog as root@")
        return False
    finally:
        os.close(spool)
    return True
