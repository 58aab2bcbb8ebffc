"""Attack round 6: the node store's newest code under an ordinary user's
attack, on the real Slurm 22.05 with real squashfuse and FUSE.

Where users mount FUSE filesystems, the node store's safety rests on one
kernel rule: a FUSE mount answers only the user who mounted it, so root's
``lstat``/``open``/``readdir`` of another user's mount fail at once with
EACCES and never reach the user's FUSE process (SECURITY.md: "root does not
enter it").  The rule has an exception an admin sets: with
``user_allow_other`` in ``/etc/fuse.conf`` (common on clusters, for sshfs
and friends) any user may mount with ``-o allow_other``, and then root's
system calls on the mount *are* requests to the user's FUSE process, which
answers what it likes, or never.

Attacks (``csmallory`` against ``csvictim`` and the node):

* a tar pit -- the attacker's FUSE filesystem with ``allow_other`` that
  never answers root -- over the attacker's own store folder while a job of
  its own runs (default settings), or over a uid-named folder of its own in
  ``users/`` (shell images): every other user's prolog waits for it
  (``sweep_node``);
* the tar pit under a folder of the attacker's job folder that the epilog's
  unmount as the job user cannot reach: root's epilog waits for it, the job
  stays COMPLETING;
* with shell images, the victim's ``users/<victim uid>`` squatted by a
  squashfuse mount with ``allow_other`` of an image whose root says "the
  victim's, 0700" (``mksquashfs -force-uid``), holding a "copy" at the id
  the victim's job computes (``copy_id`` from the victim's world-readable
  tarball): ``prepare_user`` keeps it, the victim's job activates the
  planted copy and runs the attacker's ``activate.d`` script; the victim's
  interactive shell takes the mount for its own folder too;
* without ``allow_other`` (default settings): a mount of the attacker's own
  under a folder it then makes unreadable, in its job folder or its store
  folder -- the epilog's unmount as the user cannot reach it, root never
  detaches it: the folder, the mount and the FUSE process outlive the job
  and every 'gc --jobs';
* (held) mount points with names the kernel escapes in
  ``/proc/self/mountinfo`` -- spaces, a tab, a newline, a backslash before
  digits that look like an escape, `` - fuse``, a mount hidden under
  another -- in a squatted ``users/<victim uid>``: root's parser and
  ``_detach_mounts`` detach exactly the squatter's mounts.

This module sets ``user_allow_other`` in ``/etc/fuse.conf`` (the file, its
mode and times restored afterwards), makes ``/dev/fuse`` usable by users
(restored) and, for the shell-image tests, ``users/`` 1733 (restored to
0755).  Every attack but the last broke the hooks when it was written;
the fix (:mod:`conda_stage.nocross`): root's and the shell's lookups in the
store and job folders never enter a mount (openat2 with RESOLVE_NO_XDEV),
root detaches the user's mounts it meets while removing, and SGE's job
folder in the user's TMPDIR is looked at by the user only.
"""
from __future__ import annotations

import codecs
import contextlib
import json
import os
import re
import stat
import subprocess
import time
from pathlib import Path

import psutil
import pytest

pytest.register_assert_rewrite("tests.harness.attack", "tests.harness.image")

from tests.harness import attack as A  # noqa: E402
from tests.harness import image as img  # noqa: E402
from tests.harness.image import image_meta  # noqa: E402
from tests.harness.sitecfg import slurm_hook_files  # noqa: E402
from tests.harness.users import TEST_BASE, run_as  # noqa: E402
from tests.test_attack_slurm import SlurmAttack  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.conda]

ENV_PREFIX = "ar6"
HOOK_LOG = TEST_BASE / "attack-round6-hooks.log"
KIT = TEST_BASE / "attack-round6-kit"      # root 0755; KIT/<user> the user's own
STAGING, STATE = A.product_dirs()
USERS = STAGING / A.USERS
HOOK_PYTHON = "/opt/conda-stage/bin/python"   # has mfusepy, readable by all
FUSE_CONF = Path("/etc/fuse.conf")
GRACE = 15   # seconds the product allows past the prolog budget (jobstage._GRACE)


