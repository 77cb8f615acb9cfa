/* callbench: the cost of one call. Times N calls of the noinline function work()
 * and prints "callbench value=<work(0)> ns_per_call=<ns> sum=<s>" every round, so a
 * reader sees the cost before and after a live patch puts a jmp at work().
 * fix.patch changes only work(): x + 2 instead of x + 1 (value=1 becomes value=2).
 * Arguments: [rounds (default forever)] [calls per round (default 20000000)]. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static volatile long last_argument;

__attribute__((noinline, noipa)) long work(long x)
{
	last_argument = x;	/* makes the function long enough for a 5-byte jmp */
	return x + 1;
}

static double now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	long rounds = argc > 1 ? atol(argv[1]) : -1;
	long per_round = argc > 2 ? atol(argv[2]) : 20000000;

	for (long round = 0; rounds < 0 || round < rounds; round++) {
		long sum = 0;
		double start = now_ns();

		for (long i = 0; i < per_round; i++)
			sum += work(i);
		double spent = now_ns() - start;

		printf("callbench value=%ld ns_per_call=%.4f sum=%ld\n", work(0), spent / per_round, sum);
		fflush(stdout);
	}
	return 0;
}
