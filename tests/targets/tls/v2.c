/*
 * Scenario "tls": thread-local data.
 *
 * Each thread has its own tls_count and tls_name. tick() changes; v2 also reads
 * tls_name, which v1's tick() never touched (it exists: the threads set it at start).
 * Two worker threads wait for requests, so per-thread state can be checked after the
 * update.
 *
 * Commands:
 *   call     -> main thread runs tick():  v1: "v1 tls=N"        (N += 1 per call)
 *                                         v2: "v2 main tls=N"   (N += 10 per call)
 *   tcall I  -> worker I (1 or 2) runs tick(): v1: "v1 tls=N", v2: "v2 wI tls=N"
 *   get      -> "tls=N" (main thread's counter, read by main)
 *   ping     -> "pong"
 *   quit     -> "bye"
 */
#include "../common/target.h"

__thread long tls_count;
__thread char tls_name[16];

static int req[3][2];
static int done_fd[2];

/* ==== BEGIN VERSIONED ==== */
PATCHABLE void tick(void)
{
    tls_count += 10;
    say("v2 %s tls=%ld", tls_name, tls_count);
}
/* ==== END VERSIONED ==== */

static void *worker(void *arg)
{
    long id = (long)arg;
    tls_name[0] = 'w';
    tls_name[1] = (char)('0' + id);
    tls_name[2] = 0;
    for (;;) {
        get_byte(req[id][0]);
        tick();
        put_byte(done_fd[1]);
    }
    return NULL;
}

int main(void)
{
    char line[256];
    const char *arg;

    memcpy(tls_name, "main", 5);
    must_pipe(done_fd);
    for (long i = 1; i <= 2; i++) {
        must_pipe(req[i]);
        start_thread(worker, i);
    }
    announce_ready();
    while (next_command(line, sizeof line)) {
        if (command_is(line, "call", NULL)) {
            tick();
        } else if (command_is(line, "tcall", &arg)) {
            int id = atoi(arg);
            if (id < 1 || id > 2) {
                say("error no worker %d", id);
                continue;
            }
            put_byte(req[id][1]);
            get_byte(done_fd[0]);
        } else if (command_is(line, "get", NULL)) {
            say("tls=%ld", tls_count);
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
