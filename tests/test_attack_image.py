"""Adversarial tests of image mode (issue 10) on a real Slurm 22.05 (and SGE
8.1.9 where it is cheap), with real squashfuse.

In image mode the root prolog has the job user's staging child copy the
user's ``NAME.sqfs`` into ``<staging>/users/<uid>/<image id>/`` and mount it
with ``squashfuse_ll`` at ``<image id>/NAME``; the epilog (or gc) unmounts it
as the user (``fusermount3 -u``, lazily when busy) and root removes what is
left through file descriptors.  ``csmallory`` attacks that: images and
sidecars that are not what they claim (symlinks to /etc/shadow and to the
victim's image, a FIFO, /dev/zero, a huge or malformed sidecar, mount paths
outside its folder, in the victim's, with '..' or a newline), corrupt
squashfs files, an image with setuid-root programs and device nodes, an
image with a huge tree, its own FUSE mounts in its store folder (one
mirroring a folder of its own, so that root following into it would
delete through it), the mount moved or swapped for symlinks between
prolog and epilog, and processes keeping the mount busy.

Effects are checked as in tests/test_attack_slurm.py (see
tests/harness/attack.py: no proof that root or the victim ran the
attacker's code; /etc, /root, both homes, the test base as before; the
prolog within its budget; the node not drained, the queue without error;
nothing left in the staging and state folders) plus: no FUSE mount of the
attacker's left, no squashfuse_ll (or the attacker's FUSE) process of the
attacker's left.

/dev/fuse is made usable by users for this module (Debian's udev default,
0666); what it was is restored afterwards."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest

pytest.register_assert_rewrite("tests.harness.attack", "tests.harness.image")

from tests.harness import attack as A  # noqa: E402
from tests.harness import image as img  # noqa: E402
from tests.harness.image import fuse_mounts, image_file, image_meta, image_sidecar  # noqa: E402
from tests.harness.sitecfg import sge_hook_files, slurm_hook_files  # noqa: E402
from tests.harness.users import TEST_BASE, run_as  # noqa: E402
from tests.test_attack_sge import SgeAttack  # noqa: E402
from tests.test_attack_slurm import SlurmAttack  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.conda]

ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "ai"
HOOK_LOG = TEST_BASE / "attack-image-hooks.log"
KIT = TEST_BASE / "attack-image-kit"       # root 0755; KIT/<user> the user's own
DECOY = TEST_BASE / "attack-image-decoy"   # root's precious folders
STAGING, STATE = A.product_dirs()
SLOWFS = ROOT / "benchmarks" / "slowfs.py"
HOOK_PYTHON = "/opt/conda-stage/bin/python"   # has mfusepy, readable by all


# ----------------------------------------------------------------- helpers
def edit_image_meta(env, owner, **updates) -> dict:
    meta = image_meta(env)
    meta.update(updates)
    A.write_as(image_sidecar(env), json.dumps(meta, indent=1), owner)
    return meta


def fuse_processes(uid: int, since: float) -> list[psutil.Process]:
    """squashfuse_ll, slowfs and fusermount3 processes of ``uid`` started since ``since``."""
    return img.fuse_processes(uid, since=since, helpers=True)


def lines_about(out: str, name: str) -> list[str]:
    """The ``conda-stage:`` lines about ``name``: each printable, none an
    internal error, no traceback in the output."""
    word = re.compile(rf"(?<![\w.+-]){re.escape(name)}(?![\w.+-])")
    lines = [line for line in A.stage_lines(out) if word.search(line)]
    for line in lines:
        assert line.isprintable(), f"control characters in {line!r}"
        assert "internal error" not in line.lower(), out
    A.assert_no_traceback(out)
    return lines


def told_once(out: str, name: str) -> str:
    """The one line about ``name`` that says what went wrong (besides, at
    most, the line saying where a copy is)."""
    lines = lines_about(out, name)
    fine = (f"conda-stage: staged {name} to ", f"conda-stage: mounted the image of {name} ")
    problems = [line for line in lines if not line.startswith(fine)]
    assert len(problems) == 1 and len(lines) <= 2, f"expected one line about {name}:\n{out}"
    return problems[0]


def fell_back(atk, out: str, name: str) -> str:
    """The job was told in one line that the image is not used, and got an
    extracted copy instead (not a mount); the copy's prefix."""
    notes = [line for line in lines_about(out, name) if "not mounting its image" in line]
    assert len(notes) == 1, f"expected one 'not mounting its image' line:\n{out}"
    prefix = atk.staged_copy(out, name)
    assert "cs_mounted" not in A.job_values(out), out
    return prefix


