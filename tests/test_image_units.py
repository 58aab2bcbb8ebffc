"""Image mode's pure logic: when an image may stand in for its tarball,
and what its sidecar must look like (no FUSE, no scheduler)."""
import json
import os
from pathlib import Path

import pytest

from conda_stage.image import Image, fuse_mounts_under, mount_prefix_for
from conda_stage.resolve import Env


@pytest.fixture
def image(tmp_path):
    prefix = tmp_path / "envs" / "jup"
    prefix.mkdir(parents=True)
    tarball = tmp_path / "envs" / "jup.tar.zst"
    tarball.write_bytes(b"t" * 100)
    img = Image(Env(prefix=prefix, name="jup"))
    img.path.write_bytes(b"i" * 50)
    st = os.stat(tarball)
    meta = {"image_id": "0123456789abcdef", "tarball_size": 100,
            "tarball_mtime_ns": st.st_mtime_ns, "size": 50, "created": "now",
            "build_seconds": 1.0,
            "mount_prefix": mount_prefix_for("/var/lib/cs", 1000, "0123456789abcdef", "jup")}
    img.meta_path.write_text(json.dumps(meta))
    return img, st, meta


def test_an_image_of_this_tarball_for_this_mount_path_is_usable(image):
    img, st, meta = image
    assert meta["mount_prefix"] == "/var/lib/cs/users/1000/0123456789abcdef/jup"
    assert img.usable(st, meta["mount_prefix"]) is None


def test_an_image_that_does_not_match_is_not_used_and_says_why(image, tmp_path):
    img, st, meta = image
    assert "older than the tarball" in img.usable(
        os.stat_result((0,) * 6 + (101,) + (0,) * 3), meta["mount_prefix"])
    assert "built for /var/lib/cs/users/1000/" in img.usable(st, "/elsewhere/x/jup")
    img.path.write_bytes(b"i" * 51)
    assert "not the one its sidecar describes" in img.usable(st, meta["mount_prefix"])
    img.path.unlink()
    assert "missing" in img.usable(st, meta["mount_prefix"])


@pytest.mark.parametrize("bad", [{"image_id": "../../etc"}, {"mount_prefix": "rel/path"},
                                 {"mount_prefix": "/a\nb"}, {"size": "50"}, {"Extra": 1},
                                 {f"later_{i}": i for i in range(17)}])
def test_a_sidecar_conda_stage_did_not_write_is_ignored(image, bad):
    img, st, meta = image
    img.meta_path.write_text(json.dumps({**meta, **bad}))
    assert img.read_meta() is None
    assert "there is no image" in img.usable(st, meta["mount_prefix"])


def test_fields_a_later_version_adds_are_ignored(image):
    img, st, meta = image
    img.meta_path.write_text(json.dumps({**meta, "later_field": [1, {"a": 2}]}))
    assert img.read_meta() is not None
    assert img.usable(st, meta["mount_prefix"]) is None


def _self_contained(img, meta, prefix):
    """The sidecar as this conda-stage writes it: the image file's identity
    and the environment's fingerprint, with its quick check."""
    from conda_stage import fingerprint as fp

    st = os.stat(img.path)
    parent_st = os.stat(prefix.parent)
    time_ref = parent_st.st_mtime_ns + 10**9  # "the tarball's mtime", after every stat
    full = {**meta, "image_mtime_ns": st.st_mtime_ns, "image_ino": st.st_ino,
            "fingerprint": fp.fingerprint(prefix),
            "quick": fp.quick_record(prefix, fp.fingerprint(prefix), time_ref, parent_st.st_dev)}
    img.meta_path.write_text(json.dumps(full))
    return full


def _env_tree(prefix):
    (prefix / "conda-meta").mkdir(exist_ok=True)
    (prefix / "conda-meta" / "python-3.11.json").write_text("{}")
    (prefix / "conda-meta" / "history").write_text("==> 2026 <==\n")
    (prefix / "lib" / "python3.11" / "site-packages").mkdir(parents=True, exist_ok=True)
    past = 1_700_000_000
    for path in (prefix / "conda-meta" / "history", prefix / "conda-meta",
                 prefix / "lib" / "python3.11" / "site-packages"):
        os.utime(path, (past, past))


