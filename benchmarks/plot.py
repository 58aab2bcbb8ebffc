"""Plot a results JSON of benchmarks/run.py: python plot.py RESULTS.json OUT.png

Needs matplotlib; run.py runs it in a venv of its own (see report.plot)."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ORIG, OURS, REF = "#c44e52", "#4c72b0", "#8c8c8c"


def bars(ax, title, items, unit="s", log=False):
    """items: (label, samples, colour)"""
    items = [(label, xs, c) for label, xs, c in items if xs]
    meds = [sorted(xs)[len(xs) // 2] if len(xs) % 2 else
            (sorted(xs)[len(xs) // 2 - 1] + sorted(xs)[len(xs) // 2]) / 2 for _, xs, _ in items]
    y = range(len(items))
    ax.barh(list(y), meds, color=[c for _, _, c in items], height=0.6)
    for i, (_, xs, _) in enumerate(items):
        ax.plot(xs, [i] * len(xs), "k|", markersize=9, alpha=0.6)
    top = max(max(xs) for _, xs, _ in items)
    for i, (v, (_, xs, _)) in enumerate(zip(meds, items)):
        text = f"{v:.2f} {unit}" if v < 10 else f"{v:.0f} {unit}"
        right = max(xs)  # right of the samples' ticks
        ax.text(right * 1.12 if log else right + top * 0.02, i, text, va="center", fontsize=8)
    ax.set_yticks(list(y))
    ax.set_yticklabels([label for label, _, _ in items], fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10, loc="left")
    if log:
        ax.set_xscale("log")
        ax.set_xlim(min(meds) / 2, top * 6)
    else:
        ax.set_xlim(0, top * 1.25)
    ax.set_xlabel(unit, fontsize=8)
    ax.tick_params(axis="x", labelsize=8)


def main(src, out):
    r = json.load(open(src))
    m = r["machine"]
    panels = [k for k in ("startup", "pack", "stage", "cycle") if k in r and
              not (k == "cycle" and "ours" not in r[k])]
    heights = {"startup": 4, "pack": 10, "stage": 9, "cycle": 3}
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 0.45 * sum(heights[p] for p in panels) + 1.2),
                             gridspec_kw={"height_ratios": [heights[p] for p in panels]})
    if len(panels) == 1:
        axes = [axes]
    for ax, k in zip(axes, panels):
        d = r[k]
        if k == "startup":
            bars(ax, "jupyter --version (log scale)", [
                ("env on shared FS, no client cache", d["slow"], ORIG),
                ("env on shared FS, client cache", d["slow_cached"], ORIG),
                ("conda-stage staged copy", d["staged"], OURS),
                ("native install on local disk", d["native"], REF)], log=True)
        elif k == "pack":
            items = []
            for case, label in (("local_warm", "local disk, warm"), ("local_cold", "local disk, cold"),
                                ("slow", "shared FS")):
                sm = d["samples"][case]
                items += [(f"{label}: conda-pack (default)", sm["condapack"], ORIG),
                          (f"{label}: conda-pack -j {d['cores']}", sm["condapack_j"], ORIG),
                          (f"{label}: conda-pack tar.zst", sm.get("condapack_zst"), ORIG),
                          (f"{label}: conda-stage --pack", sm["ours"], OURS),
                          (f"{label}: floor, tar | zstd -T{d['cores']}", sm["floor"], REF)]
            bars(ax, "pack the environment", items)
        elif k == "cycle":
            bars(ax, "conda activate + conda deactivate (auto-staged env)", [
                ("original conda-stage 0.7", d.get("original", []), ORIG),
                ("conda-stage", d["ours"], OURS),
                ("plain conda, no staging", d["plain"], REF)])
        else:
            t = d.get("tmpfs")
            d = d["disk"]
            bars(ax, "stage (tarball on the shared FS), and tear down", [
                ("tar -xf .tar.gz + conda-unpack + chmod", d["original"], ORIG),
                ("conda-stage --stage", d["ours"], OURS),
                ("floor: tar -xf of the uncompressed tar", d["floor"], REF),
                ("teardown: chmod -R u+w + rm -rf", d["teardown_original"], ORIG),
                ("teardown: conda-stage --unstage", d["teardown_ours"], OURS),
                ("teardown: rm -rf", d["teardown_rm"], REF)]
                + ([("tmpfs: tar -xf .tar.gz + conda-unpack + chmod", t["original"], ORIG),
                    ("tmpfs: conda-stage --stage", t["ours"], OURS),
                    ("tmpfs: floor, tar -xf", t["floor"], REF)] if t else []))
    env = r.get("env", {})
    fig.suptitle(f"conda-stage benchmark, {m['date'][:10]}: {env.get('files', 0):,} files, "
                 f"{env.get('bytes', 0) / 1e6:.0f} MB env; shared FS = slowfs "
                 f"{m['latency_ms']:g} ms/metadata request; {m['cpus']} vCPUs",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
