#!/bin/bash
#SBATCH --job-name=staged-jupyter
#SBATCH --comment=conda_env=myjupyter      # several: conda_env=myjupyter:tools
#SBATCH --time=00:10:00

# The Prolog staged myjupyter onto this node's local disk before this script
# started; the TaskProlog pointed conda at the copy.  No trap, no cleanup:
# the Epilog removes the copy, also after scancel, a time-out or a crash.
# shellcheck source=/dev/null
source "$HOME/miniforge3/etc/profile.d/conda.sh"    # or: module load miniforge3

conda activate myjupyter         # -> <staging dir>/<job id>/envs/myjupyter
command -v python
jupyter --version
