/*
 * Scenario "contract": sixteen functions c0..c15 call each other in a chain, and v2 changes
 * the contract between them: a v2 caller tags the argument it passes (bit 40) and a v2 callee
 * requires the tag, so a new caller with an old callee, or an old caller with a new callee,
 * computes a wrong value. The chain's entry c0 keeps its contract with its (unpatched)
 * callers: c0(x) is x+15 in v1 and x+1015 in v2; anything else is "bad". As the switch is
 * made only when no thread is inside any of the sixteen, no single call may ever be mixed.
 *
 * Four workers call c0 in a tight loop (threads entering the patched functions at a high rate).
 *
 * Commands:
 *   round    -> "round V V V V": the version each worker saw in a call started after the
 *               command (1, 2; 0 for a bad value)
 *   check    -> "check iters=I bad=B"
 *   hold     -> a holder thread blocks inside c15 (the whole chain active): "vN holding"
 *   release  -> it returns: "vN released"
 *   ping     -> "pong"
 *   quit     -> "bye"
 */
#include "../common/target.h"

#define WORKERS 4
#define HOLD 1000000L
#define TAG (1L << 40)

static int hold_fd[2];
static int gate_fd[2];

/* A plain read, not the header's inline helper: its inlining would differ between the two
 * builds and drag the holder into the patch. */
static __attribute__((noinline)) void wait_byte(int fd)
{
    char c;
    while (read(fd, &c, 1) < 0 && errno == EINTR)
        ;
}

static __attribute__((noinline)) void hold_here(int version)
{
    say("v%d holding", version);
    wait_byte(gate_fd[0]);
    say("v%d released", version);
}

/* ==== BEGIN VERSIONED ==== */

PATCHABLE long c0(long x);
PATCHABLE long c1(long x);
PATCHABLE long c2(long x);
PATCHABLE long c3(long x);
PATCHABLE long c4(long x);
PATCHABLE long c5(long x);
PATCHABLE long c6(long x);
PATCHABLE long c7(long x);
PATCHABLE long c8(long x);
PATCHABLE long c9(long x);
PATCHABLE long c10(long x);
PATCHABLE long c11(long x);
PATCHABLE long c12(long x);
PATCHABLE long c13(long x);
PATCHABLE long c14(long x);
PATCHABLE long c15(long x);


PATCHABLE long c15(long x)
{
    if (x == HOLD + 15)
        hold_here(1);
    return x;
}


PATCHABLE long c14(long x)
{
    return c15(x + 1);
}


PATCHABLE long c13(long x)
{
    return c14(x + 1);
}


PATCHABLE long c12(long x)
{
    return c13(x + 1);
}


PATCHABLE long c11(long x)
{
    return c12(x + 1);
}


PATCHABLE long c10(long x)
{
    return c11(x + 1);
}


PATCHABLE long c9(long x)
{
    return c10(x + 1);
}


PATCHABLE long c8(long x)
{
    return c9(x + 1);
}


PATCHABLE long c7(long x)
{
    return c8(x + 1);
}


PATCHABLE long c6(long x)
{
    return c7(x + 1);
}


PATCHABLE long c5(long x)
{
    return c6(x + 1);
}


PATCHABLE long c4(long x)
{
    return c5(x + 1);
}


PATCHABLE long c3(long x)
{
    return c4(x + 1);
}


PATCHABLE long c2(long x)
{
    return c3(x + 1);
}


PATCHABLE long c1(long x)
{
    return c2(x + 1);
}


PATCHABLE long c0(long x)
{
    return c1(x + 1);
}
/* ==== END VERSIONED ==== */

static long iters, bad;

static void *worker(void *arg)
{
    long id = (long)arg;
    for (;;) {
        long r = round_current();
        long v = c0(id);
        long version = v == id + 15 ? 1 : v == id + 1015 ? 2 : 0;
        __atomic_add_fetch(&iters, 1, __ATOMIC_RELAXED);
        if (!version)
            __atomic_add_fetch(&bad, 1, __ATOMIC_RELAXED);
        round_publish((int)id, r, version);
    }
    return NULL;
}

static void *holder(void *arg)
{
    (void)arg;
    for (;;) {
        wait_byte(hold_fd[0]);
        long v = c0(HOLD);
        if (v != HOLD + 15 && v != HOLD + 1015)
            __atomic_add_fetch(&bad, 1, __ATOMIC_RELAXED);
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
        if (command_is(line, "round", NULL)) {
            round_run_and_report();
        } else if (command_is(line, "check", NULL)) {
            say("check iters=%ld bad=%ld", __atomic_load_n(&iters, __ATOMIC_RELAXED), __atomic_load_n(&bad, __ATOMIC_RELAXED));
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
