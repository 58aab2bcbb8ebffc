"""Benchmark of image mode against extraction, side by side in one run.

For two environments -- the benchmark's jupyter environment (~17,750
files, ~277 MB, built by ``benchenv.py``) and a small one (python +
prefix-probe, ~2,900 files) -- both on local disk, alternating:

* **stage**: the root prolog's work for one job (``jobstage.prolog``, as the
  Slurm hook calls it) with ``stage_mode=image`` (copy the image to local
  disk, mount it with squashfuse_ll as the job user), the same with the
  image mounted where it is (``image_copy=no``), and ``stage_mode=extract``
  (unpack the tarball);
* **tear down**: the epilog's work (``jobstage.epilog``; copies are kept 0 s);
* **jupyter --version** (jupyter environment): from the mount, from the
  extracted copy, and from the native install the benchmark built on local
  disk -- the reference; and two references that tell where the mount's
  overhead goes: the mount with its ``squashfuse_ll`` and the command on
  one CPU (a FUSE round trip then needs no wake-up of another CPU), and the
  same image mounted by the kernel's squashfs driver (root, a loop device:
  not something conda-stage does, the floor of running from an image);
* **local disk**: what each mode puts on the node (du of the store, not
  entering the mount).

* **requests to the shared filesystem** (small environment): the
  environment's folder served through ``slowfs.py`` (counting, no added
  latency) in both configurations of ``run.py`` -- no client cache, and a
  client cache of 1 s -- one job's requests per phase (prolog, job,
  epilog), with the image copied and mounted in place.

Run as root: ``/opt/conda-stage/bin/python benchmarks/image.py [--reps N]
[--only requests] [--paths N]`` (``--only requests``: the shared
filesystem's counts alone, a minute; ``--paths N``: the N paths each
phase asks most about, with the asking command).
/dev/fuse is made usable by users for the run and restored afterwards.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import benchenv  # noqa: E402
from store import _Log, _job, bench_args  # noqa: E402
from conda_stage import image, jobstage  # noqa: E402
from conda_stage.config import Config  # noqa: E402
from conda_stage.privileges import Account, run_as  # noqa: E402


def _du(path: Path) -> int:
    # -x: not into the user's FUSE mount (which root may not enter anyway:
    # du then exits 1 after counting everything else)
    r = subprocess.run(["du", "-s", "--block-size=1", "-x", str(path)], capture_output=True,
                       text=True)
    return int(r.stdout.split()[0]) if r.stdout.strip() else 0


def _blocks(size: int) -> int:
    return -(-size // 4096) * 4096


def _build(env: Path, staging_dir: str) -> None:
    """(the user) Enable auto-staging (prologs stage only enabled
    environments) and build the image."""
    from conda_stage import autostage, output
    from conda_stage.resolve import resolve

    output.configure(quiet=True)
    target = resolve(str(env))
    autostage.enable(target, quiet=True)
    image.build(target, staging_dir=staging_dir)


def _disable(env: Path) -> None:
    from conda_stage import autostage, output
    from conda_stage.resolve import resolve

    output.configure(quiet=True)
    autostage.disable(resolve(str(env)))


def _version(account: Account, python_prefix: str, cpu: int | None = None,
             expect: str | None = None) -> float:
    """Seconds of ``jupyter --version`` from ``python_prefix`` as the user
    (``cpu``: on that CPU alone); its output must be ``expect`` if given."""
    def run(prefix):
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        t0 = time.perf_counter()
        # as after 'conda activate': the entry points' shebang is '/usr/bin/env python'
        env = {**os.environ, "PATH": f"{prefix}/bin:/usr/bin:/bin", "CONDA_PREFIX": prefix}
        r = subprocess.run([f"{prefix}/bin/jupyter", "--version"], capture_output=True, env=env)
        took = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(r.stderr.decode())
        return [took, r.stdout.decode()]

    took, out = run_as(account, run, python_prefix)
    if expect is not None and out != expect:
        raise RuntimeError(f"jupyter --version from {python_prefix} printed {out!r}, "
                           f"not {expect!r}")
    return took


def _native_output(account: Account, native: Path) -> str:
    def run(prefix):
        env = {**os.environ, "PATH": f"{prefix}/bin:/usr/bin:/bin", "CONDA_PREFIX": prefix}
        return subprocess.run([f"{prefix}/bin/jupyter", "--version"], capture_output=True,
                              env=env, check=True).stdout.decode()

    return run_as(account, run, str(native))


def _pinned_version(account: Account, mount: str, expect: str) -> float:
    """Reference: ``jupyter --version`` from the image's mount with its
    ``squashfuse_ll`` and the command on one CPU -- what the FUSE round
    trips cost when the daemon is woken where the request was made."""
    import psutil

    daemons = [p for p in psutil.process_iter(["name", "cmdline"])
               if p.info["name"] == "squashfuse_ll" and mount in (p.info["cmdline"] or [])]
    assert len(daemons) == 1, f"no single squashfuse_ll serves {mount}: {daemons}"
    before = daemons[0].cpu_affinity()
    daemons[0].cpu_affinity([0])
    try:
        _version(account, mount, cpu=0, expect=expect)  # warm
        return _version(account, mount, cpu=0, expect=expect)
    finally:
        daemons[0].cpu_affinity(before)


def _kernel_version(account: Account, image_file: Path, base: Path, expect: str) -> float:
    """Reference, not a mode conda-stage offers: ``jupyter --version`` from
    the same image mounted by the kernel's squashfs driver (root, a loop
    device) -- the floor of running from one compressed image.  conda-stage
    does not do this: the kernel would parse a user's image for root."""
    point = base / "kernel-reference"
    point.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "squashfs", "-o", "ro,loop,nosuid,nodev", str(image_file),
                    str(point)], check=True, capture_output=True)
    try:  # the image's root is the environment's prefix
        assert (point / "conda-meta").is_dir(), f"{image_file} holds no environment"
        _version(account, str(point), expect=expect)  # warm
        return _version(account, str(point), expect=expect)
    finally:
        subprocess.run(["umount", str(point)], check=True, capture_output=True)
        point.rmdir()


