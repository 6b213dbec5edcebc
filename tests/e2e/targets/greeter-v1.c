/*
 * End-to-end target: a "service" that answers one request every 100 ms and logs it.
 * Only the block between the markers differs between the versions:
 *   v1: "v1 hello #N served=S"
 *   v2: "v2 hello #N served=S"             (code-only fix: live-patchable)
 *   v3: "v3 hello #N served=S errors=E"    (struct stats grows: a data-layout change,
 *                                           the pod must be restarted on the new version)
 *   v4: "v4 hello #N served=S root=R"      (calls cbrt() from libm, which v1 never loaded:
 *                                           cannot be made live, restart on v4; link -lm)
 * The counters live in a global struct that the patched code must keep using, so a
 * patched process continues the old count instead of starting over.
 */
#include <math.h>
#include <stdio.h>
#include <time.h>

/* ==== BEGIN VERSIONED ==== */
struct stats {
    long served;
};
struct stats stats;

__attribute__((noinline, noipa)) void handle(long n)
{
    stats.served += 1;
    printf("v1 hello #%ld served=%ld\n", n, stats.served);
    fflush(stdout);
}
/* ==== END VERSIONED ==== */

int main(void)
{
    struct timespec tick = { 0, 100 * 1000 * 1000 };
    for (long n = 0;; n++) {
        handle(n);
        nanosleep(&tick, NULL);
    }
}
