#!/usr/bin/env python3
"""conda-stage benchmarks on a simulated shared filesystem, side by side with the
original tool's path.  Not a test: it prints a table and writes JSON, Markdown and a PNG.

    sudo /opt/conda-stage/bin/python benchmarks/run.py [--quick] [--out benchmarks/results]

Run as root from the repository (FUSE mounts, a benchmark user, dropping page caches)
with a Python that has conda_stage, conda-pack, zstandard and mfusepy (the project's
install, /opt/conda-stage).  The first run builds the environments (~3 min, cached under
/var/tmp/conda-stage-bench).  A full run takes ~20 min, --quick ~8 min.  See
benchmarks/README.md for what each number means.

Phases (``--phases``; default all):
  startup  `jupyter --version` from the env on the slow FS / a staged copy / a native env
  strace   file-system calls during `conda activate` + the command: how many reach the slow FS
  pack     `conda-stage --pack --force` vs the floor `tar -cf - . | zstd -3 -T<cores>` vs
           conda-pack's default (tar.gz, 1 thread) and its best (-j <cores>; its tar.zst);
           local disk with warm and with cold page caches, and the shared FS
  stage    `conda-stage --stage` vs tar -xzf + conda-unpack + chmod vs plain `tar -x`; teardown
  hooks    prolog fast paths (no environment declared); a job's prolog staging and epilog
  cycle    the interactive cycle `conda activate ENV; conda deactivate` of an auto-staged env:
           conda-stage (extracting; and mounting the env's image, shell images on) vs the
           original Bash conda-stage (a checkout given with --original DIR, run from
           there: its code is not part of this project) vs plain conda
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import benchenv as be  # noqa: E402
from slowfs import fuse_unavailable_reason, mounted  # noqa: E402
from tests.harness.conda import CONDA_VERSION  # noqa: E402

BIN = Path(sys.prefix) / "bin"
CONDA_STAGE = BIN / "conda-stage"
CONDA_PACK = BIN / "conda-pack"
PHASES = ("startup", "strace", "pack", "stage", "hooks", "cycle")
ORIG_ENV = f"{be.ENV_NAME}-orig"  # the original tool's twin of the env under test
STAT_CALLS = {"stat", "lstat", "fstatat64", "newfstatat", "statx", "access", "faccessat",
              "faccessat2", "readlink", "readlinkat", "statfs"}
say = be.say


def median(xs):
    return statistics.median(xs) if xs else None


class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.lat = args.latency_ms
        self.lay, self.site, self.user = be.setup()
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.res: dict = {"goals": {}}
        lay = self.lay
        self.bin = lay.base / "bin"  # what a site module puts on PATH: conda-stage only
        self.bin.mkdir(exist_ok=True)
        link = self.bin / "conda-stage"
        if not link.is_symlink() or os.readlink(link) != str(CONDA_STAGE):
            if link.is_symlink():
                link.unlink()
            link.symlink_to(CONDA_STAGE)
        self.cp_dir = lay.mount / "cp"  # conda-pack tarball of the original tool's path
        self.cp_tarball = self.cp_dir / f"{be.ENV_NAME}.tar.gz"
        self.zst = lay.mount / "envs" / f"{be.ENV_NAME}.tar.zst"
        self.plain_tar = lay.work / f"{be.ENV_NAME}.tar"
        self.cores = len(os.sched_getaffinity(0))

    # ------------------------------------------------------------ plumbing
    def nocache(self, **kw):
        """slowfs defaults: no kernel caching, every request pays the latency."""
        return mounted(str(self.lay.store), str(self.lay.mount), meta_latency_ms=self.lat, **kw)

    def client_cache(self, latency=None, **kw):
        """A client that caches attributes, names and misses for 1 s (NFS/Lustre-like)."""
        return mounted(str(self.lay.store), str(self.lay.mount),
                       meta_latency_ms=self.lat if latency is None else latency,
                       attr_timeout=1, entry_timeout=1, negative_timeout=1, **kw)

    def user_env(self, extra=None) -> dict:
        env = {"TMPDIR": str(self.lay.scratch),
               "PATH": f"{self.bin}:{self.site.condabin}:/usr/local/bin:/usr/bin:/bin",
               "CONDA_ENVS_PATH": str(self.lay.mount / "envs")}
        env.update(extra or {})
        return env

    def sh(self, script: str, *, init=False, extra=None, check=True, timeout=3600, root=False):
        """Run a bash script as the benchmark user (or root), optionally with conda's init."""
        if init:
            script = f". {shlex.quote(str(self.site.init_file))}\n{script}"
        user = None if root else self.user
        res = self.site.run(user, ["/bin/bash", "-c", script], extra_env=self.user_env(extra),
                            timeout=timeout, cwd=str(self.lay.work))
        if check and res.returncode:
            raise RuntimeError(f"script failed ({res.returncode}):\n{script}\n--- stdout\n"
                               f"{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-3000:]}")
        return res

    def timed(self, cmd: str, *, init=False, extra=None, root=False, stderr=False, pre=""):
        """Wall time of ``cmd`` measured inside the user's shell (no runuser/env start-up;
        ``pre`` runs before the clock starts)."""
        script = (f'__s=$EPOCHREALTIME; {{ {cmd} ; }} >/dev/null 2>"$__err"; __rc=$?; '
                  f'__e=$EPOCHREALTIME; echo "@@ $__s $__e $__rc"; cat "$__err" >&2; rm -f "$__err"')
        script = '__err=$(mktemp)\n' + (pre + "\n" if pre else "") + script
        res = self.sh(script, init=init, extra=extra, check=False, root=root)
        m = re.search(r"^@@ (\S+) (\S+) (\d+)$", res.stdout, re.M)
        if not m or m.group(3) != "0":
            raise RuntimeError(f"{cmd} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
        t = float(m.group(2)) - float(m.group(1))
        return (t, res.stderr) if stderr else t

    @staticmethod
    def drop_caches():
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")

    def wipe(self, path: Path):
        be._wipe(Path(path))

    # ------------------------------------------------------------ environment
    def prepare(self):
        lay = self.lay
        hook = lay.slow_env_store / "etc/conda/activate.d/zzz.conda-stage-auto.sh"
        be._user_dir(lay.to_store(self.cp_dir), self.user)
        conf = lay.slow_env_store / "etc/conda-stage/auto-stage.conf"
        with self.client_cache(latency=0):
            if hook.exists() and "quiet=1" in conf.read_text():
                self.sh(f"conda-stage --auto-stage=disable {lay.slow_env}")  # we want its INFO lines
            if not hook.exists():
                say("enabling auto-staging of the shared environment (packs it once)")
                self.sh(f"conda-stage --auto-stage=enable {lay.slow_env}")
            self.sh(f"conda-stage --pack -q {lay.slow_env}")  # no-op when fresh
            cp = lay.to_store(self.cp_tarball)
            built = (lay.store / f".{be.ENV_NAME}.stamp").stat().st_mtime
            if cp.exists() and cp.stat().st_mtime < built:
                cp.unlink()  # it packs an earlier build of the environment
            if not cp.exists():
                say("packing the conda-pack tarball for the original tool's path")
                self.pack_condapack(lay.slow_env, self.cp_tarball)
        zst_store = lay.to_store(self.zst)
        if not self.plain_tar.exists() or self.plain_tar.stat().st_mtime < zst_store.stat().st_mtime:
            subprocess.run(f"zstd -q -d -c {shlex.quote(str(zst_store))} > {shlex.quote(str(self.plain_tar))}",
                           shell=True, check=True)
            os.chmod(self.plain_tar, 0o644)
        size = be.tree_size(lay.slow_env_store)
        n_dists = len(list((lay.slow_env_store / "lib/python3.11/site-packages").glob("*.dist-info")))
        self.res["env"] = {
            **size, "pip_distributions": n_dists, "prefix": str(lay.slow_env),
            "tar_zst_bytes": zst_store.stat().st_size,
            "tar_gz_bytes": lay.to_store(self.cp_tarball).stat().st_size,
            "tar_bytes": self.plain_tar.stat().st_size,
        }
        say(f"environment: {size['files']} files, {size['dirs']} folders, "
            f"{size['bytes'] / 1e6:.0f} MB; tar.zst {self.res['env']['tar_zst_bytes'] / 1e6:.1f} MB")

    def pack_condapack(self, env: Path, target: Path):
        """What the original conda-stage ran: conda-pack with its defaults, to a
        temporary name, then mv."""
        tmp = target.parent / f".tmp.{target.name}"
        return self.timed(f"mkdir -p {target.parent} && rm -f {tmp} {target} && "
                          f"{CONDA_PACK} -p {env} -o {tmp} && mv {tmp} {target}")

    # ------------------------------------------------------------ 2. startup
    def phase_startup(self):
        lay = self.lay
        n_slow = 1 if self.quick else 3
        n_cached = 2 if self.quick else 3
        n_local = 3 if self.quick else 5
        copy_parent = lay.scratch / "startup"
        copy = copy_parent / be.ENV_NAME
        self._remove_copy(copy)
        self.sh(f"mkdir -p {copy_parent}")
        with self.client_cache():
            self.sh(f"conda-stage --stage -q --path {copy} {lay.slow_env}")
        # as in an activated env: its bin/ first on PATH (conda-pack rewrites the copy's
        # entry-point shebangs to '#!/usr/bin/env python')
        cmd = "PATH={0}/bin:$PATH jupyter --version"
        subprocess.run(["tar", "-cPf", "/dev/null", str(lay.slow_env_store)], check=True)  # warm the server
        for p in (copy, lay.native_env):  # warm the local page cache
            self.timed(cmd.format(p))
        r = {"slow": [], "slow_cached": [], "staged": [], "native": [], "slow_requests": [],
             "slow_cached_requests": [], "requests_during_local_runs": 0,
             "command": "jupyter --version"}
        for i in range(max(n_slow, n_cached, n_local)):
            if i < n_slow:
                with self.nocache() as m:
                    r["slow"].append(self.timed(cmd.format(lay.slow_env)))
                r["slow_requests"].append(m.stats["meta_requests"])
                say(f"startup: slow FS {r['slow'][-1]:.2f} s ({m.stats['meta_requests']} requests)")
            if i < n_cached:
                with self.client_cache() as m:
                    r["slow_cached"].append(self.timed(cmd.format(lay.slow_env)))
                r["slow_cached_requests"].append(m.stats["meta_requests"])
                say(f"startup: slow FS, client cache {r['slow_cached'][-1]:.2f} s")
            if i < n_local:
                with self.nocache() as m:  # mounted, so a stray access would be counted
                    # staged, native, native, staged: neither always runs first
                    for which in ("staged", "native", "native", "staged"):
                        p = copy if which == "staged" else lay.native_env
                        r[which].append(self.timed(cmd.format(p)))
                r["requests_during_local_runs"] += m.stats["meta_requests"]
                say(f"startup: staged {r['staged'][-2]:.3f} {r['staged'][-1]:.3f} s, "
                    f"native {r['native'][-2]:.3f} {r['native'][-1]:.3f} s")
        self._remove_copy(copy)
        med = {k: median(r[k]) for k in ("slow", "slow_cached", "staged", "native")}
        r["median"] = med
        r["speedup_vs_slow"] = med["slow"] / med["staged"]
        r["speedup_vs_slow_cached"] = med["slow_cached"] / med["staged"]
        r["staged_vs_native"] = med["staged"] / med["native"]
        self.res["startup"] = r
        self.res["goals"]["startup >= 20x faster than slow FS"] = r["speedup_vs_slow"] >= 20
        self.res["goals"]["startup within 5% of native"] = r["staged_vs_native"] <= 1.05

    def _remove_copy(self, copy: Path):
        if copy.exists():
            self.wipe(copy)

    # ------------------------------------------------------------ 3. strace
    def phase_strace(self):
        lay = self.lay
        d = lay.work / "strace"
        self.wipe(d)
        self.sh(f"mkdir -p {d}")
        st = "strace -f -y -qq -e trace=%file,%desc"
        out = {}
        cmd = "jupyter --version"
        sessions = {
            # the walkthrough's check: strace the command in an activated shell
            "unstaged_command": ("CONDA_STAGE=false conda activate {env}\n"
                                 f"{st} -o {d}/unstaged.tr {cmd} >/dev/null\n"
                                 "CONDA_STAGE=false conda deactivate", "unstaged.tr", True),
            "staged_command": ("conda activate {env}\n"
                               f"{st} -o {d}/staged.tr {cmd} >/dev/null\n"
                               "conda deactivate", "staged.tr", True),
        }
        for key, (script, trace, init) in sessions.items():
            with self.client_cache() as m:
                self.sh(script.format(env=be.ENV_NAME), init=True)
            out[key] = self.summarize_trace(d / trace)
            out[key]["slowfs_requests"] = m.stats["meta_requests"]
            say(f"strace {key}: {out[key]['calls']} calls, {out[key]['slow_calls']} on the slow FS")
        # whole sessions, activation included, every process
        init = shlex.quote(str(self.site.init_file))
        whole = (f"strace -f -y -qq -e trace=%file,%desc,%process -o {d}/{{trace}} "
                 f"bash -c {{script}}")
        auto = f". {init}; conda activate {be.ENV_NAME}; {cmd} >/dev/null; conda deactivate"
        with self.client_cache() as m:
            self.sh(whole.format(trace="auto.tr", script=shlex.quote(auto)))
        out["auto_session"] = self.summarize_trace(d / "auto.tr", by_program=True)
        out["auto_session"]["slowfs_requests"] = m.stats["meta_requests"]
        copy = lay.scratch / "prestaged" / be.ENV_NAME
        self._remove_copy(copy)
        self.sh(f"mkdir -p {copy.parent}")
        with self.client_cache() as m:
            self.sh(f"conda-stage --stage -q --path {copy} {lay.slow_env}")
            pre = f". {init}; conda activate {copy}; {cmd} >/dev/null; conda deactivate"
            self.sh(whole.format(trace="pre.tr", script=shlex.quote(pre)),
                    extra={"CONDA_ENVS_PATH": ""})
        self._remove_copy(copy)
        out["prestaged_session"] = self.summarize_trace(d / "pre.tr", by_program=True)
        for k in ("auto_session", "prestaged_session"):
            say(f"strace {k}: {out[k]['calls']} calls, {out[k]['slow_calls']} on the slow FS "
                f"{out[k].get('slow_by_program')}")
        self.res["strace"] = out
        self.res["goals"]["0 slow-FS calls from the staged command"] = out["staged_command"]["slow_calls"] == 0
        self.res["goals"]["0 slow-FS calls in a pre-staged session"] = out["prestaged_session"]["slow_calls"] == 0

    def summarize_trace(self, path: Path, by_program=False) -> dict:
        mount = re.escape(str(self.lay.mount))
        slow_re = re.compile(mount + r'(?=[/">])')
        env_re = re.compile(re.escape(str(self.lay.slow_env)) + r'(?=[/">])')
        call_re = re.compile(r"^(\d+)\s+(?:<\.\.\. )?([a-z0-9_]+)[( ]")
        calls = slow = stats = slow_stats = on_env = 0
        samples, prog_of, parent_exe, slow_by = [], {}, {}, {}
        with open(path, errors="replace") as fh:
            for line in fh:
                m = call_re.match(line)
                if not m:
                    continue
                pid, name = m.group(1), m.group(2)
                if name in ("clone", "clone3", "fork", "vfork"):  # the child's pid, maybe resumed
                    q = re.search(r"= (\d+)\s*$", line)
                    if q:
                        parent_exe[q.group(1)] = pid
                    continue
                if "resumed>" in line:
                    continue
                if name == "execve":
                    q = re.search(r'execve\("([^"]+)"', line)
                    if q and "= -1" not in line:
                        prog_of[pid] = os.path.basename(q.group(1))
                if name in ("exit", "exit_group", "wait4"):
                    continue
                calls += 1
                is_stat = name in STAT_CALLS
                stats += is_stat
                if slow_re.search(line):
                    slow += 1
                    slow_stats += is_stat
                    on_env += bool(env_re.search(line))
                    if len(samples) < 12:
                        samples.append(line.rstrip()[:200])
                    if by_program:
                        slow_by.setdefault(pid, 0)
                        slow_by[pid] += 1
        res = {"calls": calls, "stat_calls": stats, "slow_calls": slow, "slow_stat_calls": slow_stats,
               "calls_on_original_prefix": on_env, "slow_samples": samples}
        if by_program:
            def prog(pid, depth=0):
                if pid in prog_of or depth > 50:
                    return prog_of.get(pid, "?")
                return prog(parent_exe[pid], depth + 1) if pid in parent_exe else "?"
            agg = {}
            for pid, n in slow_by.items():
                agg[prog(pid)] = agg.get(prog(pid), 0) + n
            res["slow_by_program"] = dict(sorted(agg.items(), key=lambda kv: -kv[1]))
        return res

    # ------------------------------------------------------------ 4. pack
    PACK_METHODS = ("ours", "floor", "condapack", "condapack_j", "condapack_zst")

    def pack_cmd(self, who: str, env: Path, out: Path) -> str:
        """The packing command of each method, as the user runs it; every one reads the
        same tree and writes next to ``out`` on the same disk."""
        cores = self.cores
        if who == "ours":  # writes ENV.tar.zst next to the env, as users get it
            return f"conda-stage --pack --force -q {env}"
        if who == "floor":  # the same tree, GNU tar piped into the zstd CLI on all cores
            return f"cd {env} && tar -cf - . | zstd -q -3 -T{cores} -o {out}/floor.tar.zst -f"
        if who == "condapack":  # its defaults: tar.gz level 4, one thread (the original's)
            return f"{CONDA_PACK} -q --force -p {env} -o {out}/cp.tar.gz"
        if who == "condapack_j":  # its parallel gzip on all cores
            return f"{CONDA_PACK} -q --force -j {cores} -p {env} -o {out}/cp-j.tar.gz"
        if who == "condapack_zst":  # its zstd format (0.9.2 takes neither the level nor -j)
            return f"{CONDA_PACK} -q --force -j {cores} -p {env} -o {out}/cp.tar.zst"
        raise ValueError(who)

    def phase_pack(self):
        """Every method on the same tree, interleaved, rotating which goes first: the
        native env on local disk with warm page caches and with dropped ones, and the
        shared env on the slow FS (client cache, caches dropped)."""
        lay = self.lay
        # rounds on local disk: CONDA_STAGE_BENCH_PACK_ROUNDS (default 3, --quick 1); the
        # shared FS gets one
        n = int(os.environ.get("CONDA_STAGE_BENCH_PACK_ROUNDS") or (1 if self.quick else 3))
        out = lay.work / "pack"
        self.sh(f"rm -rf {out} && mkdir -p {out}")
        methods = list(self.PACK_METHODS)
        cases = {"local_warm": lay.native_env, "local_cold": lay.native_env,
                 "slow": lay.slow_env}
        # on the shared FS conda-pack's tar.zst is left out (~70 s a run; slower than its
        # -j gzip on local disk), and one round: conda-pack's default takes ~90 s there
        case_methods = {"local_warm": methods, "local_cold": methods,
                        "slow": [w for w in methods if w != "condapack_zst"]}
        rounds = {"local_warm": n, "local_cold": n, "slow": 1}
        r = {case: {who: [] for who in case_methods[case]} for case in cases}
        requests = {who: [] for who in case_methods["slow"]}
        sizes = {}
        archives = {"ours": lay.native_env.parent / f"{be.ENV_NAME}.tar.zst",
                    "floor": out / "floor.tar.zst", "condapack": out / "cp.tar.gz",
                    "condapack_j": out / "cp-j.tar.gz", "condapack_zst": out / "cp.tar.zst"}
        # warm-up: every method once on the local tree (page caches, its Python's imports)
        for who in methods:
            self.timed(self.pack_cmd(who, lay.native_env, out))
        for i in range(n):
            for case, env in cases.items():
                if i >= rounds[case]:
                    continue
                ms = case_methods[case]
                k = i % len(ms)
                for who in ms[k:] + ms[:k]:
                    subprocess.run(["sync"], check=True)  # the previous archive is on disk
                    if case == "local_warm":
                        t = self.timed(self.pack_cmd(who, env, out))
                    elif case == "local_cold":
                        self.drop_caches()
                        t = self.timed(self.pack_cmd(who, env, out))
                    else:
                        self.drop_caches()
                        with self.client_cache() as m:
                            t = self.timed(self.pack_cmd(who, env, out))
                        requests[who].append(m.stats["meta_requests"])
                    r[case][who].append(t)
                    if case != "slow":  # the archive of the local env, just written
                        sizes[who] = archives[who].stat().st_size
                say(f"pack ({case}): " + ", ".join(f"{w} {r[case][w][-1]:.2f} s" for w in ms))
        res = {"cores": self.cores, "samples": r, "slow_requests": requests, "bytes": sizes,
               "median": {case: {w: median(v) for w, v in d.items()} for case, d in r.items()}}
        md = res["median"]
        res["vs_floor"] = {case: md[case]["ours"] / md[case]["floor"] for case in cases}
        res["vs_condapack"] = {case: md[case]["condapack"] / md[case]["ours"] for case in cases}
        res["vs_condapack_best"] = {
            case: min(md[case][w] for w in ("condapack_j", "condapack_zst") if w in md[case])
            / md[case]["ours"] for case in cases}
        res["size_vs_floor"] = sizes["ours"] / sizes["floor"]
        res["size_vs_gz"] = sizes["ours"] / sizes["condapack"]
        self.res["pack"] = res
        goals = self.res["goals"]
        goals["pack <= 1.25x the floor (local disk, warm cache)"] = res["vs_floor"]["local_warm"] <= 1.25
        goals["pack <= 1.25x the floor (local disk, cold cache)"] = res["vs_floor"]["local_cold"] <= 1.25
        goals["pack >= 8x faster than conda-pack's default (slow FS)"] = res["vs_condapack"]["slow"] >= 8
        goals["archive <= 1.1x the gzip size"] = res["size_vs_gz"] <= 1.1

    # ------------------------------------------------------------ 5. stage (+ 6. teardown)
    def phase_stage(self):
        out = {}
        out["disk"] = self.stage_to(self.lay.scratch / "stage", teardown=True)
        shm = Path("/dev/shm")
        if shm.is_dir() and shutil.disk_usage(shm).free > 3 * self.res["env"]["bytes"]:
            out["tmpfs"] = self.stage_to(shm / "conda-stage-bench", teardown=False)
        self.res["stage"] = out
        r = out["disk"]
        self.res["goals"]["stage >= 2x faster than tar -xzf + conda-unpack"] = r["speedup_vs_original"] >= 2
        self.res["goals"]["stage <= 1.5x plain tar -x"] = r["vs_floor"] <= 1.5
        if "tmpfs" in out:
            t = out["tmpfs"]
            self.res["goals"]["stage >= 2x faster than tar -xzf + conda-unpack (tmpfs)"] = t["speedup_vs_original"] >= 2
            self.res["goals"]["stage <= 1.5x plain tar -x (tmpfs)"] = t["vs_floor"] <= 1.5

    def stage_to(self, base: Path, teardown: bool) -> dict:
        """Stage three ways into ``base`` (the tarballs stay on the shared FS)."""
        lay = self.lay
        n = 3 if self.quick else 6
        r = {k: [] for k in ("ours", "ours_extract", "original", "original_tar", "original_unpack",
                             "original_chmod", "floor", "teardown_ours", "teardown_original",
                             "teardown_rm")}
        self.wipe(base)
        base.mkdir(parents=True)
        os.chown(base, self.user.uid, self.user.gid)
        orig = base / "orig" / be.ENV_NAME
        ours = base / "ours" / be.ENV_NAME
        floor = base / "floor" / be.ENV_NAME
        self.sh(f"mkdir -p {orig.parent} {ours.parent} {floor.parent}")
        original = (
            # conda-stage 0.7's stage action, minus 'source bin/activate' (PATH instead) and
            # 'conda config --env --set env_prompt' (a conda start-up, ~1 s, left out)
            f"mkdir {orig}.tmp && __a=$EPOCHREALTIME && tar -xf {self.cp_tarball} -C {orig}.tmp && "
            f"chmod -R u+w {orig}.tmp && mv {orig}.tmp {orig} && "
            f"echo {lay.slow_env} > {orig}/.conda-stage && __b=$EPOCHREALTIME && "
            f"PATH={orig}/bin:$PATH conda-unpack && __c=$EPOCHREALTIME && "
            f"chmod -R ugo-w {orig} && __d=$EPOCHREALTIME && "
            f'echo "## $__a $__b $__c $__d" >&2')
        methods = ["ours", "original", "floor"]
        for i in range(n):
            # each method goes first in a round equally often: the first run of a round
            # follows the previous round's teardown (ext4 with 'discard' trims the freed
            # blocks at the next journal commits, which slows whatever runs then)
            for who in methods[i % 3:] + methods[:i % 3]:
                self.drop_caches()
                with self.client_cache():
                    if who == "ours":
                        t, err = self.timed(f"conda-stage --stage --path {ours} {lay.slow_env}",
                                            stderr=True)
                        m = re.search(r"Total extract time: ([\d.]+)", err)
                        r["ours_extract"].append(float(m.group(1)) if m else None)
                    elif who == "original":
                        t, err = self.timed(original, stderr=True)
                        m = re.search(r"^## (\S+) (\S+) (\S+) (\S+)$", err, re.M)
                        a, b, c, d = map(float, m.groups())
                        r["original_tar"].append(b - a)
                        r["original_unpack"].append(c - b)
                        r["original_chmod"].append(d - c)
                    else:
                        t = self.timed(f"mkdir {floor} && tar -xf {self.plain_tar} -C {floor}")
                r[who].append(t)
            say(f"stage to {base}: ours {r['ours'][-1]:.2f} s, original {r['original'][-1]:.2f} s, "
                f"floor {r['floor'][-1]:.2f} s")
            subprocess.run(["sync"], check=True)  # teardown: page cache warm, nothing dirty
            if teardown:
                r["teardown_ours"].append(self.timed(f"conda-stage --unstage -q {ours}"))
                r["teardown_original"].append(self.timed(
                    f"mv {orig} {orig}.tmp && chmod -R u+w {orig}.tmp && rm -rf {orig}.tmp"))
                r["teardown_rm"].append(self.timed(f"rm -rf {floor}"))
                say(f"teardown: ours {r['teardown_ours'][-1]:.2f} s, original "
                    f"{r['teardown_original'][-1]:.2f} s, rm -rf {r['teardown_rm'][-1]:.2f} s")
            else:
                self.sh(f"conda-stage --unstage -q {ours}; chmod -R u+w {orig}; rm -rf {orig} {floor}")
            subprocess.run(["sync"], check=True)
            time.sleep(2)  # let the trims of the freed blocks settle
        self.wipe(base)
        r["target"] = str(base)
        r["median"] = {k: median([x for x in v if x is not None])
                       for k, v in r.items() if isinstance(v, list)}
        md = r["median"]
        r["speedup_vs_original"] = md["original"] / md["ours"]
        r["vs_floor"] = md["ours"] / md["floor"]
        if teardown:
            r["teardown_vs_rm"] = md["teardown_ours"] / md["teardown_rm"]
        return r

    # ------------------------------------------------------------ 6. hooks
    def phase_hooks(self):
        n = 20 if self.quick else 50
        common = {}  # the hooks read no settings from their environment
        slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_UID": str(self.user.uid),
                 "SLURM_JOB_GID": str(self.user.gid), "SLURM_JOB_USER": self.user.name,
                 "SLURM_JOB_ACCOUNT": "bench", "SLURM_JOB_PARTITION": "debug",
                 "SLURMD_NODENAME": "node01", "SLURM_CLUSTER_NAME": "bench",
                 "SLURM_SCRIPT_CONTEXT": "prolog_slurmd", "SLURM_JOB_COMMENT": "", **common}
        sge = {"JOB_ID": "4242", "JOB_NAME": "bench", "SGE_TASK_ID": "undefined",
               "USER": self.user.name, "TMPDIR": "/tmp/4242.1.all.q", "TMP": "/tmp/4242.1.all.q",
               "NSLOTS": "1", "QUEUE": "all.q", "ENVIRONMENT": "BATCH", **common}

        def loop(argv, env, runs):
            assign = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
            script = (f"for i in $(seq {runs}); do __s=$EPOCHREALTIME; env -i {assign} {argv} "
                      f">/dev/null 2>&1; __rc=$?; __e=$EPOCHREALTIME; echo \"@@ $__s $__e $__rc\"; done")
            res = subprocess.run(["/bin/bash", "-c", script], capture_output=True, text=True,
                                 env={"PATH": "/usr/bin:/bin"})
            times = []
            for s, e, rc in re.findall(r"^@@ (\S+) (\S+) (\d+)$", res.stdout, re.M):
                if rc != "0":
                    raise RuntimeError(f"{argv} exited {rc}")
                times.append(float(e) - float(s))
            return times

        r = {}
        r["baseline_true"] = loop("/bin/true", slurm, n)
        r["slurm_prolog"] = loop(str(REPO / "prolog/slurm-prolog"), slurm, n)
        r["sge_prolog"] = loop(str(REPO / "prolog/sge-prolog"), sge, n)
        r["python_hook_no_fast_path"] = loop(
            f"{sys.executable} -I -m conda_stage.hooks slurm-prolog", slurm, max(5, n // 5))
        r["median_ms"] = {k: 1000 * median(v) for k, v in r.items()}
        say("hooks (median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in r["median_ms"].items()))
        try:
            r["job"] = self.job_hooks(slurm)
        except Exception as exc:  # the job hooks are optional here; report why
            r["job"] = {"error": str(exc)[-1500:]}
            say(f"job prolog/epilog not measured: {str(exc)[:300]}")
        self.res["hooks"] = r

    def job_hooks(self, slurm):
        """A job that declares the environment: prolog stages it, epilog removes it.
        The hooks take settings from the site file only: it is written for the
        run (staging and state folders of the bench, the shared conda root
        whose envs/ holds the environment) and restored afterwards."""
        from tests.harness.sitecfg import site_defaults

        lay = self.lay
        n = 1 if self.quick else 3
        staging, state = lay.base / "jobs", lay.base / "state"
        r = {"prolog": [], "epilog": [], "rm_rf": [], "staged": []}
        # keep_unused=0: each epilog removes the copy, so every prolog extracts
        with site_defaults(staging_dir=staging, state_dir=state, conda_root=lay.mount,
                           syslog="no", keep_unused=0):
            for i in range(n + 1):
                job = str(5000 + i)
                env = {**slurm, "SLURM_JOB_ID": job,
                       "SLURM_JOB_COMMENT": f"conda_env={be.ENV_NAME}", "PATH": "/usr/bin:/bin"}
                workdir = staging / job
                self.drop_caches()
                with self.client_cache():
                    t0 = time.perf_counter()
                    subprocess.run([str(REPO / "prolog/slurm-prolog")], env=env, check=True,
                                   capture_output=True)
                    t_prolog = time.perf_counter() - t0
                manifest = state / f"{job}.json"
                items = [x for x in json.loads(manifest.read_text())["results"]
                         if x["status"] == "staged"] if manifest.exists() else []
                copy = Path(items[0]["path"]) if items else None
                if copy is None or not (copy / ".conda-stage").exists():
                    raise RuntimeError(f"the prolog did not stage (manifest: "
                                       f"{manifest.read_text() if manifest.exists() else 'none'})")
                subprocess.run(["sync"], check=True)
                if i < n:  # epilog
                    t0 = time.perf_counter()
                    subprocess.run([str(REPO / "epilog/slurm-epilog")], env=env, check=True,
                                   capture_output=True)
                    r["epilog"].append(time.perf_counter() - t0)
                    if workdir.exists() or copy.exists():
                        raise RuntimeError("the epilog left the job folder or the copy behind")
                    r["prolog"].append(t_prolog)
                else:  # the same tree, removed with rm -rf as root
                    t0 = time.perf_counter()
                    subprocess.run(["rm", "-rf", str(workdir), str(copy.parent),
                                    str(state / f"{job}.json")], check=True)
                    r["rm_rf"].append(time.perf_counter() - t0)
                    subprocess.run(["rm", "-rf", str(staging / "users"), str(state / "users")],
                                   check=True)
        r["median"] = {k: median(v) for k, v in r.items() if isinstance(v, list) and v}
        say(f"job hooks: prolog {r['median']['prolog']:.2f} s, epilog {r['median']['epilog']:.2f} s, "
            f"rm -rf {r['median']['rm_rf']:.2f} s")
        return r

    # ------------------------------------------------------------ 7. interactive cycle
    def phase_cycle(self):
        """`conda activate ENV; conda deactivate` of an auto-staged env on the shared FS
        (client cache), as a user types it: conda-stage extracting the tarball, conda-stage
        mounting the env's image (the site file says CONDA_STAGE_SHELL_IMAGES=yes; the image
        is copied to local disk first, the default), the original Bash tool run from the
        checkout given with --original (on a twin env with the same packages: its hooks
        have the same names as ours), and plain conda without staging.  The site file is
        written for the phase (shell images on only for the image cycles) and restored;
        /dev/fuse is made usable by users (mode 0666) for the phase and restored."""
        from tests.harness.sitecfg import site_defaults

        staging = self.lay.base / "shell-jobs"
        with site_defaults(staging_dir=staging, state_dir=self.lay.base / "shell-state",
                           syslog="no", stage_mode="auto", shell_images="no") as site:
            for path, mode in ((staging, "0755"), (staging / "users", "1733")):
                subprocess.run(["install", "-d", "-o", "root", "-g", "root", "-m", mode,
                                str(path)], check=True)
            fuse_mode = os.stat("/dev/fuse").st_mode & 0o777
            os.chmod("/dev/fuse", 0o666)  # Debian's udev default; this VM's is 0600
            try:
                self._cycles(site, staging)
            finally:
                os.chmod("/dev/fuse", fuse_mode)
                left = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                        if str(staging) in line]
                shutil.rmtree(staging, ignore_errors=True)
                if left:
                    raise RuntimeError(f"mounts left after the cycles: {left}")

    def _cycles(self, site, staging: Path):
        lay = self.lay
        n = 2 if self.quick else 5
        r = {"ours": [], "image": [], "plain": []}
        orig = Path(self.args.original).resolve() if self.args.original else None
        methods = ["ours", "image", "plain"]
        if orig is None:
            r["skipped"] = "no --original given"
        else:
            r["original"] = []
            r["original_dir"] = str(orig)
            r["original_version"] = self.setup_original(orig)
            methods.insert(1, "original")
        r["background_removal"] = []
        init = f". {shlex.quote(str(self.site.init_file))}"
        with self.client_cache(latency=0):
            # this conda-stage's hooks: an environment enabled by an earlier version keeps
            # its hooks until it is enabled again, which repacks it when they changed (a
            # copy's deactivate.d hook comes from the tarball)
            self.sh(f"conda-stage --auto-stage=enable --image {lay.slow_env}")
        before = {p.name for p in lay.scratch.glob("conda-stage-*")}
        # one cycle of each, not timed: the original repacks at its first activation after
        # --auto-stage=enable (it deletes its tarball then, so that the hooks get into it)
        with self.client_cache():
            self.timed(f"conda activate {be.ENV_NAME} && conda deactivate", pre=init)
            self.settle()
            if orig is not None:
                self.timed(f"conda activate {ORIG_ENV} && conda deactivate",
                           pre=self.original_pre(orig), extra=self.original_env())
                self.settle()
        for i in range(n):
            k = i % len(methods)
            for who in methods[k:] + methods[:k]:
                site.update(shell_images="yes" if who == "image" else "no")
                with self.client_cache():
                    if who == "image":
                        t, err = self.timed(f"conda activate {be.ENV_NAME} && conda deactivate",
                                            pre=init, stderr=True)
                        if "INFO: Mounting " not in err or "Unmounting staged" not in err:
                            raise RuntimeError(f"conda-stage did not mount and unmount the "
                                               f"image:\n{err[-2000:]}")
                        if list(staging.glob("users/*/*/*")):
                            raise RuntimeError(f"left in {staging}: "
                                               f"{list(staging.glob('users/*/*/*'))}")
                    elif who == "ours":
                        t, err = self.timed(f"conda activate {be.ENV_NAME} && conda deactivate",
                                            pre=init, stderr=True)
                        if not re.search(r"Extracting|Activating staged|Staging", err):
                            raise RuntimeError(f"conda-stage did not stage:\n{err[-2000:]}")
                        if "Removing staged Conda environment" not in err:
                            raise RuntimeError(f"conda-stage did not unstage:\n{err[-2000:]}")
                    elif who == "plain":
                        t = self.timed(f"conda activate {be.ENV_NAME} && conda deactivate",
                                       pre=f"{init}; export CONDA_STAGE=false")
                    else:
                        t, err = self.timed(f"conda activate {ORIG_ENV} && conda deactivate",
                                            pre=self.original_pre(orig), stderr=True,
                                            extra=self.original_env())
                        if "Activating staged" not in err or "Removing" not in err and \
                                "removing" not in err:
                            raise RuntimeError(f"the original did not stage and unstage:\n"
                                               f"{err[-3000:]}")
                    waited = self.settle()
                    if who == "ours":
                        r["background_removal"].append(waited)
                r[who].append(t)
            say("cycle: " + ", ".join(f"{w} {r[w][-1]:.2f} s" for w in methods)
                + f" (ours: removal in the background done {r['background_removal'][-1]:.2f} s later)")
        self.sh(f"find {lay.scratch} -maxdepth 1 -name 'conda-stage-*' -type d -empty -delete",
                check=False)  # the original leaves its empty staging parents behind
        left = sorted({p.name for p in lay.scratch.glob("conda-stage-*")} - before)
        if left:
            raise RuntimeError(f"staged copies left in {lay.scratch}: {left}")
        r["median"] = {w: median(r[w]) for w in methods}
        r["median"]["background_removal"] = median(r["background_removal"])
        if orig is not None:
            r["speedup_vs_original"] = r["median"]["original"] / r["median"]["ours"]
            r["image_speedup_vs_original"] = r["median"]["original"] / r["median"]["image"]
            self.res["goals"]["interactive cycle >= 3x faster than the original tool"] = \
                r["speedup_vs_original"] >= 3
            self.res["goals"]["interactive cycle >= 3x faster than the original tool, "
                              "with shell images"] = r["image_speedup_vs_original"] >= 3
        self.res["cycle"] = r

    def settle(self) -> float:
        """Between two cycles, not timed: wait until conda-stage's removal of the copy in
        the background ('conda deactivate' renames the copy's folder to
        conda-stage-*.trash, a detached process deletes it) has deleted every file, then
        write dirty pages back and drop the page caches, as the stage phase does before
        each sample: so that no cycle pays for the disk writes of the one before it,
        whichever tool made them, and each reads the tarball cold.  (On this VM, extracting
        the same 17,750 files with plain 'tar -xf' took 2 s right after dropping the page
        cache and 7-19 s when repeated without: every tool's cycle slowed down run after
        run.)  Returns how long the removal went on after the cycle had returned (about:
        from when the benchmark's shell had exited)."""
        t0 = time.monotonic()
        while any(self.lay.scratch.glob("conda-stage-*.trash")):
            if time.monotonic() - t0 > 600:
                raise RuntimeError(f"a removal in the background did not finish in 10 min: "
                                   f"{list(self.lay.scratch.glob('conda-stage-*.trash'))}")
            time.sleep(0.02)
        waited = time.monotonic() - t0
        self.drop_caches()
        return waited

    def original_env(self) -> dict:
        """PATH for the original tool: conda, conda-pack (it packs with conda-pack and
        would try to 'conda install' it otherwise), no conda-stage of ours."""
        tools = self.lay.base / "orig-bin"
        tools.mkdir(exist_ok=True)
        link = tools / "conda-pack"
        if not link.is_symlink():
            link.symlink_to(CONDA_PACK)
        return {"PATH": f"{tools}:{self.site.condabin}:/usr/local/bin:/usr/bin:/bin"}

    def original_pre(self, orig: Path) -> str:
        """What a user of the original has in their shell start-up."""
        return (f". {shlex.quote(str(self.site.init_file))}; "
                f"source {shlex.quote(str(orig / 'bin' / 'conda-stage.sh'))}")

    def setup_original(self, orig: Path) -> str:
        """Check the checkout, build the twin env, enable the original's auto-staging on
        it (which packs it with conda-pack, as the original does)."""
        script = orig / "bin" / "conda-stage"
        if not (orig / "bin" / "conda-stage.sh").is_file() or not script.is_file():
            raise SystemExit(f"--original {orig}: no bin/conda-stage and bin/conda-stage.sh "
                             f"there (a checkout of HenrikBengtsson/conda-stage)")
        version = self.sh(f"{shlex.quote(str(script))} --version", check=False,
                          extra=self.original_env()).stdout.strip()
        be.ensure_twin(self.lay, self.site, self.user, ORIG_ENV)
        prefix = self.lay.mount / "envs" / ORIG_ENV
        hook = self.lay.to_store(prefix) / "etc/conda/activate.d/zzz.conda-stage-auto.sh"
        with self.client_cache(latency=0):
            if not hook.exists():
                say(f"enabling the original's auto-staging of {prefix} (packs it with conda-pack)")
                self.sh(f"{self.original_pre(orig)}\nCONDA_STAGE=false conda activate {ORIG_ENV}\n"
                        f"conda-stage --auto-stage=enable\nCONDA_STAGE=false conda deactivate",
                        extra=self.original_env())
        say(f"original conda-stage {version or '?'} from {orig}")
        return version

    # ------------------------------------------------------------ report
    def machine(self) -> dict:
        def first(cmd):
            try:
                return subprocess.run(cmd, capture_output=True, text=True, shell=True).stdout.strip()
            except OSError:
                return ""
        cpu = first("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
        mem = int(first("awk '/MemTotal/{print $2}' /proc/meminfo") or 0) // 1024
        import conda_pack
        import zstandard
        import conda_stage
        return {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cpu": cpu, "cpus": os.cpu_count(), "memory_mib": mem,
            "kernel": platform.release(), "os": first(". /etc/os-release && echo $PRETTY_NAME"),
            "disk": first(f"df -T {self.lay.base} | awk 'NR==2{{print $2\" on \"$1}}'"),
            "python": platform.python_version(), "conda": CONDA_VERSION,
            "conda_pack": conda_pack.__version__, "zstandard": zstandard.__version__,
            "conda_stage": conda_stage.__version__,
            "git": (first(f"git -C {REPO} rev-parse --short HEAD 2>/dev/null") or "not a git checkout") +
            (" (modified)" if first(f"git -C {REPO} status --porcelain -- conda_stage") else ""),
            "loadavg_start": self.load_start, "loadavg_end": os.getloadavg(),
            "latency_ms": self.lat, "quick": self.quick,
        }

    def run(self):
        self.load_start = os.getloadavg()
        t0 = time.monotonic()
        say("preparing (environments, tarballs)")
        self.prepare()
        for phase in self.args.phases:
            say(f"--- {phase}")
            getattr(self, f"phase_{phase}")()
        self.res["machine"] = self.machine()
        self.res["machine"]["runtime_s"] = round(time.monotonic() - t0)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        (self.out / f"results-{stamp}.json").write_text(json.dumps(self.res, indent=1) + "\n")
        (self.out / "latest.json").write_text(json.dumps(self.res, indent=1) + "\n")
        import report

        md = report.markdown(self.res)
        (self.out / "benchmark.md").write_text(md)
        print(md)
        png = self.out / "benchmark.png"
        if not self.args.no_plot:
            report.plot(self.out / "latest.json", png, self.lay.base / "plot-venv")
        if self.args.docs:
            docs = REPO / "docs"
            docs.mkdir(exist_ok=True)
            (docs / "benchmark.md").write_text(md)
            if png.exists():
                shutil.copy2(png, docs / "benchmark.png")
            say(f"wrote {docs / 'benchmark.md'} and {docs / 'benchmark.png'}")
        say(f"done in {self.res['machine']['runtime_s'] / 60:.1f} min; results in {self.out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (~8 min instead of ~20)")
    ap.add_argument("--out", default=str(HERE / "results"), help="results folder (default benchmarks/results)")
    ap.add_argument("--phases", default=",".join(PHASES),
                    help=f"comma-separated subset of {','.join(PHASES)}")
    ap.add_argument("--latency-ms", type=float, default=1.0, help="slowfs metadata latency (default 1)")
    ap.add_argument("--docs", action=argparse.BooleanOptionalAction, default=None,
                    help="also write docs/benchmark.md and docs/benchmark.png "
                         "(default: yes for a full run with all phases, no for --quick)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib venv)")
    ap.add_argument("--original", metavar="DIR",
                    help="a checkout of the original Bash conda-stage (HenrikBengtsson/conda-stage); "
                         "the interactive cycle is compared with it, run from there (without it, "
                         "that comparison is skipped)")
    args = ap.parse_args(argv)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    bad = [p for p in args.phases if p not in PHASES]
    if bad:
        ap.error(f"unknown phase(s): {', '.join(bad)}")
    if args.docs is None:
        args.docs = not args.quick and list(args.phases) == list(PHASES)
    if os.geteuid() != 0:
        ap.error("run as root (FUSE mounts, the benchmark user, dropping page caches)")
    reason = fuse_unavailable_reason(probe=True)
    if reason:
        ap.error(f"slowfs cannot run here: {reason}")
    for tool in ("strace", "zstd", "tar", "runuser"):
        if not shutil.which(tool):
            ap.error(f"{tool} not found (apt-get install -y {tool})")
    Bench(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
