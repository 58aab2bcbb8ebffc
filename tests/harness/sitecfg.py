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
