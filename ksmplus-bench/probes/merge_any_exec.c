/*
 * Does PR_SET_MEMORY_MERGE survive fork and exec on this kernel?
 *   cc -O2 -o merge_any_exec merge_any_exec.c && ./merge_any_exec set
 * Prints PR_GET_MEMORY_MERGE before exec, in a forked child and after exec (6.18: 1, 1, 1),
 * then the ksm_stat of a further fork+exec'd child (cat), which says ksm_merge_any: yes.
 * Needs no ksmd and changes no setting.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>
#ifndef PR_SET_MEMORY_MERGE
#define PR_SET_MEMORY_MERGE 67
#define PR_GET_MEMORY_MERGE 68
#endif

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], "set") == 0) {
		if (prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) != 0) {
			perror("prctl(PR_SET_MEMORY_MERGE)");
			return 1;
		}
		printf("before exec: %d\n", prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0));
		fflush(stdout);
		pid_t c = fork();
		if (c == 0) {
			printf("forked child: %d\n", prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0));
			exit(0);
		}
		waitpid(c, NULL, 0);
		execl("/proc/self/exe", argv[0], "check", (char *)NULL);
		perror("exec");
		return 1;
	}
	printf("after exec: %d\n", prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0));
	fflush(stdout);
	return system("cat /proc/self/ksm_stat") != 0;
}
