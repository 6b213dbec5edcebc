/*
 * Scenario "hot": eight threads call hot() in a tight loop (no sleep), so at any instant
 * some thread is almost always inside it. Polling stacks rarely finds a quiet moment;
 * the trap strategy must switch within a second or two.
 *
 * Commands:
 *   round  -> "round R1 .. R8": each worker's result of a call started after the command:
 *             v1 1001 .. 1008, v2 2001 .. 2008
 *   call   -> "hot=R" (main calls hot(0): v1 1000, v2 2000)
 *   ping   -> "pong"
 *   quit   -> "bye"
 */
#include "../common/target.h"

#define WORKERS 8

/* ==== BEGIN VERSIONED ==== */
PATCHABLE long hot(long id)
{
    unsigned long acc = (unsigned long)id + 1;
    for (int i = 0; i < 200; i++)
        acc = acc * 6364136223846793005UL + 1442695040888963407UL;
    return (acc == 42 ? -1 : 2000) + id;
}
/* ==== END VERSIONED ==== */

static void *worker(void *arg)
{
    long id = (long)arg;
    for (;;) {
        long r = round_current();
        long v = hot(id + 1);
        round_publish((int)id, r, v);
    }
    return NULL;
}

int main(void)
{
    char line[256];

    worker_count = WORKERS;
    for (long i = 0; i < WORKERS; i++)
        start_thread(worker, i);
    announce_ready();
    while (next_command(line, sizeof line)) {
        if (command_is(line, "round", NULL)) {
            round_run_and_report();
        } else if (command_is(line, "call", NULL)) {
            say("hot=%ld", hot(0));
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
