/*
 * Scenario "many": more than four functions change at once (six), so the trap strategy
 * needs software breakpoints (there are only four hardware debug registers).
 *
 * f1..f6 all change. Two workers call all six in a tight loop; a third worker can be
 * parked inside f3 (blocked on a pipe) to force a timeout.
 *
 * Commands:
 *   call     -> "many A1 A2 A3 A4 A5 A6" with Ak = fk(0): v1 100+10k, v2 200+10k
 *               (v1: 110 120 130 140 150 160, v2: 210 220 230 240 250 260)
 *   round    -> "round S1 S2": each worker's sum f1(0)+..+f6(0) from calls started after
 *               the command: v1 810 810, v2 1410 1410
 *   hold     -> the third worker enters f3(-1) and blocks: "vN f3 holding"
 *   release  -> it goes on: "vN f3 released" (N: the version of the f3 it entered)
 *   ping     -> "pong"
 *   quit     -> "bye"
 */
#include "../common/target.h"

#define WORKERS 2

static int hold_fd[2];
static int gate_fd[2];

/* ==== BEGIN VERSIONED ==== */
PATCHABLE long f1(long x)
{
    volatile long base = 110;
    return base + x;
}

PATCHABLE long f2(long x)
{
    volatile long base = 120;
    return base + x;
}

PATCHABLE long f3(long x)
{
    volatile long base = 130;
    if (x < 0) {
        say("v1 f3 holding");
        get_byte(gate_fd[0]);
        say("v1 f3 released");
        return base;
    }
    return base + x;
}

PATCHABLE long f4(long x)
{
    volatile long base = 140;
    return base + x;
}

PATCHABLE long f5(long x)
{
    volatile long base = 150;
    return base + x;
}

PATCHABLE long f6(long x)
{
    volatile long base = 160;
    return base + x;
}
/* ==== END VERSIONED ==== */

static long all_six(long x)
{
    return f1(x) + f2(x) + f3(x) + f4(x) + f5(x) + f6(x);
}

static void *worker(void *arg)
{
    long id = (long)arg;
    for (;;) {
        long r = round_current();
        long v = all_six(0);
        round_publish((int)id, r, v);
    }
    return NULL;
}

static void *holder(void *arg)
{
    (void)arg;
    for (;;) {
        get_byte(hold_fd[0]);
        f3(-1);
    }
    return NULL;
}

int main(void)
{
    char line[256];

    must_pipe(hold_fd);
    must_pipe(gate_fd);
    worker_count = WORKERS;
    for (long i = 0; i < WORKERS; i++)
        start_thread(worker, i);
    start_thread(holder, 0);
    announce_ready();
    while (next_command(line, sizeof line)) {
        if (command_is(line, "call", NULL)) {
            long a1 = f1(0), a2 = f2(0), a3 = f3(0), a4 = f4(0), a5 = f5(0), a6 = f6(0);
            say("many %ld %ld %ld %ld %ld %ld", a1, a2, a3, a4, a5, a6);
        } else if (command_is(line, "round", NULL)) {
            round_run_and_report();
        } else if (command_is(line, "hold", NULL)) {
            put_byte(hold_fd[1]);
        } else if (command_is(line, "release", NULL)) {
            put_byte(gate_fd[1]);
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
