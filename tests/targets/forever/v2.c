/*
 * Scenario "forever": a function that never returns.
 *
 * A worker thread runs serve_forever(), a request loop that never leaves. It is always
 * active, so no strategy can switch it: apply must end with exit 4 after --timeout, and
 * the process must go on serving with its old code.
 *
 * Commands:
 *   call   -> the worker serves one request: "v1 served N" (N counts from 1)
 *             (v2 would print "v2 served N"; it must never appear)
 *   ping   -> "pong" (main thread)
 *   quit   -> "bye"
 */
#include "../common/target.h"

static int req_fd[2];
static long served;

/* ==== BEGIN VERSIONED ==== */
PATCHABLE void serve_forever(void)
{
    for (;;) {
        get_byte(req_fd[0]);
        served++;
        say("v%d served %ld", 2, served);
    }
}
/* ==== END VERSIONED ==== */

static void *worker(void *arg)
{
    (void)arg;
    serve_forever();
    return NULL;
}

int main(void)
{
    char line[256];

    must_pipe(req_fd);
    start_thread(worker, 0);
    announce_ready();
    while (next_command(line, sizeof line)) {
        if (command_is(line, "call", NULL)) {
            put_byte(req_fd[1]);
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
