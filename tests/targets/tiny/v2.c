/*
 * Scenario "tiny": functions shorter than the 5-byte jump (`lea 1(%rdi),%eax; ret` is 4 bytes;
 * `-Os` without -fcf-protection leaves no padding after them): the entry gets a 2-byte short
 * jump to a trampoline in padding between other functions.
 *
 * Commands:
 *   call X -> "inc=I dec=D" (v1: inc = X+1, dec = X-1; v2: inc = X+2, dec = X-2)
 *   ping   -> "pong"
 *   quit   -> "bye"
 */
#include "../common/target.h"

int inc(int x);
int dec(int x);

/* ==== BEGIN VERSIONED ==== */
PATCHABLE int inc(int x)
{
    return x + 2;
}

PATCHABLE int dec(int x)
{
    return x - 2;
}
/* ==== END VERSIONED ==== */

#ifndef LIVEPATCH_NO_SPACER
/* Aligned as hot or vectorised code often is: the padding before it is room for a trampoline.
 * Without it (-DLIVEPATCH_NO_SPACER, -Os) the code is packed and the update is refused. */
__attribute__((aligned(64), noinline, used)) int spacer(int x)
{
    return x * 3;
}
#endif

int main(void)
{
    char line[256];
    const char *arg;

    announce_ready();
    while (next_command(line, sizeof line)) {
        if (command_is(line, "call", &arg)) {
            int x = atoi(arg);
            say("inc=%d dec=%d", inc(x), dec(x));
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
