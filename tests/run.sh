#!/bin/bash
# Run conda-stage's test suite (as root, on Debian 12): installs what it needs
# (tools/bootstrap.sh), then pytest.  The suite builds a real conda, starts a
# real Slurm and a real SGE, and runs jobs as unprivileged users.
#   tests/run.sh                 # everything
#   tests/run.sh -m 'not sge'    # any pytest arguments
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
python=$("$here/tools/bootstrap.sh")
cd "$here"
exec "$python" -m pytest "$@"
