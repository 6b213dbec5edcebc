/*
 * A program linked with libparse.so (tests/libraries/parse): `call STR` -> "parse N count C tls T"
 * (N: parse(STR), C: the library's own call counter, T: its thread-local counters of the calling
 * thread, calls*1000 + bytes); the usual `ping`/`quit` of
 * tests/targets/common/target.h.
 */
#include "../../targets/common/target.h"

long parse(const char *s);
long count(void);
long thread_count(void);

int main(void)
{
    char line[256];
    announce_ready();
    while (next_command(line, sizeof line)) {
        if (!strncmp(line, "call ", 5)) {
            long n = parse(line + 5);
            say("parse %ld count %ld tls %ld", n, count(), thread_count());
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
