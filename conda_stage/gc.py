"""``conda-stage gc``: remove staged copies whose shell is gone.

Mark what is in use (copies whose owning shell still runs), delete the rest.
Copies staged for batch jobs are not touched here: the epilog owns them.
"""
from __future__ import annotations

from pathlib import Path

from . import output
from .store import find_copies, owner_alive, remove_copy


def collect(base: Path, *, dry_run: bool = False) -> list[Path]:
    removed = []
    for path, marker in list(find_copies(base)):
        if marker.mode != "interactive" or owner_alive(marker):
            continue
        if dry_run:
            output.info(f"Would remove {path} (shell {marker.owner_pid} is gone)")
        else:
            output.info(f"Removing {path} (shell {marker.owner_pid} is gone)")
            remove_copy(path, marker)
        removed.append(path)
    if not removed:
        output.info(f"Nothing to collect in {base}")
    return removed
