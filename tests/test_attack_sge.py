"""Adversarial tests on a real Son of Grid Engine 8.1.9 (issue 8).

SGE hands the job owner's ``qsub -v``/``-V`` variables to ``root@``
prologs and epilogs (execd filters only ``LD_*`` names), so here the job
owner (``csmallory``) attacks root directly: variables that used to name
the settings file, the Python, the log file, the spool folder or PATH; a
newline smuggled into the spool ``environment`` file; and the same hostile
files as on Slurm (FIFOs, a lock held forever, hostile archives, a staging
filesystem too small).  ``csvictim`` is another user whose files must stay
safe.  Each variable attack runs twice: with the shipped JSV (which may
drop such variables itself) and without it (``CONDA_STAGE_SGE_READ_QSTAT``),
where only the hooks stand between the variables and root.

After every job: no proof that root (or the victim) ran the attacker's
code; /etc, /root's entries, both homes, the test base and /tmp's entries
as before; the prolog returned within its budget; one clear
``conda-stage:`` line per environment; the job left the queue (never Eqw
unless the site says hold); the queue has no error state; nothing staged is
left in any TMPDIR.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.harness.attack")

from tests.harness import attack as A  # noqa: E402
from tests.harness.sitecfg import hook_python, site_defaults  # noqa: E402
from tests.harness.users import TEST_BASE, run_as  # noqa: E402

pytestmark = [pytest.mark.sge, pytest.mark.conda]

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 20
HOOK_LOG = TEST_BASE / "attack-sge-hooks.log"
JOB_TMP = Path("/tmp/JOB.TASK.all.q")   # stands for the jobs' TMPDIRs (the staging area)
DEFAULT_PYTHON = "/opt/conda-stage/bin/python"   # what the hooks run when the site names none


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def people():
    return A.cast()


@pytest.fixture(scope="module")
def envs(conda_site, stage_bin, people):
    with A.attack_envs(conda_site, stage_bin, people, "ag") as made:
        yield made


@pytest.fixture(scope="module")
def cluster(sge_cluster, envs, conda_site):
    hooks = {name: sge_cluster.install_file(ROOT / sub / name)
             for sub, name in (("prolog", "sge-prolog"), ("epilog", "sge-epilog"))}
    HOOK_LOG.unlink(missing_ok=True)
    HOOK_LOG.touch()
    with site_defaults(log_file=HOOK_LOG, syslog="no", conda_root=conda_site.root_prefix,
                       prolog_budget=BUDGET) as defaults:
        sge_cluster.defaults = defaults
        sge_cluster.attack_hooks = hooks
        yield sge_cluster


class SgeAttack:
    """One attack: setup helpers, job submission and timing, the effect checks."""

    def __init__(self, cluster, people, envs, site):
        self.cluster, self.people, self.envs, self.site = cluster, people, envs, site
        self.proof = A.Proof()
        self.cleanups: list = []
        self.jobs: list[str] = []
        self.submitted: dict[str, float] = {}
        self.outputs: dict[str, Path] = {}
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

    def request_via(self, via: str, names) -> None:
        """``jsv``: the shipped JSV moves ``-l conda_env`` into the job's
        environment.  ``qstat``: no JSV, the complex is attached to the
        queue, the prolog reads the request with qstat."""
        if via == "jsv":
            return
        value = ":".join(names)
        self.cluster.configure(jsv=None)
        self.cluster.qconf("-mattr", "queue", "complex_values", f"conda_env={value}", "all.q")
        self.cleanups.append(lambda: self.cluster.qconf("-rattr", "queue", "complex_values",
                                                        "NONE", "all.q"))
        self.setting(sge_read_qstat="yes")

    def begin(self, *, extra=(), volatile=()) -> None:
        self.watch = A.sensitive_places(self.people, JOB_TMP, extra=extra,
                                        volatile=[HOOK_LOG, *volatile])
        self.before = self.watch.take()

    # -------------------------------------------------------- jobs
    def submit(self, user, body: str = "", names=(), *args: str, env=None) -> str:
        """qsub as ``user`` (``env``: extra variables of the submitting
        shell, for -V); output to a file of our own."""
        wd = self.cluster.work_dir(user)
        tag = uuid.uuid4().hex[:8]
        script = wd / f"attack-{tag}.sh"
        A.write_as(script, "#!/bin/bash\n#$ -S /bin/bash\n" + A.JOB_HEAD +
                   'echo "cs_tmpdir=$TMPDIR"\n' + body + A.JOB_TAIL, user, 0o755)
        out = wd / f"attack-{tag}.out"
        request = ["-l", f"conda_env={':'.join(names)}"] if names else []
        argv = ["qsub", "-terse", "-j", "y", "-o", str(out), *request, *args, str(script)]
        t0 = time.time()
        cp = run_as(user, argv, cwd=str(wd), timeout=60,
                    env={"PATH": "/usr/local/bin:/usr/bin:/bin", **(env or {})})
        m = re.match(r"^(\d+)\s*$", cp.stdout)
        assert cp.returncode == 0 and m, f"qsub failed: {cp.stdout} {cp.stderr}"
        jid = m.group(1)
        self.jobs.append(jid)
        self.submitted[jid] = t0
        self.outputs[jid] = out
        return jid

    def output(self, jid: str) -> str:
        try:
            return self.outputs[jid].read_text(errors="replace")
        except OSError:
            return ""

    def started_within_budget(self, jid: str) -> float:
        t0 = self.submitted[jid]
        limit = BUDGET + A.SLACK
        A.sleep_until(lambda: "cs_start=" in self.output(jid), limit + 10)
        start = A.job_values(self.output(jid)).get("cs_start")
        assert start is not None, (
            f"job {jid} had not started {limit + 10:.0f} s after submission (prolog budget "
            f"{BUDGET} s): state {self.cluster.job_state(jid)}; queue "
            f"{self.cluster.queue_state()!r}\n{self.output(jid)}")
        elapsed = float(start) - t0
        assert elapsed <= limit, f"job {jid} started {elapsed:.1f} s after submission " \
                                 f"(budget {BUDGET} s + {A.SLACK} s)"
        return elapsed

    def finish(self, jid: str, timeout: float = 90) -> str:
        """Wait until the job left the queue (epilog done); never Eqw."""
        def gone():
            state = self.cluster.job_state(jid)
            assert state is None or "E" not in state, \
                f"job {jid} in {state}:\n{self.cluster.qstat_j(jid)}"
            return state is None
        assert A.sleep_until(gone, timeout, 0.5), f"job {jid} still queued after {timeout} s"
        return self.output(jid)

    # -------------------------------------------------------- effects
    def verify(self, *, tmp_root: Path = Path("/tmp")) -> None:
        root_ran = self.proof.ran_as(0)
        assert not root_ran, f"root ran the attacker's code: {root_ran}"
        victim_ran = self.proof.ran_as(self.people.victim.uid)
        assert not victim_ran, f"the victim ran the attacker's code: {victim_ran}"
        changes = self.watch.changes(self.before)
        assert not changes, "outside the staging area:\n" + "\n".join(changes[:40])
        state = self.cluster.queue_state()
        assert state == "", f"queue instance state {state!r}"
        left = [str(p) for p in tmp_root.glob("*.all.q") if (p / "conda-stage").exists()]
        assert left == [], f"staged copies left: {left}"

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
        left = [j for j in self.jobs if self.cluster.job_state(j) is not None]
        if left:
            self.cluster.run(["qdel", "-f", *left], check=False)
            A.sleep_until(lambda: all(self.cluster.job_state(j) is None for j in left), 60)
        for saved in self.saved.values():
            A.restore_env_files(saved)
        if errors:
            raise errors[0]


@pytest.fixture
def atk(cluster, sge, people, envs, conda_site):
    hooks = cluster.attack_hooks
    cluster.configure(prolog=f"root@{hooks['sge-prolog']}", epilog=f"root@{hooks['sge-epilog']}")
    attack = SgeAttack(cluster, people, envs, conda_site)
    attack.proof.reset()
    yield attack
    attack.close()


def unstaged(out: str, name: str) -> None:
    copies = A.job_values(out).get("cs_copies", "").split()
    assert name not in copies, f"{name} was staged: {copies}\n{out}"


def staged_in_tmpdir(out: str, name: str) -> None:
    """The prolog staged NAME into the job's TMPDIR and pointed the job's
    conda at it."""
    vals = A.job_values(out)
    env = A.job_env(out)
    assert name in vals.get("cs_copies", "").split(), f"{name} not staged:\n{out}"
    first = env.get("CONDA_ENVS_PATH", "").split(":")[0]
    assert first == f"{vals['cs_tmpdir']}/conda-stage/envs", env.get("CONDA_ENVS_PATH")


def staged_copy(out: str, name: str) -> str:
    """``conda activate NAME`` in the job gave the prolog's copy in TMPDIR."""
    vals = A.job_values(out)
    prefix = vals.get(f"cs_prefix:{name}", "")
    assert prefix == f"{vals['cs_tmpdir']}/conda-stage/envs/{name}", f"{name} not staged:\n{out}"
    return prefix


