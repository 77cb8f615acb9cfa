/* threads4: the patient of the pause benchmarks. Four threads call the noinline
 * function answer() in a loop (with a short sleep, like a server's worker threads);
 * the main thread prints "threads4 answer=42" (43 after fix.patch, which changes
 * answer() only) every 50 ms. Optional first argument: number of rounds (default: forever). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static volatile long calls;

static volatile int last_argument;

__attribute__((noinline)) int answer(int x)
{
	last_argument = x;	/* makes the function long enough for a 5-byte jmp */
	return x + 1;
}

static void *worker(void *arg)
{
	(void)arg;
	for (;;) {
		for (int i = 0; i < 1000; i++)
			__atomic_add_fetch(&calls, answer(i) & 1, __ATOMIC_RELAXED);
		usleep(200);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	long rounds = argc > 1 ? atol(argv[1]) : -1;
	pthread_t tid;

	for (int i = 0; i < 4; i++)
		pthread_create(&tid, NULL, worker, NULL);
	for (long round = 0; rounds < 0 || round < rounds; round++) {
		printf("threads4 answer=%d\n", answer(41));
		fflush(stdout);
		usleep(50000);
	}
	return 0;
}
