# shellcheck shell=sh
# conda-stage auto-stage hook (activate.d).
# Installed by 'conda-stage --auto-stage=enable', removed by '--auto-stage=disable'.
# Sourced by conda while it activates this environment, in bash, zsh or sh:
# it stages the environment to local disk and turns the activation into one
# of the staged copy, without running conda again.
# It defines no functions and unsets every variable it sets.
# Skip with: CONDA_STAGE=false conda activate <env>
#
# When this runs, conda has already exported what 'conda activate ORIGINAL'
# sets (PATH, CONDA_PREFIX, CONDA_SHLVL, CONDA_DEFAULT_ENV,
# CONDA_PROMPT_MODIFIER, the CONDA_PREFIX_<n> stack, PS1) and sourced the
# original's other activate.d scripts ('zzz.' sorts last).  The hook edits
# that result into what 'conda activate COPY' at the same level would have
# set (conda 24.7's activator: the copy's bin/ where the original's was on
# PATH, the copy's prefix, its default-env name and prompt; the level and the
# stack stay), after undoing the original's activate.d scripts with its
# deactivate.d scripts, and then sources the copy's activate.d scripts.  A
# later plain 'conda deactivate' therefore leaves the copy (running its
# deactivate.d, which unstages it) and restores the state from before the
# activation exactly, as for any environment.
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
    # 'conda run' activates in a script it runs with bash or sh, which loads
    # the shell function too: its parent process is conda's 'run'.
    __conda_stage_nl='
