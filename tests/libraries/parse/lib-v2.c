/*
 * libparse, version 1: a shared library with a length check missing (the "CVE"): parse()
 * accepts any length. Version 2 (lib-v2.c) refuses inputs longer than 8 bytes. Only the
 * function between the markers differs; `count()` and the library's own state are shared.
 */
#include <string.h>

static long calls;

long count(void)
{
    return calls;
}

/* ==== BEGIN VERSIONED ==== */
long parse(const char *s)
{
    calls++;
    size_t n = strlen(s);
    if (n > 8)
        return -1;
    return (long)n;
}
/* ==== END VERSIONED ==== */
