"""Prefix relocation with conda-unpack's semantics.

Text files get every occurrence of the placeholder replaced; binary files get
NUL-terminated C strings rewritten and padded with NULs, which only works
when the new prefix is no longer than the placeholder -- checked up front,
before anything is extracted.  The replacement itself is conda-pack's
(``conda_pack.prefixes.replace_prefix``).
"""
from __future__ import annotations

import sys

from .errors import PrefixTooLong

_replace_prefix = None


def replace_prefix(data: bytes, mode: str, placeholder: str, new_prefix: str) -> bytes:
    """``conda_pack.prefixes.replace_prefix``.  Its module is loaded on its
    own, the first time: imported as ``conda_pack.prefixes`` it would run
    ``conda_pack/__init__`` first (importlib.metadata, conda_pack.core:
    ~30 ms of every 'conda activate'); it imports nothing of conda-pack."""
    global _replace_prefix
    if _replace_prefix is None:
        module = sys.modules.get("conda_pack.prefixes")
        if module is None:
            try:
                import importlib.util
                import os

                package = importlib.util.find_spec("conda_pack")  # finds, does not import
                path = os.path.join(os.path.dirname(package.origin), "prefixes.py")
                spec = importlib.util.spec_from_file_location("_conda_stage_conda_pack_prefixes",
                                                              path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            except Exception:
                import conda_pack.prefixes as module
        _replace_prefix = module.replace_prefix
    return _replace_prefix(data, mode, placeholder, new_prefix)


class Relocator:
    def __init__(self, records, new_prefix: str):
        self.new_prefix = str(new_prefix)
        self._by_path: dict[str, list[tuple[str, str, bytes]]] = {}
        for path, placeholder, mode in records:
            if placeholder and mode in ("text", "binary"):
                self._by_path.setdefault(path, []).append((placeholder, mode, placeholder.encode()))

    def __len__(self) -> int:
        return len(self._by_path)

    def wants(self, name: str) -> bool:
        return name in self._by_path

    def apply(self, name: str, data: bytes) -> bytes:
        for placeholder, mode, raw in self._by_path[name]:
            # Most records (every text file pip installed) hold no placeholder:
            # replace_prefix would return them unchanged, only slower.
            if raw in data:
                data = replace_prefix(data, mode, placeholder, self.new_prefix)
        return data


def check_prefix_fits(target: str, max_length: int | None) -> None:
    if max_length is not None and len(str(target).encode()) > max_length:
        raise PrefixTooLong(
            f"Cannot stage to {target}: the path is {len(str(target).encode())} bytes long, but "
            f"the environment's binary files leave room for at most {max_length}; "
            f"use a shorter staging folder (--path, or TMPDIR)")
