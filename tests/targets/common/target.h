/*
 * Shared protocol helpers for the live-patch test targets.
 *
 * Every target is a small program in several versions (v1.c, v2.c, v3.c...) that
 * talks to the test over pipes:
 *   - it prints "ready <pid>" first,
 *   - it reads one command per line on stdin,
 *   - it answers every command with exactly one line on stdout (flushed at once);
 *     scenario-specific commands document their own answers in the scenario file.
 *   - "ping" -> "pong", "quit" -> "bye" (then exit 0); unknown -> "error unknown <cmd>".
 *
 * Rules for the sources (the tests depend on them):
 *   - Only the code between the markers
 *         BEGIN VERSIONED  ...  END VERSIONED
 *     differs between the versions of one scenario; everything outside the markers is
 *     byte-identical, so `livepatch diff` must find exactly the functions in the block.
 *     (node-agent/tests/engine_harness.rs checks this property of the sources.)
 *   - Functions the tests patch are PATCHABLE: never inlined, never cloned, no
 *     interprocedural assumptions by their callers (gcc's noipa also keeps callers from
 *     relying on which registers the old body happened to clobber).
 *   - No sleeps for synchronisation: everything the test waits for is a line of output.
 *
 * This header is itself identical in every version, so its static functions are
 * "unchanged callees" of every patched function that prints.
 */
#ifndef LIVEPATCH_TARGET_H
#define LIVEPATCH_TARGET_H

#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(LIVEPATCH_REAL_BUILD)
/* Builds as the world makes them: only kept out of line (a function inlined into a loop that
 * never returns is the subject of active-frame switching); clones, IPA-RA, ICF stay on. */
#define PATCHABLE __attribute__((noinline))
#elif defined(__clang__)
#define PATCHABLE __attribute__((noinline, used))
#else
#define PATCHABLE __attribute__((noinline, noipa, used))
#endif

#define UNUSED_OK __attribute__((unused))

/* Print one line atomically with respect to other threads, and flush it. */
static UNUSED_OK __attribute__((noinline, format(printf, 1, 2))) void say(const char *fmt, ...)
{
    va_list ap;
    flockfile(stdout);
    va_start(ap, fmt);
    vfprintf(stdout, fmt, ap);
    va_end(ap);
    fputc('\n', stdout);
    fflush(stdout);
    funlockfile(stdout);
}

/* Read the next command line (without the newline). Returns 0 at end of input. */
static UNUSED_OK int next_command(char *buf, int size)
{
    if (!fgets(buf, size, stdin))
        return 0;
    buf[strcspn(buf, "\r\n")] = 0;
    return 1;
}

/* "word" or "word ARG": returns 1 and points *arg at ARG (or at "") when line starts with word. */
static UNUSED_OK int command_is(const char *line, const char *word, const char **arg)
{
    size_t n = 0; /* no strlen(): see target_pid() */
    while (word[n])
        n++;
    if (strncmp(line, word, n) != 0)
        return 0;
    if (line[n] == 0) {
        if (arg)
            *arg = line + n;
        return 1;
    }
    if (line[n] != ' ')
        return 0;
    if (arg)
        *arg = line + n + 1;
    return 1;
}

/*
 * The pid without calling getpid(): the "literals" scenario's v2 is the first version to
 * call getpid(), snprintf() and strlen(), and v1 must import none of them, so nothing in
 * this header may call those three.
 */
static UNUSED_OK long target_pid(void)
{
    return syscall(SYS_getpid);
}

static UNUSED_OK void announce_ready(void)
{
    say("ready %ld", target_pid());
}

static UNUSED_OK void sleep_us(long us)
{
    struct timespec ts = { us / 1000000, (us % 1000000) * 1000 };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static UNUSED_OK void must_pipe(int fds[2])
{
    if (pipe(fds) != 0) {
        perror("pipe");
        exit(70);
    }
}

static UNUSED_OK void put_byte(int fd)
{
    char c = 'x';
    while (write(fd, &c, 1) != 1) {
        if (errno != EINTR) {
            perror("write");
            exit(71);
        }
    }
}

static UNUSED_OK void get_byte(int fd)
{
    char c;
    for (;;) {
        ssize_t n = read(fd, &c, 1);
        if (n == 1)
            return;
        if (n == 0) {
            fprintf(stderr, "target: pipe closed\n");
            exit(72);
        }
        if (errno != EINTR) {
            perror("read");
            exit(73);
        }
    }
}

static UNUSED_OK void start_thread(void *(*fn)(void *), long arg)
{
    pthread_t t;
    int rc = pthread_create(&t, NULL, fn, (void *)arg);
    if (rc != 0) {
        fprintf(stderr, "pthread_create: %s\n", strerror(rc));
        exit(74);
    }
    pthread_detach(t);
}

/*
 * Rounds, for scenarios whose worker threads call a function over and over.
 * A worker reads the round number *before* each call and publishes it with the result
 * *after* the call, so when every worker has published round r, each published result
 * comes from a call that started after the round began: after a successful update, a
 * new round reports only new-code results.
 */
#define MAX_WORKERS 16
static long round_no;
static long worker_round[MAX_WORKERS];
static long worker_value[MAX_WORKERS];
static int worker_count;

static UNUSED_OK long round_current(void)
{
    return __atomic_load_n(&round_no, __ATOMIC_ACQUIRE);
}

static UNUSED_OK void round_publish(int worker, long round, long value)
{
    __atomic_store_n(&worker_value[worker], value, __ATOMIC_RELAXED);
    __atomic_store_n(&worker_round[worker], round, __ATOMIC_RELEASE);
}

/* Start a new round, wait until every worker finished a call inside it, print the results. */
static UNUSED_OK void round_run_and_report(void)
{
    int i;
    long r = __atomic_add_fetch(&round_no, 1, __ATOMIC_ACQ_REL);
    for (i = 0; i < worker_count; i++) {
        while (__atomic_load_n(&worker_round[i], __ATOMIC_ACQUIRE) < r)
            sched_yield();
    }
    flockfile(stdout);
    fputs("round", stdout);
    for (i = 0; i < worker_count; i++)
        fprintf(stdout, " %ld", __atomic_load_n(&worker_value[i], __ATOMIC_RELAXED));
    fputc('\n', stdout);
    fflush(stdout);
    funlockfile(stdout);
}

#endif
