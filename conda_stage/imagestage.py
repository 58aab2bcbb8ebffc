"""Staging an environment's image: mounted in the user's store folder for
a job (:func:`mount_fresh_image`, :func:`mount_image`) or a shell
(:func:`mount_for_shell`, :func:`mount_fresh_for_shell`), under the image
folder's lock, and held by the job's claim or the shell (:mod:`shellimage`
owns the folders and holders; :mod:`image` builds, mounts and unmounts).

An image whose sidecar says it is current is mounted without the tarball,
its sidecar or the environment's lock; otherwise the tarball's locked path
in :mod:`stage` decides, and passes the tarball's stat here.

It imports :mod:`shellimage` (and with it the node store) only when it
mounts: activating an environment without an image never loads them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from . import output
from .errors import StageError
from .output import printable
from .resolve import Env
from .store import add_holder, read_marker, remove_tree
from .userfiles import check_planted


class Shared(NamedTuple):
    """A copy in the user's store folder: extracted, or an image mounted."""

    path: Path
    copy_id: str
    reused: bool
    bytes: int
    files: int
    image: bool = False
    note: str | None = None  # why an image was not mounted (the job is told)


def announce(env: Env) -> None:
    output.info(f"Staging current Conda environment ({env.prefix}) to local disk ...")


class _ImageReplaced(Exception):
    """The image file opened is not the one its sidecar describes (a repack
    replaced it meanwhile)."""


def mount_fresh_image(env: Env, folder: Path, name: str, copy_image: bool, deadline,
                      holder: int | None = None) -> Shared | str | None:
    """The environment's image mounted in the user's store ``folder`` as
    :func:`mount_image` does -- but judged by the image's sidecar alone,
    without the tarball, its sidecar or the environment's lock (on a shared
    filesystem: 17 requests instead of 27, and no wait for a repack).  None when the sidecar cannot
    tell (an image of an earlier build, the environment changed since, an
    image replaced while it was opened): the tarball's locked path decides,
    and says why.  A line for the user when mounting failed (then extract)."""
    from . import image

    img = image.Image(env)
    meta = img.read_meta()
    if meta is None:
        return None
    target = folder / meta.image_id / name
    if not img.fresh(meta, str(target)):
        return None
    announce(env)
    why = image.fuse_problem()
    if why is not None:
        line = f"not mounting its image ({why}); extracting it instead"
        output.warn(line)
        return line
    try:
        return _mount_held(env, img, target, meta.image_id, copy_image, deadline, holder,
                           expect=meta)
    except _ImageReplaced:
        return None
    except OSError as exc:
        line = f"not mounting its image ({printable(exc.strerror or str(exc))}); extracting " \
               f"it instead"
        output.warn(line)
        return line


def mount_image(env: Env, folder: Path, name: str, tarball_st, mode: str, copy_image: bool,
                deadline, holder: int | None = None) -> Shared | str | None:
    """The environment's image mounted in the user's store ``folder``
    (reused if it already is), for a job -- or, with ``holder``, for that
    shell (:mod:`shellimage`); else why extraction must do (a line for the
    user), or None when there is nothing to say (no image, mode "auto")."""
    from . import image

    img = image.Image(env)
    meta = img.read_meta()
    cid = meta.image_id if meta is not None else "0" * 16
    target = folder / cid / name
    why = img.usable(tarball_st, str(target), meta) or image.fuse_problem()
    if why is not None:
        if mode == "image" or meta is not None:
            line = f"not mounting its image ({why}); extracting it instead"
            output.warn(line)
            return line
        return None
    try:
        return _mount_held(env, img, target, cid, copy_image, deadline, holder)
    except OSError as exc:
        line = f"not mounting its image ({printable(exc.strerror or str(exc))}); extracting " \
               f"it instead"
        output.warn(line)
        return line


