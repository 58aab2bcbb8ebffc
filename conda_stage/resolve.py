"""Resolve an environment given by name or path, the way conda does.

A name is looked up in conda's ``envs_dirs``: ``CONDA_ENVS_DIRS`` /
``CONDA_ENVS_PATH`` first, then ``envs_dirs`` from the .condarc files (later
files in conda's search path take precedence), then ``~/.conda/envs`` and the
root prefix's ``envs/`` (the writable one first).  A path is anything with a
``/`` in it, or starting with ``.`` or ``~`` -- environments created with
``conda create -p`` are first-class.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from . import output
from .errors import EnvNotFound, StageError
from .output import printable
from .userfiles import read_bounded

# Names we accept from users and job requests.  Stricter than conda (which
# only forbids '/', ' ', ':' and '#') so that a name can never be a path,
# an option or shell syntax.
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}$")


def is_valid_name(name: str) -> bool:
    return bool(_NAME_RE.match(name)) and ".." not in name


@dataclass(frozen=True)
class Env:
    """An original (not staged) conda environment."""

    prefix: Path
    name: str

    @property
    def display(self) -> str:
        return str(self.prefix)


def looks_like_path(spec: str) -> bool:
    return "/" in spec or spec.startswith((".", "~"))


def root_prefix(environ: Mapping[str, str]) -> Path | None:
    """The conda installation's root ("base") prefix, if it can be told."""
    for var in ("CONDA_ROOT_PREFIX", "CONDA_ROOT", "MAMBA_ROOT_PREFIX"):
        if environ.get(var):
            return Path(environ[var])
    exe = environ.get("CONDA_EXE")
    if exe:
        # <root>/bin/conda or <root>/condabin/conda
        return Path(exe).resolve().parent.parent
    return None


# Bounds on reading conda's configuration: every file is a user file (the
# root prolog's child reads them as the job user), so each is read only if
# it is a regular file, up to a size; and a condarc.d folder full of files
# must not make staging read gigabytes of YAML.
CONDARC_LIMIT = 1 << 20  # bytes per file
CONDARC_TOTAL = 8 << 20  # bytes over all files
CONDARC_D_FILES = 64  # files taken from one condarc.d folder


def _condarc_files(environ: Mapping[str, str], home: Path) -> list[Path]:
    """Conda's configuration search path, lowest precedence first."""
    root = root_prefix(environ)
    xdg = environ.get("XDG_CONFIG_HOME") or str(home / ".config")
    bases = [Path("/etc/conda"), Path("/var/lib/conda")]
    if root:
        bases.append(root)
    bases += [Path(xdg) / "conda", home / ".config" / "conda", home / ".conda"]
    files: list[Path] = []
    for base in bases:
        files += [base / ".condarc", base / "condarc"]
        d = base / "condarc.d"
        try:
            names = sorted(e.name for e in os.scandir(d) if e.name.endswith((".yml", ".yaml")))
        except OSError:
            continue
        if len(names) > CONDARC_D_FILES:
            output.debug(f"reading only the first {CONDARC_D_FILES} of {len(names)} files in "
                         f"{printable(str(d))}")
            names = names[:CONDARC_D_FILES]
        files += [d / n for n in names]
    files.append(home / ".condarc")
    if environ.get("CONDA_PREFIX"):
        files += [Path(environ["CONDA_PREFIX"]) / ".condarc",
                  Path(environ["CONDA_PREFIX"]) / "condarc"]
    if environ.get("CONDARC"):
        files.append(Path(environ["CONDARC"]))
    return files


