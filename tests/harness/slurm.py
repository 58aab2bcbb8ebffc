"""A real single-node Slurm cluster (22.05, Debian 12) that the test suite starts and stops itself.

munged, slurmctld and slurmd are started by hand (no systemd), with a configuration that lives
entirely under ``base`` (default ``TEST_BASE/"slurm"``); nothing is written to /etc/slurm.
Client commands find the cluster through ``SLURM_CONF``: use :attr:`SlurmCluster.env` or the
helpers below, which all set it.  Needs root.

Typical use (the fixtures at the end of this file do the up/down)::

    from tests.harness.slurm import SlurmCluster
    from tests.harness.users import ensure_user

    cluster = SlurmCluster()
    cluster.up(prolog="/abs/prolog", epilog="/abs/epilog", task_prolog="/abs/task_prolog")
    try:
        alice = ensure_user("csalice")
        jid = cluster.submit(alice, "#SBATCH --comment=conda_env=foo\\necho hi\\n")
        info = cluster.wait(jid)              # returns once the job left squeue (Epilog done)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0"
        assert "hi" in cluster.output(jid)
        # sets all four hooks (unnamed ones: none) and runs scontrol reconfigure, ~50 ms
        cluster.configure_hooks(prolog="/abs/other_prolog", epilog="/abs/epilog")
    finally:
        cluster.down()

Layout under ``base``: ``etc/slurm.conf``, ``state/`` (slurmctld), ``spool/`` (slurmd), ``run/``
(pidfiles), ``log/slurmctld.log`` and ``log/slurmd.log`` (previous run: ``*.prev``), ``hooks/``
(files copied in with :meth:`SlurmCluster.install_file`), ``work/<user>/`` (per-user job scripts
and default job outputs, owned by the user; emptied by the next :meth:`SlurmCluster.up`).

Facts this relies on (measured on this machine, see tests/test_slurm_harness.py):
- proctrack/linuxproc + task/none; cgroup/v2 fails on this hybrid-cgroup host.
- Prolog/Epilog run as root with SLURM_JOB_COMMENT, SLURM_JOB_UID, SLURM_JOB_USER, SLURM_CONF, but no
  PATH and none of the job's --export variables. TaskProlog/TaskEpilog run as the job user with the
  job's environment; "export X=y" / "print text" lines they print reach the job.
- With PrologFlags=Alloc (the default here) the Prolog finishes before the batch script starts.
- A failing Prolog drains the node (Reason "Prolog error") and requeues+holds the job; the Epilog
  still runs.  Use :meth:`resume_node` and :meth:`release`.  While the Epilog runs the job already
  shows Reason "launch failed requeued held" but JobState COMPLETING; then PENDING.
- Batch jobs start on slurmctld's 1 s scheduling tick: ~1 s per trivial job (submit until it left
  squeue), ~3 s for the first job after up().  ``$CS_SLURM_SCHED_PARAMS`` overrides
  SchedulerParameters (default sched_interval=1).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import signal as _signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

from .users import TEST_BASE, User, ensure_user, run_as

FILES = Path(__file__).resolve().parent / "files" / "slurm"
"""Shell files shipped with the harness (e.g. ``loghook.sh``)."""

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOOK_KEYS = ("Prolog", "Epilog", "TaskProlog", "TaskEpilog")
UserLike = Union[User, str, None]
_LOCKED_BASES: Dict[str, "SlurmCluster"] = {}  # base -> the object in this process holding its lock


class SlurmError(RuntimeError):
    """A Slurm command or daemon failed; the message carries its output and log tails."""


@dataclass
class JobResult:
    jobid: str
    info: Dict[str, str]
    output: str

    @property
    def state(self) -> str:
        return self.info.get("JobState", "")


def _tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path}: missing)"
    return f"--- {path} (last {n} lines)\n" + "\n".join(lines[-n:])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _pid_comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like slurm: ignore TIME_WAIT
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def parse_scontrol_oneliner(line: str) -> Dict[str, str]:
    """Parse one line of ``scontrol -o show job|node`` into a dict.

    Tokens are separated by spaces; a token without ``=`` belongs to the previous value
    (e.g. ``Reason=Prolog error``).  Values keep everything after the first ``=``
    (``Comment=conda_env=foo`` -> ``{"Comment": "conda_env=foo"}``).
    """
    out: Dict[str, str] = {}
    last = None
    for tok in line.split():
        key, sep, val = tok.partition("=")
        if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9_:/.\-]*", key):
            out[key] = val
            last = key
        elif last is not None:
            out[last] += " " + tok
    return out


class SlurmCluster:
    """munged + slurmctld + slurmd on this host, configured under ``base``.

    ``node``: NodeName (default: short hostname).  Ports default to 6817/6818; if either is taken
    (by another cluster on this machine) the next free pair 6819/6820, ... is used.
    """

    def __init__(self, base: Union[Path, str, None] = None, *, node: Optional[str] = None,
                 ctld_port: int = 6817, lock_timeout: float = 900.0):
        self.base = Path(base) if base is not None else TEST_BASE / "slurm"
        self.node = node or socket.gethostname().split(".")[0]
        self.preferred_port = ctld_port
        self.ctld_port = ctld_port
        self.slurmd_port = ctld_port + 1
        self.lock_timeout = lock_timeout
        self.etc = self.base / "etc"
        self.conf_path = self.etc / "slurm.conf"
        self.run_dir = self.base / "run"
        self.log_dir = self.base / "log"
        self.hooks_dir = self.base / "hooks"
        self.work_dir = self.base / "work"
        self.ctld_log = self.log_dir / "slurmctld.log"
        self.slurmd_log = self.log_dir / "slurmd.log"
        self.first_job_id: Optional[int] = None
        self.hooks: Dict[str, Optional[str]] = {k: None for k in HOOK_KEYS}
        self.prolog_flags = "Alloc"
        self.extra_conf = ""
        self.sched_params = os.environ.get("CS_SLURM_SCHED_PARAMS", "sched_interval=1")
        self.started_munged = False
        self.timings: Dict[str, float] = {}
        self._lock_fd: Optional[int] = None
        self._outputs: Dict[str, Path] = {}

    # ------------------------------------------------------------------ basics
    @property
    def env(self) -> Dict[str, str]:
        """Environment for Slurm client commands (PATH and SLURM_CONF)."""
        return {"PATH": SBIN_PATH, "SLURM_CONF": str(self.conf_path), "LANG": "C.UTF-8"}

    def run(self, argv: Sequence[str], *, timeout: float = 30, check: bool = True,
            input: Optional[str] = None) -> subprocess.CompletedProcess:
        """Run a command as root with :attr:`env` (plus the caller's environment)."""
        env = dict(os.environ)
        env.update(self.env)
        p = subprocess.run(list(argv), env=env, timeout=timeout, capture_output=True, text=True,
                           input=input, stdin=None if input is not None else subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} -> rc {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")
        return p

    def scontrol(self, *args: str, timeout: float = 30, check: bool = True) -> str:
        return self.run(["scontrol", *args], timeout=timeout, check=check).stdout

    def _pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def _read_pid(self, name: str) -> Optional[int]:
        try:
            return int(self._pidfile(name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def daemon_pids(self) -> Dict[str, Optional[int]]:
        """Live PIDs of our slurmctld / slurmd / munged (munged only if we started it)."""
        out: Dict[str, Optional[int]] = {}
        for name, pf in (("slurmctld", "slurmctld"), ("slurmd", "slurmd"), ("munged", "munged.ours")):
            pid = self._read_pid(pf)
            out[name] = pid if pid and _pid_alive(pid) and _pid_comm(pid) == name else None
        return out

    def is_up(self) -> bool:
        p = self.daemon_pids()
        return bool(p["slurmctld"] and p["slurmd"])

    def log_tails(self, n: int = 25) -> str:
        return "\n".join(_tail(p, n) for p in (self.ctld_log, self.slurmd_log))

    # ------------------------------------------------------------------ lock
    def _acquire_lock(self) -> None:
        """One cluster per ``base`` at a time (another pytest session waits here)."""
        if self._lock_fd is not None:
            return
        key = str(self.base.resolve())
        holder = _LOCKED_BASES.get(key)
        if holder is not None and holder is not self:
            raise SlurmError(f"another SlurmCluster object in this process already runs {self.base}")
        self.base.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.base / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise SlurmError(f"{self.base}/.lock held by another session for {self.lock_timeout}s")
                time.sleep(1)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        _LOCKED_BASES[key] = self

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            if _LOCKED_BASES.get(str(self.base.resolve())) is self:
                del _LOCKED_BASES[str(self.base.resolve())]
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------ install
    @staticmethod
    def packages_installed() -> bool:
        return all(shutil.which(b, path=SBIN_PATH) for b in ("slurmctld", "slurmd", "sbatch", "munged"))

    @staticmethod
    def install_packages(timeout: float = 1200) -> None:
        """apt-get install the Debian packages (waits up to 600 s for the dpkg lock)."""
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", PATH=SBIN_PATH)
        lock = ["-o", "DPkg::Lock::Timeout=600"]
        install = ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
        p = subprocess.run(install, env=env, timeout=timeout, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
        if p.returncode != 0:  # stale package lists? update once and retry
            u = subprocess.run(["apt-get", *lock, "update", "-q"], env=env, timeout=timeout,
                               capture_output=True, text=True, stdin=subprocess.DEVNULL)
            p = subprocess.run(install, env=env, timeout=timeout, capture_output=True, text=True,
                               stdin=subprocess.DEVNULL)
            if p.returncode != 0:
                raise SlurmError(f"apt-get install failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n"
                                 f"{p.stderr[-3000:]}\napt-get update: {u.stderr[-1000:]}")

    # ------------------------------------------------------------------ munge
    def _munge_ok(self) -> bool:
        try:
            cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10,
                                  stdin=subprocess.DEVNULL)
            if cred.returncode != 0:
                return False
            return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True,
                                  timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _ensure_munged(self) -> None:
        key = Path("/etc/munge/munge.key")
        if not key.is_file() or key.stat().st_size == 0:
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(os.urandom(1024))
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        Path("/run/munge").chmod(0o755)
        if self._munge_ok():
            return
        for f in ("/run/munge/munge.socket.2", "/run/munge/munge.socket.2.lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, timeout=30,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       env={"PATH": SBIN_PATH})
        deadline = time.monotonic() + 10
        while not self._munge_ok():
            if time.monotonic() > deadline:
                raise SlurmError("munged started but munge -n | unmunge still fails; see /var/log/munge/munged.log")
            time.sleep(0.1)
        pid = Path("/run/munge/munged.pid").read_text().strip()
        self._pidfile("munged.ours").write_text(pid + "\n")
        self.started_munged = True

    # ------------------------------------------------------------------ config
    def _node_hw(self) -> str:
        p = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30,
                           env={"PATH": SBIN_PATH}, stdin=subprocess.DEVNULL)
        first = p.stdout.splitlines()[0] if p.stdout else ""
        keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
        return " ".join(t for t in first.split() if t.split("=", 1)[0] in keep)

    @staticmethod
    def _check_hook(path: Optional[Union[str, Path]]) -> Optional[str]:
        if path is None:
            return None
        p = Path(path)
        if not p.is_absolute():
            raise ValueError(f"hook path must be absolute: {path}")
        if not p.is_file() or not os.access(p, os.X_OK):
            raise FileNotFoundError(f"hook is not an executable file: {path}")
        return str(p)

    def _render_conf(self) -> str:
        mem = 1024
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    mem = max(1024, int(line.split()[1]) // 1024 - 512)
        b = self.base
        lines = [
            "# written by tests/harness/slurm.py; rewritten by configure_hooks()",
            "ClusterName=cstest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "AuthType=auth/munge",
            "CryptoType=crypto/munge",
            f"StateSaveLocation={b}/state",
            f"SlurmdSpoolDir={b}/spool",
            f"SlurmctldPidFile={self._pidfile('slurmctld')}",
            f"SlurmdPidFile={self._pidfile('slurmd')}",
            f"SlurmctldLogFile={self.ctld_log}",
            f"SlurmdLogFile={self.slurmd_log}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobContainerType=job_container/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            f"SchedulerParameters={self.sched_params}",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "ReturnToService=2",
            f"FirstJobId={self.first_job_id}",
            "MinJobAge=3600",
            "MaxJobCount=100000",
            "KillWait=5",
            "InactiveLimit=0",
            "OverTimeLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "MessageTimeout=10",
        ]
        if self.prolog_flags:
            lines.append(f"PrologFlags={self.prolog_flags}")
        for key in HOOK_KEYS:
            if self.hooks[key]:
                lines.append(f"{key}={self.hooks[key]}")
        if self.extra_conf.strip():
            lines.append(self.extra_conf.strip())
        lines += [
            f"NodeName={self.node} NodeAddr=127.0.0.1 NodeHostname={self.node} {self._hw} "
            f"RealMemory={mem} Features=conda,stage State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        return "\n".join(lines) + "\n"

    def _write_conf(self) -> None:
        tmp = self.conf_path.with_suffix(".tmp")
        tmp.write_text(self._render_conf())
        tmp.chmod(0o644)
        os.replace(tmp, self.conf_path)

    def _pick_first_job_id(self) -> int:
        """Unique per up(): 100 ids per second of wall clock, never below the last run's ids."""
        first = 1_000_000 + int(time.time() * 100) % 60_000_000
        marker = self.run_dir / "last_first_job_id"
        with contextlib.suppress(OSError, ValueError):
            last = int(marker.read_text())
            if first <= last < first + 1_000_000:  # (no wrap-around in between)
                first = last + 10_000
        marker.write_text(f"{first}\n")
        return first

    def _pick_ports(self) -> None:
        for port in range(self.preferred_port, self.preferred_port + 40, 2):
            if _port_free(port) and _port_free(port + 1):
                self.ctld_port, self.slurmd_port = port, port + 1
                return
        raise SlurmError(f"no free port pair in {self.preferred_port}..{self.preferred_port + 40}")

    # ------------------------------------------------------------------ up / down
    def up(self, prolog: Optional[str] = None, epilog: Optional[str] = None,
           task_prolog: Optional[str] = None, task_epilog: Optional[str] = None,
           prolog_flags: str = "Alloc", extra_conf: str = "", timeout: float = 60) -> "SlurmCluster":
        """Install packages if missing, write slurm.conf, start munged/slurmctld/slurmd, wait for idle.

        Hooks are absolute paths of executables (None: no such line).  ``extra_conf`` is appended to
        slurm.conf verbatim.  Any cluster of ours still running under ``base`` is stopped first.
        """
        t0 = time.monotonic()
        self._acquire_lock()
        try:
            if not self.packages_installed():
                self.install_packages()
            t1 = time.monotonic()
            self.timings["install"] = t1 - t0
            self._stop_daemons()  # leftovers of a crashed earlier session, by pidfile
            for d in ("etc", "state", "spool", "run", "log", "hooks", "work"):
                (self.base / d).mkdir(parents=True, exist_ok=True)
            for d in ("state", "spool", "work"):  # job outputs of the previous run go too
                shutil.rmtree(self.base / d)
                (self.base / d).mkdir()
            for d in (TEST_BASE, self.base, self.etc, self.hooks_dir, self.work_dir):
                # job users must traverse these (their work dirs and TaskProlog live below)
                if d.is_dir() and d.stat().st_uid == 0:
                    d.chmod(d.stat().st_mode & 0o7777 | 0o755)
            for log in (self.ctld_log, self.slurmd_log):
                if log.exists():
                    os.replace(log, log.with_name(log.name + ".prev"))
            self.hooks = {"Prolog": self._check_hook(prolog), "Epilog": self._check_hook(epilog),
                          "TaskProlog": self._check_hook(task_prolog),
                          "TaskEpilog": self._check_hook(task_epilog)}
            self.prolog_flags = prolog_flags or ""
            self.extra_conf = extra_conf or ""
            self.first_job_id = self._pick_first_job_id()
            self._hw = self._node_hw()
            self._pick_ports()
            self._write_conf()
            self._ensure_munged()
            self._start_daemon(["slurmctld", "-f", str(self.conf_path), "-c"], "slurmctld", self.ctld_log)
            self._start_daemon(["slurmd", "-f", str(self.conf_path), "-N", self.node], "slurmd",
                               self.slurmd_log)
            self.wait_idle(timeout, resume=True)
            self.timings["start"] = time.monotonic() - t1
            self.timings["up"] = time.monotonic() - t0
        except BaseException:
            with contextlib.suppress(Exception):
                self._stop_daemons()
            self._stop_munged()
            self._release_lock()
            raise
        return self

    def _start_daemon(self, argv: List[str], name: str, log: Path) -> None:
        err = self.log_dir / f"{name}.stderr"
        with open(err, "ab") as ef:
            p = subprocess.run(argv, env={"PATH": SBIN_PATH, "LANG": "C.UTF-8"}, timeout=60,
                               stdin=subprocess.DEVNULL, stdout=ef, stderr=ef, cwd="/")
        deadline = time.monotonic() + 10
        while p.returncode == 0 and not self.daemon_pids()[name]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if p.returncode != 0 or not self.daemon_pids()[name]:
            raise SlurmError(f"{name} failed to start (rc {p.returncode})\n{_tail(err, 10)}\n{_tail(log)}")

    def _signal_and_wait(self, pids: Dict[str, int], timeout: float) -> None:
        for name, pid in pids.items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, _signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(_pid_alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for name, pid in pids.items():
            if _pid_alive(pid) and _pid_comm(pid) == name:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, _signal.SIGKILL)
        deadline = time.monotonic() + 5
        while any(_pid_alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _stop_daemons(self, timeout: float = 15) -> None:
        live = self.daemon_pids()
        pids = {n: p for n, p in live.items() if p and n in ("slurmctld", "slurmd")}
        if pids:
            self._signal_and_wait(pids, timeout)
        for n in ("slurmctld", "slurmd"):
            with contextlib.suppress(FileNotFoundError):
                self._pidfile(n).unlink()

    def _stop_munged(self, timeout: float = 10) -> None:
        pid = self.daemon_pids()["munged"]
        if pid:
            self._signal_and_wait({"munged": pid}, timeout)
        with contextlib.suppress(FileNotFoundError):
            self._pidfile("munged.ours").unlink()
        self.started_munged = False

    def down(self, *, cancel_timeout: float = 20, stop_munged: bool = True) -> None:
        """Cancel all jobs, wait for their Epilogs, stop slurmd/slurmctld (and munged if ours).

        Safe to call twice and after a failed :meth:`up`.  Only PIDs from our pidfiles are signalled.
        """
        t0 = time.monotonic()
        try:
            if self.daemon_pids()["slurmctld"] and self.conf_path.exists():
                with contextlib.suppress(Exception):
                    if self.queue():
                        self.run(["scancel", "--full", "--partition=debug"], timeout=30, check=False)
                        self._wait_for(lambda: not self.queue(), cancel_timeout, "queue empty")
            self._stop_daemons()
            if stop_munged:
                self._stop_munged()
        finally:
            self._release_lock()
        def stepds() -> List[str]:
            return subprocess.run(["pgrep", "-x", "slurmstepd"], capture_output=True, text=True,
                                  timeout=10).stdout.split()
        deadline = time.monotonic() + 5  # a step daemon may still be exiting after its job left squeue
        while stepds() and time.monotonic() < deadline:
            time.sleep(0.1)
        left = stepds()
        if left:
            print(f"slurm harness: warning: slurmstepd still running: {' '.join(left)}")
        self.timings["down"] = time.monotonic() - t0

    # ------------------------------------------------------------------ hooks
    def install_file(self, src: Union[str, Path], name: Optional[str] = None, mode: int = 0o755) -> Path:
        """Copy ``src`` into ``base/hooks/`` (root-owned, world-readable) and return the new path.

        Use it for hooks that the job user must be able to execute (TaskProlog/TaskEpilog): the
        source tree itself may not be readable by the test users.
        """
        self.hooks_dir.mkdir(parents=True, exist_ok=True)
        dst = self.hooks_dir / (name or Path(src).name)
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copyfile(src, tmp)
        tmp.chmod(mode)
        os.replace(tmp, dst)
        return dst

    def configure_hooks(self, prolog: Optional[str] = None, epilog: Optional[str] = None,
                        task_prolog: Optional[str] = None, task_epilog: Optional[str] = None,
                        *, prolog_flags: Optional[str] = None, extra_conf: Optional[str] = None,
                        restart: bool = False, timeout: float = 30) -> None:
        """Set all four hooks (None: no hook), rewrite slurm.conf and ``scontrol reconfigure``.

        ``prolog_flags`` / ``extra_conf``: None keeps the current value.  Returns once slurmctld
        reports the new hooks and slurmd has re-read the file (measured: 30-60 ms; the very next
        job uses the new hooks).  PrologFlags changes (Alloc, Contain, none) also apply through
        reconfigure.  ``restart=True`` restarts slurmctld and slurmd instead (keeping job state),
        for ``extra_conf`` settings that reconfigure does not apply (e.g. JobContainerType).
        Call it with no jobs running.
        """
        t0 = time.monotonic()
        self.hooks = {"Prolog": self._check_hook(prolog), "Epilog": self._check_hook(epilog),
                      "TaskProlog": self._check_hook(task_prolog),
                      "TaskEpilog": self._check_hook(task_epilog)}
        if prolog_flags is not None:
            self.prolog_flags = prolog_flags
        if extra_conf is not None:
            self.extra_conf = extra_conf
        self._write_conf()
        if restart:
            self._restart_daemons(timeout)
        else:
            mark = self.slurmd_log.stat().st_size if self.slurmd_log.exists() else 0
            self.scontrol("reconfigure", timeout=timeout)
            self._wait_for(lambda: self._config_applied(mark), timeout, "reconfigure applied")
        self.timings["configure_hooks"] = time.monotonic() - t0

    def _config_applied(self, slurmd_log_mark: int) -> bool:
        cfg = self.show_config()
        want = {f.strip().lower() for f in self.prolog_flags.split(",") if f.strip()}
        have = {f.strip().lower() for f in cfg.get("PrologFlags", "").split(",")} - {"", "(null)"}
        if not want <= have or (not want and have):  # "Contain" shows as "Alloc,Contain"
            return False
        for key in HOOK_KEYS:
            want = self.hooks[key] or "(null)"
            if cfg.get(key, "(null)") != want:
                return False
        try:
            with open(self.slurmd_log, "rb") as f:
                f.seek(slurmd_log_mark)
                new = f.read().decode(errors="replace")
        except OSError:
            return False
        # slurmd logs nothing specific at SlurmdDebug=info, but re-reading the config always logs
        # "CPU frequency setting not configured for this node" (and the pmix noise)
        return bool(new.strip())

    def _restart_daemons(self, timeout: float) -> None:
        # keep job state (no -c) so job ids keep growing and finished jobs stay visible
        self._stop_daemons()
        self._start_daemon(["slurmctld", "-f", str(self.conf_path)], "slurmctld", self.ctld_log)
        self._start_daemon(["slurmd", "-f", str(self.conf_path), "-N", self.node], "slurmd",
                           self.slurmd_log)
        self.wait_idle(timeout, resume=True)

    @contextlib.contextmanager
    def hooks_configured(self, prolog: Optional[str] = None, epilog: Optional[str] = None,
                         task_prolog: Optional[str] = None, task_epilog: Optional[str] = None,
                         *, prolog_flags: Optional[str] = None,
                         extra_conf: Optional[str] = None) -> Iterator["SlurmCluster"]:
        """``with cluster.hooks_configured(prolog=...):`` -- restores the previous hooks afterwards."""
        saved = (dict(self.hooks), self.prolog_flags, self.extra_conf)
        self.configure_hooks(prolog, epilog, task_prolog, task_epilog,
                             prolog_flags=prolog_flags, extra_conf=extra_conf)
        try:
            yield self
        finally:
            self.ensure_clean()
            h, flags, extra = saved
            self.configure_hooks(h["Prolog"], h["Epilog"], h["TaskProlog"], h["TaskEpilog"],
                                 prolog_flags=flags, extra_conf=extra)

    def show_config(self) -> Dict[str, str]:
        """``scontrol show config`` as a dict (what slurmctld currently uses)."""
        out: Dict[str, str] = {}
        for line in self.scontrol("show", "config").splitlines():
            k, sep, v = line.partition("=")
            if sep:
                out[k.strip()] = v.strip()
        return out

    # ------------------------------------------------------------------ jobs
    def user_workdir(self, user: UserLike) -> Path:
        """``base/work/<user>``: owned by the user, mode 0755; scripts and default outputs go here."""
        u = self._user(user)
        d = self.work_dir / (u.name if u else "root")
        d.mkdir(parents=True, exist_ok=True)
        if u:
            os.chown(d, u.uid, u.gid)
        d.chmod(0o755)
        return d

    @staticmethod
    def _user(user: UserLike) -> Optional[User]:
        if user is None or isinstance(user, User):
            return user
        if user == "root":
            return None
        return ensure_user(user)

    def submit(self, user: UserLike, script_text: str, *sbatch_args: str,
               cwd: Union[str, Path, None] = None, env: Optional[Dict[str, str]] = None,
               timeout: float = 60) -> str:
        """Write ``script_text`` to a file owned by ``user`` and ``sbatch --parsable`` it as that user.

        ``user``: a :class:`User`, a user name (created if missing) or None/"root".
        The script gets ``#!/bin/bash`` unless it has a shebang.  ``cwd`` (default: the user's
        work dir) is the job's working directory.  Unless ``-o/--output`` is given in
        ``sbatch_args`` or as ``#SBATCH`` line, stdout+stderr go to ``<workdir>/slurm-%j.out``.
        The submitting environment is clean (PATH, HOME, USER, LOGNAME, SLURM_CONF + ``env``),
        and sbatch exports it to the job.  Returns the job id as str.
        """
        u = self._user(user)
        wd = self.user_workdir(u)
        if not script_text.startswith("#!"):
            script_text = "#!/bin/bash\n" + script_text
        fd, name = tempfile.mkstemp(prefix="job-", suffix=".sh", dir=wd)
        with os.fdopen(fd, "w") as f:
            f.write(script_text)
        os.chmod(name, 0o755)
        if u:
            os.chown(name, u.uid, u.gid)
        argv = ["sbatch", "--parsable", "-D", str(cwd or wd)]
        has_out = any(a in ("-o", "--output") or a.startswith(("--output=", "-o")) for a in sbatch_args) \
            or re.search(r"^#SBATCH\s+(-o|--output)", script_text, re.M)
        default_out = wd / "slurm-%j.out"
        if not has_out:
            argv += ["-o", str(default_out)]
        argv += [*sbatch_args, name]
        e = {"PATH": "/usr/local/bin:/usr/bin:/bin", "SLURM_CONF": str(self.conf_path)}
        e.update(env or {})
        p = run_as(u, argv, env=e, cwd=str(cwd or wd), timeout=timeout)
        if p.returncode != 0:
            raise SlurmError(f"sbatch as {u.name if u else 'root'} failed (rc {p.returncode}): "
                             f"{p.stderr.strip()}\nargv: {argv}")
        jobid = p.stdout.strip().split(";")[0]
        if not jobid.isdigit():
            raise SlurmError(f"unexpected sbatch output: {p.stdout!r} {p.stderr!r}")
        if not has_out:
            self._outputs[jobid] = Path(str(default_out).replace("%j", jobid))
        return jobid

    def queue(self) -> List[str]:
        """Job ids currently in squeue (any state, including COMPLETING)."""
        p = self.run(["squeue", "-h", "-o", "%i"], timeout=30, check=False)
        return p.stdout.split() if p.returncode == 0 else []

    def in_queue(self, jobid: str) -> bool:
        p = self.run(["squeue", "-h", "-j", str(jobid), "-o", "%T"], timeout=30, check=False)
        # a job slurmctld forgot: rc 1, "Invalid job id specified"
        return p.returncode == 0 and bool(p.stdout.strip())

    def job_info(self, jobid: str) -> Dict[str, str]:
        """``scontrol -o show job`` fields (JobState, ExitCode, Reason, Comment, StdOut, ...)."""
        out = self.scontrol("-o", "show", "job", str(jobid)).strip()
        return parse_scontrol_oneliner(out.splitlines()[0]) if out else {}

    def job_state(self, jobid: str) -> str:
        return self.job_info(jobid).get("JobState", "")

    def _wait_for(self, cond: Callable[[], bool], timeout: float, what: str,
                  interval: float = 0.1) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{self.log_tails()}")
            time.sleep(interval)

    def wait_for(self, cond: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
        """Poll ``cond()`` every 0.1 s; TimeoutError (with log tails) after ``timeout``."""
        self._wait_for(cond, timeout, what)

    def wait_started(self, jobid: str, timeout: float = 60) -> Dict[str, str]:
        """Wait until the job is RUNNING (or already past it); returns job_info."""
        def started() -> bool:
            return self.job_state(jobid) not in ("PENDING", "CONFIGURING", "")
        self._wait_for(started, timeout, f"job {jobid} to start")
        return self.job_info(jobid)

    def wait(self, jobid: str, timeout: float = 120) -> Dict[str, str]:
        """Wait until the job has left squeue (so its Epilog has finished); return job_info."""
        jobid = str(jobid)
        try:
            self._wait_for(lambda: not self.in_queue(jobid), timeout, f"job {jobid} to leave squeue")
        except TimeoutError as e:
            info = self.job_info(jobid)
            raise TimeoutError(f"job {jobid} still queued: JobState={info.get('JobState')} "
                               f"Reason={info.get('Reason')}\n{e}") from None
        return self.job_info(jobid)

    def output(self, jobid: str, timeout: float = 5) -> str:
        """Text of the job's stdout file (default path, else StdOut from scontrol).

        Waits up to ``timeout`` seconds for the file to appear; FileNotFoundError if it does not.
        """
        jobid = str(jobid)
        path = self._outputs.get(jobid)
        if path is None:
            stdout = self.job_info(jobid).get("StdOut", "")
            if not stdout:
                raise FileNotFoundError(f"job {jobid}: no StdOut known")
            path = Path(stdout.replace("%j", jobid))
        deadline = time.monotonic() + timeout
        while not path.is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        return path.read_text(errors="replace")

    def run_job(self, user: UserLike, script_text: str, *sbatch_args: str,
                timeout: float = 120, **kw) -> JobResult:
        """submit + wait + output in one call."""
        jid = self.submit(user, script_text, *sbatch_args, **kw)
        info = self.wait(jid, timeout)
        out = ""
        with contextlib.suppress(OSError):
            out = self.output(jid, timeout=1)
        return JobResult(jid, info, out)

    def cancel(self, jobid: str, signal: Optional[str] = None, *, full: bool = False) -> None:
        """``scancel [--signal=SIG] [--full] JOBID``.

        Without ``signal`` the whole job is cancelled.  With ``signal`` (e.g. "USR1") Slurm sends it
        to the job steps only, not to the batch shell, unless ``full=True``.
        """
        argv = ["scancel"]
        if signal:
            argv.append(f"--signal={signal}")
        if full:
            argv.append("--full")
        self.run(argv + [str(jobid)], timeout=30)

    def release(self, jobid: str, start_now: bool = True) -> None:
        """Release a held job (e.g. after a Prolog failure) and skip the 120 s requeue delay."""
        self.scontrol("release", str(jobid))
        if start_now:
            self.scontrol("update", f"jobid={jobid}", "StartTime=now")

    # ------------------------------------------------------------------ node
    def node_info(self) -> Dict[str, str]:
        out = self.scontrol("-o", "show", "node", self.node).strip()
        return parse_scontrol_oneliner(out.splitlines()[0]) if out else {}

    def node_state(self) -> str:
        """``sinfo -o %T``: "idle", "allocated", "mixed", "completing", "drained", "draining", "down", ...

        A trailing "*" (not responding) or "~" etc. is kept as sinfo prints it.
        """
        return self.run(["sinfo", "-h", "-n", self.node, "-o", "%T"], timeout=30).stdout.strip()

    def node_reason(self) -> str:
        """The node's Reason (e.g. "Prolog error", "Epilog error"), "" if none."""
        r = self.node_info().get("Reason", "")
        return re.sub(r"\s*\[[^\]]*\]$", "", r)  # drop " [root@2024-...]"

    def resume_node(self, wait: bool = True, timeout: float = 30) -> None:
        """``scontrol update nodename=N state=resume`` (and wait for idle)."""
        self.scontrol("update", f"nodename={self.node}", "state=resume", check=False)
        if wait:
            self.wait_idle(timeout)

    def wait_idle(self, timeout: float = 60, *, resume: bool = False) -> None:
        """Wait until the node is idle; with ``resume``, resume it when drained/down."""
        def idle() -> bool:
            p = self.run(["sinfo", "-h", "-n", self.node, "-o", "%T"], timeout=30, check=False)
            st = p.stdout.strip()
            if resume and any(s in st for s in ("drain", "down", "fail")):
                self.scontrol("update", f"nodename={self.node}", "state=resume", check=False)
            return st == "idle"
        self._wait_for(idle, timeout, f"node {self.node} idle", interval=0.1)

    def ensure_clean(self, timeout: float = 30) -> None:
        """Cancel leftover jobs, wait until the queue is empty and the node is idle (resume if drained)."""
        if self.queue():
            self.run(["scancel", "--full", "--partition=debug"], timeout=30, check=False)
            self._wait_for(lambda: not self.queue(), timeout, "queue empty")
        self.wait_idle(timeout, resume=True)


# ---------------------------------------------------------------------- loghook helper
@dataclass
class HookRun:
    """One run of files/slurm/loghook.sh (see that file)."""
    hook: str          # prolog_slurmd | epilog_slurmd | prolog_task | epilog_task
    meta: Dict[str, str]
    env: Dict[str, str]

    @property
    def uid(self) -> int:
        return int(self.meta["uid"])

    @property
    def start(self) -> float:
        return float(self.meta["start"])

    @property
    def end(self) -> Optional[float]:
        return float(self.meta["end"]) if "end" in self.meta else None


class LogHook:
    """files/slurm/loghook.sh installed as ``base/hooks/loghook.sh`` with its log dir next to it."""

    def __init__(self, cluster: SlurmCluster, *, clear: bool = True):
        self.path = cluster.install_file(FILES / "loghook.sh")
        self.logdir = self.path.parent / "hooklog"
        if clear:  # old logs and stale FAIL_/SLEEP_ markers of earlier runs
            shutil.rmtree(self.logdir, ignore_errors=True)
        self.logdir.mkdir(exist_ok=True)
        self.logdir.chmod(0o1777)  # TaskProlog/TaskEpilog write here as the job user

    def runs(self, jobid: str, hook: Optional[str] = None) -> List[HookRun]:
        out = []
        pattern = f"{hook or '*'}.{jobid}.*.meta"
        for meta_file in sorted(self.logdir.glob(pattern)):
            meta = dict(l.split("=", 1) for l in meta_file.read_text().splitlines() if "=" in l)
            env_file = meta_file.with_suffix(".env")
            env: Dict[str, str] = {}
            with contextlib.suppress(OSError):
                for item in env_file.read_bytes().decode(errors="replace").split("\0"):
                    k, sep, v = item.partition("=")
                    if sep:
                        env[k] = v
            out.append(HookRun(meta["hook"], meta, env))
        return sorted(out, key=lambda r: r.start)

    def marker(self, name: str, content: Optional[str] = "") -> None:
        """Create (content str) or remove (None) a marker like FAIL_prolog_slurmd / SLEEP_epilog_slurmd."""
        p = self.logdir / name
        if content is None:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        else:
            p.write_text(content)


# ---------------------------------------------------------------------- pytest fixtures
try:
    import pytest
except ImportError:  # pragma: no cover - the harness is only used under pytest
    pytest = None

if pytest is not None:

    # One cluster per process even if these fixtures get registered twice (conftest + a test
    # module importing them): both FixtureDefs share it, the last teardown stops it.
    _SESSION: Dict[str, object] = {"cluster": None, "users": 0}

    @pytest.fixture(scope="session")
    def slurm_cluster():
        """A running cluster with no hooks and PrologFlags=Alloc, shared by the whole session.

        Test modules that need hooks: ``with slurm_cluster.hooks_configured(prolog=...):`` in a
        module-scoped fixture (restores the no-hook config afterwards).
        """
        if os.geteuid() != 0:
            pytest.skip("the Slurm harness needs root")
        if _SESSION["cluster"] is None:
            cluster = SlurmCluster()
            try:
                cluster.up()
            except BaseException:
                cluster.down()
                raise
            _SESSION["cluster"] = cluster
        _SESSION["users"] = int(_SESSION["users"]) + 1
        try:
            yield _SESSION["cluster"]
        finally:
            _SESSION["users"] = int(_SESSION["users"]) - 1
            if _SESSION["users"] == 0 and _SESSION["cluster"] is not None:
                c, _SESSION["cluster"] = _SESSION["cluster"], None
                c.down()  # type: ignore[attr-defined]

    @pytest.fixture
    def slurm(slurm_cluster):
        """Function-scoped: the session cluster, with an empty queue and an idle node before the test."""
        slurm_cluster.ensure_clean()
        yield slurm_cluster
