"""Root-side job folders: the staging base checks, fd-based creation and
removal that no planted symlink redirects, the manifest schema, escaping
for the formats hook output crosses into, and gc of what was left."""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from conda_stage.jobdir import (JobDir, UnsafeBase, check_manifest, find_job_copy, one_line,
                                open_base, read_manifest)
from conda_stage.sge import env_file_line

NOBODY = 65534


@pytest.fixture
def base(tmp_path):
    """A root-owned folder under pytest's root-only tmp folder."""
    tmp_path.chmod(0o755)
    return tmp_path


def _manifest(workdir, **over):
    m = {"job_id": "42", "task_id": None, "user": "alice", "workdir": str(workdir),
         "envs_dir": str(workdir / "envs"),
         "results": [{"name": "a", "status": "staged", "path": str(workdir / "envs" / "a"),
                      "original": "/home/alice/.conda/envs/a", "seconds": 1.0},
                     {"name": "b", "status": "skipped", "reason": "not enabled"}],
         "problems": [], "messages": ["conda-stage: staged a"], "created": 1.0}
    m.update(over)
    return m


# ------------------------------------------------------------ the base
def test_base_is_created_root_owned_and_reopened(base):
    fd = open_base(str(base / "a" / "b"), create=True)
    os.close(fd)
    st = os.stat(base / "a" / "b")
    assert st.st_uid == 0 and st.st_mode & 0o777 == 0o755


@pytest.mark.parametrize("squat, problem", [
    (lambda p: (p.mkdir(), os.chown(p, NOBODY, NOBODY)), "owned by uid 65534"),
    (lambda p: (p.mkdir(), p.chmod(0o777)), "writable by group or others"),
    (lambda p: p.symlink_to("/etc"), "a symlink or not a folder"),
    (lambda p: p.write_text("x"), "a symlink or not a folder"),
])
def test_squatted_base_is_refused_and_not_followed(base, squat, problem):
    target = base / "jobs"
    squat(target)
    before = sorted(os.listdir("/etc"))
    with pytest.raises(UnsafeBase, match=problem):
        JobDir(str(target), str(base / "state"), "42").create(1000, 1000)
    assert sorted(os.listdir("/etc")) == before


def test_sticky_world_writable_parent_is_allowed_above_a_root_base(base):
    sticky = base / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    os.close(open_base(str(sticky / "jobs"), create=True))
    with pytest.raises(UnsafeBase, match="writable by group or others"):
        os.close(open_base(str(sticky), create=False))  # the base itself must not be


def test_user_owned_parent_below_root_is_refused(base):
    parent = base / "users"
    parent.mkdir()
    os.chown(parent, NOBODY, NOBODY)
    with pytest.raises(UnsafeBase, match="owned by uid 65534"):
        os.close(open_base(str(parent / "jobs"), create=True))
    assert not (parent / "jobs").exists()


# ------------------------------------------------------------ job folders
def test_job_folder_layout_and_ownership(base):
    job = JobDir(str(base / "jobs"), str(base / "state"), "42")
    job.create(NOBODY, NOBODY)
    assert os.stat(job.path).st_uid == 0 and os.stat(job.path).st_mode & 0o777 == 0o755
    assert os.stat(job.envs).st_uid == NOBODY and os.stat(job.tmp).st_mode & 0o777 == 0o700
    job.write_manifest(_manifest(job.path))
    st = os.stat(job.manifest_path)
    assert st.st_uid == 0 and st.st_mode & 0o777 == 0o644
    assert job.read_manifest()["results"][0]["name"] == "a"


def test_removal_never_follows_planted_symlinks(base):
    """What a user leaves in envs/ (symlinks to their home, to /etc, a
    read-only tree) is removed; what the links point to is untouched."""
    victim = base / "victim"
    victim.mkdir()
    (victim / "keep").write_text("k")
    job = JobDir(str(base / "jobs"), str(base / "state"), "42")
    job.create(NOBODY, NOBODY)
    (job.envs / "to-victim").symlink_to(victim)
    (job.envs / "copy" / "lib").mkdir(parents=True)
    (job.envs / "copy" / "lib" / "link").symlink_to(victim)
    (job.envs / "copy" / "lib" / "f").write_text("x")
    for p in (job.envs / "copy" / "lib", job.envs / "copy"):
        p.chmod(0o555)
    job.write_manifest(_manifest(job.path))
    assert job.remove() == [job.path, job.manifest_path]
    assert not job.path.exists() and not job.manifest_path.exists()
    assert (victim / "keep").read_text() == "k"
    assert job.remove() == []  # idempotent


