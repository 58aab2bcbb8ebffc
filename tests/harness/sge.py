"""A real single-node Son of Grid Engine (Debian's gridengine 8.1.9) for tests.

Usage::

    from tests.harness.sge import SgeCluster
    from tests.harness.users import ensure_user

    sge = SgeCluster()                       # state under TEST_BASE/sge
    sge.up(prolog="root@/path/prolog $job_id", jsv="/work/main/prolog/sge-jsv")
    alice = ensure_user("csalice")
    jid = sge.submit(alice, "#!/bin/bash\\necho $CONDA_STAGE_ENVS\\n", "-l", "conda_env=foo:bar")
    res = sge.wait(jid)                      # JobResult: left the queue + qacct records
    assert res.ok and sge.output(jid).strip() == "foo:bar"
    sge.configure(prolog=None)               # hooks change without a restart
    sge.down()                               # stop daemons and jobs, wipe all spooled state

pytest: the session fixture ``sge_cluster`` brings the cluster up once (with the
shipped JSV ``prolog/sge-jsv``, no prolog/epilog) and down at the end; the
function fixture ``sge`` hands out the same cluster and afterwards deletes
leftover jobs, restores the hooks/JSV given to ``up()``, removes probe-hook
controls and clears a queue error.  Register both with
``pytest_plugins = ["tests.harness.sge"]`` in the top-level conftest.py.
Set ``CONDA_STAGE_KEEP_SGE=1`` to leave the cluster running after the session.

PYTEST_DONT_REWRITE (no asserts here; keeps pytest from warning when a test
module imports this before registering it as a plugin).

Recipe notes (Debian 12 sandbox): the host name resolves to 127.0.0.1 whose
reverse lookup is "localhost", so ``host_aliases`` maps the two; root cannot
submit (min_uid 1000), jobs are submitted as test users; daemons are started
under ``env -i`` because execd hands its environment to hooks and jobs; the
scheduler runs every second so a trivial job takes about one second.
Every external command runs with a timeout.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .users import TEST_BASE, User, ensure_user, run_as

SGE_ROOT = Path("/var/lib/gridengine")
SGE_CELL = "default"
COMMON = SGE_ROOT / SGE_CELL / "common"
SPOOL = Path("/var/spool/gridengine")
PACKAGES = ("gridengine-master", "gridengine-exec", "gridengine-client")
FILES = Path(__file__).resolve().parent / "files" / "sge"
PROBE_HOOK = FILES / "probe_hook.sh"
JSV_SCRIPT = Path(__file__).resolve().parents[2] / "prolog" / "sge-jsv"   # the shipped JSV

# The environment of daemons and of root's client calls: nothing from pytest.
SGE_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SGE_ROOT": str(SGE_ROOT),
    "SGE_CELL": SGE_CELL,
}

_KEEP = object()  # configure(): leave this setting alone


class SgeError(RuntimeError):
    """A gridengine command failed (message includes its output)."""


class SubmitError(SgeError):
    """qsub refused the job; ``returncode``/``stdout``/``stderr`` are qsub's."""

    def __init__(self, msg, returncode, stdout, stderr):
        super().__init__(msg)
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@dataclass
class JobResult:
    """What ``SgeCluster.wait`` learned about a finished job.

    ``records`` are the parsed ``qacct -j`` blocks (one per task; keys as
    qacct prints them: "exit_status", "failed", "taskid", ...).  Empty when
    accounting did not show up in time (``accounted`` is False then).
    """

    jobid: str
    left_queue: bool
    records: list = field(default_factory=list)
    accounted: bool = False

    @property
    def exit_status(self) -> int | None:
        """Highest exit status over all tasks (None without accounting)."""
        vals = [_leading_int(r.get("exit_status")) for r in self.records]
        vals = [v for v in vals if v is not None]
        return max(vals) if vals else None

    @property
    def failed(self) -> str | None:
        """First non-zero qacct ``failed`` value (e.g. "100 : assumedly after job"), else "0"."""
        if not self.records:
            return None
        for r in self.records:
            if _leading_int(r.get("failed")) not in (0, None):
                return r["failed"]
        return "0"

    @property
    def ok(self) -> bool:
        return self.accounted and self.exit_status == 0 and self.failed == "0"


