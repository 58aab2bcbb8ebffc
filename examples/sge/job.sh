#!/bin/bash
#$ -S /bin/bash
#$ -cwd
#$ -j y
#$ -l conda_env=myjupyter                  # several: conda_env=myjupyter:tools

# The prolog staged myjupyter into this job's $TMPDIR before this script
# started.  No trap needed: the epilog (and execd) remove it, also after
# qdel, h_rt or a killed job shell.
# shellcheck source=/dev/null
source "$HOME/miniforge3/etc/profile.d/conda.sh"    # or: module load CBI miniforge3

conda activate myjupyter         # -> $TMPDIR/conda-stage/envs/myjupyter
command -v python
jupyter --version
