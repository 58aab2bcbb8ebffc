# shellcheck shell=sh
# conda-stage auto-unstage hook (deactivate.d).
# Installed by 'conda-stage --auto-stage=enable', removed by '--auto-stage=disable'.
# Sourced by conda while it deactivates an environment, in bash, zsh or sh.
# In the original environment it does nothing; in a copy staged by an
# interactive 'conda activate' it removes the copy.  (Copies staged by a
# batch job's prolog do not carry this hook: the epilog removes them.)
if [ "${CONDA_STAGE:-true}" != "false" ] && [ -z "${__conda_stage_busy:-}" ] \
    && [ -n "${CONDA_PREFIX:-}" ] && [ -e "${CONDA_PREFIX}/.conda-stage" ]; then
    __conda_stage_exe=$(command -v conda-stage 2>/dev/null) || __conda_stage_exe=""
    if [ -z "$__conda_stage_exe" ] && [ -r "${CONDA_PREFIX}/etc/conda-stage/auto-stage.conf" ]; then
        while IFS='=' read -r __conda_stage_key __conda_stage_value; do
            [ "$__conda_stage_key" = "exe" ] && __conda_stage_exe=$__conda_stage_value
        done < "${CONDA_PREFIX}/etc/conda-stage/auto-stage.conf"
        unset __conda_stage_key __conda_stage_value
    fi
    if [ -n "$__conda_stage_exe" ] && [ -x "$__conda_stage_exe" ]; then
        "$__conda_stage_exe" --unstage "$CONDA_PREFIX" \
            || echo "WARNING: Could not remove the staged copy ${CONDA_PREFIX}" >&2
    else
        echo "WARNING: Cannot unstage '${CONDA_PREFIX}', because 'conda-stage' was not found" >&2
    fi
    unset __conda_stage_exe
fi
