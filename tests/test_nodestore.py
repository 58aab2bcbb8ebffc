"""The node store on its own (as root, real folders, no scheduler): copy
identity, holders and their release, the keep time and the disk budget,
the per-user lock, and removal that never follows what a user planted."""
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from conda_stage.errors import StageError
from conda_stage.jobdir import UnsafeBase
from conda_stage.nodestore import NodeStore, Record, copy_id, holder, over_budget

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the node store is root's")


@pytest.fixture
def store(tmp_path):
    tmp_path.chmod(0o755)
    return NodeStore(str(tmp_path / "jobs"), str(tmp_path / "state"), keep_unused=60)


def _copy(store, uid, cid, name="env", files=3):
    """A copy as the staging child leaves it: owned by the user, read-only."""
    folder = store.prepare_user(uid, uid)
    path = folder / cid / name
    path.mkdir(parents=True)
    for i in range(files):
        (path / f"f{i}").write_text("x")
    for p in (path, path.parent):
        os.chown(p, uid, uid)
    path.chmod(0o555)
    return path


def test_copy_id_changes_with_user_name_env_and_tarball(tmp_path):
    tar = tmp_path / "t.tar.zst"
    tar.write_bytes(b"1")
    st = os.stat(tar)
    base = copy_id(1000, "env", "/home/a/env", st)
    assert len(base) == 16 and base == copy_id(1000, "env", "/home/a/env", st)
    assert base != copy_id(1001, "env", "/home/a/env", st)
    assert base != copy_id(1000, "other", "/home/a/env", st)
    assert base != copy_id(1000, "env", "/home/b/env", st)
    tar.unlink()
    tar.write_bytes(b"22")  # a repack: a new file
    assert base != copy_id(1000, "env", "/home/a/env", os.stat(tar))


def test_user_folder_is_the_users_own_and_records_are_roots(store):
    folder = store.prepare_user(NOBODY, NOBODY)
    st = os.stat(folder)
    assert (st.st_uid, st.st_mode & 0o777) == (NOBODY, 0o700)
    with store.locked(NOBODY) as mine:
        mine.hold("0123456789abcdef", "slurm:7", name="env", original="/e")
    rec_file = Path(store.state_dir) / "users" / str(NOBODY) / "0123456789abcdef.json"
    st = os.stat(rec_file)
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o644)
    assert os.stat(Path(store.state_dir) / "users").st_mode & 0o777 == 0o711


def test_a_folder_planted_in_place_of_the_users_is_replaced(store):
    users = Path(store.staging_dir) / "users"
    users.mkdir(parents=True)
    (users / str(NOBODY)).symlink_to("/etc")
    before = sorted(os.listdir("/etc"))
    folder = store.prepare_user(NOBODY, NOBODY)
    assert folder.is_dir() and not folder.is_symlink()
    assert sorted(os.listdir("/etc")) == before


def test_holders_keep_a_copy_until_the_last_release_and_the_keep_time(store):
    cid = "00000000000000aa"
    path = _copy(store, NOBODY, cid)
    with store.locked(NOBODY) as mine:
        mine.hold(cid, holder("slurm", "1"), name="env", original="/e", size=(10, 3))
        mine.hold(cid, holder("slurm", "2"), name="env", original="/e")
        assert mine.unused() == []
        assert [r.id for r in mine.release("slurm:1")] == [cid]
        assert mine.records()[cid].holders.keys() == {"slurm:2"}
        assert mine.unused(keep=0) == []  # still held
        mine.release("slurm:2")
        assert mine.unused() == []  # within the keep time
        doomed = mine.unused(now=time.time() + 61)
        assert [r.id for r in doomed] == [cid]
        for rec in doomed:
            mine.remove(rec)
        mine.tidy()
    assert not path.exists() and not path.parent.exists()
    # nothing of this user is left: folder, records and lock file are gone
    assert os.listdir(Path(store.staging_dir) / "users") == []
    assert os.listdir(Path(store.state_dir) / "users") == []


def test_a_copy_folder_without_a_record_is_swept(store):
    half = _copy(store, NOBODY, "00000000000000bb").parent
    with store.locked(NOBODY) as mine:
        doomed = mine.unused()
        assert [r.id for r in doomed] == ["00000000000000bb"]
        mine.remove(doomed[0])
    assert not half.exists()


