"""Adversarial tests on a real single-node Slurm 22.05 (issue 8).

An unprivileged user with bad intent (``csmallory``) attacks the shipped
root Prolog, the TaskProlog and Epilog, and ``conda-stage gc --jobs``; a
second user (``csvictim``) is the one whose files and jobs must stay safe.
Every test checks effects, after the job left the queue:

* nothing root-owned ran the attacker's code, nothing ran it as the victim
  (proof files, see tests/harness/attack.py);
* /etc, /root's entries, both homes, the test base and the staging area's
  parent are as before (nothing created, changed, chowned or deleted);
* the prolog returned within its budget (``CONDA_STAGE_PROLOG_BUDGET``) and,
  for the memory bomb, with bounded memory;
* the job ran, got one clear ``conda-stage:`` line about the environment
  and ran without a copy of it (or was held, when the site says hold);
* the node is not drained and the staging area is empty afterwards: no job
  folder, no shared copy in the node store (``users/<uid>/<id>/<name>``,
  kept 0 s after its last job here), no record, lock or manifest in the
  state folder (the store's empty ``users`` folders stay).

The node store gets attacks of its own: the attacker's job tampers with its
own part of it (``users/<uid>``) while a victim's job holds a copy, asks for
the victim's environment by name, and tries to plant records and locks in
the root-only state folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.harness.attack")

from tests.harness import attack as A  # noqa: E402
from tests.harness.slurm import SBIN_PATH  # noqa: E402
from tests.harness.users import TEST_BASE  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.conda]

ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "as"
HOOK_LOG = TEST_BASE / "attack-slurm-hooks.log"
SQUAT = TEST_BASE / "attack-squat"     # an admin's unwise choice: a 1777 folder
DECOY = TEST_BASE / "attack-decoy"     # root's precious all-digit folders elsewhere


STAGING, STATE = A.product_dirs()   # the product's defaults (the tests do not override them)


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def people():
    return A.cast()


@pytest.fixture(scope="module")
def envs(conda_site, stage_bin, people):
    with A.attack_envs(conda_site, stage_bin, people, ENV_PREFIX) as made:
        yield made


@pytest.fixture(scope="module")
def cluster(slurm_cluster, envs, conda_site):
    hooks = {
        "prolog": str(slurm_cluster.install_file(ROOT / "prolog" / "slurm-prolog")),
        "task_prolog": str(slurm_cluster.install_file(ROOT / "prolog" / "slurm-task-prolog")),
        "epilog": str(slurm_cluster.install_file(ROOT / "epilog" / "slurm-epilog")),
    }
    with A.hook_site(conda_site, HOOK_LOG) as defaults:
        with slurm_cluster.hooks_configured(**hooks, prolog_flags="Alloc"):
            slurm_cluster.defaults = defaults
            yield slurm_cluster


class SlurmAttack(A.Attack):
    """An attack on the Slurm hooks: jobs by sbatch (environments in
    ``--comment``), output from the cluster, a healthy node, an empty
    staging base (the product's, and the test's own if it moved it) and
    state folder."""

    kind = "slurm"

    def __init__(self, cluster, people, envs, site):
        super().__init__(cluster, people, envs, site, hook_log=HOOK_LOG, staging=STAGING,
                         state=STATE, volatile=[SQUAT, DECOY])
        self.infos: dict[str, dict] = {}

    def _send(self, user, script, names, args, env=None):
        comment = [f"--comment=conda_env={':'.join(names)}"] if names else []
        t0 = time.time()
        return self.cluster.submit(user, script, *comment, *args, env=env), t0

    def env_args(self, variables):
        """sbatch exports the submitting environment to the job."""
        return (), {"env": dict(variables)}

    def output(self, jid: str) -> str:
        try:
            return self.cluster.output(jid, timeout=0)
        except OSError:
            return ""

    def describe(self, jid: str) -> str:
        info = self.cluster.job_info(jid)
        return (f"JobState={info.get('JobState')} Reason={info.get('Reason')}; "
                f"node {self.cluster.node_state()}")

    def finish(self, jid: str, timeout: float = 120) -> str:
        self.infos[jid] = self.cluster.wait(jid, timeout=timeout)
        return self.cluster.output(jid)

    def completed(self, jid: str) -> None:
        assert self.infos[jid]["JobState"] == "COMPLETED", self.output(jid)

    def healthy(self) -> None:
        state = self.cluster.node_state()
        assert "drain" not in state and "down" not in state, \
            f"node {state}: {self.cluster.node_reason()}"

    @contextlib.contextmanager
    def staging_on(self, mount: Path):
        self.setting(staging_dir=mount)
        self.staging = mount
        yield

    def clear_jobs(self) -> None:
        for jid in self.jobs:
            if self.cluster.in_queue(jid):
                self.cluster.cancel(jid)
        self.cluster.ensure_clean(timeout=90)


@pytest.fixture
def atk(cluster, people, envs, conda_site):
    cluster.ensure_clean()
    with SlurmAttack(cluster, people, envs, conda_site) as attack:
        yield attack


def release(cluster, jid: str) -> None:
    """Release a job submitted with --hold (it may start at once)."""
    cluster.scontrol("release", jid)


def gc_jobs(cluster, *more: str) -> subprocess.CompletedProcess:
    """``conda-stage gc --jobs`` as root (the cron job of an admin)."""
    env = {"PATH": SBIN_PATH, "SLURM_CONF": str(cluster.conf_path), "LANG": "C.UTF-8",
           "HOME": "/root"}
    return subprocess.run([str(Path(sys.prefix) / "bin" / "conda-stage"), "gc", "--jobs", *more],
                          capture_output=True, text=True, timeout=120, env=env)


def fresh_squat() -> Path:
    if SQUAT.exists():
        for root, dirs, _files in os.walk(SQUAT):
            for d in dirs:
                p = os.path.join(root, d)
                if not os.path.islink(p):
                    os.chmod(p, 0o755)
        shutil.rmtree(SQUAT)
    SQUAT.mkdir()
    os.chmod(SQUAT, 0o1777)
    return SQUAT / "jobs"


# ----------------------------------------------------------------- the squatted base
def test_squatted_staging_base_is_refused_and_never_followed(atk, people, envs, conda_site):
    """The admin put the staging base under a 1777 folder; the attacker
    created it first, planted ``<victim's next job id>`` as a symlink to the
    victim's home and, for the next one, a folder with a manifest.json whose
    values carry ``export LD_PRELOAD=...`` lines and point CONDA_ENVS_PATH at
    a fake environment with an evil activate script, and a ``tmp`` folder
    (the site sets TMPDIR to the job folder's); and a node store of its own
    (``users/<victim's uid>/<id>/<env>`` the fake environment, ``users/<its
    own uid>`` a symlink to the victim's home).  The victim's jobs run
    unstaged with one line, their TMPDIR is not the attacker's; nothing
    planted is followed, read, written or printed -- by the prolog,
    TaskProlog, epilog or root's ``gc --jobs``."""
    attacker, victim = people.attacker, people.victim
    vic = envs["vic"]
    base = fresh_squat()
    atk.setting(staging_dir=base, set_tmpdir="yes")
    so = A.evil_so(atk.proof)
    fake_envs = A.user_dir(attacker.home / "cs-attack-envs", attacker)
    atk.remove_later(fake_envs, SQUAT)
    body = A.activate_lines(conda_site.init_file, [vic.name])
    jid_home = atk.submit(victim, body, [vic.name], "--hold")
    jid_manifest = atk.submit(victim, body, [vic.name], "--hold")

    # The attacker's plant, made before the victim's jobs start.
    A.user_dir(base, attacker, 0o777)
    os.symlink(victim.home, base / jid_home)
    A.chown(base / jid_home, attacker)
    fake = fake_envs / vic.name
    A.write_as(fake / "conda-meta" / "history", "", attacker)
    A.write_as(fake / "etc" / "conda" / "activate.d" / "evil.sh",
               atk.proof.cmd("activate") + "\n", attacker, 0o755)
    planted = A.user_dir(base / jid_manifest, attacker, 0o777)
    A.user_dir(planted / "envs", attacker, 0o777)
    A.user_dir(planted / "tmp", attacker, 0o777)    # would-be TMPDIR of the victim's job
    manifest = {
        "job_id": jid_manifest, "task_id": None, "user": victim.name,
        "workdir": f"{planted}\nexport CS_ATTACK_WORKDIR=1",
        "envs_dir": f"{fake_envs}\nexport LD_PRELOAD={so}\nexport CS_ATTACK_ENVS=1",
        "results": [{"name": vic.name, "status": "staged", "path": str(fake),
                     "original": str(vic.prefix), "seconds": 0.1}],
        "problems": [], "created": time.time(),
        "messages": [f"conda-stage: staged {vic.name}\nexport CS_ATTACK_MESSAGE=1"],
    }
    A.write_as(planted / "manifest.json", json.dumps(manifest), attacker)
    store = A.user_dir(base / "users", attacker, 0o777)
    A.user_dir(store / str(victim.uid) / "0123456789abcdef", attacker, 0o777)
    os.symlink(fake, store / str(victim.uid) / "0123456789abcdef" / vic.name)
    os.symlink(victim.home, store / str(attacker.uid))
    for p in (store / str(victim.uid) / "0123456789abcdef" / vic.name, store / str(attacker.uid)):
        A.chown(p, attacker)
    atk.begin(extra=[A.Place(SQUAT), A.Place(fake_envs)])

    t0 = time.time()
    for jid in (jid_home, jid_manifest):
        release(atk.cluster, jid)
    for jid in (jid_home, jid_manifest):
        atk.started_within_budget(jid, since=t0)
    outs = {jid: atk.finish(jid) for jid in (jid_home, jid_manifest)}
    gc = gc_jobs(atk.cluster)
    atk.verify()
    for jid, out in outs.items():
        env = A.job_env(out)
        assert A.attacker_vars(env) == {}, f"job {jid}: attacker's variables reached the " \
                                           f"victim's job: {A.attacker_vars(env)}"
        assert str(fake_envs) not in env.get("CONDA_ENVS_PATH", ""), env.get("CONDA_ENVS_PATH")
        assert str(SQUAT) not in env.get("CONDA_ENVS_PATH", ""), env.get("CONDA_ENVS_PATH")
        assert not env.get("TMPDIR", "").startswith(str(SQUAT)), \
            f"job {jid}: TMPDIR in the attacker's folder: {env['TMPDIR']}"
        assert not A.job_values(out).get(f"cs_prefix:{vic.name}", "").startswith(str(fake_envs))
        atk.completed(jid)
        A.one_line(out, vic.name)
        A.unstaged(out, vic.name)
    shown = gc.stdout + gc.stderr
    A.assert_no_traceback(shown)
    for jid in (jid_home, jid_manifest):
        assert str(base / jid) not in shown, f"gc --jobs listed a planted entry:\n{shown}"
    assert str(base / "users") not in shown, f"gc --jobs listed the planted store:\n{shown}"


def test_symlinked_staging_base_is_never_followed(atk, people, envs):
    """The attacker made the (1777-parented) staging base a symlink to a
    folder of root's with all-digit names -- one of them the victim's next
    job id.  Neither the epilog nor ``gc --jobs`` removes anything there."""
    attacker, victim = people.attacker, people.victim
    vic = envs["vic"]
    base = fresh_squat()
    atk.setting(staging_dir=base)
    atk.remove_later(SQUAT)
    jid = atk.submit(victim, "", [vic.name], "--hold")
    atk.decoy(DECOY, [jid, "4242"])
    os.symlink(DECOY, base)
    A.chown(base, attacker)
    atk.begin(extra=[A.Place(DECOY), A.Place(SQUAT)])

    t0 = time.time()
    release(atk.cluster, jid)
    atk.started_within_budget(jid, since=t0)
    out = atk.finish(jid)
    gc = gc_jobs(atk.cluster)
    atk.verify()
    assert (DECOY / jid / "precious").is_file() and (DECOY / "4242" / "precious").is_file()
    shown = gc.stdout + gc.stderr
    A.assert_no_traceback(shown)
    assert str(base / "4242") not in shown and str(DECOY / "4242") not in shown, shown
    atk.completed(jid)
    A.one_line(out, vic.name)
    A.unstaged(out, vic.name)


RACE = TEST_BASE / "attack-race"      # root's, but writable by all and not sticky


def test_base_under_a_user_writable_parent_is_refused_while_swapped(atk, people, envs):
    """The staging base's parent is writable by everyone (not sticky): the
    attacker swaps root's base with a symlink to a folder of root's holding
    ``<job id>`` entries, as fast as possible, while three jobs run.  Root
    chowns, removes or creates nothing there."""
    attacker = people.attacker
    one = envs["one"]
    if RACE.exists():
        shutil.rmtree(RACE)
    RACE.mkdir()
    os.chmod(RACE, 0o777)
    atk.remove_later(RACE)
    base = RACE / "jobs"
    atk.setting(staging_dir=base)
    jids = [atk.submit(attacker, "", [one.name], "--hold") for _ in range(3)]
    atk.decoy(DECOY, jids)
    racer = A.Racer(attacker, base, DECOY).start()
    atk.cleanups.append(racer.stop)
    atk.begin(extra=[A.Place(DECOY)], volatile=[RACE])

    t0 = time.time()
    for jid in jids:
        release(atk.cluster, jid)
    for jid in jids:
        atk.started_within_budget(jid, since=t0)
    outs = {jid: atk.finish(jid) for jid in jids}
    racer.stop()
    atk.verify()
    for jid, out in outs.items():
        atk.completed(jid)
        A.one_line(out, one.name)
        A.unstaged(out, one.name)


def test_job_tampering_with_its_own_job_folder(atk):
    """During its job the attacker replaces its shared copy by a symlink to
    a folder of root's (the real copy moved into the job folder's ``tmp``),
    adds symlinks to the victim's home and /etc, FIFOs and a read-only
    tree.  The root epilog removes the job folder and the copy without
    following any of it."""
    A.job_tampering(atk, DECOY)


# ----------------------------------------------------------------- the node store
@pytest.mark.parametrize("how", A.STORE_TAMPERING)
def test_store_tampering_removes_only_the_attackers_things(how, atk):
    """The attacker's job tampers with its own ``users/<uid>`` while the
    victim's job holds a copy (see :func:`A.store_tampering`): the epilog
    follows nothing and removes only the attacker's things."""
    A.store_tampering(atk, how, DECOY)


def test_attacker_cannot_use_or_hold_the_victims_copy(atk):
    A.victims_copy_by_name(atk)


def test_state_folder_is_root_only(atk):
    A.state_dir_is_root_only(atk)


def test_gc_follows_nothing_the_attacker_planted_in_its_store(atk, people, envs):
    """The site keeps unused copies 300 s: the attacker's job leaves its copy's
    ``<id>`` folder a symlink to a folder of root's (the real one moved
    aside in ``users/<uid>``), and the record outlives the job.  The admin's
    ``gc --jobs --all-unused`` then removes the attacker's folder -- the
    symlink, not what it points to -- and its record."""
    attacker = people.attacker
    one = envs["one"]
    atk.setting(keep_unused=300)
    atk.decoy(DECOY, ["sub"])
    body = f"""s="${{CONDA_ENVS_PATH%%:*}}"
chmod u+w "$s" && mv "$s" "$(dirname "$s")/moved" && ln -s {DECOY} "$s" && echo cs_swapped=1
"""
    atk.begin(extra=[A.Place(DECOY)])
    jid, out = atk.run(attacker, body, [one.name])
    assert A.job_values(out).get("cs_swapped") == "1", out
    kept = A.store_listing(STAGING)
    assert kept == [f"users/{attacker.uid}"], kept    # kept for its next job
    gc = gc_jobs(atk.cluster, "--all-unused")
    A.assert_no_traceback(gc.stdout + gc.stderr)
    assert gc.returncode == 0, gc.stderr
    atk.verify()
    assert (DECOY / "sub" / "precious").is_file()
    atk.completed(jid)


# ----------------------------------------------------------------- blocking
@pytest.mark.parametrize("where", A.FIFO_PLACES)
def test_fifo_instead_of_a_user_file_blocks_nothing(where, atk):
    """A FIFO at ~/.condarc, at the lock file or at the tarball (the sidecar
    made to match it), which blocks whoever reads it: the prolog returns
    within its budget."""
    A.fifo_instead_of_a_user_file(atk, where)


def test_lock_held_forever_costs_one_budget_and_only_its_env(atk):
    """The attacker holds one environment's lock forever: the prolog stops
    waiting at its budget; the good one is staged into the job folder."""
    A.lock_held_forever(atk)


# ----------------------------------------------------------------- hostile archives
@pytest.mark.parametrize("bomb", A.BOMBS)
def test_memory_bomb(bomb, atk):
    """An 8 TiB member in a tiny tar.zst, or a 64 MB sidecar: the prolog's
    memory stays bounded."""
    A.memory_bomb(atk, bomb)


def test_symlink_chain_and_hard_link_out_of_the_copy(atk):
    A.symlink_chain_and_hard_link(atk)


def test_truncated_tarballs_never_stage(atk):
    A.truncated_tarballs(atk)


def test_one_malformed_sidecar_record_fails_only_its_env(atk):
    A.malformed_sidecar_record(atk)


# ----------------------------------------------------------------- injection
def test_newline_in_condarc_forges_no_log_or_output_line(atk):
    A.newline_in_condarc(atk, missing=f"{ENV_PREFIX}-none")


# ----------------------------------------------------------------- resources
@pytest.mark.parametrize("short", A.SHORT_OF)
def test_staging_filesystem_too_small(short, atk):
    """The staging base (the site's setting) is a tmpfs too small in bytes
    or inodes."""
    A.staging_filesystem_too_small(atk, short, Path("/mnt") / f"cs-attack-{short}")


def test_hostile_tarball_with_on_error_hold_holds_the_job(atk):
    """The admin chose CONDA_STAGE_ON_ERROR=hold: a truncated tarball holds
    the job (no drain, nothing left, nothing outside touched)."""
    jid = A.submit_to_hold(atk)
    limit = A.BUDGET + A.SLACK

    def held():
        info = atk.cluster.job_info(jid)
        return "held" in info.get("Reason", "").lower() or info.get("Reason") == "JobHeldAdmin"
    assert A.sleep_until(held, limit), f"job {jid} not held: {atk.cluster.job_info(jid)}"
    state = atk.cluster.node_state()
    assert "drain" not in state, atk.cluster.node_reason()
    atk.cluster.cancel(jid)
    atk.cluster.wait(jid)
    atk.verify()
