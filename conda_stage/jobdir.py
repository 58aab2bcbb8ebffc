"""A batch job's node-local folder, and the root-owned base that holds them.

Layout (Slurm; ``B`` is the site's ``staging_dir``)::

    B/                      root:root, not writable by others (made by the prolog)
    B/<job>/                root:root 0755, made and removed by root
    B/<job>/envs/<name>     the copies, made by the job user (owner of envs/)
    B/<job>/tmp/            the job user's, 0700 (TMPDIR with set_tmpdir)
    S/<job>.json            root 0644: the manifest -- what was staged, what to
                            tell the job (``S`` is ``state_dir``, /run/conda-stage)

The manifest lives apart from the copies so that the job is told what
happened even when the staging folder turned out to be unsafe.

Root never follows a path a user could have planted: the base is opened
from ``/`` one component at a time with ``O_NOFOLLOW``, every component
must be root-owned (and not writable by others, unless it is a sticky folder
like ``/tmp`` above the base), and everything below it is done through
directory file descriptors.  A base that fails the checks is *squatted*:
nothing is staged there, and the job is told.

SGE jobs (a root prolog cannot write into the job's TMPDIR safely, and
needs not) keep their copies in ``$TMPDIR/conda-stage``, owned by the job
user; :func:`read_manifest` accepts a manifest there only if the reader
owns it.
"""
from __future__ import annotations

import errno
import json
import os
import re
import stat
from contextlib import contextmanager
from pathlib import Path

from .errors import StageError
from .nocross import detach_at, is_mount_error, lstat_at, open_at
from .output import printable

MANIFEST = "manifest.json"
ENVS = "envs"
TMP = "tmp"
_MAX_MANIFEST = 1 << 20
_KEY_RE = re.compile(r"^[0-9]{1,20}(\.[0-9]{1,10})?$")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeBase(StageError):
    """The staging base (or a folder above it) could be controlled by a user."""


def valid_key(key: str) -> bool:
    """A job folder name: a job id, or ``<job id>.<task id>``."""
    return bool(_KEY_RE.match(key or ""))


# ------------------------------------------------------------------ the base
def open_base(base: str, *, create: bool) -> int:
    """A file descriptor of the staging base, checked component by component.

    With ``create`` (root), missing folders are made root-owned 0755.
    Raises :class:`UnsafeBase` when a component is a symlink, not a folder,
    not root-owned, or writable by others (a sticky folder is allowed above
    the base: nobody but root can rename root's entries in it).
    """
    if not os.path.isabs(base):
        raise UnsafeBase(f"staging folder {base!r} is not an absolute path")
    parts = [p for p in base.split("/") if p]
    fd = os.open("/", _DIR_FLAGS)
    try:
        here = "/"
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            here = os.path.join(here, part)
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise UnsafeBase(f"staging folder {here} does not exist") from None
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass  # someone was faster: checked below like anything else
                child = _open_dir(part, fd, here)
            except OSError as exc:
                raise UnsafeBase(f"staging folder {here}: {_why(exc)}") from None
            os.close(fd)
            fd = child
            st = os.fstat(fd)
            if st.st_uid != 0:
                raise UnsafeBase(f"{here} is owned by uid {st.st_uid}, not root "
                                 f"(squatted or misconfigured staging folder)")
            if st.st_mode & 0o022 and (last or not st.st_mode & stat.S_ISVTX):
                raise UnsafeBase(f"{here} is writable by group or others "
                                 f"(mode {stat.S_IMODE(st.st_mode):o})")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_dir(name: str, dir_fd: int, shown: str) -> int:
    try:
        return open_at(dir_fd, name, _DIR_FLAGS)  # never into a mount, never a link
    except OSError as exc:
        raise UnsafeBase(f"staging folder {shown}: {_why(exc)}") from None


def _why(exc: OSError) -> str:
    import errno

    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return "a symlink or not a folder"
    return exc.strerror or str(exc)


def base_problem(base: str) -> str | None:
    """Why ``base`` is not safe to use (None: it is, or does not exist yet
    and could be created safely)."""
    try:
        os.close(open_base(base, create=False))
    except UnsafeBase as exc:
        if "does not exist" in str(exc):
            return None
        return str(exc)
    return None