def test_removal_never_follows_a_symlink_the_user_planted(store, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    path = _copy(store, NOBODY, "00000000000000cc")
    path.chmod(0o755)
    (path / "link").symlink_to(victim)
    (path.parent / "swap").symlink_to(victim)
    with store.locked(NOBODY) as mine:
        for rec in mine.unused():
            mine.remove(rec)
    assert (victim / "keep").exists()
    assert not path.parent.exists()


def test_drop_holders_of_jobs_that_no_longer_run(store):
    with store.locked(NOBODY) as mine:
        mine.hold("00000000000000dd", "slurm:1", name="env", original="/e")
        mine.hold("00000000000000dd", "sge:2.3", name="env", original="/e")
        dropped = mine.drop_holders(lambda h: h == "slurm:1")
        assert dropped == [("00000000000000dd", "slurm:1")]
        assert set(mine.records()["00000000000000dd"].holders) == {"sge:2.3"}


def test_a_record_not_roots_alone_is_ignored(store):
    with store.locked(NOBODY) as mine:
        mine.hold("00000000000000ee", "slurm:1", name="env", original="/e")
    rec_file = Path(store.state_dir) / "users" / str(NOBODY) / "00000000000000ee.json"
    os.chown(rec_file, NOBODY, NOBODY)
    assert store.records(NOBODY) == []
    os.chown(rec_file, 0, 0)
    rec_file.write_text(json.dumps({"id": "00000000000000ee", "uid": NOBODY, "name": "e\n",
                                    "original": "/e", "path": "/p"}))
    assert store.records(NOBODY) == []  # not printable: not a record


def test_holder_names_are_validated():
    assert holder("slurm", "12") == "slurm:12" and holder("sge", "12.3") == "sge:12.3"
    for bad in (("slurm", "../x"), ("evil", "1"), ("sge", "1;rm")):
        with pytest.raises(StageError):
            holder(*bad)


def test_parse_copy_path_accepts_only_the_users_own_store(store):
    folder = store.user_folder(1000)
    good = f"{folder}/0123456789abcdef/env"
    assert store.parse_copy_path(1000, good, "env") == "0123456789abcdef"
    for bad in (f"{folder}/0123456789abcdef/other", f"{folder}/../1001/0123456789abcdef/env",
                f"{store.user_folder(1001)}/0123456789abcdef/env", f"{folder}/xyz/env",
                f"{folder}/0123456789abcdef/env/..", "/etc/passwd"):
        assert store.parse_copy_path(1000, bad, "env") is None, bad


def _hold_lock(state, staging, ready, release):
    store = NodeStore(staging, state)
    with store.locked(NOBODY):
        ready.set()
        release.wait(30)


def test_the_users_lock_makes_others_wait_until_the_deadline(store):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(store.state_dir, store.staging_dir, ready, release))
    proc.start()
    try:
        assert ready.wait(30)
        t0 = time.monotonic()
        with pytest.raises(StageError, match="another job of the same user"):
            with store.locked(NOBODY, time.monotonic() + 0.5):
                pass
        assert 0.4 < time.monotonic() - t0 < 5
        with store.locked(NOBODY + 1, time.monotonic() + 0.5):
            pass  # another user is never blocked
    finally:
        release.set()
        proc.join(30)
    with store.locked(NOBODY, time.monotonic() + 5):
        pass


def test_disk_budget_evicts_least_recently_used_unused_copies(store):
    os.makedirs(store.staging_dir, exist_ok=True)
    st = os.statvfs(store.staging_dir)
    size = st.f_blocks * st.f_frsize
    store.keep_share = 0.5
    recs = [Record(id=f"{i:016x}", uid=1, name="e", original="/e", path="/p",
                   last_used=float(i), bytes=int(size * 0.3)) for i in range(3)]
    recs.append(Record(id="f" * 16, uid=1, name="e", original="/e", path="/p",
                       holders={"slurm:1": 0.0}, bytes=int(size * 0.9)))
    # 0.9 of unused copies, 0.5 allowed: the two oldest go, the held one never
    assert over_budget(store, recs, time.time()) == {f"{0:016x}", f"{1:016x}"}


def test_a_squatted_store_is_refused(store):
    os.makedirs(store.staging_dir)
    (Path(store.staging_dir) / "users").mkdir()
    os.chown(Path(store.staging_dir) / "users", NOBODY, NOBODY)
    with pytest.raises(UnsafeBase, match="owned by uid"):
        store.prepare_user(1000, 1000)


def test_doctor_reports_the_store_and_a_missing_gc_timer(store, tmp_path):
    from conda_stage.doctor import run

    with store.locked(NOBODY) as mine:
        mine.hold("00000000000000ff", "slurm:1", name="env", original="/e", size=(5_000_000, 9))
        mine.hold("0000000000000100", "slurm:2", name="env2", original="/e2")
        mine.release("slurm:2")
    site = tmp_path / "site"
    site.write_text(f"CONDA_STAGE_STAGING_DIR={store.staging_dir}\n"
                    f"CONDA_STAGE_STATE_DIR={store.state_dir}\n")
    site.chmod(0o644)
    text = "\n".join(run(str(site)).lines)
    assert "ok    node store: 2 shared copies (5 MB), 1 unused (kept 300 s, at most 25% of " \
           "the disk)" in text
    assert "warn  no conda-stage-gc.timer and no cron line" in text
    site.write_text(site.read_text() + "CONDA_STAGE_SHARE_COPIES=no\n")
    assert "shared copies are off" in "\n".join(run(str(site)).lines)


