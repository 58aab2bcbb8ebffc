# shellcheck shell=sh
# prefix-probe activate.d hook (sourced by conda activate)
export PREFIX_PROBE_ACTIVE=1
export PREFIX_PROBE_HOME="${CONDA_PREFIX}/share/prefix-probe"
# the prefix at install time (a text placeholder conda-unpack must rewrite)
export PREFIX_PROBE_BUILT_IN="@BUILD_PREFIX@"
