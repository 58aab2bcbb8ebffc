"""The privilege drop root hooks rely on: the child is the user and nothing
of root, it is bounded in time and in what root reads back from it."""
import os
import pwd

import pytest

from conda_stage.privileges import Account, ChildFailed, run_as

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")


@pytest.fixture
def nobody():
    return Account.lookup(user=pwd.getpwuid(65534).pw_name)


def _who():
    return {"ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],
            "groups": os.getgroups()}


def test_child_is_the_user_with_nothing_of_root(nobody):
    r = run_as(nobody, _who)
    assert r["ids"] == [65534, 65534, nobody.gid, nobody.gid]
    assert 0 not in r["groups"]


def test_a_child_that_hangs_is_killed_at_the_timeout(nobody):
    import time

    t0 = time.monotonic()
    with pytest.raises(ChildFailed, match="timed out"):
        run_as(nobody, time.sleep, 60, timeout=1)
    assert time.monotonic() - t0 < 10


def test_root_reads_a_bounded_report(nobody):
    with pytest.raises(ChildFailed, match="larger than"):
        run_as(nobody, lambda: "x" * (20 << 20))


def test_exceptions_come_back_as_their_message(nobody):
    def fail():
        raise OSError(13, "Permission denied", "/root/secret")

    with pytest.raises(ChildFailed, match="Permission denied"):
        run_as(nobody, fail)
