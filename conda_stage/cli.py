"""The ``conda-stage`` command line (also reached as ``conda stage``).

A thin layer: it parses options, resolves the environment and calls the
module that does the work.  Messages go to stderr; stdout carries only
results (the staged path, the status report).

The options, help and subcommands are plumbum's (:mod:`cliapp`), imported
only when needed: the two calls the activation hooks make on every
``conda activate`` and ``conda deactivate`` (``--stage --owner-pid PID
PREFIX`` and ``--unstage --background --owner-pid PID PREFIX``) are
recognised here, in a strict form, and run without it -- plumbum's import
alone takes ~0.1 s.  Anything else, including any variation of those calls,
goes through the full parser.
"""
from __future__ import annotations

import os
import signal
import sys

from . import output
from .errors import StageError
from .output import printable


def stage_action(env, *, path=None, owner_pid=None, writable=False) -> int:
    """``--stage``: print the path of the staged copy."""
    from .autostage import read_conf
    from .jobdir import find_job_copy
    from .resolve import resolve
    from .stage import stage

    target = resolve(env)
    conf = read_conf(target.prefix)
    if conf.get("quiet") == "1":
        output.configure(quiet=True)
    if path is None:
        prestaged = find_job_copy(target.prefix)
        if prestaged is not None:
            output.info(f"Using the copy staged for this job: {prestaged}")
            print(prestaged)
            return 0
    staged = stage(target, path=path, owner_pid=owner_pid,
                   writable=writable or conf.get("writable") == "1")
    print(staged)
    return 0


def pack_action(env, *, fmt=None, force=False, ignore_missing_files=False,
                image=False) -> int:
    """``--pack``: pack the environment if its tarball is not fresh (and
    build or keep current its image)."""
    from .image import after_pack
    from .pack import pack
    from .resolve import resolve

    target = resolve(env)
    pack(target, fmt=fmt, force=force, ignore_missing_files=ignore_missing_files)
    after_pack(target, build_image=image)
    return 0


def unstage_action(env, *, force=False, owner_pid=None, background=False) -> int:
    """``--unstage``: let go of a staged copy (default: the active one)."""
    from .store import unstage

    prefix = env or os.environ.get("CONDA_PREFIX")
    if not prefix:
        raise StageError("Does not look like a staged environment: CONDA_PREFIX is not set")
    unstage(prefix, force=force, holder_pid=owner_pid, background=background)
    return 0


def _hook_call(args: list[str]):
    """The hooks' calls (and ``--pack``), parsed without plumbum: ``(action,
    env, owner_pid, flag, quiet, debug)`` -- ``flag`` is ``--background``
    or ``--force`` -- or None for anything else (the full parser then
    handles it, errors included).  Accepted: ``--stage``, ``--unstage`` or
    ``--pack``, ``--owner-pid DIGITS`` (or ``=DIGITS``; not with
    ``--pack``), ``--background`` (with ``--unstage``), ``--force`` (with
    ``--pack``), ``-q``/``--quiet``, ``--debug``, each at most once, and one
    ENV that does not start with ``-``."""
    seen: set[str] = set()
    env = pid = None
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg.startswith("--owner-pid"):
            if arg == "--owner-pid":
                if i >= len(args):
                    return None
                value, i = args[i], i + 1
            elif arg.startswith("--owner-pid="):
                value = arg[len("--owner-pid="):]
            else:
                return None
            if "pid" in seen or not (value.isascii() and value.isdigit()) or len(value) > 9:
                return None
            seen.add("pid")
            pid = int(value)
            continue
        if arg == "-q":
            arg = "--quiet"
        if arg in ("--stage", "--unstage", "--pack", "--background", "--force", "--quiet",
                   "--debug"):
            if arg in seen:
                return None
            seen.add(arg)
        elif arg and not arg.startswith("-") and env is None:
            env = arg
        else:
            return None
    actions = seen & {"--stage", "--unstage", "--pack"}
    if len(actions) != 1 or env is None or ("--background" in seen and "--unstage" not in seen) \
            or ("--force" in seen and "--pack" not in seen) or ("pid" in seen and "--pack" in seen):
        return None
    return (actions.pop(), env, pid, "--background" in seen or "--force" in seen,
            "--quiet" in seen, "--debug" in seen)


class _Terminated(BaseException):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C, so that a half-extracted copy
    is removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, _frame):
    raise _Terminated(signum)


def describe_os_error(exc: OSError) -> str:
    """One line for an ``OSError``: what failed and on which path(s)."""
    what = exc.strerror or str(exc) or type(exc).__name__
    names = [n for n in (exc.filename, exc.filename2) if n is not None]
    if not names:
        return printable(what)
    return printable(f"{what}: " + " -> ".join(os.fsdecode(n) if isinstance(n, bytes) else str(n)
                                             for n in names))


def main(argv=None) -> int:
    """Every user error ends as one ``ERROR:`` line and a non-zero exit
    status, never a traceback (``--debug`` or ``CONDA_STAGE_DEBUG=1`` add
    the traceback of unexpected errors)."""
    argv = list(sys.argv if argv is None else argv)
    argv[0] = "conda-stage"
    output.configure(debug="--debug" in argv[1:])
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, _terminate)
        except (OSError, ValueError):  # not the main thread
            pass
    try:
        return _run(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _dispatch(argv) -> int:
    call = _hook_call(argv[1:])
    if call is None:
        from .cliapp import CondaStage

        _inst, code = CondaStage.run(argv, exit=False)
        return code
    action, env, pid, flag, quiet, debug = call
    output.configure(quiet=quiet, debug=debug)
    if action == "--stage":
        return stage_action(env, owner_pid=pid)
    if action == "--pack":
        return pack_action(env, force=flag)
    return unstage_action(env, owner_pid=pid, background=flag)


def _run(argv) -> int:
    try:
        code = _dispatch(argv)
    except StageError as exc:
        output.error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        output.error("Interrupted")
        return 130
    except _Terminated as exc:
        output.error(f"Terminated by signal {signal.Signals(exc.signum).name}")
        return 128 + exc.signum
    except OSError as exc:
        output.debug(_traceback())
        output.error(describe_os_error(exc))
        return 1
    except Exception as exc:  # a bug: still one line, details with --debug
        output.debug(_traceback())
        output.error(f"Internal error: {type(exc).__name__}: {exc} (run with --debug to see "
                     f"where; please report it)")
        return 70
    return code or 0


def _traceback() -> str:
    import traceback

    return traceback.format_exc()


if __name__ == "__main__":
    sys.exit(main())
