#!/bin/bash
# The conda-stage walkthrough, replayed live like a terminal session: every
# command is echoed with a prompt, then run in THIS shell (conda activate
# changes the shell), and its effect is checked.  Run by examples/demo/run.sh
# as the unprivileged demo user; you can also run it yourself as any user who
# has the conda environment ENV and 'conda-stage' on PATH:
#     bash walkthrough.sh INIT_FILE [ENV [JOB_SCRIPT]]
# INIT_FILE   the site conda's init file (sourcing it defines the 'conda' function)
# ENV         the environment to stage (default: myjupyter)
# JOB_SCRIPT  also submit this batch job (examples/demo/job.sh, which declares
#             conda_env=ENV) to the Slurm that $SLURM_CONF names, whose Prolog
#             and Epilog are conda-stage's, and check what it saw and left
# Exits non-zero, with a "DEMO FAILED:" line, at the first step that fails.
# Leaves auto-staging disabled again, so it can be replayed.
set -euo pipefail

init=${1:?usage: walkthrough.sh INIT_FILE [ENV [JOB_SCRIPT]]}
env_name=${2:-myjupyter}
job_script=${3:-}
base=${TMPDIR:-/tmp}
host=$(hostname -s 2>/dev/null || echo localhost)
checks=0

if [ -t 1 ]; then bold=$'\e[1m' dim=$'\e[2m' off=$'\e[0m'; else bold="" dim="" off=""; fi

fail() {
    printf '\nDEMO FAILED: %s\n' "$*" >&2
    exit 1
}

# On failure, leave no staged copy behind: deactivate whatever is active
# (the auto-unstage hook removes a staged copy).
cleanup() {
    local rc=$?
    if [ "$rc" != 0 ]; then
        set +eu
        while [ "${CONDA_SHLVL:-0}" -gt 0 ] 2>/dev/null; do
            conda deactivate >/dev/null 2>&1 || break
        done
    fi
    exit "$rc"
}
trap cleanup EXIT

# The prompt of the walkthrough: "(staged prefix) [alice@dev1 ~]$ "
prompt() {
    printf '%s%s[%s@%s ~]$ %s' "$bold" "${CONDA_PROMPT_MODIFIER:-}" "$USER" "$host" "$off"
}

# run CMD: echo CMD after a prompt, then run it in this shell; it must succeed.
run() {
    prompt
    printf '%s%s%s\n' "$bold" "$1" "$off"
    eval "$1" || fail "'$1' exited with status $?"
}

# run_out CMD: like run, and keep its stdout in $OUT (it runs in a subshell,
# so only for commands that do not change the shell).
run_out() {
    prompt
    printf '%s%s%s\n' "$bold" "$1" "$off"
    local rc=0
    OUT=$(eval "$1") || rc=$?
    [ -z "$OUT" ] || printf '%s\n' "$OUT"
    [ "$rc" = 0 ] || fail "'$1' exited with status $rc"
}

# show CMD: echo and run CMD whatever its exit status (for "prints nothing"
# and "is gone" commands); stdout in $OUT.
show() {
    prompt
    printf '%s%s%s\n' "$bold" "$1" "$off"
    OUT=$(eval "$1" 2>&1) || true
    [ -z "$OUT" ] || printf '%s\n' "$OUT"
}

ok() {
    checks=$((checks + 1))
    printf '%s    # ok: %s%s\n' "$dim" "$*" "$off"
}

note() {
    printf '\n%s# %s%s\n' "$dim" "$*" "$off"
}

# --------------------------------------------------------------------------
# shellcheck source=/dev/null
. "$init" || fail "sourcing $init failed"
command -v conda-stage >/dev/null || fail "'conda-stage' is not on PATH ($PATH)"
original=$(conda env list | awk -v n="$env_name" '$1 == n {print $NF}') || fail "'conda env list' failed"
if [ -z "$original" ] || [ ! -d "$original" ]; then
    fail "no conda environment named '$env_name' (see 'conda env list')"
fi

note "Configure environment '$env_name' for automatic staging (once)"
run "conda stage --auto-stage=enable $env_name"
[ -f "$original/etc/conda/activate.d/zzz.conda-stage-auto.sh" ] || fail "no activate hook in $original"
ok "auto-staging enabled; tarball packed next to $original"

