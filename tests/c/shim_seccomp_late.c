/* A program that installs its seccomp filter late, the way Firefox's sandboxed processes do,
 * while the ksmplus agent may already have a batch of advice waiting for it: it holds MIB MiB
 * of its own (a shim block), prints `a=0x... size=N`, waits for a line on stdin, then installs
 * a filter that kills it for madvise(MADV_MERGEABLE) (SECCOMP_RET_KILL_PROCESS) through
 * HOW (`prctl`: prctl(PR_SET_SECCOMP); `syscall`: syscall(SYS_seccomp)), then calls malloc
 * and free — the hooks that run a waiting batch — and prints `alive sum=S`; it exits 0 when
 * stdin is closed. Before its first line it makes the probes Firefox makes at start (a null
 * filter: EFAULT, nothing installed), after which advice must still run. Killed by SIGSYS if the shim runs KSM advice after the filter is in.
 *   usage: shim_seccomp_late prctl|syscall MIB
 */
#define _GNU_SOURCE
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Where the small blocks go, so the compiler cannot drop the malloc/free pairs. */
void *volatile sink;

int main(int argc, char **argv) {
    const char *how = argc > 1 ? argv[1] : "prctl";
    size_t n = (argc > 2 ? strtoul(argv[2], NULL, 0) : 8) << 20;
    unsigned char *a = malloc(n);
    if (!a) return 1;
    for (size_t i = 0; i < n; i++) a[i] = (unsigned char)(i % 251);
    /* Firefox's start-up probes for seccomp-bpf and TSYNC: a null program, EFAULT, no filter. */
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, NULL) == 0 ||
        syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, NULL) == 0)
        return 4;
    printf("a=%p size=%zu\n", (void *)a, n);
    fflush(stdout);
    char buf[64];
    if (read(0, buf, sizeof buf) <= 0) return 2;

    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_madvise, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[2])),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, MADV_MERGEABLE, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {.len = sizeof f / sizeof f[0], .filter = f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        perror("no_new_privs");
        return 1;
    }
    long r = strcmp(how, "syscall") == 0
                 ? syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog)
                 : prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog);
    if (r != 0) {
        perror("seccomp");
        return 1;
    }
    /* The hooks a program calls all the time: each may run a waiting batch. */
    for (int i = 0; i < 64; i++) {
        sink = malloc(64 + i);
        free(sink);
    }
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ a[i]) * 1099511628211ull;
    printf("alive sum=%llu\n", (unsigned long long)h);
    fflush(stdout);
    while (read(0, buf, sizeof buf) > 0) {
    }
    return 0;
}
