"""``conda-stage doctor``: check a node's setup against the rules the hooks
live by, and say what to fix.

The checks are the hooks' own (:func:`conda_stage.config.trust_problem`,
:func:`conda_stage.jobdir.open_base`), so what doctor calls fine is what a
prolog will accept.  Each finding is one line: ``ok``, ``warn`` (works, but
not as well as it could) or ``FAIL`` (the hooks will refuse, or a user could
take over something root runs).
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from .config import SITE_FILE, Config, UntrustedSettings, trust_problem
from .errors import StageError
from .jobdir import UnsafeBase, open_base

HOOK_NAMES = ("slurm-prolog", "slurm-task-prolog", "slurm-epilog", "sge-prolog", "sge-epilog")


class Report:
    def __init__(self):
        self.lines: list[str] = []
        self.failures = 0

    def ok(self, text: str) -> None:
        self.lines.append(f"ok    {text}")

    def warn(self, text: str) -> None:
        self.lines.append(f"warn  {text}")

    def fail(self, text: str) -> None:
        self.failures += 1
        self.lines.append(f"FAIL  {text}")


def run(site_file: str = SITE_FILE) -> Report:
    report = Report()
    config = _site_file(report, site_file)
    if config is None:
        return report
    _python(report, config)
    _folder(report, "staging folder (staging_dir)", config.staging_dir)
    _folder(report, "state folder (state_dir)", config.state_dir)
    _space(report, config.staging_dir)
    _store(report, config)
    _log_file(report, config)
    _slurm(report)
    _sge(report)
    _fuse(report)
    _mount_safety(report)
    _shell_images(report, config)
    return report


def _shell_images(report: Report, config: Config) -> None:
    """With shell images: <staging_dir>/users must be root's, sticky and
    writable by all, for shells to make their users' folders."""
    if not config.shell_images:
        return
    users = os.path.join(config.staging_dir, "users")
    try:
        st = os.lstat(users)
    except FileNotFoundError:
        report.warn(f"shell images: {users} does not exist: shells extract until a prolog "
                    f"makes it (on a node without the hooks: install -d -m 1733 {users})")
        return
    except OSError as exc:
        report.fail(f"shell images: cannot check {users}: {exc.strerror}")
        return
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
        report.fail(f"shell images: {users} is not a folder of root's (squatted?)")
    elif mode != 0o1733:
        report.warn(f"shell images: {users} has mode {mode:o}, not 1733: shells cannot make "
                    f"their folders until a hook sets it (or: chmod 1733 {users})")
    else:
        report.ok(f"shell images: {users} is root's, mode 1733: 'conda activate' mounts images")


def _store(report: Report, config: Config) -> None:
    """The shared copies on the node, and whether something collects the
    unused ones when no job comes (the hooks sweep only when jobs run)."""
    from .nodestore import NodeStore

    if not config.share_copies:
        report.ok("shared copies are off (CONDA_STAGE_SHARE_COPIES=no): each job extracts "
                  "its own")
        return
    store = NodeStore.from_config(config)
    recs = [r for uid in store.uids() for r in store.records(uid)]
    unused = [r for r in recs if not r.holders]
    report.ok(f"node store: {len(recs)} shared copies ({sum(r.bytes for r in recs) / 1e6:.0f} "
              f"MB), {len(unused)} unused (kept {config.keep_unused:.0f} s, at most "
              f"{config.keep_share:.0%} of the disk); 'conda-stage status --node' lists them")
    if config.keep_unused > 0 and not _gc_scheduled():
        report.warn("no conda-stage-gc.timer and no cron line running 'conda-stage gc --jobs': "
                    "unused copies stay on an idle node until its next job "
                    "(examples/admin/conda-stage-gc.timer)")


def _gc_scheduled() -> bool:
    try:
        r = subprocess.run(["systemctl", "is-enabled", "conda-stage-gc.timer"],
                           capture_output=True, text=True, timeout=10)
        if r.stdout.strip() == "enabled":
            return True
    except (OSError, subprocess.TimeoutExpired):
        pass
    for cron in ("/etc/crontab", *(str(p) for p in Path("/etc/cron.d").glob("*")),
                 "/var/spool/cron/crontabs/root"):
        try:
            if "gc --jobs" in Path(cron).read_text(errors="replace"):
                return True
        except OSError:
            continue
    return False


