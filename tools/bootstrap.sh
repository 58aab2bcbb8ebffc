#!/bin/bash
# Install what conda-stage's tests and demo need on a fresh Debian 12 machine
# (as root): a few Debian packages, and a world-readable venv with conda-stage
# installed from this checkout -- a real (not editable) install, as a site
# would do it: job users run it from hooks, and the checkout may not be
# readable by them.  Schedulers (Slurm, SGE) are installed by the
# test suite itself when their tests run.  Idempotent and quick when done.
#   tools/bootstrap.sh            ->  prints the venv's python on stdout
# CONDA_STAGE_VENV  venv location (default /opt/conda-stage, the documented
#                   site install; the scheduler hooks find Python there)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${CONDA_STAGE_VENV:-/opt/conda-stage}
log=${TMPDIR:-/tmp}/conda-stage-bootstrap.log

if [ "$(id -u)" != 0 ]; then
    echo "bootstrap: run as root (the tests create users and start schedulers)" >&2
    exit 1
fi
need=()
for pkg in python3-venv zsh strace shellcheck fuse3 squashfuse squashfs-tools gcc binutils zstd util-linux; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "bootstrap: apt-get install ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -q >"$log" 2>&1 || true
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${need[@]}" >>"$log" 2>&1 \
        || { tail -20 "$log" >&2; exit 1; }
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "bootstrap: creating $venv" >&2
    /usr/bin/python3 -m venv "$venv"
fi
pip=("$venv/bin/pip" install -q --disable-pip-version-check)
if ! "$venv/bin/python" -c 'import plumbum, psutil, zstandard, conda_pack, yaml, pytest, mfusepy, hypothesis' 2>/dev/null \
    || [ "$here/pyproject.toml" -nt "$venv/.conda-stage-deps" ]; then
    echo "bootstrap: installing dependencies into $venv" >&2
    "${pip[@]}" "${here}[test]" setuptools wheel >>"$log" 2>&1 || { tail -20 "$log" >&2; exit 1; }
    touch "$venv/.conda-stage-deps"
fi
# This checkout's code, freshly (a few seconds, offline).
"${pip[@]}" --no-deps --no-build-isolation --force-reinstall "$here" >>"$log" 2>&1 \
    || { tail -20 "$log" >&2; exit 1; }
rm -rf "$here/build" "$here"/*.egg-info
chmod -R a+rX "$venv"
echo "$venv/bin/python"
