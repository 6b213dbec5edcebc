/*
 * Scenario "threads": several threads call the patched function all the time.
 *
 * Four workers call work(I) in a loop with a short sleep between calls (outside the
 * function), so the function is called constantly but rarely active at a given instant.
 *
 * Commands:
 *   round  -> "round R1 R2 R3 R4": each worker's result of a call that started after the
 *             command arrived: v1 1001 1002 1003 1004, v2 2001 2002 2003 2004
 *   call   -> "work=R" (main calls work(0): v1 1000, v2 2000)
 *   ping   -> "pong"
 *   quit   -> "bye"
 */
#include "../common/target.h"

#define WORKERS 4

/* ==== BEGIN VERSIONED ==== */
PATCHABLE long work(long id)
{
    volatile long base = 2000;
    return base + id;
}
/* ==== END VERSIONED ==== */

static void *worker(void *arg)
{
    long id = (long)arg;
    for (;;) {
        long r = round_current();
        long v = work(id + 1);
        round_publish((int)id, r, v);
        sleep_us(200);
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
            say("work=%ld", work(0));
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
