/*
 * Scenario "callee_changed": a changed callee called by a changed caller.
 *
 * v2 changes both leaf() and caller(). The new caller must reach the new leaf; main
 * (unchanged) calls leaf() directly too, through the jump at the old entry.
 *
 * Commands:
 *   call X -> v1: "v1 caller leaf=L"  with L = leaf(X): v1 X+1,  v2 X*100
 *             v2: "v2 caller leaf=L"
 *   leaf X -> "leaf=L"  (main calls leaf() directly)
 *   ping   -> "pong"
 *   quit   -> "bye"
 */
#include "../common/target.h"

int leaf(int x);
void caller(int x);

/* ==== BEGIN VERSIONED ==== */
PATCHABLE int leaf(int x)
{
    volatile int one = 1; /* keeps the body longer than a 5-byte jump at -O2 */
    return x + one;
}

PATCHABLE void caller(int x)
{
    int l = leaf(x);
    say("v1 caller leaf=%d", l);
}
/* ==== END VERSIONED ==== */

int main(void)
{
    char line[256];
    const char *arg;

    announce_ready();
    while (next_command(line, sizeof line)) {
        if (command_is(line, "call", &arg)) {
            caller(atoi(arg));
        } else if (command_is(line, "leaf", &arg)) {
            say("leaf=%d", leaf(atoi(arg)));
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