def test_leftover_under_the_job_id_is_replaced_not_followed(base):
    (base / "jobs").mkdir(mode=0o755)
    victim = base / "victim"
    victim.mkdir()
    (victim / "keep").write_text("k")
    (base / "jobs" / "42").symlink_to(victim)
    job = JobDir(str(base / "jobs"), str(base / "state"), "42")
    job.create(NOBODY, NOBODY)
    assert job.path.is_dir() and not job.path.is_symlink()
    assert (victim / "keep").read_text() == "k"


def test_job_keys_are_ids_only():
    for bad in ("../x", "42/..", "", "a", "1.2.3", "1 2"):
        with pytest.raises(Exception):
            JobDir("/b", "/s", bad)
    assert JobDir("/b", "/s", "12.3").path == Path("/b/12.3")


# ------------------------------------------------------------ manifests
def test_manifest_not_owned_by_root_is_ignored(base):
    job = JobDir(str(base / "jobs"), str(base / "state"), "42")
    job.create(NOBODY, NOBODY)
    job.write_manifest(_manifest(job.path))
    os.chown(job.manifest_path, NOBODY, NOBODY)
    assert job.read_manifest() is None


@pytest.mark.parametrize("change", [
    {"envs_dir": "relative/envs"},
    {"envs_dir": "/x\nexport LD_PRELOAD=/evil.so"},
    {"messages": ["ok", "line\nexport LD_PRELOAD=/evil.so"]},
    {"results": [{"name": "a", "status": "staged", "path": "/p\n", "original": "/o",
                  "seconds": 1}]},
    {"results": [{"name": "a", "status": "owned"}]},
    {"user": None},
])
def test_manifest_schema_refuses_what_could_forge_lines(tmp_path, change):
    with pytest.raises(ValueError):
        check_manifest(_manifest(tmp_path, **change))


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_one_line_is_always_a_single_printable_line(text):
    line = one_line(text)
    assert line.isprintable() and "\n" not in line


@given(st.text(max_size=40))
def test_env_file_lines_are_single_lines_or_refused(value):
    try:
        line = env_file_line("CONDA_ENVS_PATH", value)
    except ValueError:
        assert not value.isprintable()
    else:
        assert line.count("\n") == 0 and line == f"CONDA_ENVS_PATH={value}"


def test_find_job_copy_only_trusts_roots_manifest_for_this_user(base):
    from conda_stage.config import Config

    config = Config(staging_dir=str(base / "jobs"), state_dir=str(base / "state"))
    folder = JobDir(config.staging_dir, config.state_dir, "42")
    folder.create(0, 0)
    copy = base / "jobs" / "users" / "0" / "0123456789abcdef" / "a"
    copy.mkdir(parents=True)
    (copy / ".conda-stage").write_text(json.dumps({"original": "/envs/a", "name": "a",
                                                   "mode": "job"}))
    manifest = _manifest(folder.path, user="root", results=[
        {"name": "a", "status": "staged", "path": str(copy), "original": "/envs/a",
         "seconds": 1.0, "copy": "0123456789abcdef", "reused": False}])
    folder.write_manifest(manifest)
    environ = {"CONDA_STAGE_JOB_DIR": str(folder.path)}
    assert find_job_copy(Path("/envs/a"), environ, config) == copy
    assert find_job_copy(Path("/envs/b"), environ, config) is None
    elsewhere = {"CONDA_STAGE_JOB_DIR": str(base / "other" / "42")}
    assert find_job_copy(Path("/envs/a"), elsewhere, config) is None
    folder.write_manifest(dict(manifest, user="alice"))  # another user's job
    assert find_job_copy(Path("/envs/a"), environ, config) is None
    folder.write_manifest(manifest)
    os.chown(base / "state" / "42.json", NOBODY, NOBODY)  # not root's: not trusted
    assert find_job_copy(Path("/envs/a"), environ, config) is None
    os.chown(base / "state" / "42.json", 0, 0)
    (copy / ".conda-stage").unlink()  # no marker: not a copy
    assert find_job_copy(Path("/envs/a"), environ, config) is None


def test_read_manifest_in_a_users_folder_checks_the_owner(base):
    folder = base / "conda-stage"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(_manifest(folder)))
    assert read_manifest(folder, owners=(0,))["user"] == "alice"
    os.chown(folder / "manifest.json", NOBODY, NOBODY)
    assert read_manifest(folder, owners=(0,)) is None