def _records_as_user(staging, state, uid):
    return [r.id for r in NodeStore(staging, state).records(uid)]


def test_a_user_reads_their_own_records_but_cannot_list_anyones():
    import shutil
    import tempfile

    from conda_stage.privileges import Account, run_as

    base = Path(tempfile.mkdtemp(prefix="cs-nodestore-", dir="/var/tmp"))
    try:
        base.chmod(0o755)
        store = NodeStore(str(base / "jobs"), str(base / "state"))
        with store.locked(NOBODY) as mine:
            store.prepare_user(NOBODY, NOBODY)
            copy = store.user_folder(NOBODY) / "00000000000000ab" / "env"
            copy.mkdir(parents=True)
            os.chown(copy.parent, NOBODY, NOBODY)
            mine.hold("00000000000000ab", "slurm:5", name="env", original="/e")
        records = Path(store.state_dir) / "users" / str(NOBODY)
        assert records.stat().st_mode & 0o777 == 0o711
        nobody = Account("nobody", NOBODY, NOBODY, "/", (NOBODY,))
        assert run_as(nobody, _records_as_user, store.staging_dir, store.state_dir,
                      NOBODY) == ["00000000000000ab"]
        assert run_as(nobody, os.access, str(records), os.R_OK) is False  # not listable
    finally:
        shutil.rmtree(base)


# ---------------------------------------------------------------- shell images
OTHER = 65533  # a second unprivileged uid (no account needed: root acts for it)


def test_with_shell_images_users_is_sticky_and_writable_by_all_else_roots(tmp_path):
    tmp_path.chmod(0o755)
    users = tmp_path / "jobs" / "users"
    NodeStore(str(tmp_path / "jobs"), str(tmp_path / "state"),
              shell_images=True).prepare_user(NOBODY, NOBODY)
    assert (users.stat().st_uid, users.stat().st_mode & 0o7777) == (0, 0o1733)
    NodeStore(str(tmp_path / "jobs"), str(tmp_path / "state")).prepare_user(NOBODY, NOBODY)
    assert users.stat().st_mode & 0o7777 == 0o755  # the site turned them off again


def test_a_folder_the_users_shell_made_is_kept(tmp_path):
    tmp_path.chmod(0o755)
    store = NodeStore(str(tmp_path / "jobs"), str(tmp_path / "state"), shell_images=True)
    folder = store.prepare_user(NOBODY, NOBODY)
    (folder / "00000000000000ab").mkdir()  # e.g. a shell's mounted image
    os.chown(folder / "00000000000000ab", NOBODY, NOBODY)
    assert store.prepare_user(NOBODY, NOBODY) == folder
    assert (folder / "00000000000000ab").is_dir()


@pytest.mark.parametrize("plant", ["others_folder", "file", "fifo", "link_to_etc"])
def test_what_else_is_in_the_users_place_is_squatted_and_replaced(tmp_path, plant):
    tmp_path.chmod(0o755)
    store = NodeStore(str(tmp_path / "jobs"), str(tmp_path / "state"), shell_images=True)
    store.prepare_user(OTHER, OTHER)  # makes users/
    place = store.user_folder(NOBODY)
    before = sorted(os.listdir("/etc"))
    if plant == "others_folder":
        owner = OTHER
        (place / "00000000000000ab").mkdir(parents=True)
        (place / "00000000000000ab" / "planted").write_text("x")
        for p in (place, place / "00000000000000ab"):
            os.chown(p, owner, owner)
        place.chmod(0o777)
    elif plant == "file":
        place.write_text("x")
    elif plant == "fifo":
        os.mkfifo(place)
    else:
        place.symlink_to("/etc")
    assert store.prepare_user(NOBODY, NOBODY) == place
    st = os.lstat(place)
    assert (st.st_uid, st.st_mode & 0o7777) == (NOBODY, 0o700) and os.listdir(place) == []
    assert sorted(os.listdir("/etc")) == before


def test_only_folders_owned_by_the_uid_they_are_named_after_count_as_users(tmp_path):
    tmp_path.chmod(0o755)
    store = NodeStore(str(tmp_path / "jobs"), str(tmp_path / "state"), shell_images=True)
    store.prepare_user(NOBODY, NOBODY)
    users = Path(store.staging_dir) / "users"
    for name, owner in (("1234", OTHER), ("4321", 4321)):
        (users / name).mkdir()
        os.chown(users / name, owner, owner)
    (users / "999").symlink_to("/etc")
    assert store.uids() == [4321, NOBODY]
    assert not (Path(store.state_dir) / "users" / "1234.lock").exists()
