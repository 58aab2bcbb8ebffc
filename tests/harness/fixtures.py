"""pytest plugin: session fixtures for the real conda (see tests/harness/conda.py).

Enable with ``pytest_plugins = ["tests.harness.fixtures"]`` in tests/conftest.py.

* ``conda_site`` (session): the built/cached :class:`~tests.harness.conda.CondaSite`.
  A cold build takes ~1 min (counted in the first test that uses it), a warm one <1 s.
* ``conda_user`` (session): the unprivileged test user ``csalice`` (override with
  ``$CONDA_STAGE_TEST_CONDA_USER``).
* ``conda_env`` (function): a factory ``conda_env(name=None, *, user=conda_user,
  prefix=None, packages=("python", "pip", "prefix-probe")) -> Path`` that creates an
  environment with the real ``conda create`` as that user; every env it made is
  deleted after the test.

Example::

    @pytest.mark.conda
    def test_something(conda_site, conda_user, conda_env):
        env = conda_env()                                  # ~csalice/.conda/envs/env-XXXXXXXX
        r = conda_site.shell(conda_user, f"conda activate {env.name} && prefix-probe")
        assert r.stdout.splitlines()[0] == f"exe:{env}"
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .conda import DEFAULT_PACKAGES, CondaFixtureError, CondaSite
from .users import ensure_user

CONDA_TEST_USER = os.environ.get("CONDA_STAGE_TEST_CONDA_USER", "csalice")


@pytest.fixture(scope="session")
def conda_site() -> CondaSite:
    """The site conda + local channel, built once and cached under TEST_BASE/cache."""
    try:
        return CondaSite.ensure()
    except CondaFixtureError as exc:
        pytest.fail(f"conda fixture: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def conda_user():
    """An unprivileged user (uid >= 1000) for conda environments and jobs."""
    return ensure_user(CONDA_TEST_USER)


@pytest.fixture
def conda_env(conda_site, conda_user):
    """Factory: ``conda_env(name=None, *, user=..., prefix=None, packages=...) -> Path``."""
    made: list = []

    def make(name: str | None = None, *, user=conda_user, prefix=None, packages=DEFAULT_PACKAGES,
             extra_args=()) -> Path:
        path = conda_site.create_env(user, name, prefix=prefix, packages=packages, extra_args=extra_args)
        made.append(path)
        return path

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)
