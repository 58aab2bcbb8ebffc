"""The user's processes that still use a folder, and stopping them (run as
that user: the epilog's and gc's child, before a copy is removed).

The first pass reads ``/proc`` directly -- the real uid, the executable,
the working folder, the first arguments, the open and the mapped files of
each of the user's processes -- because it runs at every job's end and
usually finds nothing; psutil, with its guard against reused process ids,
does the stopping when there is something to stop.
"""
from __future__ import annotations

import os
from pathlib import Path

_MAPS_LIMIT = 8 << 20  # a process with a huge address space is read this far


def pids_of(uid: int) -> list[int]:
    """The processes whose real uid is ``uid`` (``/proc/PID/status``)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as fh:
                status = fh.read(4096)
            real = int(status.split(b"\nUid:", 1)[1].split(None, 1)[0])
        except (OSError, IndexError, ValueError):
            continue
        if real == uid:
            pids.append(int(entry.name))
    return pids


def _uses(pid: int, inside) -> bool:
    """Whether process ``pid`` runs from, works in, names in its first two
    arguments, or holds open a file under the folder ``inside`` tests."""
    proc = f"/proc/{pid}"
    for link in ("exe", "cwd"):
        try:
            if inside(os.readlink(f"{proc}/{link}")):
                return True
        except OSError:
            pass
    try:
        with open(f"{proc}/cmdline", "rb") as fh:
            args = fh.read(1 << 16).split(b"\0")[:2]
        if any(inside(os.fsdecode(a)) for a in args):
            return True
        fds = os.listdir(f"{proc}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if inside(os.readlink(f"{proc}/fd/{fd}")):
                return True
        except OSError:
            continue
    return _maps_inside(proc, inside)


def _maps_inside(proc: str, inside) -> bool:
    """Whether the process maps a file under the folder (a library or a
    file it mmap-ed and closed): that alone keeps a mount busy."""
    try:
        with open(f"{proc}/maps", "rb") as fh:
            maps = fh.read(_MAPS_LIMIT)
    except OSError:
        return False
    for line in maps.splitlines():
        fields = line.split(None, 5)  # address perms offset dev inode path
        if len(fields) == 6 and fields[5].startswith(b"/") and inside(
                os.fsdecode(fields[5].removesuffix(b" (deleted)"))):
            return True
    return False


def _under(folder: Path):
    root = str(folder).rstrip("/") + "/"
    return lambda path: bool(path) and (path + "/").startswith(root)


def users_of(folder: Path) -> list[int]:
    """The current user's processes (but this one and its parent) that
    use ``folder``."""
    me = {os.getpid(), os.getppid()}
    inside = _under(folder)
    return [pid for pid in pids_of(os.getuid()) if pid not in me and _uses(pid, inside)]


def terminate_processes_under(folder: Path, grace: float = 3.0) -> int:
    """Terminate this user's processes that run from, work in or hold open
    files under ``folder``; SIGKILL those still alive after ``grace`` s."""
    pids = users_of(folder)
    if not pids:  # the common case at a job's end: psutil is not even imported
        return 0
    import psutil

    victims = []
    inside = _under(folder)
    for pid in pids:
        try:
            proc = psutil.Process(pid)  # bound to this very process from here on
        except psutil.Error:
            continue
        if _uses(pid, inside):  # still it, not a new one with a reused id
            victims.append(proc)
    for proc in victims:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _gone, alive = psutil.wait_procs(victims, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)
    return len(victims)