def _leading_int(value):
    m = re.match(r"\s*(-?\d+)", value or "")
    return int(m.group(1)) if m else None


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _daemons(name: str) -> list[psutil.Process]:
    """Live (non-zombie) processes called ``name``; this sandbox's PID 1 reaps late."""
    out = []
    for p in psutil.process_iter(["name"]):
        if p.info["name"] == name and _alive(p):
            out.append(p)
    return out


class SgeCluster:
    """One qmaster + one execd on this host, queue ``all.q`` with ``slots`` slots."""

    def __init__(self, base: Path | str | None = None, slots: int = 4):
        self.base = Path(base) if base else TEST_BASE / "sge"
        self.slots = slots
        self.host = socket.gethostname()
        self.queue = "all.q"
        self.qinstance = f"{self.queue}@{self.host}"
        self.work = self.base / "admin"   # qconf input files, daemon/apt logs
        self.probe_dir = self.base / "probe"
        self._jobs: dict[str, dict] = {}  # jobid -> {"user", "dir", "tasks", "out"}
        self._baseline = {"prolog": None, "epilog": None, "jsv": None}
        self._current = dict(self._baseline)   # what configure() last set
        self._counter = 0

    def install_file(self, src: Path | str, name: str | None = None, mode: int = 0o755) -> Path:
        """Copy ``src`` into ``base/hooks/`` (root-owned, world-readable) and
        return the copy: the JSV runs as the admin user and job-owner hooks as
        the job user, and the checkout may not be readable by them."""
        folder = self.base / "hooks"
        folder.mkdir(parents=True, exist_ok=True)
        for p in (self.base, folder):
            p.chmod(0o755)
        dst = folder / (name or Path(src).name)
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copyfile(src, tmp)
        tmp.chmod(mode)
        os.replace(tmp, dst)
        return dst

    # ------------------------------------------------------------ commands
    def run(self, argv, *, timeout=30, check=True, input=None) -> subprocess.CompletedProcess:
        """Run a gridengine (or any) command as root in the clean SGE environment."""
        try:
            cp = subprocess.run(["env", "-i", *(f"{k}={v}" for k, v in SGE_ENV.items()), *argv],
                                capture_output=True, text=True, timeout=timeout, input=input,
                                stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise SgeError(f"timeout after {timeout}s: {' '.join(map(str, argv))}") from e
        if check and cp.returncode != 0:
            raise SgeError(f"{' '.join(map(str, argv))} exited {cp.returncode}:\n"
                           f"{cp.stdout}{cp.stderr}")
        return cp

    def qconf(self, *args, timeout=30, check=True) -> str:
        return self.run(["qconf", *args], timeout=timeout, check=check).stdout

    # ------------------------------------------------------------ lifecycle
    def up(self, prolog: str | None = None, epilog: str | None = None,
           jsv: str | os.PathLike | None = None, timeout: float = 120) -> "SgeCluster":
        """Install (if needed), initialise, start and configure; idempotent.

        ``prolog``/``epilog`` are full queue values such as
        ``"root@/path/prolog $job_id"`` (None: NONE); ``jsv`` is a script path
        set as the global ``jsv_url script:PATH`` (None: no JSV).  These become
        the baseline the ``sge`` fixture restores after each test.
        """
        if os.geteuid() != 0:
            raise SgeError("SgeCluster.up() needs root")
        for d in (self.base, self.work):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
        for d in (self.probe_dir, self.probe_dir / "log", self.probe_dir / "ctl"):
            d.mkdir(parents=True, exist_ok=True)
        (self.probe_dir / "log").chmod(0o1777)
        jsv = str(jsv) if jsv else None
        self._baseline = {"prolog": prolog, "epilog": epilog, "jsv": jsv}
        self._current = dict(self._baseline)

        self._ensure_hostname()
        self._install()
        self._init_cell()
        if not self._qmaster_up():
            self._start_daemon("sge_qmaster")
            self.wait_until(lambda: self._qmaster_up(), 60, "sge_qmaster to answer")
        self._configure_cluster(prolog, epilog, jsv)
        if not _daemons("sge_execd"):
            self._start_daemon("sge_execd")
        def ready():
            state = self.queue_state()
            if state and "E" in state:   # error left over from an earlier session
                self.clear_queue_error()
            return state == ""
        self.wait_until(ready, timeout, f"{self.qinstance} to become ready",
                   lambda: self.run(["qstat", "-f", "-explain", "aAcE"], check=False).stdout)
        return self

    def down(self, wipe: bool = True, timeout: float = 30) -> None:
        """Stop execd (killing its jobs) and qmaster; ``wipe`` also resets all spooled state."""
        execd = _daemons("sge_execd")
        if execd:
            self.run(["qconf", "-kej", self.host], timeout=15, check=False)
            self._stop(execd, timeout)
        shepherds = _daemons("sge_shepherd")   # left over if execd was already gone
        if shepherds:
            for p in shepherds:
                try:
                    children = p.children(recursive=True)
                except psutil.Error:
                    continue
                for c in children:
                    try:
                        c.kill()
                    except psutil.Error:
                        pass
            self._stop(shepherds, 10)
        qmaster = _daemons("sge_qmaster")
        if qmaster:
            if wipe:   # state is thrown away: skip the ~9 s graceful shutdown
                for p in qmaster:
                    p.kill()
            else:
                self.run(["qconf", "-km"], timeout=15, check=False)
            self._stop(qmaster, timeout)
        if wipe:
            for d in ("spooldb", "qmaster", "execd"):
                for child in (SPOOL / d).glob("*"):
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            (COMMON / "accounting").unlink(missing_ok=True)
            for t in Path("/tmp").glob(f"[0-9]*.*.{self.queue}"):
                shutil.rmtree(t, ignore_errors=True)
            # job ids restart at 1: old output files would be appended to
            for d in (self.base / "work", self.probe_dir / "log"):
                for child in d.glob("*"):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            self._jobs.clear()

    def configure(self, prolog=_KEEP, epilog=_KEEP, jsv=_KEEP) -> None:
        """Change queue hooks / the global JSV at once, without a restart.

        ``prolog``/``epilog``: full queue values (``"root@/path args"``), None
        for NONE; ``jsv``: script path or None.  Omitted ones stay as they are;
        values equal to the last ones set through this object are skipped.
        """
        for attr, value in (("prolog", prolog), ("epilog", epilog)):
            if value is not _KEEP and value != self._current[attr]:
                self.qconf("-mattr", "queue", attr, value or "NONE", self.queue)
                self._current[attr] = value
        if jsv is not _KEEP:
            jsv = str(jsv) if jsv else None
        if jsv is not _KEEP and jsv != self._current["jsv"]:
            self._set_global(jsv_url=f"script:{jsv}" if jsv else "none")
            self._current["jsv"] = jsv

    # ------------------------------------------------------------ jobs
    def work_dir(self, user: User) -> Path:
        """Per-user submit directory (cwd of qsub and default output place)."""
        d = self.base / "work" / user.name
        if not d.is_dir():
            d.mkdir(parents=True)
            os.chown(d, user.uid, user.gid)
            d.chmod(0o755)
        return d

    def qsub(self, user: User | str, script_text: str, *qsub_args: str,
             timeout: float = 60) -> tuple[subprocess.CompletedProcess, dict]:
        """Submit without judging the result: (qsub's CompletedProcess, job meta)."""
        user = ensure_user(user) if isinstance(user, str) else user
        wd = self.work_dir(user)
        self._counter += 1
        script = wd / f"job-{os.getpid()}-{self._counter}.sh"
        script.write_text(script_text)
        os.chown(script, user.uid, user.gid)
        args = list(qsub_args)
        out = None
        if not any(a in ("-o", "-e", "-j") for a in args):
            args = ["-j", "y", "-o", f"{wd}/$JOB_ID.$TASK_ID.out", *args]
            out = wd
        try:
            cp = run_as(user, ["qsub", "-terse", *args, str(script)], cwd=wd, timeout=timeout,
                        env={"PATH": "/usr/local/bin:/usr/bin:/bin"})
        except subprocess.TimeoutExpired as e:
            raise SgeError(f"qsub timed out after {timeout}s (qsub -sync y of a held job?)") from e
        return cp, {"user": user, "dir": wd, "out": out, "script": script}

    def submit(self, user: User | str, script_text: str, *qsub_args: str,
               timeout: float = 60) -> str:
        """Submit ``script_text`` as ``user``; returns the job id (base id of an array job).

        Unless ``-o``/``-e``/``-j`` are among ``qsub_args``, stdout+stderr go
        to ``work_dir(user)/JOBID.TASK.out`` (TASK 0 for non-array jobs; read
        back with ``output``).
        Raises ``SubmitError`` if qsub fails (e.g. a JSV rejection).
        """
        cp, meta = self.qsub(user, script_text, *qsub_args, timeout=timeout)
        m = re.match(r"^(\d+)(?:\.(\d+)-(\d+):(\d+))?\s*$", cp.stdout)
        if cp.returncode != 0 or not m:
            raise SubmitError(f"qsub failed ({cp.returncode}): {cp.stderr.strip() or cp.stdout.strip()}",
                              cp.returncode, cp.stdout, cp.stderr)
        jobid = m.group(1)
        if m.group(2):
            first, last, step = (int(m.group(i)) for i in (2, 3, 4))
            meta["tasks"] = list(range(first, last + 1, step))
        else:
            meta["tasks"] = None
        self._jobs[jobid] = meta
        return jobid

    def jobs(self) -> dict[str, str]:
        """{jobid: state} of every job qstat knows (array tasks merged)."""
        cp = self.run(["qstat", "-u", "*"], timeout=15)
        states: dict[str, str] = {}
        for line in cp.stdout.splitlines()[2:]:
            f = line.split()
            if len(f) >= 5 and f[0].isdigit():
                states.setdefault(f[0], f[4])
        return states

    def job_state(self, jobid: str) -> str | None:
        """qstat state letters ("qw", "r", "Eqw", ...) or None once the job has left."""
        return self.jobs().get(str(jobid))

    def wait_state(self, jobid: str, states, timeout: float = 60) -> str:
        """Wait until the job's state is one of ``states`` (None = gone); return it."""
        states = {states} if isinstance(states, (str, type(None))) else set(states)
        box = {}

        def check():
            box["s"] = self.job_state(jobid)
            return box["s"] in states
        self.wait_until(check, timeout, f"job {jobid} to reach {states}",
                        lambda: self.qstat_j(jobid))
        return box["s"]

    def wait(self, jobid: str, timeout: float = 120, accounting_timeout: float = 15) -> JobResult:
        """Wait until the job (every task) has left qstat, then read ``qacct -j``.

        Raises TimeoutError (with ``qstat -j`` in the message, e.g. an
        ``error reason``) if the job is still known after ``timeout``.
        """
        jobid = str(jobid)
        self.wait_until(lambda: self.job_state(jobid) is None, timeout,
                        f"job {jobid} to leave the queue", lambda: self.qstat_j(jobid))
        meta = self._jobs.get(jobid, {})
        want = len(meta.get("tasks") or [0])
        res = JobResult(jobid, left_queue=True)
        end = time.monotonic() + accounting_timeout
        while True:
            res.records = self.qacct(jobid)
            if len(res.records) >= want:
                res.accounted = True
                return res
            if time.monotonic() > end:
                return res
            time.sleep(0.25)

    def qacct(self, jobid: str) -> list[dict]:
        """Parsed ``qacct -j`` records (one dict per task run; [] if none yet)."""
        cp = self.run(["qacct", "-j", str(jobid)], timeout=15, check=False)
        if cp.returncode != 0:
            return []
        records, cur = [], None
        for line in cp.stdout.splitlines():
            if line.startswith("====="):
                cur = {}
                records.append(cur)
            elif cur is not None and line.strip():
                k, _, v = line.partition(" ")
                cur[k] = v.strip()
        return records

    def output(self, jobid: str, task: int | None = None) -> str:
        """Text of the job's (task's) default output file; '' if it does not exist."""
        meta = self._jobs.get(str(jobid))
        if not meta or not meta["out"]:
            raise SgeError(f"job {jobid}: no harness-managed output file (own -o/-e/-j given?)")
        # $TASK_ID in the -o path is 0 for a non-array job
        f = meta["out"] / f"{jobid}.{task if task is not None else 0}.out"
        return f.read_text(errors="replace") if f.exists() else ""

    def qstat_j(self, jobid: str) -> str:
        """``qstat -j ID`` text ('' once the job is gone)."""
        cp = self.run(["qstat", "-j", str(jobid)], timeout=15, check=False)
        return cp.stdout if cp.returncode == 0 else ""

    def hard_resources(self, jobid: str) -> dict[str, str]:
        """The job's ``hard resource_list`` from ``qstat -j`` as a dict."""
        m = re.search(r"^hard resource_list:\s*(.*)$", self.qstat_j(jobid), re.M)
        if not m:
            return {}
        return dict(item.partition("=")[::2] for item in m.group(1).split(",") if item)

    def job_env(self, jobid: str) -> dict[str, str]:
        """The job's ``env_list`` from ``qstat -j`` (variables added by -v or a JSV)."""
        m = re.search(r"^env_list:\s*(.*)$", self.qstat_j(jobid), re.M)
        if not m:
            return {}
        return dict(item.partition("=")[::2] for item in m.group(1).split(",") if item)

    def release(self, jobid: str) -> None:
        """Release a job submitted with ``-h`` (user hold)."""
        self.run(["qrls", str(jobid)], timeout=30)

    def delete(self, jobid: str, force: bool = False) -> None:
        self.run(["qdel", *(["-f"] if force else []), str(jobid)], timeout=30, check=False)

    def spool_dir(self, jobid: str, task: int | None = None) -> Path | None:
        """execd's active_jobs/JOB.TASK directory (task 1 for non-array jobs)."""
        hits = list(SPOOL.glob(f"execd/*/active_jobs/{jobid}.{task or 1}"))
        return hits[0] if hits else None

    def job_pids(self, jobid: str, task: int | None = None, timeout: float = 60) -> dict:
        """PIDs of a running job: ``{"shepherd": pid, "shell": pid, "all": [pids]}``.

        Waits until the job script is running (shepherd wrote ``job_pid``).
        ``shell`` is the job's top process (the shell running the script),
        ``all`` it and every descendant.  ``os.kill(d["shell"], 9)`` simulates
        a crashing job; killing ``shepherd`` simulates a dying shepherd.
        """
        box = {}

        def check():
            d = self.spool_dir(jobid, task)
            if not d:
                return False
            try:
                shell = int((d / "job_pid").read_text().split()[0])
                shep = int((d / "pid").read_text().split()[0])
                proc = psutil.Process(shell)
            except (OSError, ValueError, IndexError, psutil.Error):
                return False
            if not _alive(proc):
                return False
            box.update(shepherd=shep, shell=shell,
                       all=[shell] + [c.pid for c in proc.children(recursive=True)])
            return True
        self.wait_until(check, timeout, f"job {jobid} task {task} to run", lambda: self.qstat_j(jobid))
        return box

    # ------------------------------------------------------------ queue
    def queue_state(self) -> str | None:
        """State flags of all.q@host: '' when fine, e.g. 'E', 'au', 'd'; None if unknown."""
        cp = self.run(["qstat", "-f", "-q", self.qinstance], timeout=15, check=False)
        for line in cp.stdout.splitlines():
            f = line.split()
            if f and f[0] == self.qinstance:
                return f[5] if len(f) > 5 else ""
        return None

    def clear_queue_error(self) -> None:
        self.run(["qmod", "-cq", self.queue], timeout=15, check=False)

    # ------------------------------------------------------------ probe hook
    def probe_hook(self, kind: str, root: bool = True) -> str:
        """Queue prolog/epilog value running files/sge/probe_hook.sh (see its header)."""
        hook = self.install_file(PROBE_HOOK)
        return f"{'root@' if root else ''}{hook} {kind} {self.probe_dir}"

    def probe_control(self, kind: str, *, append: str | None = None, sh: str | None = None,
                      exit: int | None = None, sleep: float | None = None) -> None:
        """Steer probe_hook KIND from now on (None removes a setting): ``append``
        text to the job's spool ``environment`` file, run bash snippet ``sh``,
        ``sleep`` seconds, ``exit`` with this code."""
        for name, value in (("append", append), ("sh", sh), ("exit", exit), ("sleep", sleep)):
            f = self.probe_dir / "ctl" / f"{kind}.{name}"
            if value is None:
                f.unlink(missing_ok=True)
            else:
                f.write_text(value if isinstance(value, str) else f"{value}\n")
                f.chmod(0o644)

    def probe_log(self, kind: str, jobid: str, task: int | None = None,
                  timeout: float = 30) -> dict[str, str]:
        """Sections of what probe_hook KIND recorded for the job: {"id", "env", ...};
        ``env`` is additionally parsed into ``log["vars"]``."""
        f = self.probe_dir / "log" / f"{kind}.{jobid}.{task if task is not None else 'undefined'}"
        self.wait_until(f.exists, timeout, f"probe log {f}")
        sections, cur = {}, None
        for line in f.read_text(errors="replace").splitlines():
            if line.startswith("=== "):
                cur = line[4:]
                sections[cur] = ""
            elif cur:
                sections[cur] += line + "\n"
        sections["vars"] = dict(l.partition("=")[::2] for l in sections.get("env", "").splitlines()
                                if "=" in l)
        return sections

    # ------------------------------------------------------------ internals
    @staticmethod
    def wait_until(pred, timeout, what, diag=None, interval=0.25):
        """Poll ``pred()`` until true; TimeoutError("... waiting for WHAT" + ``diag()``)."""
        end = time.monotonic() + timeout
        while True:
            if pred():
                return
            if time.monotonic() > end:
                extra = ""
                if diag:
                    try:
                        extra = "\n" + str(diag())
                    except Exception as e:  # noqa: BLE001 - diagnostics only
                        extra = f"\n(diagnostics failed: {e})"
                raise TimeoutError(f"timeout after {timeout}s waiting for {what}{extra}")
            time.sleep(interval)

    def _ensure_hostname(self):
        try:
            socket.gethostbyname(self.host)
        except OSError:
            with open("/etc/hosts", "a") as f:
                f.write(f"127.0.0.1 {self.host}\n")

    def _install(self):
        cp = subprocess.run(["dpkg-query", "-W", "-f=${Status}\n", *PACKAGES],
                            capture_output=True, text=True, timeout=30)
        if cp.stdout.count("install ok installed") == len(PACKAGES):
            return
        preseed = (f"gridengine-common shared/gridengineconfig boolean true\n"
                   f"gridengine-common shared/gridenginecell string {SGE_CELL}\n"
                   f"gridengine-common shared/gridenginemaster string {self.host}\n")
        subprocess.run(["debconf-set-selections"], input=preseed, text=True, check=True, timeout=60)
        policy = Path("/usr/sbin/policy-rc.d")
        own_policy = not policy.exists()   # keep maintainer scripts from starting daemons
        if own_policy:
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
        env = dict(SGE_ENV, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q",
               "--no-install-recommends", *PACKAGES]
        log = self.work / "apt.log"
        try:
            with open(log, "w") as f:
                rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, timeout=900).returncode
                if rc != 0:   # stale package lists?
                    subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "update", "-q"],
                                   env=env, stdout=f, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, timeout=600)
                    rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, timeout=900).returncode
        finally:
            if own_policy:
                policy.unlink(missing_ok=True)
        if rc != 0:
            raise SgeError(f"apt-get install failed, see {log}:\n{log.read_text()[-3000:]}")

    def _init_cell(self):
        if not (COMMON / "bootstrap").exists() or not (SPOOL / "spooldb" / "sge").exists():
            for d in (COMMON, SPOOL / "qmaster" / "job_scripts", SPOOL / "spooldb", SPOOL / "execd"):
                d.mkdir(parents=True, exist_ok=True)
            if not (COMMON / "bootstrap").exists():
                shutil.copy("/usr/share/gridengine/default-bootstrap", COMMON / "bootstrap")
            self.run(["chown", "-R", "sgeadmin:sgeadmin", str(SGE_ROOT / SGE_CELL),
                      str(SPOOL / "qmaster"), str(SPOOL / "spooldb"), str(SPOOL / "execd")])
            self.run(["runuser", "-u", "sgeadmin", "--", "/usr/share/gridengine/scripts/init_cluster",
                      str(SGE_ROOT), SGE_CELL, str(SPOOL / "spooldb"), "sgeadmin"], timeout=120)
        (COMMON / "act_qmaster").write_text(f"{self.host}\n")
        # The host name resolves to 127.0.0.1, which reverse-resolves to "localhost";
        # without this alias every client gets "commlib error: access denied".
        (COMMON / "host_aliases").write_text(f"{self.host} localhost\n")
        run_dir = Path("/var/run/gridengine")
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run(["chown", "sgeadmin:sgeadmin", str(COMMON / "act_qmaster"),
                  str(COMMON / "host_aliases"), str(run_dir)])

    def _qmaster_up(self) -> bool:
        if not _daemons("sge_qmaster"):
            return False
        return self.run(["qconf", "-sconf", "global"], timeout=5, check=False).returncode == 0

    def _start_daemon(self, name):
        # Daemonises itself; a clean environment, because execd passes its
        # own environment on to prologs, epilogs and jobs.
        with open(self.work / f"{name}.log", "a") as log:
            subprocess.run(["env", "-i", *(f"{k}={v}" for k, v in SGE_ENV.items()), f"/usr/sbin/{name}"],
                           stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                           timeout=60, check=True, start_new_session=True, cwd="/")

    @staticmethod
    def _stop(procs, timeout):
        end = time.monotonic() + timeout
        for p in procs:
            while _alive(p):
                if time.monotonic() > end:
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
                    break
                time.sleep(0.1)
        # (a zombie counts as stopped: this sandbox's PID 1 reaps late)

    def _set_global(self, **settings):
        # join backslash-continued lines so that every setting is one line
        lines = re.sub(r"\\\n\s*", " ", self.qconf("-sconf", "global")).splitlines()
        out = []
        for line in lines:
            if line.startswith("#"):
                continue
            key = line.split(None, 1)[0] if line.strip() else ""
            if key in settings:
                line = f"{key:<28} {settings.pop(key)}"
            out.append(line)
        out += [f"{k:<28} {v}" for k, v in settings.items()]
        f = self.work / "global"   # qconf -Mconf takes the config name from the file name
        f.write_text("\n".join(out) + "\n")
        self.qconf("-Mconf", str(f))

    def _configure_cluster(self, prolog, epilog, jsv):
        h = self.host
        if h not in self.qconf("-sh", check=False).split():
            self.qconf("-ah", h, check=False)
        if h not in self.qconf("-ss", check=False).split():   # -ss exits 1 while empty
            self.qconf("-as", h)
        # scheduler every second (default 15 s): a trivial job then takes ~1 s
        sconf = self.qconf("-ssconf")
        sconf = re.sub(r"^schedule_interval .*$", "schedule_interval 0:0:1", sconf, flags=re.M)
        sconf = re.sub(r"^flush_submit_sec .*$", "flush_submit_sec 1", sconf, flags=re.M)
        sconf = re.sub(r"^flush_finish_sec .*$", "flush_finish_sec 1", sconf, flags=re.M)
        (self.work / "sconf").write_text(sconf)
        self.qconf("-Msconf", str(self.work / "sconf"))
        # load reports every 5 s (re-dispatch after a prolog failure waits for one);
        # accounting written at once so qacct works right after a job ends
        self._set_global(load_report_time="00:00:05",
                         reporting_params="accounting=true reporting=false flush_time=00:00:01 "
                                          "joblog=false sharelog=00:00:00 accounting_flush_time=00:00:00",
                         jsv_url=f"script:{jsv}" if jsv else "none")
        complexes = self.qconf("-sc")
        if not re.search(r"^conda_env\s", complexes, re.M):
            (self.work / "complex").write_text(
                complexes + "conda_env           conda      RESTRING    ==    YES         NO         NONE     0\n")
            self.qconf("-Mc", str(self.work / "complex"))
        (self.work / "all.q").write_text(_QUEUE_TEMPLATE.format(
            host=h, slots=self.slots, prolog=prolog or "NONE", epilog=epilog or "NONE"))
        if self.queue in self.qconf("-sql", check=False).split():
            self.qconf("-Mq", str(self.work / "all.q"))
        else:
            self.qconf("-Aq", str(self.work / "all.q"))

    def reset(self) -> None:
        """Back to the state after up(): no jobs, baseline hooks/JSV, no queue error."""
        left = self.jobs()
        if left:
            self.run(["qdel", "-f", *left], timeout=30, check=False)
            try:
                self.wait_until(lambda: not self.jobs(), 30, "deleted jobs to leave")
            except TimeoutError:
                pass
        self.configure(**self._baseline)
        for kind_file in (self.probe_dir / "ctl").glob("*"):
            kind_file.unlink()
        self.clear_queue_error()


