"""A cheap fingerprint of an environment's installed packages.

It changes when conda installs or removes packages (``conda-meta/*.json``
and ``conda-meta/history``), when pip installs, upgrades or removes
distributions (``*.dist-info`` / ``*.egg-info`` / ``*.pth`` names in
``site-packages``), when ``conda env config vars`` change
(``conda-meta/state``), and when activation hooks change.  It reads a handful
of directory listings and two stats -- no conda run, no file contents -- so
it is affordable on a slow shared filesystem at every activation.

Not detected: editing files inside the environment by hand, and
``pip install --force-reinstall`` of the very same version.

**The quick check.**  Packing also records, next to the fingerprint, the
``stat`` of every file and folder the fingerprint reads (:func:`quick_record`:
mtime, ctime, size, inode).  When each one is still as recorded, nothing the
fingerprint reads has changed and the listings are skipped
(:func:`is_fresh`): a few ``stat`` calls instead of a few directory reads.
A folder's ctime changes whenever an entry is added, removed or renamed in
it (and cannot be set back, unlike its mtime), but only to the granularity
of the filesystem's clock: a change in the same tick as the recorded one
would go unseen.  So, as git does with its index ("racy" entries), a stat
is recorded only if it is older than a timestamp the same filesystem gave
*before* the listings (the tarball's mtime): any later change gets a ctime
at or after it, so it differs from the recorded one.  A recent change makes
the pack record no quick check, and the full fingerprint is used.
"""
from __future__ import annotations

import os
from pathlib import Path

_PIP_SUFFIXES = (".dist-info", ".egg-info", ".egg-link", ".pth")

_FILES = ("conda-meta/history", "conda-meta/state")  # their stats are hashed
_HOOKS = ("etc/conda/activate.d", "etc/conda/deactivate.d")
# What the quick record always holds (paths relative to the prefix), then
# lib/<python*>/site-packages for each python folder the listing of lib found.
QUICK_FIXED = ("conda-meta", *_FILES, "lib", *_HOOKS)
# Entries of a quick record: the 6 above and up to 2 python* folders in lib
# (more: no quick record).  Small, so the sidecar's value-count bound holds.
MAX_QUICK = 8


def _names(path: Path, suffixes=None) -> list[str]:
    try:
        names = os.listdir(path)
    except OSError:
        return []
    if suffixes is not None:
        names = [n for n in names if n.endswith(suffixes)]
    return sorted(names)


def _stat(path: Path) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "-"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _parts(prefix: Path) -> list[tuple[str, str, list[str]]]:
    """What the fingerprint hashes, in order: (path relative to the prefix,
    label, values): the listings and the two stats."""
    meta = prefix / "conda-meta"
    parts = [("conda-meta", "conda-meta", _names(meta, (".json",))),
             (_FILES[0], "history", [_stat(meta / "history")]),
             (_FILES[1], "state", [_stat(meta / "state")])]
    for lib in _names(prefix / "lib"):
        if lib.startswith("python"):
            rel = f"lib/{lib}/site-packages"
            parts.append((rel, lib, _names(prefix / rel, _PIP_SUFFIXES)))
    for rel in _HOOKS:
        parts.append((rel, rel.rsplit("/", 1)[1], _names(prefix / rel)))
    return parts


def _digest(parts) -> str:
    import hashlib  # 4-5 ms (OpenSSL): only when a fingerprint is computed

    h = hashlib.sha256()
    for _, label, values in parts:
        h.update("\0".join((label, *values)).encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()[:32]


def fingerprint(prefix: Path) -> str:
    return _digest(_parts(Path(prefix)))


def is_quick_path(rel: str) -> bool:
    """Whether a quick record may name ``rel``: one of :data:`QUICK_FIXED`
    or ``lib/<python...>/site-packages``."""
    if rel in QUICK_FIXED:
        return True
    parts = rel.split("/")
    return (len(parts) == 3 and parts[0] == "lib" and parts[2] == "site-packages"
            and parts[1].startswith("python") and "\0" not in parts[1])


def _stat_result(st: os.stat_result) -> list[int]:
    return [st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino]


def _stats(prefix: Path, paths) -> list[os.stat_result | None]:
    """``stat`` of each path relative to ``prefix`` (None: it cannot be
    stat'ed), through one descriptor of the prefix: on a network
    filesystem every absolute path would look up the prefix again."""
    try:
        fd = os.open(prefix, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return [None] * len(paths)
    try:
        out = []
        for rel in paths:
            try:
                out.append(os.stat(rel, dir_fd=fd))
            except OSError:
                out.append(None)
        return out
    finally:
        os.close(fd)


def quick_record(prefix: Path, expected: str, reference_ns: int,
                 reference_dev: int) -> list | None:
    """The quick check of ``prefix`` to store with its fingerprint
    ``expected``, or None when there cannot be one.

    ``reference_ns`` is a timestamp of the filesystem taken before this
    call (the tarball's mtime), ``reference_dev`` that filesystem's device:
    a stat at or after the reference ("racy"), or on another filesystem
    (whose clock may differ), means no quick check.  The listings are made
    first, then the stats: an entry that changed in between is racy, and
    one that vanished in between must have been seen as nothing.
    """
    prefix = Path(prefix)
    parts = _parts(prefix)
    if _digest(parts) != expected:
        return None  # the environment changed during the pack
    values = {rel: v for rel, _, v in parts}
    paths = [*QUICK_FIXED, *(rel for rel, _, _ in parts if rel.startswith("lib/"))]
    if len(paths) > MAX_QUICK:
        return None
    record = []
    for rel, st in zip(paths, _stats(prefix, paths)):
        if st is None:
            # the listing saw nothing here either (lib: no python folders)
            if rel == "lib" and len(paths) > len(QUICK_FIXED):
                return None
            if values.get(rel, []) not in ([], ["-"]):
                return None
            record.append([rel, None])
            continue
        if st.st_dev != reference_dev:
            return None
        if max(st.st_ctime_ns, st.st_mtime_ns) >= reference_ns:
            return None  # racy: a change in the same tick would not show
        if rel in _FILES and values[rel] != [f"{st.st_size}:{st.st_mtime_ns}"]:
            return None
        result = _stat_result(st)
        if min(result) < 0:
            return None  # a time before 1970: not what a sidecar may hold
        record.append([rel, result])
    return record


def unchanged(prefix: Path, quick: list | None) -> bool:
    """Whether every stat in the quick record ``quick`` is as recorded (then
    the fingerprint is the one recorded with it, without listing a folder)."""
    if not quick:
        return False
    paths = [rel for rel, _ in quick]
    if not set(QUICK_FIXED) <= set(paths):
        return False  # not a record of this fingerprint's inputs
    now = [None if st is None else _stat_result(st) for st in _stats(Path(prefix), paths)]
    return now == [st for _, st in quick]


def is_fresh(prefix: Path, expected: str, quick: list | None = None) -> bool:
    """Whether the environment's fingerprint is ``expected``: by the quick
    check when it holds, else by the fingerprint itself."""
    return unchanged(prefix, quick) or fingerprint(prefix) == expected