def _site_file(report: Report, path: str) -> Config | None:
    try:
        config = Config.load(path)
    except UntrustedSettings as exc:
        report.fail(f"{exc}: the hooks stage nothing until only root can change it "
                    f"(chown root: and chmod go-w the file and the folders above it)")
        return None
    except StageError as exc:
        report.fail(f"{path}: {exc}")
        return None
    if os.path.exists(path):
        report.ok(f"{path} is root's alone and parses")
    else:
        report.warn(f"{path} does not exist: built-in defaults are used "
                    f"(examples/admin/conda-stage.defaults documents the settings)")
    return config


def _python(report: Report, config: Config) -> None:
    python = config.python
    if not os.path.exists(python):
        report.fail(f"{python} does not exist: set CONDA_STAGE_PYTHON")
        return
    problem = trust_problem(os.path.realpath(python))
    if problem:
        report.fail(f"{python}: {problem}; root runs it from the hooks")
    venv = Path(python).parent.parent
    writable = _writable_by_others(venv)
    if writable:
        report.fail(f"{writable} in the installation {venv} is writable by group or others")
    if os.geteuid() == 0:
        ran = _runs_as_nobody(python)
        if ran is None:
            report.ok(f"{python} runs conda_stage for an unprivileged user")
        else:
            report.fail(f"{python} cannot run conda_stage as an unprivileged user ({ran}): "
                        f"the TaskProlog and the staging child run as the job user; "
                        f"install into a venv made from a Python every user can run "
                        f"(not one under /root) and 'chmod -R a+rX' it")
    elif not problem and not writable:
        report.ok(f"{python} is root's")


def _writable_by_others(top: Path, limit: int = 20000) -> str | None:
    for n, (root, dirs, files) in enumerate(os.walk(top)):
        if n > limit:
            break
        for name in [*dirs, *files]:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if not stat.S_ISLNK(st.st_mode) and (st.st_mode & 0o022 or st.st_uid != 0):
                return os.path.join(root, name)
    return None


def _runs_as_nobody(python: str) -> str | None:
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        return "no user 'nobody' to try with"
    try:
        r = subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                            "--clear-groups", python, "-I", "-c", "import conda_stage.hooks"],
                           capture_output=True, text=True, timeout=60, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["failed"])[-1]


def _folder(report: Report, what: str, path: str) -> None:
    sticky = _open_parent(path)
    if sticky:
        report.warn(f"{what} {path} is below {sticky}, where any user can create it first "
                    f"and so turn staging off on this node: prefer a root-only parent")
    try:
        os.close(open_base(path, create=False))
        report.ok(f"{what} {path} is root's alone")
    except UnsafeBase as exc:
        if "does not exist" in str(exc):
            report.ok(f"{what} {path} does not exist yet; the first prolog creates it")
        else:
            report.fail(f"{what}: {exc}; the hooks refuse it (choose a folder under a "
                        f"root-only parent, e.g. /var/lib/conda-stage/jobs)")


def _open_parent(path: str) -> str | None:
    """The nearest folder above ``path`` that anyone may create entries in
    (then, at the latest after a reboot cleans it, anyone can create the
    folders below it before root does)."""
    parent = os.path.dirname(os.path.abspath(path))
    chain = []
    while True:
        chain.append(parent)
        if parent == "/":
            break
        parent = os.path.dirname(parent)
    for folder in chain:
        try:
            if os.stat(folder).st_mode & 0o002:
                return folder
        except OSError:
            continue
    return None


def _space(report: Report, path: str) -> None:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError as exc:
        report.warn(f"cannot check free space at {probe}: {exc.strerror}")
        return
    free = st.f_bavail * st.f_frsize
    inodes = st.f_favail
    line = f"{free / 1e9:.1f} GB and {inodes} inodes free for staging at {probe}"
    if free < 5e9 or (st.f_files and inodes < 200000):
        report.warn(line + " (a large environment needs several GB and 50k+ inodes)")
    else:
        report.ok(line)


def _log_file(report: Report, config: Config) -> None:
    if not config.log_file:
        report.ok("log: syslog" if config.syslog else "log: none (set CONDA_STAGE_LOG_FILE "
                                                      "or CONDA_STAGE_SYSLOG=yes)")
        return
    problem = trust_problem(os.path.dirname(config.log_file) or "/")
    if problem:
        report.fail(f"log file {config.log_file}: {problem}")
    else:
        report.ok(f"log file {config.log_file}")