def _read_envs_dirs(path: Path, budget: list[int] | None = None) -> list[str]:
    """``envs_dirs`` of one configuration file; [] when it has none or
    cannot be used (missing, unreadable, not a regular file, too large,
    broken YAML): a bad .condarc never breaks staging.  ``budget``: a
    one-item list of the bytes still allowed to be read, decreased here."""
    limit = CONDARC_LIMIT if budget is None else min(CONDARC_LIMIT, budget[0])
    if limit <= 0:
        output.debug(f"ignoring {printable(str(path))}: the configuration files read before it "
                     f"already hold {CONDARC_TOTAL >> 20} MiB")
        return []
    try:
        raw = read_bounded(path, limit, what="conda configuration file")
    except FileNotFoundError:
        return []
    except (OSError, StageError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        output.debug(f"ignoring {printable(str(path))}: {reason}")
        return []
    if budget is not None:
        budget[0] -= len(raw)
    try:
        import yaml

        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        data = yaml.load(raw.decode("utf-8", "replace"), Loader=loader) or {}
    except Exception as exc:  # a broken .condarc must not break staging
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        output.debug(f"ignoring unreadable {printable(str(path))}: {first}")
        return []
    if not isinstance(data, dict):
        return []
    value = data.get("envs_dirs", data.get("envs_path")) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, str) and v and "\0" not in v]


_VAR_RE = re.compile(r"\$(\w+|\{[^}]*\})", re.ASCII)


def _expandvars(text: str, environ: Mapping[str, str]) -> str:
    """``os.path.expandvars`` against ``environ`` (the job's variables, not
    this process's): unknown variables are left as they are."""
    if "$" not in text:
        return text

    def sub(m: re.Match) -> str:
        name = m.group(1).strip("{}")
        return environ.get(name, m.group(0))

    return _VAR_RE.sub(sub, text)


def envs_dirs(environ: Mapping[str, str] | None = None, home: Path | None = None) -> list[Path]:
    environ = os.environ if environ is None else environ
    home = Path(home or environ.get("HOME") or Path.home())

    def expand(p: str) -> Path:
        p = _expandvars(p, environ)
        if p.startswith("~"):
            p = str(home) + p[1:]
        return Path(os.path.abspath(p))

    found: list[Path] = []
    for var in ("CONDA_ENVS_DIRS", "CONDA_ENVS_PATH"):
        found += [expand(p) for p in environ.get(var, "").split(os.pathsep) if p]
    budget = [CONDARC_TOTAL]
    for rc in reversed(_condarc_files(environ, home)):
        found += [expand(p) for p in _read_envs_dirs(rc, budget)]
    user_dir = home / ".conda" / "envs"
    root = root_prefix(environ)
    if root is not None:
        root_envs = root / "envs"
        fixed = [root_envs, user_dir] if os.access(root, os.W_OK) else [user_dir, root_envs]
    else:
        fixed = [user_dir]
    found += fixed
    unique: list[Path] = []
    for p in found:
        if p not in unique:
            unique.append(p)
    return unique


def is_conda_env(path: Path) -> bool:
    return (path / "conda-meta").is_dir()


def resolve(spec: str | None, environ: Mapping[str, str] | None = None,
            home: Path | None = None) -> Env:
    """Find the environment ``spec`` (a name or a path; None: the active one)."""
    environ = os.environ if environ is None else environ
    if not spec:
        active = environ.get("CONDA_PREFIX")
        if not active:
            raise StageError("No active Conda environment; name one "
                             "(e.g. 'conda-stage --stage myenv') or 'conda activate <name>' first")
        return _from_path(active, home, environ)
    if looks_like_path(spec):
        return _from_path(spec, home, environ)
    if not is_valid_name(spec):
        raise EnvNotFound(f"Not a valid Conda environment name: {spec!r}")
    if spec == "base":
        root = root_prefix(environ)
        if root is None:
            raise EnvNotFound("Cannot tell where the 'base' environment is "
                              "(CONDA_EXE is not set); give its path instead")
        return Env(root, "base")
    dirs = envs_dirs(environ, home)
    for d in dirs:
        candidate = d / spec
        if is_conda_env(candidate):
            return Env(Path(os.path.abspath(candidate)), spec)
    where = ", ".join(str(d) for d in dirs)
    raise EnvNotFound(f"Conda environment '{spec}' not found (looked in: {where})")


def _from_path(spec: str, home: Path | None, environ: Mapping[str, str]) -> Env:
    if spec.startswith("~"):
        base = str(home or environ.get("HOME") or Path.home())
        spec = base + spec[1:]
    path = Path(os.path.abspath(spec))
    if not path.exists():
        raise EnvNotFound(f"No such Conda environment: {path}")
    if not is_conda_env(path):
        raise EnvNotFound(f"Not a Conda environment (no conda-meta/ folder): {path}")
    return Env(path, path.name)