note "Activate it as usual: it is staged to local disk"
run "conda activate $env_name"
staged=${CONDA_PREFIX:-}
case "$staged" in
    "$base"/conda-stage-*/"$env_name") ok "active environment is the staged copy $staged" ;;
    *) fail "expected a staged copy in $base/conda-stage-*/$env_name, CONDA_PREFIX is '$staged'" ;;
esac
run_out "command -v python"
[ "$OUT" = "$staged/bin/python" ] || fail "python is $OUT, not $staged/bin/python"
ok "python runs from local disk"
run_out "python -c 'import sys; print(sys.prefix)'"
[ "$OUT" = "$staged" ] || fail "sys.prefix is $OUT, not $staged"
ok "sys.prefix is the staged copy"
run_out "prefix-probe"
printf '%s\n' "$OUT" | grep -qxF "exe:$staged" || fail "prefix-probe's executable still holds another prefix"
printf '%s\n' "$OUT" | grep -qxF "lib:$staged/lib" || fail "prefix-probe's library still holds another prefix"
ok "prefixes compiled into the binary and the shared library were relocated"

note "Deactivate: the staged copy is removed"
run "conda deactivate"
[ -z "${CONDA_PREFIX:-}" ] || fail "still active after deactivate: $CONDA_PREFIX"
show "command -v python"
case "$OUT" in "$staged"/*) fail "python still resolves into the removed copy: $OUT" ;; esac
ok "python is back to the system's (${OUT:-none on this machine})"
show "ls -d $(dirname "$staged")"
[ ! -e "$(dirname "$staged")" ] || fail "$(dirname "$staged") was not removed"
# 'conda deactivate' renamed the copy's folder to *.trash and returned; a
# process in the background deletes its files: wait for it (up to 30 s)
tenths=0
while left=$(find "$base" -maxdepth 1 -name 'conda-stage-*' -user "$(id -u)" 2>/dev/null) \
    && [ -n "$left" ] && [ "$tenths" -lt 300 ]; do
    sleep 0.1
    tenths=$((tenths + 1))
done
[ -z "$left" ] || fail "staged folders left behind in $base: $left"
ok "no conda-stage-* folder of $USER left in $base (deleted in the background within $((tenths / 10)).$((tenths % 10)) s)"

note "Skip staging for one activation"
run "CONDA_STAGE=false conda activate $env_name"
run_out "command -v python"
[ "$OUT" = "$original/bin/python" ] || fail "python is $OUT, not the original $original/bin/python"
ok "the original environment, unstaged"
run "conda deactivate"

# wait_gone JOBID: poll squeue until the job has left the queue (its Epilog
# has finished), printing the states it went through; $WAITED: seconds since $1.
wait_gone() {
    local jid=$1 since=$2 state last="" states="" deadline=$((SECONDS + 300))
    while :; do
        state=$(squeue -h -j "$jid" -o %T 2>/dev/null) || state=""
        case "$state" in PENDING | CONFIGURING | RUNNING | COMPLETING) ;; *) break ;; esac
        if [ "$state" != "$last" ]; then
            states+="$state -> "
            last=$state
        fi
        [ "$SECONDS" -lt "$deadline" ] || fail "job $jid still $state after 300 s"
        sleep 0.2
    done
    WAITED=$(awk -v a="$since" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}')
    printf '%s    # job %s: %sleft the queue %s s after sbatch%s\n' "$dim" "$jid" "$states" "$WAITED" "$off"
}

# field NAME: the value of the job output's "NAME: value" line
field() {
    printf '%s\n' "$JOB_OUT" | sed -n "s/^$1: *//p" | head -n 1
}