# ----------------------------------------------------------------- job variables
VARIABLE_ATTACKS = ["defaults", "python", "log_file", "path", "bash_env", "bash_funcs"]


@pytest.mark.parametrize("via", ["jsv", "qstat"])
@pytest.mark.parametrize("attack", VARIABLE_ATTACKS)
def test_job_variables_never_steer_root_hooks(attack, via, atk, people, envs):
    """``qsub -v`` with
    ``defaults``: CONDA_STAGE_DEFAULTS=<a file of the attacker's> naming an
    evil Python and log file, with a command line that runs if sourced;
    ``python``: CONDA_STAGE_PYTHON=<evil> (the site file relies on the
    default Python); ``log_file``: CONDA_STAGE_LOG_FILE=/etc/cs-evil (the
    site file names no log file); ``path``: PATH with evil qstat, scontrol,
    python, id, find, ...; ``bash_env``: BASH_ENV and ENV (this SGE drops
    BASH_ENV for root hooks itself); ``bash_funcs``: exported bash functions
    ``[``, ``id``, ``find`` (``BASH_FUNC_x%%``, which SGE passes to root
    hooks and a plain ``#!/bin/bash`` imports).  Root runs none of it,
    creates no file, and the job is staged as the site file says."""
    attacker = people.attacker
    one = envs["one"]
    kit = A.user_dir(attacker.home / "cs-attack-kit", attacker)
    evil_python = A.evil_script(kit / "python", "python", attacker, atk.proof)
    evil_log = Path("/etc/cs-evil")
    for p in (evil_log, Path(f"{evil_log}-defaults")):
        p.unlink(missing_ok=True)
        atk.cleanups.append(lambda p=p: p.unlink(missing_ok=True))
    if attack == "defaults":
        defaults = A.write_as(kit / "defaults", "\n".join([
            f"CONDA_STAGE_PYTHON={evil_python}",
            f"CONDA_STAGE_LOG_FILE={evil_log}-defaults",
            f"CONDA_STAGE_STAGING_DIR={kit}",
            f"CONDA_STAGE_STATE_DIR={kit}",
            atk.proof.cmd("defaults"),
        ]) + "\n", attacker)
        variables = {"CONDA_STAGE_DEFAULTS": defaults}
    elif attack == "python":
        if hook_python() == DEFAULT_PYTHON:
            atk.setting(python=None)   # as a site that keeps the default
        variables = {"CONDA_STAGE_PYTHON": evil_python}
    elif attack == "log_file":
        atk.setting(log_file=None)     # syslog only: the variable would name the file
        variables = {"CONDA_STAGE_LOG_FILE": evil_log}
    elif attack == "path":
        tools = A.evil_tool_dir(kit / "bin", attacker, atk.proof)
        variables = {"PATH": f"{tools}:/usr/local/bin:/usr/bin:/bin"}
    elif attack == "bash_env":
        script = A.evil_script(kit / "bash_env", "bash_env", attacker, atk.proof, sourced=True)
        variables = {"BASH_ENV": script, "ENV": script}
    else:
        variables = {
            "BASH_FUNC_[%%": f'() {{ {atk.proof.cmd("func_bracket")}; builtin [ "$@"; }}',
            "BASH_FUNC_id%%": f'() {{ {atk.proof.cmd("func_id")}; /usr/bin/id "$@"; }}',
            "BASH_FUNC_find%%": f'() {{ {atk.proof.cmd("func_find")}; /usr/bin/find "$@"; }}',
        }
    atk.request_via(via, [one.name])
    atk.begin()

    args = [a for k, v in variables.items() for a in ("-v", f"{k}={v}")]   # one each: quotes
    jid = atk.submit(attacker, "", [one.name], *args)
    atk.started_within_budget(jid)
    out = atk.finish(jid)
    atk.verify()
    assert not evil_log.exists() and not Path(f"{evil_log}-defaults").exists()
    assert "python" not in atk.proof.tags(), "the evil Python ran"
    A.one_line(out, one.name)
    staged_in_tmpdir(out, one.name)   # the real hooks ran, with the site's settings


