/* Known duplicate contents for `ksmplusctl scan` (desktop_scan.rs).
 *
 * One private anonymous mapping, THP off (a huge page would make 512 pages present at once),
 * every page written explicitly, in this order:
 *   300 all-zero pages (zeros *written*: an untouched page is not present),
 *   200 all-0xff pages,
 *   100 pages repeating FF FF FF 00 (period 4),
 *    50 copies of one pseudo-random page,
 *    40 pseudo-random unique pages.
 * Prints `buf=0x... pages=N zero=300 ones=200 periodic=100 copies=50 unique=40 copy_page=0x...`
 * (the address of one of the 50 copies, for the test to hash), then waits for stdin to close,
 * checks the content is unchanged and exits 0 (1 if it changed).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

enum { ZERO = 300, ONES = 200, PERIODIC = 100, COPIES = 50, UNIQUE = 40 };

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t next(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return rng;
}

static void random_page(unsigned char *p, long ps) {
    for (long i = 0; i < ps; i += 8) {
        uint64_t v = next();
        memcpy(p + i, &v, 8);
    }
}

static uint64_t checksum(const unsigned char *p, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

int main(void) {
    long ps = sysconf(_SC_PAGESIZE);
    size_t pages = ZERO + ONES + PERIODIC + COPIES + UNIQUE;
    unsigned char *buf = mmap(NULL, pages * ps, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) { perror("mmap"); return 2; }
    madvise(buf, pages * ps, MADV_NOHUGEPAGE);
    unsigned char *p = buf;
    for (int i = 0; i < ZERO; i++, p += ps) { memset(p, 1, ps); memset(p, 0, ps); }
    for (int i = 0; i < ONES; i++, p += ps) memset(p, 0xff, ps);
    for (int i = 0; i < PERIODIC; i++, p += ps)
        for (long j = 0; j < ps; j += 4) { p[j] = 0xff; p[j + 1] = 0xff; p[j + 2] = 0xff; p[j + 3] = 0; }
    unsigned char *copy = p;
    random_page(copy, ps);
    for (int i = 1; i < COPIES; i++) memcpy(copy + i * ps, copy, ps);
    p += COPIES * ps;
    for (int i = 0; i < UNIQUE; i++, p += ps) random_page(p, ps);
    uint64_t sum = checksum(buf, pages * ps);
    printf("buf=%p pages=%zu zero=%d ones=%d periodic=%d copies=%d unique=%d copy_page=%p\n",
           (void *)buf, pages, ZERO, ONES, PERIODIC, COPIES, UNIQUE, (void *)copy);
    fflush(stdout);
    char tmp[256];
    while (fgets(tmp, sizeof tmp, stdin)) {}
    return checksum(buf, pages * ps) == sum ? 0 : 1;
}