def _slurm(report: Report) -> None:
    if not shutil.which("scontrol"):
        return
    try:
        r = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        r = subprocess.CompletedProcess([], 1, "", str(exc))
    if r.returncode != 0:
        report.warn(f"slurm: 'scontrol show config' failed ({(r.stderr.strip().splitlines() or [''])[-1][:120]}); "
                    f"hook configuration not checked")
        return
    out = r.stdout
    conf = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            conf[key.strip()] = value.strip()
    for key, name in (("Prolog", "slurm-prolog"), ("TaskProlog", "slurm-task-prolog"),
                      ("Epilog", "slurm-epilog")):
        paths = [p for p in conf.get(key, "").split(",") if p and p != "(null)"]
        ours = [p for p in paths if os.path.basename(p) == name]
        if not ours:
            report.fail(f"slurm: {key} does not run conda-stage's {name} (slurm.conf: {key}=...)")
            continue
        _hook_file(report, f"slurm {key}", ours[0])
    if "Alloc" not in conf.get("PrologFlags", ""):
        report.warn("slurm: PrologFlags lacks Alloc: the Prolog runs at the first srun, "
                    "not before the batch script")


def _sge(report: Report) -> None:
    if not shutil.which("qconf"):
        return
    try:
        queues = subprocess.run(["qconf", "-sql"], capture_output=True, text=True,
                                timeout=30).stdout.split()
        for queue in queues:
            out = subprocess.run(["qconf", "-sq", queue], capture_output=True, text=True,
                                 timeout=30).stdout
            conf = dict((line.split(None, 1) + [""])[:2] for line in out.splitlines() if line.strip())
            for key, name in (("prolog", "sge-prolog"), ("epilog", "sge-epilog")):
                value = conf.get(key, "NONE").strip()
                if name not in value:
                    report.warn(f"sge: queue {queue} {key} does not run {name}")
                    continue
                if not value.startswith("root@"):
                    report.fail(f"sge: queue {queue} {key} must be root@...{name}")
                _hook_file(report, f"sge {queue} {key}", value.split()[0].removeprefix("root@"))
    except (OSError, subprocess.TimeoutExpired):
        report.warn("sge: qconf failed; queues not checked")


def _hook_file(report: Report, what: str, path: str) -> None:
    real = os.path.realpath(path)
    problem = trust_problem(path) if not os.path.islink(path) else trust_problem(real)
    if not os.path.exists(real):
        report.fail(f"{what}: {path} does not exist")
    elif problem:
        report.fail(f"{what}: {path}: {problem}; root runs it")
    else:
        report.ok(f"{what}: {path}")


def _fuse(report: Report) -> None:
    try:
        mode = os.stat("/dev/fuse").st_mode
        usable = mode & 0o006 == 0o006
    except OSError:
        usable = False
    tools = [t for t in ("fusermount3", "squashfuse_ll") if not shutil.which(t)]
    if usable and not tools:
        report.ok("image mode: /dev/fuse usable by users, fusermount3 and squashfuse_ll "
                  "installed (jobs mount environments' images)")
    else:
        missing = ", ".join(tools + ([] if usable else ["/dev/fuse for users (chmod 666)"]))
        report.warn(f"image mode cannot work on this node: missing {missing}; jobs extract "
                    f"instead (Debian: apt-get install squashfuse fuse3)")


def _mount_safety(report: Report, fuse_conf: str = "/etc/fuse.conf") -> None:
    """Whether the hooks can keep out of users' FUSE mounts (openat2), and
    whether users may mount for others (``user_allow_other``)."""
    from . import nocross

    try:
        with open(fuse_conf, encoding="utf-8", errors="replace") as fh:
            allow_other = any(line.split("#", 1)[0].strip() == "user_allow_other"
                              for line in fh.read(1 << 16).splitlines())
    except OSError:
        allow_other = False
    if not nocross.have_openat2():
        report.warn("this kernel has no openat2 (Linux < 5.6): the hooks cannot refuse to look "
                    "into users' FUSE mounts in the staging folders"
                    + (f"; with user_allow_other in {fuse_conf} a user can make them hang"
                       if allow_other else ""))
    elif allow_other:
        report.warn(f"{fuse_conf} has user_allow_other: users' FUSE mounts answer root too. "
                    f"conda-stage's hooks never enter them (openat2), other root tools may")


def main() -> int:
    report = run()
    for line in report.lines:
        print(line)
    print(f"{report.failures} problem(s) found" if report.failures else "no problems found",
          file=sys.stderr)
    return 1 if report.failures else 0
