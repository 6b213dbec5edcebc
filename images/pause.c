/* The pod sandbox's process, built here so that no image needs to be downloaded
 * (scripts/images.sh): it holds the pod's namespaces, reaps orphans (shared PID namespace)
 * and leaves on SIGINT/SIGTERM. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void leave(int sig) { (void)sig; _exit(0); }

static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {}
}

int main(void) {
    struct sigaction quit = {.sa_handler = leave}, child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
    if (sigaction(SIGINT, &quit, NULL) || sigaction(SIGTERM, &quit, NULL) || sigaction(SIGCHLD, &child, NULL))
        return 1;
    for (;;)
        pause();
}
