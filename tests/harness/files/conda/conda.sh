# shellcheck shell=sh
# conda.sh -- the `conda` shell function for the conda-stage test site.
#
# Installed as conda/shell/etc/profile.d/conda.sh inside conda-lock's vendored conda
# (24.7.1), which lacks that directory, so `conda shell.<bash|zsh|posix> hook` prints:
#     export CONDA_EXE=...  _CE_M=  _CE_CONDA=  CONDA_PYTHON_EXE=...
#     <this file>
# Written for conda-stage's tests (not a copy of conda's own conda.sh).  It only
# forwards to the conda CLI in $CONDA_EXE: `activate`/`deactivate` evaluate what
# `conda shell.posix activate|deactivate ...` prints (conda's own activator, which
# also sources etc/conda/activate.d and deactivate.d), and commands that change an
# environment are followed by `conda shell.posix reactivate`.
# POSIX sh without `local`, so it works in bash, zsh and dash, also under set -eu.

__conda_exe() (
    "$CONDA_EXE" ${_CE_M:+"$_CE_M"} ${_CE_CONDA:+"$_CE_CONDA"} "$@"
)

__conda_hashr() {
    if [ -n "${ZSH_VERSION:-}" ]; then
        rehash
    else
        hash -r
    fi
}

# run `conda shell.posix "$@"` and evaluate the script it prints in this shell
__conda_eval() {
    if __conda_script="$(PS1="${PS1:-}" __conda_exe shell.posix "$@")"; then
        eval "$__conda_script"
        unset __conda_script
        __conda_hashr
    else
        set -- "$?"
        unset __conda_script
        return "$1"
    fi
}

conda() {
    case "${1-}" in
        activate | deactivate)
            __conda_eval "$@"
            ;;
        install | update | upgrade | remove | uninstall)
            __conda_exe "$@" || return
            __conda_eval reactivate
            ;;
        *)
            __conda_exe "$@"
            ;;
    esac
}

# first time in this shell (or job): CONDA_SHLVL=0 and <root prefix>/condabin on PATH
if [ -z "${CONDA_SHLVL+x}" ]; then
    export CONDA_SHLVL=0
    __conda_condabin="$(dirname "$(dirname "$CONDA_EXE")")/condabin"
    case ":${PATH:-}:" in
        *":$__conda_condabin:"*) ;;
        *) PATH="$__conda_condabin${PATH:+:$PATH}"; export PATH ;;
    esac
    unset __conda_condabin
    if [ -z "${PS1+x}" ]; then PS1=; fi
fi
