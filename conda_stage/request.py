"""Parse the environments a job declares: ``conda_env=NAME[:NAME...]``.

The request is free text written by a user (a Slurm ``--comment``, an SGE
``-l conda_env=`` value moved into the job by the JSV).  Other text around
it is tolerated (``conda_env=a:b other-tool=x``); a name that is not a valid
environment name is rejected with a message, never interpreted as a path.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .resolve import is_valid_name

MAX_ENVS = 16
_TOKEN = re.compile(r"(?:^|[\s,;])conda_env=(\S*?)(?=$|[\s,;])")


@dataclass
class Request:
    names: list = field(default_factory=list)
    problems: list = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.names or self.problems)


def _printable(text: str) -> str:
    return text if text.isprintable() else text.encode("unicode_escape").decode()


def parse_names(value: str, request: Request) -> None:
    """Add the ``:``-separated names in ``value`` to ``request``."""
    if not value:
        request.problems.append("empty conda_env= request")
        return
    for name in value.split(":"):
        if not name:
            request.problems.append(f"empty name in conda_env={_printable(value)}")
        elif not is_valid_name(name):
            request.problems.append(
                f"invalid environment name '{_printable(name)}' (a name, not a path: letters, "
                f"digits, '.', '_', '+', '-')")
        elif name not in request.names:
            if len(request.names) >= MAX_ENVS:
                request.problems.append(f"more than {MAX_ENVS} environments requested; "
                                        f"ignoring {name!r}")
            else:
                request.names.append(name)


def parse_text(*texts: str | None) -> Request:
    """Find ``conda_env=`` tokens in free text (a comment, ``--extra``)."""
    request = Request()
    for text in texts:
        for value in _TOKEN.findall(text or ""):
            parse_names(value, request)
    return request


def parse_value(value: str | None) -> Request:
    """A bare ``NAME[:NAME...]`` value (SGE's CONDA_STAGE_ENVS)."""
    request = Request()
    if value is not None:
        parse_names(value.strip(), request)
    return request
