"""The node store: copies shared by one user's jobs on a node, who holds
them, and when they go.  Root is its only writer of records; the copies
themselves are made by the user's staging child.

Layout (``B`` is the site's ``staging_dir``, ``S`` its ``state_dir``)::

    B/users/                       root 0755; 1733 with shell images (sticky:
                                   a shell makes its user's folder itself)
    B/users/<uid>/                 the user's own, 0700 (made by root, or by
                                   the user's shell with shell images)
    B/users/<uid>/<id>/<name>      a copy, made by the user's staging child;
                                   ``<id>`` hashes the user, the name, the
                                   original prefix and the tarball's identity
    S/users/                       root 0711
    S/users/<uid>.lock             root 0600: the user's lock
    S/users/<uid>/                 root 0711: nobody lists it, the user reads
                                   their records by the ids in B/users/<uid>
    S/users/<uid>/<id>.json        root 0644: the copy's record (holders,
                                   last use, size)

One user's prologs, epilogs and gc take that user's lock, so N prologs
starting together extract once: the first extracts while the others wait,
then they find the finished copy (copies appear by rename, complete) and
each adds itself as a holder.  A repack gives the tarball a new identity,
so new jobs get a new copy while jobs on the old one finish.  A copy nobody
holds is removed once it has been unused for ``keep_unused`` seconds, or
earlier when unused copies take more than ``keep_share`` of the disk
(least recently used first).  Copies are never shared between users: each
user's copies live in their own folder, and a holder is a job of that user.

Root never follows a path there: everything goes through directory file
descriptors (see :mod:`conda_stage.jobdir`).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import StageError
from .nocross import detach_at, is_mount_error, lstat_at, open_at
from .jobdir import UnsafeBase, _open_dir, _remove_at, open_base, read_owned_json, write_at

USERS = "users"
_ID = re.compile(r"^[0-9a-f]{16}$")
_UID = re.compile(r"^[0-9]{1,10}$")
_HOLDER = re.compile(r"^(slurm|sge|shell):[0-9]{1,20}(\.[0-9]{1,10})?(@[0-9]{1,20})?$")
_MAX_RECORD = 1 << 20


def copy_id(uid: int, name: str, original: str, tarball: os.stat_result) -> str:
    """The identity of a copy: same user, name, environment and tarball
    (a repack makes a new file: new inode and mtime) -- same copy."""
    h = hashlib.sha256("\0".join(map(str, (
        uid, name, original, tarball.st_dev, tarball.st_ino, tarball.st_size,
        tarball.st_mtime_ns))).encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def valid_id(value) -> bool:
    return isinstance(value, str) and bool(_ID.match(value))


@dataclass
class Record:
    """What root knows of one copy."""
    id: str
    uid: int
    name: str
    original: str
    path: str
    holders: dict = field(default_factory=dict)  # holder -> time it took the copy
    created: float = 0.0
    last_used: float = 0.0
    bytes: int = 0
    files: int = 0

    @classmethod
    def from_json(cls, data) -> "Record":
        if not isinstance(data, dict) or not valid_id(data.get("id")):
            raise ValueError("not a copy record")
        rec = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        if not isinstance(rec.uid, int) or not isinstance(rec.holders, dict):
            raise ValueError("bad record")
        for text in (rec.name, rec.original, rec.path):
            if not isinstance(text, str) or not text.isprintable():
                raise ValueError("bad record")
        if not all(isinstance(h, str) and _HOLDER.match(h) for h in rec.holders):
            raise ValueError("bad holder")
        for num in (rec.created, rec.last_used, rec.bytes, rec.files):
            if not isinstance(num, (int, float)) or isinstance(num, bool):
                raise ValueError("bad number")
        return rec

    def age(self, now: float) -> float:
        return max(0.0, now - self.last_used)


def holder(scheduler: str, key: str) -> str:
    value = f"{scheduler}:{key}"
    if not _HOLDER.match(value):
        raise StageError(f"not a holder: {value!r}")
    return value


class NodeStore:
    """The node's shared copies, their records and their locks."""

    def __init__(self, staging_dir: str, state_dir: str, *, keep_unused: float = 300.0,
                 keep_share: float = 0.25, shell_images: bool = False):
        self.staging_dir = str(staging_dir)
        self.state_dir = str(state_dir)
        self.keep_unused = float(keep_unused)
        self.keep_share = float(keep_share)
        self.shell_images = bool(shell_images)

    @classmethod
    def from_config(cls, config) -> "NodeStore":
        return cls(config.staging_dir, config.state_dir, keep_unused=config.keep_unused,
                   keep_share=config.keep_share, shell_images=config.shell_images)

    # ------------------------------------------------------------ paths
    def user_folder(self, uid: int) -> Path:
        return Path(self.staging_dir) / USERS / str(int(uid))

    def copy_folder(self, uid: int, cid: str) -> Path:
        """The folder a copy's name lives in: what CONDA_ENVS_PATH points at."""
        if not valid_id(cid):
            raise StageError(f"not a copy id: {cid!r}")
        return self.user_folder(uid) / cid

    def parse_copy_path(self, uid: int, path: str, name: str) -> str | None:
        """The copy id if ``path`` is ``B/users/<uid>/<id>/<name>``, else None."""
        folder = str(self.user_folder(uid)) + "/"
        if not isinstance(path, str) or not path.startswith(folder):
            return None
        parts = path[len(folder):].split("/")
        if len(parts) != 2 or not valid_id(parts[0]) or parts[1] != name:
            return None
        return parts[0]

    # --------------------------------------------------------- folders
    @contextmanager
    def _fd(self, *parts: str, create: bool = False):
        fd = open_base(os.path.join(*parts), create=create)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def _users(self, create: bool = False):
        """``B/users``: root's; sticky and writable by all (1733) with shell
        images, so that shells make their users' folders, else 0755.  Root
        sets the mode the site asks for."""
        base = open_base(self.staging_dir, create=create)
        try:
            if create:
                try:
                    os.mkdir(USERS, 0o755, dir_fd=base)
                except FileExistsError:
                    pass
            fd = _open_dir(USERS, base, os.path.join(self.staging_dir, USERS))
        finally:
            os.close(base)
        try:
            st = os.fstat(fd)
            want = 0o1733 if self.shell_images else 0o755
            if st.st_uid == 0 and os.geteuid() == 0 and stat.S_IMODE(st.st_mode) != want:
                os.fchmod(fd, want)
                st = os.fstat(fd)
            here = os.path.join(self.staging_dir, USERS)
            if st.st_uid != 0:
                raise UnsafeBase(f"{here} is owned by uid {st.st_uid}, not root "
                                 f"(squatted or misconfigured staging folder)")
            if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
                raise UnsafeBase(f"{here} is writable by group or others without the sticky "
                                 f"bit (mode {stat.S_IMODE(st.st_mode):o})")
            yield fd
        finally:
            os.close(fd)

    def prepare_user(self, uid: int, gid: int, deadline: float | None = None) -> Path:
        """(root) ``B/users/<uid>``, the user's own 0700 folder.  One of the
        user's (made by a shell, with shell images) is kept; anything else there
        -- someone else's folder, a link, a file -- was put there to squat
        it: it goes (the squatter's mounts there first, detached), and root
        makes the folder."""
        name = str(int(uid))
        with self._users(create=True) as users:
            for _ in range(3):
                try:
                    # never asked of a mount there: its FUSE process could lie
                    # ("the user's, 0700") or never answer
                    st = lstat_at(users, name)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if not is_mount_error(exc):
                        raise
                    _detach_mounts(users, self.user_folder(uid))  # a mount over it
                    _remove_at(users, name, deadline)
                else:
                    if stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
                        return self.user_folder(uid)  # nobody else can make one of theirs
                    _detach_mounts(users, self.user_folder(uid))
                    _remove_at(users, name, deadline)
                try:
                    os.mkdir(name, 0o700, dir_fd=users)
                except FileExistsError:
                    continue  # made again meanwhile: checked again
                fd = _open_dir(name, users, str(self.user_folder(uid)))
                try:
                    os.fchown(fd, uid, gid)
                    os.fchmod(fd, 0o700)
                finally:
                    os.close(fd)
                return self.user_folder(uid)
        raise StageError(f"someone keeps making {self.user_folder(uid)} before this job's "
                         f"prolog could")

    def _state_users(self) -> int:
        fd = open_base(os.path.join(self.state_dir, USERS), create=True)
        try:
            os.fchmod(fd, 0o711)
        except OSError:
            pass
        return fd

    # ------------------------------------------------------------ lock
    @contextmanager
    def locked(self, uid: int, deadline: float | None = None):
        """(root) Hold ``uid``'s lock; a StageError past ``deadline``."""
        name = f"{int(uid)}.lock"
        users = self._state_users()
        try:
            while True:
                fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600, dir_fd=users)
                try:
                    while True:
                        try:
                            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                            break
                        except OSError as exc:
                            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                                raise
                        if deadline is not None and time.monotonic() >= deadline:
                            raise StageError("gave up waiting for another job of the same "
                                             "user staging on this node: the time allowed "
                                             "ran out")
                        time.sleep(0.05)
                    try:  # the lock file may have been removed by its last user
                        same = os.path.samestat(os.fstat(fd), os.stat(name, dir_fd=users,
                                                                      follow_symlinks=False))
                    except FileNotFoundError:
                        same = False
                    if same:
                        yield UserStore(self, uid, users)
                        return
                finally:
                    os.close(fd)
        finally:
            os.close(users)

    # ----------------------------------------------------------- query
    def uids(self) -> list[int]:
        """Users with records or copies on this node: by root's state, and
        by folders in ``B/users`` that belong to the user they are named
        after (with shell images anyone may make entries there)."""
        found = set()
        try:
            with self._fd(self.state_dir, USERS) as fd:
                for n in os.listdir(fd):
                    n = n[:-5] if n.endswith(".lock") else n
                    if _UID.match(n):
                        found.add(int(n))
        except UnsafeBase:
            pass
        try:
            with self._users() as fd:
                for n in os.listdir(fd):
                    if _UID.match(n) and int(n) not in found:
                        try:
                            st = lstat_at(fd, n)  # a mount there: EXDEV, not asked
                        except OSError:
                            continue
                        if stat.S_ISDIR(st.st_mode) and st.st_uid == int(n):
                            found.add(int(n))
        except (UnsafeBase, OSError):
            pass
        return sorted(found)

    def has_folder(self, uid: int) -> bool:
        """(root) Whether anything is at ``B/users/<uid>`` (a mount there
        too: never asked)."""
        try:
            with self._users() as fd:
                lstat_at(fd, str(int(uid)))
            return True
        except FileNotFoundError:
            return False
        except (OSError, UnsafeBase):
            return True  # a mount, or a folder root cannot look into: the sweep's to judge

    def records(self, uid: int) -> list[Record]:
        """``uid``'s copy records.  Root lists them; the user, who may not
        list the records folder (nobody else may either), reads the records
        of the copies in their own store folder, by name."""
        if os.geteuid() != 0:
            return self._own_records(uid)
        try:
            with self._fd(self.state_dir, USERS, str(int(uid))) as fd:
                names = sorted(n for n in os.listdir(fd) if n.endswith(".json"))
                return [r for r in (_load(fd, n) for n in names) if r is not None]
        except (UnsafeBase, OSError):
            return []

    def _own_records(self, uid: int) -> list[Record]:
        """(the user) Their records, by the ids in their own store folder,
        through a records folder they may search but not read (O_PATH)."""
        try:
            ids = sorted(c for c in os.listdir(self.user_folder(uid)) if valid_id(c))
            fd = os.open(os.path.join(self.state_dir, USERS, str(int(uid))),
                         os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return []
        try:
            st = os.fstat(fd)
            if st.st_uid != 0 or st.st_mode & 0o022:
                return []
            return [r for r in (_load(fd, f"{c}.json") for c in ids) if r is not None]
        finally:
            os.close(fd)


class UserStore:
    """One user's part of the store, while their lock is held."""

    def __init__(self, store: NodeStore, uid: int, state_users_fd: int):
        self.store = store
        self.uid = int(uid)
        self._users = state_users_fd

    @contextmanager
    def _records_fd(self, create: bool = False):
        name = str(self.uid)
        if create:  # traversable, not listable: a user reads their records by name
            try:
                os.mkdir(name, 0o711, dir_fd=self._users)
            except FileExistsError:
                pass
        fd = _open_dir(name, self._users, f"{self.store.state_dir}/{USERS}/{name}")
        try:
            st = os.fstat(fd)
            if st.st_uid != 0 or st.st_mode & 0o022:
                raise UnsafeBase(f"{self.store.state_dir}/{USERS}/{name} is not root's alone")
            yield fd
        finally:
            os.close(fd)

    def records(self) -> dict[str, Record]:
        try:
            with self._records_fd() as fd:
                recs = [_load(fd, n) for n in os.listdir(fd) if n.endswith(".json")]
        except (FileNotFoundError, UnsafeBase):
            return {}
        return {r.id: r for r in recs if r is not None and r.uid == self.uid}

    def save(self, rec: Record) -> None:
        data = json.dumps(asdict(rec), indent=1).encode()
        with self._records_fd(create=True) as fd:
            write_at(fd, f"{rec.id}.json", data)

    def _forget(self, cid: str) -> None:
        try:
            with self._records_fd() as fd:
                _remove_at(fd, f"{cid}.json")
        except (FileNotFoundError, UnsafeBase):
            pass

    def copy_exists(self, cid: str, name: str) -> bool:
        """Whether ``<cid>/<name>`` is there -- listed, not entered: a
        mounted image is the user's FUSE mount, which root may not stat."""
        try:
            with self.store._users() as users:
                user = _open_dir(str(self.uid), users, str(self.store.user_folder(self.uid)))
                try:
                    folder = open_at(user, cid, os.O_RDONLY | os.O_DIRECTORY)
                finally:
                    os.close(user)
                try:
                    return name in os.listdir(folder)
                finally:
                    os.close(folder)
        except (OSError, StageError):
            return False

    # ---------------------------------------------------------- holders
    def hold(self, cid: str, who: str, *, name: str, original: str, size=(0, 0)) -> Record:
        """Add ``who`` as a holder of copy ``cid``."""
        now = time.time()
        rec = self.records().get(cid) or Record(
            id=cid, uid=self.uid, name=name, original=original,
            path=str(self.store.copy_folder(self.uid, cid) / name), created=now,
            bytes=int(size[0]), files=int(size[1]))
        rec.holders[who] = now
        rec.last_used = now
        self.save(rec)
        return rec

    def release(self, who: str) -> list[Record]:
        """Drop ``who`` from every copy it holds; returns those copies."""
        released = []
        for rec in self.records().values():
            if who in rec.holders:
                del rec.holders[who]
                rec.last_used = time.time()
                self.save(rec)
                released.append(rec)
        return released

    def drop_holders(self, is_gone) -> list[tuple[str, str]]:
        """Drop holders ``is_gone(holder)`` says no longer run."""
        dropped = []
        for rec in self.records().values():
            gone = [h for h in rec.holders if is_gone(h)]
            if gone:
                for h in gone:
                    del rec.holders[h]
                    dropped.append((rec.id, h))
                rec.last_used = max(rec.last_used, max(rec.holders.values(), default=0.0))
                self.save(rec)
        return dropped

    # ------------------------------------------------------------ sweep
    def unused(self, *, now: float | None = None, keep: float | None = None,
               over_budget: set | None = None) -> list[Record]:
        """Copies to remove: nobody holds them and they have been unused for
        ``keep`` seconds (default: the store's ``keep_unused``) or are in
        ``over_budget``; and copy folders without a record (a prolog that
        died between extracting and recording, or half-written copies)."""
        now = time.time() if now is None else now
        keep = self.store.keep_unused if keep is None else keep
        recs = self.records()
        doomed = [r for r in recs.values() if not r.holders
                  and (r.age(now) >= keep or (over_budget and r.id in over_budget))]
        for cid in self._copy_ids():
            if cid not in recs:
                doomed.append(Record(id=cid, uid=self.uid, name="", original="(unrecorded)",
                                     path=str(self.store.copy_folder(self.uid, cid))))
        return doomed

    def remove(self, rec: Record, deadline: float | None = None) -> None:
        """Remove a copy and then its record."""
        self.remove_copy(rec.id, deadline)
        self._forget(rec.id)

    def _copy_ids(self) -> list[str]:
        try:
            with self.store._users() as users:
                user = _open_dir(str(self.uid), users, str(self.store.user_folder(self.uid)))
                try:
                    return [n for n in os.listdir(user) if valid_id(n)]
                finally:
                    os.close(user)
        except (OSError, StageError):
            return []

    def remove_copy(self, cid: str, deadline: float | None = None) -> None:
        """(root) Remove ``B/users/<uid>/<cid>`` through file descriptors.
        A user folder that is not what the prolog made (e.g. the user's own
        mount over it) raises :class:`UnsafeBase`: the record stays, for
        the next sweep, after the user's mounts are gone."""
        with self.store._users() as users:
            try:
                user = _open_dir(str(self.uid), users, str(self.store.user_folder(self.uid)))
            except FileNotFoundError:
                return  # nothing of the user's is left
            try:
                _remove_at(user, cid, deadline)
            finally:
                os.close(user)

    def tidy(self, deadline: float | None = None) -> None:
        """With nothing left for this user: their folders and lock file go."""
        if self.records() or self._copy_ids():
            return
        try:
            with self.store._users() as users:
                _remove_at(users, str(self.uid), deadline)
        except (OSError, StageError):
            pass
        for name in (str(self.uid), f"{self.uid}.lock"):
            try:
                _remove_at(self._users, name)
            except OSError:
                pass


def _detach_mounts(users_fd: int, folder: Path) -> None:
    """(root) Detach the mounts at and below ``folder`` (``users/<uid>``,
    squatted), shallowest first: a lazy unmount takes those below along.
    Each is reached through directory file descriptors from ``users_fd``
    (root's), never following a link, and detached by its last name
    relative to its folder (``UMOUNT_NOFOLLOW``): whatever the squatter
    renames meanwhile, root only ever detaches a mount inside the squatted
    folder -- the squatter's own FUSE mounts, root cannot even look into."""
    from .image import fuse_mounts_under

    try:
        with open("/proc/self/mountinfo", "rb") as fh:
            points = list(reversed(fuse_mounts_under(fh.read(), folder)))
    except OSError:
        return
    if not points:
        return
    for point in points:  # shallowest first: a lazy detach takes those below along
        parts = point.relative_to(folder.parent).parts
        fd = os.dup(users_fd)
        try:
            for part in parts[:-1]:  # never into a mount (EXDEV), never a link
                fd = _swap_fd(fd, open_at(fd, part, os.O_RDONLY | os.O_DIRECTORY))
            detach_at(fd, parts[-1])
        except OSError:
            continue  # gone with one above it, or not a folder any more
        finally:
            os.close(fd)


def _swap_fd(old: int, new: int) -> int:
    os.close(old)
    return new


def _load(dir_fd: int, name: str) -> Record | None:
    data = read_owned_json(dir_fd, name, (0,), _MAX_RECORD)
    try:
        rec = None if data is None else Record.from_json(data)
    except (ValueError, TypeError):
        return None
    return rec if rec is not None and f"{rec.id}.json" == name else None


def over_budget(store: NodeStore, all_records: list[Record], now: float) -> set[str]:
    """Ids of unused copies to evict, least recently used first, so that
    unused copies take at most ``keep_share`` of the staging filesystem."""
    try:
        st = os.statvfs(store.staging_dir)
    except OSError:
        return set()
    allowed = store.keep_share * st.f_blocks * st.f_frsize
    unused = sorted((r for r in all_records if not r.holders), key=lambda r: r.last_used)
    total = sum(r.bytes for r in unused)
    evict = set()
    for rec in unused:
        if total <= allowed:
            break
        evict.add(rec.id)
        total -= rec.bytes
    return evict