_QUEUE_TEMPLATE = """\
qname                 all.q
hostlist              {host}
seq_no                0
load_thresholds       NONE
suspend_thresholds    NONE
nsuspend              1
suspend_interval      00:05:00
priority              0
min_cpu_interval      00:05:00
processors            UNDEFINED
qtype                 BATCH INTERACTIVE
ckpt_list             NONE
pe_list               NONE
rerun                 FALSE
slots                 {slots}
tmpdir                /tmp
shell                 /bin/bash
prolog                {prolog}
epilog                {epilog}
shell_start_mode      posix_compliant
starter_method        NONE
suspend_method        NONE
resume_method         NONE
terminate_method      NONE
notify                00:00:60
owner_list            NONE
user_lists            NONE
xuser_lists           NONE
subordinate_list      NONE
complex_values        NONE
projects              NONE
xprojects             NONE
calendar              NONE
initial_state         default
s_rt                  INFINITY
h_rt                  INFINITY
s_cpu                 INFINITY
h_cpu                 INFINITY
s_fsize               INFINITY
h_fsize               INFINITY
s_data                INFINITY
h_data                INFINITY
s_stack               INFINITY
h_stack               INFINITY
s_core                INFINITY
h_core                INFINITY
s_rss                 INFINITY
h_rss                 INFINITY
s_vmem                INFINITY
h_vmem                INFINITY
"""


# ---------------------------------------------------------------- pytest
try:
    import pytest
except ImportError:  # pragma: no cover - the harness is usable without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def sge_cluster():
        """The single-node SGE cluster, up for the whole session: the shipped
        JSV (prolog/sge-jsv) is set, no prolog/epilog."""
        if os.geteuid() != 0:
            pytest.skip("SGE tests need root")
        cluster = SgeCluster()
        cluster.up(jsv=cluster.install_file(JSV_SCRIPT))
        yield cluster
        if os.environ.get("CONDA_STAGE_KEEP_SGE") != "1":
            cluster.down(wipe=True)

    @pytest.fixture
    def sge(sge_cluster):
        """``sge_cluster``, reset after the test (jobs deleted, hooks/JSV restored, queue error cleared)."""
        yield sge_cluster
        sge_cluster.reset()