if [ -n "$job_script" ]; then
    [ -n "${SLURM_CONF:-}" ] || fail "a job script was given but SLURM_CONF is not set"
    [ -r "$job_script" ] || fail "cannot read the job script $job_script"
    job_out=$env_name-job.out    # the script's '#SBATCH --output', relative to this folder
    rm -f "$job_out"

    note "In a batch job: declare the environment; the Prolog stages it before the job starts, the Epilog removes it"
    run "cat $job_script"
    # Slurm's view: the job ends when its Epilog has finished.
    t_submit=$EPOCHREALTIME
    run_out "sbatch $job_script $init"
    jid=$(printf '%s\n' "$OUT" | awk '/^Submitted batch job/ {print $4}')
    [ -n "$jid" ] || fail "no job id in sbatch's output"
    wait_gone "$jid" "$t_submit"
    info=$(scontrol -o show job "$jid" 2>&1) || fail "scontrol show job $jid: $info"
    case " $info " in
        *" JobState=COMPLETED "*" ExitCode=0:0 "*) ok "job $jid completed (ExitCode=0:0)" ;;
        *) fail "job $jid did not complete: $(printf '%s\n' "$info" | grep -o 'JobState=[^ ]*\|ExitCode=[^ ]*\|Reason=[^ ]*' | paste -sd ' ')" ;;
    esac

    note "What the job printed: the TaskProlog's line, then the script's"
    run_out "cat $job_out"
    JOB_OUT=$OUT
    # The TaskProlog's line: "staged NAME to PATH in N s", or "NAME is staged at PATH"
    # (a copy the node already had).
    staged_line=$(printf '%s\n' "$JOB_OUT" | grep -m 1 -E "^conda-stage: (staged $env_name to|$env_name is staged at) /") \
        || fail "the job's output has no 'conda-stage: staged $env_name to ...' line"
    prefix=$(field CONDA_PREFIX)
    real=$(field 'real path')
    job_dir=$(field job | sed -n 's/.*, folder //p')
    [ -n "$prefix" ] || fail "the job printed no CONDA_PREFIX (did 'conda activate $env_name' work?)"
    [ "$prefix" != "$original" ] || fail "the job ran the original environment $original, not a staged copy"
    case "$staged_line" in
        *" $prefix "* | *" $prefix;"* | *" ${real:-$prefix} "* | *" ${real:-$prefix};"*) ;;
        *) fail "the job's conda activated $prefix, but the TaskProlog said: $staged_line" ;;
    esac
    took=$(printf '%s\n' "$staged_line" | sed -n 's/.* in \([0-9.]*\) s;.*/\1 s/p')
    ok "the Prolog staged it before the job started (${took:-a copy the node already had}); in the job, conda activate took $(field 'conda activate')"
    [ "$(field 'command -v python')" = "$prefix/bin/python" ] \
        || fail "the job's python is $(field 'command -v python'), not $prefix/bin/python"
    [ "$(field sys.prefix)" = "$prefix" ] || fail "the job's sys.prefix is $(field sys.prefix), not $prefix"
    [ "$(field prefix-probe)" = "exe:$prefix lib:$prefix/lib" ] || fail "prefix-probe in the job: $(field prefix-probe)"
    ok "conda activate $env_name in the job landed on the node-local copy $prefix"
    case "$job_dir" in /*) ;; *) fail "the job printed no job folder (CONDA_STAGE_JOB_DIR)" ;; esac

    note "After the job: the Epilog removed the job's folder and the copy it ran from"
    show "ls -d $job_dir $prefix${real:+ $real}"
    for path in "$job_dir" "$prefix" ${real:+"$real"}; do
        if [ -e "$path" ] || [ -L "$path" ]; then fail "$path is still there after the job"; fi
    done
    show "ls -A $(dirname "$job_dir")"
    ok "nothing of job $jid left on the node"
fi

note "What conda-stage knows about the environment"
run_out "conda stage status $env_name"
printf '%s\n' "$OUT" | grep -q "^Auto-staging: enabled" || fail "status does not say auto-staging is enabled"
printf '%s\n' "$OUT" | grep -q "; fresh$" || fail "status does not say the tarball is fresh"
ok "enabled, tarball fresh"

note "Disable auto-staging again (removes the hooks and the tarball), so the demo can be replayed"
run "conda stage --auto-stage=disable $env_name"
[ ! -e "$original/etc/conda/activate.d/zzz.conda-stage-auto.sh" ] || fail "activate hook still in $original"
ok "auto-staging disabled"

printf '\nWalkthrough complete: %d checks passed.\n' "$checks"
