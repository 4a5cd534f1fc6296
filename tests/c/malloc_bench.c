/* Allocator micro-benchmark for shim-bench. Prints `ns=N ops=O sum=S`; the checksum depends on
 * every allocation's content so none of the work can be optimised away.
 *   malloc_bench small THREADS OPS   16 B..4 KiB blocks: a ring of 512 live blocks per thread,
 *                                    each op frees one and mallocs another, touching both ends.
 *   malloc_bench large OPS           64 KiB..8 MiB (power of two times 1..2): malloc, write every page, read
 *                                    one byte per page back, free.
 *   malloc_bench forks THREADS FORKS THREADS workers malloc, memset, realloc (x2) and free blocks of
 *                                    64 KiB..4 MiB while the main thread forks FORKS children one after
 *                                    another (each exits at once; it is waited for). ns is the time of the
 *                                    forks, ops the workers' completed operations meanwhile (issue 12's
 *                                    probe: large blocks under threads and fork), cpu_ns the CPU time the
 *                                    forks took: the forking thread's plus the children's (what a fork
 *                                    costs, apart from how the scheduler shares the cores with the workers).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

static long ops;
static uint64_t sums[64];

static uint64_t rnd(uint64_t *s) { *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17; return *s; }

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + t.tv_nsec;
}

static uint64_t thread_cpu_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + t.tv_nsec;
}

static uint64_t tv_ns(struct timeval t) { return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_usec * 1000ull; }

static void *small_worker(void *arg) {
    uintptr_t id = (uintptr_t)arg;
    uint64_t r = 0x9E3779B97F4A7C15ull * (id + 1), sum = 0;
    enum { RING = 512 };
    unsigned char *ring[RING];
    size_t len[RING];
    for (int i = 0; i < RING; i++) { len[i] = 16; ring[i] = malloc(16); ring[i][0] = ring[i][15] = 1; }
    for (long op = 0; op < ops; op++) {
        uint64_t x = rnd(&r);
        int i = x % RING;
        sum += ring[i][0] + ring[i][len[i] - 1];
        free(ring[i]);
        size_t n = 16 + (x >> 20) % 4081;
        unsigned char *p = malloc(n);
        p[0] = (unsigned char)x;
        p[n - 1] = (unsigned char)(x >> 8);
        ring[i] = p;
        len[i] = n;
    }
    for (int i = 0; i < RING; i++) { sum += ring[i][0]; free(ring[i]); }
    sums[id] = sum;
    return NULL;
}

static volatile int stop_workers;

static void *fork_worker(void *arg) {
    uintptr_t id = (uintptr_t)arg;
    uint64_t r = 0xA0761D6478BD642Full * (id + 1), sum = 0;
    long n_ops = 0;
    while (!stop_workers) {
        uint64_t x = rnd(&r);
        /* log-uniform over 2^16 .. 2^22 */
        size_t n = ((size_t)1 << (16 + x % 6)) + (x >> 8) % ((size_t)1 << (16 + x % 6));
        unsigned char *p = malloc(n);
        memset(p, (int)(x >> 16) | 1, n);
        unsigned char *q = realloc(p, 2 * n);
        q[2 * n - 1] = 3;
        for (size_t i = 0; i < 2 * n; i += 4096) sum += q[i];
        sum += q[n - 1] + q[2 * n - 1];
        free(q);
        n_ops++;
    }
    sums[id] = sum;
    __atomic_fetch_add(&ops, n_ops, __ATOMIC_RELAXED);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: malloc_bench small THREADS OPS | large OPS | forks THREADS FORKS\n"); return 2; }
    uint64_t sum = 0, t0, t1, cpu_ns = 0;
    if (!strcmp(argv[1], "small")) {
        int threads = atoi(argv[2]);
        ops = atol(argv[3]);
        pthread_t t[64];
        t0 = now_ns();
        for (long i = 0; i < threads; i++) pthread_create(&t[i], NULL, small_worker, (void *)i);
        for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
        t1 = now_ns();
        for (int i = 0; i < threads; i++) sum += sums[i];
        ops *= threads;
    } else if (!strcmp(argv[1], "forks")) {
        int threads = atoi(argv[2]);
        long forks = atol(argv[3]);
        pthread_t t[64];
        ops = 0;
        for (long i = 0; i < threads; i++) pthread_create(&t[i], NULL, fork_worker, (void *)i);
        t0 = now_ns();
        uint64_t c0 = thread_cpu_ns();
        for (long i = 0; i < forks; i++) {
            pid_t c = fork();
            if (c == 0) _exit(0);
            if (c < 0) { perror("fork"); return 1; }
            int st;
            waitpid(c, &st, 0);
        }
        t1 = now_ns();
        struct rusage ch;
        getrusage(RUSAGE_CHILDREN, &ch);
        cpu_ns = thread_cpu_ns() - c0 + tv_ns(ch.ru_utime) + tv_ns(ch.ru_stime);
        stop_workers = 1;
        for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
        /* The workers' sums depend on how many operations they made: count the workers that made any. */
        for (int i = 0; i < threads; i++) sum += sums[i] != 0;
    } else {
        ops = atol(argv[2]);
        uint64_t r = 12345;
        t0 = now_ns();
        for (long op = 0; op < ops; op++) {
            /* log-uniform over 2^16 .. 2^23 */
            uint64_t x = rnd(&r);
            size_t n = ((size_t)1 << (16 + x % 7)) + (x >> 8) % ((size_t)1 << (16 + x % 7));
            unsigned char *p = malloc(n);
            for (size_t i = 0; i < n; i += 4096) p[i] = (unsigned char)(i >> 12);
            p[n - 1] = 1;
            for (size_t i = 0; i < n; i += 4096) sum += p[i];
            sum += p[n - 1];
            free(p);
        }
        t1 = now_ns();
    }
    printf("ns=%llu ops=%ld sum=%llu cpu_ns=%llu\n", (unsigned long long)(t1 - t0), ops, (unsigned long long)sum,
           (unsigned long long)cpu_ns);
    return 0;
}
