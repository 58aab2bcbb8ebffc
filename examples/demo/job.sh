#!/bin/bash
#SBATCH --job-name=myjupyter-demo
#SBATCH --comment=conda_env=myjupyter      # the Prolog stages myjupyter on the node
#SBATCH --output=myjupyter-job.out         # in the folder sbatch was run from
#SBATCH --time=00:05:00

# The conda-stage demo's batch job, submitted by walkthrough.sh as the demo
# user:  sbatch job.sh CONDA_INIT_FILE
# Like examples/slurm/job.sh: no staging command, no trap, no cleanup.  The
# Prolog staged myjupyter before this script started, the TaskProlog printed
# the "conda-stage: staged ..." line above our output and pointed conda at the
# copy, and the Epilog removes it after the job.  It prints what it saw.

# shellcheck source=/dev/null
source "${1:?usage: sbatch job.sh CONDA_INIT_FILE}"   # on a cluster: module load miniforge3

t0=$EPOCHREALTIME
conda activate myjupyter || exit 1
t1=$EPOCHREALTIME

echo "job:               $SLURM_JOB_ID on $(hostname -s), folder ${CONDA_STAGE_JOB_DIR:-(none)}"
echo "conda activate:    $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}') s"
echo "CONDA_PREFIX:      $CONDA_PREFIX"
real=$(realpath "$CONDA_PREFIX")
[ "$real" = "$CONDA_PREFIX" ] || echo "real path:         $real"
echo "command -v python: $(command -v python)"
echo "sys.prefix:        $(python -c 'import sys; print(sys.prefix)')"
echo "prefix-probe:      $(prefix-probe | paste -sd ' ')"   # prefixes compiled into a binary and a .so