# image: copied to local disk, then mounted (the default); in place: mounted
# from where the user packed it (CONDA_STAGE_IMAGE_COPY=no)
MODES = ("image", "inplace", "extract")


def measure(env: Path, account: Account, base: Path, reps: int, jupyter: bool,
            native: Path | None) -> dict:
    samples = {f"{what}_{mode}": [] for what in ("stage", "teardown", "version", "disk")
               for mode in MODES}
    samples["version_native"] = []
    samples["version_pinned"] = []
    samples["version_kernel"] = []
    expect = _native_output(account, native) if jupyter else None
    job_id = 800000
    for _ in range(reps):
        for mode in MODES:
            config = Config(staging_dir=str(base / "jobs"), state_dir=str(base / "state"),
                            share_copies=True, keep_unused=0.0, syslog=False,
                            stage_mode="extract" if mode == "extract" else "image",
                            image_copy=mode == "image", conda_root="")
            job_id += 1
            job = _job(config, account, job_id, env)
            t0 = time.perf_counter()
            manifest = jobstage.prolog(job, config, _Log())
            samples[f"stage_{mode}"].append(time.perf_counter() - t0)
            item = manifest["results"][0]
            assert item["status"] == "staged" and item.get("image", False) == (mode != "extract"), \
                (item, _Log.lines[-5:])
            samples[f"disk_{mode}"].append(_du(Path(config.staging_dir) / "users"))
            if jupyter:
                _version(account, item["path"], expect=expect)  # warm the page cache once
                samples[f"version_{mode}"].append(_version(account, item["path"],
                                                           expect=expect))
                samples["version_native"].append(_version(account, str(native)))
                if mode == "image":
                    samples["version_pinned"].append(_pinned_version(account, item["path"],
                                                                     expect))
                    samples["version_kernel"].append(_kernel_version(
                        account, env.parent / (env.name + image.SUFFIX), base, expect))
            t0 = time.perf_counter()
            jobstage.epilog(job, config, _Log())
            samples[f"teardown_{mode}"].append(time.perf_counter() - t0)
            assert not image.mounts_under(base), "still mounted after the epilog"
    return {k: v for k, v in samples.items() if v}


