"""The epilog's teardown pieces on real processes and trees."""
import os
import shutil
import subprocess
import time

from conda_stage.jobstage import terminate_processes_under
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
        assert terminate_processes_under(tmp_path / "envs", grace=1.0) == 2
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
