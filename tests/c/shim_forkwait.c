/* How long forks take under the shim: the parent forks first thing in main, its child
 * allocates (its first hook sets its channel up) and forks a grandchild, then the parent forks
 * again. Prints `child fork_ms=C` (the child's fork), then `parent first_ms=F second_ms=S`.
 * A process whose Hello reached an agent waits for the verdict before a fork, within a budget
 * for its whole life; a fork child (which said no Hello) never waits. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Keeps the compiler from eliding a malloc/free pair. */
static unsigned char *volatile sink;

static long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000L + t.tv_nsec / 1000000L;
}

/* Forks a child that exits at once, reaps it, and returns how long the fork took (ms). */
static long timed_fork(void) {
    long t = now_ms();
    pid_t c = fork();
    if (c < 0) { perror("fork"); exit(3); }
    if (c == 0) _exit(0);
    long d = now_ms() - t;
    waitpid(c, NULL, 0);
    return d;
}

int main(void) {
    long t = now_ms();
    pid_t c = fork();
    if (c < 0) { perror("fork"); return 3; }
    if (c == 0) {
        sink = malloc(1 << 20);
        if (sink) sink[0] = 1;
        free(sink);
        printf("child fork_ms=%ld\n", timed_fork());
        fflush(stdout);
        _exit(0);
    }
    long first = now_ms() - t;
    int st = -1;
    waitpid(c, &st, 0);
    long second = timed_fork();
    printf("parent first_ms=%ld second_ms=%ld status=%d\n", first, second, st);
    return 0;
}
