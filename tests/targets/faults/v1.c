/*
 * Scenario "faults": a target that checks its own invariants, for the fault campaign
 * (node-agent/tests/faults.rs).
 *
 * Five patched functions f, g, h, k, m each return the version (v1: 1, v2: 2). Four worker
 * threads loop: call f, g, h, k, m in that order, then pause 100 us. The values of the
 * *watched* functions (`watch MASK`, default 3 = f and g; bit 0 f .. bit 4 m) must agree. An
 * iteration where they differ is "mixed": one switch (apply or revert) can legitimately fall
 * between two calls of one iteration. A thread whose two consecutive iterations are mixed the
 * same way saw a mix that persists: a "persistent" violation. A value other than 1 or 2 is
 * "bad". Short-lived threads (`churn`) check the same rule on their one iteration.
 *
 * Commands:
 *   check     -> "check iters=I mixed=M persistent=P bad=B usr1=U rt=R spawned=S last=L"
 *                (L: the last persistent pattern seen, 0 if none)
 *   round     -> "round P P P P": each worker's pattern from an iteration that started after
 *                the command: the digits of f g h k m, e.g. v1 "11111", v2 "22222"
 *   call      -> "call P" (main thread's pattern)
 *   watch M   -> "watch M"
 *   hold      -> a holder thread enters f and blocks inside it: "holding"
 *   release   -> the held call returns: "released V" (V: the value that f call returned)
 *   fork      -> fork; the child calls f and g and exits with 10*f+g; the parent reaps it:
 *                "fork exit=11" (v1) / "fork exit=22" (v2) / "fork signal=N"
 *   exec      -> execs /proc/self/exe: the new image answers "ready <pid>" (same pid)
 *   exit      -> "exiting", then _exit(0)
 *   churn N   -> N=1: a thread keeps creating short-lived threads (each one iteration, then
 *                exits); N=0 stops it: "churn 1" / "churn 0"
 *   ping      -> "pong"
 *   quit      -> "bye"
 * Signals: SIGUSR1 and SIGRTMIN+1 are handled (counted: usr1, rt), with SA_RESTART.
 */
#include "../common/target.h"
#include <signal.h>
#include <sys/wait.h>

#define WORKERS 4

static int gate_fd[2];
static int enter_fd[2];

/* Called inside f by the holder: announce, then block until "release". */
static __attribute__((noinline)) void hold_here(void)
{
    say("holding");
    get_byte(gate_fd[0]);
}

/* ==== BEGIN VERSIONED ==== */
PATCHABLE long f(int hold)
{
    volatile long v = 1;
    if (hold)
        hold_here();
    return v;
}

PATCHABLE long g(void)
{
    volatile long v = 1;
    return v;
}

PATCHABLE long h(void)
{
    volatile long v = 1;
    return v;
}

PATCHABLE long k(void)
{
    volatile long v = 1;
    return v;
}

PATCHABLE long m(void)
{
    volatile long v = 1;
    return v;
}
/* ==== END VERSIONED ==== */

static int watch_mask = 3;
static long iters, mixed, persistent, bad, usr1, rt, spawned, last_persistent;
static int churning;

static void add(long *c, long n)
{
    __atomic_add_fetch(c, n, __ATOMIC_RELAXED);
}

/* One iteration: the pattern (digits of f g h k m), and whether the watched ones differ. */
static long iteration(int *is_mixed)
{
    long v[5];
    int i, mask = __atomic_load_n(&watch_mask, __ATOMIC_RELAXED);
    long first = 0, code = 0;
    v[0] = f(0);
    v[1] = g();
    v[2] = h();
    v[3] = k();
    v[4] = m();
    *is_mixed = 0;
    for (i = 0; i < 5; i++) {
        code = code * 10 + v[i];
        if (v[i] != 1 && v[i] != 2)
            add(&bad, 1);
        if (!(mask & (1 << i)))
            continue;
        if (!first)
            first = v[i];
        else if (v[i] != first)
            *is_mixed = 1;
    }
    add(&iters, 1);
    if (*is_mixed)
        add(&mixed, 1);
    return code;
}

