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
  disk -- the reference;
* **local disk**: what each mode puts on the node (du of the store, not
  entering the mount).

Run as root: ``/opt/conda-stage/bin/python benchmarks/image.py [--reps N]``.
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


def _version(account: Account, python_prefix: str) -> float:
    def run(prefix):
        t0 = time.perf_counter()
        # as after 'conda activate': the entry points' shebang is '/usr/bin/env python'
        env = {**os.environ, "PATH": f"{prefix}/bin:/usr/bin:/bin", "CONDA_PREFIX": prefix}
        r = subprocess.run([f"{prefix}/bin/jupyter", "--version"], capture_output=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(r.stderr.decode())
        return time.perf_counter() - t0

    return run_as(account, run, python_prefix)


# image: copied to local disk, then mounted (the default); in place: mounted
# from where the user packed it (CONDA_STAGE_IMAGE_COPY=no)
MODES = ("image", "inplace", "extract")


def measure(env: Path, account: Account, base: Path, reps: int, jupyter: bool,
            native: Path | None) -> dict:
    samples = {f"{what}_{mode}": [] for what in ("stage", "teardown", "version", "disk")
               for mode in MODES}
    samples["version_native"] = []
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
                _version(account, item["path"])  # warm the page cache once
                samples[f"version_{mode}"].append(_version(account, item["path"]))
                samples["version_native"].append(_version(account, str(native)))
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
              f"{se / si:.1f}x faster | <= 0.2 s: {'pass' if si <= 0.2 else 'FAIL'} |")
        print(f"| {name} | tear down (epilog) | {ti:.3f} s | {tp:.3f} s | {te:.3f} s | "
              f"{te / ti:.1f}x faster | <= 0.05 s: {'pass' if ti <= 0.05 else 'FAIL'} |")
        # the folders (users/<uid>, the copy's, the mount point) are the
        # in-place row's: what the copied image adds is the image's own blocks
        di, dp = m["disk_image"], m["disk_inplace"]
        print(f"| {name} | local disk | {di / 1e6:.1f} MB | {dp / 1e6:.2f} MB (its folders) | "
              f"{m['disk_extract'] / 1e6:.0f} MB | | image's blocks <= the image "
              f"({m['image_bytes'] / 1e6:.1f} MB): "
              f"{'pass' if di - dp <= _blocks(m['image_bytes']) else 'FAIL'} |")
        if m.get("version_image"):
            vi, vp, ve = m["version_image"], m["version_inplace"], m["version_extract"]
            vn = m["version_native"]
            print(f"| {name} | jupyter --version (native {vn:.3f} s) | {vi:.3f} s "
                  f"({vi / vn:.2f}x native) | {vp:.3f} s ({vp / vn:.2f}x) | {ve:.3f} s "
                  f"({ve / vn:.2f}x) | | <= 1.10x native: "
                  f"{'pass' if vi <= 1.10 * vn else 'FAIL'} |")
        print(f"| {name} | build image (once, by the user) | {m['build']:.1f} s | | | | |")
    return med


WORKLOAD = "import json, sqlite3, ssl, xml.dom.minidom, email.parser, decimal"


def shared_requests(env: Path, account: Account, base: Path) -> dict:
    """What one job asks of the shared filesystem, with the environment
    served through slowfs (no latency: it only counts): with the image
    mounted in place, the whole job (prolog, a Python start importing
    ``WORKLOAD`` from the mount, epilog); with the image copied, the prolog
    -- after which the shared filesystem is unmounted and the job's Python
    still runs (so it asks nothing of it)."""
    from slowfs import mounted

    shared = base / "shared"
    shared.mkdir()
    rows = {}
    for mode in ("inplace", "image"):
        config = Config(staging_dir=str(base / "jobs"), state_dir=str(base / "state"),
                        share_copies=True, keep_unused=0.0, syslog=False, stage_mode="image",
                        image_copy=mode == "image", conda_root="")
        job = _job(config, account, 810000 + len(rows), shared / env.name)

        def workload(item):
            r = run_as(account, lambda: subprocess.run(
                [f"{item['path']}/bin/python", "-c", WORKLOAD], capture_output=True).returncode)
            assert r == 0, f"python from {item['path']} failed"

        with mounted(str(env.parent), str(shared), meta_latency_ms=0.0,
                     allow_other=True) as fs:
            item = jobstage.prolog(job, config, _Log())["results"][0]
            assert item["status"] == "staged" and item.get("image"), (item, _Log.lines[-5:])
            if mode == "inplace":
                workload(item)
                jobstage.epilog(job, config, _Log())
        if mode == "image":  # the shared filesystem is gone: the job still runs
            workload(item)
            jobstage.epilog(job, config, _Log())
        stats = fs.stats or {}
        counts = stats.get("counts", {})
        rows[mode] = {"meta": stats.get("meta_requests"), "reads": counts.get("read", 0),
                      "read_bytes": stats.get("bytes", {}).get("read", 0), "counts": counts}
    return rows


def main(argv=None) -> int:
    args, lay, site, user = bench_args(__doc__, argv)
    account = Account.lookup(user=user.name)
    small = site.create_env(user, "cs-image-small", packages=("python", "prefix-probe"))
    base = Path(tempfile.mkdtemp(prefix="cs-bench-image-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    fuse_mode = os.stat("/dev/fuse").st_mode & 0o777
    os.chmod("/dev/fuse", 0o666)
    envs = {"jupyter": lay.native_env, "small": small}
    results = {}
    try:
        for label, env in envs.items():
            t0 = time.perf_counter()
            run_as(account, _build, str(env), str(base / "jobs"), timeout=1800)
            build = time.perf_counter() - t0
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
    print(f"\n{args.reps} samples per row, medians, image and extraction alternated\n")
    med = table(results)
    ip, cp = requests["inplace"], requests["image"]
    print(f"\nshared filesystem, small environment, one job: image mounted in place: "
          f"{ip['meta']} metadata requests, {ip['reads']} reads ({ip['read_bytes'] / 1e6:.1f} MB) "
          f"for the whole job; image copied: {cp['meta']} metadata requests and {cp['reads']} "
          f"reads ({cp['read_bytes'] / 1e6:.1f} MB) in the prolog, none after it (the job ran "
          f"with the shared filesystem unmounted)")
    results["shared_requests"] = requests
    if args.out:
        args.out.write_text(json.dumps({"samples": results, "medians": med}, indent=1,
                                       default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
