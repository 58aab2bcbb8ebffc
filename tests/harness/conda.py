"""A real conda for the tests: a shared "site conda" plus a local, offline channel.

What :meth:`CondaSite.ensure` builds (once, then cached under ``TEST_BASE/cache``):

* **the site** -- like a cluster's shared miniforge, root-owned and read-only for
  users: a venv made from Debian's ``/usr/bin/python3`` (not the pyenv python under
  the 0700 ``/root``) holding conda 24.7.1 as vendored by PyPI ``conda-lock==4.0.3``
  and rattler-build.  The venv is also conda's root prefix ("base")::

      <root>/bin/conda                the conda CLI (files/conda/conda-launcher.py)
      <root>/condabin/conda           the same, the only thing the init puts on PATH
      <root>/etc/profile.d/conda.sh   INIT FILE: ``. <init>`` gives the ``conda``
                                      shell function (bash, zsh, sh/dash), also in jobs
      <root>/.condarc                 system config: local channel only, offline,
                                      classic solver, envs/pkgs in ~/.conda/{envs,pkgs}

  The shell-function glue (files/conda/conda.sh) is installed where the vendored
  conda's ``conda shell.<shell> hook`` looks for it.
* **the channel** -- real conda packages built with rattler-build
  (files/conda/build_channel.py, recipes in files/conda/recipes):
  ``python`` (a pyenv CPython 3.11 repackaged), ``pip`` (noarch: python, entry
  points), ``prefix-probe`` (C exe + .so with binary prefix placeholders, text
  placeholder ``etc/prefix-probe/config.ini``, activate.d/deactivate.d hooks that set
  and unset ``PREFIX_PROBE_ACTIVE`` / ``PREFIX_PROBE_HOME``) and ``cs-extra`` (noarch:
  generic, one data file, for ``conda install`` tests).

Cache keys hash the files under files/conda, the tool pins, the Python versions and the
CPython used; a file lock serialises concurrent builders.  Cold: ~1-2 min; warm: <1 s.

Usage::

    from tests.harness.conda import CondaSite
    from tests.harness.users import ensure_user

    site = CondaSite.ensure()
    alice = ensure_user("csalice")
    env = site.create_env(alice, "demo")          # ~alice/.conda/envs/demo, real conda create
    r = site.shell(alice, "conda activate demo && prefix-probe", shell="zsh")
    site.install(alice, env, "cs-extra")

Command line (for the demo)::

    python -m tests.harness.conda setup [--base DIR] [--cpython PREFIX]   # prints the init file
    python -m tests.harness.conda info  [--base DIR]                      # JSON description
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

try:  # as part of the tests package, or run directly as a script
    from .users import TEST_BASE, User, run_as
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.harness.users import TEST_BASE, User, run_as

FILES = Path(__file__).resolve().parent / "files" / "conda"

#: Debian's python: the site venv must not depend on anything under /root (mode 0700).
SITE_BASE_PYTHON = Path("/usr/bin/python3")
#: Packages of a default test environment.
DEFAULT_PACKAGES = ("python", "pip", "prefix-probe")
#: Every package in the channel.
CHANNEL_PACKAGES = ("python", "pip", "prefix-probe", "cs-extra")
#: The conda version the vendored copy in conda-lock 4.0.3 reports.
CONDA_VERSION = "24.7.1"
#: Shell name -> executable for :meth:`CondaSite.shell`.
SHELLS = {"bash": "/bin/bash", "zsh": "/usr/bin/zsh", "sh": "/bin/sh", "dash": "/bin/sh"}
#: Bump to invalidate every cached build.
CACHE_FORMAT = "1"
#: Cached builds of other keys (older harness files) unused for this long are deleted.
STALE_AFTER_DAYS = 3

SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"

UserArg = Optional[User]


class CondaFixtureError(RuntimeError):
    """The conda fixture could not be built or a conda command failed."""


# --------------------------------------------------------------------------- helpers

def _log_default(msg: str) -> None:
    print(f"[conda-fixture] {msg}", file=sys.stderr, flush=True)


def _tail(path_or_text: Union[Path, str], lines: int = 40) -> str:
    text = path_or_text.read_text(errors="replace") if isinstance(path_or_text, Path) else path_or_text
    return "\n".join(text.splitlines()[-lines:])


def _run_logged(argv: Sequence[str], log: Path, *, timeout: float, env: Mapping[str, str] | None = None,
                cwd: Path | None = None) -> None:
    """Run ``argv`` (as the current user, umask 022), appending its output to ``log``."""
    with open(log, "a") as fh:
        fh.write(f"\n$ {shlex.join(map(str, argv))}\n")
        fh.flush()
        try:
            res = subprocess.run(list(map(str, argv)), stdout=fh, stderr=subprocess.STDOUT,
                                 env=dict(env) if env is not None else None, cwd=cwd,
                                 timeout=timeout, preexec_fn=lambda: os.umask(0o022))
        except subprocess.TimeoutExpired:
            raise CondaFixtureError(f"timed out after {timeout}s: {shlex.join(map(str, argv))}\n"
                                    f"log {log}:\n{_tail(log)}") from None
    if res.returncode:
        raise CondaFixtureError(f"exit {res.returncode}: {shlex.join(map(str, argv))}\n"
                                f"log {log}:\n{_tail(log)}")


def _digest(*parts: Union[str, bytes, Path]) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(str(part.relative_to(FILES)).encode() if part.is_relative_to(FILES) else str(part).encode())
            h.update(b"\0")
            part = part.read_bytes()
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0\1\0")
    return h.hexdigest()[:16]


def _tree(*dirs: Path) -> list:
    return sorted(p for d in dirs for p in d.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def _make_world_readable(path: Path) -> None:
    """Root-owned, readable and traversable by everyone, writable by nobody else."""
    subprocess.run(["chmod", "-R", "u+rwX,go+rX,go-w", str(path)], check=True, timeout=300)


def _ensure_dir_traversable(path: Path) -> None:
    """Create ``path`` (new directories: mode 0755) and check every user can traverse it."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        os.chmod(d, 0o755)
    for d in [path, *path.parents]:
        if d.stat().st_mode & 0o005 != 0o005:
            raise CondaFixtureError(f"{d} (mode {d.stat().st_mode & 0o7777:o}) is not readable and "
                                    "traversable by other users; choose another CONDA_STAGE_TEST_BASE")


