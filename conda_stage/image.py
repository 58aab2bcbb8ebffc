"""Image mode: an environment as one compressed squashfs image, mounted
read-only with ``squashfuse_ll`` instead of extracted file by file.

Packing (``conda-stage --pack --image``, the user, next to the tarball)::

    NAME.sqfs              the image: the tarball's tree, relocated for the
                           path it will be mounted at, bytecode recompiled,
                           with the copy marker; zstd (mksquashfs)
    NAME.sqfs.json         its sidecar: image id, mount path, the tarball it
                           was built from (size, mtime), its own identity
                           (size, mtime, inode), and the tarball's
                           fingerprint of the environment (with its quick
                           check)

The mount path is the node store's path for the copy,
``<staging dir>/users/<uid>/<image id>/NAME``: the same on every node that
uses the site's staging folder, inside the user's own folder that only the
root prolog can create (nobody can squat it), and fixed at packing time,
so staging rewrites nothing.  The image id is new at every build, so a
rebuilt image is mounted next to the old one while jobs on it finish.

Staging (the job user, under the node store's lock for that user) needs
neither the tarball nor its lock: the image's sidecar says whether the
environment is still as packed (:meth:`Image.fresh`), and the image file
opened must be the one the sidecar describes (an image replaced meanwhile
by a repack is not: the tarball's locked path takes over).  Then copy
the image into the store folder (one sequential read of one file; or, by
the admin's choice, use it where it is) and mount it with ``squashfuse_ll``
-- as the job user: the kernel never parses a user's image for root.
Unmounting is ``fusermount3 -u`` (lazy when busy), as the user; the FUSE
process then exits.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import output
from .errors import StageError
from .output import printable
from .resolve import Env
from .userfiles import open_regular, open_regular_fd, read_fd_bounded

SUFFIX = ".sqfs"
SQUASHFUSE = "squashfuse_ll"
FUSERMOUNT = "fusermount3"
MODES = ("auto", "image", "extract")
_META_LIMIT = 64 << 10


@dataclass
class ImageMeta:
    image_id: str
    mount_prefix: str
    tarball_size: int
    tarball_mtime_ns: int
    size: int
    created: str
    build_seconds: float
    # not in sidecars of earlier builds (None: the tarball is then read to
    # tell whether the image is current): the image file's identity,
    # and the fingerprint of the environment it holds, with its quick check
    image_mtime_ns: int | None = None
    image_ino: int | None = None
    fingerprint: str | None = None
    quick: list | None = None

    def self_contained(self) -> bool:
        """Whether this sidecar alone tells if the image is current."""
        return None not in (self.image_mtime_ns, self.image_ino, self.fingerprint)

    def describes(self, st: os.stat_result) -> bool:
        """Whether ``st`` is the image file this sidecar was written for."""
        return (st.st_size, st.st_mtime_ns, st.st_ino) == (self.size, self.image_mtime_ns,
                                                           self.image_ino)


class Image:
    """The paths of an environment's image and its sidecar, and reading it."""

    def __init__(self, env: Env):
        self.env = env
        parent, name = env.prefix.parent, env.prefix.name
        self.path = parent / (name + SUFFIX)
        self.meta_path = parent / (name + SUFFIX + ".json")
        self.meta_st: os.stat_result | None = None  # the sidecar's, as read_meta read it

    def read_meta(self) -> ImageMeta | None:
        """The sidecar if it is one conda-stage wrote (types checked), else None."""
        from .nodestore import valid_id
        from .tarball import MalformedSidecar, _quick

        try:
            fd = open_regular_fd(self.meta_path, what="image sidecar")
            try:
                # its stat before it is read: on a network filesystem a read
                # makes the next stat a request (the atime changed)
                self.meta_st = os.fstat(fd)
                raw = read_fd_bounded(fd, _META_LIMIT, path=self.meta_path,
                                      what="image sidecar")
            finally:
                os.close(fd)
            data = json.loads(raw)
            meta = ImageMeta(**_known_fields(data))
            meta.quick = _quick(meta.quick)
        except (OSError, ValueError, TypeError, StageError, MalformedSidecar, RecursionError):
            return None
        ints = (meta.tarball_size, meta.tarball_mtime_ns, meta.size)
        optional = (meta.image_mtime_ns, meta.image_ino)
        if (not valid_id(meta.image_id) or not isinstance(meta.mount_prefix, str)
                or not meta.mount_prefix.isprintable() or not meta.mount_prefix.startswith("/")
                or not all(_is_int(i) for i in ints)
                or not all(i is None or _is_int(i) for i in optional)
                or not (meta.fingerprint is None or (isinstance(meta.fingerprint, str)
                                                     and _FINGERPRINT.fullmatch(meta.fingerprint)))):
            return None
        return meta

    def fresh(self, meta: ImageMeta, mount_prefix: str) -> bool:
        """Whether the image ``meta`` describes holds the environment as it
        is now, for ``mount_prefix`` -- from its sidecar alone (False: ask
        the tarball).  A few stats of the environment (the quick check);
        its listings only when one of those changed."""
        from . import fingerprint as fp

        return (meta.self_contained() and meta.mount_prefix == mount_prefix
                and fp.is_fresh(self.env.prefix, meta.fingerprint, meta.quick))

    def usable(self, tarball_st: os.stat_result, mount_prefix: str,
               meta: "ImageMeta | None | bool" = False) -> str | None:
        """Why the image cannot stand in for the tarball ``tarball_st`` at
        ``mount_prefix`` (None: it can).  ``meta``: its sidecar if the
        caller has read it already (False: read it here)."""
        if meta is False:
            meta = self.read_meta()
        if meta is None:
            return "there is no image (pack with 'conda stage --pack --image')"
        if (meta.tarball_size, meta.tarball_mtime_ns) != (tarball_st.st_size,
                                                          tarball_st.st_mtime_ns):
            return "the image is older than the tarball (pack with --image again)"
        if meta.mount_prefix != mount_prefix:
            return (f"the image was built for {printable(meta.mount_prefix)}, this node mounts "
                    f"at {printable(mount_prefix)} (a different staging folder or user)")
        try:
            st = os.stat(self.path)
        except OSError:
            return "the image file is missing"
        if st.st_size != meta.size:
            return "the image file is not the one its sidecar describes"
        return None


