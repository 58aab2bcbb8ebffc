"""The hooks' log: syslog and/or a file the admin chooses.

Scheduler prolog/epilog output is invisible to users (Slurm) or goes into
the job's output (SGE); this log is where an admin finds what every hook
did, with the job id on each line.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import socket

from .config import Config


def hook_logger(config: Config) -> logging.Logger:
    logger = logging.getLogger("conda-stage")
    if logger.handlers:
        return logger
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if config.syslog and os.path.exists("/dev/log"):
        try:
            handler = logging.handlers.SysLogHandler(
                address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
            handler.setFormatter(logging.Formatter("conda-stage[%(process)d]: %(message)s"))
            logger.addHandler(handler)
        except OSError:
            pass
    if config.log_file:
        try:
            handler = logging.FileHandler(config.log_file, mode="a", delay=False)
            host = socket.gethostname()
            handler.setFormatter(logging.Formatter(
                f"%(asctime)s {host} conda-stage[%(process)d] %(levelname)s: %(message)s",
                "%Y-%m-%dT%H:%M:%S"))
            logger.addHandler(handler)
        except OSError:
            pass
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return logger
