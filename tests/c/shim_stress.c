/* Allocator stress: THREADS threads x OPS mixed malloc/calloc/realloc/free/posix_memalign with
 * sizes around the shim's threshold, split into ROUNDS rounds that each end with every block freed.
 *
 * Checks (any failure prints `FAIL ...` and exits 1):
 *   - a pattern written into a block survives until free, and the common prefix survives realloc;
 *   - calloc memory reads zero; malloc_usable_size >= the request; posix_memalign results aligned.
 * After each round the main thread prints `round=R rss_kib=K` (from /proc/self/statm);
 * at the end `ok ops=N checks=C`.
 * usage: shim_stress [THREADS] [OPS_PER_THREAD] [ROUNDS]
 */
#define _GNU_SOURCE
#include <malloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SLOTS 96

static int threads = 16, rounds = 5;
static long ops_per_thread = 100000;
static pthread_barrier_t round_end, round_go;
static atomic_long checks, failures;

struct slot { unsigned char *p; size_t n; unsigned char tag; };

static uint64_t rnd(uint64_t *s) { *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17; return *s; }

static void fail(const char *what, void *p, size_t n, size_t extra) {
    if (atomic_fetch_add(&failures, 1) < 20)
        fprintf(stderr, "FAIL %s ptr=%p n=%zu extra=%zu\n", what, p, n, extra);
}

/* Sampled positions of a block of n bytes: the first and last 64, and every 4093rd. */
#define FOR_SAMPLES(n, i, body) do { \
    size_t n_ = (n); \
    for (size_t i = 0; i < n_ && i < 64; i++) body; \
    for (size_t i = 64; i + 64 < n_; i += 4093) body; \
    for (size_t i = n_ > 128 ? n_ - 64 : 64; i < n_; i++) body; \
} while (0)

static unsigned char val(unsigned char tag, size_t i) { return (unsigned char)(tag ^ (i * 13) ^ (i >> 12)); }

static void write_pat(struct slot *s) { FOR_SAMPLES(s->n, i, s->p[i] = val(s->tag, i)); }

static void check_pat(const struct slot *s, size_t limit, const char *what) {
    int bad = 0;
    FOR_SAMPLES(s->n, i, { if (i < limit && s->p[i] != val(s->tag, i)) bad = 1; });
    atomic_fetch_add(&checks, 1);
    if (bad) fail(what, s->p, s->n, limit);
}

static size_t pick_size(uint64_t *r) {
    switch (rnd(r) % 10) {
    case 0: case 1: case 2: return 16 + rnd(r) % 4081;                   /* small: glibc */
    case 3: case 4: case 5: return 1024 + rnd(r) % (256 * 1024 - 1024);  /* 1 KiB .. 256 KiB */
    default: return 65536 + (size_t)(rnd(r) % 33) - 16;                  /* threshold +- 16 */
    }
}

static void check_new(void *p, size_t n, const char *what) {
    atomic_fetch_add(&checks, 1);
    if (!p) { fail(what, p, n, 0); return; }
    if (malloc_usable_size(p) < n) {
        char m[64];
        snprintf(m, sizeof m, "usable<requested(%s)", what);
        fail(m, p, n, malloc_usable_size(p));
    }
}

static void *worker(void *arg) {
    uint64_t r = 0x9E3779B97F4A7C15ull * ((uintptr_t)arg + 1);
    struct slot s[SLOTS];
    memset(s, 0, sizeof s);
    long per_round = ops_per_thread / rounds;
    for (int round = 0; round < rounds; round++) {
        for (long op = 0; op < per_round; op++) {
            struct slot *x = &s[rnd(&r) % SLOTS];
            if (x->p) {
                switch (rnd(&r) % 3) {
                case 0:
                    check_pat(x, x->n, "pattern-before-free");
                    free(x->p);
                    x->p = NULL;
                    break;
                case 1: {
                    size_t m = pick_size(&r);
                    unsigned char *q = realloc(x->p, m);
                    check_new(q, m, "realloc");
                    if (!q) break;
                    x->p = q;
                    check_pat(x, m, "pattern-after-realloc");
                    x->n = m;
                    x->tag = (unsigned char)rnd(&r);
                    write_pat(x);
                    break;
                }
                default:
                    check_pat(x, x->n, "pattern");
                }
                continue;
            }
            size_t n = pick_size(&r);
            x->tag = (unsigned char)rnd(&r);
            x->n = n;
            switch (rnd(&r) % 3) {
            case 0:
                x->p = malloc(n);
                check_new(x->p, n, "malloc");
                break;
            case 1: {
                x->p = calloc(1, n);
                check_new(x->p, n, "calloc");
                int nz = 0;
                if (x->p) {
                    size_t full = n < 8192 ? n : 8192;
                    for (size_t i = 0; i < full; i++) nz |= x->p[i];
                    for (size_t i = full; i < n; i += 509) nz |= x->p[i];
                    nz |= x->p[n - 1];
                }
                if (nz) fail("calloc-not-zero", x->p, n, 0);
                break;
            }
            default: {
                size_t align = (size_t)16 << (rnd(&r) % 18); /* 16 .. 2 MiB */
                void *p = NULL;
                int e = posix_memalign(&p, align, n);
                if (e) p = NULL;
                x->p = p;
                check_new(p, n, "posix_memalign");
                if (p && ((uintptr_t)p & (align - 1))) fail("misaligned", p, n, align);
            }
            }
            if (x->p) write_pat(x);
        }
        for (int i = 0; i < SLOTS; i++)
            if (s[i].p) { check_pat(&s[i], s[i].n, "pattern-end-of-round"); free(s[i].p); s[i].p = NULL; }
        pthread_barrier_wait(&round_end);
        pthread_barrier_wait(&round_go);
    }
    return NULL;
}

static long rss_kib(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    long size = 0, res = 0;
    if (f) { if (fscanf(f, "%ld %ld", &size, &res) != 2) res = 0; fclose(f); }
    return res * (sysconf(_SC_PAGESIZE) / 1024);
}

int main(int argc, char **argv) {
    if (argc > 1) threads = atoi(argv[1]);
    if (argc > 2) ops_per_thread = atol(argv[2]);
    if (argc > 3) rounds = atoi(argv[3]);
    pthread_barrier_init(&round_end, NULL, threads + 1);
    pthread_barrier_init(&round_go, NULL, threads + 1);
    pthread_t t[256];
    for (long i = 0; i < threads; i++) pthread_create(&t[i], NULL, worker, (void *)i);
    for (int round = 0; round < rounds; round++) {
        pthread_barrier_wait(&round_end);
        printf("round=%d rss_kib=%ld\n", round, rss_kib());
        fflush(stdout);
        pthread_barrier_wait(&round_go);
    }
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    if (atomic_load(&failures)) {
        printf("failures=%ld\n", (long)atomic_load(&failures));
        return 1;
    }
    printf("ok ops=%ld checks=%ld\n", ops_per_thread * threads, (long)atomic_load(&checks));
    return 0;
}
