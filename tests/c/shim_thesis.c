/* The thesis test program (5.1.1): malloc 20 MiB, fill byte i with i % 256, then wait.
 *
 * Prints `ptr=0x... size=N sum=S` once the buffer is filled (the checksum reads the whole buffer
 * back, so the compiler cannot drop the stores), then blocks until stdin is closed, re-reads the
 * buffer, prints `sum=S` again and exits 0 (1 if the content changed).
 *
 * With argument `madvise` it also marks the page-rounded range *enclosing* the buffer
 * MADV_MERGEABLE itself (what a shim-less program could do) and prints `madvise=RET`.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define SIZE (20u << 20)

static uint64_t checksum(const unsigned char *p, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

int main(int argc, char **argv) {
    unsigned char *buf = malloc(SIZE);
    if (!buf) { perror("malloc"); return 2; }
    for (size_t i = 0; i < SIZE; i++) buf[i] = (unsigned char)(i % 256);
    uint64_t sum = checksum(buf, SIZE);
    printf("ptr=%p size=%u sum=%016llx\n", (void *)buf, SIZE, (unsigned long long)sum);
    if (argc > 1 && strcmp(argv[1], "madvise") == 0) {
        long page = sysconf(_SC_PAGESIZE);
        uintptr_t a = (uintptr_t)buf & ~(uintptr_t)(page - 1);
        uintptr_t b = ((uintptr_t)buf + SIZE + page - 1) & ~(uintptr_t)(page - 1);
        int r = madvise((void *)a, b - a, MADV_MERGEABLE);
        printf("madvise=%d\n", r);
    }
    fflush(stdout);
    char tmp[256];
    while (fread(tmp, 1, sizeof tmp, stdin) > 0) {}
    uint64_t again = checksum(buf, SIZE);
    printf("sum=%016llx\n", (unsigned long long)again);
    free(buf);
    return again == sum ? 0 : 1;
}