def test_a_sidecar_with_the_fingerprint_alone_says_the_image_is_current(image):
    img, st, meta = image
    _env_tree(img.env.prefix)
    full = _self_contained(img, meta, img.env.prefix)
    assert full["quick"], "the fixture must give a quick check"
    read = img.read_meta()
    assert read.self_contained() and read.describes(os.stat(img.path))
    assert img.fresh(read, meta["mount_prefix"])
    assert not img.fresh(read, "/elsewhere/x/jup")


def test_a_changed_environment_or_a_replaced_image_is_not_current(image):
    img, st, meta = image
    prefix = img.env.prefix
    _env_tree(prefix)
    _self_contained(img, meta, prefix)
    (prefix / "lib" / "python3.11" / "site-packages" / "new-1.0.dist-info").mkdir()
    assert not img.fresh(img.read_meta(), meta["mount_prefix"])  # pip installed something
    (prefix / "lib" / "python3.11" / "site-packages" / "new-1.0.dist-info").rmdir()
    _self_contained(img, meta, prefix)
    replaced = img.path.with_name("new.sqfs")
    replaced.write_bytes(b"i" * 50)  # same size, another file
    os.replace(replaced, img.path)
    assert not img.read_meta().describes(os.stat(img.path))


def test_a_sidecar_of_an_earlier_build_leaves_it_to_the_tarball(image):
    img, st, meta = image
    _env_tree(img.env.prefix)
    read = img.read_meta()  # the fixture's: no identity, no fingerprint
    assert not read.self_contained() and not img.fresh(read, meta["mount_prefix"])


@pytest.mark.parametrize("bad", [{"fingerprint": "g" * 32}, {"fingerprint": 5},
                                 {"image_ino": "1"}, {"image_mtime_ns": True},
                                 {"quick": [["../etc", None]]}, {"quick": "x"},
                                 {"quick": [["conda-meta", [1, 2, 3]]]}])
def test_new_fields_of_the_wrong_shape_make_the_sidecar_ignored(image, bad):
    img, st, meta = image
    img.meta_path.write_text(json.dumps({**meta, "image_ino": 1, "image_mtime_ns": 2,
                                         "fingerprint": "0" * 32, **bad}))
    assert img.read_meta() is None


def test_mounts_under_lists_fuse_mounts_deepest_first():
    table = (
        b"36 25 0:32 / /var/lib/cs/users/1000/aa/jup ro,nosuid - fuse.squashfuse_ll x ro\n"
        b"37 25 0:33 / /var/lib/cs/users/1000/aa/jup/sub rw - fuse.other y rw\n"
        b"38 25 0:34 / /var/lib/cs/users/10001/bb/jup rw - fuse.squashfuse_ll z ro\n"
        b"39 25 0:35 / /var/lib/cs/users/1000/with\\040space rw - fuse.squashfuse_ll z ro\n"
        b"40 25 0:36 / /var/lib/cs/users/1000/t rw - tmpfs tmpfs rw\n")
    found = fuse_mounts_under(table, Path("/var/lib/cs/users/1000"))
    assert found == [Path("/var/lib/cs/users/1000/aa/jup/sub"),
                     Path("/var/lib/cs/users/1000/with space"),
                     Path("/var/lib/cs/users/1000/aa/jup")]


def test_fuse_mounts_under_reads_escaped_and_non_ascii_mount_points():
    info = (b"36 25 0:32 / /s/users/5/a\\040b rw,nosuid - fuse.squashfuse_ll x ro\n"
            b"37 25 0:33 / /s/users/5/\xc3\xa9t\xc3\xa9\\012x rw - fuse.slowfs y rw\n"
            b"38 25 0:34 / /s/users/5/abc/deep rw - fuse.squashfuse_ll z ro\n"
            b"39 25 0:35 / /s/users/50 rw - fuse.squashfuse_ll z ro\n"
            b"40 25 0:36 / /s/users/5/tmpfs rw - tmpfs tmpfs rw\n")
    got = fuse_mounts_under(info, Path("/s/users/5"))
    assert got == [Path("/s/users/5/abc/deep"), Path("/s/users/5/\u00e9t\u00e9\nx"),
                   Path("/s/users/5/a b")]
    assert fuse_mounts_under(info, Path("/s/users/50/")) == [Path("/s/users/50")]
