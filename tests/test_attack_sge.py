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
left: the root@ prolog stages into the node store (``<staging_dir>/users/
<uid>/<id>/<name>``, a job folder ``<staging_dir>/<job>[.<task>]``, records
in the state folder; unused copies kept 0 s here), so no job folder, copy,
record, lock or manifest is left there, and no ``conda-stage`` folder in any
job's TMPDIR.  The node store's own attacks (tampering with the attacker's
``users/<uid>``, the victim's copy by name, the root-only state folder) run
here as on Slurm.
"""
from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.harness.attack")

from tests.harness import attack as A  # noqa: E402
from tests.harness.sitecfg import hook_python  # noqa: E402
from tests.harness.users import TEST_BASE, run_as  # noqa: E402

pytestmark = [pytest.mark.sge, pytest.mark.conda]

ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "ag"
HOOK_LOG = TEST_BASE / "attack-sge-hooks.log"
STAGING, STATE = A.product_dirs()   # the product's defaults (the tests do not override them)
DEFAULT_PYTHON = "/opt/conda-stage/bin/python"   # what the hooks run when the site names none


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def people():
    return A.cast()


@pytest.fixture(scope="module")
def envs(conda_site, stage_bin, people):
    with A.attack_envs(conda_site, stage_bin, people, ENV_PREFIX) as made:
        yield made


@pytest.fixture(scope="module")
def cluster(sge_cluster, envs, conda_site):
    hooks = {name: sge_cluster.install_file(ROOT / sub / name)
             for sub, name in (("prolog", "sge-prolog"), ("epilog", "sge-epilog"))}
    with A.hook_site(conda_site, HOOK_LOG) as defaults:
        sge_cluster.defaults = defaults
        sge_cluster.attack_hooks = hooks
        yield sge_cluster


class SgeAttack(A.Attack):
    """An attack on the SGE hooks: jobs by qsub as the user (environments
    in ``-l conda_env``, output to a file of our own), never Eqw, a queue
    without error state, nothing left in the node store, the state folder
    or the jobs' TMPDIRs."""

    kind = "sge"
    directives = "#$ -S /bin/bash\n"
    prelude = 'echo "cs_tmpdir=$TMPDIR"\n'

    def __init__(self, cluster, people, envs, site):
        super().__init__(cluster, people, envs, site, hook_log=HOOK_LOG, staging=STAGING,
                         state=STATE)
        self.outputs: dict[str, Path] = {}

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

    def _send(self, user, script, names, args, env=None):
        """qsub as ``user`` (``env``: extra variables of the submitting
        shell, for -V); output to a file of our own."""
        wd = self.cluster.work_dir(user)
        tag = uuid.uuid4().hex[:8]
        path = A.write_as(wd / f"attack-{tag}.sh", script, user, 0o755)
        out = wd / f"attack-{tag}.out"
        request = ["-l", f"conda_env={':'.join(names)}"] if names else []
        argv = ["qsub", "-terse", "-j", "y", "-o", str(out), *request, *args, str(path)]
        t0 = time.time()
        cp = run_as(user, argv, cwd=str(wd), timeout=60,
                    env={"PATH": "/usr/local/bin:/usr/bin:/bin", **(env or {})})
        m = re.match(r"^(\d+)\s*$", cp.stdout)
        assert cp.returncode == 0 and m, f"qsub failed: {cp.stdout} {cp.stderr}"
        jid = m.group(1)
        self.outputs[jid] = out
        return jid, t0

    def output(self, jid: str) -> str:
        try:
            return self.outputs[jid].read_text(errors="replace")
        except OSError:
            return ""

    def describe(self, jid: str) -> str:
        return (f"state {self.cluster.job_state(jid)}; queue "
                f"{self.cluster.queue_state()!r}\n{self.output(jid)}")

    def finish(self, jid: str, timeout: float = 90) -> str:
        """Wait until the job left the queue (epilog done); never Eqw."""
        def gone():
            state = self.cluster.job_state(jid)
            assert state is None or "E" not in state, \
                f"job {jid} in {state}:\n{self.cluster.qstat_j(jid)}"
            return state is None
        assert A.sleep_until(gone, timeout, 0.5), f"job {jid} still queued after {timeout} s"
        return self.output(jid)

    def completed(self, jid: str) -> None:
        """(:meth:`finish` saw the job leave the queue, never in error.)"""

    def healthy(self) -> None:
        state = self.cluster.queue_state()
        assert state == "", f"queue instance state {state!r}"

    def env_args(self, variables):
        return ("-v", ",".join(f"{k}={v}" for k, v in variables.items())), {}

    def nothing_left(self) -> None:
        super().nothing_left()
        left = [str(p) for p in Path("/tmp").glob("*.all.q") if (p / "conda-stage").exists()]
        assert left == [], f"staged copies left in TMPDIRs: {left}"

    @contextlib.contextmanager
    def staging_on(self, mount: Path):
        """The site's staging folder (the node store) on ``mount``."""
        self.setting(staging_dir=mount)
        self.staging = mount
        yield

    def clear_jobs(self) -> None:
        left = [j for j in self.jobs if self.cluster.job_state(j) is not None]
        if left:
            self.cluster.run(["qdel", "-f", *left], check=False)
            A.sleep_until(lambda: all(self.cluster.job_state(j) is None for j in left), 60)


@pytest.fixture
def atk(cluster, sge, people, envs, conda_site):
    hooks = cluster.attack_hooks
    cluster.configure(prolog=f"root@{hooks['sge-prolog']}", epilog=f"root@{hooks['sge-epilog']}")
    with SgeAttack(cluster, people, envs, conda_site) as attack:
        yield attack


def staged_in_store(out: str, name: str) -> None:
    """The root prolog staged NAME into the job user's part of the node
    store (not into TMPDIR) and pointed the job's conda at it."""
    vals = A.job_values(out)
    env = A.job_env(out)
    assert name in vals.get("cs_copies", "").split(), f"{name} not staged:\n{out}"
    first = env.get("CONDA_ENVS_PATH", "").split(":")[0]
    assert re.fullmatch(A.copy_pattern(STAGING, int(vals["cs_uid"]), name), f"{first}/{name}"), \
        env.get("CONDA_ENVS_PATH")
    assert env.get("CONDA_STAGE_JOB_DIR") == f"{STAGING}/{vals['cs_key']}", env
    assert not os.path.lexists(f"{vals['cs_tmpdir']}/conda-stage"), out


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
    _jid, out = atk.run(attacker, "", [one.name], *args)
    atk.verify()
    assert not evil_log.exists() and not Path(f"{evil_log}-defaults").exists()
    assert "python" not in atk.proof.tags(), "the evil Python ran"
    A.one_line(out, one.name)
    staged_in_store(out, one.name)   # the real hooks ran, with the site's settings


@pytest.mark.parametrize("via", ["jsv", "qstat"])
def test_forged_spool_dir_and_job_id(via, atk, people, envs, conda_site):
    """``-v SGE_JOB_SPOOL_DIR=<fake>,JOB_ID=999999,...``: the fake spool
    folder's config says the job belongs to the victim (with a TMPDIR of
    the attacker's); the request names the attacker's env and the victim's.
    The hooks act for the real job and owner only: the attacker's env is
    staged into the attacker's part of the node store with the real job's
    folder (never ``999999``, never the victim's part, never the forged
    TMPDIR), the victim's is not found, nothing in the fake folders is
    touched."""
    attacker, victim = people.attacker, people.victim
    one, vic = envs["one"], envs["vic"]
    fake = A.user_dir(attacker.home / "cs-attack-spool", attacker, 0o755)
    fake_tmp = A.user_dir(attacker.home / "cs-attack-tmp", attacker, 0o1777)
    atk.remove_later(fake, fake_tmp)
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
    jid, out = atk.run(attacker, A.activate_lines(conda_site.init_file, [one.name]), names,
                       "-v", ",".join(f"{k}={v}" for k, v in forged.items()))
    atk.verify()
    log = "\n".join(A.hook_log_lines(HOOK_LOG, mark))
    assert "999999" not in log and f"({victim.name})" not in log, log
    assert re.search(rf"job {jid}\S* \({attacker.name}\)", log), log
    A.one_line(out, one.name)
    prefix = atk.staged_copy(out, one.name)
    assert prefix.startswith(f"{STAGING}/users/{attacker.uid}/"), prefix
    assert A.job_values(out)["cs_key"] == jid, out
    assert A.job_env(out).get("CONDA_STAGE_JOB_DIR") == f"{STAGING}/{jid}"
    A.one_line(out, vic.name)
    A.unstaged(out, vic.name)


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
        _jid, out = atk.run(attacker, "", [one.name], "-v", f"CONDA_ENVS_PATH={value}")
    else:
        _jid, out = atk.run(attacker, "", [one.name], "-V", env={"CONDA_ENVS_PATH": value})
    atk.verify()
    env = A.job_env(out)
    assert "LD_PRELOAD" not in env and "CS_ATTACK_INJECTED" not in env, A.attacker_vars(env)
    assert "ldpreload" not in atk.proof.tags(), atk.proof.records()
    A.one_line(out, one.name)


DECOY = TEST_BASE / "attack-sge-decoy"


def test_job_tampering_with_its_own_copies(atk):
    """During its job the attacker replaces its shared copy (in the node
    store) by a symlink to a folder of root's, moves the real one into its
    job folder's ``tmp``, and adds symlinks to the victim's home and /etc,
    FIFOs and a read-only tree; the root epilog follows none of it."""
    A.job_tampering(atk, DECOY)


# ----------------------------------------------------------------- the node store
@pytest.mark.parametrize("how", A.STORE_TAMPERING)
def test_store_tampering_removes_only_the_attackers_things(how, atk):
    """As on Slurm (see :func:`A.store_tampering`), with SGE's root@ epilog."""
    A.store_tampering(atk, how, DECOY)


def test_attacker_cannot_use_or_hold_the_victims_copy(atk):
    A.victims_copy_by_name(atk)


def test_state_folder_is_root_only(atk):
    A.state_dir_is_root_only(atk)


# ----------------------------------------------------------------- blocking
@pytest.mark.parametrize("where", A.FIFO_PLACES)
def test_fifo_instead_of_a_user_file_blocks_nothing(where, atk):
    """A FIFO at ~/.condarc, at the lock file or at the tarball (sidecar made
    to match): the root prolog returns within its budget, the queue stays
    usable."""
    A.fifo_instead_of_a_user_file(atk, where)


def test_lock_held_forever_costs_one_budget_and_only_its_env(atk):
    A.lock_held_forever(atk)


# ----------------------------------------------------------------- hostile archives
@pytest.mark.parametrize("bomb", A.BOMBS)
def test_memory_bomb(bomb, atk):
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
    """The site's staging folder (the node store of root@ prologs) is a
    tmpfs too small in bytes or inodes."""
    A.staging_filesystem_too_small(atk, short, Path("/mnt") / f"cs-attack-sge-{short}")


def test_hostile_tarball_with_on_error_hold_holds_the_job(atk):
    """CONDA_STAGE_ON_ERROR=hold: a truncated tarball puts the job (not the
    queue) in error state."""
    jid = A.submit_to_hold(atk)
    atk.cluster.wait_state(jid, "Eqw", timeout=A.BUDGET + A.SLACK)
    assert atk.cluster.queue_state() == ""
    atk.cluster.delete(jid)
    atk.cluster.wait(jid)
    atk.verify()
    A.one_line(atk.output(jid), atk.envs["one"].name)
