/* An allocator driver steered line by line through stdin; every command prints exactly one line.
 *
 * Lets a test interleave program actions with checks of what the harness agent saw. Numbers
 * accept 0x prefixes. Commands (reply):
 *   malloc N | calloc N | valloc N | pvalloc N            -> ptr=P usable=U errno=E
 *   memalign A N | aligned_alloc A N | posix_memalign A N -> ptr=P usable=U errno=E
 *   realloc P N | reallocarray P NMEMB SIZE               -> ptr=P usable=U errno=E
 *   free P                                                -> ok
 *   usable P                                              -> usable=U
 *   fill P N SEED     byte i = (i*7 + SEED + i/4096) & 255 -> sum=S (FNV-1a of what was read back)
 *   fillpages P NPAGES   page k gets its own pattern        -> sum=S
 *   sum P N                                               -> sum=S
 *   zero P N          1 if all N bytes are 0               -> zero=0|1
 *   mmap N | mmap64 N   private anonymous rw               -> ptr=P errno=E
 *   munmap P N                                            -> ret=R errno=E
 *   mremap P OLD NEW  (MREMAP_MAYMOVE)                    -> ptr=P errno=E
 *   pid                                                   -> pid=PID
 *   sigurg take       install the program's own SIGURG handler (old one saved) -> ret=R urgs=N
 *   sigurg restore    put the saved SIGURG disposition back                     -> ret=R urgs=N
 *   sigurg count      SIGURGs the program's handler saw                         -> ret=0 urgs=N
 *   sigurg default    signal(SIGURG, SIG_DFL)                                   -> ret=R urgs=N
 *   sigurg query      the disposition the program sees (dfl, ign or handler)    -> is=X
 *   exit                                                  -> (exits 0)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static uint64_t checksum(const unsigned char *p, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

static unsigned long long num(const char *s) { return s ? strtoull(s, NULL, 0) : 0; }

static volatile sig_atomic_t urgs;
static struct sigaction saved_urg;
static void on_urg(int sig) { (void)sig; urgs++; }

static void reply_ptr(void *p, int err) {
    printf("ptr=%p usable=%zu errno=%d\n", p, p ? malloc_usable_size(p) : 0, err);
}

int main(void) {
    char line[512];
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(line, sizeof line, stdin)) {
        char *argv[6] = {0};
        int argc = 0;
        for (char *t = strtok(line, " \t\n"); t && argc < 6; t = strtok(NULL, " \t\n")) argv[argc++] = t;
        if (argc == 0) continue;
        const char *c = argv[0];
        void *p = NULL;
        errno = 0;
        if (!strcmp(c, "malloc")) { p = malloc(num(argv[1])); reply_ptr(p, errno); }
        else if (!strcmp(c, "calloc")) { p = calloc(1, num(argv[1])); reply_ptr(p, errno); }
        else if (!strcmp(c, "valloc")) { p = valloc(num(argv[1])); reply_ptr(p, errno); }
        else if (!strcmp(c, "pvalloc")) { p = pvalloc(num(argv[1])); reply_ptr(p, errno); }
        else if (!strcmp(c, "memalign")) { p = memalign(num(argv[1]), num(argv[2])); reply_ptr(p, errno); }
        else if (!strcmp(c, "aligned_alloc")) { p = aligned_alloc(num(argv[1]), num(argv[2])); reply_ptr(p, errno); }
        else if (!strcmp(c, "posix_memalign")) {
            int r = posix_memalign(&p, num(argv[1]), num(argv[2]));
            if (r) p = NULL;
            reply_ptr(p, r);
        }
        else if (!strcmp(c, "realloc")) { p = realloc((void *)(uintptr_t)num(argv[1]), num(argv[2])); reply_ptr(p, errno); }
        else if (!strcmp(c, "reallocarray")) {
            p = reallocarray((void *)(uintptr_t)num(argv[1]), num(argv[2]), num(argv[3]));
            reply_ptr(p, errno);
        }
        else if (!strcmp(c, "free")) { free((void *)(uintptr_t)num(argv[1])); printf("ok\n"); }
        else if (!strcmp(c, "usable")) { printf("usable=%zu\n", malloc_usable_size((void *)(uintptr_t)num(argv[1]))); }
        else if (!strcmp(c, "fill")) {
            unsigned char *b = (unsigned char *)(uintptr_t)num(argv[1]);
            size_t n = num(argv[2]);
            unsigned seed = (unsigned)num(argv[3]);
            for (size_t i = 0; i < n; i++) b[i] = (unsigned char)(i * 7 + seed + i / 4096);
            printf("sum=%016llx\n", (unsigned long long)checksum(b, n));
        }
        else if (!strcmp(c, "fillpages")) {
            unsigned char *b = (unsigned char *)(uintptr_t)num(argv[1]);
            size_t np = num(argv[2]);
            long ps = sysconf(_SC_PAGESIZE);
            for (size_t k = 0; k < np; k++)
                for (long j = 0; j < ps; j++)
                    b[k * ps + j] = (unsigned char)((j ^ (k * 2654435761u >> 7)) * 13 + k);
            printf("sum=%016llx\n", (unsigned long long)checksum(b, np * ps));
        }
        else if (!strcmp(c, "sum")) {
            printf("sum=%016llx\n", (unsigned long long)checksum((void *)(uintptr_t)num(argv[1]), num(argv[2])));
        }
        else if (!strcmp(c, "zero")) {
            const unsigned char *b = (void *)(uintptr_t)num(argv[1]);
            size_t n = num(argv[2]), i = 0;
            while (i < n && b[i] == 0) i++;
            printf("zero=%d\n", i == n);
        }
        else if (!strcmp(c, "mmap") || !strcmp(c, "mmap64")) {
            size_t n = num(argv[1]);
            p = !strcmp(c, "mmap") ? mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
                                   : mmap64(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            printf("ptr=%p errno=%d\n", p == MAP_FAILED ? NULL : p, errno);
        }
        else if (!strcmp(c, "munmap")) {
            int r = munmap((void *)(uintptr_t)num(argv[1]), num(argv[2]));
            printf("ret=%d errno=%d\n", r, errno);
        }
        else if (!strcmp(c, "mremap")) {
            p = mremap((void *)(uintptr_t)num(argv[1]), num(argv[2]), num(argv[3]), MREMAP_MAYMOVE);
            printf("ptr=%p errno=%d\n", p == MAP_FAILED ? NULL : p, errno);
        }
        else if (!strcmp(c, "pid")) { printf("pid=%d\n", (int)getpid()); }
        else if (!strcmp(c, "sigurg")) {
            int r = 0;
            if (argv[1] && !strcmp(argv[1], "take")) {
                struct sigaction sa;
                memset(&sa, 0, sizeof sa);
                sa.sa_handler = on_urg;
                r = sigaction(SIGURG, &sa, &saved_urg);
            } else if (argv[1] && !strcmp(argv[1], "restore")) {
                r = sigaction(SIGURG, &saved_urg, NULL);
            } else if (argv[1] && !strcmp(argv[1], "default")) {
                r = signal(SIGURG, SIG_DFL) == SIG_ERR ? -1 : 0;
            } else if (argv[1] && !strcmp(argv[1], "query")) {
                struct sigaction cur;
                sigaction(SIGURG, NULL, &cur);
                printf("is=%s\n", cur.sa_handler == SIG_DFL ? "dfl" : cur.sa_handler == SIG_IGN ? "ign" : "handler");
                continue;
            }
            printf("ret=%d urgs=%d\n", r, (int)urgs);
        }
        else if (!strcmp(c, "exit")) { return 0; }
        else { printf("error=unknown-command\n"); }
    }
    return 0;
}