@pytest.mark.parametrize("via", ["jsv", "qstat"])
def test_forged_spool_dir_and_job_id(via, atk, people, envs, conda_site):
    """``-v SGE_JOB_SPOOL_DIR=<fake>,JOB_ID=999999,...``: the fake spool
    folder's config says the job belongs to the victim (with a TMPDIR of
    the attacker's); the request names the attacker's env and the victim's.
    The hooks act for the real job and owner only: the attacker's env is
    staged into the real TMPDIR, the victim's is not found, nothing in the
    fake folders is touched."""
    attacker, victim = people.attacker, people.victim
    one, vic = envs["one"], envs["vic"]
    fake = A.user_dir(attacker.home / "cs-attack-spool", attacker, 0o755)
    fake_tmp = A.user_dir(attacker.home / "cs-attack-tmp", attacker, 0o1777)
    for folder in (fake, fake_tmp):
        atk.cleanups.append(lambda folder=folder: shutil.rmtree(folder, ignore_errors=True))
    A.write_as(fake / "config", "\n".join([
        f"job_owner={victim.name}", "job_id=999999", "ja_task_id=1", f"tmpdir={fake_tmp}",
        f"uid={victim.uid}", f"gid={victim.gid}", "queue=all.q",
    ]) + "\n", attacker)
    A.write_as(fake / "environment", f"PATH=/usr/bin:/bin\nUSER={victim.name}\n", attacker)
    names = [one.name, vic.name]
    atk.request_via(via, names)
    mark = A.size_of(HOOK_LOG)
    atk.begin(extra=[A.Place(fake), A.Place(fake_tmp)])

    forged = {"SGE_JOB_SPOOL_DIR": fake, "JOB_ID": "999999", "SGE_TASK_ID": "1",
              "USER": victim.name, "LOGNAME": victim.name, "TMPDIR": fake_tmp, "TMP": fake_tmp}
    jid = atk.submit(attacker, A.activate_lines(conda_site.init_file, [one.name]), names,
                     "-v", ",".join(f"{k}={v}" for k, v in forged.items()))
    atk.started_within_budget(jid)
    out = atk.finish(jid)
    atk.verify()
    log = "\n".join(A.hook_log_lines(HOOK_LOG, mark))
    assert "999999" not in log and f"({victim.name})" not in log, log
    assert re.search(rf"job {jid}\S* \({attacker.name}\)", log), log
    A.one_line(out, one.name)
    staged_copy(out, one.name)
    A.one_line(out, vic.name)
    unstaged(out, vic.name)