# ----------------------------------------------------------------- fixtures
@contextlib.contextmanager
def users_may_allow_other():
    """``user_allow_other`` in /etc/fuse.conf for the block; the file (its
    bytes, mode and times, or its absence) restored afterwards."""
    try:
        st = os.stat(FUSE_CONF)
        old = FUSE_CONF.read_bytes()
    except FileNotFoundError:
        st, old = None, None
    FUSE_CONF.write_bytes((old or b"").rstrip(b"\n") + b"\nuser_allow_other\n")
    try:
        yield
    finally:
        if old is None:
            FUSE_CONF.unlink(missing_ok=True)
        else:
            FUSE_CONF.write_bytes(old)
            os.chmod(FUSE_CONF, stat.S_IMODE(st.st_mode))
            os.utime(FUSE_CONF, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture(scope="module")
def people():
    return A.cast()


@pytest.fixture(scope="module")
def site(conda_site):
    with img.users_may_mount(), users_may_allow_other(), \
            A.hook_site(conda_site, HOOK_LOG) as defaults:
        defaults.update(stage_mode="auto")
        try:
            yield defaults
        finally:
            if os.path.isdir(USERS) and not os.path.islink(USERS):
                os.chmod(USERS, 0o755)   # what the other suites expect


@pytest.fixture(scope="module")
def envs(site, conda_site, stage_bin, people):
    """The attacker's ``one`` and ``two`` and the victim's ``vic``, each with
    an image built by its owner for the site's staging folder."""
    with img.attack_envs_with_images(conda_site, stage_bin, people, ENV_PREFIX, KIT) as made:
        yield made


@pytest.fixture(scope="module")
def slurm_side(slurm_cluster, site, envs):
    hooks = slurm_hook_files(slurm_cluster)
    with slurm_cluster.hooks_configured(**hooks, prolog_flags="Alloc"):
        slurm_cluster.defaults = site
        yield slurm_cluster


class Round6Attack(SlurmAttack):
    """An attack on the Slurm hooks with this module's hook log; ``users``
    of the staging folder as the test's settings make it."""

    users_mode = 0o755

    def __init__(self, cluster, people, envs, site):
        super().__init__(cluster, people, envs, site)
        self.hook_log = HOOK_LOG
        self.volatile = [HOOK_LOG, KIT]

    def finish(self, jid, timeout=180):
        return super().finish(jid, timeout)

    def assert_store_modes(self) -> None:
        assert A.mode_owner(USERS) == (stat.S_IFDIR, 0, self.users_mode), A.mode_owner(USERS)
        top = self.state / A.USERS
        if os.path.lexists(top):
            assert A.mode_owner(top) == (stat.S_IFDIR, 0, 0o711), A.mode_owner(top)


def fuse_mounts(uid: int) -> list[str]:
    """Mount points of FUSE filesystems mounted by ``uid``, decoded from
    /proc/self/mountinfo's octal escapes (independently of the product's
    parser)."""
    out = []
    for line in Path("/proc/self/mountinfo").read_bytes().splitlines():
        if b" - fuse" in line and re.search(rb"[ ,]user_id=%d(,|$)" % uid, line):
            out.append(os.fsdecode(codecs.escape_decode(line.split(b" ")[4])[0]))
    return out


def _unmount_and_stop(uids, since: float) -> None:
    """(cleanup, root) The FUSE mounts of ``uids`` (lazily: a dead one too)
    and the processes of theirs started since the test began."""
    for p in psutil.process_iter(["uids", "create_time"]):
        info = p.info
        if info["uids"] and info["uids"].real in uids and info["create_time"] >= since:
            with contextlib.suppress(psutil.Error):
                p.kill()
    for uid in uids:
        for point in sorted(fuse_mounts(uid), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)


@pytest.fixture
def atk(slurm_side, people, envs, conda_site):
    since = time.time() - 1
    slurm_side.ensure_clean()
    attack = Round6Attack(slurm_side, people, envs, conda_site)
    attack.cleanups.append(lambda: _unmount_and_stop(
        (people.attacker.uid, people.victim.uid), since))
    attack.since = since
    with attack:
        yield attack


# ----------------------------------------------------------------- helpers


def as_attacker_py(atk, code: str, *args: str, timeout: float = 300) -> str:
    """Run Python code as the attacker (outside any job); its stdout."""
    r = run_as(atk.people.attacker, [HOOK_PYTHON, "-I", "-c", code, *args], timeout=timeout,
               env={"PATH": A.SANE_PATH, "HOME": str(atk.people.attacker.home)})
    assert r.returncode == 0, f"the attacker's setup failed: {r.stdout}{r.stderr}"
    return r.stdout


def mounted(point: Path, uid: int, seconds: float = 15) -> bool:
    return A.sleep_until(lambda: str(point) in fuse_mounts(uid), seconds, 0.1)


def hook_seconds(jid: str, mark: int, what: str = "prolog done in") -> float | None:
    took = [float(m) for line in A.hook_log_lines(HOOK_LOG, mark)
            for m in re.findall(rf"job {jid} \(\S+\): {what} ([0-9.]+) s", line)]
    return took[-1] if took else None


def job_started(atk, jid: str) -> bool:
    return "cs_start=" in atk.output(jid)


PROBE = """. @INIT@
conda activate @NAME@ >/dev/null 2>&1 && echo "cs_prefix:@NAME@=$CONDA_PREFIX"
mountpoint -q "$CONDA_PREFIX" 2>/dev/null && echo cs_mounted=1
"""


def probe(atk, name: str) -> str:
    return PROBE.replace("@INIT@", str(atk.site.init_file)).replace("@NAME@", name)


def verify(atk) -> None:
    """No code of the attacker's ran as root or the victim, nothing changed
    outside the staging area, the node not drained, no FUSE mount of either
    user left, nothing left staged."""
    assert not atk.proof.ran_as(0), f"root ran the attacker's code: {atk.proof.ran_as(0)}"
    victim_ran = atk.proof.ran_as(atk.people.victim.uid)
    assert not victim_ran, f"the victim ran the attacker's code: {victim_ran}"
    changes = atk.watch.changes(atk.before)
    assert not changes, "outside the staging area:\n" + "\n".join(changes[:40])
    atk.healthy()
    for who in (atk.people.attacker, atk.people.victim):
        assert fuse_mounts(who.uid) == [], f"left mounted: {fuse_mounts(who.uid)}"
    atk.nothing_left()


# ----------------------------------------------------------------- a FUSE tar pit
# The attacker's FUSE filesystem: an empty folder of the attacker's that
# answers every request of the attacker's at once and every request of
# root's never (an hour).  Mounted with allow_other, so that the kernel
# passes root's requests on at all.
TARPIT = r"""
import errno, os, stat, sys, time
import mfusepy as fuse

class Tarpit(fuse.Operations):
    def _hold_root(self):
        if fuse.fuse_get_context()[0] == 0:
            time.sleep(3600)

    def getattr(self, path, fh=None):
        self._hold_root()
        if path != "/":
            raise fuse.FuseOSError(errno.ENOENT)
        return {"st_mode": stat.S_IFDIR | 0o700, "st_nlink": 2,
                "st_uid": os.getuid(), "st_gid": os.getgid()}

    def opendir(self, path):
        self._hold_root()
        return 0

    def readdir(self, path, fh):
        self._hold_root()
        return [".", ".."]

    def statfs(self, path):
        self._hold_root()
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
fuse.FUSE(Tarpit(), sys.argv[1], foreground=True, allow_other=True)
"""


def start_tarpit(atk, point: Path) -> subprocess.Popen:
    """The attacker's tar pit mounted at ``point`` (the test kills it by PID)."""
    attacker = atk.people.attacker
    script = A.write_as(A.user_dir(KIT / attacker.name, attacker) / "tarpit.py", TARPIT,
                        attacker)
    proc = subprocess.Popen([HOOK_PYTHON, "-I", str(script), str(point)],
                            user=attacker.uid, group=attacker.gid, extra_groups=[], cwd="/",
                            env={"PATH": A.SANE_PATH, "FUSE_LIBRARY_NAME": "fuse3"},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    atk.cleanups.append(lambda: (A.kill_pid(proc.pid), proc.wait()))
    if not mounted(point, attacker.uid):
        A.kill_pid(proc.pid)
        pytest.fail(f"the tar pit did not mount at {point}: {proc.communicate()[1]}")
    return proc


def roots_waiting_on_fuse() -> list[str]:
    """Root's processes sleeping in the kernel on a FUSE request (their
    command lines), from /proc/<pid>/stack."""
    found = []
    for p in psutil.process_iter(["uids", "cmdline"]):
        if not p.info["uids"] or p.info["uids"].effective != 0:
            continue
        try:
            stack = Path(f"/proc/{p.pid}/stack").read_text()
        except OSError:
            continue
        if "fuse" in stack:
            found.append(" ".join(p.info["cmdline"] or [])[:120])
    return found


# ----------------------------------------------------------------- attack 1
PIT_BUDGET = 5   # the prolog budget of the tar pit tests (shorter waits)
PITS = ["own_folder_during_a_job", "uid_named_entry"]


@pytest.mark.parametrize("where", PITS)
def test_a_fuse_tar_pit_holds_no_other_users_prolog(where, atk):
    """The attacker mounts, with ``-o allow_other``, a FUSE filesystem of its
    own that answers root never:

    * ``own_folder_during_a_job`` (default settings, no shell images): over
      its own store folder ``users/<uid>`` (its own 0700 folder: fusermount3
      allows it) while a job of its own holds a copy of ``one`` there (so
      root has a record and a lock for the attacker);
    * ``uid_named_entry`` (shell images: ``users/`` 1733): over a folder of
      its own named like a uid nobody has, ``users/4242420``; no job needed.

    Then the victim submits a job.  The victim's prolog must start the
    victim's job within its budget (+ the 15 s grace): nothing of the
    attacker's is the victim's business, and root must not wait for a
    user's FUSE process.  Once the test kills the tar pit, everything must
    finish: the victim staged, node not drained, nothing of the attacker's
    ran as root or the victim, nothing left."""
    attacker, victim = atk.people.attacker, atk.people.victim
    one, vic = atk.envs["one"], atk.envs["vic"]
    atk.setting(prolog_budget=PIT_BUDGET)
    holder = None
    atk.begin()
    if where == "own_folder_during_a_job":
        pit_at = USERS / str(attacker.uid)
        flag = A.Flag("tarpit")
        atk.cleanups.append(flag.remove)
        holder = atk.submit(attacker, probe(atk, one.name) + 'echo "cs_holding=1"\n'
                            + flag.wait_line(240), [one.name])
        atk.started_within_budget(holder)
        assert A.sleep_until(lambda: "cs_holding=1" in atk.output(holder), 60), \
            atk.describe(holder)
        assert f"cs_prefix:{one.name}={pit_at}/" in atk.output(holder), atk.output(holder)
        assert os.path.lexists(STATE / A.USERS / f"{attacker.uid}.lock")
    else:
        atk.setting(shell_images="yes")
        img.shell_users_folder(STAGING)
        atk.users_mode = 0o1733
        pit_at = USERS / "4242420"
        atk.cleanups.append(lambda: A.force_remove(pit_at))
        A.as_attacker(atk, f'mkdir -m 0700 "{pit_at}"')
    mark = A.size_of(HOOK_LOG)
    pit = start_tarpit(atk, pit_at)
    t0 = time.time()
    jid = atk.submit(victim, probe(atk, vic.name), [vic.name])
    limit = PIT_BUDGET + GRACE + 5
    in_time = A.sleep_until(lambda: job_started(atk, jid), limit, 0.5)
    waited = time.time() - t0
    waiting = roots_waiting_on_fuse()
    # the attacker lets go: its FUSE process dies, root's request fails
    A.kill_pid(pit.pid)
    pit.wait(timeout=30)
    subprocess.run(["umount", "-l", str(pit_at)], capture_output=True, timeout=30)
    out = atk.finish(jid, timeout=240)
    atk.completed(jid)
    if holder is not None:
        flag.set()
        atk.finish(holder)
        atk.completed(holder)
    else:
        A.force_remove(pit_at)
    took = hook_seconds(jid, mark)
    assert in_time and took is not None and took <= PIT_BUDGET + GRACE, (
        f"the victim's job had {'not ' if not in_time else ''}started {waited:.0f} s after "
        f"submission; its prolog took {took} s (budget {PIT_BUDGET} s + {GRACE} s): root "
        f"waited for the attacker's FUSE process until the attacker let go (root's processes "
        f"in a FUSE request meanwhile: {waiting})\n{out[:1500]}")
    assert atk.staged_copy(out, vic.name) == image_meta(vic)["mount_prefix"], out
    verify(atk)


def test_a_fuse_tar_pit_in_the_attackers_job_folder_holds_no_epilog(atk):
    """Default settings, epilog budget 5 s.  The attacker's job makes
    ``<job folder>/tmp/cs-locked/m``; the attacker mounts there, with
    ``-o allow_other``, its tar pit (from outside the job: a login on the
    node, so that the job's end does not kill it), then the job takes every
    permission off ``cs-locked`` (the epilog's unmount as the job user
    cannot reach the mount) and ends.  The epilog must return within its
    budget (+ a little): the job leaves the queue, the node is not drained;
    nothing of it is left once the tar pit is gone."""
    attacker, one = atk.people.attacker, atk.envs["one"]
    budget = 5
    atk.setting(epilog_budget=budget)
    flag = A.Flag("pit-job")
    atk.cleanups.append(flag.remove)
    atk.begin()
    body = probe(atk, one.name) + (
        'd="$CONDA_STAGE_JOB_DIR/tmp/cs-locked"; mkdir -p "$d/m" && echo "cs_pit=$d/m"\n'
        + flag.wait_line(120) + 'chmod 0 "$d"; echo "cs_end=$(date +%s.%N)"\n')
    jid = atk.submit(attacker, body, [one.name])
    atk.started_within_budget(jid)
    assert A.sleep_until(lambda: "cs_pit=" in atk.output(jid), 60), atk.describe(jid)
    point = Path(A.job_values(atk.output(jid))["cs_pit"])
    assert point.parent.parent.parent == STAGING / A.job_values(atk.output(jid))["cs_key"]
    pit = start_tarpit(atk, point)
    flag.set()
    assert A.sleep_until(lambda: "cs_end=" in atk.output(jid), 60), atk.describe(jid)
    end = float(A.job_values(atk.output(jid))["cs_end"])
    left_in_time = A.sleep_until(lambda: not atk.cluster.in_queue(jid), budget + GRACE, 0.5)
    waited = time.time() - end
    waiting = roots_waiting_on_fuse()
    state = atk.cluster.node_state()
    A.kill_pid(pit.pid)   # the attacker lets go
    pit.wait(timeout=30)
    subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=30)
    atk.finish(jid, timeout=120)
    atk.completed(jid)
    assert left_in_time, (
        f"the attacker's job was still in the queue {waited:.0f} s after its script ended "
        f"(epilog budget {budget} s; node {state}): root's epilog waited for the attacker's "
        f"FUSE process (root's processes in a FUSE request: {waiting})")
    from tests.test_attack_slurm import gc_jobs
    r = gc_jobs(atk.cluster)
    assert r.returncode == 0, r.stdout + r.stderr
    verify(atk)


# ----------------------------------------------------------------- attack 2
def _copy_id_as_attacker(atk, env) -> str:
    """The id the victim's next job gives its copy of ``env``
    (nodestore.copy_id), computed by the attacker from what anyone may stat:
    the victim's uid, the environment's name and prefix, its tarball."""
    code = """import hashlib, os, sys
uid, name, prefix, tarball = sys.argv[1:5]
st = os.stat(tarball)
key = "\\0".join(map(str, (uid, name, prefix, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)))
print(hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16])
"""
    return as_attacker_py(atk, code, str(atk.people.victim.uid), env.name, str(env.prefix),
                          str(env.tarball)).strip()


def test_a_lying_fuse_mount_over_the_victims_folder_is_not_taken_for_the_victims(atk):
    """Shell images on (``users/`` 1733).  Before the victim's job the
    attacker makes ``users/<victim uid>`` and mounts over it, with
    ``squashfuse_ll -o allow_other``, an image of its own built with
    ``mksquashfs -force-uid <victim>``: to anyone who may look (root, with
    allow_other), a 0700 folder of the victim's.  In it, at the id the
    victim's job will compute for ``vic``, a "copy": a marker naming the
    victim's environment, ``conda-meta/history`` and
    ``etc/conda/activate.d/cs-evil.sh``.  The victim's job must not run the
    attacker's script (the folder is another user's mount: root must
    replace it as any squat), and the node must stay healthy."""
    attacker, victim = atk.people.attacker, atk.people.victim
    vic = atk.envs["vic"]
    v, cid = _lying_mount_over_victims_folder(atk)
    atk.begin()
    mark = A.size_of(HOOK_LOG)
    jid, out = atk.run(victim, probe(atk, vic.name), [vic.name])
    atk.completed(jid)
    atk.healthy()
    took = hook_seconds(jid, mark)
    assert took is not None and took <= A.BUDGET + GRACE, took
    prefix = A.job_values(out).get(f"cs_prefix:{vic.name}", "")
    victim_ran = atk.proof.ran_as(victim.uid)
    # the attacker leaves; what root recorded for the planted copy goes with gc
    _unmount_and_stop((attacker.uid,), atk.since)
    A.force_remove(v)
    A.force_remove(STATE / A.USERS / str(victim.uid))
    A.force_remove(STATE / A.USERS / f"{victim.uid}.lock")
    assert not victim_ran, (f"the victim's job activated the attacker's planted copy "
                            f"{prefix} and ran its script: {victim_ran}\n{out}")
    assert prefix != f"{v}/{cid}/{vic.name}", out
    verify(atk)


def _lying_mount_over_victims_folder(atk, planted: bool = True) -> tuple[Path, str]:
    """(shell images on) The attacker's squashfuse mount with allow_other
    over ``users/<victim uid>``: an image whose root says "the victim's,
    0700", holding (``planted``) a "copy" of ``vic`` at the id the victim's
    next job computes.  The folder and that id."""
    attacker, victim = atk.people.attacker, atk.people.victim
    vic = atk.envs["vic"]
    atk.setting(shell_images="yes")
    img.shell_users_folder(STAGING)
    atk.users_mode = 0o1733
    v = USERS / str(victim.uid)
    cid = _copy_id_as_attacker(atk, vic)
    assert re.fullmatch(A.COPY_ID, cid), cid
    kit = A.user_dir(KIT / attacker.name, attacker)
    tree = kit / "lie"
    copy = tree / cid / vic.name
    marker = {"original": str(vic.prefix), "name": vic.name, "mode": "job"}
    A.as_attacker(atk, f"""rm -rf "{tree}" "{kit}/lie.sqfs"
mkdir -p "{copy}/conda-meta" "{copy}/etc/conda/activate.d"
: > "{copy}/conda-meta/history"
printf '%s\\n' '{atk.proof.cmd("cs-evil-activate")}' > "{copy}/etc/conda/activate.d/cs-evil.sh"
printf '%s' '{json.dumps(marker)}' > "{copy}/.conda-stage"
chmod 0700 "{tree}"
mksquashfs "{tree}" "{kit}/lie.sqfs" -force-uid {victim.uid} -force-gid {victim.gid} \\
    -quiet -no-progress >/dev/null
mkdir -m 0700 "{v}"
squashfuse_ll -o allow_other "{kit}/lie.sqfs" "{v}"
""")
    assert mounted(v, attacker.uid), fuse_mounts(attacker.uid)
    st = os.lstat(v)   # root sees what the attacker's image says
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (victim.uid, 0o700), st
    return v, cid


# ----------------------------------------------------------------- attack 3 (held)
# Names the kernel writes as octal escapes in /proc/self/mountinfo (space
# \040, tab \011, newline \012, backslash \134), and names that look like
# escapes or like the separator before the filesystem type.
ODD_NAMES = ["a b", "t\tab", "new\nline", "back\\040slash", "x - fuse y", "\\134134"]


def test_mount_points_with_escaped_names_in_a_squatted_folder_are_all_detached(atk):
    """Shell images on.  The attacker squats ``users/<victim uid>`` (a 0755
    folder of its own) and mounts its own image (squashfuse_ll, no
    allow_other) at folders with the names of :data:`ODD_NAMES` -- one,
    ``a b/in<newline>ner``, first, then hidden under the mount at ``a b``
    -- and, as decoys outside the squat, at ``users/<victim uid> x`` and
    ``users/<victim uid><newline>`` (names that start like the squatted
    folder's).  Root's mountinfo parser must name each mount point exactly:
    the victim's prolog detaches every mount in the squat (the hidden one
    too) and none outside it, replaces the folder, and the victim's image
    is mounted in its own 0700 folder within the budget."""
    attacker, victim = atk.people.attacker, atk.people.victim
    vic, one = atk.envs["vic"], atk.envs["one"]
    atk.setting(shell_images="yes")
    img.shell_users_folder(STAGING)
    atk.users_mode = 0o1733
    v = USERS / str(victim.uid)
    image = img.image_file(one)
    inner = v / "a b" / "in\nner"
    points = [inner] + [v / n for n in ODD_NAMES]
    decoys = [USERS / f"{victim.uid} x", USERS / f"{victim.uid}\n"]
    atk.cleanups.append(lambda: [A.force_remove(d) for d in decoys])
    as_attacker_py(atk, f"""import os, subprocess
os.mkdir({str(v)!r}, 0o755)
for p in {[str(p) for p in points + decoys]!r}:   # the inner one first
    os.makedirs(p, exist_ok=True)
    subprocess.run(["squashfuse_ll", {str(image)!r}, p], check=True)
""")
    for p in points + decoys:
        assert mounted(p, attacker.uid), (p, fuse_mounts(attacker.uid))
    # the parser as root runs it: every odd name found, exactly, none outside
    from conda_stage.image import mounts_under
    assert sorted(map(str, mounts_under(v))) == sorted(map(str, points))
    atk.begin()
    mark = A.size_of(HOOK_LOG)
    jid, out = atk.run(victim, probe(atk, vic.name), [vic.name])
    atk.completed(jid)
    assert atk.staged_copy(out, vic.name) == image_meta(vic)["mount_prefix"], out
    assert A.job_values(out).get("cs_mounted") == "1", out
    took = hook_seconds(jid, mark)
    assert took is not None and took <= A.BUDGET, took
    left = fuse_mounts(attacker.uid)
    assert sorted(left) == sorted(map(str, decoys)), \
        f"mounts of the attacker's after the prolog: {left}"
    assert not os.path.lexists(v) or A.mode_owner(v) == (stat.S_IFDIR, victim.uid, 0o700)
    _unmount_and_stop((attacker.uid,), atk.since)
    for d in decoys:
        A.force_remove(d)
    verify(atk)


# ----------------------------------------------------------------- attack 4
def _attackers_fuse_processes(atk) -> list:
    """The attacker's live squashfuse_ll processes started since the test began."""
    out = []
    for p in img.fuse_processes(atk.people.attacker.uid, since=atk.since):
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append((p.pid, p.info["cmdline"]))
    return out


OUT_OF_REACH = {
    "job_folder": '"$CONDA_STAGE_JOB_DIR/tmp"',
    "store_folder": '"$(dirname "$(dirname "$CONDA_PREFIX")")"',   # users/<uid>
}


@pytest.mark.parametrize("where", list(OUT_OF_REACH))
def test_a_fuse_mount_out_of_the_users_reach_is_not_left_forever(where, atk):
    """Default settings.  The attacker's job mounts its own image
    (squashfuse_ll, no allow_other) at ``cs-locked/m`` in its job folder's
    ``tmp/`` or in its own store folder ``users/<uid>``, and then takes
    every permission off ``cs-locked``: the job user's own unmount in the
    epilog (fusermount3 -u) cannot reach it, and root may not enter the
    mount.  After the job and root's 'gc --jobs', nothing of it may be
    left: no job or store folder, no mount, no FUSE process of the
    attacker's (SECURITY.md, guarantee 5); gc succeeds; the node is not
    drained."""
    from tests.test_attack_slurm import gc_jobs

    attacker, one = atk.people.attacker, atk.envs["one"]
    image = img.image_file(one)
    atk.begin()
    body = probe(atk, one.name) + (
        f'd={OUT_OF_REACH[where]}; m="$d/cs-locked/m"\n'
        f'mkdir -p "$m" && /usr/bin/squashfuse_ll "{image}" "$m" && '
        'chmod 0 "$d/cs-locked" && echo "cs_planted=$m"\n')
    jid, out = atk.run(attacker, body, [one.name])
    atk.completed(jid)
    planted = A.job_values(out).get("cs_planted", "")
    assert planted.endswith("/cs-locked/m") and planted.startswith(str(STAGING)), out
    r = gc_jobs(atk.cluster)
    atk.healthy()
    if not fuse_mounts(attacker.uid):   # unmounted: its FUSE process exits
        A.sleep_until(lambda: not _attackers_fuse_processes(atk), 10)
    left = {"gc --jobs exit status": r.returncode,
            "folder": os.path.lexists(Path(planted).parent.parent),
            "mounts": fuse_mounts(attacker.uid),
            "FUSE processes": _attackers_fuse_processes(atk)}
    errors = [line for line in A.hook_log_lines(HOOK_LOG) if f"job {jid} " in line
              and ("could not" in line or "failed" in line)]
    assert not any(left.values()), (f"left after the job and gc --jobs: {left}; "
                                    f"the hooks said: {errors}; gc said: {r.stderr.strip()}")
    verify(atk)


def test_a_lying_fuse_mount_over_the_victims_folder_is_not_used_by_the_victims_shell(
        atk, stage_bin):
    """Shell images on, the attacker's lying mount over ``users/<victim
    uid>`` as in the test above.  The victim's interactive ``conda activate
    vic`` must see that the folder is not its own (a mount of another
    user's, whatever its root folder says): one line saying so, and the
    tarball extracted elsewhere."""
    victim, vic = atk.people.victim, atk.envs["vic"]
    _lying_mount_over_victims_folder(atk)
    atk.begin()
    r = atk.site.shell(victim, f'export PATH="{stage_bin}:$PATH"\n'
                               f'conda activate {vic.name}\necho "prefix=$CONDA_PREFIX"\n'
                               f'conda deactivate\n')
    assert r.returncode == 0, r.stderr
    prefix = dict(x.split("=", 1) for x in r.stdout.splitlines() if "=" in x).get("prefix", "")
    assert prefix and not prefix.startswith(str(STAGING)), r.stdout + r.stderr
    victim_ran = atk.proof.ran_as(victim.uid)
    lines = [x for x in r.stderr.splitlines() if "not mounting its image" in x]
    _unmount_and_stop((atk.people.attacker.uid,), atk.since)
    A.force_remove(USERS / str(victim.uid))
    assert not victim_ran, victim_ran
    assert len(lines) == 1 and "yours" in lines[0], (
        f"the victim's shell took the attacker's mount for its own folder: {lines}\n{r.stderr}")
    verify(atk)
