/*
 * Which reads of a merged (KSM) page unshare it? Counts /proc/vmstat cow_ksm around
 * pread(/proc/self/mem), process_vm_readv(self), mincore and MADV_UNMERGEABLE of 256 merged pages.
 * Needs ksmd running; run it under the ksmd lock and restore the settings, e.g.
 *   cc -O2 -o unshare unshare.c
 *   flock /tmp/ksmplus-ksmd.lock sh -c 'd=/sys/kernel/mm/ksm; r=$(cat $d/run) p=$(cat $d/pages_to_scan) s=$(cat $d/sleep_millisecs);
 *     echo 5000 >$d/pages_to_scan; echo 10 >$d/sleep_millisecs; echo 1 >$d/run; ./unshare;
 *     echo $p >$d/pages_to_scan; echo $s >$d/sleep_millisecs; echo $r >$d/run'
 * 6.18: pread 0, process_vm_readv 256 (FOLL_PIN must unshare a KSM page), mincore 0, unmergeable 256.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#define N (256 * 4096UL)

static long vmstat(const char *key)
{
	FILE *f = fopen("/proc/vmstat", "r");
	char k[64];
	long v;
	while (f && fscanf(f, "%63s %ld", k, &v) == 2)
		if (strcmp(k, key) == 0) {
			fclose(f);
			return v;
		}
	if (f)
		fclose(f);
	return -1;
}

static long merging(void)
{
	FILE *f = fopen("/proc/self/ksm_stat", "r");
	char k[64], v[32];
	while (f && fscanf(f, "%63s %31s", k, v) == 2)
		if (strcmp(k, "ksm_merging_pages") == 0) {
			fclose(f);
			return atol(v);
		}
	if (f)
		fclose(f);
	return -1;
}

static char *region(int byte)
{
	char *p = mmap(0, N, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	memset(p, byte, N);
	madvise(p, N, MADV_MERGEABLE);
	return p;
}

int main(void)
{
	char *buf = malloc(N);
	char *a = region(7), *b = region(9);
	for (int i = 0; i < 100 && merging() < 512; i++)
		usleep(100000);
	printf("merged: %ld pages\n", merging());
	long c = vmstat("cow_ksm");
	int fd = open("/proc/self/mem", O_RDONLY);
	if (pread(fd, buf, N, (off_t)(unsigned long)a) != (ssize_t)N)
		perror("pread");
	printf("pread /proc/self/mem: cow_ksm +%ld\n", vmstat("cow_ksm") - c);
	c = vmstat("cow_ksm");
	unsigned char vec[256];
	mincore(a, N, vec);
	printf("mincore: cow_ksm +%ld\n", vmstat("cow_ksm") - c);
	c = vmstat("cow_ksm");
	struct iovec l = { buf, N }, r = { a, N };
	process_vm_readv(getpid(), &l, 1, &r, 1, 0);
	printf("process_vm_readv: cow_ksm +%ld\n", vmstat("cow_ksm") - c);
	c = vmstat("cow_ksm");
	madvise(b, N, MADV_UNMERGEABLE);
	printf("MADV_UNMERGEABLE: cow_ksm +%ld\n", vmstat("cow_ksm") - c);
	return 0;
}
