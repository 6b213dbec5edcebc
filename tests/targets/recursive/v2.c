/*
 * Scenario "recursive": a recursive function active deep in the stack.
 *
 * Two workers call rec(DEPTH) over and over; at the bottom of each recursion rec()
 * sleeps 20 ms, so rec() is on the workers' stacks, DEPTH+1 frames deep, nearly all the
 * time and only leaves for an instant between two calls. The trap strategy must switch
 * within a second or two.
 *
 * Commands:
 *   round  -> "round R1 R2": each worker's rec(40) of a call started after the command:
 *             v1 1040 1040, v2 2080 2080
 *   call D -> "rec=R"  main calls rec(D) (v1 1000 + D, v2 2000 + 2*D)
 *   ping   -> "pong"
 *   quit   -> "bye"
 */
#include "../common/target.h"

#define WORKERS 2
#define DEPTH 40

static long leaf_sleep_us = 20000;

/* ==== BEGIN VERSIONED ==== */
PATCHABLE long rec(int depth)
{
    volatile int marker = depth; /* a real frame per level, no tail call */
    long r;

    if (depth <= 0) {
        sleep_us(leaf_sleep_us);
        return 2000;
    }
    r = rec(depth - 1);
    return r + 2 + (marker - depth);
}
/* ==== END VERSIONED ==== */

static void *worker(void *arg)
{
    long id = (long)arg;
    for (;;) {
        long r = round_current();
        long v = rec(DEPTH);
        round_publish((int)id, r, v);
    }
    return NULL;
}

int main(void)
{
    char line[256];
    const char *arg;

    worker_count = WORKERS;
    for (long i = 0; i < WORKERS; i++)
        start_thread(worker, i);
    announce_ready();
    while (next_command(line, sizeof line)) {
        if (command_is(line, "round", NULL)) {
            round_run_and_report();
        } else if (command_is(line, "call", &arg)) {
            say("rec=%ld", rec(atoi(arg)));
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
