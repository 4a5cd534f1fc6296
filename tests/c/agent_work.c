/* Workloads for the agent's end-to-end tests. Allocates with plain malloc (no madvise: finding
 * the duplicates is the agent's job), fills, reads every byte back into an FNV-1a checksum so the
 * stores cannot be dropped, prints one line, then blocks until stdin is closed.
 *
 *   agent_work table52          two 100 MiB buffers; the first 256 pages of each all 0xff,
 *                               every other page unique (thesis Table 5-2)
 *   agent_work unique MIB       MIB MiB of unique pages
 *   agent_work dense MIB        MIB MiB filled with byte i = i % 256 (thesis 5.1.1): all pages equal
 *   agent_work moved MIB        MIB MiB mmapped as in dense; on a line from stdin mremap moves it
 *                               (then mallocs a 1 MiB block) and prints `b=NEW c=BLOCK sum=S`
 *   agent_work rewrite MIB      MIB MiB as in dense; on a line from stdin every page is rewritten
 *                               with unique content and `sum=S` printed
 *   agent_work volatile MIB     MIB MiB of pages that are all equal at any instant but rewritten
 *                               continuously (a counter in every page) by a second thread
 *
 * Output: `a=0x... b=0x... size=N sum=S` (b=0 when there is one buffer).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sys/mman.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static uint64_t checksum(const unsigned char *p, size_t n, uint64_t h) {
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

/* Page by page, so a page is never seen resident and all-zero for long: a memset of the whole
 * buffer first would leave (under CPU load, for a few hundred ms) many resident zero pages ahead
 * of the tagging loop — real duplicates the agent may rightly mark for a moment. */
static void fill_unique(unsigned char *p, size_t n, uint64_t tag) {
    long page = sysconf(_SC_PAGESIZE);
    for (size_t off = 0; off < n; off += page) {
        uint64_t v[2] = {tag, off / page};
        memcpy(p + off, v, sizeof v);
        memset(p + off + sizeof v, 0, page - sizeof v);
    }
}

static volatile unsigned char *vbuf;
static size_t vsize;

static void *rewrite(void *arg) {
    (void)arg;
    long page = sysconf(_SC_PAGESIZE);
    for (uint64_t c = 1;; c++) {
        for (size_t off = 0; off < vsize; off += page) *(volatile uint64_t *)(vbuf + off) = c;
        struct timespec ts = {0, 2 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: agent_work MODE [MIB]\n"); return 2; }
    const char *mode = argv[1];
    size_t mib = argc > 2 ? strtoul(argv[2], NULL, 10) : 100;
    size_t size = mib << 20;
    unsigned char *a = NULL, *b = NULL;
    uint64_t sum = 1469598103934665603ull;
    long page = sysconf(_SC_PAGESIZE);
    if (strcmp(mode, "table52") == 0) {
        size = 100u << 20;
        a = malloc(size);
        b = malloc(size);
        if (!a || !b) { perror("malloc"); return 2; }
        fill_unique(a, size, 0xa0a0a0a0a0a0a0a0ull);
        fill_unique(b, size, 0xb0b0b0b0b0b0b0b0ull);
        memset(a, 0xff, 256 * page);
        memset(b, 0xff, 256 * page);
        sum = checksum(a, size, sum);
        sum = checksum(b, size, sum);
    } else if (strcmp(mode, "unique") == 0) {
        a = malloc(size);
        if (!a) { perror("malloc"); return 2; }
        fill_unique(a, size, 0xc0c0c0c0c0c0c0c0ull ^ (uint64_t)getpid() << 8);
        sum = checksum(a, size, sum);
    } else if (strcmp(mode, "dense") == 0 || strcmp(mode, "rewrite") == 0) {
        a = malloc(size);
        if (!a) { perror("malloc"); return 2; }
        for (size_t i = 0; i < size; i++) a[i] = (unsigned char)(i % 256);
        sum = checksum(a, size, sum);
    } else if (strcmp(mode, "volatile") == 0) {
        a = malloc(size);
        if (!a) { perror("malloc"); return 2; }
        memset(a, 0x5a, size);
        sum = checksum(a, size, sum);
        vbuf = a;
        vsize = size;
        pthread_t t;
        if (pthread_create(&t, NULL, rewrite, NULL) != 0) { perror("pthread_create"); return 2; }
    } else if (strcmp(mode, "moved") == 0) {
        a = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (a == MAP_FAILED) { perror("mmap"); return 2; }
        for (size_t i = 0; i < size; i++) a[i] = (unsigned char)(i % 256);
        sum = checksum(a, size, sum);
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    printf("a=0x%lx b=0x%lx size=%zu sum=%016llx\n", (unsigned long)a, (unsigned long)b, size,
           (unsigned long long)sum);
    fflush(stdout);
    if (strcmp(mode, "moved") == 0) {
        /* On a line from stdin: move the mapping elsewhere (onto a PROT_NONE reservation),
         * then allocate a later 1 MiB block: once the agent has that, it has the move too. */
        char line[64];
        if (!fgets(line, sizeof line, stdin)) return 0;
        void *dst = mmap(NULL, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (dst == MAP_FAILED) { perror("mmap"); return 2; }
        unsigned char *m = mremap(a, size, size, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
        if (m == MAP_FAILED) { perror("mremap"); return 2; }
        unsigned char *c = malloc(1 << 20);
        if (!c) { perror("malloc"); return 2; }
        memset(c, 0x33, 1 << 20);
        uint64_t s2 = checksum(c, 1 << 20, checksum(m, size, 1469598103934665603ull));
        printf("b=0x%lx c=0x%lx sum=%016llx\n", (unsigned long)m, (unsigned long)c,
               (unsigned long long)s2);
        fflush(stdout);
    }
    if (strcmp(mode, "rewrite") == 0) {
        char line[64];
        if (!fgets(line, sizeof line, stdin)) return 0;
        fill_unique(a, size, 0xd0d0d0d0d0d0d0d0ull ^ (uint64_t)getpid() << 8);
        printf("sum=%016llx\n", (unsigned long long)checksum(a, size, 1469598103934665603ull));
        fflush(stdout);
    }
    char tmp[256];
    while (fread(tmp, 1, sizeof tmp, stdin) > 0) {}
    return 0;
}