def table(results: dict) -> dict:
    """The Markdown table of the samples' medians."""
    med = {label: {k: statistics.median(v) for k, v in r.items() if k != "files"}
           for label, r in results.items()}
    print("| environment | what | image, copied to local disk | image, mounted in place | "
          "extraction | image vs extraction | goal |")
    print("|---|---|---|---|---|---|---|")
    for label, m in med.items():
        files = results[label]["files"]
        name = f"{label} ({files['files']} files, {files['bytes'] / 1e6:.0f} MB)"
        si, sp, se = m["stage_image"], m["stage_inplace"], m["stage_extract"]
        ti, tp, te = m["teardown_image"], m["teardown_inplace"], m["teardown_extract"]
        print(f"| {name} | stage (prolog) | {si:.3f} s | {sp:.3f} s | {se:.3f} s | "
              f"{se / si:.1f}x faster | <= 0.2 s: {'✅' if si <= 0.2 else '❌'} |")
        print(f"| {name} | tear down (epilog) | {ti:.3f} s | {tp:.3f} s | {te:.3f} s | "
              f"{te / ti:.1f}x faster | <= 0.05 s: {'✅' if ti <= 0.05 else '❌'} |")
        # the folders (users/<uid>, the copy's, the mount point) are the
        # in-place row's: what the copied image adds is the image's own blocks
        di, dp = m["disk_image"], m["disk_inplace"]
        print(f"| {name} | local disk | {di / 1e6:.1f} MB | {dp / 1e6:.2f} MB (its folders) | "
              f"{m['disk_extract'] / 1e6:.0f} MB | | image's blocks <= the image "
              f"({m['image_bytes'] / 1e6:.1f} MB): "
              f"{'✅' if di - dp <= _blocks(m['image_bytes']) else '❌'} |")
        if m.get("version_image"):
            vi, vp, ve = m["version_image"], m["version_inplace"], m["version_extract"]
            vn = m["version_native"]
            print(f"| {name} | jupyter --version (native {vn:.3f} s) | {vi:.3f} s "
                  f"({vi / vn:.2f}x native) | {vp:.3f} s ({vp / vn:.2f}x) | {ve:.3f} s "
                  f"({ve / vn:.2f}x) | | <= 1.10x native: "
                  f"{'✅' if vi <= 1.10 * vn else '❌'} |")
            vk, vs = m["version_kernel"], m["version_pinned"]
            print(f"| {name} | jupyter --version, references | squashfuse_ll and the command "
                  f"on one CPU: {vs:.3f} s ({vs / vn:.2f}x) | | | kernel squashfs (root, "
                  f"loop; not offered): {vk:.3f} s ({vk / vn:.2f}x) | |")
        print(f"| {name} | build image (once, by the user) | {m['build']:.1f} s | | | | |")
    return med


WORKLOAD = "import json, sqlite3, ssl, xml.dom.minidom, email.parser, decimal"

# slowfs as benchmarks/run.py configures it: no client cache (its default:
# every lookup and stat of every path component reaches the server), and a
# client that caches attributes, names and misses for 1 s (run.py's client_cache)
SHARED_CONFIGS = {"no client cache": {},
                  "client cache": dict(attr_timeout=1, entry_timeout=1, negative_timeout=1)}
PHASES = ("prolog", "job", "epilog")