def _mount_held(env: Env, img, target: Path, cid: str, copy_image: bool, deadline,
                holder: int | None, expect=None) -> Shared | str:
    """Under the image folder's lock: the mount at ``target``, reused or
    made, held by the job (its claim) or the shell ``holder``."""
    from . import shellimage

    with shellimage.folder_locked(target.parent):
        mounted = _mount_locked(env, img, target, cid, copy_image, deadline, expect=expect)
        if isinstance(mounted, Shared):
            if holder is None:
                shellimage.claim_for_job(target.parent)
            else:
                add_holder(target, holder)
        return mounted


def _mount_locked(env: Env, img, target: Path, cid: str, copy_image: bool,
                  deadline, expect=None) -> Shared | str:
    """(under the image folder's lock) Reuse or make the mount at
    ``target``.  ``expect``: the sidecar the image file must match
    (:class:`_ImageReplaced` if it does not)."""
    from . import image

    if os.path.ismount(target) and read_marker(target) is not None:
        output.info(f"Using the image mounted on this node: {target}")
        return Shared(target, cid, True, 0, 0, True)
    try:
        # opened once: checked, then copied or mounted
        fd = image.open_image(img.path, to_read=copy_image)
        try:
            st = os.fstat(fd)
            if expect is not None and not expect.describes(st):
                raise _ImageReplaced()
            check_planted(env, img, st, kind="image", side=img.meta_st)
            output.info(f"Mounting {output.describe_file(img.path)} at {target}")
            took = image.mount(img.path, target, deadline=deadline, opened=fd,
                               copy_into=target.parent / (f".image{image.SUFFIX}")
                               if copy_image else None)
        finally:
            os.close(fd)
        if read_marker(target) is None:
            raise StageError(f"the image {img.path} is not a conda-stage image of {env.prefix}")
    except (StageError, OSError) as exc:  # a broken or planted image: the tarball may do
        try:
            image.unmount_all(target)
            remove_tree(target)
            (target.parent / f".image{image.SUFFIX}").unlink(missing_ok=True)
        except OSError:
            pass  # an unrecorded folder in the store: the next sweep takes it
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        line = f"not mounting its image ({printable(why)}); extracting it instead"
        output.warn(line)
        return line
    output.info(f"Total mount time: {output.seconds(took)}")
    return Shared(target, cid, False, 0, 0, True)


def _shell_folder():
    """(the user's shell) The site's settings and the user's folder in the
    store, when shells may mount images here; else None (not here), or the
    line for the user (the folder cannot be used: extract)."""
    from . import shellimage

    config = shellimage.site()
    if config is None:
        return None
    folder = shellimage.own_folder(config.staging_dir)
    if isinstance(folder, str):
        return f"not mounting its image ({printable(folder)}); extracting it instead"
    return config, folder


def mount_for_shell(env, tarball_st: os.stat_result, owner_pid: int,
                    deadline: float | None = None) -> Path | None:
    """(the user's shell) The environment's image mounted for the shell
    ``owner_pid`` (shared with the user's other shells and jobs on this
    node), or None: extract instead -- one line says why when an image was
    there to use."""
    where = _shell_folder()
    if not isinstance(where, tuple):
        if where is not None:
            output.warn(where)
        return None
    config, folder = where
    mounted = mount_image(env, folder, env.name, tarball_st, config.stage_mode,
                          config.image_copy, deadline, holder=owner_pid)
    return mounted.path if isinstance(mounted, Shared) else None


def mount_fresh_for_shell(env, owner_pid: int, deadline: float | None = None) -> Path | str | None:
    """(the user's shell) As :func:`mount_for_shell`, judged by the image's
    sidecar alone (:func:`mount_fresh_image`), before the tarball is
    opened: the mount's path; a line already said (extract instead); or
    None (the tarball's path decides)."""
    where = _shell_folder()
    if isinstance(where, str):  # said here, in the order the tarball's path would
        announce(env)
        output.warn(where)
    if not isinstance(where, tuple):
        return where
    config, folder = where
    mounted = mount_fresh_image(env, folder, env.name, config.image_copy, deadline,
                                holder=owner_pid)
    return mounted.path if isinstance(mounted, Shared) else mounted
