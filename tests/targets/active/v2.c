/*
 * Scenario "active": the function is active on a thread's stack while the update waits.
 *
 * A worker thread enters stuck(1) on request and blocks inside it, reading a pipe that
 * only the "release" command writes. While it is blocked, stuck() is active and the
 * update must wait (wait strategy) or time out (exit 4); once released, the old code runs
 * to its end and the update can go ahead.
 *
 * Commands:
 *   call     -> main runs stuck(0):          "v1 call"    / "v2 call"
 *   enter    -> the worker enters stuck(1):  "v1 entered" / "v2 entered"
 *               (printed inside stuck(), just before it blocks)
 *   release  -> the blocked worker goes on:  "v1 left"    / "v2 left"
 *               (printed by the same stuck() call that printed "entered")
 *   exit     -> "exiting", then the process exits at once (_exit(0)) whatever its threads do
 *   ping     -> "pong"
 *   quit     -> "bye"
 */
#include "../common/target.h"

static int enter_fd[2];
static int gate_fd[2];

/* ==== BEGIN VERSIONED ==== */
PATCHABLE int stuck(int gated)
{
    if (!gated) {
        say("v%d call", 2);
        return 0;
    }
    say("v%d entered", 2);
    get_byte(gate_fd[0]);
    say("v%d left", 2);
    return 1;
}
/* ==== END VERSIONED ==== */

static void *worker(void *arg)
{
    (void)arg;
    for (;;) {
        get_byte(enter_fd[0]);
        stuck(1);
    }
    return NULL;
}

int main(void)
{
    char line[256];

    must_pipe(enter_fd);
    must_pipe(gate_fd);
    start_thread(worker, 0);
    announce_ready();
    while (next_command(line, sizeof line)) {
        if (command_is(line, "call", NULL)) {
            stuck(0);
        } else if (command_is(line, "enter", NULL)) {
            put_byte(enter_fd[1]);
        } else if (command_is(line, "release", NULL)) {
            put_byte(gate_fd[1]);
        } else if (command_is(line, "exit", NULL)) {
            say("exiting");
            _exit(0);
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
