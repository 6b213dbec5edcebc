/*
 * Scenario "jumptable": a dense switch that gcc compiles to a jump table at -O2
 * (an indirect jump through a table in .rodata: absolute entries in non-PIE builds,
 * table-relative entries in PIE builds). v2 changes every case and adds two more, so the
 * patch must carry a new table and relocate it to the new code.
 *
 * Commands:
 *   call OP X -> "dispatch OP X = R"   R = dispatch(OP, X); every OP in 0..11 gives a
 *                                      different R in v1 and v2 (the tests compare the
 *                                      patched process against a fresh v2 process)
 *   ping      -> "pong"
 *   quit      -> "bye"
 */
#include "../common/target.h"

/* ==== BEGIN VERSIONED ==== */
PATCHABLE long dispatch(int op, long x)
{
    switch (op) {
    case 0: return x + 11;
    case 1: return x * 3 - 2;
    case 2: return (x << 4) ^ 5;
    case 3: return x * x + 7;
    case 4: return 1000 - x;
    case 5: return (x >> 1) + 55;
    case 6: return x * 7 + 6;
    case 7: return (x | 0x100) - 3;
    case 8: return x * x * x + 8;
    case 9: return 99 - 2 * x;
    default: return x * op + 1;
    }
}
/* ==== END VERSIONED ==== */

int main(void)
{
    char line[256];
    const char *arg;

    announce_ready();
    while (next_command(line, sizeof line)) {
        if (command_is(line, "call", &arg)) {
            char *end;
            int op = (int)strtol(arg, &end, 10);
            long x = strtol(end, NULL, 10);
            say("dispatch %d %ld = %ld", op, x, dispatch(op, x));
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