@pytest.mark.parametrize("how", ["-v", "-V"])
def test_newline_in_a_variable_reaches_no_environment_file(how, atk, people, envs):
    """CONDA_ENVS_PATH (which the prolog extends and writes into the spool
    ``environment`` file as root) holds "\\nLD_PRELOAD=<evil.so>": no line
    of the attacker's reaches that file -- not the job, not the root
    epilog that the shepherd starts with it."""
    attacker = people.attacker
    one = envs["one"]
    so = A.evil_so(atk.proof)
    value = f"/nonexistent-cs-attack\nLD_PRELOAD={so}\nCS_ATTACK_INJECTED=1"
    atk.begin()

    if how == "-v":
        jid = atk.submit(attacker, "", [one.name], "-v", f"CONDA_ENVS_PATH={value}")
    else:
        jid = atk.submit(attacker, "", [one.name], "-V", env={"CONDA_ENVS_PATH": value})
    atk.started_within_budget(jid)
    out = atk.finish(jid)
    atk.verify()
    env = A.job_env(out)
    assert "LD_PRELOAD" not in env and "CS_ATTACK_INJECTED" not in env, A.attacker_vars(env)
    assert "ldpreload" not in atk.proof.tags(), atk.proof.records()
    A.one_line(out, one.name)


DECOY = TEST_BASE / "attack-sge-decoy"


