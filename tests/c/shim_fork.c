/* FORKS forks (every 10th child execs /bin/true) while THREADS threads keep allocating.
 * Each child allocates (small and large), checks the content and _exits. Each child is waited for
 * with a deadline: on timeout the parent prints `TIMEOUT child=i pid=P`, kills it and exits 2.
 * Prints `ok forks=N` and exits 0 on success. usage: shim_fork [FORKS] [THREADS]
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sys/wait.h>
#include <unistd.h>

static atomic_int stop;
static volatile pid_t current_child;
static volatile int current_index;

static void *allocator(void *arg) {
    uint64_t r = (uintptr_t)arg * 0x9E3779B97F4A7C15ull + 1, sum = 0;
    while (!atomic_load(&stop)) {
        r ^= r << 13; r ^= r >> 7; r ^= r << 17;
        size_t n = (r & 1) ? 32 + r % 2000 : 65536 + r % 300000;
        unsigned char *p = malloc(n);
        if (!p) abort();
        memset(p, (int)r, n);
        sum += p[n / 2];
        free(p);
    }
    return (void *)(uintptr_t)sum;
}

static void on_alarm(int sig) {
    (void)sig;
    char msg[96];
    int len = snprintf(msg, sizeof msg, "TIMEOUT child=%d pid=%d\n", current_index, (int)current_child);
    if (write(1, msg, len) < 0) {}
    if (current_child > 0) kill(current_child, SIGKILL);
    _exit(2);
}

int main(int argc, char **argv) {
    int forks = argc > 1 ? atoi(argv[1]) : 1000;
    int nthreads = argc > 2 ? atoi(argv[2]) : 3;
    pthread_t t[64];
    for (long i = 0; i < nthreads; i++) pthread_create(&t[i], NULL, allocator, (void *)i);
    signal(SIGALRM, on_alarm);
    for (int i = 0; i < forks; i++) {
        current_index = i;
        pid_t pid = fork();
        if (pid < 0) { perror("fork"); return 3; }
        if (pid == 0) {
            if (i % 10 == 0) { execl("/bin/true", "true", (char *)NULL); _exit(4); }
            size_t n = 100000 + (size_t)i * 97;
            unsigned char *big = malloc(n), *small = malloc(100);
            if (!big || !small) _exit(5);
            for (size_t k = 0; k < n; k++) big[k] = (unsigned char)(k + i);
            memset(small, 7, 100);
            int ok = 1;
            for (size_t k = 0; k < n; k += 997) ok &= big[k] == (unsigned char)(k + i);
            big = realloc(big, 2 * n);
            ok &= big && big[n - 1] == (unsigned char)(n - 1 + i) && small[99] == 7;
            free(big);
            free(small);
            _exit(ok ? 0 : 6);
        }
        current_child = pid;
        alarm(10);
        int st = 0;
        while (waitpid(pid, &st, 0) < 0) {}
        alarm(0);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            printf("BADCHILD child=%d status=%d\n", i, st);
            return 1;
        }
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < nthreads; i++) pthread_join(t[i], NULL);
    printf("ok forks=%d\n", forks);
    return 0;
}