static void *worker(void *arg)
{
    int id = (int)(long)arg;
    long prev_mixed = 0; /* pattern of the previous iteration if it was mixed */
    for (;;) {
        int is_mixed;
        long r = round_current();
        long code = iteration(&is_mixed);
        if (is_mixed && code == prev_mixed) {
            add(&persistent, 1);
            __atomic_store_n(&last_persistent, code, __ATOMIC_RELAXED);
        }
        prev_mixed = is_mixed ? code : 0;
        round_publish(id, r, code);
        sleep_us(100);
    }
    return NULL;
}

static void *holder(void *arg)
{
    (void)arg;
    for (;;) {
        long v;
        get_byte(enter_fd[0]);
        v = f(1);
        say("released %ld", v);
    }
    return NULL;
}

static void *short_lived(void *arg)
{
    int is_mixed;
    (void)arg;
    iteration(&is_mixed);
    return NULL;
}

static void *churner(void *arg)
{
    (void)arg;
    while (__atomic_load_n(&churning, __ATOMIC_ACQUIRE)) {
        pthread_t t;
        if (pthread_create(&t, NULL, short_lived, NULL) == 0) {
            pthread_join(t, NULL);
            add(&spawned, 1);
        }
        sleep_us(200);
    }
    return NULL;
}

static void on_usr1(int sig)
{
    (void)sig;
    add(&usr1, 1);
}

static void on_rt(int sig)
{
    (void)sig;
    add(&rt, 1);
}

static void handle(int sig, void (*fn)(int))
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fn;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, NULL);
}

static long get(long *c)
{
    return __atomic_load_n(c, __ATOMIC_RELAXED);
}

int main(int argc, char **argv)
{
    char line[256];
    const char *arg;
    (void)argc;

    handle(SIGUSR1, on_usr1);
    handle(SIGRTMIN + 1, on_rt);
    must_pipe(gate_fd);
    must_pipe(enter_fd);
    worker_count = WORKERS;
    for (long i = 0; i < WORKERS; i++)
        start_thread(worker, i);
    start_thread(holder, 0);
    announce_ready();
    while (next_command(line, sizeof line)) {
        if (command_is(line, "check", NULL)) {
            say("check iters=%ld mixed=%ld persistent=%ld bad=%ld usr1=%ld rt=%ld spawned=%ld last=%ld",
                get(&iters), get(&mixed), get(&persistent), get(&bad), get(&usr1), get(&rt),
                get(&spawned), get(&last_persistent));
        } else if (command_is(line, "round", NULL)) {
            round_run_and_report();
        } else if (command_is(line, "call", NULL)) {
            int is_mixed;
            say("call %ld", iteration(&is_mixed));
        } else if (command_is(line, "watch", &arg)) {
            __atomic_store_n(&watch_mask, atoi(arg), __ATOMIC_RELAXED);
            say("watch %d", atoi(arg));
        } else if (command_is(line, "hold", NULL)) {
            put_byte(enter_fd[1]);
        } else if (command_is(line, "release", NULL)) {
            put_byte(gate_fd[1]);
        } else if (command_is(line, "fork", NULL)) {
            int st = 0;
            pid_t c = fork();
            if (c == 0)
                _exit((int)(10 * f(0) + g()));
            if (c < 0 || waitpid(c, &st, 0) != c)
                say("fork failed");
            else if (WIFSIGNALED(st))
                say("fork signal=%d", WTERMSIG(st));
            else
                say("fork exit=%d", WEXITSTATUS(st));
        } else if (command_is(line, "exec", NULL)) {
            execv("/proc/self/exe", argv);
            say("exec failed");
        } else if (command_is(line, "exit", NULL)) {
            say("exiting");
            _exit(0);
        } else if (command_is(line, "churn", &arg)) {
            int on = atoi(arg) != 0;
            int was = __atomic_exchange_n(&churning, on, __ATOMIC_ACQ_REL);
            if (on && !was)
                start_thread(churner, 0);
            say("churn %d", on);
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