_FINGERPRINT = re.compile(r"[0-9a-f]{32}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _known_fields(data) -> dict:
    """The sidecar's fields this conda-stage knows; a few more, named like
    fields, that a later version added are ignored (as in the tarball's
    sidecar: a rolling upgrade keeps images in use)."""
    from .tarball import MAX_UNKNOWN_FIELDS, _FIELD_NAME

    if not isinstance(data, dict):
        raise TypeError("not an object")
    known = ImageMeta.__dataclass_fields__
    unknown = [k for k in data if k not in known]
    if len(unknown) > MAX_UNKNOWN_FIELDS or not all(_FIELD_NAME.match(k) for k in unknown):
        raise ValueError("not an image sidecar")
    return {k: v for k, v in data.items() if k in known}


# ------------------------------------------------------------------ tools
def fuse_problem() -> str | None:
    """Why the current user cannot mount an image on this node (None: they can)."""
    for tool in (SQUASHFUSE, FUSERMOUNT):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not usable by this user"
    return None


def mount_prefix_for(staging_dir: str, uid: int, image_id: str, name: str) -> str:
    from .nodestore import NodeStore

    return str(NodeStore(staging_dir, "/").copy_folder(uid, image_id) / name)


# ------------------------------------------------------------------ build
def build(env: Env, *, staging_dir: str, lock_timeout: float | None = None) -> ImageMeta:
    """(user) Pack the tarball if needed, then build the image from it,
    relocated for this user's mount path under ``staging_dir``; atomic,
    under the environment's lock."""
    from .locking import file_lock
    from .pack import pack
    from .stage import _stage_from
    from .tarball import Tarball, atomic_write

    if shutil.which("mksquashfs") is None:
        raise StageError("mksquashfs is not installed (Debian: apt-get install squashfs-tools)")
    pack(env, lock_timeout=lock_timeout)
    image = Image(env)
    with file_lock(Tarball.lock_for(env), timeout=lock_timeout,
                   waiting=f"Waiting for another process packing {env.prefix} ..."):
        tarball, side = Tarball.load(env)
        fh = open_regular(tarball.path, what="tarball")
        with fh:
            st = os.fstat(fh.fileno())
            side = side.check(st)
            if side.meta is None:
                raise StageError(f"No usable tarball for {env.prefix}: {side.problem}")
            old = image.read_meta()
            if old is not None and old.self_contained() and \
                    old.fingerprint == side.meta.fingerprint and \
                    image.usable(st, old.mount_prefix) is None and \
                    old.mount_prefix == mount_prefix_for(staging_dir, os.getuid(),
                                                         old.image_id, env.name):
                output.info(f"Image {image.path} is up to date")
                return old
            image_id = secrets.token_hex(8)
            prefix = mount_prefix_for(staging_dir, os.getuid(), image_id, env.name)
            t0 = time.monotonic()
            output.info(f"Building image {image.path} for {prefix} ...")
            work = Path(tempfile.mkdtemp(prefix=".cs-image-", dir=os.environ.get("TMPDIR",
                                                                                   "/var/tmp")))
            try:
                tree = work / env.name
                _stage_from(env, side.meta, fh, tarball, path=tree, base=None, name=env.name,
                            writable=False, owner_pid=None, mode="job", job_id=None,
                            relocate_to=prefix)
                tmp_image = image.path.with_name(f".{image.path.name}.{os.getpid()}.tmp")
                _mksquashfs(tree, tmp_image)
                built = os.stat(tmp_image)  # a rename keeps size, mtime and inode
                os.replace(tmp_image, image.path)
            finally:
                from .store import remove_tree

                remove_tree(work)
                if "tmp_image" in locals() and tmp_image.exists():
                    tmp_image.unlink()
            meta = ImageMeta(image_id=image_id, mount_prefix=prefix, tarball_size=st.st_size,
                             tarball_mtime_ns=st.st_mtime_ns, size=built.st_size,
                             created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             build_seconds=round(time.monotonic() - t0, 3),
                             image_mtime_ns=built.st_mtime_ns, image_ino=built.st_ino,
                             fingerprint=side.meta.fingerprint, quick=side.meta.quick)
            atomic_write(image.meta_path, json.dumps(asdict(meta), indent=1).encode())
    output.info(f"Created image {image.path} ({meta.size} bytes) in "
                f"{output.seconds(meta.build_seconds)}")
    return meta


def has_image(env: Env) -> bool:
    """Whether ``env`` was packed with an image (its image or sidecar is there)."""
    image = Image(env)
    return os.path.lexists(image.meta_path) or os.path.lexists(image.path)


def after_pack(env: Env, *, build_image: bool) -> None:
    """(user) After ``--pack`` or ``--auto-stage=enable``: build the image
    when asked (``--image``: a failure is the command's error), else keep an
    existing one current (:func:`keep_current`)."""
    if not build_image:
        keep_current(env)
        return
    from .config import Config

    build(env, staging_dir=Config.load().staging_dir)


def keep_current(env: Env, *, lock_timeout: float | None = None) -> None:
    """(user) After packing: rebuild the image of an environment that has
    one, so that its jobs keep mounting instead of extracting (an image
    older than the tarball is not used).  Never fails the caller, whose
    tarball is fresh: a problem is one warning line."""
    if not has_image(env):
        return
    from .config import Config

    try:
        build(env, staging_dir=Config.load().staging_dir, lock_timeout=lock_timeout)
    except (StageError, OSError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        output.warn(f"The image {Image(env).path} was not rebuilt ({printable(why)}); jobs "
                    f"extract the tarball until 'conda stage --pack --image' succeeds")


def _mksquashfs(tree: Path, out: Path) -> None:
    from .formats import cpu_count

    r = subprocess.run(["mksquashfs", str(tree), str(out), "-comp", "zstd", "-noappend",
                        "-Xcompression-level", "6", "-no-xattrs", "-quiet", "-no-progress", "-processors",
                        str(cpu_count())], capture_output=True, text=True)
    if r.returncode != 0:
        raise StageError(f"mksquashfs failed: {printable((r.stderr or r.stdout).strip())}")


# ------------------------------------------------------------ mount (user)
def open_image(path: Path, *, to_read: bool) -> int:
    """A descriptor of the image file ``path`` (a regular file): opened to
    read it (``to_read``: to copy it), else ``O_PATH`` -- which sends no
    open to a network filesystem, and which :func:`mount` hands to
    ``squashfuse_ll``: the file mounted is the file checked."""
    if to_read:
        return open_regular_fd(path, what="image")
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StageError(f"{printable(str(path))} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def mount(image_file: Path, target: Path, *, copy_into: Path | None = None,
          deadline: float | None = None, opened: int | None = None) -> float:
    """(job user) Mount ``image_file`` read-only at ``target`` (made here);
    ``opened``: a descriptor of it (:func:`open_image`), mounted instead of
    the path.  With ``copy_into``, copy the image there first (from
    ``opened``, opened to read, at its start) and mount the copy.  Returns
    the seconds it took.  The FUSE process detaches; unmount with
    :func:`unmount`."""
    t0 = time.monotonic()
    source, fds = str(image_file), ()
    if copy_into is not None:
        with contextlib.ExitStack() as stack:
            src = opened
            if src is None:
                src = open_regular_fd(image_file, what="image")
                stack.callback(os.close, src)
            tmp = copy_into.with_name(f".{copy_into.name}.partial")
            with open(tmp, "wb") as dst:
                _copy(src, dst.fileno())
            os.replace(tmp, copy_into)
        source = str(copy_into)
    elif opened is not None:
        source, fds = f"/proc/self/fd/{opened}", (opened,)
    for dead in mounts_under(target):  # a mount whose FUSE process died
        unmount(dead, listed=True)
    os.makedirs(target, mode=0o755, exist_ok=True)
    left = 60.0 if deadline is None else max(1.0, deadline - time.monotonic())
    try:
        # -o ro: a read-only superblock; else every read marks the atime
        # stale and the next stat of the file is a round trip to the FUSE
        # process (a quarter of the requests of a Python start)
        r = subprocess.run([SQUASHFUSE, "-o", "ro", source, str(target)], pass_fds=fds,
                           capture_output=True, text=True, timeout=left,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        unmount(target)
        raise StageError("mounting the image took longer than the time allowed") from None
    if r.returncode != 0 or not os.path.ismount(target):
        raise StageError(f"{SQUASHFUSE} could not mount the image: "
                         f"{printable((r.stderr or r.stdout).strip()) or 'no reason given'}")
    return time.monotonic() - t0


def _copy(src: int, dst: int) -> None:
    """Copy a whole file in the kernel (sendfile: any pair of filesystems,
    no trip through user memory): ten times faster than read/write here."""
    while True:
        try:
            if os.sendfile(dst, src, None, 1 << 30) == 0:
                return
        except OSError as exc:  # a filesystem without sendfile: copy in user space
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            while chunk := os.read(src, 4 << 20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dst, view):]
            return


def unmount(target: Path, *, listed: bool = False, lazy: bool = True) -> bool:
    """(the user who mounted it) Unmount ``target``; lazily if it is busy
    (``lazy=False``: not at all, returning False).  ``listed``: it is in
    the mount table (a mount whose FUSE process died fails ``ismount``).
    Returns whether something was unmounted."""
    if not listed and not os.path.ismount(target):
        return False
    for args in (["-u"], ["-u", "-z"]) if lazy else (["-u"],):
        r = subprocess.run([FUSERMOUNT, *args, str(target)], capture_output=True, text=True,
                           timeout=60)
        if r.returncode == 0:
            return True
    if not lazy:
        return False
    raise StageError(f"could not unmount {printable(str(target))}: "
                     f"{printable(r.stderr.strip())}")


def unmount_all(folder: Path, keep=frozenset()) -> None:
    """(user) Unmount every FUSE mount at or under ``folder`` but those at
    ``keep``: shallowest first, lazily if busy (a lazy unmount takes the
    mounts on top of it along).  Never looks inside one (it may hang)."""
    for _ in range(3):  # a mount over another hides it until it goes
        points = [p for p in reversed(mounts_under(folder)) if str(p) not in keep]
        if not points:
            return
        for point in points:
            try:
                unmount(point, listed=True)
            except (StageError, OSError, subprocess.SubprocessError):
                continue


def mounts_under(folder: Path) -> list[Path]:
    """FUSE mount points at or below ``folder`` (from /proc/self/mountinfo),
    deepest first."""
    try:
        with open("/proc/self/mountinfo", "rb") as fh:
            return fuse_mounts_under(fh.read(), folder)
    except OSError:
        return []


def fuse_mounts_under(mountinfo: bytes, folder: Path) -> list[Path]:
    root = os.fsencode(str(folder).rstrip("/"))
    found = []
    for line in mountinfo.splitlines():
        fields = line.split(b" ")
        if len(fields) < 5 or b" - fuse" not in line:
            continue
        # the kernel writes space, tab, newline and backslash as \ooo
        point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
        if point == root or point.startswith(root + b"/"):
            found.append(Path(os.fsdecode(point)))
    return sorted(found, key=lambda p: len(str(p)), reverse=True)
