/*
 * Scenario "sleeper": a function that sleeps inside itself.
 *
 * Two workers call nap() over and over; nap() sleeps 100 ms inside, so it is active
 * nearly all the time. The trap strategy must switch within a second or two.
 *
 * Commands:
 *   round  -> "round R1 R2": each worker's nap() result of a call started after the
 *             command: v1 1001 1002, v2 2001 2002
 *   ping   -> "pong"
 *   quit   -> "bye"
 */
#include "../common/target.h"

#define WORKERS 2

/* ==== BEGIN VERSIONED ==== */
PATCHABLE long nap(long id)
{
    volatile long base = 2000;
    sleep_us(100000);
    return base + id;
}
/* ==== END VERSIONED ==== */

static void *worker(void *arg)
{
    long id = (long)arg;
    for (;;) {
        long r = round_current();
        long v = nap(id + 1);
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
