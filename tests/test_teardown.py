"""The epilog's teardown pieces on real processes and trees."""
import os
import shutil
import subprocess
import sys
import time

from conda_stage.procs import terminate_processes_under
from conda_stage.store import remove_tree


def test_processes_running_from_a_folder_are_terminated(tmp_path):
    copy = tmp_path / "envs" / "x" / "bin"
    copy.mkdir(parents=True)
    shutil.copy("/bin/sleep", copy / "sleep")
    inside = subprocess.Popen([str(copy / "sleep"), "600"], start_new_session=True)
    # SIGTERM ignored: needs the SIGKILL after the grace period.
    stubborn = subprocess.Popen(["bash", "-c", f"trap '' TERM; cd {copy}; while :; do sleep 0.1; done"],
                                start_new_session=True)
    outside = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        time.sleep(0.3)
        # 2, or 3 with the stubborn loop's 'sleep 0.1' of the moment (it works there too)
        assert terminate_processes_under(tmp_path / "envs", grace=1.0) in (2, 3)
        assert inside.wait(timeout=5) is not None
        assert stubborn.wait(timeout=5) is not None
        assert outside.poll() is None
    finally:
        for p in (inside, stubborn, outside):
            p.kill()
            p.wait()


def test_remove_tree_handles_read_only_trees_files_and_links(tmp_path):
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_text("x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("k")
    os.symlink(outside, tree / "a" / "link")
    for p in (tree / "a" / "b", tree / "a", tree):
        p.chmod(0o555)
    remove_tree(tree)
    assert not tree.exists()
    assert (outside / "keep").read_text() == "k"
    f = tmp_path / "file"
    f.write_text("x")
    remove_tree(f)
    assert not f.exists()
    remove_tree(tmp_path / "missing")


def test_epilog_is_idempotent_and_cleans_half_finished_prologs(tmp_path):
    """The epilog logic on a job folder as a killed prolog leaves it: a
    complete read-only copy, a partial extraction, no manifest."""
    import logging

    from conda_stage.config import Config
    from conda_stage.job import Job
    from conda_stage.jobdir import JobDir
    from conda_stage.jobstage import epilog
    from conda_stage.privileges import Account
    from conda_stage.request import Request

    (tmp_path / "jobs").mkdir(mode=0o755)
    (tmp_path / "state").mkdir(mode=0o755)
    (tmp_path / "state" / "42.json").write_text("{}")
    folder = JobDir(str(tmp_path / "jobs"), str(tmp_path / "state"), "42")
    workdir = folder.path
    done = workdir / "envs" / "a" / "lib"
    done.mkdir(parents=True)
    (done / "x.so").write_text("x")
    partial = workdir / "envs" / ".b.partial-123" / "bin"
    partial.mkdir(parents=True)
    for p in (done, done.parent, partial, partial.parent, workdir / "envs"):
        p.chmod(0o555)
    job = Job(scheduler="slurm", job_id="42", task_id=None,
              account=Account.lookup(uid=os.getuid()), request=Request(),
              workdir=workdir, folder=folder)
    log = logging.getLogger("test-epilog")
    epilog(job, Config(), log)
    assert not workdir.exists()
    epilog(job, Config(), log)  # twice: nothing to do, no error
    assert os.listdir(tmp_path / "jobs") == [] and os.listdir(tmp_path / "state") == []


def test_a_process_that_only_maps_a_file_of_the_folder_is_found(tmp_path):
    """No executable, working folder, argument or open file there: only a
    mapping (a library, an mmap-ed file) -- it still keeps a mount busy."""
    from conda_stage.procs import users_of

    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "data").write_bytes(b"x" * 8192)
    code = ("import mmap, sys, time\n"
            "f = open(sys.argv[1], 'rb'); m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
            "f.close(); print('ready', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder / "data")], cwd="/",
                            stdout=subprocess.PIPE, start_new_session=True)
    other = subprocess.Popen(["sleep", "600"], cwd="/", start_new_session=True)
    try:
        assert proc.stdout.readline() == b"ready\n"
        found = users_of(folder)
        assert proc.pid in found and other.pid not in found
        assert users_of(tmp_path / "elsewhere") == []
    finally:
        for p in (proc, other):
            p.kill()
            p.wait()
