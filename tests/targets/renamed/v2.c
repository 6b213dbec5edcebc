/*
 * Scenario "renamed": a loop that never returns, whose fix comes with another register
 * allocation.
 *
 * A worker runs spin() forever, waiting for requests in wait_request(). spin() counts the
 * requests (n) in a callee-saved register and twice that (m) in a stack slot. It is written in
 * assembly so that the two versions differ exactly as two register allocations do: v2 keeps n
 * in %r12 instead of %rbx and m at 8(%rsp) instead of 0(%rsp), and reports version 2. A frame
 * of v1 stopped in wait_request() can only continue in v2 with both values moved.
 *
 * Commands:
 *   call  -> the worker serves one request: "v1 n=N m=2N" / "v2 n=N m=2N" (N counts on)
 *   ping  -> "pong" (main thread)
 *   quit  -> "bye"
 */
#include "../common/target.h"

static int req_fd[2];

__attribute__((noinline, used)) void wait_request(void)
{
    get_byte(req_fd[0]);
}

__attribute__((noinline, used)) void report(long n, long m, long version)
{
    say("v%ld n=%ld m=%ld", version, n, m);
}

/* ==== BEGIN VERSIONED ==== */
__asm__(".text\n"
        ".globl spin\n"
        ".type spin, @function\n"
        "spin:\n"
        ".cfi_startproc\n"
        "pushq %rbx\n"
        ".cfi_def_cfa_offset 16\n"
        ".cfi_offset %rbx, -16\n"
        "pushq %r12\n"
        ".cfi_def_cfa_offset 24\n"
        ".cfi_offset %r12, -24\n"
        "subq $24, %rsp\n"
        ".cfi_def_cfa_offset 48\n"
        "xorl %r12d, %r12d\n"
        "movq $0, 8(%rsp)\n"
        "1:\n"
        "call wait_request\n"
        "addq $1, %r12\n"
        "addq $2, 8(%rsp)\n"
        "movq %r12, %rdi\n"
        "movq 8(%rsp), %rsi\n"
        "movl $2, %edx\n"
        "call report\n"
        "jmp 1b\n"
        ".cfi_endproc\n"
        ".size spin, .-spin\n");
/* ==== END VERSIONED ==== */

void spin(void);

static void *worker(void *arg)
{
    (void)arg;
    spin();
    return NULL;
}

int main(void)
{
    char line[256];

    must_pipe(req_fd);
    start_thread(worker, 0);
    announce_ready();
    while (next_command(line, sizeof line)) {
        if (command_is(line, "call", NULL)) {
            put_byte(req_fd[1]);
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
