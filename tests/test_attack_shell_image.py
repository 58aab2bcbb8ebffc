"""Adversarial tests of shell images (``CONDA_STAGE_SHELL_IMAGES=yes``) on a
real Slurm 22.05, with real squashfuse.

With shell images ``<staging>/users`` is root's, mode 1733 (sticky, anyone may
make an entry in it, nobody but root may list it), so that a user's shell can
make its own ``users/<uid>`` and mount images there.  So ``csmallory`` may now
make entries in ``users/`` -- including the victim's ``users/<victim uid>``
before the victim's first job on the node.  The root prolog
(``NodeStore.prepare_user``) must treat anything there that is not the
victim's own 0700 folder as squatted: unmount the squatter's FUSE mounts as
the squatter, remove it through file descriptors (never following a link,
never crossing into another filesystem), and make the folder anew -- within
the prolog's budget.  The root sweep (``jobstage._sweep``,
``shellimage.sweep`` as the user) lists users from ``users/`` too and spares
image folders that live shells hold.

Attacks: the victim's folder squatted as a 0777 folder of the attacker's,
as links (to a folder of root's, to one of the attacker's), a file, a FIFO,
a folder with the attacker's FUSE mount inside, on it, or out of the
attacker's own reach; ``users/`` flooded with 3,000 uid-named folders and
links; the attacker's own folder full of links named like image ids,
holder files naming the victim's process, job claims; a wide tree in the
squatted folder and in an unrecorded id of the attacker's own folder.

Effects are checked as in tests/test_attack_image.py: no code of the
attacker's ran as root or the victim; /etc, /root, both homes, the test
base unchanged (plus the decoys); the prolog within its budget; the node not
drained; no FUSE mount or process of the attacker's left; nothing left in
the staging and state folders (``users`` stays, root 1733).

/dev/fuse is made usable by users for this module, and ``<staging>/users``
root 1733 (``install -d -m 1733``, as an admin does); both are restored."""
from __future__ import annotations

import os
import re
import stat
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

pytest.register_assert_rewrite("tests.harness.attack", "tests.harness.image")

from tests.harness import attack as A  # noqa: E402
from tests.harness import image as img  # noqa: E402
from tests.harness.image import fuse_mounts, image_file, image_meta  # noqa: E402
from tests.harness.sitecfg import slurm_hook_files  # noqa: E402
from tests.harness.users import TEST_BASE, run_as  # noqa: E402
from tests.test_attack_image import lines_about, probe  # noqa: E402
from tests.test_attack_slurm import SlurmAttack, gc_jobs  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.conda]

ENV_PREFIX = "ash"
HOOK_LOG = TEST_BASE / "attack-shell-image-hooks.log"
KIT = TEST_BASE / "attack-shell-kit"       # root 0755; KIT/<user> the user's own
DECOY = TEST_BASE / "attack-shell-decoy"   # root's precious folders
STAGING, STATE = A.product_dirs()
USERS = STAGING / A.USERS
HOOK_PYTHON = "/opt/conda-stage/bin/python"   # readable by all


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def people():
    return A.cast()


@pytest.fixture(scope="module")
def site(conda_site):
    with img.users_may_mount(), A.hook_site(conda_site, HOOK_LOG) as defaults:
        defaults.update(stage_mode="auto", shell_images="yes")
        img.shell_users_folder(STAGING)
        try:
            yield defaults
        finally:
            os.chmod(USERS, 0o755)   # what the other suites expect (the hooks set it too)


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


