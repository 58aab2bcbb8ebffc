# shellcheck shell=sh
# conda-stage auto-stage hook (activate.d).
# Installed by 'conda-stage --auto-stage=enable', removed by '--auto-stage=disable'.
# Sourced by conda while it activates this environment, in bash, zsh or sh:
# it stages the environment to local disk and switches to the staged copy.
# It defines no functions and unsets every variable it sets.
# Skip with: CONDA_STAGE=false conda activate <env>
if [ "${CONDA_STAGE:-true}" != "false" ] && [ -z "${__conda_stage_busy:-}" ] \
    && [ -n "${CONDA_PREFIX:-}" ] && [ ! -e "${CONDA_PREFIX}/.conda-stage" ]; then
    __conda_stage_exe=$(command -v conda-stage 2>/dev/null) || __conda_stage_exe=""
    if [ -z "$__conda_stage_exe" ] && [ -r "${CONDA_PREFIX}/etc/conda-stage/auto-stage.conf" ]; then
        while IFS='=' read -r __conda_stage_key __conda_stage_value; do
            [ "$__conda_stage_key" = "exe" ] && __conda_stage_exe=$__conda_stage_value
        done < "${CONDA_PREFIX}/etc/conda-stage/auto-stage.conf"
        unset __conda_stage_key __conda_stage_value
    fi
    case "$(type conda 2>/dev/null)" in
        *function*) __conda_stage_fn=1 ;;
        *) __conda_stage_fn="" ;;
    esac
    if [ -z "$__conda_stage_fn" ]; then
        : # not activated through conda's shell function (e.g. 'conda run'): stay unstaged
    elif [ -z "$__conda_stage_exe" ] || [ ! -x "$__conda_stage_exe" ]; then
        echo "WARNING: Cannot auto-stage Conda environment '${CONDA_PREFIX}', because 'conda-stage' was not found" >&2
    elif __conda_stage_path=$("$__conda_stage_exe" --stage --owner-pid "$$" "$CONDA_PREFIX"); then
        echo "INFO: Activating staged Conda environment: ${__conda_stage_path}" >&2
        __conda_stage_busy=1
        conda deactivate
        conda activate "$__conda_stage_path"
        unset __conda_stage_busy
    else
        echo "WARNING: Staging failed; continuing with the original environment ${CONDA_PREFIX}" >&2
    fi
    unset __conda_stage_exe __conda_stage_path __conda_stage_fn
fi