def image_copy_dir(user) -> Path:
    return A.user_dir(KIT / user.name, user)


def rebuild_image(env, owner, *, shell: str = "", pseudo=()) -> int:
    """As ``owner``: unpack ``env``'s image, run ``shell`` in the tree, pack
    it again with mksquashfs (``pseudo``: pseudo definitions, -p), replace
    the image and fix its sidecar's size.  Returns the new size."""
    work = image_copy_dir(owner) / f"rebuild-{uuid.uuid4().hex[:6]}"
    new = work / "new.sqfs"
    pseudo_args = " ".join(f"-p {json.dumps(p)}" for p in pseudo)
    script = f"""set -e
mkdir -p "{work}"
unsquashfs -q -n -d "{work}/tree" "{image_file(env)}" >/dev/null
chmod -R u+w "{work}/tree"
cd "{work}/tree"
{shell}
mksquashfs "{work}/tree" "{new}" -noappend -quiet -no-progress -comp zstd -no-xattrs {pseudo_args}
mv -f "{new}" "{image_file(env)}"
chmod -R u+w "{work}"; rm -rf "{work}"
"""
    r = run_as(owner, ["bash", "-c", script], timeout=300)
    assert r.returncode == 0, f"rebuilding the image failed: {r.stdout}{r.stderr}"
    size = os.stat(image_file(env)).st_size
    edit_image_meta(env, owner, size=size)
    return size


def save_image(env) -> list:
    saved = []
    for p in (image_file(env), image_sidecar(env)):
        st = os.lstat(p)
        saved.append((p, p.read_bytes(), st))
    return saved


def restore_image(saved) -> None:
    for p, data, st in saved:
        if os.path.lexists(p):
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
        p.write_bytes(data)
        os.chown(p, st.st_uid, st.st_gid)
        os.chmod(p, stat.S_IMODE(st.st_mode))
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def people():
    return A.cast()


@pytest.fixture(scope="module")
def site(conda_site):
    with img.users_may_mount(), A.hook_site(conda_site, HOOK_LOG) as defaults:
        defaults.update(stage_mode="auto")
        yield defaults


@pytest.fixture(scope="module")
def envs(site, conda_site, stage_bin, people):
    """The attack suites' environments (the attacker's ``one`` and ``two``,
    the victim's ``vic``), each with an image built by its owner for the
    site's staging folder."""
    with img.attack_envs_with_images(conda_site, stage_bin, people, ENV_PREFIX, KIT) as made:
        shutil.copyfile(SLOWFS, KIT / "slowfs.py")
        os.chmod(KIT / "slowfs.py", 0o644)
        yield made


@pytest.fixture(scope="module")
def slurm_side(slurm_cluster, site, envs):
    hooks = slurm_hook_files(slurm_cluster)
    with slurm_cluster.hooks_configured(**hooks, prolog_flags="Alloc"):
        slurm_cluster.defaults = site
        yield slurm_cluster


@pytest.fixture(scope="module")
def sge_hooks(sge_cluster):
    return sge_hook_files(sge_cluster)


class ImageAttack:
    """(mixin) The attack suites' attack classes with this module's hook log
    and volatile folders, waiting up to 150 s for a job."""

    def __init__(self, cluster, people, envs, site):
        super().__init__(cluster, people, envs, site)
        self.hook_log = HOOK_LOG
        self.volatile = [HOOK_LOG, KIT, DECOY]

    def finish(self, jid, timeout=150):
        return super().finish(jid, timeout)


