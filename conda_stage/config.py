"""Site settings for the scheduler hooks.

One file, ``/etc/default/conda-stage`` (or ``$CONDA_STAGE_DEFAULTS``), of
shell-style ``CONDA_STAGE_<SETTING>=value`` lines: the thin hook wrappers
source it (so their fast paths and Python agree), and this module parses it.
Variables of the same names in the environment take precedence.  Missing
file: the safe defaults below.  ``examples/admin/conda-stage.defaults``
documents every setting.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, fields

from .errors import UsageError

DEFAULTS_FILE = "/etc/default/conda-stage"


@dataclass
class Config:
    # Node-local folder for Slurm jobs' staged copies: <staging_dir>/<job id>.
    # Keep it short: the copy's path must fit conda's 255-byte binary placeholders.
    staging_dir: str = "/tmp/conda-stage-jobs"
    # When a declared environment cannot be staged (a user mistake or a
    # failure): "continue" runs the job unstaged and says why; "hold" holds
    # the job (Slurm: scontrol requeuehold; SGE: prolog exit 100 -> Eqw).
    on_error: str = "continue"
    # Log file for the hooks (empty: none); syslog (daemon facility) too.
    log_file: str = ""
    syslog: bool = True
    # The conda installation's root prefix: its envs/ folder is searched for
    # environment names (hooks do not see the user's conda variables).
    conda_root: str = ""
    # Slurm TaskProlog also exports TMPDIR=<job folder>/tmp.
    set_tmpdir: bool = False
    # Seconds to wait for a lock held by another process packing the same
    # environment (a prolog never packs: it only reads the tarball).
    lock_timeout: float = 600.0
    # SGE without the JSV: read the conda_env request with 'qstat -j' (one
    # qstat call per job, also for jobs that request nothing).
    sge_read_qstat: bool = False

    @classmethod
    def load(cls, environ=None) -> "Config":
        environ = os.environ if environ is None else environ
        path = environ.get("CONDA_STAGE_DEFAULTS") or DEFAULTS_FILE
        values = read_defaults(path)
        values.update({k: v for k, v in environ.items() if k.startswith("CONDA_STAGE_")})
        config = cls()
        for f in fields(cls):
            raw = values.get("CONDA_STAGE_" + f.name.upper())
            if raw is not None:
                setattr(config, f.name, _convert(f.type, f.name, raw.strip()))
        if config.on_error not in ("continue", "hold"):
            raise UsageError(f"CONDA_STAGE_ON_ERROR must be 'continue' or 'hold', "
                             f"not {config.on_error!r}")
        return config


def read_defaults(path: str) -> dict[str, str]:
    """``KEY=value`` lines of a shell defaults file (comments, quotes and a
    leading ``export`` allowed; no expansions)."""
    values: dict[str, str] = {}
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError:
        return values
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].strip()
        key, sep, raw = line.partition("=")
        if not sep or not key.replace("_", "").isalnum():
            raise UsageError(f"{path}:{number}: expected KEY=value, got {line!r}")
        try:
            parts = shlex.split(raw, comments=True)
        except ValueError as exc:
            raise UsageError(f"{path}:{number}: {exc}") from None
        values[key] = parts[0] if parts else ""
    return values


def _convert(kind, key: str, raw: str):
    kind = kind if isinstance(kind, str) else kind.__name__
    if kind == "bool":
        lowered = raw.lower()
        if lowered in ("1", "yes", "true", "on"):
            return True
        if lowered in ("0", "no", "false", "off", ""):
            return False
        raise UsageError(f"CONDA_STAGE_{key.upper()} must be yes or no, not {raw!r}")
    if kind == "float":
        try:
            return float(raw)
        except ValueError:
            raise UsageError(f"CONDA_STAGE_{key.upper()} must be a number, not {raw!r}") from None
    return raw