def test_job_tampering_with_its_own_copies(atk, people, envs):
    """During its job the attacker replaces its staged copy by a symlink to
    a folder of root's and adds symlinks to the victim's home and /etc, a
    FIFO and a read-only tree; the root epilog follows none of it."""
    attacker, victim = people.attacker, people.victim
    one = envs["one"]
    if DECOY.exists():
        shutil.rmtree(DECOY)
    (DECOY / "sub").mkdir(parents=True)
    (DECOY / "sub" / "precious").write_text("root's\n")
    atk.cleanups.append(lambda: shutil.rmtree(DECOY, ignore_errors=True))
    body = f"""d="$TMPDIR/conda-stage"
chmod u+w "$d" "$d/envs" 2>/dev/null; chmod -R u+w "$d/envs/{one.name}"
mv "$d/envs/{one.name}" "$d/moved" && ln -s {DECOY} "$d/envs/{one.name}" && echo cs_swapped=1
ln -s {victim.home} "$d/envs/home"; ln -s /etc "$d/etc"; ln -s {DECOY}/sub "$d/sub"
mkfifo "$d/fifo"; mkdir -p "$d/ro/a/b" && touch "$d/ro/a/b/f" && chmod -R a-w "$d/ro"
(cd "$d/moved" && setsid sleep 300 >/dev/null 2>&1 &)
"""
    atk.begin(extra=[A.Place(DECOY)])

    jid = atk.submit(attacker, body, [one.name])
    atk.started_within_budget(jid)
    out = atk.finish(jid)
    atk.verify()
    assert A.job_values(out).get("cs_swapped") == "1", f"the job could not tamper:\n{out}"


# ----------------------------------------------------------------- blocking
@pytest.mark.parametrize("where", ["condarc", "lock", "tarball"])
def test_fifo_instead_of_a_user_file_blocks_nothing(where, atk, people, envs):
    """A FIFO at ~/.condarc, at the lock file or at the tarball (sidecar made
    to match): the root prolog returns within its budget, the queue stays
    usable."""
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
    out = atk.finish(jid)
    atk.verify()
    A.one_line(out, one.name)
    if where == "tarball":
        unstaged(out, one.name)


def test_lock_held_forever_costs_one_budget_and_only_its_env(atk, people, envs, conda_site):
    attacker = people.attacker
    one, two = envs["one"], envs["two"]
    holder = A.LockHolder(attacker, A.lock_path(one)).start()
    atk.cleanups.append(holder.stop)
    atk.begin()

    jid = atk.submit(attacker, A.activate_lines(conda_site.init_file, [two.name]),
                     [two.name, one.name])
    atk.started_within_budget(jid)
    out = atk.finish(jid)
    atk.verify()
    A.one_line(out, one.name)
    unstaged(out, one.name)
    A.one_line(out, two.name)
    staged_copy(out, two.name)


# ----------------------------------------------------------------- hostile archives
@pytest.mark.parametrize("bomb", ["tarball", "sidecar"])
def test_memory_bomb(bomb, atk, people, envs):
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
    out = atk.finish(jid)
    atk.verify()
    assert rss.samples > 0, "the sampler never saw the prolog's Python"
    assert rss.peak < A.MAX_PROLOG_RSS, f"prolog RSS peaked at {rss.peak >> 20} MB " \
                                        f"({rss.peak_what})"
    A.one_line(out, one.name)
    if bomb == "tarball":
        unstaged(out, one.name)


def test_symlink_chain_and_hard_link_out_of_the_copy(atk, people, envs):
    attacker = people.attacker
    one = envs["one"]
    A.ATTACK_BASE.mkdir(parents=True, exist_ok=True)
    outside = A.write_as(A.ATTACK_BASE / f"outside-{attacker.name}", "outside\n", attacker)
    A.write_tarball(one, attacker, [A.body_of(A.original_tar(one)), A.chain_members(outside),
                                    A.EOF_BLOCKS])
    atk.begin(extra=[A.Place(outside)])

    jid = atk.submit(attacker, f'echo "cs_nlink=$(stat -c %h {outside})"\n', [one.name])
    atk.started_within_budget(jid)
    out = atk.finish(jid)
    atk.verify()
    assert A.job_values(out)["cs_nlink"] == "1", f"{outside} was hard-linked during the job"
    A.one_line(out, one.name)
    unstaged(out, one.name)


def test_truncated_tarballs_never_stage(atk, people, envs):
    attacker = people.attacker
    one, two = envs["one"], envs["two"]
    A.write_tarball(one, attacker, [A.truncated_at_header(A.original_tar(one))])
    A.write_tarball(two, attacker, raw=A.truncated_frame(A.original_tar(two)))
    atk.begin()

    jid = atk.submit(attacker, "", [one.name, two.name])
    atk.started_within_budget(jid)
    out = atk.finish(jid)
    atk.verify()
    for env in (one, two):
        A.one_line(out, env.name)
        unstaged(out, env.name)


