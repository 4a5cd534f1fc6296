/* Programs under seccomp filters, for the agent's and the shim's sandbox rules. Each holds MIB
 * MiB of its own with repeating contents (duplicate-rich: the agent would mark it), prints one
 * line with `a=0x... size=N`, and exits 0 when stdin is closed (3 if its memory changed).
 *
 *   agent_seccomp MIB
 *     Like Firefox's utility processes: after the shim's Hello it installs a filter that kills
 *     it for madvise(MADV_MERGEABLE) (SECCOMP_RET_KILL_PROCESS); prints `... filtered=1`.
 *   agent_seccomp launch MIB
 *     A launcher (as bubblewrap is for WebKit's web processes): installs a filter that refuses
 *     only personality(2) (EPERM) and execs itself as `agent_seccomp inherited MIB`, which
 *     prints `... inherited=1` under that inherited filter.
 *   agent_seccomp late prctl|syscall MIB
 *     Installs its killing filter late, while the agent may have a batch waiting: first the
 *     probes Firefox makes at start (a null filter: EFAULT, nothing installed), then it prints
 *     its line and waits for a line on stdin, installs the filter through prctl(PR_SET_SECCOMP)
 *     or syscall(SYS_seccomp), calls malloc and free (the hooks that run a waiting batch) and
 *     prints `alive sum=S`. Killed by SIGSYS if the shim runs KSM advice after the filter.
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

/* Kills the process for madvise(MADV_MERGEABLE); allows everything else. */
static struct sock_filter kill_on_mergeable[] = {
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

/* A launcher's filter: everything allowed but personality(2). */
static struct sock_filter launcher[] = {
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_personality, 0, 1),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | 1),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
};

/* Installs a filter through prctl or, with `use_syscall`, syscall(SYS_seccomp). */
static int install(struct sock_filter *f, unsigned short len, int use_syscall) {
    struct sock_fprog prog = {.len = len, .filter = f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return -1;
    return use_syscall ? (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog)
                       : prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog);
}
#define INSTALL(f, use_syscall) install(f, sizeof f / sizeof f[0], use_syscall)

static uint64_t sum(const unsigned char *a, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ a[i]) * 1099511628211ull;
    return h;
}

int main(int argc, char **argv) {
    const char *mode = argc > 2 ? argv[1] : "filter";
    if (strcmp(mode, "launch") == 0) {
        if (INSTALL(launcher, 0) != 0) {
            perror("seccomp");
            return 1;
        }
        char *args[] = {argv[0], "inherited", argv[2], NULL};
        execv("/proc/self/exe", args);
        perror("execv");
        return 1;
    }
    int late = strcmp(mode, "late") == 0;
    size_t n = strtoul(argv[argc - 1], NULL, 0) << 20;
    unsigned char *a = malloc(n);
    if (!a) return 1;
    for (size_t i = 0; i < n; i++) a[i] = (unsigned char)(i % 251);
    char buf[64];
    if (late) {
        /* Firefox's start-up probes for seccomp-bpf and TSYNC: a null program, EFAULT. */
        if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, NULL) == 0 ||
            syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, NULL) == 0)
            return 4;
        printf("a=%p size=%zu\n", (void *)a, n);
        fflush(stdout);
        if (read(0, buf, sizeof buf) <= 0) return 2;
        if (INSTALL(kill_on_mergeable, strcmp(argv[2], "syscall") == 0) != 0) {
            perror("seccomp");
            return 1;
        }
        for (int i = 0; i < 64; i++) {
            sink = malloc(64 + i);
            free(sink);
        }
        printf("alive sum=%llu\n", (unsigned long long)sum(a, n));
    } else if (strcmp(mode, "inherited") == 0) {
        printf("a=%p size=%zu sum=%llu inherited=1\n", (void *)a, n,
               (unsigned long long)sum(a, n));
    } else {
        if (INSTALL(kill_on_mergeable, 0) != 0) {
            perror("seccomp");
            return 1;
        }
        printf("a=%p size=%zu sum=%llu filtered=1\n", (void *)a, n,
               (unsigned long long)sum(a, n));
    }
    fflush(stdout);
    while (read(0, buf, sizeof buf) > 0) {
    }
    return a[n - 1] == (unsigned char)((n - 1) % 251) ? 0 : 3;
}
