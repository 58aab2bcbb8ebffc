"""Turn a results JSON of benchmarks/run.py into a Markdown table, and into a PNG
(through benchmarks/plot.py, run in a small venv holding matplotlib).

    python benchmarks/report.py benchmarks/results/latest.json [--png out.png]
"""
from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _s(t) -> str:
    if t is None:
        return "–"
    if t >= 100:
        return f"{t:.0f} s"
    if t >= 10:
        return f"{t:.1f} s"
    if t >= 1:
        return f"{t:.2f} s"
    return f"{t * 1000:.0f} ms"


def _ms(t) -> str:
    return "–" if t is None else f"{t:.1f} ms"


def _mb(b) -> str:
    return f"{b / 1e6:.1f} MB"


def _n(x) -> str:
    return f"{x:,}"


def _goal(res, key) -> str:
    ok = res.get("goals", {}).get(key)
    return "" if ok is None else (" ✅" if ok else " ❌")


def markdown(res: dict) -> str:
    m, env = res["machine"], res.get("env", {})
    lines = [
        "## Benchmark",
        "",
        f"*{m['date'][:10]}; {m['cpu']}, {m['cpus']} vCPUs, {m['memory_mib'] // 1024} GiB; "
        f"{m['os']}, kernel {m['kernel']}; local disk {m['disk']}; load average "
        f"{m['loadavg_start'][0]:.1f} at the start, {m['loadavg_end'][0]:.1f} at the end "
        f"(the VM was shared with other jobs); conda {m['conda']}, conda-pack {m['conda_pack']}, "
        f"conda-stage {m['conda_stage']} ({m['git']}); "
        f"{'quick run' if m['quick'] else 'full run'}, {m['runtime_s'] / 60:.0f} min. "
        f"Medians; `python benchmarks/run.py` reproduces it.*",
        "",
    ]
    if env:
        lines += [
            f"**Environment under test**: a conda environment (python 3.11 + pip from the test "
            f"channel, real conda) with the `jupyter` metapackage and its dependencies "
            f"pip-installed from wheels ({env['pip_distributions']} distributions): "
            f"**{_n(env['files'])} files**, {_n(env['dirs'])} folders, "
            f"**{env['bytes'] / 1e6:.0f} MB**; tar.zst {_mb(env['tar_zst_bytes'])}, "
            f"conda-pack's tar.gz {_mb(env['tar_gz_bytes'])}.",
            "",
            f"**Shared filesystem**: `benchmarks/slowfs.py`, a FUSE mirror that adds "
            f"**{m['latency_ms']:g} ms to every metadata request**. *No client cache* (its "
            f"default): every lookup and stat of every path component reaches the server, like a "
            f"cold client under load. *Client cache*: attributes, names and misses are cached for "
            f"1 s, like an NFS or Lustre client; each file then costs about one lookup plus one "
            f"open. Staged copies and the native install are on the VM's local disk.",
            "",
        ]
    lines += ["| | original tool / unstaged | conda-stage | reference | result |",
              "|---|---|---|---|---|"]
    st = res.get("startup")
    if st:
        md = st["median"]
        lines.append(
            f"| `jupyter --version`, env on the shared FS, no client cache "
            f"({_n(round(sum(st['slow_requests']) / len(st['slow_requests'])))} requests) | "
            f"{_s(md['slow'])} | {_s(md['staged'])} staged copy | {_s(md['native'])} native install | "
            f"**{st['speedup_vs_slow']:.0f}x faster**{_goal(res, 'startup >= 20x faster than slow FS')} (goal ≥20x); "
            f"{(st['staged_vs_native'] - 1) * 100:+.1f}% vs native"
            f"{_goal(res, 'startup within 5% of native')} (goal ≤5%) |")
        lines.append(
            f"| … with a client cache "
            f"({_n(round(sum(st['slow_cached_requests']) / len(st['slow_cached_requests'])))} requests) | "
            f"{_s(md['slow_cached'])} | {_s(md['staged'])} | | {st['speedup_vs_slow_cached']:.0f}x faster |")
    tr = res.get("strace")
    if tr:
        u, s = tr["unstaged_command"], tr["staged_command"]
        lines.append(
            f"| file-system calls of `jupyter --version` (strace) that reach the shared FS | "
            f"{_n(u['slow_calls'])} of {_n(u['calls'])} ({_n(u['slow_stat_calls'])} stat-like) | "
            f"**{_n(s['slow_calls'])}** of {_n(s['calls'])}"
            f"{_goal(res, '0 slow-FS calls from the staged command')} | | goal: 0 |")
        a, p = tr["auto_session"], tr["prestaged_session"]
        by = ", ".join(f"{k} {v}" for k, v in list(a.get("slow_by_program", {}).items())[:4])
        lines.append(
            f"| … whole session: `conda activate` (auto-staging) + command + `conda deactivate` | | "
            f"{_n(a['slow_calls'])} of {_n(a['calls'])} ({by}) | | staging reads the tarball "
            f"and checks it is fresh; the command itself: 0 |")
        lines.append(
            f"| … pre-staged copy (as a job prolog leaves it): activate + command + deactivate | | "
            f"**{_n(p['slow_calls'])}** of {_n(p['calls'])}"
            f"{_goal(res, '0 slow-FS calls in a pre-staged session')} | | goal: 0 |")
    pk = res.get("pack")
    if pk and "samples" in pk:
        c, b = pk["cores"], pk["bytes"]
        for case, label in (("local_warm", "env on local disk, warm page cache"),
                            ("local_cold", "env on local disk, page caches dropped"),
                            ("slow", "env on the shared FS (client cache), caches dropped")):
            md = pk["median"][case]
            goal = {"local_warm": "pack <= 1.25x the floor (local disk, warm cache)",
                    "local_cold": "pack <= 1.25x the floor (local disk, cold cache)"}.get(case)
            result = (f"**{pk['vs_floor'][case]:.2f}x the floor**{_goal(res, goal)} (goal ≤1.25x)"
                      if goal else f"{pk['vs_floor'][case]:.2f}x the floor")
            if case == "slow":
                result += (f"; {pk['vs_condapack'][case]:.1f}x faster than conda-pack's default"
                           f"{_goal(res, 'pack >= 8x faster than conda-pack' + chr(39) + 's default (slow FS)')}"
                           f" (goal ≥8x)")
            else:
                result += f"; {pk['vs_condapack'][case]:.1f}x faster than conda-pack's default"
            result += f", {pk['vs_condapack_best'][case]:.1f}x than its best"
            lines.append(
                f"| pack, {label} | conda-pack: default (tar.gz, 1 thread) {_s(md['condapack'])}; "
                f"`-j {c}` (parallel gzip) {_s(md['condapack_j'])}"
                + (f"; `tar.zst` {_s(md['condapack_zst'])}" if "condapack_zst" in md else "")
                + f" | **{_s(md['ours'])}** `--pack --force` (tar.zst level 3, "
                f"{c} threads) | floor `tar -cf - . \\| zstd -3 -T{c}` {_s(md['floor'])} | {result} |")
        lines.append(
            f"| archive size | conda-pack: tar.gz {_mb(b['condapack'])}, `-j {c}` "
            f"{_mb(b['condapack_j'])}, tar.zst {_mb(b['condapack_zst'])} | {_mb(b['ours'])} tar.zst | "
            f"floor {_mb(b['floor'])} | {pk['size_vs_floor']:.2f}x the floor's; "
            f"{pk['size_vs_gz']:.2f}x the tar.gz{_goal(res, 'archive <= 1.1x the gzip size')} (goal ≤1.1x) |")
    sg = res.get("stage")
    if sg:
        for where, label, sfx in (("disk", "local disk (ext4)", ""), ("tmpfs", "tmpfs (/dev/shm)", " (tmpfs)")):
            if where not in sg:
                continue
            r = sg[where]
            md = r["median"]
            lines.append(
                f"| stage to {label}; tarball on the shared FS, page caches dropped | "
                f"{_s(md['original'])}: `tar -xf` .tar.gz {_s(md['original_tar'])} + `conda-unpack` "
                f"{_s(md['original_unpack'])} + `chmod -R` {_s(md['original_chmod'])} | "
                f"**{_s(md['ours'])}** `--stage` (extract {_s(md.get('ours_extract'))}) | "
                f"{_s(md['floor'])} `tar -xf` of the uncompressed tar | "
                f"{r['speedup_vs_original']:.1f}x faster"
                f"{_goal(res, 'stage >= 2x faster than tar -xzf + conda-unpack' + sfx)} (goal ≥2x); "
                f"{r['vs_floor']:.2f}x the floor{_goal(res, 'stage <= 1.5x plain tar -x' + sfx)} "
                f"(goal ≤1.5x) |")
        r = sg["disk"]
        md = r["median"]
        lines.append(
            f"| teardown of the staged copy (local disk) | {_s(md['teardown_original'])} `chmod -R u+w` "
            f"+ `rm -rf` | {_s(md['teardown_ours'])} `--unstage` | {_s(md['teardown_rm'])} `rm -rf` | "
            f"{r['teardown_vs_rm']:.2f}x `rm -rf` |")
    hk = res.get("hooks")
    if hk:
        md = hk["median_ms"]
        lines.append(
            f"| prolog of a job that declares no environment | | `slurm-prolog` {_ms(md['slurm_prolog'])}, "
            f"`sge-prolog` {_ms(md['sge_prolog'])} | `/bin/true` {_ms(md['baseline_true'])}; "
            f"the Python hook without the shell fast path {_ms(md['python_hook_no_fast_path'])} | |")
        job = hk.get("job") or {}
        if "median" in job:
            j = job["median"]
            lines.append(
                f"| job that declares the env: Slurm prolog stages it, epilog removes it | | "
                f"prolog {_s(j['prolog'])}, epilog {_s(j['epilog'])} | `rm -rf` {_s(j['rm_rf'])} | |")
        elif job.get("error"):
            lines.append(f"| job prolog/epilog | | not measured: {job['error'].splitlines()[0][:120]} | | |")
    cy = res.get("cycle")
    if cy:
        md = cy["median"]
        if "original" in md:
            orig = f"{_s(md['original'])} (conda-stage {cy.get('original_version') or '0.7'}, from --original)"
            result = (f"**{cy['speedup_vs_original']:.1f}x faster**"
                      f"{_goal(res, 'interactive cycle >= 3x faster than the original tool')} (goal ≥3x)")
        else:
            orig, result = f"skipped ({cy.get('skipped', 'no --original given')})", "goal ≥3x: not measured"
        bg = md.get("background_removal")
        bg = f" (the copy's files deleted in the background, done {_s(bg)} later)" if bg else ""
        lines.append(
            f"| interactive cycle: `conda activate` of the auto-staged env + `conda deactivate` "
            f"(shared FS, client cache) | {orig} | **{_s(md['ours'])}**{bg} | plain conda, no "
            f"staging {_s(md['plain'])} | {result} |")
        if "image" in md:
            if "original" in md:
                result = (f"**{cy['image_speedup_vs_original']:.1f}x faster**"
                          f"{_goal(res, 'interactive cycle >= 3x faster than the original tool, with shell images')}"
                          f" (goal ≥3x)")
            lines.append(
                f"| the same, with shell images (`CONDA_STAGE_SHELL_IMAGES=yes`: the env's image "
                f"copied to local disk and mounted) | {orig} | **{_s(md['image'])}** | plain "
                f"conda, no staging {_s(md['plain'])} | {result} |")
    lines.append("")
    goals = res.get("goals", {})
    if goals:
        met = [k for k, v in goals.items() if v]
        missed = [k for k, v in goals.items() if not v]
        lines.append(f"Goals met: {len(met)} of {len(goals)}"
                     + (f"; missed: {'; '.join(missed)}." if missed else "."))
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(results_json: Path, png: Path, venv_dir: Path) -> bool:
    """Draw the PNG with matplotlib from a venv of its own (created on first use)."""
    py = venv_dir / "bin" / "python"
    try:
        if not py.exists() or subprocess.run([str(py), "-c", "import matplotlib"],
                                             capture_output=True).returncode:
            print(f"[bench] creating {venv_dir} with matplotlib (once)", file=sys.stderr)
            venv.EnvBuilder(with_pip=True, clear=True).create(venv_dir)
            subprocess.run([str(py), "-m", "pip", "install", "-q", "matplotlib"], check=True,
                           capture_output=True)
        subprocess.run([str(py), str(HERE / "plot.py"), str(results_json), str(png)], check=True)
        return True
    except (subprocess.CalledProcessError, OSError) as exc:
        print(f"[bench] no plot: {exc}", file=sys.stderr)
        return False


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--png")
    a = ap.parse_args()
    data = json.loads(Path(a.results).read_text())
    print(markdown(data))
    if a.png:
        plot(Path(a.results), Path(a.png), Path("/var/tmp/conda-stage-bench/plot-venv"))
