#!/bin/bash
# probe_hook.sh KIND DIR - test prolog/epilog for the SGE harness.
#
# Configure it as a queue hook, e.g.
#   prolog  root@/…/probe_hook.sh prolog /var/tmp/conda-stage-tests/sge/probe
#   epilog  /…/probe_hook.sh uepilog /var/tmp/conda-stage-tests/sge/probe
# It records what a hook sees into DIR/log/KIND.JOB_ID.TASK (TASK is
# "undefined" for non-array jobs) and is steered by files in DIR/ctl/:
#   KIND.append  lines appended verbatim to $SGE_JOB_SPOOL_DIR/environment
#   KIND.sh      bash snippet run after recording (HOOK_TMPDIR = the job's
#                TMPDIR); its output goes to the job's output file
#   KIND.sleep   seconds to sleep before exiting
#   KIND.exit    exit code (default 0)
# DIR/log must be world-writable (1777) when the hook runs as the job owner.
set -u
kind=$1
dir=$2
log="$dir/log/$kind.${JOB_ID:-nojob}.${SGE_TASK_ID:-undefined}"
ctl="$dir/ctl"
spool=${SGE_JOB_SPOOL_DIR:-}
# TMPDIR is stripped from a root hook's environment (glibc secure-exec).
tmpdir=${TMPDIR:-${TMP:-$(sed -n 's/^tmpdir=//p' "$spool/config" 2>/dev/null)}}

{
  echo "=== id"
  id
  echo "=== args"
  echo "$*"
  echo "=== tmpdir"
  echo "$tmpdir"
  stat -c '%U %G %a' "$tmpdir" 2>&1
  echo "=== spool"
  ls -la "$spool" 2>&1
  echo "=== append"
  if [ -f "$ctl/$kind.append" ]; then
    if cat "$ctl/$kind.append" >> "$spool/environment"; then echo ok; else echo failed; fi
  else
    echo none
  fi
  echo "=== env"
  env | sort
  echo "=== end"
} > "$log.tmp" 2>&1
mv -f "$log.tmp" "$log"

if [ -f "$ctl/$kind.sh" ]; then HOOK_TMPDIR=$tmpdir bash "$ctl/$kind.sh"; fi
if [ -f "$ctl/$kind.sleep" ]; then sleep "$(cat "$ctl/$kind.sleep")"; fi
if [ -f "$ctl/$kind.exit" ]; then exit "$(cat "$ctl/$kind.exit")"; fi
exit 0
