/*
 * Scenario "datalayout": changes to static data that cannot be made live.
 *
 *   v2: the global struct `cfg` grows (a field is added)        -> build refuses, names cfg
 *   v3: the global array `table` grows from 4 to 8 elements     -> build refuses, names table
 *   v4: show() uses a new writable global `extra_hits` that v1 lacks
 *                                                               -> build refuses, names extra_hits
 *
 * Commands:
 *   call  -> "v1 a=A b=B sum=S"  (show(): cfg fields and the sum of table)
 *   ping  -> "pong"
 *   quit  -> "bye"
 */
#include "../common/target.h"

void show(void);

/* ==== BEGIN VERSIONED ==== */
struct config {
    int a;
    int b;
    long c;
};

struct config cfg = { 1, 2, 3 };
int table[4] = { 1, 2, 3, 4 };

PATCHABLE void show(void)
{
    int sum = 0;
    for (unsigned i = 0; i < sizeof table / sizeof table[0]; i++)
        sum += table[i];
    say("v2 a=%d b=%d c=%ld sum=%d", cfg.a, cfg.b, cfg.c, sum);
}
/* ==== END VERSIONED ==== */

int main(void)
{
    char line[256];

    announce_ready();
    while (next_command(line, sizeof line)) {
        if (command_is(line, "call", NULL)) {
            show();
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
