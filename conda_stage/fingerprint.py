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
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

_PIP_SUFFIXES = (".dist-info", ".egg-info", ".egg-link", ".pth")


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


def fingerprint(prefix: Path) -> str:
    prefix = Path(prefix)
    h = hashlib.sha256()

    def feed(*parts: str) -> None:
        h.update("\0".join(parts).encode("utf-8", "surrogateescape") + b"\n")

    meta = prefix / "conda-meta"
    feed("conda-meta", *_names(meta, (".json",)))
    feed("history", _stat(meta / "history"))
    feed("state", _stat(meta / "state"))
    for lib in _names(prefix / "lib"):
        if lib.startswith("python"):
            site = prefix / "lib" / lib / "site-packages"
            feed(lib, *_names(site, _PIP_SUFFIXES))
    for hook in ("activate.d", "deactivate.d"):
        feed(hook, *_names(prefix / "etc" / "conda" / hook))
    return h.hexdigest()[:32]
