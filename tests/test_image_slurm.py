"""Image mode on a real Slurm with real squashfuse: the prolog mounts the
environment's squashfs image (built by its owner with 'conda stage --pack
--image') as the job user, 'conda activate NAME' lands on the mount, an
array job shares one mount, the epilog unmounts after a normal end,
scancel, a time limit and kill -9, and no FUSE process or mount is left;
without squashfuse the job gets one line and an extracted copy.

/dev/fuse is made usable by users for this module (Debian's udev default,
0666); what it was is restored afterwards."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.harness.image")

from tests.harness import image as img  # noqa: E402
from tests.harness.envs import enable_env, remove_env  # noqa: E402
from tests.harness.image import PROBE, RUN, image_meta, values  # noqa: E402
from tests.harness.sitecfg import slurm_hooks  # noqa: E402
from tests.harness.users import TEST_BASE  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.conda]

STAGING = TEST_BASE / "image-jobs"
STATE = TEST_BASE / "image-state"
HOOK_LOG = TEST_BASE / "image-hooks.log"
CONDA_STAGE = str(Path(sys.prefix) / "bin" / "conda-stage")


@pytest.fixture(scope="module")
def cluster(slurm_cluster, conda_site):
    HOOK_LOG.unlink(missing_ok=True)
    with img.users_may_mount(), \
            slurm_hooks(slurm_cluster, staging_dir=STAGING, state_dir=STATE, log_file=HOOK_LOG,
                        syslog="no", conda_root=conda_site.root_prefix, keep_unused=0,
                        stage_mode="auto"):
        yield slurm_cluster


@pytest.fixture(scope="module")
def env(cluster, conda_site, conda_user, stage_bin):
    """An auto-stage-enabled environment with an image for this site's
    staging folder (the site file is in place: the image's mount path
    comes from it)."""
    made = enable_env(conda_site, conda_user, stage_bin, "im-jup")
    img.pack_image(conda_site, conda_user, stage_bin, made.name)
    yield made
    remove_env(conda_site, conda_user, made)


def mounts():
    return img.mount_points(STAGING)


@pytest.fixture
def job(cluster, conda_user, conda_site):
    cluster.ensure_clean()
    cluster.defaults.update(keep_unused=0)

    def submit(body, *args):
        return cluster.submit(conda_user, f"#!/bin/bash\n. {conda_site.init_file}\n{body}\n",
                              *args)

    yield submit
    cluster.ensure_clean()
    subprocess.run([CONDA_STAGE, "gc", "--jobs", "--all-unused"], capture_output=True,
                   timeout=300, env={**os.environ, **cluster.env})
    img.nothing_left(STAGING, STATE, uid=conda_user.uid)
    assert "drain" not in cluster.node_state(), cluster.node_reason()


def test_the_prolog_mounts_the_image_and_conda_activate_lands_on_it(job, cluster, env):
    mark = HOOK_LOG.stat().st_size if HOOK_LOG.exists() else 0
    jid = job(PROBE.format(name=env.name), f"--comment=conda_env={env.name}")
    assert cluster.wait(jid)["JobState"] == "COMPLETED"
    out = cluster.output(jid)
    v = values(out)
    expected = image_meta(env)["mount_prefix"]
    assert v["prefix"] == v["sys_prefix"] == v["exe"] == expected, out
    assert v["lib"] == f"{expected}/lib"  # the relocated binary placeholder
    assert v["mounted"] == "yes", out
    assert f"conda-stage: mounted the image of {env.name} at {expected} in " in out
    log = HOOK_LOG.read_text()[mark:]
    assert re.search(rf"staged {env.prefix} -> {re.escape(expected)} in [0-9.]+ s "
                     rf"\(image mounted\)", log), log
    assert f"removed the unused copy {expected}" in log


def test_an_array_job_shares_one_mount(job, cluster, env, conda_user):
    cluster.defaults.update(keep_unused=300)
    mark = HOOK_LOG.stat().st_size
    out_dir = cluster.user_workdir(conda_user.name)
    jid = job(PROBE.format(name=env.name) + "sleep 2\n", f"--comment=conda_env={env.name}",
              "--array=1-4", "-o", f"{out_dir}/image-array-%A_%a.out")
    cluster.wait(jid, timeout=300)
    prefixes = {values((out_dir / f"image-array-{jid}_{t}.out").read_text())["sys_prefix"]
                for t in range(1, 5)}
    assert prefixes == {image_meta(env)["mount_prefix"]}
    log = HOOK_LOG.read_text()[mark:]
    assert len(re.findall(r"\(image mounted\)", log)) == 1, log
    assert len(re.findall(r"\(shared copy\)", log)) == 3, log
    assert len(mounts()) == 1  # kept for the next job, held by none: gc unmounts it


def test_mounted_in_place_squashfuse_serves_the_file_the_prolog_checked(job, cluster, env,
                                                                         conda_user):
    """image_copy=no: the image is mounted where it is, from the descriptor
    the staging child opened and checked (no second lookup of its path),
    and nothing is copied to the node."""
    cluster.defaults.update(image_copy="no", keep_unused=300)
    try:
        jid = job(PROBE.format(name=env.name), f"--comment=conda_env={env.name}")
        assert cluster.wait(jid)["JobState"] == "COMPLETED"
        out = cluster.output(jid)
        expected = image_meta(env)["mount_prefix"]
        assert values(out)["sys_prefix"] == expected and values(out)["mounted"] == "yes", out
        assert not (Path(expected).parent / ".image.sqfs").exists()  # not copied
        served = img.fuse_processes(conda_user.uid, serving=Path(expected))
        assert len(served) == 1
        cmd = served[0].cmdline()
        assert re.fullmatch(r"/proc/self/fd/\d+", cmd[-2]), cmd
        files = {os.path.realpath(f"/proc/{served[0].pid}/fd/{fd}")
                 for fd in os.listdir(f"/proc/{served[0].pid}/fd")}
        assert str(img.image_file(env)) in files, files
    finally:
        cluster.defaults.update(image_copy="yes")


def test_the_image_needs_neither_the_tarball_nor_its_lock_but_must_be_current(
        job, cluster, env, conda_user, conda_site, stage_bin):
    """While a repack holds the environment's lock, a job mounts the image
    its sidecar says is current (the tarball's path would wait for the
    lock); once the environment changes, it is not mounted, and the job is
    told why."""
    lock = env.prefix.parent / f".{env.name}.conda-stage.lock"
    holder = subprocess.Popen(["runuser", "-u", conda_user.name, "--", "flock", "-x",
                               str(lock), "sleep", "300"])
    try:
        time.sleep(1)  # flock has the lock
        assert holder.poll() is None
        t0 = time.monotonic()
        jid = job(PROBE.format(name=env.name), f"--comment=conda_env={env.name}")
        assert cluster.wait(jid)["JobState"] == "COMPLETED"
        assert time.monotonic() - t0 < 60  # no wait for the lock
        out = cluster.output(jid)
        assert values(out)["sys_prefix"] == image_meta(env)["mount_prefix"], out
        assert values(out)["mounted"] == "yes", out
    finally:
        holder.kill()
        holder.wait()
    site_packages = next((env.prefix / "lib").glob("python3.*/site-packages"))
    added = site_packages / "added-1.0.dist-info"  # as if pip installed something
    subprocess.run(["runuser", "-u", conda_user.name, "--", "mkdir", str(added)], check=True)
    try:
        jid = job(PROBE.format(name=env.name), f"--comment=conda_env={env.name}")
        assert cluster.wait(jid)["JobState"] == "COMPLETED"
        out = cluster.output(jid)
        assert "mounted" not in values(out), out
        # the prolog did not stage it; 'conda activate' in the job did (it repacks)
        assert values(out)["sys_prefix"] != image_meta(env)["mount_prefix"], out
        assert "the environment changed since it was packed" in out, out
    finally:
        added.rmdir()
        img.pack_image(conda_site, conda_user, stage_bin, env.name)  # for the next tests


@pytest.mark.parametrize("how", ["scancel", "sigkill", "timeout"])
def test_the_epilog_unmounts_after_the_job_ends_early(how, job, cluster, env):
    args = [f"--comment=conda_env={env.name}"] + (["--time=1"] if how == "timeout" else [])
    jid = job(RUN.format(name=env.name), *args)
    deadline = time.monotonic() + 90
    while "ready" not in (cluster.output(jid, timeout=0) if _has_output(cluster, jid) else ""):
        assert time.monotonic() < deadline, "job never got ready"
        time.sleep(0.3)
    assert len(mounts()) == 1
    if how == "scancel":
        cluster.cancel(jid)
    elif how == "sigkill":
        cluster.cancel(jid, signal="KILL", full=True)
    cluster.wait(jid, timeout=240)
    assert mounts() == []  # the epilog unmounted (keep time 0)


def _has_output(cluster, jid):
    try:
        cluster.output(jid, timeout=0)
        return True
    except Exception:
        return False


def test_without_squashfuse_the_job_is_told_and_gets_an_extracted_copy(job, cluster, env):
    hidden = Path("/usr/bin/squashfuse_ll.cs-test-hidden")
    os.rename("/usr/bin/squashfuse_ll", hidden)
    try:
        jid = job(PROBE.format(name=env.name), f"--comment=conda_env={env.name}")
        assert cluster.wait(jid)["JobState"] == "COMPLETED"
    finally:
        os.rename(hidden, "/usr/bin/squashfuse_ll")
    out = cluster.output(jid)
    v = values(out)
    assert (f"conda-stage: {env.name}: not mounting its image (squashfuse_ll is not "
            f"installed); extracting it instead") in out
    assert v["sys_prefix"] != image_meta(env)["mount_prefix"] and "mounted" not in v, out
    assert re.fullmatch(rf"{STAGING}/users/\d+/[0-9a-f]{{16}}/{env.name}", v["sys_prefix"])
