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
* the node is not drained and the staging area is empty afterwards.
"""
from __future__ import annotations

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
from tests.harness.sitecfg import site_defaults  # noqa: E402
from tests.harness.slurm import SBIN_PATH  # noqa: E402
from tests.harness.users import TEST_BASE  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.conda]

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 20
HOOK_LOG = TEST_BASE / "attack-slurm-hooks.log"
SQUAT = TEST_BASE / "attack-squat"     # an admin's unwise choice: a 1777 folder
DECOY = TEST_BASE / "attack-decoy"     # root's precious all-digit folders elsewhere


def _product_staging_dir() -> Path:
    """The product's default staging base (the tests do not override it)."""
    from conda_stage.config import Config

    return Path(Config().staging_dir)


STAGING = _product_staging_dir()


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def people():
    return A.cast()


@pytest.fixture(scope="module")
def envs(conda_site, stage_bin, people):
    with A.attack_envs(conda_site, stage_bin, people, "as") as made:
        yield made


@pytest.fixture(scope="module")
def cluster(slurm_cluster, envs, conda_site):
    hooks = {
        "prolog": str(slurm_cluster.install_file(ROOT / "prolog" / "slurm-prolog")),
        "task_prolog": str(slurm_cluster.install_file(ROOT / "prolog" / "slurm-task-prolog")),
        "epilog": str(slurm_cluster.install_file(ROOT / "epilog" / "slurm-epilog")),
    }
    HOOK_LOG.unlink(missing_ok=True)
    HOOK_LOG.touch()
    with site_defaults(log_file=HOOK_LOG, syslog="no", conda_root=conda_site.root_prefix,
                       prolog_budget=BUDGET) as defaults:
        with slurm_cluster.hooks_configured(**hooks, prolog_flags="Alloc"):
            slurm_cluster.defaults = defaults
            yield slurm_cluster


class SlurmAttack:
    """One attack: setup helpers, job submission and timing, the effect checks."""

    def __init__(self, cluster, people, envs, site):
        self.cluster, self.people, self.envs, self.site = cluster, people, envs, site
        self.proof = A.Proof()
        self.cleanups: list = []
        self.jobs: list[str] = []
        self.submitted: dict[str, float] = {}
        self.watch = None
        self.before = None
        self.saved = {k: A.save_env_files(e) for k, e in envs.items()}
        self.closed = False

    # -------------------------------------------------------- setup
    def setting(self, **values) -> None:
        """Change site settings for this test only (None: remove the line)."""
        handle = self.cluster.defaults
        old = {k: handle.values.get(k) for k in values}

        def apply(changes):
            for k, v in changes.items():
                if v is None:
                    handle.values.pop(k, None)
                else:
                    handle.values[k] = v
            handle.update()
        self.cleanups.append(lambda: apply(old))
        apply(values)

    def begin(self, *, staging: Path = STAGING, extra=(), volatile=()) -> None:
        """Snapshot the sensitive places (call after the attacker's setup)."""
        self.watch = A.sensitive_places(self.people, staging, extra=extra,
                                        volatile=[HOOK_LOG, SQUAT, DECOY, *volatile])
        self.before = self.watch.take()

    # -------------------------------------------------------- jobs
    def submit(self, user, body: str = "", names=(), *args: str) -> str:
        script = "#!/bin/bash\n" + A.JOB_HEAD + body + A.JOB_TAIL
        comment = [f"--comment=conda_env={':'.join(names)}"] if names else []
        t0 = time.time()
        jid = self.cluster.submit(user, script, *comment, *args)
        self.jobs.append(jid)
        self.submitted[jid] = t0
        return jid

    def output(self, jid: str) -> str:
        try:
            return self.cluster.output(jid, timeout=0)
        except OSError:
            return ""

    def started_within_budget(self, jid: str, since: float | None = None) -> float:
        """Seconds from submission (or ``since``) until the job script ran;
        fails when that exceeds the prolog budget plus scheduling slack."""
        t0 = since or self.submitted[jid]
        limit = BUDGET + A.SLACK
        A.sleep_until(lambda: "cs_start=" in self.output(jid), limit + 10)
        start = A.job_values(self.output(jid)).get("cs_start")
        info = self.cluster.job_info(jid)
        assert start is not None, (
            f"job {jid} had not started {limit + 10:.0f} s after submission (prolog budget "
            f"{BUDGET} s): JobState={info.get('JobState')} Reason={info.get('Reason')}; "
            f"node {self.cluster.node_state()}")
        elapsed = float(start) - t0
        assert elapsed <= limit, f"job {jid} started {elapsed:.1f} s after submission " \
                                 f"(budget {BUDGET} s + {A.SLACK} s)"
        return elapsed

    def finish(self, jid: str, timeout: float = 120) -> tuple[dict, str]:
        info = self.cluster.wait(jid, timeout=timeout)
        return info, self.cluster.output(jid)

    # -------------------------------------------------------- effects
    def verify(self, *, staging: Path = STAGING) -> None:
        """What must hold after every attack (jobs done, epilogs run)."""
        root_ran = self.proof.ran_as(0)
        assert not root_ran, f"root ran the attacker's code: {root_ran}"
        victim_ran = self.proof.ran_as(self.people.victim.uid)
        assert not victim_ran, f"the victim ran the attacker's code: {victim_ran}"
        changes = self.watch.changes(self.before)
        assert not changes, "outside the staging area:\n" + "\n".join(changes[:40])
        state = self.cluster.node_state()
        assert "drain" not in state and "down" not in state, \
            f"node {state}: {self.cluster.node_reason()}"
        for folder in {STAGING, staging}:
            left = A.listing(folder) if folder.is_dir() else []
            assert left == [], f"left behind in {folder}: {left[:20]}"

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        errors = []
        for undo in reversed(self.cleanups):
            try:
                undo()
            except Exception as exc:  # noqa: BLE001 - run every cleanup
                errors.append(exc)
        for jid in self.jobs:
            if self.cluster.in_queue(jid):
                self.cluster.cancel(jid)
        try:
            self.cluster.ensure_clean(timeout=90)
        finally:
            for saved in self.saved.values():
                A.restore_env_files(saved)
        if errors:
            raise errors[0]


