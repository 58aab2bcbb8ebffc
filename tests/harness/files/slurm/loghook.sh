#!/bin/bash
# Logging hook for the Slurm test harness self-test (tests/test_slurm_harness.py).
# One script serves as Prolog, Epilog, TaskProlog and TaskEpilog: which one it is comes from
# SLURM_SCRIPT_CONTEXT (prolog_slurmd, epilog_slurmd, prolog_task, epilog_task).
#
# Every run writes two files into LOGDIR = the directory "hooklog" next to this script:
#   <context>.<jobid>.<pid>.meta   key=value lines: hook, jobid, pid, uid, user, gid, cwd, start, end
#   <context>.<jobid>.<pid>.env    the hook's environment, NUL-separated (env -0)
# Marker files in LOGDIR change its behaviour (used to test failure paths):
#   FAIL_<context>    exit 7 instead of 0
#   SLEEP_<context>   sleep that many seconds (file content) before finishing
# As a TaskProlog it prints "export CS_HARNESS_TASKPROLOG=job_<jobid>" and a "print ..." line;
# slurmstepd turns those into a job environment variable and a line in the job's stdout.
# Prolog and Epilog get no PATH from slurmd; bash's built-in default PATH finds id and date.

CONTEXT="${SLURM_SCRIPT_CONTEXT:-unknown}"
JOBID="${SLURM_JOB_ID:-${SLURM_JOBID:-nojob}}"
LOGDIR="$(dirname "$(readlink -f "$0")")/hooklog"
BASE="$LOGDIR/$CONTEXT.$JOBID.$$"

{
  echo "hook=$CONTEXT"
  echo "script=$0"
  echo "jobid=$JOBID"
  echo "pid=$$"
  echo "uid=$(id -u)"
  echo "gid=$(id -g)"
  echo "user=$(id -un)"
  echo "cwd=$(pwd)"
  echo "start=$(date +%s.%N)"
} > "$BASE.meta"
env -0 > "$BASE.env"

if [ "$CONTEXT" = prolog_task ]; then
  echo "export CS_HARNESS_TASKPROLOG=job_$JOBID"
  echo "print CS_HARNESS task prolog print line for job $JOBID"
fi

rc=0
if [ -f "$LOGDIR/SLEEP_$CONTEXT" ]; then
  sleep "$(cat "$LOGDIR/SLEEP_$CONTEXT")"
fi
if [ -f "$LOGDIR/FAIL_$CONTEXT" ]; then
  echo "CS_HARNESS $CONTEXT injected failure" >&2
  rc=7
fi
{
  echo "rc=$rc"
  echo "end=$(date +%s.%N)"
} >> "$BASE.meta"
exit "$rc"