@contextlib.contextmanager
def _locked(lockfile: Path, timeout: float = 3600):
    """Exclusive flock on ``lockfile``, so concurrent test sessions build only once."""
    lockfile.parent.mkdir(parents=True, exist_ok=True)
    with open(lockfile, "a") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CondaFixtureError(f"waited {timeout}s for the build lock {lockfile}") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _render(template: Path, tokens: Mapping[str, str]) -> str:
    text = template.read_text()
    for key, value in tokens.items():
        text = text.replace(f"@{key}@", str(value))
    return text


def _write_if_changed(path: Path, text: str, mode: int = 0o644) -> None:
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _python_version(python: Path) -> str:
    res = subprocess.run([str(python), "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                         capture_output=True, text=True, timeout=60)
    if res.returncode:
        raise CondaFixtureError(f"{python} does not run: {res.stderr.strip()}")
    return res.stdout.strip()


def _prune_stale(cache: Path, keep: Sequence[Path], say: Callable[[str], None]) -> None:
    """Delete cached sites/channels of other keys not used for STALE_AFTER_DAYS (call under the lock)."""
    now = time.time()
    for d in keep:
        (d / ".last-used").touch()
    for d in [*cache.glob("conda-site-*"), *cache.glob("conda-channel-*")]:
        if not d.is_dir() or d in keep:
            continue
        stamp = next((p for p in (d / ".last-used", d / ".complete") if p.exists()), d)
        if now - stamp.stat().st_mtime > STALE_AFTER_DAYS * 86400:
            say(f"removing stale cached build {d}")
            shutil.rmtree(d, ignore_errors=True)
            (cache / f"{d.name}.log").unlink(missing_ok=True)


# --------------------------------------------------------------------------- CPython

def _shared_cpython_ok(prefix: Path) -> Optional[str]:
    """The X.Y of a self-contained CPython prefix with a shared libpython, else None."""
    for exe in sorted(prefix.glob("bin/python3.*[0-9]")):
        ver = exe.name[len("python"):]
        if (list(prefix.glob(f"lib/libpython{ver}.so*"))
                and (prefix / "lib" / f"python{ver}" / "os.py").is_file()
                and list((prefix / "lib" / f"python{ver}" / "ensurepip" / "_bundled").glob("pip-*.whl"))):
            return ver
    return None


def find_cpython() -> Path:
    """The CPython prefix the ``python`` package is made from.

    ``$CONDA_STAGE_TEST_CPYTHON`` (a prefix, or a ``bin/python3.X`` inside one) if set,
    else the newest pyenv 3.11 build (``$PYENV_ROOT``, ``~/.pyenv``, ``/root/.pyenv``).
    It must be self-contained (not ``/usr``) with ``lib/libpython3.X.so*``.
    """
    env = os.environ.get("CONDA_STAGE_TEST_CPYTHON")
    if env:
        p = Path(env)
        if p.is_file():
            p = p.resolve().parent.parent
        if p.resolve() in (Path("/usr"), Path("/usr/local")):
            raise CondaFixtureError(f"CONDA_STAGE_TEST_CPYTHON={env}: a distribution python under {p} "
                                    "is not self-contained; use a pyenv/python.org-style build")
        if not _shared_cpython_ok(p):
            raise CondaFixtureError(f"CONDA_STAGE_TEST_CPYTHON={env}: {p} is not a self-contained "
                                    "CPython prefix with bin/python3.X, lib/libpython3.X.so* and "
                                    "lib/python3.X/ensurepip/_bundled/pip-*.whl")
        return p
    roots = [os.environ.get("PYENV_ROOT"), os.path.expanduser("~/.pyenv"), "/root/.pyenv"]
    candidates = []
    for root in dict.fromkeys(r for r in roots if r):
        for d in glob.glob(os.path.join(root, "versions", "3.11.*")):
            if re.fullmatch(r"3\.11\.\d+", os.path.basename(d)) and _shared_cpython_ok(Path(d)) == "3.11":
                candidates.append(Path(d))
    if not candidates:
        raise CondaFixtureError(
            "no CPython 3.11 with a shared libpython found for the test channel's `python` package: "
            "set CONDA_STAGE_TEST_CPYTHON to a self-contained CPython prefix (e.g. "
            "`PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install 3.11`); searched "
            + ", ".join(f"{r}/versions/3.11.*" for r in dict.fromkeys(r for r in roots if r)))
    return max(candidates, key=lambda p: tuple(int(x) for x in p.name.split(".")))


# --------------------------------------------------------------------------- builders

def _site_key() -> str:
    files = [FILES / "tools-requirements.txt", FILES / "conda-launcher.py", FILES / "conda.sh",
             FILES / "site-init.sh"]
    return _digest("site", CACHE_FORMAT, _python_version(SITE_BASE_PYTHON), *files)


def _build_site(root: Path, log: Path, say: Callable[[str], None]) -> None:
    """Create the site venv / conda root prefix at ``root`` (which must not exist)."""
    t0 = time.monotonic()
    say(f"building the site conda (venv from {SITE_BASE_PYTHON} + conda-lock + rattler-build) in {root}")
    env = {"PATH": SYSTEM_PATH, "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for k, v in os.environ.items():   # keep the machine's pip configuration (index, certs)
        if k.startswith("PIP_") or k in ("http_proxy", "https_proxy", "no_proxy",
                                         "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "SSL_CERT_FILE"):
            env.setdefault(k, v)
    _run_logged([SITE_BASE_PYTHON, "-m", "venv", root], log, timeout=300, env=env)
    py = root / "bin" / "python"
    _run_logged([py, "-m", "pip", "install", "-q", "wheel"], log, timeout=600, env=env)
    _run_logged([py, "-m", "pip", "install", "-q", "-r", FILES / "tools-requirements.txt"], log,
                timeout=1800, env=env)
    freeze = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True, timeout=120)
    (root / "conda-stage-pip-freeze.txt").write_text(freeze.stdout)

    vendored = sorted(root.glob("lib/python3*/site-packages/conda_lock/_vendor/conda"))
    if not vendored:
        raise CondaFixtureError(f"conda-lock's vendored conda not found under {root}/lib")
    # the shell glue where `conda shell.<shell> hook` reads it
    glue = vendored[0] / "shell" / "etc" / "profile.d" / "conda.sh"
    glue.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(FILES / "conda.sh", glue)
    # the CLI
    conda = root / "bin" / "conda"
    _write_if_changed(conda, _render(FILES / "conda-launcher.py", {"PYTHON": py}), 0o755)
    (root / "condabin").mkdir(exist_ok=True)
    os.symlink("../bin/conda", root / "condabin" / "conda")
    # a conda environment ("base"): conda-meta/history
    (root / "conda-meta").mkdir(exist_ok=True)
    (root / "conda-meta" / "history").write_text("")
    # the init file users and job scripts source
    init = root / "etc" / "profile.d" / "conda.sh"
    init.parent.mkdir(parents=True, exist_ok=True)
    _write_if_changed(init, _render(FILES / "site-init.sh", {"CONDA_EXE": conda, "INIT_FILE": init}))

    res = subprocess.run([str(conda), "--version"], capture_output=True, text=True, timeout=120,
                         env={"PATH": SYSTEM_PATH, "HOME": str(root), "LANG": "C.UTF-8"})
    if res.returncode or res.stdout.strip() != f"conda {CONDA_VERSION}":
        raise CondaFixtureError(f"{conda} --version: exit {res.returncode}, "
                                f"{res.stdout.strip()!r} {res.stderr.strip()!r}")
    say(f"site conda ready ({res.stdout.strip()}) in {time.monotonic() - t0:.0f}s")


def _channel_key(cpython: Path) -> str:
    ver = _shared_cpython_ok(cpython)
    libs = sorted(cpython.glob(f"lib/libpython{ver}.so*"))
    stamp = [f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in libs if not p.is_symlink()]
    return _digest("channel", CACHE_FORMAT, str(cpython.resolve()),
                   _python_version(cpython / "bin" / f"python{ver}"), *stamp,
                   _python_version(SITE_BASE_PYTHON), FILES / "tools-requirements.txt",
                   FILES / "build_channel.py", *_tree(FILES / "recipes", FILES / "prefix-probe"))


def _build_channel(site_root: Path, cpython: Path, workdir: Path, channel: Path, log: Path,
                   say: Callable[[str], None]) -> None:
    t0 = time.monotonic()
    say(f"building the test channel from {cpython} with rattler-build in {channel}")
    env = {"PATH": f"{site_root}/bin:{SYSTEM_PATH}", "HOME": os.environ.get("HOME", "/root"),
           "LANG": "C.UTF-8"}
    _run_logged([site_root / "bin" / "python", FILES / "build_channel.py", "--cpython", cpython,
                 "--files", FILES, "--work", workdir, "--out", channel], log, timeout=1800, env=env)
    names = set()
    for sub in ("linux-64", "noarch"):
        repodata = json.loads((channel / sub / "repodata.json").read_text())
        for key in ("packages", "packages.conda"):
            names.update(rec["name"] for rec in repodata.get(key, {}).values())
    missing = set(CHANNEL_PACKAGES) - names
    if missing:
        raise CondaFixtureError(f"channel {channel} lacks {sorted(missing)}; log {log}:\n{_tail(log)}")
    say(f"test channel ready in {time.monotonic() - t0:.0f}s")


# --------------------------------------------------------------------------- the site

@dataclass(frozen=True)
class CondaSite:
    """A built (or cached) site conda and local channel, and how to use them as a user.

    ``user`` arguments are :class:`tests.harness.users.User` objects (from
    ``ensure_user``), or ``None`` for root; root gets ``HOME`` = :attr:`root_home`
    (``TEST_BASE/conda/root-home``), never ``/root``.
    """

    base: Path          #: TEST_BASE this site belongs to
    root_prefix: Path   #: conda's root prefix ("base"): the site venv
    channel: Path       #: the local channel directory (file:// channel)
    cpython: Path       #: the CPython prefix the ``python`` package was made from

    # ---- layout
    @property
    def conda_exe(self) -> Path:
        """The conda CLI (``$CONDA_EXE`` once the init file is sourced)."""
        return self.root_prefix / "bin" / "conda"

    @property
    def condabin(self) -> Path:
        """Directory with only the ``conda`` executable; on PATH in :meth:`env_for`."""
        return self.root_prefix / "condabin"

    @property
    def init_file(self) -> Path:
        """Source this (bash, zsh, sh) to get the ``conda`` shell function."""
        return self.root_prefix / "etc" / "profile.d" / "conda.sh"

    @property
    def condarc(self) -> Path:
        """The site-wide configuration (``$CONDA_ROOT/.condarc``)."""
        return self.root_prefix / ".condarc"

    @property
    def channel_url(self) -> str:
        return self.channel.as_uri()

    @property
    def root_home(self) -> Path:
        """HOME for conda commands run as root (``user=None``)."""
        return self.base / "conda" / "root-home"

    def home(self, user: UserArg) -> Path:
        return Path(user.home) if user is not None else self.root_home

    def envs_dir(self, user: UserArg) -> Path:
        """Where ``conda create -n NAME`` puts ``user``'s environments."""
        return self.home(user) / ".conda" / "envs"

    def pkgs_dir(self, user: UserArg) -> Path:
        """``user``'s package cache (conda-pack needs it to relocate binary files)."""
        return self.home(user) / ".conda" / "pkgs"

    # ---- building
    @classmethod
    def ensure(cls, base: Union[str, Path, None] = None, *, cpython: Union[str, Path, None] = None,
               log: Callable[[str], None] | None = None) -> "CondaSite":
        """Build whatever is missing (under a file lock) and return the site.

        ``base`` defaults to ``TEST_BASE``; ``cpython`` to :func:`find_cpython`.
        Everything goes to ``base/cache/conda-site-<key>`` and
        ``base/cache/conda-channel-<key>``; a warm call only checks and returns.
        """
        say = log or _log_default
        if os.geteuid() != 0:
            raise CondaFixtureError("the conda fixture is built and used as root (it runs conda as "
                                    "test users via runuser)")
        base = Path(base or TEST_BASE).absolute()
        cpython = Path(cpython).absolute() if cpython else find_cpython()
        if not _shared_cpython_ok(cpython):
            raise CondaFixtureError(f"{cpython} is not a self-contained CPython with a shared libpython")
        if shutil.which("runuser") is None:
            raise CondaFixtureError("`runuser` not found (apt-get install -y util-linux)")
        cache = base / "cache"
        _ensure_dir_traversable(cache)
        with _locked(cache / "conda-fixture.lock"):
            root = cache / f"conda-site-{_site_key()}"
            if not (root / ".complete").is_file():
                shutil.rmtree(root, ignore_errors=True)
                log_file = cache / f"{root.name}.log"
                log_file.unlink(missing_ok=True)
                _build_site(root, log_file, say)
                _make_world_readable(root)
                (root / ".complete").write_text(json.dumps({"built": time.time()}) + "\n")

            chdir = cache / f"conda-channel-{_channel_key(cpython)}"
            channel = chdir / "channel"
            if not (chdir / ".complete").is_file():
                for tool in ("cc", "strip"):
                    if shutil.which(tool) is None:
                        raise CondaFixtureError(f"`{tool}` not found, needed to build prefix-probe "
                                                "(apt-get install -y gcc binutils)")
                shutil.rmtree(chdir, ignore_errors=True)
                chdir.mkdir()
                _build_channel(root, cpython, chdir / "work", channel, chdir / "build.log", say)
                _make_world_readable(chdir)
                (chdir / ".complete").write_text(json.dumps({"cpython": str(cpython),
                                                             "built": time.time()}) + "\n")

            site = cls(base=base, root_prefix=root, channel=channel, cpython=cpython)
            _write_if_changed(site.condarc, _render(FILES / "condarc.yaml",
                                                    {"CHANNEL_URL": site.channel_url}))
            _ensure_dir_traversable(site.root_home)
            _prune_stale(cache, [root, chdir], say)
        return site

    # ---- running things
    def env_for(self, user: UserArg, extra: Mapping[str, str] | None = None) -> dict:
        """The environment of a fresh login of ``user`` with the site conda on PATH.

        PATH = ``<root>/condabin`` + the system dirs (the ``conda`` *executable*; the
        shell *function* comes from sourcing :attr:`init_file`), HOME, USER, LOGNAME,
        SHELL, LANG.  No ``CONDA_*`` variables: a job or shell starts clean.
        """
        name = user.name if user is not None else "root"
        env = {
            "HOME": str(self.home(user)),
            "USER": name,
            "LOGNAME": name,
            "SHELL": "/bin/bash",
            "LANG": "C.UTF-8",
            "PATH": f"{self.condabin}:{SYSTEM_PATH}",
        }
        env.update(extra or {})
        return env

    def run(self, user: UserArg, argv: Sequence[Union[str, Path]], *, extra_env: Mapping[str, str] | None = None,
            timeout: float = 300, check: bool = False, cwd: Union[str, Path, None] = None,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` as ``user`` with :meth:`env_for` (no shell, no init file)."""
        if user is None:
            self.root_home.mkdir(parents=True, exist_ok=True)
        res = run_as(user, [str(a) for a in argv], env=self.env_for(user, extra_env),
                     cwd=str(cwd or self.home(user)), timeout=timeout, input=input)
        if check and res.returncode:
            raise CondaFixtureError(
                f"as {user.name if user else 'root'}: {shlex.join(map(str, argv))} -> exit {res.returncode}\n"
                f"--- stdout\n{_tail(res.stdout)}\n--- stderr\n{_tail(res.stderr)}")
        return res

    def shell(self, user: UserArg, script: str, shell: str = "bash", *,
              extra_env: Mapping[str, str] | None = None, timeout: float = 300, check: bool = False,
              cwd: Union[str, Path, None] = None) -> subprocess.CompletedProcess:
        """Run ``script`` with ``shell -c`` as ``user``, after ``. <init_file>``.

        ``shell``: ``"bash"``, ``"zsh"``, ``"sh"``/``"dash"`` (/bin/sh) or a path.  The
        ``conda`` shell function (``conda activate NAME`` ...) is defined when
        ``script`` starts; nothing else (no rc files, no ``set -e`` unless you add it).
        """
        exe = SHELLS.get(shell, shell)
        if not os.access(exe, os.X_OK):
            raise CondaFixtureError(f"shell {shell!r} ({exe}) not installed"
                                    + (" (apt-get install -y zsh)" if "zsh" in exe else ""))
        text = f". {shlex.quote(str(self.init_file))}\n{script}"
        return self.run(user, [exe, "-c", text], extra_env=extra_env, timeout=timeout, check=check,
                        cwd=cwd)

    def conda(self, user: UserArg, *args: Union[str, Path], timeout: float = 600, check: bool = True,
              extra_env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run the conda CLI (``conda ARGS...``) as ``user``; raises on failure if ``check``."""
        return self.run(user, [self.conda_exe, *args], extra_env=extra_env, timeout=timeout, check=check)

    def conda_json(self, user: UserArg, *args: Union[str, Path], timeout: float = 300):
        """``conda ARGS... --json`` as ``user``, parsed."""
        return json.loads(self.conda(user, *args, "--json", timeout=timeout).stdout)

    @staticmethod
    def _target(env: Union[str, Path]) -> list:
        """``-p PATH`` for paths (anything with a slash), ``-n NAME`` for names."""
        s = str(env)
        return ["-p", s] if "/" in s else ["-n", s]

    def create_env(self, user: UserArg, name: str | None = None, prefix: Union[str, Path, None] = None,
                   packages: Iterable[str] = DEFAULT_PACKAGES, *, extra_args: Sequence[str] = (),
                   timeout: float = 600) -> Path:
        """``conda create -y -q (-n NAME | -p PREFIX) PACKAGES`` as ``user``; returns the env path.

        By name the env goes to ``~user/.conda/envs/NAME``; with neither name nor prefix a
        unique ``env-XXXXXXXX`` name is used.  ``prefix``'s parent must be writable by
        ``user``.  An existing env of that name/path is replaced.
        """
        if name and prefix:
            raise ValueError("give name or prefix, not both")
        if not name and not prefix:
            name = f"env-{uuid.uuid4().hex[:8]}"
        target = ["-p", str(prefix)] if prefix else ["-n", str(name)]
        self.conda(user, "create", "-y", "-q", *target, *extra_args, *packages, timeout=timeout)
        path = Path(prefix) if prefix else self.envs_dir(user) / str(name)
        if not (path / "conda-meta" / "history").is_file():
            raise CondaFixtureError(f"conda create {' '.join(target)} left no environment at {path}")
        return path

    def install(self, user: UserArg, env: Union[str, Path], *specs: str,
                timeout: float = 600) -> subprocess.CompletedProcess:
        """``conda install -y -q (-p PATH | -n NAME) SPECS`` as ``user`` (raises on failure)."""
        if not specs:
            raise ValueError("nothing to install")
        return self.conda(user, "install", "-y", "-q", *self._target(env), *specs, timeout=timeout)

    def remove_env(self, user: UserArg, env: Union[str, Path], *, timeout: float = 300) -> None:
        """``conda env remove`` as ``user``; falls back to deleting the directory."""
        res = self.conda(user, "env", "remove", "-y", "-q", *self._target(env), timeout=timeout, check=False)
        path = Path(env) if "/" in str(env) else self.envs_dir(user) / str(env)
        if res.returncode or path.exists():
            shutil.rmtree(path, ignore_errors=True)

    def describe(self) -> dict:
        return {
            "base": str(self.base), "root_prefix": str(self.root_prefix),
            "conda_exe": str(self.conda_exe), "condabin": str(self.condabin),
            "init_file": str(self.init_file), "condarc": str(self.condarc),
            "channel": str(self.channel), "channel_url": self.channel_url,
            "cpython": str(self.cpython), "root_home": str(self.root_home),
            "conda_version": CONDA_VERSION, "packages": list(CHANNEL_PACKAGES),
        }


# --------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.harness.conda",
                                 description="Build (or reuse) the conda-stage test site conda and channel.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd, helptext in (("setup", "build everything; print the init file to source"),
                          ("info", "build everything; print a JSON description")):
        p = sub.add_parser(cmd, help=helptext)
        p.add_argument("--base", help=f"test base directory (default {TEST_BASE}, env CONDA_STAGE_TEST_BASE)")
        p.add_argument("--cpython", help="self-contained CPython prefix for the python package "
                                         "(default $CONDA_STAGE_TEST_CPYTHON or a pyenv 3.11)")
    args = ap.parse_args(argv)
    try:
        site = CondaSite.ensure(args.base, cpython=args.cpython)
    except CondaFixtureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.cmd == "setup":
        print(site.init_file)
    else:
        print(json.dumps(site.describe(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
