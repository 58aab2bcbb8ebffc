"""Image mode on a real Son of Grid Engine 8.1.9 with real squashfuse: the
root@ prolog mounts the environment's squashfs image (built by its owner
with 'conda stage --pack --image') as the job user -- the FUSE process runs
with the user's uids, never root's --, 'conda activate NAME' lands on the
mount, an array job shares one mount, the epilog unmounts after a normal
end, qdel, h_rt and kill -9 of the job, and no FUSE process or mount is
left; without squashfuse the job gets one line and an extracted copy.

/dev/fuse is made usable by users for this module (Debian's udev default,
0666); what it was is restored afterwards."""
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.harness.image")

from tests.harness import image as img  # noqa: E402
from tests.harness.envs import enable_env, remove_env  # noqa: E402
from tests.harness.image import PROBE, RUN, image_meta, values  # noqa: E402
from tests.harness.sitecfg import sge_hook_files, site_defaults  # noqa: E402
from tests.harness.users import TEST_BASE  # noqa: E402

pytestmark = [pytest.mark.sge, pytest.mark.conda]

STAGING = TEST_BASE / "image-sge-jobs"
STATE = TEST_BASE / "image-sge-state"
HOOK_LOG = TEST_BASE / "image-sge-hooks.log"
CONDA_STAGE = str(Path(sys.prefix) / "bin" / "conda-stage")


@pytest.fixture(scope="module")
def hooks(sge_cluster):
    return sge_hook_files(sge_cluster)


@pytest.fixture(scope="module")
def cluster(sge_cluster, conda_site):
    HOOK_LOG.unlink(missing_ok=True)
    HOOK_LOG.touch()
    with img.users_may_mount(), \
            site_defaults(log_file=HOOK_LOG, syslog="no", conda_root=conda_site.root_prefix,
                          staging_dir=STAGING, state_dir=STATE, keep_unused=0,
                          stage_mode="auto") as d:
        sge_cluster.defaults = d
        yield sge_cluster


@pytest.fixture(scope="module")
def env(cluster, conda_site, conda_user, stage_bin):
    """An auto-stage-enabled environment with an image for this site's
    staging folder (the site file is in place: the mount path comes from it)."""
    made = enable_env(conda_site, conda_user, stage_bin, "im-sge")
    img.pack_image(conda_site, conda_user, stage_bin, made.name)
    yield made
    remove_env(conda_site, conda_user, made)


def fuse_processes():
    """squashfuse_ll processes (anyone's) serving this module's staging folder."""
    return img.fuse_processes(serving=STAGING)


def mount_lines():
    return img.mount_lines(STAGING)


def mounts():
    return img.mount_points(STAGING)


def gc_all():
    subprocess.run([CONDA_STAGE, "gc", "--jobs", "--all-unused"], capture_output=True,
                   timeout=300)


@pytest.fixture
def job(cluster, sge, hooks, conda_user, conda_site, env):
    cluster.defaults.update(keep_unused=0)
    cluster.configure(prolog=f"root@{hooks['sge-prolog']}", epilog=f"root@{hooks['sge-epilog']}")

    def submit(body, *args):
        script = f"#!/bin/bash\n#$ -S /bin/bash\n. {conda_site.init_file}\n{body}\n"
        return cluster.submit(conda_user, script, "-l", f"conda_env={env.name}", *args)

    yield submit
    assert cluster.queue_state() == "", "queue instance in error state"
    gc_all()
    img.nothing_left(STAGING, STATE, serving=STAGING)
    leftovers = [p for p in Path("/tmp").glob("*.all.q") if (p / "conda-stage").exists()]
    assert leftovers == []


