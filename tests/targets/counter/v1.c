/*
 * Scenario "counter": global state survives the update.
 *
 * bump() changes; the counters it updates (a global and a file-scope static) are the
 * same objects in every version, so the patched code must bind to the live ones.
 *
 * Commands:
 *   call  -> v1: "v1 count=C total=T"  (C += 1,   T += 1 per call)
 *            v2: "v2 count=C total=T"  (C += 100, T += 1 per call)
 *   get   -> "count=C total=T" (printed by main, which never changes)
 *   ping  -> "pong"
 *   quit  -> "bye"
 */
#include "../common/target.h"

long counter;
static long total;

/* ==== BEGIN VERSIONED ==== */
PATCHABLE void bump(void)
{
    counter += 1;
    total += 1;
    say("v1 count=%ld total=%ld", counter, total);
}
/* ==== END VERSIONED ==== */

int main(void)
{
    char line[256];

    announce_ready();
    while (next_command(line, sizeof line)) {
        if (command_is(line, "call", NULL)) {
            bump();
        } else if (command_is(line, "get", NULL)) {
            say("count=%ld total=%ld", counter, total);
        } else if (command_is(line, "ping", NULL)) {
            say("pong");
        } else if (command_is(line, "quit", NULL)) {
            say("bye");
            return 0;
        } else {
            say("error unknown %s", line);
        }
    }
    return 0;
}
