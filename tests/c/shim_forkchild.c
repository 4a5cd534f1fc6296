/* A parent and one child made by fork() (argv[1] "fork") or by a raw clone system call that
 * bypasses pthread_atfork, as Chromium's zygote forks (argv[1] "clone"). Each allocates 1 MiB
 * (a shim block), writes it, prints `parent pid=P` / `child pid=C ns_pid=N` and waits for
 * stdin to close. The parent reaps the child and prints `done status=S`.
 * argv[1] "idle": the child runs no hook after the fork: it prints `child pid=C` with write(2)
 * and blocks in read(2) on stdin; on a first line it allocates and writes 1 MiB, prints
 * `child active`, and waits for stdin to close (the parent only waits for it).
 * argv[1] "idle-later": as "idle", but the parent forks only once it reads a first line. */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void wait_stdin(void) {
    char b[64];
    while (read(0, b, sizeof b) > 0) {}
}

int main(int argc, char **argv) {
    int raw = argc > 1 && !strcmp(argv[1], "clone");
    setvbuf(stdout, NULL, _IOLBF, 0);
    unsigned char *p = malloc(1 << 20);
    memset(p, 1, 1 << 20);
    printf("parent pid=%d\n", getpid());
    int later = argc > 1 && !strcmp(argv[1], "idle-later");
    int idle = later || (argc > 1 && !strcmp(argv[1], "idle"));
    if (later) {
        char b[16];
        if (read(0, b, sizeof b) <= 0) return 6;
    }
    pid_t c = raw ? (pid_t)syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0) : fork();
    if (c < 0) { perror("fork"); return 3; }
    if (c == 0 && idle) {
        char line[64];
        int n = snprintf(line, sizeof line, "child pid=%ld\n", (long)syscall(SYS_getpid));
        if (write(1, line, n) != n) _exit(4);
        char b;
        if (read(0, &b, 1) != 1) _exit(5);
        unsigned char *q = malloc(1 << 20);
        memset(q, 3, 1 << 20);
        printf("child active sum=%d\n", q[4095]);
        wait_stdin();
        _exit(0);
    }
    if (idle) {
        int st = 0;
        waitpid(c, &st, 0);
        printf("done status=%d\n", st);
        return 0;
    }
    if (c == 0) {
        unsigned char *q = malloc(1 << 20);
        memset(q, 2, 1 << 20);
        printf("child pid=%ld sum=%d\n", (long)syscall(SYS_getpid), q[4095] + p[4095]);
        wait_stdin();
        _exit(0);
    }
    wait_stdin();
    int st = 0;
    waitpid(c, &st, 0);
    printf("done status=%d\n", st);
    return 0;
}
