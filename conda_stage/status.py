"""``conda-stage status``: what conda-stage knows about an environment."""
from __future__ import annotations

import os
import time
from pathlib import Path

from . import output
from .autostage import is_enabled
from .resolve import Env
from .store import find_copies, owner_alive, staging_base
from .tarball import Tarball


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def status_lines(env: Env, base: Path | None = None) -> list[str]:
    lines = [f"Environment:  {env.prefix}",
             f"Auto-staging: {'enabled' if is_enabled(env.prefix) else 'disabled'}"]
    tarball, side = Tarball.load(env)  # the sidecar, read once
    try:
        side = side.check(os.stat(tarball.path))
    except OSError:
        side = side.check(None)
    meta = side.meta
    if meta is None:
        if side.malformed:
            state = f"{tarball.path} ({side.stale_reason(env)})"
        elif not tarball.path.exists():
            state = "none"
        else:
            state = f"{tarball.path} (no valid metadata: {side.problem})"
        lines.append(f"Tarball:      {state}")
    else:
        reason = side.stale_reason(env)
        freshness = "fresh" if reason is None else f"stale: {reason}"
        age = _age(time.time() - meta.mtime_ns / 1e9)
        lines.append(f"Tarball:      {output.describe_file(tarball.path)}")
        lines.append(f"              {meta.format}, {meta.files} files, "
                     f"{meta.unpacked_bytes / 1e6:.1f} MB unpacked, packed {age} ago "
                     f"in {meta.pack_seconds:.1f} s; {freshness}")
    copies = [(p, m) for p, m in find_copies(base or staging_base())
              if m.original == str(env.prefix)]
    if not copies:
        lines.append("Staged:       no copies in " + str(base or staging_base()))
    for path, marker in copies:
        alive = "alive" if owner_alive(marker) else "gone: 'conda-stage gc' removes it"
        lines.append(f"Staged:       {path} (shell {marker.owner_pid}, {alive})")
    return lines
