/* A fork server in miniature, as Chromium's zygote: it forks first thing in main — with fork()
 * (argv[1] "fork") or a raw clone through glibc's syscall() that runs no pthread_atfork
 * handler (argv[1] "clone") — long before an agent could answer its shim's Hello. The child
 * prints `child merge_any=N` (N: its prctl(PR_GET_MEMORY_MERGE), inherited only if the parent
 * had switched merge-any on before the fork) and exits. The parent reaps it, then gives the
 * agent up to 10 s to switch merge-any on in the parent itself (allocating 1 MiB blocks so the
 * shim's hooks run the agent's commands), and prints `parent merge_any=N status=S`. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PR_GET_MEMORY_MERGE 68

/* Keeps the compiler from eliding a malloc/free pair. */
static unsigned char *volatile sink;

static int merge_any(void) { return prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0); }

int main(int argc, char **argv) {
    int raw = argc > 1 && !strcmp(argv[1], "clone");
    pid_t c = raw ? (pid_t)syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0) : fork();
    if (c < 0) { perror("fork"); return 3; }
    if (c == 0) {
        printf("child merge_any=%d\n", merge_any());
        fflush(stdout);
        _exit(0);
    }
    int st = -1;
    if (waitpid(c, &st, 0) != c) { perror("waitpid"); return 4; }
    int m = merge_any();
    struct timespec ms10 = {0, 10 * 1000 * 1000};
    for (int i = 0; i < 1000 && m != 1; i++) {
        sink = malloc(1 << 20);
        if (sink) sink[0] = 1;
        free(sink);
        nanosleep(&ms10, NULL);
        m = merge_any();
    }
    printf("parent merge_any=%d status=%d\n", m, st);
    return 0;
}