def _minus(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def _phase(stats: dict, before: dict) -> dict:
    """The requests between two slowfs snapshots: metadata requests, reads,
    and per operation / path / calling command."""
    from slowfs import META_OPS

    counts = _minus(stats.get("counts", {}), before.get("counts", {}))
    paths = _minus(stats.get("paths", {}), before.get("paths", {}))
    read_bytes = (stats.get("bytes", {}).get("read", 0)
                  - before.get("bytes", {}).get("read", 0))
    files_read = sorted({k.split(" ", 2)[1] for k in paths if k.startswith("read ")})
    return {"meta": sum(v for k, v in counts.items() if k in META_OPS),
            "reads": counts.get("read", 0), "read_bytes": read_bytes, "files_read": files_read,
            "counts": counts, "paths": paths}


def shared_requests(env: Path, account: Account, base: Path) -> dict:
    """What one job asks of the shared filesystem, with the environment's
    folder served through slowfs (no latency: it only counts), in both of
    run.py's slowfs configurations, per phase: the prolog, the job (a
    Python start from the copy importing ``WORKLOAD``), the epilog.  The
    shared filesystem stays mounted throughout, so anything a phase asks
    of it is counted (the image copied: the job should ask nothing)."""
    from slowfs import mounted

    shared = base / "shared"
    shared.mkdir(exist_ok=True)
    rows = {}
    job_id = 810000
    for label, cache in SHARED_CONFIGS.items():
        for mode in ("inplace", "image"):
            config = Config(staging_dir=str(base / "jobs"), state_dir=str(base / "state"),
                            share_copies=True, keep_unused=0.0, syslog=False,
                            stage_mode="image", image_copy=mode == "image", conda_root="")
            job_id += 1
            job = _job(config, account, job_id, shared / env.name)

            def workload(item):
                r = run_as(account, lambda: subprocess.run(
                    [f"{item['path']}/bin/python", "-c", WORKLOAD],
                    capture_output=True).returncode)
                assert r == 0, f"python from {item['path']} failed"

            with mounted(str(env.parent), str(shared), meta_latency_ms=0.0, allow_other=True,
                         count_paths=True, **cache) as fs:
                snaps = [{}]
                item = jobstage.prolog(job, config, _Log())["results"][0]
                assert item["status"] == "staged" and item.get("image"), (item,
                                                                           _Log.lines[-5:])
                snaps.append(fs.snapshot())
                workload(item)
                snaps.append(fs.snapshot())
                jobstage.epilog(job, config, _Log())
            snaps.append(fs.stats or {})
            assert not image.mounts_under(base), "still mounted after the epilog"
            rows[f"{label}/{mode}"] = {phase: _phase(snaps[i + 1], snaps[i])
                                       for i, phase in enumerate(PHASES)}
    return rows


def _sum(phases: list) -> dict:
    return {"meta": sum(p["meta"] for p in phases), "reads": sum(p["reads"] for p in phases),
            "read_bytes": sum(p["read_bytes"] for p in phases),
            "files_read": sorted({f for p in phases for f in p["files_read"]})}


def requests_table(rows: dict, image_name: str, show_paths: int = 0) -> None:
    """The Markdown table of the shared filesystem's requests, with the
    issue's goals: 0 after staging when the image is copied; the image
    mounted in place: reads of one file (the image) and <= 10 metadata
    requests for the whole job."""
    def cell(p):
        files = ", ".join(f.rsplit("/", 1)[-1] for f in p["files_read"]) or "none"
        return (f"{p['meta']} metadata, {p['reads']} reads ({p['read_bytes'] / 1e6:.1f} MB"
                f"{'' if not p['reads'] else ': ' + files})")

    print("| shared filesystem | image | prolog | job (Python from the copy) | epilog | goal |")
    print("|---|---|---|---|---|---|")
    for key, phases in rows.items():
        label, mode = key.split("/")
        pro, job, epi = (phases[p] for p in PHASES)
        if mode == "image":
            after = _sum([job, epi])
            met = after["meta"] == 0 and after["reads"] == 0
            goal = (f"0 requests after staging: {after['meta'] + after['reads']} "
                    f"{'✅' if met else '❌'}")
        else:
            whole = _sum([pro, job, epi])
            one_file = [f.rsplit("/", 1)[-1] for f in whole["files_read"]] in ([image_name], [])
            met = whole["meta"] <= 10 and one_file
            goal = (f"whole job <= 10 metadata requests, reads of the image only: "
                    f"{whole['meta']}, {'image only' if one_file else 'other files too'} "
                    f"{'✅' if met else '❌'}")
        where = "copied to local disk" if mode == "image" else "mounted in place"
        print(f"| {label} | {where} | {cell(pro)} | {cell(job)} | {cell(epi)} | {goal} |")
    if show_paths:
        for key, phases in rows.items():
            for phase in PHASES:
                top = sorted(phases[phase]["paths"].items(), key=lambda kv: -kv[1])
                if not top:
                    continue
                print(f"\n{key}, {phase}: {phases[phase]['counts']}")
                for path, n in top[:show_paths]:
                    print(f"  {n:5d}  {path}")


def main(argv=None) -> int:
    import argparse

    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--only", choices=("all", "requests"), default="all")
    own.add_argument("--paths", type=int, default=0, metavar="N")
    opts, rest = own.parse_known_args(argv)
    args, lay, site, user = bench_args(__doc__, rest)
    account = Account.lookup(user=user.name)
    small = site.create_env(user, "cs-image-small", packages=("python", "prefix-probe"))
    base = Path(tempfile.mkdtemp(prefix="cs-bench-image-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    fuse_mode = os.stat("/dev/fuse").st_mode & 0o777
    os.chmod("/dev/fuse", 0o666)
    envs = {"jupyter": lay.native_env, "small": small}
    if opts.only == "requests":
        envs = {"small": small}
    results = {}
    try:
        for label, env in envs.items():
            t0 = time.perf_counter()
            run_as(account, _build, str(env), str(base / "jobs"), timeout=1800)
            build = time.perf_counter() - t0
            if opts.only == "requests":
                continue
            results[label] = measure(env, account, base, args.reps, label == "jupyter",
                                     lay.native_env)
            results[label]["build"] = [build]
            results[label]["image_bytes"] = [os.stat(env.parent / (env.name + image.SUFFIX))
                                             .st_size]
            results[label]["files"] = benchenv.tree_size(env)
        requests = shared_requests(small, account, base)
    finally:
        os.chmod("/dev/fuse", fuse_mode)
        for env in envs.values():  # hooks, tarballs and images go: as they were
            run_as(account, _disable, str(env), timeout=300)
            lock = env.parent / f".{env.name}.conda-stage.lock"
            lock.unlink(missing_ok=True)
        site.remove_env(user, small)
        subprocess.run(["chmod", "-R", "u+w", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)
    med = {}
    if results:
        print(f"\n{args.reps} samples per row, medians, image and extraction alternated\n")
        med = table(results)
    print("\nRequests to the shared filesystem (slowfs, counting only), small environment, "
          "one job:\n")
    requests_table(requests, small.name + image.SUFFIX, opts.paths)
    results["shared_requests"] = requests
    if args.out:
        args.out.write_text(json.dumps({"samples": results, "medians": med}, indent=1,
                                       default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
