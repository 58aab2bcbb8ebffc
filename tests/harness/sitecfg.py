"""The site settings file the scheduler hooks read (/etc/default/conda-stage),
written by tests and restored afterwards."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

DEFAULTS = Path("/etc/default/conda-stage")


def hook_python() -> str:
    """The interpreter of the installation under test (world-readable venv)."""
    return str(Path(sys.prefix) / "bin" / "python")


@contextmanager
def site_defaults(**settings):
    """Write ``CONDA_STAGE_<KEY>=value`` lines (plus CONDA_STAGE_PYTHON) for the
    duration of the block; ``update(**more)`` on the yielded object rewrites it."""
    saved = DEFAULTS.read_bytes() if DEFAULTS.exists() else None
    current = {"python": hook_python(), **settings}

    def write():
        lines = [f"CONDA_STAGE_{k.upper()}={v}" for k, v in current.items()]
        DEFAULTS.parent.mkdir(parents=True, exist_ok=True)
        tmp = DEFAULTS.with_name(DEFAULTS.name + ".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, DEFAULTS)

    class Handle:
        values = current

        @staticmethod
        def update(**more):
            current.update(more)
            write()

    write()
    try:
        yield Handle
    finally:
        if saved is None:
            DEFAULTS.unlink(missing_ok=True)
        else:
            DEFAULTS.write_bytes(saved)


ROOT = Path(__file__).resolve().parents[2]


def slurm_hook_files(slurm_cluster) -> dict[str, str]:
    """The shipped Prolog, TaskProlog and Epilog installed on ``slurm_cluster``:
    keywords of its ``hooks_configured``."""
    return {
        "prolog": str(slurm_cluster.install_file(ROOT / "prolog" / "slurm-prolog")),
        "task_prolog": str(slurm_cluster.install_file(ROOT / "prolog" / "slurm-task-prolog")),
        "epilog": str(slurm_cluster.install_file(ROOT / "epilog" / "slurm-epilog")),
    }


def sge_hook_files(sge_cluster) -> dict[str, Path]:
    """The shipped prolog and epilog installed on ``sge_cluster``, by name
    (``sge-prolog``, ``sge-epilog``)."""
    return {name: sge_cluster.install_file(ROOT / sub / name)
            for sub, name in (("prolog", "sge-prolog"), ("epilog", "sge-epilog"))}


@contextmanager
def slurm_hooks(slurm_cluster, **settings):
    """The shipped Prolog, TaskProlog and Epilog installed on ``slurm_cluster``
    (``PrologFlags=Alloc``) with the site settings ``settings``; the cluster's
    ``defaults`` handle rewrites them."""
    hooks = slurm_hook_files(slurm_cluster)
    with site_defaults(**settings) as defaults:
        with slurm_cluster.hooks_configured(**hooks, prolog_flags="Alloc"):
            slurm_cluster.defaults = defaults
            yield slurm_cluster


def store_listing(folder: Path) -> list[str]:
    """What is in a staging or state folder, the node store's empty ``users``
    folder aside (made once, it stays)."""
    folder = Path(folder)
    if not folder.exists():
        return []
    found = os.listdir(folder)
    if "users" in found and not os.listdir(folder / "users"):
        found.remove("users")
    return found


def store_copy(staging: Path, name: str) -> str:
    """The pattern of a shared copy's path in the node store under ``staging``."""
    import re

    return rf"{re.escape(str(staging))}/users/\d+/[0-9a-f]{{16}}/{re.escape(name)}"