@pytest.fixture
def atk(cluster, people, envs, conda_site):
    cluster.ensure_clean()
    attack = SlurmAttack(cluster, people, envs, conda_site)
    attack.proof.reset()
    yield attack
    attack.close()


def unstaged(out: str, name: str) -> None:
    copies = A.job_values(out).get("cs_copies", "").split()
    assert name not in copies, f"{name} was staged: {copies}\n{out}"


def staged_copy(out: str, name: str) -> str:
    """The prefix ``conda activate NAME`` gave in the job: a copy in this
    job's folder."""
    vals = A.job_values(out)
    prefix = vals.get(f"cs_prefix:{name}", "")
    env = A.job_env(out)
    job_dir = env.get("CONDA_STAGE_JOB_DIR", "")
    assert job_dir and prefix == f"{job_dir}/envs/{name}", f"{name} not staged:\n{out}"
    assert prefix.startswith(f"{STAGING}/"), prefix
    return prefix


def release(cluster, jid: str) -> None:
    """Release a job submitted with --hold (it may start at once)."""
    cluster.scontrol("release", jid)


def gc_jobs(cluster) -> subprocess.CompletedProcess:
    """``conda-stage gc --jobs`` as root (the cron job of an admin)."""
    env = {"PATH": SBIN_PATH, "SLURM_CONF": str(cluster.conf_path), "LANG": "C.UTF-8",
           "HOME": "/root"}
    return subprocess.run([str(Path(sys.prefix) / "bin" / "conda-stage"), "gc", "--jobs"],
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
    (the site sets TMPDIR to the job folder's).  The victim's jobs run
    unstaged with one line, their TMPDIR is not the attacker's; nothing
    planted is followed, read, written or printed -- by the prolog,
    TaskProlog, epilog or root's ``gc --jobs``."""
    attacker, victim = people.attacker, people.victim
    vic = envs["vic"]
    base = fresh_squat()
    atk.setting(staging_dir=base, set_tmpdir="yes")
    so = A.evil_so(atk.proof)
    fake_envs = A.user_dir(attacker.home / "cs-attack-envs", attacker)
    atk.cleanups.append(lambda: shutil.rmtree(fake_envs, ignore_errors=True))
    atk.cleanups.append(lambda: shutil.rmtree(SQUAT, ignore_errors=True))
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
    atk.begin(extra=[A.Place(SQUAT), A.Place(fake_envs)])

    t0 = time.time()
    for jid in (jid_home, jid_manifest):
        release(atk.cluster, jid)
    for jid in (jid_home, jid_manifest):
        atk.started_within_budget(jid, since=t0)
    results = {jid: atk.finish(jid) for jid in (jid_home, jid_manifest)}
    gc = gc_jobs(atk.cluster)
    atk.verify()
    for jid, (info, out) in results.items():
        env = A.job_env(out)
        assert A.attacker_vars(env) == {}, f"job {jid}: attacker's variables reached the " \
                                           f"victim's job: {A.attacker_vars(env)}"
        assert str(fake_envs) not in env.get("CONDA_ENVS_PATH", ""), env.get("CONDA_ENVS_PATH")
        assert not env.get("TMPDIR", "").startswith(str(SQUAT)), \
            f"job {jid}: TMPDIR in the attacker's folder: {env['TMPDIR']}"
        assert not A.job_values(out).get(f"cs_prefix:{vic.name}", "").startswith(str(fake_envs))
        assert info["JobState"] == "COMPLETED", out
        A.one_line(out, vic.name)
        unstaged(out, vic.name)
    shown = gc.stdout + gc.stderr
    A.assert_no_traceback(shown)
    for jid in (jid_home, jid_manifest):
        assert str(base / jid) not in shown, f"gc --jobs listed a planted entry:\n{shown}"


def test_symlinked_staging_base_is_never_followed(atk, people, envs):
    """The attacker made the (1777-parented) staging base a symlink to a
    folder of root's with all-digit names -- one of them the victim's next
    job id.  Neither the epilog nor ``gc --jobs`` removes anything there."""
    attacker, victim = people.attacker, people.victim
    vic = envs["vic"]
    base = fresh_squat()
    atk.setting(staging_dir=base)
    atk.cleanups.append(lambda: shutil.rmtree(SQUAT, ignore_errors=True))
    atk.cleanups.append(lambda: shutil.rmtree(DECOY, ignore_errors=True))
    jid = atk.submit(victim, "", [vic.name], "--hold")
    if DECOY.exists():
        shutil.rmtree(DECOY)
    for name in (jid, "4242"):
        (DECOY / name).mkdir(parents=True)
        (DECOY / name / "precious").write_text("root's\n")
    os.symlink(DECOY, base)
    A.chown(base, attacker)
    atk.begin(extra=[A.Place(DECOY), A.Place(SQUAT)])

    t0 = time.time()
    release(atk.cluster, jid)
    atk.started_within_budget(jid, since=t0)
    info, out = atk.finish(jid)
    gc = gc_jobs(atk.cluster)
    atk.verify()
    assert (DECOY / jid / "precious").is_file() and (DECOY / "4242" / "precious").is_file()
    shown = gc.stdout + gc.stderr
    A.assert_no_traceback(shown)
    assert str(base / "4242") not in shown and str(DECOY / "4242") not in shown, shown
    assert info["JobState"] == "COMPLETED", out
    A.one_line(out, vic.name)
    unstaged(out, vic.name)


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
    atk.cleanups.append(lambda: shutil.rmtree(RACE, ignore_errors=True))
    base = RACE / "jobs"
    atk.setting(staging_dir=base)
    jids = [atk.submit(attacker, "", [one.name], "--hold") for _ in range(3)]
    if DECOY.exists():
        shutil.rmtree(DECOY)
    for jid in jids:
        (DECOY / jid).mkdir(parents=True)
        (DECOY / jid / "precious").write_text("root's\n")
    atk.cleanups.append(lambda: shutil.rmtree(DECOY, ignore_errors=True))
    racer = A.Racer(attacker, base, DECOY).start()
    atk.cleanups.append(racer.stop)
    atk.begin(extra=[A.Place(DECOY)], volatile=[RACE])

    t0 = time.time()
    for jid in jids:
        release(atk.cluster, jid)
    for jid in jids:
        atk.started_within_budget(jid, since=t0)
    results = [atk.finish(jid) for jid in jids]
    racer.stop()
    atk.verify()
    for info, out in results:
        assert info["JobState"] == "COMPLETED", out
        A.one_line(out, one.name)
        unstaged(out, one.name)


def test_job_tampering_with_its_own_job_folder(atk, people, envs, conda_site):
    """During its job the attacker replaces its staged copy by a symlink to
    a folder of root's, adds symlinks to the victim's home and /etc, a FIFO
    and a read-only tree.  The root epilog removes the job folder without
    following any of it."""
    attacker, victim = people.attacker, people.victim
    one = envs["one"]
    if DECOY.exists():
        shutil.rmtree(DECOY)
    (DECOY / "sub").mkdir(parents=True)
    (DECOY / "sub" / "precious").write_text("root's\n")
    atk.cleanups.append(lambda: shutil.rmtree(DECOY, ignore_errors=True))
    body = f"""d="$CONDA_STAGE_JOB_DIR"
echo "cs_job_dir=$d"
chmod u+w "$d" "$d/envs" 2>/dev/null; chmod -R u+w "$d/envs/{one.name}"
mv "$d/envs/{one.name}" "$d/tmp/moved" && ln -s {DECOY} "$d/envs/{one.name}" && echo cs_swapped=1
ln -s {victim.home} "$d/envs/home"; ln -s /etc "$d/tmp/etc"; ln -s {DECOY}/sub "$d/tmp/sub"
mkfifo "$d/tmp/fifo"
mkdir -p "$d/tmp/ro/a/b" && touch "$d/tmp/ro/a/b/f" && chmod -R a-w "$d/tmp/ro"
(cd "$d/tmp/moved" && setsid sleep 300 >/dev/null 2>&1 &)
"""
    atk.begin(extra=[A.Place(DECOY)])

    jid = atk.submit(attacker, body, [one.name])
    atk.started_within_budget(jid)
    info, out = atk.finish(jid)
    atk.verify()
    assert A.job_values(out).get("cs_swapped") == "1", f"the job could not tamper:\n{out}"
    assert info["JobState"] == "COMPLETED", out


# ----------------------------------------------------------------- blocking
@pytest.mark.parametrize("where", ["condarc", "lock", "tarball"])
def test_fifo_instead_of_a_user_file_blocks_nothing(where, atk, people, envs):
    """A FIFO at ~/.condarc, at the lock file or at the tarball (the sidecar
    made to match it): nobody ever writes to it, so whoever opens it for
    reading blocks forever.  The prolog returns within its budget."""
    attacker = people.attacker
    one = envs["one"]
    target = {"condarc": attacker.home / ".condarc", "lock": A.lock_path(one),
              "tarball": one.tarball}[where]
    A.make_fifo(target, attacker)
    atk.cleanups.append(lambda: target.unlink(missing_ok=True))
    atk.cleanups.append(lambda: A.release_fifo_readers(target))
    if where == "tarball":
        A.edit_sidecar(one, attacker, size=0, mtime_ns=os.stat(target).st_mtime_ns)
    atk.begin()

    jid = atk.submit(attacker, "", [one.name])
    atk.started_within_budget(jid)
    info, out = atk.finish(jid)
    atk.verify()
    assert info["JobState"] == "COMPLETED", out
    A.one_line(out, one.name)
    if where == "tarball":
        unstaged(out, one.name)


def test_lock_held_forever_costs_one_budget_and_only_its_env(atk, people, envs, conda_site):
    """The attacker's own process holds the lock of one environment forever
    (lockf and flock); the job asks for a good one first.  The prolog stops
    waiting at its budget; the good one is staged."""
    attacker = people.attacker
    one, two = envs["one"], envs["two"]
    holder = A.LockHolder(attacker, A.lock_path(one)).start()
    atk.cleanups.append(holder.stop)
    atk.begin()

    jid = atk.submit(attacker, A.activate_lines(conda_site.init_file, [two.name]),
                     [two.name, one.name])
    atk.started_within_budget(jid)
    info, out = atk.finish(jid)
    atk.verify()
    assert info["JobState"] == "COMPLETED", out
    A.one_line(out, one.name)
    unstaged(out, one.name)
    A.one_line(out, two.name)
    staged_copy(out, two.name)


# ----------------------------------------------------------------- hostile archives
@pytest.mark.parametrize("bomb", ["tarball", "sidecar"])
def test_memory_bomb(bomb, atk, people, envs):
    """``tarball``: a tiny tar.zst whose pax header declares an 8 TiB member
    followed by 640 MB of zeros (and no end).  ``sidecar``: a well-formed
    sidecar of half a million prefix records (64 MB) next to the real
    tarball.  Either way the prolog's memory stays bounded."""
    attacker = people.attacker
    one = envs["one"]
    if bomb == "tarball":
        size = A.write_tarball(one, attacker, A.bomb_chunks(A.original_tar(one)))
        assert size < 1 << 20, f"the bomb is {size} bytes"
    else:
        A.huge_sidecar(one, attacker)
    atk.begin()

    with A.RssSampler([attacker.uid]) as rss:
        jid = atk.submit(attacker, "", [one.name])
        atk.started_within_budget(jid)
    info, out = atk.finish(jid)
    atk.verify()
    assert rss.samples > 0, "the sampler never saw the prolog's Python"
    assert rss.peak < A.MAX_PROLOG_RSS, f"prolog RSS peaked at {rss.peak >> 20} MB " \
                                        f"({rss.peak_what})"
    assert info["JobState"] == "COMPLETED", out
    A.one_line(out, one.name)
    if bomb == "tarball":
        unstaged(out, one.name)


def test_symlink_chain_and_hard_link_out_of_the_copy(atk, people, envs):
    """``s1 -> .``, ``s2 -> s1/..``, ``s3 -> s2/..`` ... each harmless as
    text, together ``/``; then a hard link and a symlink through the chain
    to a file outside.  The archive is refused; nothing outside is linked."""
    attacker = people.attacker
    one = envs["one"]
    A.ATTACK_BASE.mkdir(parents=True, exist_ok=True)
    outside = A.write_as(A.ATTACK_BASE / f"outside-{attacker.name}", "outside\n", attacker)
    A.write_tarball(one, attacker, [A.body_of(A.original_tar(one)), A.chain_members(outside),
                                    A.EOF_BLOCKS])
    atk.begin(extra=[A.Place(outside)])

    jid = atk.submit(attacker, f'echo "cs_nlink=$(stat -c %h {outside})"\n', [one.name])
    atk.started_within_budget(jid)
    info, out = atk.finish(jid)
    atk.verify()
    assert A.job_values(out)["cs_nlink"] == "1", f"{outside} was hard-linked during the job"
    assert info["JobState"] == "COMPLETED", out
    A.one_line(out, one.name)
    unstaged(out, one.name)


def test_truncated_tarballs_never_stage(atk, people, envs):
    """One tarball is a complete zstd frame of a tar cut exactly at a member
    header (no end-of-archive marker), the other a zstd frame cut short.
    Neither stages (as an empty or partial environment)."""
    attacker = people.attacker
    one, two = envs["one"], envs["two"]
    A.write_tarball(one, attacker, [A.truncated_at_header(A.original_tar(one))])
    A.write_tarball(two, attacker, raw=A.truncated_frame(A.original_tar(two)))
    atk.begin()

    jid = atk.submit(attacker, "", [one.name, two.name])
    atk.started_within_budget(jid)
    info, out = atk.finish(jid)
    atk.verify()
    assert info["JobState"] == "COMPLETED", out
    for env in (one, two):
        A.one_line(out, env.name)
        unstaged(out, env.name)


def test_one_malformed_sidecar_record_fails_only_its_env(atk, people, envs, conda_site):
    """Env A's sidecar has one malformed prefix record; env B (re-crafted
    the way every hostile tarball here is, with its original content -- the
    control that crafting leaves a usable tarball) is fine.  B is staged, A
    gets one line."""
    attacker = people.attacker
    one, two = envs["one"], envs["two"]
    A.recraft_benign(two, attacker)
    A.edit_sidecar(one, attacker, records=[["lib/cs-attack", None, "binary"]])
    atk.begin()

    jid = atk.submit(attacker, A.activate_lines(conda_site.init_file, [two.name]),
                     [one.name, two.name])
    atk.started_within_budget(jid)
    info, out = atk.finish(jid)
    atk.verify()
    assert info["JobState"] == "COMPLETED", out
    A.one_line(out, two.name)
    staged_copy(out, two.name)
    A.one_line(out, one.name)
    unstaged(out, one.name)


# ----------------------------------------------------------------- injection
FORGED = "1999-01-01T00:00:00 node conda-stage[1] INFO: slurm job 1 (root): cs-attack forged"


def test_newline_in_condarc_forges_no_log_or_output_line(atk, people, envs):
    """~/.condarc's envs_dirs holds a path with a newline followed by a
    fake log line; the job asks for an environment that does not exist (so
    the searched folders are reported).  No line of the hooks' log or of the
    job's output starts with the forged text."""
    attacker = people.attacker
    one = envs["one"]
    condarc = attacker.home / ".condarc"
    A.write_as(condarc, json.dumps({"envs_dirs": [f"/nonexistent-cs\n{FORGED}",
                                                  "~/.conda/envs"]}), attacker)
    atk.cleanups.append(lambda: condarc.unlink(missing_ok=True))
    mark = A.size_of(HOOK_LOG)
    atk.begin()

    jid = atk.submit(attacker, "", ["as-none", one.name])
    atk.started_within_budget(jid)
    info, out = atk.finish(jid)
    atk.verify()
    forged = [line for line in A.hook_log_lines(HOOK_LOG, mark) if line.startswith(FORGED[:19])]
    assert forged == [], f"forged line in {HOOK_LOG}: {forged}"
    assert not [line for line in out.splitlines() if line.startswith(FORGED[:19])], out
    assert info["JobState"] == "COMPLETED", out
    A.one_line(out, "as-none")


# ----------------------------------------------------------------- resources
@pytest.mark.parametrize("short", ["bytes", "inodes"])
def test_staging_filesystem_too_small(short, atk, people, envs):
    """The staging base is a tmpfs too small for the environment, in bytes
    or in inodes, and the sidecar claims it unpacks to 0 bytes.  One line,
    nothing left on the filesystem."""
    attacker = people.attacker
    one = envs["one"]
    chunks = (A.filler_chunks(A.original_tar(one), big=48 << 20) if short == "bytes"
              else A.filler_chunks(A.original_tar(one), files=2000))
    A.write_tarball(one, attacker, chunks, sidecar={"unpacked_bytes": 0})
    mount = Path("/mnt") / f"cs-attack-{short}"
    opts = {"size": "16m"} if short == "bytes" else {"size": "64m", "nr_inodes": 300}
    with A.small_tmpfs(mount, **opts):
        atk.setting(staging_dir=mount)
        atk.begin(staging=mount)
        jid = atk.submit(attacker, "", [one.name])
        atk.started_within_budget(jid)
        info, out = atk.finish(jid)
        atk.verify(staging=mount)
        assert info["JobState"] == "COMPLETED", out
        A.one_line(out, one.name)
        unstaged(out, one.name)
        atk.close()   # settings back before the filesystem goes


def test_hostile_tarball_with_on_error_hold_holds_the_job(atk, people, envs):
    """The admin chose CONDA_STAGE_ON_ERROR=hold: a truncated tarball holds
    the job (no drain, nothing left, nothing outside touched)."""
    attacker = people.attacker
    one = envs["one"]
    A.write_tarball(one, attacker, [A.truncated_at_header(A.original_tar(one))])
    atk.setting(on_error="hold")
    atk.begin()

    jid = atk.submit(attacker, "", [one.name])
    limit = BUDGET + A.SLACK

    def held():
        info = atk.cluster.job_info(jid)
        return "held" in info.get("Reason", "").lower() or info.get("Reason") == "JobHeldAdmin"
    assert A.sleep_until(held, limit), f"job {jid} not held: {atk.cluster.job_info(jid)}"
    state = atk.cluster.node_state()
    assert "drain" not in state, atk.cluster.node_reason()
    atk.cluster.cancel(jid)
    atk.cluster.wait(jid)
    atk.verify()