def wait_for(cluster, jid, text, timeout=90, task=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in cluster.output(jid, task=task):
            return
        assert cluster.job_state(jid) is not None or text in cluster.output(jid, task=task), \
            f"job {jid} ended without printing {text!r}:\n{cluster.output(jid, task=task)}"
        time.sleep(0.2)
    raise AssertionError(f"job {jid} never printed {text!r}: {cluster.qstat_j(jid)}")


class Flag:
    """A file the test makes to let a waiting job go on."""

    def __init__(self):
        self.path = TEST_BASE / f"image-sge-go-{uuid.uuid4().hex[:8]}"

    def wait_line(self, seconds=90):
        return (f'i=0; while [ ! -e "{self.path}" ] && [ $i -lt {seconds * 5} ]; do sleep 0.2; '
                f"i=$((i+1)); done\n")

    def set(self):
        self.path.touch()
        self.path.chmod(0o644)

    def remove(self):
        self.path.unlink(missing_ok=True)


def test_the_prolog_mounts_the_image_as_the_user_and_conda_activate_lands_on_it(
        job, cluster, env, conda_user):
    mark = HOOK_LOG.stat().st_size
    flag = Flag()
    try:
        jid = job(PROBE.format(name=env.name) + "echo ready\n" + flag.wait_line())
        wait_for(cluster, jid, "ready")
        expected = image_meta(env)["mount_prefix"]
        # While the job runs: one mount, at the image's path, served by a FUSE
        # process of the job user's (every uid of it), never root's.
        assert mounts() == [expected], mount_lines()
        line = mount_lines()[0]
        assert " - fuse.squashfuse_ll " in line and f"user_id={conda_user.uid}," in line, line
        options = line.split(" ")[5].split(",")
        assert "nosuid" in options and "nodev" in options, line
        procs = fuse_processes()
        assert len(procs) == 1, procs
        uids = procs[0].uids()
        assert (uids.real, uids.effective, uids.saved) == (conda_user.uid,) * 3, uids
        assert procs[0].gids().effective == conda_user.gid
        assert expected in procs[0].cmdline(), procs[0].cmdline()
    finally:
        flag.set()
    try:
        res = cluster.wait(jid)
    finally:
        flag.remove()
    out = cluster.output(jid)
    v = values(out)
    assert v["prefix"] == v["sys_prefix"] == v["exe"] == expected, out
    assert v["lib"] == f"{expected}/lib", out   # the relocated binary placeholder
    assert v["mounted"] == "yes", out
    assert f"conda-stage: mounted the image of {env.name} at {expected} in " in out, out
    assert res.exit_status == 0, out
    log = HOOK_LOG.read_text()[mark:]
    assert re.search(rf"sge job {jid} \(csalice\): staged {env.prefix} -> "
                     rf"{re.escape(expected)} in [0-9.]+ s \(image mounted\)", log), log
    assert f"removed the unused copy {expected}" in log, log
    # The epilog (keep time 0) unmounted: gone before the teardown's gc runs.
    assert mounts() == [], mount_lines()


def test_an_array_job_shares_one_mount(job, cluster, env):
    cluster.defaults.update(keep_unused=300)
    mark = HOOK_LOG.stat().st_size
    jid = job(PROBE.format(name=env.name) + "sleep 2\n", "-t", "1-4")
    cluster.wait(jid, timeout=240)
    outs = {t: cluster.output(jid, task=t) for t in range(1, 5)}
    prefixes = {values(o).get("sys_prefix") for o in outs.values()}
    assert prefixes == {image_meta(env)["mount_prefix"]}, outs
    log = HOOK_LOG.read_text()[mark:]
    assert len(re.findall(r"\(image mounted\)", log)) == 1, log
    assert len(re.findall(r"\(shared copy\)", log)) == 3, log
    for t in range(1, 5):   # each task held the mount and let go of it under its own name
        assert re.search(rf"sge job {jid}\.{t} \(csalice\): released ", log), log
    assert len(mounts()) == 1, mount_lines()   # kept for the next job, held by none
    gc_all()
    assert mounts() == [], mount_lines()


@pytest.mark.parametrize("how", ["qdel", "h_rt", "sigkill"])
def test_the_epilog_unmounts_after_the_job_ends_early(how, job, cluster, env):
    mark = HOOK_LOG.stat().st_size
    jid = job(RUN.format(name=env.name), *(["-l", "h_rt=8"] if how == "h_rt" else []))
    wait_for(cluster, jid, "ready")
    assert mounts() == [image_meta(env)["mount_prefix"]], mount_lines()
    res = img.end_sge_job_early(cluster, jid, how)
    assert res.exit_status == 137, res
    assert mounts() == [], mount_lines()   # the epilog unmounted (keep time 0)
    log = HOOK_LOG.read_text()[mark:]
    assert f"removed the unused copy {image_meta(env)['mount_prefix']}" in log, log
    assert re.search(rf"sge job {jid} \(csalice\): removed {STAGING}/{jid}\b", log), log


def test_without_squashfuse_the_job_is_told_and_gets_an_extracted_copy(job, cluster, env):
    hidden = Path("/usr/bin/squashfuse_ll.cs-test-hidden")
    os.rename("/usr/bin/squashfuse_ll", hidden)
    try:
        jid = job(PROBE.format(name=env.name))
        res = cluster.wait(jid)
    finally:
        os.rename(hidden, "/usr/bin/squashfuse_ll")
    out = cluster.output(jid)
    v = values(out)
    line = (f"conda-stage: {env.name}: not mounting its image (squashfuse_ll is not "
            f"installed); extracting it instead")
    assert out.count(line) == 1, out
    assert v["sys_prefix"] != image_meta(env)["mount_prefix"] and "mounted" not in v, out
    assert re.fullmatch(rf"{STAGING}/users/\d+/[0-9a-f]{{16}}/{env.name}", v["sys_prefix"]), out
    assert v["lib"] == f"{v['sys_prefix']}/lib", out
    assert res.exit_status == 0, out
