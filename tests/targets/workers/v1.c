/*
 * Scenario "workers": worker threads that never leave their loop.
 *
 * Four workers run worker_loop() forever. Even ones wait for a request in read(), odd ones
 * poll a flag and sleep 1 ms between two polls, so at any moment some threads are in read()
 * and some in nanosleep(), all with a frame of worker_loop below. serve() is inlined into the
 * loop, so the loop itself is patched. Each worker counts its requests in a local that must
 * go on after the switch.
 *
 * Commands:
 *   call I -> worker I serves one request: "w<I> v1 n=<N> weight=<I+1>" (v2: "w<I> v2 n=<N>
 *             weight=<I+100>"; v3: "w<I> v3 n=<N> weight=<10(I+1)>"); N counts worker I's
 *             requests. v3's arithmetic makes the compiler keep id and the count in other
 *             registers and stack slots than v1 does.
 *   ping   -> "pong"
 *   quit   -> "bye"
 */
#include "../common/target.h"

#define WORKERS 4

static int req_fd[WORKERS][2];
static int pending[WORKERS];

/* ==== BEGIN VERSIONED ==== */
static void serve(long id, long n)
{
    say("w%ld v1 n=%ld weight=%ld", id, n, id + 1);
}
/* ==== END VERSIONED ==== */

PATCHABLE void worker_loop(long id)
{
    long n = 0;

    for (;;) {
        if (id % 2 == 0) {
            get_byte(req_fd[id][0]);
        } else {
            while (!__atomic_exchange_n(&pending[id], 0, __ATOMIC_ACQ_REL))
                sleep_us(1000);
        }
        n++;
        serve(id, n);
    }
}

static void *worker(void *arg)
{
    worker_loop((long)arg);
    return NULL;
}

int main(void)
{
    char line[256];
    const char *arg;

    for (long i = 0; i < WORKERS; i++) {
        must_pipe(req_fd[i]);
        start_thread(worker, i);
    }
    announce_ready();
    while (next_command(line, sizeof line)) {
        if (command_is(line, "call", &arg)) {
            int i = atoi(arg);
            if (i < 0 || i >= WORKERS)
                say("error no worker %d", i);
            else if (i % 2 == 0)
                put_byte(req_fd[i][1]);
            else
                __atomic_store_n(&pending[i], 1, __ATOMIC_RELEASE);
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
