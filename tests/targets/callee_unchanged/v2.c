/*
 * Scenario "callee_unchanged": an unchanged callee called by a changed function.
 *
 * helper() is the same in every version. v2 changes caller() and banner(); banner() only
 * grows, so that helper's address in v2's executable differs from its live address in v1
 * at every optimisation level (gcc emits callees before callers at -O2, so caller() alone
 * would not move it): the patched caller must call the live helper, which also keeps the
 * live call count.
 *
 * Commands:
 *   call X -> v1: "v1 helper=H"                  H = helper(X) = X*X + 1
 *             v2: "v2 helper=H next=N calls=C"   N = helper(X+1), C = helper calls so far
 *   banner -> v1: "v1 banner"
 *             v2: "v2 banner calls=C twice=2C thrice=3C sign=S"
 *   stats  -> "calls=C"  (main reads the counter helper() keeps)
 *   ping   -> "pong"
 *   quit   -> "bye"
 */
#include "../common/target.h"

long helper_calls;
int helper(int x);
void caller(int x);
void banner(void);

/* ==== BEGIN VERSIONED ==== */
PATCHABLE void caller(int x)
{
    int h = helper(x);
    int n = helper(x + 1);
    long c = helper_calls;
    say("v2 helper=%d next=%d calls=%ld", h, n, c);
}

PATCHABLE void banner(void)
{
    long calls = helper_calls;
    say("v2 banner calls=%ld twice=%ld thrice=%ld sign=%d", calls, calls * 2, calls * 3,
        calls > 0 ? 1 : (calls < 0 ? -1 : 0));
}
/* ==== END VERSIONED ==== */

PATCHABLE int helper(int x)
{
    int r = 1;
    helper_calls++;
    for (int i = 0; i < x; i++)
        r += x;
    return r;
}

int main(void)
{
    char line[256];
    const char *arg;

    announce_ready();
    while (next_command(line, sizeof line)) {
        if (command_is(line, "call", &arg)) {
            caller(atoi(arg));
        } else if (command_is(line, "banner", NULL)) {
            banner();
        } else if (command_is(line, "stats", NULL)) {
            say("calls=%ld", helper_calls);
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
