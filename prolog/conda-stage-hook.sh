#!/bin/bash -p
# conda-stage's scheduler hooks: one script, started under five names; the
# name chooses the hook (prolog/ and epilog/ hold symlinks to this file;
# copy or link it under these names):
#   slurm-prolog       slurm.conf  Prolog=...      as root; PrologFlags=Alloc
#   slurm-task-prolog  slurm.conf  TaskProlog=...  as the job user
#   slurm-epilog       slurm.conf  Epilog=...      as root
#   sge-prolog         queue       prolog  root@.../sge-prolog
#   sge-epilog         queue       epilog  root@.../sge-epilog
# Each returns at once when the job has nothing to do with conda-stage, and
# otherwise runs 'python -I -m conda_stage.hooks NAME'.
#
# Trust: bash -p ignores BASH_ENV, ENV and exported functions; nothing from
# the job's environment is used but the scheduler's own variables below.
# Settings come only from /etc/default/conda-stage, which is parsed here for
# three values, never sourced; conda-stage checks the file fully (owner and
# mode of it and of every folder above it) before using any setting.
#
# Exit status: always 0 (a failing Slurm Prolog/Epilog drains the node; SGE
# puts the queue in error), except 100 from sge-prolog when the admin chose
# CONDA_STAGE_ON_ERROR=hold (the job goes to error state, the queue stays).
set -u
PATH=/usr/sbin:/usr/bin:/sbin:/bin
site=/etc/default/conda-stage
hook=${0##*/}
python=/opt/conda-stage/bin/python
state_dir=/run/conda-stage
read_qstat=no

first_word() {  # the value of a KEY=value line's right side, quotes removed
    local v=$1
    case $v in
        \"*) v=${v#\"}; v=${v%%\"*} ;;
        \'*) v=${v#\'}; v=${v%%\'*} ;;
        *) v=${v%%[[:space:]]*} ;;
    esac
    REPLY=$v
}

if [ -f "$site" ] && [ ! -L "$site" ]; then
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line#export }
        case $line in
            CONDA_STAGE_PYTHON=*) first_word "${line#*=}"; python=$REPLY ;;
            CONDA_STAGE_STATE_DIR=*) first_word "${line#*=}"; state_dir=$REPLY ;;
            CONDA_STAGE_SGE_READ_QSTAT=*) first_word "${line#*=}"; read_qstat=$REPLY ;;
        esac
    done <"$site"
fi

# Fast paths: nothing declared, nothing staged -> this shell start is the cost.
case $hook in
    slurm-prolog)
        case "${SLURM_JOB_COMMENT-} ${SLURM_JOB_EXTRA-}" in
            *conda_env=*) ;;
            *) exit 0 ;;
        esac ;;
    slurm-task-prolog)
        [ -e "$state_dir/${SLURM_JOB_ID:-none}.json" ] || exit 0 ;;
    slurm-epilog)
        # ... or a 'conda activate' in the job staged a copy into /tmp itself
        # (gone with the job's shell, collected here).
        [ -e "$state_dir/${SLURM_JOB_ID:-none}.json" ] \
            || compgen -G "/tmp/conda-stage-????????" >/dev/null || exit 0 ;;
    sge-prolog)
        [ -n "${CONDA_STAGE_ENVS+x}" ] || [ "$read_qstat" = yes ] || exit 0 ;;
    sge-epilog)
        # root@: the prolog's manifest (job, or job.task of an array).  A
        # job-owner prolog: its folder in TMPDIR; a root epilog loses TMPDIR
        # (glibc secure-exec), TMP survives.  A user who fakes these only
        # skips the cleanup of their own copies: gc lets go of them later,
        # and execd removes the job's TMPDIR.
        key=${JOB_ID:-none}
        case ${SGE_TASK_ID:-undefined} in undefined|0) ;; *) key=$key.$SGE_TASK_ID ;; esac
        tmpdir=${TMPDIR:-${TMP:-}}
        [ -e "$state_dir/$key.json" ] || [ -z "$tmpdir" ] || [ -e "$tmpdir/conda-stage" ] \
            || exit 0 ;;
    *)
        echo "conda-stage: unknown hook name '$hook' (start this script as one of:" \
            "slurm-prolog slurm-task-prolog slurm-epilog sge-prolog sge-epilog)" >&2
        exit 0 ;;
esac

if [ "$(id -u)" = 0 ]; then
    # Root runs the Python the site file names only if nobody else can have
    # named it: the file and the folders above it are root's alone.
    if [ -e "$site" ]; then
        unsafe=$(find "$site" /etc/default /etc / -maxdepth 0 \( ! -user root -o -perm /022 \) -print 2>&1)
        if [ -n "$unsafe" ] || [ -L "$site" ]; then
            echo "conda-stage: not staging: $site is not safe to use (owned or writable by" \
                "a non-root user: ${unsafe//[^[:print:]]/?}); tell your admin" >&2
            logger -p daemon.err -t conda-stage "$hook: $site is not root's alone; hooks disabled" 2>/dev/null
            exit 0
        fi
    fi
    if [ ! -O "$python" ]; then
        echo "conda-stage: $python is missing or not owned by root; set CONDA_STAGE_PYTHON in $site" >&2
        exit 0
    fi
fi
if [ ! -x "$python" ]; then
    echo "conda-stage: $python not found; set CONDA_STAGE_PYTHON in $site" >&2
    exit 0
fi
"$python" -I -m conda_stage.hooks "$hook"
status=$?
[ "$hook" = sge-prolog ] && [ $status -eq 100 ] && exit 100
exit 0