class SlurmImageAttack(ImageAttack, SlurmAttack):
    """An attack on the Slurm hooks (tests/test_attack_slurm.py's)."""


class SgeImageAttack(ImageAttack, SgeAttack):
    """An attack on SGE's root@ hooks (tests/test_attack_sge.py's)."""


@pytest.fixture
def sched():
    return "slurm"


def _force_unmount_and_stop(uid: int, since: float) -> None:
    """(cleanup, root) What a failing product or an attack left: the
    attacker's FUSE mounts and the FUSE and holder processes its jobs
    started during this test."""
    for point in sorted(fuse_mounts(uid), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
    for p in psutil.process_iter(["uids", "create_time"]):
        info = p.info
        if info["uids"] and info["uids"].real == uid and info["create_time"] >= since:
            with contextlib.suppress(psutil.Error):
                p.kill()


@pytest.fixture
def atk(request, sched, people, envs, site, conda_site):
    since = time.time() - 1
    saved = {k: save_image(e) for k, e in envs.items()}
    if sched == "slurm":
        cluster = request.getfixturevalue("slurm_side")
        cluster.ensure_clean()
        attack = SlurmImageAttack(cluster, people, envs, conda_site)
    else:
        cluster = request.getfixturevalue("sge")
        hooks = request.getfixturevalue("sge_hooks")
        cluster.defaults = site
        cluster.configure(prolog=f"root@{hooks['sge-prolog']}",
                          epilog=f"root@{hooks['sge-epilog']}")
        attack = SgeImageAttack(cluster, people, envs, conda_site)
    attack.cleanups.append(lambda: _force_unmount_and_stop(people.attacker.uid, since))
    attack.cleanups.append(lambda: [restore_image(s) for s in saved.values()])
    attack.since = since
    with attack:
        yield attack


def no_fuse_left(atk) -> None:
    """No FUSE mount of the attacker's or the victim's anywhere, no FUSE
    process of the attacker's that this test's jobs started."""
    for who in (atk.people.attacker, atk.people.victim):
        assert fuse_mounts(who.uid) == [], f"left mounted: {fuse_mounts(who.uid)}"
    A.sleep_until(lambda: not fuse_processes(atk.people.attacker.uid, atk.since), 10)
    left = [(p.pid, p.info["cmdline"]) for p in fuse_processes(atk.people.attacker.uid,
                                                               atk.since)]
    assert left == [], f"FUSE processes left: {left}"


class Leftover(AssertionError):
    """Something staged (or a FUSE mount, or its process) outlived the job
    (told apart from the security checks' failures)."""


def verify(atk) -> None:
    """The attack suites' effect checks (no code of the attacker's ran as
    root or the victim, nothing changed outside the staging area, the node
    and queue healthy), then that nothing is left (a :class:`Leftover`)."""
    assert not atk.proof.ran_as(0), f"root ran the attacker's code: {atk.proof.ran_as(0)}"
    victim_ran = atk.proof.ran_as(atk.people.victim.uid)
    assert not victim_ran, f"the victim ran the attacker's code: {victim_ran}"
    changes = atk.watch.changes(atk.before)
    assert not changes, "outside the staging area:\n" + "\n".join(changes[:40])
    atk.healthy()
    try:
        no_fuse_left(atk)
        atk.nothing_left()
    except AssertionError as exc:
        raise Leftover(str(exc)) from None


PROBE = """s="${CONDA_ENVS_PATH%%:*}"; u="$(dirname "$s")"
echo "cs_store_dir=$s"
. @INIT@
conda activate @NAME@ >/dev/null 2>&1 && echo "cs_prefix:@NAME@=$CONDA_PREFIX"
mountpoint -q "$CONDA_PREFIX" 2>/dev/null && echo cs_mounted=1
echo "cs_mounts=$(grep -c "user_id=$(id -u)," /proc/self/mountinfo)"
"""


def probe(atk, name: str, more: str = "") -> str:
    return PROBE.replace("@INIT@", str(atk.site.init_file)).replace("@NAME@", name) + more


# ----------------------------------------------------------------- the control
def test_control_the_attackers_image_is_mounted(atk):
    """Without an attack the attacker's own image is mounted, at its sidecar's
    path, and nothing is left after the job (the other tests' baseline)."""
    one = atk.envs["one"]
    atk.begin()
    jid, out = atk.run(atk.people.attacker, probe(atk, one.name), [one.name])
    verify(atk)
    atk.completed(jid)
    assert atk.staged_copy(out, one.name) == image_meta(one)["mount_prefix"], out
    assert A.job_values(out).get("cs_mounted") == "1", out
    assert len(lines_about(out, one.name)) == 1, out


# ----------------------------------------------------------------- not an image of the user's
NOT_IMAGES = ["etc_shadow", "victims_image", "dev_zero", "fifo"]


@pytest.mark.parametrize("what", NOT_IMAGES)
def test_an_image_that_is_not_the_users_is_never_mounted(what, atk):
    """``NAME.sqfs`` is a symlink to /etc/shadow, to the victim's image (in
    a folder the attacker can read), to /dev/zero, or a FIFO; the sidecar's
    size made to match.  Nothing is mounted, /etc/shadow's content reaches
    no file of the attacker's, the job is told in one line and runs."""
    attacker, victim = atk.people.attacker, atk.people.victim
    one, vic = atk.envs["one"], atk.envs["vic"]
    image = image_file(one)
    image.unlink()
    if what == "fifo":
        A.make_fifo(image, attacker)
        atk.cleanups.append(lambda: A.release_fifo_readers(image))
    else:
        if what == "victims_image":
            shared = A.user_dir(KIT / f"{victim.name}-shared", victim)
            target = shared / f"{vic.name}.sqfs"
            shutil.copyfile(image_file(vic), target)
            A.chown(target, victim)
            os.chmod(target, 0o644)
        else:
            target = Path({"etc_shadow": "/etc/shadow", "dev_zero": "/dev/zero"}[what])
        os.symlink(target, image)
        A.chown(image, attacker)
    edit_image_meta(one, attacker, size=os.stat(image).st_size)
    atk.begin()

    leak = 'grep -rqs "^root:" "$u" && echo cs_leak=1\n'
    jid, out = atk.run(attacker, probe(atk, one.name, leak), [one.name])
    verify(atk)
    atk.completed(jid)
    vals = A.job_values(out)
    assert "cs_mounted" not in vals and vals.get("cs_mounts") == "0", out
    assert "cs_leak" not in vals, f"/etc/shadow reached the attacker's store folder:\n{out}"
    told_once(out, one.name)


# ----------------------------------------------------------------- hostile sidecars
SIDECARS = ["huge", "malformed", "outside", "victims_folder", "dotdot", "newline"]


@pytest.mark.parametrize("how", SIDECARS)
def test_a_hostile_sidecar_mounts_nothing_anywhere(how, atk):
    """The image's sidecar is 40 MB, not JSON, or names a mount path
    outside the attacker's store folder (/etc), in the victim's folder (with
    the victim's image id), one climbing there with '..', or one with a
    newline and a forged log line.  Nothing is mounted; the job gets an
    extracted copy in its own folder (told why in one line when the sidecar
    was readable), no forged line reaches the job or the log."""
    attacker, victim = atk.people.attacker, atk.people.victim
    one, vic = atk.envs["one"], atk.envs["vic"]
    meta = image_meta(one)
    vmeta = image_meta(vic)
    forged = A.FORGED.format(kind=atk.kind)
    mine = f"{STAGING}/users/{attacker.uid}/{meta['image_id']}"
    if how == "huge":
        meta["created"] = "x" * (40 << 20)
        A.write_as(image_sidecar(one), json.dumps(meta), attacker)
    elif how == "malformed":
        A.write_as(image_sidecar(one), '{"image_id": "' + meta["image_id"] + '", [', attacker)
    else:
        prefix = {
            "outside": "/etc/cs-evil-image/" + one.name,
            "victims_folder": vmeta["mount_prefix"].replace(vic.name, one.name),
            "dotdot": f"{mine}/../../{victim.uid}/{vmeta['image_id']}/{one.name}",
            "newline": f"{mine}/{one.name}\n{forged}",
        }[how]
        image_id = vmeta["image_id"] if how in ("victims_folder", "dotdot") else meta["image_id"]
        edit_image_meta(one, attacker, mount_prefix=prefix, image_id=image_id)
    mark = A.size_of(HOOK_LOG)
    atk.begin()

    jid, out = atk.run(attacker, probe(atk, one.name), [one.name])
    verify(atk)
    atk.completed(jid)
    assert not os.path.lexists("/etc/cs-evil-image")
    vals = A.job_values(out)
    prefix = atk.staged_copy(out, one.name)   # an extracted copy in the attacker's folder
    assert "cs_mounted" not in vals and vals.get("cs_mounts") == "0", out
    assert prefix.startswith(f"{STAGING}/users/{attacker.uid}/"), prefix
    lines = lines_about(out, one.name)
    notes = [line for line in lines if "image" in line]
    if how in ("outside", "victims_folder", "dotdot"):
        assert len(notes) == 1, lines
    assert len(lines) == 1 + len(notes), lines
    log = A.hook_log_lines(HOOK_LOG, mark)
    assert not [line for line in log + out.splitlines() if line.startswith(forged[:19])], out


# ----------------------------------------------------------------- corrupt images
def _random_with_magic(size: int) -> bytes:
    data = bytearray(os.urandom(size))
    data[0:4] = b"hsqs"
    return bytes(data)


CORRUPT = ["truncated", "random_magic", "superblock_only"]


def _corrupt(one, attacker, how) -> None:
    image = image_file(one)
    data = image.read_bytes()
    if how == "truncated":
        new = data[:len(data) // 2]
    elif how == "random_magic":
        new = _random_with_magic(len(data))
    else:   # a valid superblock, everything after it random
        new = data[:96] + os.urandom(len(data) - 96)
    A.write_as(image, new, attacker)
    edit_image_meta(one, attacker, size=len(new))


@pytest.mark.parametrize("how", CORRUPT)
def test_a_corrupt_image_fails_cleanly(how, atk):
    """The image is cut in half, random bytes behind squashfs's magic, or a
    real superblock followed by garbage (sidecar size matching).  The job
    is told in one line, runs, nothing stays mounted, no squashfuse_ll
    process is left, the prolog returns within its budget."""
    attacker = atk.people.attacker
    one = atk.envs["one"]
    _corrupt(one, attacker, how)
    atk.begin()
    jid, out = atk.run(attacker, probe(atk, one.name), [one.name])
    verify(atk)
    atk.completed(jid)
    vals = A.job_values(out)
    assert "cs_mounted" not in vals and vals.get("cs_mounts") == "0", out
    told_once(out, one.name)


def test_a_corrupt_image_falls_back_to_extraction(atk):
    attacker = atk.people.attacker
    one = atk.envs["one"]
    _corrupt(one, attacker, "random_magic")
    atk.begin()
    jid, out = atk.run(attacker, probe(atk, one.name), [one.name])
    verify(atk)
    fell_back(atk, out, one.name)


# ----------------------------------------------------------------- privileges in the image
@pytest.mark.parametrize("sched", ["slurm", "sge"])
def test_setuid_root_programs_and_device_nodes_in_an_image_give_no_privilege(sched, atk):
    """The attacker rebuilds its image (as itself, with mksquashfs pseudo
    definitions) with a copy of ``id`` that is root's and setuid, and
    character devices (/dev/null's and /dev/mem's numbers, mode 0666).  The
    image is mounted (it is a conda-stage image), the files look as crafted
    in the mount, but the program runs with the attacker's euid and the
    devices cannot be opened: the user's FUSE mount is nosuid,nodev."""
    attacker = atk.people.attacker
    one = atk.envs["one"]
    rebuild_image(one, attacker, shell="cp /usr/bin/id bin/cs-suid-id",
                  pseudo=["bin/cs-suid-id m 4755 0 0", "cs-null c 666 0 0 1 3",
                          "cs-mem c 666 0 0 1 1"])
    atk.begin()
    body = """p="$CONDA_PREFIX"
echo "cs_suid_stat=$(stat -c %u:%a "$p/bin/cs-suid-id")"
echo "cs_suid_euid=$("$p/bin/cs-suid-id" -u)"
echo "cs_dev_stat=$(stat -c %u:%a:%t:%T "$p/cs-null")"
( : < "$p/cs-null" ) 2>/dev/null && echo cs_dev_open=1
( head -c 16 "$p/cs-mem" >/dev/null ) 2>/dev/null && echo cs_mem_open=1
echo "cs_options=$(grep -F " $p " /proc/self/mountinfo | cut -d' ' -f6)"
"""
    jid, out = atk.run(attacker, probe(atk, one.name, body), [one.name])
    verify(atk)
    atk.completed(jid)
    vals = A.job_values(out)
    assert vals.get("cs_mounted") == "1", f"the crafted image was not mounted:\n{out}"
    assert vals.get("cs_suid_stat") == "0:4755", out          # the attack is in place ...
    assert vals.get("cs_dev_stat") == "0:666:1:3", out
    assert vals.get("cs_suid_euid") == str(attacker.uid), out  # ... and gives nothing
    assert "cs_dev_open" not in vals and "cs_mem_open" not in vals, out
    options = vals.get("cs_options", "").split(",")
    assert "nosuid" in options and "nodev" in options, out
    assert "setuid" not in atk.proof.tags()


# ----------------------------------------------------------------- a huge tree
def test_an_image_with_a_huge_tree_does_not_stall_the_epilog(atk):
    """The image holds 30,000 more files and a 1,500-level deep folder
    chain.  Root never walks the mount: the epilog (budget 30 s here)
    unmounts and removes everything in a few seconds."""
    attacker = atk.people.attacker
    one = atk.envs["one"]
    rebuild_image(one, attacker, shell=(
        "mkdir -p cs-many && (cd cs-many && seq -f 'f%05g' 1 30000 | xargs touch)\n"
        "deep=$(printf 'd/%.0s' $(seq 1500)); mkdir -p \"cs-deep/$deep\" && "
        "touch \"cs-deep/$deep/leaf\""))
    atk.setting(epilog_budget=30)
    atk.begin()
    mark = A.size_of(HOOK_LOG)
    body = 'echo "cs_count=$(find "$CONDA_PREFIX/cs-many" -type f | wc -l)"\n'
    jid, out = atk.run(attacker, probe(atk, one.name, body), [one.name])
    verify(atk)
    atk.completed(jid)
    vals = A.job_values(out)
    assert vals.get("cs_mounted") == "1" and vals.get("cs_count") == "30000", out
    log = "\n".join(A.hook_log_lines(HOOK_LOG, mark))
    took = re.findall(rf"job {jid} \({attacker.name}\): removed \S+ in ([0-9.]+) s", log)
    assert took and float(took[-1]) < 10, log


# ----------------------------------------------------------------- the user's own FUSE mounts
FUSE_PLACES = ["next_to_the_mount", "unrecorded_id", "outside_an_id", "store_folder"]


def _mirror_line(where: str, src: Path, fs: str) -> str:
    """Shell lines of the attacker's job: mount a FUSE at ``where`` (a path
    relative to the store folder ``$u``, the copy folder being ``$s``) --
    ``fs`` "mirror": slowfs mirroring ``src`` (writable: whatever root
    deleted through it would be gone from ``src``), "hang": slowfs that
    answers each request after 10 minutes, "squashfs": squashfuse_ll of a
    copy of its own image."""
    path = {"next_to_the_mount": "$s/cs-evil", "unrecorded_id": "$u/fedcba9876543210/x",
            "outside_an_id": "$u/cs-evil", "store_folder": "$u"}[where]
    point = f'"{path}"'
    make = f'chmod u+w "$s"; [ -d {point} ] || mkdir -p {point}\n'
    if fs == "squashfs":
        run = f'squashfuse_ll "{src}" {point}'
    else:
        latency = 600000 if fs == "hang" else 0
        run = (f'(cd / && setsid {HOOK_PYTHON} -I {KIT}/slowfs.py "{src}" {point} '
               f'--meta-latency-ms {latency} --no-auto-unmount </dev/null >/dev/null 2>&1 &)')
    seen = f'grep -qF " {path} " /proc/self/mountinfo'   # (never touching it: it may hang)
    return (make + run + "\n"
            + f"for i in $(seq 50); do {seen} && break; sleep 0.2; done\n"
            + f"{seen} && echo cs_own_mount=1\n")


@pytest.mark.parametrize("where", FUSE_PLACES)
def test_the_users_own_fuse_mount_in_the_store_is_never_followed(where, atk):
    """Before the epilog the attacker's job mounts a FUSE mirror of a
    folder of its own (its files would vanish if root deleted through it)
    inside its store folder: next to the image's mount, in a folder with an
    id nobody recorded, in a folder that is no id, or over the store folder
    itself.  Root never deletes through it (the mirrored files and every
    watched place are intact), the hooks do not fail, and nothing is left
    mounted or running."""
    attacker = atk.people.attacker
    one = atk.envs["one"]
    precious = A.user_dir(attacker.home / "cs-attack-precious", attacker)
    A.write_as(precious / "keep", "mine\n", attacker)
    A.user_dir(precious / "sub", attacker)
    A.write_as(precious / "sub" / "keep", "mine\n", attacker)
    atk.remove_later(precious)
    atk.begin()
    jid, out = atk.run(attacker, probe(atk, one.name, _mirror_line(where, precious, "mirror")),
                       [one.name])
    assert A.job_values(out).get("cs_own_mount") == "1", f"the job could not mount:\n{out}"
    assert (precious / "keep").read_text() == "mine\n"
    assert (precious / "sub" / "keep").read_text() == "mine\n"
    verify(atk)
    atk.completed(jid)


def test_a_hanging_fuse_mount_next_to_the_image_holds_no_hook(atk):
    """The attacker's job mounts a FUSE that answers every request after 10
    minutes next to the image's mount.  The epilog is done within its
    budget (30 s here), the node is not drained, nothing is left."""
    attacker = atk.people.attacker
    one = atk.envs["one"]
    src = A.user_dir(image_copy_dir(attacker) / "hang-src", attacker)
    atk.setting(epilog_budget=30)
    atk.begin()
    body = _mirror_line("unrecorded_id", src, "hang") + 'echo "cs_end=$(date +%s.%N)"\n'
    jid, out = atk.run(attacker, probe(atk, one.name, body), [one.name])
    left_queue = time.time()
    assert A.job_values(out).get("cs_own_mount") == "1", f"the job could not mount:\n{out}"
    verify(atk)
    atk.completed(jid)
    end = float(A.job_values(out)["cs_end"])
    assert left_queue - end < 30 + 15, f"the epilog took {left_queue - end:.0f} s"


# ----------------------------------------------------------------- the mount moved or swapped
SWAPS = ["mountpoint_to_victims_home", "id_to_decoy",
         "id_renamed", "into_job_tmp"]


@pytest.mark.parametrize("how", SWAPS)
def test_the_mount_swapped_or_moved_between_prolog_and_epilog(how, atk):
    """Between prolog and epilog the attacker's job: unmounts the image
    itself and puts a symlink to the victim's home in its place; moves the
    image's id folder (mount inside) to another id and leaves a symlink to a
    folder of root's; renames it to a name that is no id; moves it into
    its job folder's tmp.  Root follows none of the symlinks, and the
    image's mount and its squashfuse_ll do not outlive the job."""
    attacker, victim = atk.people.attacker, atk.people.victim
    one = atk.envs["one"]
    atk.decoy(DECOY, ["sub"])
    swap = {
        "mountpoint_to_victims_home": f'fusermount3 -u "$s/{one.name}" && rmdir "$s/{one.name}" '
                                      f'&& ln -s {victim.home} "$s/{one.name}"',
        "id_to_decoy": f'mv "$s" "$u/fedcba9876543210" && ln -s {DECOY} "$s"',
        "id_renamed": 'mv "$s" "$u/cs-moved" && ln -s /etc "$s"',
        "into_job_tmp": 'mv "$s" "$CONDA_STAGE_JOB_DIR/tmp/moved"',
    }[how]
    body = f'cd /; chmod u+w "$s" "$u"; {swap} && echo cs_swapped=1\n'
    atk.begin(extra=[A.Place(DECOY)])
    jid, out = atk.run(attacker, probe(atk, one.name, body), [one.name])
    assert A.job_values(out).get("cs_swapped") == "1", f"the job could not swap:\n{out}"
    assert (DECOY / "sub" / "precious").is_file()
    verify(atk)
    atk.completed(jid)


# ----------------------------------------------------------------- the mount kept busy
HOLDERS = ["cwd", "open_file", "dir_fd", "mapped"]


@pytest.mark.parametrize("holder", HOLDERS)
def test_a_process_keeping_the_mount_busy_leaves_nothing_after_the_job(holder, atk):
    """The attacker's job leaves a process that escaped the job (setsid)
    and keeps the image's mount busy at epilog time: its working folder is
    in the mount, it holds a file of the mount open, it holds a folder of
    the mount open, or it maps a library of the mount and closed it.  After
    the job nothing is mounted and no squashfuse_ll is left."""
    attacker = atk.people.attacker
    one = atk.envs["one"]
    pidfile = image_copy_dir(attacker) / f"holder-{holder}.pid"
    pidfile.unlink(missing_ok=True)
    ready = f'echo $$ > "{pidfile}"'
    hold = {
        "cwd": f'cd "$P/bin" && {ready} && exec sleep 120',
        "open_file": f'exec 3<"$P/bin/prefix-probe" && cd / && {ready} && exec sleep 120',
        "dir_fd": f'exec 3<"$P/conda-meta" && cd / && {ready} && exec sleep 120',
        "mapped": (f'cd /; exec {HOOK_PYTHON} -I -c "import ctypes, os, time\n'
                   f"libc = ctypes.CDLL(None, use_errno=True)\n"
                   f"libc.mmap.restype = ctypes.c_void_p\n"
                   f"libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, "
                   f"ctypes.c_int, ctypes.c_int, ctypes.c_long]\n"
                   f"fd = os.open(os.environ['P'] + '/bin/prefix-probe', os.O_RDONLY)\n"
                   f"addr = libc.mmap(None, 4096, 1, 2, fd, 0)\n"
                   f"os.close(fd)\n"
                   f"assert addr not in (None, ctypes.c_void_p(-1).value)\n"
                   f"open('{pidfile}', 'w').write(str(os.getpid()))\n"
                   f'time.sleep(120)"'),
    }[holder]
    script = KIT / f"hold-{holder}.sh"
    script.write_text(hold + "\n")
    os.chmod(script, 0o644)
    body = (f'(export P="$CONDA_PREFIX"; cd /; setsid bash {script} </dev/null >/dev/null 2>&1 &)\n'
            f'for i in $(seq 50); do [ -s "{pidfile}" ] && break; sleep 0.1; done\n'
            f'kill -0 "$(cat "{pidfile}")" 2>/dev/null && echo cs_holder=1\n')
    atk.begin()
    jid, out = atk.run(attacker, probe(atk, one.name, body), [one.name])
    vals = A.job_values(out)
    assert vals.get("cs_mounted") == "1" and vals.get("cs_holder") == "1", out
    verify(atk)
    atk.completed(jid)
