/*
 * Scenario "mainloop": the fixed function is inlined into main's command loop.
 *
 * answer() is static and called once: -O2 inlines it into main, so main itself, which never
 * returns while the target runs, is part of the patch, and its frame stands in fgets()
 * (waiting for the next command) whenever the tool looks. main counts the calls in a local,
 * which the optimiser keeps in a callee-saved register across the loop: after the switch the
 * count must go on, not restart.
 *
 * Commands:
 *   call X -> "v1 answer=2X n=N" / "v2 answer=3X n=N" (N: calls since start, in main's local)
 *   ping   -> "pong"
 *   quit   -> "bye"
 */
#include "../common/target.h"

/* ==== BEGIN VERSIONED ==== */
static void answer(int x, long n)
{
    say("v1 answer=%d n=%ld", x * 2, n);
}
/* ==== END VERSIONED ==== */

int main(void)
{
    char line[256];
    const char *arg;
    long n = 0;

    announce_ready();
    while (next_command(line, sizeof line)) {
        if (command_is(line, "call", &arg)) {
            n++;
            answer(atoi(arg), n);
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
