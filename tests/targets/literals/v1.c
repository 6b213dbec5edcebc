/*
 * Scenario "literals": new string literals and new libc calls.
 *
 * v1's greet() copies bytes by hand; v2's greet() calls snprintf(), strlen() and getpid(),
 * none of which v1 imports (the common header avoids them on purpose), and uses a format
 * string that does not exist in v1's read-only data. The patch must carry the literal and
 * resolve the three libc functions in the running process.
 *
 * v3 changes nothing but the literal v1's greet() copies: the code is the same
 * instruction for instruction (only the literal's address differs), so a diff that masks
 * relocated operands must still compare what they point to.
 *
 * Commands:
 *   call WHO -> v1: "v1 hello WHO"
 *               v2: "v2 greetings WHO (len N, pid P)"  N = strlen(WHO), P = the pid
 *               v3: "v3 howdy, WHO"
 *   ping     -> "pong"
 *   quit     -> "bye"
 */
#include "../common/target.h"

/* ==== BEGIN VERSIONED ==== */
PATCHABLE const char *greet(char *out, size_t size, const char *who)
{
    const char *p = "v1 hello ";
    size_t i = 0;

    while (*p && i + 1 < size)
        out[i++] = *p++;
    while (*who && i + 1 < size)
        out[i++] = *who++;
    out[i] = 0;
    return out;
}
/* ==== END VERSIONED ==== */

int main(void)
{
    char line[256];
    char buf[256];
    const char *arg;

    announce_ready();
    while (next_command(line, sizeof line)) {
        if (command_is(line, "call", &arg)) {
            say("%s", greet(buf, sizeof buf, arg));
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
