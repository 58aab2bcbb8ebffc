"""Run a function as another user: the root prolog and epilog touch user
paths (environments, tarballs, staged copies) only this way.

The function runs in a forked child that has dropped to the user's uid, gid
and supplementary groups (setgroups, setgid, setuid -- in that order, so
nothing of root is left), with HOME/USER/LOGNAME set and a fresh umask.  Its
return value comes back through a pipe as JSON; an exception comes back as
its message.
"""
from __future__ import annotations

import json
import os
import pwd
import signal
import traceback
from dataclasses import dataclass


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: str
    groups: tuple

    @classmethod
    def lookup(cls, user: str | None = None, uid: int | None = None,
               gid: int | None = None) -> "Account":
        pw = pwd.getpwnam(user) if user else pwd.getpwuid(int(uid))
        gid = pw.pw_gid if gid is None else int(gid)
        try:
            groups = tuple(os.getgrouplist(pw.pw_name, gid))
        except OSError:
            groups = (gid,)
        return cls(pw.pw_name, pw.pw_uid, gid, pw.pw_dir, groups)


_MAX_REPORT = 16 << 20


class ChildFailed(Exception):
    pass


def run_as(account: Account, func, *args, timeout: float | None = None, **kwargs):
    """``func(*args, **kwargs)`` as ``account``; returns its JSON-able result.

    Runs in-process when we already are that user.
    """
    if os.geteuid() == account.uid and os.getegid() == account.gid:
        return func(*args, **kwargs)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(read_fd)
            os.setgroups(list(account.groups))
            os.setgid(account.gid)
            os.setuid(account.uid)
            os.environ.update(HOME=account.home, USER=account.name, LOGNAME=account.name)
            os.umask(0o022)
            try:
                os.chdir(account.home)
            except OSError:
                os.chdir("/")
            try:
                payload = {"ok": func(*args, **kwargs)}
            except BaseException as exc:  # report, never propagate out of the fork
                payload = {"error": str(exc) or type(exc).__name__,
                           "type": type(exc).__name__, "trace": traceback.format_exc()}
                code = 1
            data = json.dumps(payload, default=str).encode()
            with os.fdopen(write_fd, "wb") as fh:
                fh.write(data)
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    with os.fdopen(read_fd, "rb") as fh:
        if timeout is not None:
            signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(max(1, int(timeout)))
        try:
            size = 0
            while True:
                chunk = fh.read(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > _MAX_REPORT:  # the child runs as the user: bound what root reads
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    raise ChildFailed(f"its report was larger than {_MAX_REPORT} bytes")
                chunks.append(chunk)
        except _Timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise ChildFailed(f"timed out after {timeout:.0f} s") from None
        finally:
            if timeout is not None:
                signal.alarm(0)
    _, status = os.waitpid(pid, 0)
    try:
        payload = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        payload = {}
    if "ok" in payload:
        return payload["ok"]
    if "error" in payload:
        raise ChildFailed(payload["error"])
    raise ChildFailed(f"child exited with status {status} before reporting")


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()
