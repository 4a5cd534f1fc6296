/* A program that, like Firefox's utility processes, installs a seccomp filter which kills it
 * for madvise(MADV_MERGEABLE) (SECCOMP_RET_KILL_PROCESS), after the shim's Hello: it holds
 * MIB MiB of identical pages (a duplicate-rich region the agent would mark), prints
 * `a=0x... size=N sum=S filtered=1`, then blocks until stdin is closed.
 *   usage: agent_seccomp MIB
 * With `launch`, it is a launcher instead (as bubblewrap is for WebKit's web processes): it
 * installs a filter that refuses only personality(2) (EPERM) and execs itself as
 * `agent_seccomp inherited MIB`, which holds the same pages under that inherited filter and
 * prints `a=0x... size=N sum=S inherited=1`.
 *   usage: agent_seccomp launch MIB
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

/* The launcher's filter: everything allowed but personality(2). */
static int launcher_filter(void) {
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_personality, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {.len = sizeof f / sizeof f[0], .filter = f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return -1;
    return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog);
}

int main(int argc, char **argv) {
    if (argc > 2 && strcmp(argv[1], "launch") == 0) {
        if (launcher_filter() != 0) {
            perror("seccomp");
            return 1;
        }
        char *args[] = {argv[0], "inherited", argv[2], NULL};
        execv("/proc/self/exe", args);
        perror("execv");
        return 1;
    }
    int inherited = argc > 2 && strcmp(argv[1], "inherited") == 0;
    if (inherited) argv++;
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 0) : 8;
    size_t n = mib << 20;
    unsigned char *a = malloc(n);
    if (!a) return 1;
    for (size_t i = 0; i < n; i++) a[i] = (unsigned char)(i % 251);
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ a[i]) * 1099511628211ull;

    if (inherited) {
        printf("a=%p size=%zu sum=%llu inherited=1\n", (void *)a, n, (unsigned long long)h);
        fflush(stdout);
        char buf[64];
        while (read(0, buf, sizeof buf) > 0) {
        }
        return a[n - 1] == (unsigned char)((n - 1) % 251) ? 0 : 3;
    }
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
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) {
        perror("seccomp");
        return 1;
    }
    printf("a=%p size=%zu sum=%llu filtered=1\n", (void *)a, n, (unsigned long long)h);
    fflush(stdout);
    char buf[64];
    while (read(0, buf, sizeof buf) > 0) {
    }
    return a[n - 1] == (unsigned char)((n - 1) % 251) ? 0 : 3;
}
