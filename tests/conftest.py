import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest

from tests.harness.users import TEST_BASE

pytest_plugins = ["tests.harness.fixtures", "tests.harness.slurm", "tests.harness.sge"]


@pytest.fixture(scope="session")
def stage_bin() -> Path:
    """A folder holding only a ``conda-stage`` symlink to the installation
    under test -- what a site puts on users' PATH (e.g. via a module)."""
    folder = TEST_BASE / "bin"
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    link = folder / "conda-stage"
    target = Path(sys.prefix) / "bin" / "conda-stage"
    if link.is_symlink() and os.readlink(link) != str(target):
        link.unlink()
    if not link.is_symlink():
        link.symlink_to(target)
    return folder


@pytest.fixture
def user_tmp(conda_user):
    """A fresh folder owned by the test user (for TMPDIR and scratch files)."""
    path = TEST_BASE / "tmp" / uuid.uuid4().hex[:8]
    path.mkdir(parents=True)
    (TEST_BASE / "tmp").chmod(0o755)
    os.chown(path, conda_user.uid, conda_user.gid)
    yield path
    for root, dirs, _files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o700)
    shutil.rmtree(path, ignore_errors=True)
