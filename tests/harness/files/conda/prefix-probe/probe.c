/* prefix-probe: prints the install prefix compiled into the executable and into
   libprobe.so; conda records both as binary prefix placeholders. */
#include <stdio.h>

const char *probe_lib_prefix(void);

static const char EXE_PREFIX[] = PROBE_PREFIX;

int main(void)
{
    printf("exe:%s\nlib:%s\n", EXE_PREFIX, probe_lib_prefix());
    return 0;
}