def test_one_malformed_sidecar_record_fails_only_its_env(atk, people, envs, conda_site):
    attacker = people.attacker
    one, two = envs["one"], envs["two"]
    A.recraft_benign(two, attacker)   # the control: crafting leaves a usable tarball
    A.edit_sidecar(one, attacker, records=[["lib/cs-attack", None, "binary"]])
    atk.begin()

    jid = atk.submit(attacker, A.activate_lines(conda_site.init_file, [two.name]),
                     [one.name, two.name])
    atk.started_within_budget(jid)
    out = atk.finish(jid)
    atk.verify()
    A.one_line(out, two.name)
    staged_copy(out, two.name)
    A.one_line(out, one.name)
    unstaged(out, one.name)


# ----------------------------------------------------------------- injection
FORGED = "1999-01-01T00:00:00 node conda-stage[1] INFO: sge job 1 (root): cs-attack forged"


def test_newline_in_condarc_forges_no_log_or_output_line(atk, people, envs):
    attacker = people.attacker
    one = envs["one"]
    condarc = attacker.home / ".condarc"
    A.write_as(condarc, json.dumps({"envs_dirs": [f"/nonexistent-cs\n{FORGED}",
                                                  "~/.conda/envs"]}), attacker)
    atk.cleanups.append(lambda: condarc.unlink(missing_ok=True))
    mark = A.size_of(HOOK_LOG)
    atk.begin()

    jid = atk.submit(attacker, "", ["ag-none", one.name])
    atk.started_within_budget(jid)
    out = atk.finish(jid)
    atk.verify()
    forged = [line for line in A.hook_log_lines(HOOK_LOG, mark) if line.startswith(FORGED[:19])]
    assert forged == [], f"forged line in {HOOK_LOG}: {forged}"
    assert not [line for line in out.splitlines() if line.startswith(FORGED[:19])], out
    A.one_line(out, "ag-none")


# ----------------------------------------------------------------- resources
@contextlib.contextmanager
def queue_tmpdir(cluster, path: Path):
    cluster.qconf("-mattr", "queue", "tmpdir", str(path), "all.q")
    try:
        yield
    finally:
        cluster.qconf("-mattr", "queue", "tmpdir", "/tmp", "all.q")


@pytest.mark.parametrize("short", ["bytes", "inodes"])
def test_staging_filesystem_too_small(short, atk, people, envs):
    """The queue's tmpdir (where SGE makes each job's TMPDIR, the staging
    area) is a tmpfs too small in bytes or inodes; the sidecar claims 0
    unpacked bytes.  One line, nothing left."""
    attacker = people.attacker
    one = envs["one"]
    chunks = (A.filler_chunks(A.original_tar(one), big=48 << 20) if short == "bytes"
              else A.filler_chunks(A.original_tar(one), files=2000))
    A.write_tarball(one, attacker, chunks, sidecar={"unpacked_bytes": 0})
    mount = Path("/mnt") / f"cs-attack-sge-{short}"
    opts = {"size": "16m"} if short == "bytes" else {"size": "64m", "nr_inodes": 300}
    with A.small_tmpfs(mount, **opts), queue_tmpdir(atk.cluster, mount):
        atk.begin()
        jid = atk.submit(attacker, "", [one.name])
        atk.started_within_budget(jid)
        out = atk.finish(jid)
        atk.verify(tmp_root=mount)
        assert A.listing(mount) == [], A.listing(mount)
        A.one_line(out, one.name)
        unstaged(out, one.name)
        atk.close()


def test_hostile_tarball_with_on_error_hold_holds_the_job(atk, people, envs):
    """CONDA_STAGE_ON_ERROR=hold: a truncated tarball puts the job (not the
    queue) in error state."""
    attacker = people.attacker
    one = envs["one"]
    A.write_tarball(one, attacker, [A.truncated_at_header(A.original_tar(one))])
    atk.setting(on_error="hold")
    atk.begin()

    jid = atk.submit(attacker, "", [one.name])
    atk.cluster.wait_state(jid, "Eqw", timeout=BUDGET + A.SLACK)
    assert atk.cluster.queue_state() == ""
    atk.cluster.delete(jid)
    atk.cluster.wait(jid)
    atk.verify()
    A.one_line(atk.output(jid), one.name)