'
    __conda_stage_p=""
    if [ -n "$__conda_stage_fn" ] && [ -r "/proc/${PPID:-0}/cmdline" ]; then
        __conda_stage_p=$(command tr '\000' '\n' < "/proc/${PPID}/cmdline" 2>/dev/null) || __conda_stage_p=""
        case "${__conda_stage_nl}${__conda_stage_p}${__conda_stage_nl}" in
            *"/conda${__conda_stage_nl}"*"${__conda_stage_nl}run${__conda_stage_nl}"* \
                | *"${__conda_stage_nl}conda${__conda_stage_nl}"*"${__conda_stage_nl}run${__conda_stage_nl}"* \
                | *"/conda${__conda_stage_nl}run${__conda_stage_nl}"* \
                | *"${__conda_stage_nl}conda${__conda_stage_nl}run${__conda_stage_nl}"*) __conda_stage_fn="" ;;
        esac
    fi
    if [ -z "$__conda_stage_fn" ]; then
        : # not activated through conda's shell function, or by 'conda run': stay unstaged
    elif [ -z "$__conda_stage_exe" ] || [ ! -x "$__conda_stage_exe" ]; then
        echo "WARNING: Cannot auto-stage Conda environment '${CONDA_PREFIX}', because 'conda-stage' was not found" >&2
    elif __conda_stage_path=$("$__conda_stage_exe" --stage --owner-pid "$$" "$CONDA_PREFIX"); then
        echo "INFO: Activating staged Conda environment: ${__conda_stage_path}" >&2
        __conda_stage_busy=1
        __conda_stage_orig=$CONDA_PREFIX
        __conda_stage_self=zzz.conda-stage-auto.sh
        # PATH: the copy's bin/ in place of the first entry of the original's
        # (where conda put it; conda's deactivate removes or replaces the first
        # entry of the active prefix's bin/ in the same way).
        __conda_stage_p=":${PATH:-}:"
        case "$__conda_stage_p" in
            *":${__conda_stage_orig}/bin:"*)
                __conda_stage_p="${__conda_stage_p%%":${__conda_stage_orig}/bin:"*}:${__conda_stage_path}/bin:${__conda_stage_p#*":${__conda_stage_orig}/bin:"}"
                __conda_stage_p=${__conda_stage_p#:}
                PATH=${__conda_stage_p%:}
                ;;
            *) PATH="${__conda_stage_path}/bin${PATH:+:$PATH}" ;;
        esac
        export PATH
        # Undo the original's activate.d scripts: its deactivate.d scripts in
        # conda's order (byte order, reversed), with the original's CONDA_PREFIX.
        __conda_stage_list=$(command ls -A -- "${__conda_stage_orig}/etc/conda/deactivate.d" 2>/dev/null \
            | LC_ALL=C command sort -r)
        while [ -n "$__conda_stage_list" ]; do
            __conda_stage_f=${__conda_stage_list%%"$__conda_stage_nl"*}
            case "$__conda_stage_list" in
                *"$__conda_stage_nl"*) __conda_stage_list=${__conda_stage_list#*"$__conda_stage_nl"} ;;
                *) __conda_stage_list="" ;;
            esac
            case "$__conda_stage_f" in
                000.conda-stage-auto.sh) ;;
                *.sh) if [ -f "${__conda_stage_orig}/etc/conda/deactivate.d/${__conda_stage_f}" ]; then
                          # shellcheck source=/dev/null
                          . "${__conda_stage_orig}/etc/conda/deactivate.d/${__conda_stage_f}"
                      fi ;;
            esac
        done
        # What conda would export for the copy: prefix, default-env name
        # (the folder's name only under an 'envs' folder), prompt modifier.
        CONDA_PREFIX=$__conda_stage_path
        export CONDA_PREFIX
        __conda_stage_old_env=${CONDA_DEFAULT_ENV:-}
        __conda_stage_d=${__conda_stage_path%/*}
        case "${__conda_stage_d##*/}" in
            envs) CONDA_DEFAULT_ENV=${__conda_stage_path##*/} ;;
            *) CONDA_DEFAULT_ENV=$__conda_stage_path ;;
        esac
        export CONDA_DEFAULT_ENV
        # The prompt modifier: conda's default format '({default_env}) '
        # (also what '{stacked_env}' gives at the top of the stack) is
        # recomputed for the copy; another format keeps the original's
        # modifier with its prefix replaced.  PS1 starts with the modifier
        # conda just put there; a later 'conda deactivate' strips the new one.
        __conda_stage_old_mod=${CONDA_PROMPT_MODIFIER:-}
        case "$__conda_stage_old_mod" in
            "") __conda_stage_mod="" ;;
            "(${__conda_stage_old_env}) ") __conda_stage_mod="(${CONDA_DEFAULT_ENV}) " ;;
            "(${__conda_stage_old_env},"*) __conda_stage_mod="(${CONDA_DEFAULT_ENV},${__conda_stage_old_mod#"(${__conda_stage_old_env},"}" ;;
            *"${__conda_stage_orig}"*) __conda_stage_mod="${__conda_stage_old_mod%%"${__conda_stage_orig}"*}${__conda_stage_path}${__conda_stage_old_mod#*"${__conda_stage_orig}"}" ;;
            *) __conda_stage_mod=$__conda_stage_old_mod ;;
        esac
        if [ -n "$__conda_stage_mod" ]; then
            case "${PS1:-}" in
                "$__conda_stage_old_mod"*) PS1="${__conda_stage_mod}${PS1#"$__conda_stage_old_mod"}" ;;
            esac
            CONDA_PROMPT_MODIFIER=$__conda_stage_mod
            export CONDA_PROMPT_MODIFIER
        fi
        # The copy's activate.d scripts (this hook is not in the copy), in
        # conda's order, up to where this hook sorts: conda itself sources the
        # original's scripts that sort after it, now with the copy's prefix.
        __conda_stage_list=$({ command ls -A -- "${__conda_stage_path}/etc/conda/activate.d" 2>/dev/null
            echo "$__conda_stage_self"; } | LC_ALL=C command sort)
        while [ -n "$__conda_stage_list" ]; do
            __conda_stage_f=${__conda_stage_list%%"$__conda_stage_nl"*}
            case "$__conda_stage_list" in
                *"$__conda_stage_nl"*) __conda_stage_list=${__conda_stage_list#*"$__conda_stage_nl"} ;;
                *) __conda_stage_list="" ;;
            esac
            case "$__conda_stage_f" in
                "$__conda_stage_self") __conda_stage_list="" ;;
                *.sh) if [ -f "${__conda_stage_path}/etc/conda/activate.d/${__conda_stage_f}" ]; then
                          # shellcheck source=/dev/null
                          . "${__conda_stage_path}/etc/conda/activate.d/${__conda_stage_f}"
                      fi ;;
            esac
        done
        unset __conda_stage_busy __conda_stage_orig __conda_stage_self __conda_stage_list \
            __conda_stage_f __conda_stage_old_env __conda_stage_d __conda_stage_old_mod \
            __conda_stage_mod
    else
        echo "WARNING: Staging failed; continuing with the original environment ${CONDA_PREFIX}" >&2
    fi
    unset __conda_stage_exe __conda_stage_path __conda_stage_fn __conda_stage_nl __conda_stage_p
fi
