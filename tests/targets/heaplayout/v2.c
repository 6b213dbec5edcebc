/*
 * Scenario "heaplayout": a struct that lives only on the heap changes its layout.
 *
 *   v2: `struct session` gains a member before `bytes` (every later offset moves). Objects
 *       allocated by v1 live in the process; new code would read them with v2's offsets:
 *       build refuses (data layout), naming the struct. Found through the DWARF of both
 *       builds (the real builds have -g); nothing global changes size.
 *
 * Commands:
 *   call N -> "v1 session id=I bytes=B" (account(): B += N on the one open session)
 *   ping   -> "pong"
 *   quit   -> "bye"
 */
#include "../common/target.h"

struct session;
struct session *open_session(void);
void account(struct session *s, int n);

/* ==== BEGIN VERSIONED ==== */
struct session {
    int id;
    long packets;
    long bytes;
};

PATCHABLE struct session *open_session(void)
{
    struct session *s = calloc(1, sizeof *s);
    if (s)
        s->id = 7;
    return s;
}

PATCHABLE void account(struct session *s, int n)
{
    s->bytes += n;
    s->packets++;
    say("v2 session id=%d bytes=%ld packets=%ld", s->id, s->bytes, s->packets);
}
/* ==== END VERSIONED ==== */

int main(void)
{
    char line[256];
    const char *arg;
    struct session *s = open_session();

    if (!s)
        return 1;
    announce_ready();
    while (next_command(line, sizeof line)) {
        if (command_is(line, "call", &arg)) {
            account(s, atoi(arg));
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
