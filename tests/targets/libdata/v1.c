/*
 * Scenario "libdata": the new code uses variables of the C library that the old executable
 * never referenced, so the running process has no copy of them in the executable (no copy
 * relocation): the library's own definitions are the live ones.
 *
 * Commands:
 *   call  -> v1: "v1 probe"
 *            v2: "v2 probe NAME optind=N"  (NAME: program_invocation_short_name; optind,
 *                 glibc's getopt index, starts at 1 and v2 adds 1 per call: the writes land
 *                 in the library's variable and persist)
 *   ping  -> "pong"
 *   quit  -> "bye"
 */
#include "../common/target.h"

/* ==== BEGIN VERSIONED ==== */
PATCHABLE void probe(void)
{
    say("v1 probe");
}
/* ==== END VERSIONED ==== */

int main(void)
{
    char line[256];

    announce_ready();
    while (next_command(line, sizeof line)) {
        if (command_is(line, "call", NULL)) {
            probe();
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
