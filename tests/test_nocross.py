"""Root's lookups that never enter a mount (conda_stage.nocross), on real
mounts (tmpfs, as root): the kernel refuses before the mounted filesystem
is asked anything."""
import errno
import os
import subprocess
from pathlib import Path

import pytest

from conda_stage.nocross import detach_at, have_openat2, is_mount_error, lstat_at, open_at

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "mnt").mkdir()
    os.symlink("/etc", tmp_path / "link")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "cs-test", str(tmp_path / "mnt")],
                   check=True)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield tmp_path, fd
    os.close(fd)
    if str(tmp_path / "mnt") in Path("/proc/self/mountinfo").read_text():
        subprocess.run(["umount", "-l", str(tmp_path / "mnt")], check=False)


def test_a_mount_is_refused_before_it_is_entered(folder):
    path, fd = folder
    assert have_openat2()  # Linux >= 5.6, as on the machines the suite runs on
    for look in (lambda: lstat_at(fd, "mnt"), lambda: open_at(fd, "mnt", os.O_RDONLY),
                 lambda: open_at(fd, "mnt/x", os.O_RDONLY)):
        with pytest.raises(OSError) as info:
            look()
        assert info.value.errno == errno.EXDEV and is_mount_error(info.value)
    assert lstat_at(fd, "plain").st_ino == os.stat(path / "plain").st_ino


def test_links_are_never_followed_but_may_be_looked_at(folder):
    path, fd = folder
    assert lstat_at(fd, "link").st_ino == os.lstat(path / "link").st_ino  # the link itself
    with pytest.raises(OSError) as info:
        open_at(fd, "link", os.O_RDONLY | os.O_DIRECTORY)
    assert info.value.errno == errno.ELOOP
    with pytest.raises(OSError):
        open_at(fd, "../", os.O_RDONLY | os.O_DIRECTORY)  # nothing above the folder


def test_detach_at_takes_the_mount_on_that_name_only(folder):
    path, fd = folder
    assert not detach_at(fd, "plain") and not detach_at(fd, "link")
    assert detach_at(fd, "mnt")
    assert lstat_at(fd, "mnt").st_dev == os.fstat(fd).st_dev  # the folder under it
    with pytest.raises(ValueError):
        detach_at(fd, "a/b")


def test_doctor_says_when_users_may_mount_for_root(tmp_path):
    from conda_stage.doctor import Report, _mount_safety

    conf = tmp_path / "fuse.conf"
    conf.write_text("# user_allow_other\nmount_max = 1000\n")
    quiet = Report()
    _mount_safety(quiet, str(conf))
    assert not any("user_allow_other" in line for line in quiet.lines)
    conf.write_text("user_allow_other\n")
    told = Report()
    _mount_safety(told, str(conf))
    assert any("has user_allow_other" in line and "never enter them" in line
               for line in told.lines), told.lines
