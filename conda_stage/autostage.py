"""Enable or disable automatic staging of an environment.

Enabling puts two hook scripts into the ORIGINAL environment (conda sources
``activate.d``/``deactivate.d`` scripts in sorted order on activation and in
reverse order on deactivation, hence the ``zzz``/``000`` names), records the
``conda-stage`` executable and options in ``etc/conda-stage/auto-stage.conf``,
and packs the environment once (with ``image``, its squashfs image too; an
environment that has an image keeps it current).  Disabling removes all of
it, tarball and image included.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from . import output
from .errors import StageError
from .locking import file_lock
from .resolve import Env
from .stage import ACTIVATE_HOOK, DEACTIVATE_HOOK
from .store import is_staged_copy
from .tarball import Tarball, atomic_write
from .userfiles import read_bounded

CONF = "etc/conda-stage/auto-stage.conf"
_HOOK_SOURCES = {ACTIVATE_HOOK: "activate-hook.sh", DEACTIVATE_HOOK: "deactivate-hook.sh"}


def is_enabled(prefix: Path) -> bool:
    return (Path(prefix) / ACTIVATE_HOOK).is_file()


CONF_LIMIT = 64 << 10


def read_conf(prefix: Path) -> dict[str, str]:
    """The auto-staging settings of the environment at ``prefix`` ({} when
    it has none or they cannot be read).  A settings file that is not a
    regular file or is absurdly large is refused with a StageError."""
    conf: dict[str, str] = {}
    try:
        raw = read_bounded(Path(prefix) / CONF, CONF_LIMIT, what="auto-staging settings")
    except OSError:
        return conf
    text = raw.decode("utf-8", "replace")
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            conf[key.strip()] = value.strip()
    return conf


def _executable() -> str:
    argv0 = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(argv0) == "conda-stage" and os.access(argv0, os.X_OK):
        return argv0
    return shutil.which("conda-stage") or ""


def _check_allowed(env: Env, environ) -> None:
    if is_staged_copy(env.prefix):
        raise StageError("Cannot configure auto-staging of a staged environment; "
                         "call 'conda deactivate' and name the original environment")
    is_base = (env.prefix / "condabin").is_dir() or env.name == "base"
    if is_base and environ.get("CONDA_STAGE_ALLOW_BASE", "").lower() != "true":
        raise StageError("The 'base' Conda environment should not be staged; "
                         "set CONDA_STAGE_ALLOW_BASE=true to do it anyway")


def enable(env: Env, *, quiet: bool = False, writable: bool = False,
           fmt: str | None = None, image: bool = False, environ=None) -> None:
    environ = os.environ if environ is None else environ
    _check_allowed(env, environ)
    output.info("Configuring automatic staging and unstaging of original Conda environment  ...")
    if not os.access(env.prefix, os.W_OK):
        raise StageError(f"Cannot write to {env.prefix}; auto-staging must be enabled by its owner")
    from importlib import resources  # not at the top: ~15 ms of every --stage

    replaced = False
    for target, source in _HOOK_SOURCES.items():
        data = resources.files("conda_stage").joinpath("shell", source).read_bytes()
        path = env.prefix / target
        path.parent.mkdir(parents=True, exist_ok=True)
        replaced |= path.is_file() and _read_or_none(path) != data
        atomic_write(path, data)
    conf = env.prefix / CONF
    conf.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"exe={_executable()}", f"quiet={int(quiet)}", f"writable={int(writable)}"]
    atomic_write(conf, ("\n".join(lines) + "\n").encode())
    if replaced:
        # Copies take their deactivate.d hook from the tarball, and the
        # tarball's fingerprint sees the hooks' names, not their contents.
        output.info("Replaced the auto-staging hooks of an earlier conda-stage; the tarball "
                    "is rebuilt so that staged copies get them too")
    from .pack import pack  # not at the top: --stage reads read_conf without packing

    pack(env, fmt=fmt, force=replaced)
    from .image import after_pack

    after_pack(env, build_image=image)
    output.info("Enabled auto-staging")
    output.info("Enabled auto-unstaging")


def disable(env: Env, *, environ=None) -> None:
    output.info("Configuring automatic staging and unstaging of original Conda environment  ...")
    if is_staged_copy(env.prefix):
        raise StageError("Cannot configure auto-staging of a staged environment; "
                         "call 'conda deactivate' and name the original environment")
    tarball = Tarball.for_env(env)
    with file_lock(tarball.lock_path, waiting=f"Waiting for another process packing {env.prefix} ..."):
        described = {p: output.describe_file(p) for p in [tarball.path] if p.exists()}
        for path in tarball.remove():
            output.info(f"Removed 'conda-pack' tarball {described.get(path, path)}")
        try:
            tarball.lock_path.unlink()
        except OSError:
            pass
    for rel in (ACTIVATE_HOOK, CONF):
        _unlink(env.prefix / rel)
    output.info("Disabled auto-staging")
    _unlink(env.prefix / DEACTIVATE_HOOK)
    try:
        (env.prefix / CONF).parent.rmdir()
    except OSError:
        pass
    output.info("Disabled auto-unstaging")


def _read_or_none(path: Path) -> bytes | None:
    try:
        return read_bounded(path, CONF_LIMIT, what="auto-staging hook")
    except (OSError, StageError):
        return None


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