# ------------------------------------------------------------ gc
def test_gc_collects_partials_of_dead_processes(base):
    from conda_stage.gc import collect

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    parent = base / "conda-stage-abcd1234"
    partial = parent / f".env.partial-{dead.pid}" / "bin"
    partial.mkdir(parents=True)
    partial.chmod(0o555)
    alive = base / "conda-stage-efgh5678" / f".env.partial-{os.getpid()}"
    alive.mkdir(parents=True)
    removed = collect(base)
    assert removed == [partial.parent] and not parent.exists()
    assert alive.exists()


def test_gc_jobs_carries_on_past_what_it_cannot_remove(base, capsys):
    from conda_stage.errors import StageError
    from conda_stage.gc import collect_jobs

    jobs, state = base / "jobs", base / "state"
    for key in ("7", "8"):
        JobDir(str(jobs), str(state), key).create(NOBODY, NOBODY)
    (jobs / "notes").mkdir()  # not a job folder: never touched

    def alive(job_id, scheduler=None):
        if job_id == "7":
            raise StageError("Cannot ask Slurm about job 7: timeout")
        return False

    with pytest.raises(StageError, match="1 job folder"):
        collect_jobs(jobs, state, alive)
    assert (jobs / "7").exists() and not (jobs / "8").exists() and (jobs / "notes").exists()


def test_doctor_flags_what_the_hooks_refuse(base):
    from conda_stage.doctor import run

    site = base / "etc" / "conda-stage"
    site.parent.mkdir(mode=0o755)
    sticky = base / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    squatted = sticky / "jobs"
    squatted.mkdir()
    os.chown(squatted, NOBODY, NOBODY)
    site.write_text(f"CONDA_STAGE_STAGING_DIR={squatted}\nCONDA_STAGE_STATE_DIR={base}/state\n")
    report = run(str(site))
    text = "\n".join(report.lines)
    assert f"FAIL  staging folder (staging_dir): {squatted} is owned by uid 65534" in text
    assert f"warn  staging folder (staging_dir) {squatted} is below {sticky}" in text
    assert f"ok    state folder (state_dir) {base}/state does not exist yet" in text
    site.chmod(0o666)
    report = run(str(site))
    assert report.failures == 1 and "is writable by group or others" in report.lines[0]


def test_removal_handles_any_depth_with_few_descriptors(base):
    """A user can make a tree deeper than any recursion limit or fd limit."""
    import resource

    from conda_stage.jobdir import _remove_at

    top = base / "deep"
    deep = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    os.mkdir("deep", dir_fd=deep)
    here = os.open("deep", os.O_RDONLY | os.O_DIRECTORY, dir_fd=deep)
    os.close(deep)
    for i in range(3000):  # mkdir -p of 3000 levels, through descriptors
        os.mkdir("d", dir_fd=here)
        if i % 500 == 0:
            os.symlink("/etc", f"link{i}", dir_fd=here)
            os.close(os.open(f"f{i}", os.O_CREAT | os.O_WRONLY, dir_fd=here))
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=here)
        os.close(here)
        here = nxt
    os.close(here)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    try:
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert _remove_at(fd, "deep") is True
        finally:
            os.close(fd)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not top.exists() and os.path.isdir("/etc/default")


@contextlib.contextmanager
def _tmpfs_with_a_file(mnt: Path):
    """A tmpfs at ``mnt`` holding ``keep``; yields a descriptor of it, held
    from before (it sees the mount even once detached)."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "cs-test", str(mnt)], check=True)
    held = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        (mnt / "keep").write_text("x")
        yield held
    finally:
        os.close(held)
        if str(mnt) in Path("/proc/self/mountinfo").read_text():
            subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("where", ["tree/deep/mnt", "tree"])
def test_removal_detaches_a_mount_it_meets_and_never_enters_it(base, where):
    """A mount in a folder root removes, or on it (a user's FUSE mount in
    their job or store folder), is detached by its name, never entered:
    what is in it stays (seen through a descriptor held from before)."""
    from conda_stage.jobdir import _remove_at

    mnt = base / where
    mnt.mkdir(parents=True)
    with _tmpfs_with_a_file(mnt) as held:
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert _remove_at(fd, "tree")
        finally:
            os.close(fd)
        assert not (base / "tree").exists()
        assert os.stat("keep", dir_fd=held).st_size == 1  # detached, not emptied
        assert str(mnt) not in Path("/proc/self/mountinfo").read_text()
