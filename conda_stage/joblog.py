"""The hooks' log: syslog and/or a file the admin chooses in the site file.

Scheduler prolog/epilog output is invisible to users (Slurm) or goes into
the job's output (SGE); this log is where an admin finds what every hook
did, with the job id on each line.  Messages carry user-chosen text (paths,
names), so every line is escaped to one printable line: a user cannot forge
log lines.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import stat

from .config import Config
from .jobdir import one_line


class _OneLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = one_line(record.getMessage(), 8000)
        record.args = None
        return True


def hook_logger(config: Config) -> logging.Logger:
    logger = logging.getLogger("conda-stage")
    if logger.handlers:
        return logger
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addFilter(_OneLine())
    if config.syslog and os.path.exists("/dev/log"):
        try:
            handler = logging.handlers.SysLogHandler(
                address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
            handler.setFormatter(logging.Formatter("conda-stage[%(process)d]: %(message)s"))
            logger.addHandler(handler)
        except OSError:
            pass
    if config.log_file:
        stream = _open_log(config.log_file)
        if stream is not None:
            handler = logging.StreamHandler(stream)
            host = socket.gethostname()
            handler.setFormatter(logging.Formatter(
                f"%(asctime)s {host} conda-stage[%(process)d] %(levelname)s: %(message)s",
                "%Y-%m-%dT%H:%M:%S"))
            logger.addHandler(handler)
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return logger


def _open_log(path: str):
    """The log file for appending: never through a symlink, only a regular
    file (a hook running as a user writes to it only if it may)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
