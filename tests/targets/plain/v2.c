/*
 * Scenario "plain": a plain body change, no new data, no new calls.
 *
 * Commands:
 *   call X   -> "result vN M" where N is the version of compute() that ran and M its
 *               value for X (v1: 2*X, v2: 3*X, v3: 4*X, for 0 <= X < 1000)
 *   ping     -> "pong"
 *   quit     -> "bye"
 *
 * v1, v2 and v3 differ only in compute(); the "stack" tests apply v1->v2 and v1->v3.
 */
#include "../common/target.h"

/* ==== BEGIN VERSIONED ==== */
PATCHABLE int compute(int x)
{
    int acc = 0;
    for (int i = 0; i < x; i++)
        acc += 3;
    return 2000 + acc;
}
/* ==== END VERSIONED ==== */

int main(void)
{
    char line[256];
    const char *arg;

    announce_ready();
    while (next_command(line, sizeof line)) {
        if (command_is(line, "call", &arg)) {
            int r = compute(atoi(arg));
            say("result v%d %d", r / 1000, r % 1000);
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
