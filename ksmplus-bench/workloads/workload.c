/*
 * ksmplus-bench workload program: one binary, one mode per workload.
 *
 *   ksmplus-wl MODE [INDEX] [DIV]
 *
 * MODE  dense | sparse | none | churn | many
 * INDEX the process's index within its cell (W1 dense and W6 many run several processes)
 * DIV   size divisor (1 = full size, 8 = the CI smoke size)
 *
 * Protocol on stdout, one line each, then the program waits:
 *   buf <start-hex> <len> <checksum-hex> <stable|volatile>
 *   ready
 * The program exits when stdin reaches end of file (the bench closes the pipe) or on a signal.
 *
 * Every buffer is read back into the printed checksum after it is filled, so the compiler cannot
 * drop the stores; the bench recomputes the checksum through /proc/PID/mem and refuses a figure
 * whose memory does not hold what this program claims.
 *
 * If KSMPLUS_BENCH_PRCTL=1, the program itself calls prctl(PR_SET_MEMORY_MERGE, 1) first (the
 * bench normally sets it in a pre-exec hook instead: on 6.4+ the flag survives fork and exec).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#ifndef PR_SET_MEMORY_MERGE
#define PR_SET_MEMORY_MERGE 67
#endif

#define PAGE 4096UL
#define MIB (1024UL * 1024UL)

static void die(const char *what)
{
	fprintf(stderr, "ksmplus-wl: %s: %s\n", what, strerror(errno));
	exit(2);
}

/* FNV-1a over 64-bit little-endian words with an extra xor-shift per word (so the low bits mix);
 * len is a multiple of 8. Same as the bench's `checksum`. */
static uint64_t checksum(const void *p, size_t len)
{
	const volatile uint64_t *w = p;
	uint64_t h = 0xcbf29ce484222325ULL;
	for (size_t i = 0; i < len / 8; i++) {
		h ^= w[i];
		h *= 0x100000001b3ULL;
		h ^= h >> 29;
	}
	return h;
}

static void report(const void *p, size_t len, int stable)
{
	printf("buf %lx %zu %lx %s\n", (unsigned long)p, len, (unsigned long)checksum(p, len),
	       stable ? "stable" : "volatile");
}

static void *aligned(size_t len)
{
	void *p = NULL;
	int e = posix_memalign(&p, PAGE, len);
	if (e) {
		errno = e;
		die("posix_memalign");
	}
	return p;
}

/* A page no other page (of any process, any seed) equals: seed, page index and word index. */
static void fill_unique(uint64_t *p, size_t len, uint64_t seed)
{
	for (size_t i = 0; i < len / 8; i++)
		p[i] = (seed << 40) ^ ((uint64_t)i * 0x9e3779b97f4a7c15ULL) ^ i;
}

/* A page whose content depends only on `key`: equal keys, equal pages. */
static void fill_keyed(uint64_t *page, uint64_t key)
{
	for (size_t k = 0; k < PAGE / 8; k++)
		page[k] = (key + 1) * 0xd6e8feb86659fd93ULL ^ k;
}

static volatile uint64_t churn_sink;

static void wait_for_eof(uint64_t *churn, size_t churn_len)
{
	char buf[256];
	uint64_t gen = 0;
	for (;;) {
		struct pollfd pfd = { .fd = 0, .events = POLLIN };
		int r = poll(&pfd, 1, churn ? 100 : -1);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (r > 0) {
			ssize_t n = read(0, buf, sizeof buf);
			if (n <= 0)
				return;
			continue;
		}
		/* Churn: every 100 ms every page of the churn region gets new, unique content. */
		gen++;
		for (size_t p = 0; p < churn_len / PAGE; p++) {
			churn[p * (PAGE / 8)] = gen;
			churn[p * (PAGE / 8) + 1] = p;
		}
		churn_sink = churn[0];
	}
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s dense|sparse|none|churn|many [INDEX] [DIV]\n", argv[0]);
		return 2;
	}
	const char *mode = argv[1];
	unsigned long index = argc > 2 ? strtoul(argv[2], NULL, 10) : 0;
	unsigned long div = argc > 3 ? strtoul(argv[3], NULL, 10) : 1;
	if (div == 0)
		div = 1;
	const char *pr = getenv("KSMPLUS_BENCH_PRCTL");
	if (pr && strcmp(pr, "1") == 0 && prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) != 0)
		die("prctl(PR_SET_MEMORY_MERGE)");

	uint64_t *churn = NULL;
	size_t churn_len = 0;

	if (strcmp(mode, "dense") == 0) {
		/* Thesis 5.1.1 test.c: malloc 20 MiB, byte i = i % 256 (so every page is the same). */
		size_t size = 20 * MIB / div;
		unsigned char *mem = malloc(size);
		if (!mem)
			die("malloc");
		for (size_t i = 0; i < size; i++)
			mem[i] = (unsigned char)(i % 256);
		report(mem, size, 1);
	} else if (strcmp(mode, "sparse") == 0) {
		/* Thesis 5.2.3, figure 5-11: two page-aligned 100 MiB regions, no two pages alike,
		 * then the first 1 MiB (256 pages) of each set to 0xff. No madvise here. */
		size_t size = 100 * MIB / div;
		unsigned long *ptr0 = aligned(size), *ptr1 = aligned(size);
		for (size_t i = 0; i < size / sizeof(unsigned long); i++) {
			ptr0[i] = i;
			ptr1[i] = -i;
		}
		memset(ptr0, 0xff, 0x100000);
		memset(ptr1, 0xff, 0x100000);
		report(ptr0, size, 1);
		report(ptr1, size, 1);
	} else if (strcmp(mode, "none") == 0) {
		size_t size = 200 * MIB / div;
		uint64_t *p = aligned(size);
		fill_unique(p, size, 1000 + index);
		report(p, size, 1);
	} else if (strcmp(mode, "churn") == 0) {
		/* A stable region of 64 distinct page contents repeated (every page has duplicates),
		 * and a churn region rewritten every 100 ms with unique content. */
		size_t stable = 32 * MIB / div;
		uint64_t *s = aligned(stable);
		for (size_t p = 0; p < stable / PAGE; p++)
			fill_keyed(s + p * (PAGE / 8), p % 64);
		churn_len = 16 * MIB / div;
		churn = aligned(churn_len);
		fill_unique(churn, churn_len, 2000 + index);
		report(s, stable, 1);
		report(churn, churn_len, 0);
	} else if (strcmp(mode, "many") == 0) {
		/* 8 MiB per process: the first quarter of its pages equal the same pages of every
		 * other process of the cell, the rest are unique to this process. */
		size_t size = 8 * MIB / div;
		uint64_t *p = aligned(size);
		size_t pages = size / PAGE;
		fill_unique(p, size, 3000 + index);
		for (size_t j = 0; j < pages / 4; j++)
			fill_keyed(p + j * (PAGE / 8), 100000 + j);
		report(p, size, 1);
	} else {
		fprintf(stderr, "ksmplus-wl: unknown mode %s\n", mode);
		return 2;
	}
	printf("ready\n");
	if (fflush(stdout) != 0)
		die("stdout");
	wait_for_eof(churn, churn_len);
	return 0;
}
