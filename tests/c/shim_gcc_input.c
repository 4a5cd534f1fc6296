/* Input for the "gcc under the shim" test: a deterministic program whose output is compared. */
#include <stdio.h>
#include <stdlib.h>
int main(void) {
    enum { N = 200000 };
    char *sieve = calloc(N, 1);
    unsigned long sum = 0, count = 0;
    for (long i = 2; i < N; i++) {
        if (sieve[i]) continue;
        count++;
        sum += i;
        for (long j = i * i; j < N; j += i) sieve[j] = 1;
    }
    printf("primes below %d: %lu, sum %lu\n", N, count, sum);
    free(sieve);
    return 0;
}
