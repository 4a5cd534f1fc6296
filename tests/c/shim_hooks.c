/* Self-checking tests of every allocator entry point's contract, run with and without the shim.
 * Prints one `FAIL ...` line per broken expectation, then `checks=N failures=F`; exits 1 on failure.
 * Sizes straddle 65536 (the shim's default threshold) so both the shim's and glibc's paths are hit.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int checks, failures;
#define CHECK(cond, ...) do { checks++; if (!(cond)) { failures++; printf("FAIL line %d: %s: ", __LINE__, #cond); printf(__VA_ARGS__); printf("\n"); } } while (0)

static int aligned(void *p, size_t a) { return ((uintptr_t)p & (a - 1)) == 0; }

int main(void) {
    const long page = sysconf(_SC_PAGESIZE);
    const size_t sizes[] = {1, 100, 4096, 65535, 65536, 65537, 200000, 3u << 20};
    for (unsigned k = 0; k < sizeof sizes / sizeof *sizes; k++) {
        size_t n = sizes[k];
        /* malloc / usable / free */
        unsigned char *p = malloc(n);
        CHECK(p && malloc_usable_size(p) >= n, "malloc(%zu) usable=%zu", n, p ? malloc_usable_size(p) : 0);
        CHECK(aligned(p, 16), "malloc(%zu)=%p", n, (void *)p);
        memset(p, 0xab, n);
        /* realloc grow and shrink keep the prefix */
        errno = 0;
        unsigned char *q = realloc(p, n * 3);
        CHECK(q && q[0] == 0xab && q[n - 1] == 0xab, "realloc grow %zu: %p -> %p errno=%d", n, (void *)p, (void *)q, errno);
        if (!q) q = p; /* realloc failure leaves p allocated */
        errno = 0;
        unsigned char *s = realloc(q, n / 2 + 1);
        CHECK(s && s[0] == 0xab && s[n / 2] == 0xab, "realloc shrink %zu: %p -> %p errno=%d", n, (void *)q, (void *)s, errno);
        q = s ? s : q;
        free(q);
        /* calloc zeroed, also after reuse */
        for (int rep = 0; rep < 2; rep++) {
            unsigned char *c = calloc(n, 1);
            size_t nz = 0;
            for (size_t i = 0; c && i < n; i++) nz += c[i] != 0;
            CHECK(c && nz == 0, "calloc(%zu) nonzero=%zu", n, nz);
            if (c) memset(c, 0x5a, n);
            free(c);
        }
        /* memalign family */
        const size_t aligns[] = {16, 64, 4096, 65536, 2u << 20};
        for (unsigned a = 0; a < sizeof aligns / sizeof *aligns; a++) {
            size_t al = aligns[a];
            void *m = memalign(al, n);
            CHECK(m && aligned(m, al) && malloc_usable_size(m) >= n, "memalign(%zu,%zu)=%p", al, n, m);
            if (m) memset(m, 1, n);
            free(m);
            void *aa = aligned_alloc(al, (n + al - 1) / al * al);
            CHECK(aa && aligned(aa, al), "aligned_alloc(%zu,%zu)=%p", al, n, aa);
            free(aa);
            void *pm = (void *)1;
            int r = posix_memalign(&pm, al, n);
            CHECK(r == 0 && aligned(pm, al) && malloc_usable_size(pm) >= n, "posix_memalign(%zu,%zu)=%d %p", al, n, r, pm);
            if (r == 0) { memset(pm, 2, n); free(pm); }
        }
        void *v = valloc(n);
        CHECK(v && aligned(v, page) && malloc_usable_size(v) >= n, "valloc(%zu)=%p", n, v);
        free(v);
        void *pv = pvalloc(n);
        size_t rounded = (n + page - 1) / page * page;
        CHECK(pv && aligned(pv, page) && malloc_usable_size(pv) >= rounded, "pvalloc(%zu)=%p usable=%zu", n, pv, pv ? malloc_usable_size(pv) : 0);
        if (pv) memset(pv, 3, rounded);
        free(pv);
        /* reallocarray */
        unsigned char *ra = reallocarray(NULL, n, 2);
        CHECK(ra && malloc_usable_size(ra) >= 2 * n, "reallocarray(NULL,%zu,2)", n);
        unsigned char *rb = NULL;
        errno = 0;
        if (ra) { memset(ra, 9, 2 * n); rb = reallocarray(ra, n, 3); }
        CHECK(rb && rb[2 * n - 1] == 9, "reallocarray grow %zu: %p -> %p errno=%d", n, (void *)ra, (void *)rb, errno);
        free(rb ? rb : ra);
    }
    /* reallocarray overflow: NULL, ENOMEM, original block untouched */
    /* volatile: keep the compiler from folding these calls or reasoning about them */
    volatile size_t over = SIZE_MAX / 2 + 2, hugesz = SIZE_MAX - 4096, many = SIZE_MAX / 16;
    unsigned char *keep = malloc(100000);
    memset(keep, 0x77, 100000);
    unsigned char *volatile keep_alias = keep;
    errno = 0;
    void *ov = reallocarray(keep_alias, over, 2);
    CHECK(ov == NULL && errno == ENOMEM, "reallocarray overflow=%p errno=%d", ov, errno);
    CHECK(keep[0] == 0x77 && keep[99999] == 0x77 && malloc_usable_size(keep) >= 100000, "block kept after overflow");
    free(keep);
    /* impossible sizes fail cleanly */
    errno = 0;
    void *huge = malloc(hugesz);
    CHECK(huge == NULL && errno == ENOMEM, "malloc(huge)=%p errno=%d", huge, errno);
    errno = 0;
    void *hc = calloc(many, 32);
    CHECK(hc == NULL && errno == ENOMEM, "calloc overflow=%p errno=%d", hc, errno);
    void *bad = (void *)1;
    CHECK(posix_memalign(&bad, 24, 100000) == EINVAL, "posix_memalign(24) must be EINVAL");
    /* edge cases */
    free(NULL);
    CHECK(malloc_usable_size(NULL) == 0, "malloc_usable_size(NULL)");
    void *z = malloc(0);
    free(z);
    unsigned char *r0 = realloc(NULL, 70000);
    CHECK(r0 != NULL, "realloc(NULL, 70000)");
    if (r0) r0[69999] = 1;
    r0 = realloc(r0, 10);     /* large -> small crosses the threshold downwards */
    CHECK(r0 != NULL, "realloc large->small");
    free(r0);
    printf("checks=%d failures=%d\n", checks, failures);
    return failures ? 1 : 0;
}
