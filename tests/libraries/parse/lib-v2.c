/*
 * libparse, version 1: a shared library with a length check missing (the "CVE"): parse()
 * accepts any length. Version 2 (lib-v2.c) refuses inputs longer than 8 bytes. Only the
 * function between the markers differs; `count()` and the library's own state are shared.
 */
#include <string.h>

static long calls;
/* Thread-local state of the library (general- and local-dynamic TLS through __tls_get_addr). */
__thread long thread_calls;
static __thread long thread_bytes;

long count(void)
{
    return calls;
}

long thread_count(void)
{
    return thread_calls * 1000 + thread_bytes;
}

/* ==== BEGIN VERSIONED ==== */
long parse(const char *s)
{
    calls++;
    thread_calls++;
    thread_bytes += (long)strlen(s);
    size_t n = strlen(s);
    if (n > 8)
        return -1;
    return (long)n;
}
/* ==== END VERSIONED ==== */
