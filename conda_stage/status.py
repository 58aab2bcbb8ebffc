"""``conda-stage status``: what conda-stage knows about an environment."""
from __future__ import annotations

import os
import time
from pathlib import Path

from . import output
from .autostage import is_enabled
from .resolve import Env
from .store import find_copies, live_holders, staging_base
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
    lines.append(f"Image:        {_image_state(env, tarball.path)}")
    mounted = _image_mount(env)
    if mounted:
        lines.append(f"Mounted:      {mounted}")
    copies = [(p, m) for p, m in find_copies(base or staging_base())
              if m.original == str(env.prefix)]
    if not copies:
        lines.append("Staged:       no copies in " + str(base or staging_base()))
    for path, marker in copies:
        holders = live_holders(path, marker)
        held = (f"held by shell {', '.join(map(str, holders))}" if holders
                else "its shells are gone: 'conda-stage gc' removes it")
        lines.append(f"Staged:       {path} ({held})")
    return lines


def _image_state(env: Env, tarball_path: Path) -> str:
    """The image's line: none, or its file, size, mount path and whether
    jobs can use it with the current tarball."""
    from .image import Image, has_image

    if not has_image(env):
        return "none (jobs extract the tarball; 'conda stage --pack --image' builds one)"
    image = Image(env)
    meta = image.read_meta()
    if meta is None:
        return f"{image.path} (no valid sidecar: rebuild it with 'conda stage --pack --image')"
    try:
        why = image.usable(os.stat(tarball_path), meta.mount_prefix, meta)
    except OSError:
        why = "there is no tarball"
    state = "current" if why is None else f"not used: {why}"
    return (f"{image.path} ({meta.size / 1e6:.1f} MB, mounted by jobs at "
            f"{output.printable(meta.mount_prefix)}); {state}")


def _image_mount(env: Env) -> str | None:
    """Where the image is mounted on this node, and who holds it (shells by
    PID, a job), if it is."""
    from .image import Image, has_image

    if not has_image(env):
        return None
    meta = Image(env).read_meta()
    if meta is None or not os.path.ismount(meta.mount_prefix):
        return None
    from .shellimage import JOB_CLAIM, shell_holders

    folder = Path(meta.mount_prefix).parent
    who = [f"shell {', '.join(map(str, pids))}" for pids in [shell_holders(folder)] if pids]
    if os.path.lexists(folder / JOB_CLAIM):
        who.append("a job")
    return f"{meta.mount_prefix} ({'held by ' + ' and '.join(who) if who else 'held by nobody'})"


def node_status(*, as_json: bool = False) -> str:
    """The shared copies on this node: root sees every user's, a user their
    own (their records are readable to them, not listable by others)."""
    import json
    import pwd

    from .config import Config
    from .nodestore import NodeStore

    config = Config.load()
    store = NodeStore.from_config(config)
    uids = store.uids() if os.geteuid() == 0 else [os.getuid()]
    now = time.time()
    copies = []
    for uid in uids:
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = str(uid)
        for rec in store.records(uid):
            copies.append({"user": user, "uid": uid, "name": rec.name, "path": rec.path,
                           "original": rec.original, "jobs": sorted(rec.holders),
                           "bytes": rec.bytes, "files": rec.files,
                           "age_seconds": round(now - rec.created, 1),
                           "unused_seconds": 0.0 if rec.holders else round(rec.age(now), 1)})
    if as_json:
        return json.dumps({"staging_dir": config.staging_dir, "keep_unused": config.keep_unused,
                           "copies": copies}, indent=1)
    if not copies:
        return f"No shared copies in {config.staging_dir}"
    lines = [f"Shared copies in {config.staging_dir} (kept {config.keep_unused:.0f} s "
             f"after their last job):"]
    for c in copies:
        held = (f"held by {len(c['jobs'])} job(s): {', '.join(c['jobs'])}" if c["jobs"]
                else f"unused for {_age(c['unused_seconds'])}")
        lines.append(f"  {c['path']}  {c['user']}  {c['bytes'] / 1e6:.1f} MB  "
                     f"{c['files']} files  age {_age(c['age_seconds'])}  {held}")
        lines.append(f"      of {c['original']}")
    return "\n".join(lines)
