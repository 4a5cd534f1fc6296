/* Reproducer for a registry race: a realloc that moves a shim block (mremap MAYMOVE) frees the old
 * address in the kernel; if the registry entry for that address is dropped only afterwards, another
 * thread's fresh block can be given the same address and lose or shadow its own entry. Symptoms:
 * malloc_usable_size of a fresh block smaller than requested, then free() of it going to glibc.
 * THREADS threads x ITERS: even threads grow 128 KiB blocks to 8 MiB with realloc; odd threads
 * malloc 128 KiB + a few pages and check malloc_usable_size. Prints `ok checks=N` or FAIL lines.
 * usage: shim_realloc_race [THREADS] [ITERS]
 */
#define _GNU_SOURCE
#include <malloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static long iters = 20000;
static atomic_long failures, checks;

static void check(void *p, size_t n, const char *what) {
    atomic_fetch_add(&checks, 1);
    size_t u = p ? malloc_usable_size(p) : 0;
    if (!p || u < n) {
        if (atomic_fetch_add(&failures, 1) < 10)
            fprintf(stderr, "FAIL %s ptr=%p requested=%zu usable=%zu\n", what, p, n, u);
    }
}

static void *grower(void *arg) {
    (void)arg;
    for (long i = 0; i < iters; i++) {
        unsigned char *p = malloc(128 << 10);
        check(p, 128 << 10, "malloc");
        if (!p) continue;
        p[0] = 1;
        unsigned char *q = realloc(p, 8 << 20);
        check(q, 8 << 20, "realloc-grow");
        if (!q) { free(p); continue; }
        if (q[0] != 1) { atomic_fetch_add(&failures, 1); fprintf(stderr, "FAIL content lost\n"); }
        free(q);
    }
    return NULL;
}

static void *taker(void *arg) {
    uintptr_t id = (uintptr_t)arg;
    for (long i = 0; i < iters; i++) {
        size_t n = (128 << 10) + ((i + id) % 4) * 4096;
        unsigned char *p = malloc(n);
        check(p, n, "malloc-fresh");
        if (!p) continue;
        memset(p, 2, 64);
        check(p, n, "malloc-fresh-again");
        free(p);
    }
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 8;
    if (argc > 2) iters = atol(argv[2]);
    pthread_t t[64];
    for (long i = 0; i < threads; i++) pthread_create(&t[i], NULL, i % 2 ? taker : grower, (void *)i);
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    if (atomic_load(&failures)) {
        printf("failures=%ld checks=%ld\n", (long)atomic_load(&failures), (long)atomic_load(&checks));
        return 1;
    }
    printf("ok checks=%ld\n", (long)atomic_load(&checks));
    return 0;
}
