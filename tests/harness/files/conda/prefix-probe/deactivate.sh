# shellcheck shell=sh
# prefix-probe deactivate.d hook (sourced by conda deactivate)
unset PREFIX_PROBE_ACTIVE PREFIX_PROBE_HOME PREFIX_PROBE_BUILT_IN
