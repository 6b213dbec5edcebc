/*
 * Scenario "forever": a function that never returns.
 *
 * A worker thread runs serve_forever(), a request loop that never leaves: it is always on
 * the worker's stack, stopped in read() waiting for the next request. v2 only changes what a
 * request prints, so the frame is switched to v2 at the return from read() (issue 12). v3
 * keeps a buffer in the frame: the frame changes, the switch is refused, and apply ends with
 * exit 4 after --timeout, naming the return site; the process goes on with its old code.
 *
 * Commands:
 *   call   -> the worker serves one request: "v1 served N" (N counts from 1); v2 "v2 served
 *             N"; v3 "v3 served N"
 *   ping   -> "pong" (main thread)
 *   quit   -> "bye"
 */
#include "../common/target.h"

static int req_fd[2];
static long served;

/* ==== BEGIN VERSIONED ==== */
PATCHABLE void serve_forever(void)
{
    char note[48];

    for (;;) {
        get_byte(req_fd[0]);
        served++;
        memset(note, 0, sizeof note);
        note[0] = 'v';
        note[1] = '3';
        say("%s served %ld", note, served);
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
