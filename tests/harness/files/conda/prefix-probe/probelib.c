/* libprobe.so: the prefix's lib directory, compiled in (binary placeholder). */
static const char LIB_PREFIX[] = PROBE_PREFIX "/lib";

const char *probe_lib_prefix(void)
{
    return LIB_PREFIX;
}