class ShellImageAttack(SlurmAttack):
    """An attack on the Slurm hooks with shell images on: this module's hook
    log and volatile folders, ``users`` root 1733."""

    def __init__(self, cluster, people, envs, site):
        super().__init__(cluster, people, envs, site)
        self.hook_log = HOOK_LOG
        self.volatile = [HOOK_LOG, KIT, DECOY]

    def finish(self, jid, timeout=150):
        return super().finish(jid, timeout)

    def assert_store_modes(self) -> None:
        assert A.mode_owner(USERS) == (stat.S_IFDIR, 0, 0o1733), A.mode_owner(USERS)
        top = self.state / A.USERS
        if os.path.lexists(top):
            assert A.mode_owner(top) == (stat.S_IFDIR, 0, 0o711), A.mode_owner(top)


def _force_unmount_and_stop(uids, since: float) -> None:
    """(cleanup, root) The FUSE mounts of ``uids`` and the processes of
    theirs this test started."""
    for uid in uids:
        for point in sorted(fuse_mounts(uid), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
    for p in psutil.process_iter(["uids", "create_time"]):
        info = p.info
        if info["uids"] and info["uids"].real in uids and info["create_time"] >= since:
            try:
                p.kill()
            except psutil.Error:
                pass


@pytest.fixture
def atk(slurm_side, people, envs, conda_site):
    since = time.time() - 1
    slurm_side.ensure_clean()
    attack = ShellImageAttack(slurm_side, people, envs, conda_site)
    attack.cleanups.append(lambda: _force_unmount_and_stop(
        (people.attacker.uid, people.victim.uid), since))
    attack.since = since
    with attack:
        yield attack


# ----------------------------------------------------------------- helpers


def as_attacker_py(atk, code: str, timeout: float = 300) -> str:
    """Run Python code as the attacker (outside any job); its stdout."""
    r = run_as(atk.people.attacker, [HOOK_PYTHON, "-I", "-c", code], timeout=timeout,
               env={"PATH": A.SANE_PATH, "HOME": str(atk.people.attacker.home)})
    assert r.returncode == 0, f"the attacker's setup failed: {r.stdout}{r.stderr}"
    return r.stdout


def attackers_fuse_left(atk) -> list:
    return [(p.pid, p.info["cmdline"]) for p in img.fuse_processes(
        atk.people.attacker.uid, since=atk.since, helpers=True)]


def verify(atk) -> None:
    """No code of the attacker's ran as root or the victim, nothing changed
    outside the staging area, the node healthy, no FUSE mount or process of
    the attacker's or the victim's left, nothing left staged."""
    assert not atk.proof.ran_as(0), f"root ran the attacker's code: {atk.proof.ran_as(0)}"
    assert not atk.proof.ran_as(atk.people.victim.uid)
    changes = atk.watch.changes(atk.before)
    assert not changes, "outside the staging area:\n" + "\n".join(changes[:40])
    atk.healthy()
    for who in (atk.people.attacker, atk.people.victim):
        assert fuse_mounts(who.uid) == [], f"left mounted: {fuse_mounts(who.uid)}"
    A.sleep_until(lambda: not attackers_fuse_left(atk), 10)
    assert attackers_fuse_left(atk) == [], f"FUSE processes left: {attackers_fuse_left(atk)}"
    atk.nothing_left()


VICTIM_PROBE = 'echo "cs_folder=$(stat -c %u:%a "$u")"\n'


def victim_staged(atk, out: str) -> dict:
    """The victim's job got its image mounted at its sidecar's path, in its
    own folder (the victim's, 0700), told in one line."""
    vic, victim = atk.envs["vic"], atk.people.victim
    vals = A.job_values(out)
    assert atk.staged_copy(out, vic.name) == image_meta(vic)["mount_prefix"], out
    assert vals.get("cs_mounted") == "1", f"the victim's image was not mounted:\n{out}"
    assert vals.get("cs_folder") == f"{victim.uid}:700", out
    assert len(lines_about(out, vic.name)) == 1, out
    return vals


def prolog_seconds(jid: str, mark: int) -> float:
    took = [float(m) for line in A.hook_log_lines(HOOK_LOG, mark)
            for m in re.findall(rf"job {jid} \(\S+\): prolog done in ([0-9.]+) s", line)]
    assert took, f"no 'prolog done' line for job {jid}"
    return took[-1]


def epilog_seconds(jid: str, mark: int) -> float | None:
    took = [float(m) for line in A.hook_log_lines(HOOK_LOG, mark)
            for m in re.findall(rf"job {jid} \(\S+\): removed \S+ in ([0-9.]+) s", line)]
    return took[-1] if took else None


class StateSampler:
    """Everything that appears in ``<state>/users`` while the block runs
    (sampled every 5 ms)."""

    def __init__(self):
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.seen.update(os.listdir(STATE / A.USERS))
            except OSError:
                pass
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------- the control
def test_control_the_victims_image_is_mounted_in_its_own_folder(atk):
    """Without an attack the victim's image is mounted at its sidecar's
    path, in the victim's 0700 folder, and nothing is left after the job."""
    atk.begin()
    jid, out = atk.run(atk.people.victim, probe(atk, atk.envs["vic"].name, VICTIM_PROBE),
                       [atk.envs["vic"].name])
    atk.completed(jid)
    victim_staged(atk, out)
    verify(atk)


# ----------------------------------------------------------------- the victim's folder squatted
SQUATS = ["dir_0777", "symlink_to_decoy", "symlink_to_own", "file", "fifo", "fuse_inside"]
FUSE_SQUATS = ["fuse_over", "fuse_out_of_reach"]


def _squat(atk, how: str) -> dict:
    """As the attacker, put ``how`` at ``users/<victim uid>``; what to check
    afterwards."""
    attacker, victim = atk.people.attacker, atk.people.victim
    vic = atk.envs["vic"]
    v = USERS / str(victim.uid)
    own = A.user_dir(KIT / attacker.name, attacker)
    mine = A.user_dir(own / "precious", attacker)
    A.write_as(mine / "keep", "mine\n", attacker)
    image = image_file(atk.envs["one"])
    vid = image_meta(vic)["image_id"]
    checks = {"decoy": None, "mine": mine}
    if how == "dir_0777":
        # what the victim's job would use if root kept it: the attacker's copy
        A.as_attacker(atk, f'mkdir -m 0777 "{v}"; chmod 0777 "{v}"; mkdir -p "{v}/{vid}"\n'
                         f'ln -s "{mine}" "{v}/{vid}/{vic.name}"\n'
                         f'echo evil > "{v}/cs-evil"; chmod -R a+rwx "{v}"')
    elif how == "symlink_to_decoy":
        checks["decoy"] = atk.decoy(DECOY, ["sub", vid])
        A.as_attacker(atk, f'ln -s "{DECOY}" "{v}"')
    elif how == "symlink_to_own":
        A.as_attacker(atk, f'ln -s "{mine}" "{v}"')
    elif how == "file":
        A.as_attacker(atk, f'echo evil > "{v}"; chmod 0600 "{v}"')
    elif how == "fifo":
        A.as_attacker(atk, f'mkfifo -m 0600 "{v}"')
        atk.cleanups.append(lambda: A.release_fifo_readers(v))
    else:
        point = {"fuse_inside": f"{v}/{vid}", "fuse_over": f"{v}",
                 "fuse_out_of_reach": f"{v}/cs-locked/m"}[how]
        A.as_attacker(atk, f'mkdir -p "{point}"\n'
                         f'squashfuse_ll "{image}" "{point}"\n'
                         f'for i in $(seq 50); do grep -qF " {point} " /proc/self/mountinfo '
                         f'&& break; sleep 0.1; done\n'
                         + (f'chmod 0 "{v}/cs-locked"\n' if how == "fuse_out_of_reach" else ""))
        assert point in fuse_mounts(attacker.uid), fuse_mounts(attacker.uid)
        checks["point"] = point
    # (listed: root may not even lstat another user's FUSE mount)
    assert v.name in os.listdir(USERS), f"the attacker could not squat {v}"
    return checks


def _check_squat(atk, how: str, checks: dict) -> None:
    assert (checks["mine"] / "keep").read_text() == "mine\n", \
        "root deleted through the attacker's link"
    if checks["decoy"] is not None:
        for name in os.listdir(checks["decoy"]):
            assert (checks["decoy"] / name / "precious").read_text() == "root's\n"


def _victims_job_despite_squat(atk, how: str) -> None:
    vic = atk.envs["vic"]
    checks = _squat(atk, how)
    extra = [A.Place(checks["decoy"])] if checks["decoy"] is not None else []
    atk.begin(extra=extra)
    mark = A.size_of(HOOK_LOG)
    jid, out = atk.run(atk.people.victim, probe(atk, vic.name, VICTIM_PROBE), [vic.name])
    atk.completed(jid)
    _check_squat(atk, how, checks)
    victim_staged(atk, out)
    assert prolog_seconds(jid, mark) < A.BUDGET
    verify(atk)


@pytest.mark.parametrize("how", SQUATS)
def test_a_squatted_victim_folder_is_replaced_and_the_victim_staged(how, atk):
    """Before the victim's first job on the node the attacker makes
    ``users/<victim uid>``: a 0777 folder of its own (with a link to its
    own folder where the victim's image would be mounted), a symlink to a
    folder of root's (a decoy whose entries are named like the victim's
    image id), a symlink to a folder of its own, a file, a FIFO, or a
    folder with a squashfuse_ll mount of its own image at the victim's
    image id.  The victim's job is staged all the same -- its image
    mounted at its sidecar's path, in its own 0700 folder -- the link
    targets are intact (root followed nothing), no FUSE mount or process of
    the attacker's is left, the node is not drained, nothing is left."""
    _victims_job_despite_squat(atk, how)


@pytest.mark.parametrize("how", FUSE_SQUATS)
def test_a_victim_folder_squatted_by_a_fuse_mount_is_replaced(how, atk):
    """The attacker mounts its own image (squashfuse_ll) over
    ``users/<victim uid>`` itself, or at ``users/<victim uid>/cs-locked/m``
    and then takes every permission off ``cs-locked`` (so that the
    attacker's own unmount, fusermount3, cannot reach it).  Root may not
    stat or open another user's FUSE mount (EACCES), yet the victim's job
    must be staged as with any other squat, and nothing of the attacker's
    may be left mounted."""
    _victims_job_despite_squat(atk, how)


# ----------------------------------------------------------------- users/ flooded
FLOOD = 3000


def test_a_flood_of_uid_named_entries_costs_the_hooks_nothing(atk):
    """The attacker fills ``users/`` with 3,000 folders of its own named
    like other users' uids, links named like uids (``0`` to /, ``1`` to
    /root, the victim's uid plus 100000 to /etc), and a folder named like
    the victim's uid with a leading zero.  The victim's job is staged, its
    prolog and epilog take a few seconds, root makes no lock or record for
    any of those uids in the state folder (watched while the job runs), and
    the attacker's entries are untouched (they squat nobody's folder)."""
    victim = atk.people.victim
    vic = atk.envs["vic"]
    base = 400000
    links = {"0": "/", "1": "/root", str(victim.uid + 100000): "/etc"}
    as_attacker_py(atk, f"""import os
users = {str(USERS)!r}
for n in range({base}, {base + FLOOD}):
    os.mkdir(os.path.join(users, str(n)), 0o755)
for name, target in {links!r}.items():
    os.symlink(target, os.path.join(users, name))
os.mkdir(os.path.join(users, "0{victim.uid}"), 0o700)
""")
    flood = [str(n) for n in range(base, base + FLOOD)] + list(links) + [f"0{victim.uid}"]

    def cleanup():
        for name in flood:
            A.force_remove(USERS / name)
    atk.cleanups.append(cleanup)
    before = {n: A.mode_owner(USERS / n) for n in flood}
    atk.begin()
    mark = A.size_of(HOOK_LOG)
    with StateSampler() as seen:
        jid, out = atk.run(victim, probe(atk, vic.name, VICTIM_PROBE), [vic.name])
        atk.completed(jid)
    victim_staged(atk, out)
    assert prolog_seconds(jid, mark) < 10, "the flood slowed the prolog down"
    took = epilog_seconds(jid, mark)
    assert took is not None and took < 10, "the flood slowed the epilog down"
    allowed = {str(victim.uid), f"{victim.uid}.lock"}
    assert str(victim.uid) in seen.seen or f"{victim.uid}.lock" in seen.seen, \
        "the sampler never saw the victim's lock or records"
    assert seen.seen <= allowed, f"root made state for other uids: {sorted(seen.seen - allowed)}"
    after = {n: A.mode_owner(USERS / n) if os.path.lexists(USERS / n) else None for n in flood}
    assert after == before, "root changed or removed entries that squat nobody's folder"
    cleanup()
    verify(atk)


# ----------------------------------------------------------------- the attacker's own folder
def _victim_process(victim) -> subprocess.Popen:
    """A process of the victim's (its 'shell') that lives for the test."""
    return subprocess.Popen(["sleep", "600"], user=victim.uid, group=victim.gid,
                            extra_groups=[], cwd="/", stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_hostile_content_in_the_attackers_own_folder_is_never_followed(atk):
    """The attacker makes its own ``users/<uid>`` (0700, as a shell would)
    and fills it with entries named like image ids: links to /etc, to a
    folder of root's and to the victim's home; image folders with holder
    files naming a live process of the victim's, a job claim, an image
    that is a link to /etc/shadow and a copy that is a link to the
    victim's home; its own image's id as a link to the decoy.  Then it runs
    a job of its own, the victim runs one (whose prolog and epilog sweep
    the attacker's folder too), and root's 'gc --jobs' runs -- before and
    after the victim's process is gone.  Root and the attacker's sweep
    follow nothing (the decoy, /etc, the victim's home and the victim's
    process untouched), the victim is staged, nothing is left in the end."""
    attacker, victim = atk.people.attacker, atk.people.victim
    one, vic = atk.envs["one"], atk.envs["vic"]
    decoy = atk.decoy(DECOY, ["sub"])
    shell = _victim_process(victim)
    atk.cleanups.append(lambda: (shell.kill(), shell.wait()))
    sleeper = psutil.Process(shell.pid)
    assert sleeper.uids().real == victim.uid
    start_ms = int(sleeper.create_time() * 1000)
    holder = f".holder-{sleeper.pid}-{start_ms}"
    own_id = image_meta(one)["image_id"]
    u = USERS / str(attacker.uid)
    A.as_attacker(atk, f"""mkdir -m 0700 "{u}"; cd "{u}"
ln -s /etc aaaaaaaaaaaaaaa1
ln -s "{decoy}" aaaaaaaaaaaaaaa2
ln -s "{victim.home}" aaaaaaaaaaaaaaa3
mkdir aaaaaaaaaaaaaaa4; touch aaaaaaaaaaaaaaa4/{holder} aaaaaaaaaaaaaaa4/.job-claim
ln -s /etc/shadow aaaaaaaaaaaaaaa4/.image.sqfs; ln -s "{victim.home}" aaaaaaaaaaaaaaa4/{one.name}
mkdir aaaaaaaaaaaaaaa5; touch aaaaaaaaaaaaaaa5/.job-claim aaaaaaaaaaaaaaa5/.holder-4194300-1000
ln -s "{decoy}/sub" aaaaaaaaaaaaaaa5/{one.name}; ln -s /etc/passwd aaaaaaaaaaaaaaa5/.image.sqfs
ln -s "{decoy}" "{own_id}"
ln -s /etc cs-evil
""")
    atk.begin(extra=[A.Place(decoy)])
    jid, out = atk.run(attacker, probe(atk, one.name), [one.name])
    atk.completed(jid)
    vjid, vout = atk.run(victim, probe(atk, vic.name, VICTIM_PROBE), [vic.name])
    atk.completed(vjid)
    victim_staged(atk, vout)
    r = gc_jobs(atk.cluster)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (decoy / "sub" / "precious").read_text() == "root's\n"
    assert sleeper.is_running() and sleeper.uids().real == victim.uid, \
        "the victim's process was stopped"
    assert not atk.watch.changes(atk.before), atk.watch.changes(atk.before)
    # the victim's process gone, gc removes what its holder file kept
    shell.kill()
    shell.wait()
    r = gc_jobs(atk.cluster)
    assert r.returncode == 0, r.stdout + r.stderr
    verify(atk)


# ----------------------------------------------------------------- a wide tree
WIDE = 60000   # sibling folders: removing them one rescan at a time takes root minutes


def _wide_tree(atk, folder: Path) -> None:
    as_attacker_py(atk, f"""import os
top = {str(folder)!r}
os.makedirs(top, exist_ok=True)
for n in range({WIDE}):
    os.mkdir(f"{{top}}/{{n}}")
""")


def test_a_wide_tree_in_the_squatted_folder_holds_no_hook_past_its_budget(atk):
    """The victim's squatted folder holds 60,000 folders side by side
    (``_remove_at`` rescans the folder from its start after each one).  The
    prolog stops removing at its budget (the job runs, told in one line),
    the epilog (budget 30 s here) returns within its budget too, and the
    node is not drained."""
    victim = atk.people.victim
    vic = atk.envs["vic"]
    v = USERS / str(victim.uid)
    A.as_attacker(atk, f'mkdir -m 0755 "{v}"')
    _wide_tree(atk, v / "cs-wide")
    atk.setting(epilog_budget=30)
    atk.begin()
    mark = A.size_of(HOOK_LOG)
    jid = atk.submit(victim, probe(atk, vic.name, 'echo "cs_end=$(date +%s.%N)"\n'),
                     [vic.name])
    atk.started_within_budget(jid)
    out = atk.finish(jid, timeout=300)
    left_queue = time.time()
    atk.completed(jid)
    end = float(A.job_values(out)["cs_end"])
    assert prolog_seconds(jid, mark) < A.BUDGET + 15
    assert left_queue - end < 30 + 15, f"the epilog took {left_queue - end:.0f} s"
    starved = [line for line in A.hook_log_lines(HOOK_LOG, mark)
               if f"job {jid} " in line and "could not remove" in line]
    assert not starved, ("removing the rest of the squatted folder (no deadline) used up the "
                         f"epilog's budget, the job's folder was left: {starved}")
    atk.healthy()
    A.force_remove(v)
    verify(atk)


def test_a_wide_tree_in_the_attackers_own_folder_does_not_hold_the_victims_prolog(atk):
    """The attacker makes its own ``users/<uid>`` (as a shell would) with an
    id folder nobody recorded holding 60,000 folders side by side.  The
    victim's prolog sweeps other users' unused copies first: it must still
    return within its budget (the victim's job starts in time)."""
    attacker, victim = atk.people.attacker, atk.people.victim
    vic = atk.envs["vic"]
    u = USERS / str(attacker.uid)
    A.as_attacker(atk, f'mkdir -m 0700 "{u}"')
    _wide_tree(atk, u / "bbbbbbbbbbbbbbb1")
    atk.begin()
    mark = A.size_of(HOOK_LOG)
    jid = atk.submit(victim, probe(atk, vic.name, VICTIM_PROBE), [vic.name])
    try:
        atk.started_within_budget(jid)
    finally:
        out = atk.finish(jid, timeout=300)
    atk.completed(jid)
    victim_staged(atk, out)
    assert prolog_seconds(jid, mark) < A.BUDGET + 15
    A.force_remove(u)
    verify(atk)


# ----------------------------------------------------------------- holder files
def test_a_holder_file_of_a_process_not_the_users_keeps_no_copy_forever(atk):
    """The attacker's job adds ``.holder-1-0`` to the folder of the image
    its prolog mounted: "held by PID 1, start time unknown" -- init, always
    alive and not the attacker's shell.  After the job (copies are kept 0 s)
    and root's 'gc --jobs', the copy must be gone like any unused copy:
    a holder file names a shell of the folder's owner, or nothing."""
    attacker = atk.people.attacker
    one = atk.envs["one"]
    atk.begin()
    body = 'chmod u+w "$s" && touch "$s/.holder-1-0" && chmod u-w "$s" && echo cs_planted=1\n'
    jid, out = atk.run(attacker, probe(atk, one.name, body), [one.name])
    atk.completed(jid)
    vals = A.job_values(out)
    assert vals.get("cs_mounted") == "1" and vals.get("cs_planted") == "1", out
    folder = Path(vals["cs_store_dir"])
    assert folder.parent == USERS / str(attacker.uid), folder
    r = gc_jobs(atk.cluster)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not os.path.lexists(folder), \
        f"{folder} outlived its job and gc --jobs: kept for PID 1 ('a shell still uses it')"
    verify(atk)


# ----------------------------------------------------------------- racing root's remake
RACER = """import os, sys, time
path, flag = sys.argv[1], sys.argv[2]
end = time.monotonic() + 120
made = 0
while time.monotonic() < end and not os.path.exists(flag):
    try:
        os.mkdir(path, 0o777)
        made += 1
    except OSError:
        pass
print(made)
"""


def test_racing_roots_remake_of_the_victims_folder(atk):
    """While the victim's prolog runs, the attacker makes ``users/<victim
    uid>`` again and again in a tight loop (a 0777 folder of its own), so
    that root's remake after removing the squat may find it there.  The
    prolog returns within its budget; the victim's job is either staged in
    its own 0700 folder or told in one line, and runs; the node is not
    drained; no folder of the attacker's outlives the attack."""
    attacker, victim = atk.people.attacker, atk.people.victim
    vic = atk.envs["vic"]
    v = USERS / str(victim.uid)
    stop = A.Flag("racer")
    atk.cleanups.append(stop.remove)
    script = KIT / "racer.py"
    script.write_text(RACER)
    os.chmod(script, 0o644)
    atk.begin()
    racer = subprocess.Popen([HOOK_PYTHON, "-I", str(script), str(v), str(stop.path)],
                             user=attacker.uid, group=attacker.gid, extra_groups=[], cwd="/",
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    atk.cleanups.append(lambda: (racer.kill(), racer.wait()))
    assert A.sleep_until(lambda: v.name in os.listdir(USERS), 10), "the racer made nothing"
    mark = A.size_of(HOOK_LOG)
    jid = atk.submit(victim, probe(atk, vic.name, VICTIM_PROBE), [vic.name])
    try:
        atk.started_within_budget(jid)
    finally:
        stop.set()
        made = int(racer.communicate(timeout=30)[0].strip() or 0)
    out = atk.finish(jid)
    atk.completed(jid)
    assert made >= 1, "the racer never made the folder"
    assert prolog_seconds(jid, mark) < A.BUDGET
    lines = lines_about(out, vic.name)
    if A.job_values(out).get("cs_mounted") == "1":
        victim_staged(atk, out)
    else:
        assert len(lines) == 1 and "not staging" in lines[0], out
    atk.healthy()
    # the racer's last folder is its own: the victim's next prolog replaces it
    if v.name in os.listdir(USERS) and A.mode_owner(v)[1] == attacker.uid:
        A.force_remove(v)
    verify(atk)
