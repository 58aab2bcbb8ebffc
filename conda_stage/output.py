"""Messages (``INFO:``/``WARNING:``/``ERROR:``/``DEBUG:``) and progress bars.

Everything goes to stderr: stdout is reserved for results a caller captures
(for example the path of a staged copy).
"""
from __future__ import annotations

import os
import sys
import time

_state = {"quiet": False, "debug": False}


def configure(*, quiet: bool | None = None, debug: bool | None = None) -> None:
    if quiet is not None:
        _state["quiet"] = quiet
    if debug is not None:
        _state["debug"] = debug
    if os.environ.get("CONDA_STAGE_DEBUG", "").lower() in ("1", "true", "yes"):
        _state["debug"] = True


def is_quiet() -> bool:
    return _state["quiet"]


def printable(text: str) -> str:
    """``text`` with every character Python does not call printable escaped
    (``\\x1b``, ``\\n``, ``\\u202e``, ...), so that a user-chosen name can
    never forge a line, move the cursor or reorder what a terminal shows.
    Undecodable bytes of a file name (surrogate escapes) are shown as
    ``\\xNN``."""
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        o = ord(ch)
        if ch.isprintable():
            out.append(ch)
        elif 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{o - 0xDC00:02x}")
        elif o < 0x100:
            out.append(f"\\x{o:02x}")
        elif o < 0x10000:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    return "".join(out)


def _emit(prefix: str, msg: str) -> None:
    lines = [printable(line) for line in str(msg).split("\n")]
    pad = " " * len(prefix)
    text = prefix + lines[0] + "".join("\n" + pad + line for line in lines[1:])
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (BrokenPipeError, OSError):
        pass


def info(msg: str) -> None:
    if not _state["quiet"]:
        _emit("INFO: ", msg)


def warn(msg: str) -> None:
    _emit("WARNING: ", msg)


def error(msg: str) -> None:
    _emit("ERROR: ", msg)


def debug(msg: str) -> None:
    if _state["debug"]:
        _emit("DEBUG: ", msg)


def describe_file(path) -> str:
    """``<path> (<bytes> bytes; <mtime>)`` as in the original tool's messages."""
    try:
        st = os.stat(path)
    except OSError:
        return f"{path} (missing)"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime))
    zone = time.strftime("%z", time.localtime(st.st_mtime))
    return f"{path} ({st.st_size} bytes; {stamp} {zone})"


def seconds(t: float) -> str:
    return f"{t:.1f} seconds"


class Progress:
    """A one-line progress bar on stderr, shown only when stderr is a TTY
    and output is not quiet.  ``update(n)`` adds ``n`` units of ``total``."""

    WIDTH = 40

    def __init__(self, label: str, total: int, unit: str = "B"):
        self.label = label
        self.total = max(int(total), 1)
        self.unit = unit
        self.done = 0
        self.enabled = (not _state["quiet"]) and _isatty(sys.stderr)
        self._last = 0.0
        self._start = time.monotonic()

    def __enter__(self):
        self._draw(force=True)
        return self

    def update(self, n: int) -> None:
        self.done += n
        if self.enabled:
            now = time.monotonic()
            if now - self._last >= 0.1:
                self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        self._last = time.monotonic()
        frac = min(self.done / self.total, 1.0)
        filled = int(frac * self.WIDTH)
        bar = "#" * filled + " " * (self.WIDTH - filled)
        elapsed = time.monotonic() - self._start
        sys.stderr.write(f"\r{self.label} [{bar}] {frac * 100:5.1f}% {elapsed:6.1f}s")
        sys.stderr.flush()

    def __exit__(self, exc_type, exc, tb):
        if self.enabled:
            if exc_type is None:
                self.done = self.total
            self._draw(force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()
        return False


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
