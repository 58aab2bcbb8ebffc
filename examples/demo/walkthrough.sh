#!/bin/bash
# The conda-stage walkthrough, replayed live like a terminal session: every
# command is echoed with a prompt, then run in THIS shell (conda activate
# changes the shell), and its effect is checked.  Run by examples/demo/run.sh
# as the unprivileged demo user; you can also run it yourself as any user who
# has the conda environment ENV and 'conda-stage' on PATH:
#     bash walkthrough.sh INIT_FILE [ENV]
# INIT_FILE  the site conda's init file (sourcing it defines the 'conda' function)
# ENV        the environment to stage (default: myjupyter)
# Exits non-zero, with a "DEMO FAILED:" line, at the first step that fails.
# Leaves auto-staging disabled again, so it can be replayed.
set -euo pipefail

init=${1:?usage: walkthrough.sh INIT_FILE [ENV]}
env_name=${2:-myjupyter}
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
left=$(find "$base" -maxdepth 1 -name 'conda-stage-*' -user "$(id -u)" 2>/dev/null)
[ -z "$left" ] || fail "staged folders left behind in $base: $left"
ok "no conda-stage-* folder of $USER left in $base"

note "Skip staging for one activation"
run "CONDA_STAGE=false conda activate $env_name"
run_out "command -v python"
[ "$OUT" = "$original/bin/python" ] || fail "python is $OUT, not the original $original/bin/python"
ok "the original environment, unstaged"
run "conda deactivate"

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
