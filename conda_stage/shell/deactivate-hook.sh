# shellcheck shell=sh
# conda-stage auto-unstage hook (deactivate.d).
# Installed by 'conda-stage --auto-stage=enable', removed by '--auto-stage=disable'.
# Sourced by conda while it deactivates an environment, in bash, zsh or sh.
# In the original environment it does nothing; in a copy staged by an
# interactive 'conda activate' it lets go of the copy (removed when no other
# shell uses it: renamed out of the way at once, its files deleted by a
# detached process, so that 'conda deactivate' does not wait for that).
# (Copies a batch job's prolog extracts do not carry this hook: the epilog
# removes them.  Images carry it, for the shells that mount them; in a job
# that did not mount it from a shell it changes nothing.)
# It defines no functions and unsets every variable it sets.
#
# conda also sources deactivate.d scripts when it switches from this
# environment to another ('conda activate OTHER' keeps the copy on its stack
# as CONDA_PREFIX_<n>, which a later 'conda deactivate' returns to) and when
# it reactivates it (after 'conda install'); then the copy stays.  Which one
# it is: conda's shell function evaluates 'conda shell.posix ...' with its
# own arguments ('deactivate', 'activate OTHER') as the positional
# parameters this script sees; without them (reactivate), the PATH tells:
# only on a deactivation has conda already exported the PATH without the
# copy's bin/ when this runs (it exports PATH before deactivate.d scripts).
# A deactivation keeps the copy too while it is still on this shell's stack
# below (CONDA_PREFIX_1 .. CONDA_PREFIX_<level-1>; conda unsets the top ones
# after this script).
if [ "${CONDA_STAGE:-true}" != "false" ] && [ -z "${__conda_stage_busy:-}" ] \
    && [ -n "${CONDA_PREFIX:-}" ] && [ -e "${CONDA_PREFIX}/.conda-stage" ]; then
    case "${1-}" in
        deactivate) __conda_stage_keep="" ;;
        activate) __conda_stage_keep=1 ;;
        *) case ":${PATH:-}:" in
               *":${CONDA_PREFIX}/bin:"*) __conda_stage_keep=1 ;;
               *) __conda_stage_keep="" ;;
           esac ;;
    esac
    case "${CONDA_SHLVL:-}" in
        "" | *[!0-9]*) ;;
        *) __conda_stage_i=1
           __conda_stage_below=""
           while [ -z "$__conda_stage_keep" ] && [ "$__conda_stage_i" -lt "$CONDA_SHLVL" ]; do
               eval "__conda_stage_below=\${CONDA_PREFIX_${__conda_stage_i}:-}"
               [ "$__conda_stage_below" = "$CONDA_PREFIX" ] && __conda_stage_keep=1
               __conda_stage_i=$((__conda_stage_i + 1))
           done
           unset __conda_stage_i __conda_stage_below ;;
    esac
    if [ -z "$__conda_stage_keep" ]; then
        __conda_stage_exe=$(command -v conda-stage 2>/dev/null) || __conda_stage_exe=""
        if [ -z "$__conda_stage_exe" ] && [ -r "${CONDA_PREFIX}/etc/conda-stage/auto-stage.conf" ]; then
            while IFS='=' read -r __conda_stage_key __conda_stage_value; do
                [ "$__conda_stage_key" = "exe" ] && __conda_stage_exe=$__conda_stage_value
            done < "${CONDA_PREFIX}/etc/conda-stage/auto-stage.conf"
            unset __conda_stage_key __conda_stage_value
        fi
        if [ -n "$__conda_stage_exe" ] && [ -x "$__conda_stage_exe" ]; then
            "$__conda_stage_exe" --unstage --background --owner-pid "$$" "$CONDA_PREFIX" \
                || echo "WARNING: Could not remove the staged copy ${CONDA_PREFIX}" >&2
        else
            echo "WARNING: Cannot unstage '${CONDA_PREFIX}', because 'conda-stage' was not found" >&2
        fi
        unset __conda_stage_exe
    fi
    unset __conda_stage_keep
fi