# ------------------------------------------------------------- job folders
class JobDir:
    """``<base>/<key>`` of one job and its manifest ``<state>/<key>.json``:
    made, described and removed by root."""

    def __init__(self, base: str, state: str, key: str):
        if not valid_key(key):
            raise StageError(f"not a job id: {key!r}")
        self.base = str(base)
        self.state = str(state)
        self.key = key

    @property
    def path(self) -> Path:
        return Path(self.base) / self.key

    @property
    def envs(self) -> Path:
        return self.path / ENVS

    @property
    def tmp(self) -> Path:
        return self.path / TMP

    @property
    def manifest_path(self) -> Path:
        return Path(self.state) / f"{self.key}.json"

    @contextmanager
    def _dir_fd(self, folder: str, create: bool = False):
        fd = open_base(folder, create=create)
        try:
            yield fd
        finally:
            os.close(fd)

    def create(self, uid: int, gid: int) -> None:
        """(root) A fresh job folder; anything left under its name goes first."""
        with self._dir_fd(self.base, create=True) as base:
            _remove_at(base, self.key)
            os.mkdir(self.key, 0o700, dir_fd=base)
            job = _open_dir(self.key, base, str(self.path))
            try:
                os.fchmod(job, 0o755)
                for name, mode in ((ENVS, 0o755), (TMP, 0o700)):
                    os.mkdir(name, 0o700, dir_fd=job)
                    sub = _open_dir(name, job, str(self.path / name))
                    try:
                        os.fchown(sub, uid, gid)
                        os.fchmod(sub, mode)
                    finally:
                        os.close(sub)
            finally:
                os.close(job)

    def exists(self) -> bool:
        """Whether there is anything to clean up for this job."""
        for folder, name in ((self.base, self.key), (self.state, f"{self.key}.json")):
            try:
                with self._dir_fd(folder) as fd:
                    lstat_at(fd, name)
                    return True
            except (OSError, StageError):
                pass
        return False

    def write_manifest(self, manifest: dict, uid: int | None = None) -> None:
        """(root) Replace the manifest atomically; with ``uid``, also make the
        job user's "told" flag next to it (see :meth:`claim_telling`)."""
        data = json.dumps(check_manifest(manifest), indent=1).encode()
        name = f"{self.key}.json"
        with self._dir_fd(self.state, create=True) as state:
            write_at(state, name, data)
            if uid is not None:
                told = f"{self.key}.told"
                _remove_at(state, told)
                fd = os.open(told, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600, dir_fd=state)
                try:
                    os.fchown(fd, uid, -1)
                finally:
                    os.close(fd)

    def claim_telling(self) -> bool:
        """(job user) True once per job: whether this task is the first to
        tell the job what was staged.  The flag is a file root made for the
        job user in the root-only state folder, so nobody can plant it."""
        import fcntl

        try:
            with self._dir_fd(self.state) as state:
                fd = os.open(f"{self.key}.told", os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK
                             | os.O_CLOEXEC, dir_fd=state)
        except (OSError, StageError):
            return False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                return False
            fcntl.lockf(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_size:
                return False
            os.write(fd, b"1")
            return True
        finally:
            os.close(fd)

    def user_tmp(self) -> Path | None:
        """(job user) The job folder's ``tmp/``, if the whole chain is as
        the prolog made it: a root-only base, a root-owned job folder, and
        ``tmp/`` the current user's own private folder."""
        try:
            with self._dir_fd(self.base) as base:
                job = _open_dir(self.key, base, str(self.path))
                try:
                    if os.fstat(job).st_uid != 0:
                        return None
                    st = lstat_at(job, TMP)
                finally:
                    os.close(job)
        except (OSError, StageError):
            return None
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            return None
        return self.tmp

    def read_manifest(self) -> dict | None:
        """The manifest root wrote, or None."""
        try:
            with self._dir_fd(self.state) as state:
                return _load_manifest(state, f"{self.key}.json", owners=(0,))
        except StageError:
            return None

    def remove_envs(self) -> None:
        """(root) Remove whatever the job user left in ``envs/``."""
        with self._dir_fd(self.base) as base:
            job = _open_dir(self.key, base, str(self.path))
            try:
                envs = _open_dir(ENVS, job, str(self.envs))
                try:
                    for name in os.listdir(envs):
                        _remove_at(envs, name)
                finally:
                    os.close(envs)
            finally:
                os.close(job)

    def remove(self, deadline: float | None = None) -> list[Path]:
        """(root) Remove the job folder, the manifest and the told flag;
        returns what was removed.  Nothing is touched in a folder that is
        not root's alone (what a user planted there is not ours).  Past
        ``deadline`` (time.monotonic()), stop with :class:`OutOfTime`: what
        is left is gc's."""
        removed = []
        for folder, name in ((self.base, self.key), (self.state, f"{self.key}.json"),
                             (self.state, f"{self.key}.told")):
            try:
                with self._dir_fd(folder) as fd:
                    if _remove_at(fd, name, deadline):
                        removed.append(Path(folder) / name)
            except UnsafeBase:
                continue
        return removed


def read_manifest(folder: Path, owners=(0,)) -> dict | None:
    """The manifest in ``folder`` if the folder and the manifest are owned by
    one of ``owners`` and it is well-formed; else None."""
    try:
        fd = os.open(folder, _DIR_FLAGS)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_uid not in owners:
            return None
        return _load_manifest(fd, MANIFEST, owners)
    finally:
        os.close(fd)


def read_owned_json(dir_fd: int, name: str, owners, limit: int):
    """The JSON in ``name`` (in ``dir_fd``, not followed if a link) if it is
    a regular file of one of ``owners``, not writable by group or others,
    and at most ``limit`` bytes; else None."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in owners or st.st_mode & 0o022:
            return None
        data = fh.read(limit + 1)
    if len(data) > limit:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _load_manifest(dir_fd: int, name: str, owners) -> dict | None:
    data = read_owned_json(dir_fd, name, owners, _MAX_MANIFEST)
    try:
        return None if data is None else check_manifest(data)
    except (ValueError, TypeError):
        return None


# ------------------------------------------------------------ the manifest
def _text(value, *, path: bool = False, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.isprintable():
        raise ValueError(f"not printable text: {value!r}")
    if path and (not value.startswith("/") or ":" in value):
        raise ValueError(f"not an absolute path: {value!r}")


def check_manifest(data) -> dict:
    """``data`` if it is a manifest as the prolog writes it; ValueError if
    not.  Every string a hook prints, exports or logs from it is single-line
    printable text; paths are absolute."""
    if not isinstance(data, dict):
        raise ValueError("not an object")
    _text(data.get("job_id"))
    _text(data.get("task_id"), optional=True)
    _text(data.get("user"))
    _text(data.get("scheduler"), optional=True)
    _text(data.get("workdir"), path=True)
    _text(data.get("envs_dir"), path=True, optional=True)
    for key in ("results", "problems", "messages"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{key} is not a list")
    for text in data["problems"] + data["messages"]:
        _text(text)
    for item in data["results"]:
        if not isinstance(item, dict) or item.get("status") not in ("staged", "skipped"):
            raise ValueError("bad result")
        _text(item.get("name"))
        if item["status"] == "staged":
            _text(item.get("path"), path=True)
            _text(item.get("original"), path=True)
            _text(item.get("copy"), optional=True)
            _text(item.get("note"), optional=True)
            for key in ("seconds", "bytes", "files"):
                value = item.get(key, 0)
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"bad {key}")
            for key in ("reused", "image"):
                if not isinstance(item.get(key, False), bool):
                    raise ValueError(f"bad {key}")
        else:
            _text(item.get("reason"))
    return data


def one_line(text, limit: int = 2000) -> str:
    """``text`` as one printable line of at most ``limit`` characters."""
    text = printable(text)
    return text if len(text) <= limit else text[:limit] + "..."


def write_at(dir_fd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    """(root) Replace ``name`` in ``dir_fd`` atomically with ``data``: a new
    file (never an existing one opened through a planted link), renamed."""
    tmp = f".{name}.{os.getpid()}"
    _remove_at(dir_fd, tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


# ---------------------------------------------------------------- removal
class OutOfTime(StageError):
    pass


def _remove_at(dir_fd: int, name: str, deadline: float | None = None) -> bool:
    """Remove ``name`` in ``dir_fd`` and everything below it, through file
    descriptors only: symlinks are removed, never followed; a folder swapped
    for something else mid-way is not descended into.

    Iterative, so any depth works with two open descriptors (a recursive
    walk such as ``os.fwalk`` fails past ~1000 levels a user can make).  It
    climbs back through ``..`` only after checking that ``..`` is still the
    folder it came from (device and inode), and it never crosses into
    another filesystem (a user's FUSE mount): both stop it with
    :class:`StageError`.  Past ``deadline`` it stops with :class:`OutOfTime`."""
    import time

    try:
        st = _lstat_detached(dir_fd, name)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return True
    top = _open_dir(name, dir_fd, name)
    fd = top
    seen = os.fstat(top)
    chain = [(seen.st_dev, seen.st_ino)]  # the folders from the top down to fd
    names: list[str] = []
    try:
        while True:
            if deadline is not None and time.monotonic() > deadline:
                raise OutOfTime(f"ran out of time removing {name}; 'conda-stage gc --jobs' "
                                f"removes the rest")
            child = _empty_until_subfolder(fd, chain[0][0])
            if child is not None:
                entry, child_fd, child_id = child
                if fd != top:
                    os.close(fd)
                fd = child_fd
                chain.append(child_id)
                names.append(entry)
                continue
            if fd == top:
                break
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            pst = os.fstat(parent)
            os.close(fd)
            fd = parent
            chain.pop()
            if (pst.st_dev, pst.st_ino) != chain[-1]:
                raise StageError(f"a folder below {name} was moved while it was being "
                                 f"removed; left alone")
            if len(chain) == 1:
                os.close(parent)
                fd = top
            try:
                os.rmdir(names.pop(), dir_fd=fd)
            except (FileNotFoundError, NotADirectoryError):
                pass
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise  # refilled meanwhile: the next pass empties it again
    finally:
        if fd != top:
            os.close(fd)
        os.close(top)
    os.rmdir(name, dir_fd=dir_fd)
    return True


def _empty_until_subfolder(fd: int, device: int):
    """Unlink the non-folders and remove the empty folders in the folder
    ``fd`` until the first subfolder that is not empty; return ``(name, its
    fd, (dev, ino))`` for it, or None when the folder is empty."""
    with os.scandir(fd) as entries:
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if not is_dir:
                try:
                    _unlink(entry.name, fd)
                except IsADirectoryError:  # swapped for a folder: the next pass sees it
                    pass
                continue
            try:  # an empty folder goes at once: no descent, no new pass over this one
                os.rmdir(entry.name, dir_fd=fd)
                continue
            except OSError:
                pass  # not empty, a mount point, swapped: looked at below
            try:
                child = open_at(fd, entry.name, _DIR_FLAGS)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # swapped for a link or file
                    _unlink(entry.name, fd)
                    continue
                if not is_mount_error(exc):
                    raise
                # a mount the user left there (out of their own reach too):
                # detached, never entered; then its folder is removed as any
                child = _open_detached(fd, entry.name)
            cst = os.fstat(child)
            if cst.st_dev != device:
                os.close(child)
                raise StageError(f"{entry.name} is a mount point (another filesystem): "
                                 f"left alone")
            return entry.name, child, (cst.st_dev, cst.st_ino)
    return None


def _unlink(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:  # a file a mount sits on: detached, then unlinked
        if exc.errno != errno.EBUSY or not detach_at(dir_fd, name):
            raise
        os.unlink(name, dir_fd=dir_fd)


def _lstat_detached(dir_fd: int, name: str) -> os.stat_result:
    """``lstat`` of ``name`` in ``dir_fd`` without entering a mount there: a
    mount on it (the user's, where root removes) is detached first."""
    return _detached(dir_fd, name, lambda: lstat_at(dir_fd, name))


def _open_detached(dir_fd: int, name: str) -> int:
    """The folder ``name`` in ``dir_fd`` opened once the mounts on it are
    detached (a few stacked ones at most: else StageError)."""
    return _detached(dir_fd, name, lambda: open_at(dir_fd, name, _DIR_FLAGS))


def _detached(dir_fd: int, name: str, look):
    for _ in range(4):
        try:
            return look()
        except OSError as exc:
            if not is_mount_error(exc):
                raise
            if not detach_at(dir_fd, name):
                break
    raise StageError(f"{name} is a mount point (another filesystem) that could not be "
                     f"detached: left alone")


# ------------------------------------------------------ inside a job (user)
def find_job_copy(original: Path, environ=None, config=None) -> Path | None:
    """The copy of the environment at ``original`` that this job's prolog
    staged, if this runs in such a job: found through the job's manifest --
    root's (``$CONDA_STAGE_JOB_DIR`` names a job folder of the site's
    staging folder) or, for an SGE job-owner prolog, the user's own in
    ``$TMPDIR/conda-stage`` -- and only if it names the current user and
    the copy carries its marker."""
    import pwd

    from .config import Config
    from .store import read_marker

    environ = os.environ if environ is None else environ
    uid = os.getuid()
    manifests = []
    job_dir = environ.get("CONDA_STAGE_JOB_DIR") or ""
    key = os.path.basename(job_dir)
    if valid_key(key) and config is None:
        try:
            config = Config.load()
        except StageError:
            config = None
    if valid_key(key):
        if config is not None and job_dir == os.path.join(config.staging_dir, key):
            manifests.append(JobDir(config.staging_dir, config.state_dir, key).read_manifest())
    if environ.get("TMPDIR"):
        manifests.append(read_manifest(Path(environ["TMPDIR"]) / "conda-stage", owners=(uid,)))
    try:
        me = pwd.getpwuid(uid).pw_name
    except KeyError:
        return None
    for manifest in filter(None, manifests):
        if manifest["user"] != me:
            continue
        for item in manifest["results"]:
            if item["status"] == "staged" and item["original"] == str(original):
                copy = Path(item["path"])
                marker = read_marker(copy)
                if marker is not None and marker.mode == "job" and marker.original == str(original):
                    return copy
    return None
