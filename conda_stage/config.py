"""Site settings of the scheduler hooks: ``/etc/default/conda-stage`` only.

The hooks run as root with an environment the job's owner partly controls
(SGE hands ``qsub -v`` variables to ``root@`` prologs), so settings come
from one file at a fixed path and nowhere else -- no environment variable
overrides it, none names another file.  The file is trusted only when it
and every folder above it are owned by root and not writable by group or
others (sshd's StrictModes rule); otherwise the hooks stage nothing and say
why (``conda-stage doctor`` shows it too).  The file holds shell-style
``CONDA_STAGE_<SETTING>=value`` lines; it is parsed, never sourced.
``examples/admin/conda-stage.defaults`` documents every setting.
"""
from __future__ import annotations

import os
import shlex
import stat
from dataclasses import dataclass, fields

from .errors import StageError, UsageError

SITE_FILE = "/etc/default/conda-stage"
_MAX_SITE_FILE = 64 << 10


class UntrustedSettings(StageError):
    """The site file (or a folder above it) could be changed by a non-root user."""


@dataclass
class Config:
    # Python of the conda-stage installation; the hook wrappers run it.  Job
    # users must be able to run it too (Slurm's TaskProlog runs as the user).
    python: str = "/opt/conda-stage/bin/python"
    # Node-local folder for Slurm jobs' staged copies: <staging_dir>/<job id>.
    # Created by the root prolog, which refuses it unless it is root-owned and
    # not writable by others.  Keep it short: the copy's path must fit
    # conda's 255-byte binary placeholders.
    staging_dir: str = "/var/lib/conda-stage/jobs"
    # Root-only folder for the hooks' small state (what each job was told).
    state_dir: str = "/run/conda-stage"
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
    # A user's jobs on a node share one read-only copy of an environment
    # (same tarball): an array job extracts once per node.  "no": every job
    # gets a private copy in its own folder.
    share_copies: bool = True
    # Seconds a shared copy nobody holds is kept for the user's next job (an
    # array's next wave); 0 removes it with its last job.  gc removes it after.
    keep_unused: float = 300.0
    # Unused copies may take at most this share of the staging filesystem;
    # beyond it the least recently used go first.
    keep_share: float = 0.25
    # How a prolog stages: "image" mounts the environment's squashfs image
    # (conda stage --pack --image) with squashfuse_ll as the job user,
    # "extract" unpacks the tarball, "auto" mounts when there is an image
    # and FUSE works, else extracts.  Each fallback is one line in the job.
    stage_mode: str = "auto"
    # Image mode: copy the image to the local disk before mounting it (one
    # sequential read); "no" mounts it where it is, on the shared filesystem.
    image_copy: bool = True
    # Interactive 'conda activate' mounts an environment's image too (stage_mode
    # auto or image), at the path jobs mount it, in the user's folder
    # <staging_dir>/users/<uid>: the hooks then keep <staging_dir>/users
    # sticky and writable by all (mode 1733), so that a shell can make its
    # user's folder where no job made it.  A folder someone else made first is
    # not used (the shell extracts, and says so); the user's next prolog on
    # the node replaces it.
    shell_images: bool = False
    # Seconds a prolog may spend staging, all environments together; what is
    # not staged by then is skipped and the job runs without it.
    prolog_budget: float = 120.0
    # Seconds an epilog may spend removing a job's folder; what is left then
    # (millions of files a job left behind) is 'conda-stage gc --jobs' work.
    epilog_budget: float = 120.0
    # SGE without the JSV: read the conda_env request with 'qstat -j' (one
    # qstat call per job, also for jobs that request nothing).
    sge_read_qstat: bool = False
    # SGE installation, for 'qstat' (never taken from the job's environment).
    sge_root: str = "/var/lib/gridengine"
    sge_cell: str = "default"

    @classmethod
    def load(cls, path: str = SITE_FILE) -> "Config":
        """The site settings; defaults when the file does not exist.  Raises
        :class:`UntrustedSettings` when it exists but is not safe to trust,
        :class:`UsageError` when a line is malformed."""
        text = read_trusted(path)
        values = parse_defaults(text, path) if text is not None else {}
        config = cls()
        for f in fields(cls):
            raw = values.get("CONDA_STAGE_" + f.name.upper())
            if raw is not None:
                setattr(config, f.name, _convert(f.type, f.name, raw.strip()))
        if config.on_error not in ("continue", "hold"):
            raise UsageError(f"CONDA_STAGE_ON_ERROR must be 'continue' or 'hold', "
                             f"not {config.on_error!r}")
        for name in ("python", "staging_dir", "state_dir", "log_file", "conda_root", "sge_root"):
            value = getattr(config, name)
            if value and (not os.path.isabs(value) or not value.isprintable()):
                raise UsageError(f"CONDA_STAGE_{name.upper()} must be an absolute path, "
                                 f"not {value!r}")
        if config.stage_mode not in ("auto", "image", "extract"):
            raise UsageError(f"CONDA_STAGE_STAGE_MODE must be auto, image or extract, "
                             f"not {config.stage_mode!r}")
        if config.keep_unused < 0 or not 0 <= config.keep_share <= 1:
            raise UsageError("CONDA_STAGE_KEEP_UNUSED must be >= 0 seconds and "
                             "CONDA_STAGE_KEEP_SHARE a fraction between 0 and 1")
        if min(config.prolog_budget, config.epilog_budget) <= 0 or config.lock_timeout < 0:
            raise UsageError("CONDA_STAGE_PROLOG_BUDGET, CONDA_STAGE_EPILOG_BUDGET and "
                             "CONDA_STAGE_LOCK_TIMEOUT must be positive numbers of seconds")
        return config


def trust_problem(path: str) -> str | None:
    """Why ``path`` (a file that may not exist) cannot be trusted as root's
    input, or None.  Every folder from ``/`` down and the file itself must
    be owned by root, not writable by group or others (a sticky folder
    above it may be), and not a symlink."""
    path = os.path.abspath(path)
    parts = path.strip("/").split("/")
    current = "/"
    for i, part in enumerate([""] + parts):
        current = os.path.join(current, part) if part else "/"
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return None  # nothing below a missing folder can exist either
        except OSError as exc:
            return f"cannot check {current}: {exc.strerror}"
        last = i == len(parts)
        if stat.S_ISLNK(st.st_mode):
            return f"{current} is a symlink"
        if not last and not stat.S_ISDIR(st.st_mode):
            return f"{current} is not a folder"
        if last and not stat.S_ISREG(st.st_mode):
            return f"{current} is not a regular file"
        if st.st_uid != 0:
            return f"{current} is owned by uid {st.st_uid}, not root"
        # A sticky folder (/tmp) above is fine: only root renames root's entries.
        if st.st_mode & 0o022 and (last or not st.st_mode & stat.S_ISVTX):
            return f"{current} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def read_trusted(path: str) -> str | None:
    """The text of a root-only file, or None if it does not exist."""
    problem = trust_problem(path)
    if problem is not None:
        raise UntrustedSettings(f"not using {path}: {problem}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UntrustedSettings(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            raise UntrustedSettings(f"not using {path}: it changed while being checked")
        data = fh.read(_MAX_SITE_FILE + 1)
    if len(data) > _MAX_SITE_FILE:
        raise UsageError(f"{path} is larger than {_MAX_SITE_FILE} bytes")
    return data.decode("utf-8", "replace")


def parse_defaults(text: str, path: str = SITE_FILE) -> dict[str, str]:
    """``KEY=value`` lines of a shell defaults file (comments, quotes and a
    leading ``export`` allowed; no expansions)."""
    values: dict[str, str] = {}
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
