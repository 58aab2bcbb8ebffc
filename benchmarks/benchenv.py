"""The environments under test, built once and cached under the bench base.

Layout (``CONDA_STAGE_BENCH_BASE``, default ``/var/tmp/conda-stage-bench``)::

    wheelhouse/               wheels of requirements-jupyter.txt (pip download, once)
    store/                    backing directory of the simulated shared filesystem
    shared/                   where slowfs mounts store/ -- "the shared filesystem"
      envs/jupyter            the env under test, created *through* the mount, so its
                              prefix (shebangs, conda-meta) is the shared path
      pkgs/                   its conda package cache (conda-pack reads it), also shared
    local/envs/jupyter        the same packages installed natively on local disk
    local/pkgs/
    scratch/                  TMPDIR for staged copies (local disk, owned by the user)
    work/                     tarballs, strace logs, scratch trees of the benchmark

Both environments are made with the real conda (``conda create python pip`` from the
test channel) and ``pip install --no-index`` from the wheelhouse, as the unprivileged
benchmark user.  A stamp file records what was installed; a changed requirements file
rebuilds them.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REQUIREMENTS = HERE / "requirements-jupyter.txt"
ENV_NAME = "jupyter"
USER_NAME = "csbench"

sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from slowfs import mounted  # noqa: E402
from tests.harness.conda import CondaSite  # noqa: E402
from tests.harness.users import User, ensure_user  # noqa: E402


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Layout:
    base: Path

    @classmethod
    def default(cls) -> "Layout":
        return cls(Path(os.environ.get("CONDA_STAGE_BENCH_BASE", "/var/tmp/conda-stage-bench")))

    @property
    def wheelhouse(self) -> Path:
        return self.base / "wheelhouse"

    @property
    def store(self) -> Path:
        return self.base / "store"

    @property
    def mount(self) -> Path:
        return self.base / "shared"

    @property
    def slow_env(self) -> Path:
        return self.mount / "envs" / ENV_NAME

    @property
    def slow_env_store(self) -> Path:
        """The same directory, bypassing slowfs (for counting files, cleaning up)."""
        return self.store / "envs" / ENV_NAME

    @property
    def local(self) -> Path:
        return self.base / "local"

    @property
    def native_env(self) -> Path:
        return self.local / "envs" / ENV_NAME

    @property
    def scratch(self) -> Path:
        return self.base / "scratch"

    @property
    def work(self) -> Path:
        return self.base / "work"

    def to_store(self, path: Path) -> Path:
        """A path under the mount -> the same file in the backing store."""
        return self.store / Path(path).relative_to(self.mount)


def requirements_digest() -> str:
    return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:16]


def _requirements() -> list[str]:
    return [ln.strip() for ln in REQUIREMENTS.read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]


def ensure_wheelhouse(lay: Layout) -> None:
    stamp = lay.wheelhouse / ".stamp"
    if stamp.is_file() and stamp.read_text().strip() == requirements_digest():
        return
    say(f"downloading wheels of {REQUIREMENTS.name} into {lay.wheelhouse} (once)")
    lay.wheelhouse.mkdir(parents=True, exist_ok=True)
    # cp311 manylinux wheels for the test channel's CPython 3.11, whatever runs this
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
           "--abi", "abi3", "--abi", "none"]
    for plat in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64",
                 "linux_x86_64"):
        cmd += ["--platform", plat]
    cmd += ["-d", str(lay.wheelhouse), "-r", str(REQUIREMENTS)]
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode:
        raise RuntimeError(f"pip download failed:\n{res.stdout[-4000:]}")
    os.chmod(lay.wheelhouse, 0o755)
    for f in lay.wheelhouse.iterdir():
        os.chmod(f, 0o644)
    stamp.write_text(requirements_digest() + "\n")


def _user_dir(path: Path, user: User, mode: int = 0o755) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, user.uid, user.gid)
    os.chmod(path, mode)


def _build_env(site: CondaSite, user: User, prefix: Path, pkgs: Path, wheelhouse: Path) -> None:
    extra = {"CONDA_PKGS_DIRS": str(pkgs)}
    site.conda(user, "create", "-y", "-q", "-p", str(prefix), "python", "pip",
               extra_env=extra, timeout=1800)
    res = site.run(user, [prefix / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps",
                          "--no-index", "--find-links", str(wheelhouse), "-r", str(REQUIREMENTS)],
                   extra_env={"PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
                   timeout=3600)
    if res.returncode:
        raise RuntimeError(f"pip install into {prefix} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")


def _pyc_repaired(pkgs: Path) -> bool:
    """Whether an older benchmark recompiled this package cache's .pyc files
    (it did, until conda-stage repaired stale bytecode itself): rebuild it, so
    that the benchmark measures the packages as users get them."""
    return (pkgs / ".bench-pyc-fixed").exists()


def _stamp_ok(stamp: Path, prefix: Path) -> bool:
    try:
        data = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return data.get("requirements") == requirements_digest() and data.get("prefix") == str(prefix)


def _write_stamp(stamp: Path, prefix: Path) -> None:
    stamp.write_text(json.dumps({"requirements": requirements_digest(), "prefix": str(prefix)}) + "\n")


def ensure_envs(lay: Layout, site: CondaSite, user: User) -> None:
    """Create the shared (through slowfs) and the native environment if needed."""
    ensure_wheelhouse(lay)
    lay.base.mkdir(parents=True, exist_ok=True)
    os.chmod(lay.base, 0o755)
    for d in (lay.store, lay.local):
        d.mkdir(exist_ok=True)
        os.chmod(d, 0o755)
    lay.mount.mkdir(exist_ok=True)
    _user_dir(lay.scratch, user)
    _user_dir(lay.work, user)

    stamp = lay.store / f".{ENV_NAME}.stamp"
    if not _stamp_ok(stamp, lay.slow_env) or _pyc_repaired(lay.store / "pkgs"):
        say(f"building {lay.slow_env} through slowfs (0 ms latency; once, a few minutes)")
        _wipe(lay.store / "envs")
        _wipe(lay.store / "pkgs")
        _user_dir(lay.store / "envs", user)
        _user_dir(lay.store / "pkgs", user)
        with mounted(str(lay.store), str(lay.mount), meta_latency_ms=0, attr_timeout=1,
                     entry_timeout=1, negative_timeout=1):
            _build_env(site, user, lay.slow_env, lay.mount / "pkgs", lay.wheelhouse)
        _write_stamp(stamp, lay.slow_env)

    stamp = lay.local / f".{ENV_NAME}.stamp"
    if not _stamp_ok(stamp, lay.native_env) or _pyc_repaired(lay.local / "pkgs"):
        say(f"building {lay.native_env} on local disk (once)")
        _wipe(lay.local / "envs")
        _wipe(lay.local / "pkgs")
        _user_dir(lay.local / "envs", user)
        _user_dir(lay.local / "pkgs", user)
        _build_env(site, user, lay.native_env, lay.local / "pkgs", lay.wheelhouse)
        _write_stamp(stamp, lay.native_env)


def ensure_twin(lay: Layout, site: CondaSite, user: User, name: str) -> Path:
    """A second shared environment with the same packages as the one under
    test (``shared/envs/NAME``), for a tool that must not share its hooks
    with ours (the original conda-stage installs hooks of the same names).
    Built through slowfs like the first, once."""
    ensure_envs(lay, site, user)
    prefix = lay.mount / "envs" / name
    stamp = lay.store / f".{name}.stamp"
    if not _stamp_ok(stamp, prefix) or not (lay.store / "envs" / name).is_dir():
        say(f"building {prefix} through slowfs (0 ms latency; once, a few minutes)")
        _wipe(lay.store / "envs" / name)
        with mounted(str(lay.store), str(lay.mount), meta_latency_ms=0, attr_timeout=1,
                     entry_timeout=1, negative_timeout=1):
            _build_env(site, user, prefix, lay.mount / "pkgs", lay.wheelhouse)
        _write_stamp(stamp, prefix)
    return prefix


def _wipe(path: Path) -> None:
    if not path.exists():
        return
    for root, dirs, _files in os.walk(path):
        for d in dirs:
            p = os.path.join(root, d)
            if not os.path.islink(p):
                os.chmod(p, 0o755)
    shutil.rmtree(path)


def tree_size(path: Path) -> dict:
    """Files (regular + symlinks), folders and bytes of a tree (apparent sizes)."""
    files = dirs = links = size = 0
    for root, dnames, fnames in os.walk(path):
        dirs += len(dnames)
        for n in fnames:
            st = os.lstat(os.path.join(root, n))
            if stat.S_ISLNK(st.st_mode):
                links += 1
            else:
                files += 1
                size += st.st_size
        for d in dnames:
            if os.path.islink(os.path.join(root, d)):
                links += 1
    return {"files": files, "symlinks": links, "dirs": dirs, "bytes": size}


def setup(lay: Layout | None = None):
    lay = lay or Layout.default()
    site = CondaSite.ensure(log=say)
    user = ensure_user(USER_NAME)
    ensure_envs(lay, site, user)
    return lay, site, user


if __name__ == "__main__":
    lay, site, user = setup()
    print(json.dumps({"slow_env": tree_size(lay.slow_env_store),
                      "native_env": tree_size(lay.native_env)}, indent=1))
