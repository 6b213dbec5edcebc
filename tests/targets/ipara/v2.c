/*
 * Scenario "ipara": the register contract between a patched function and an unpatched caller.
 *
 * combine() is never patched. Built without live-patching flags (-fipa-ra, GCC's default), it
 * may keep `s` in a caller-saved register across its call to leaf(), because v1's leaf() leaves
 * that register alone. v2's leaf() calls snprintf, which clobbers every caller-saved register:
 * entered straight, it would corrupt combine's `s`. The patched entry goes through a thunk that
 * keeps those registers, so combine() still answers right.
 *
 * Commands:
 *   call A B -> "combine=C" with C = (A*B + 11) * 7 + leaf(A); leaf(A) = 3A+1 (v1) / 4A+1 (v2)
 *   ping     -> "pong"
 *   quit     -> "bye"
 */
#include "../common/target.h"

int leaf(int x);
char scratch[32];
volatile int sink;

/* ==== BEGIN VERSIONED ==== */
PATCHABLE int leaf(int x)
{
    sink = snprintf(scratch, sizeof scratch, "leaf %d", x);
    return x * 4 + 1;
}
/* ==== END VERSIONED ==== */

__attribute__((noinline)) int combine(int a, int b)
{
    int s = a * b + 11;
    int r = leaf(a);
    return s * 7 + r;
}

int main(void)
{
    char line[256];
    const char *arg;

    /* scratch escapes to the C library, so every build (LTO too) keeps it and sink. */
    scratch[0] = 'r';
    sink = (int)strlen(scratch);
    announce_ready();
    while (next_command(line, sizeof line)) {
        if (command_is(line, "call", &arg)) {
            int a = atoi(arg);
            const char *sp = strchr(arg, ' ');
            int b = sp ? atoi(sp + 1) : 0;
            say("combine=%d", combine(a, b));
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
