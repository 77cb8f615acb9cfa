/* The patient of the crash-safety tests: every kind of thread a tracer must give back intact.
 *
 * - a busy thread calls behaviour() and label() (the patched functions)  in a loop and counts
 *   values that are neither the old nor a new level's;
 * - an AVX thread keeps a pattern in ymm8 with SIGUSR2 blocked and counts any change;
 * - a reader thread sits in read(0) and echoes what it reads ("read <text>");
 * - a sleeper thread naps in nanosleep() and counts early returns.
 * The main thread prints one status line every 5 ms.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static volatile long bad, bad_avx, avx_checks, busy_rounds, naps, nap_errors;

__attribute__((noinline, noipa)) int behaviour(int x)
{
	int extra = x > 1000000 ? x / 3 : 0;

	return x + 1 + extra;
}

__attribute__((noinline, noipa)) const char *label(void)
{
	return "old";
}

static int valid(int value, const char *text)
{
	return (value >= 2 && value <= 4) && (!strcmp(text, "old") || !strcmp(text, "new"));
}

static void *avx_worker(void *arg)
{
	static const long long pattern[4] __attribute__((aligned(32))) = {
		0x1111222233334444LL, 0x5555666677778888LL, 0x1234567890abcdefLL, 0x0fedcba987654321LL};
	sigset_t set;

	(void)arg;
	sigemptyset(&set);
	sigaddset(&set, SIGUSR2);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	printf("avx %ld\n", (long)syscall(SYS_gettid));
	fflush(stdout);
	__asm__ volatile("vmovdqa %0, %%ymm8" : : "m"(pattern) : "xmm8");
	for (;;) {
		unsigned int mask;

		__asm__ volatile("vpcmpeqq %1, %%ymm8, %%ymm9\n\tvpmovmskb %%ymm9, %0"
				 : "=r"(mask) : "m"(pattern) : "xmm9");
		if (mask != 0xffffffffu) {
			bad_avx++;
			__asm__ volatile("vmovdqa %0, %%ymm8" : : "m"(pattern) : "xmm8");
		}
		if (++avx_checks % 20000 == 0) {
			/* Nap without libc (a call may clobber ymm8): half the time in user space. */
			static const struct timespec nap = {0, 50 * 1000};
			long result;

			__asm__ volatile("syscall" : "=a"(result) : "0"(SYS_nanosleep), "D"(&nap), "S"(0)
					 : "rcx", "r11", "memory");
		}
	}
	return NULL;
}

static void *busy_worker(void *arg)
{
	(void)arg;
	printf("busy %ld\n", (long)syscall(SYS_gettid));
	fflush(stdout);
	for (;;) {
		if (!valid(behaviour(1), label()))
			__atomic_add_fetch(&bad, 1, __ATOMIC_RELAXED);
		if (__atomic_add_fetch(&busy_rounds, 1, __ATOMIC_RELAXED) % 5000 == 0)
			usleep(100);
	}
	return NULL;
}

static void *reader(void *arg)
{
	char buffer[128];

	(void)arg;
	printf("reader %ld\n", (long)syscall(SYS_gettid));
	fflush(stdout);
	for (;;) {
		ssize_t got = read(0, buffer, sizeof(buffer) - 1);

		if (got <= 0) {
			printf("readerror %zd %d\n", got, errno);
			fflush(stdout);
			if (got == 0)
				return NULL;
			continue;
		}
		while (got > 0 && buffer[got - 1] == '\n')
			got--;
		buffer[got] = 0;
		printf("read %s\n", buffer);
		fflush(stdout);
	}
	return NULL;
}

static void *sleeper(void *arg)
{
	(void)arg;
	printf("sleeper %ld\n", (long)syscall(SYS_gettid));
	fflush(stdout);
	for (;;) {
		struct timespec nap = {0, 20 * 1000 * 1000};

		if (nanosleep(&nap, NULL) != 0)
			nap_errors++;
		naps++;
	}
	return NULL;
}

int main(void)
{
	pthread_t thread;

	pthread_create(&thread, NULL, avx_worker, NULL);
	pthread_create(&thread, NULL, busy_worker, NULL);
	pthread_create(&thread, NULL, reader, NULL);
	pthread_create(&thread, NULL, sleeper, NULL);
	for (long round = 0;; round++) {
		printf("round=%ld value=%d label=%s bad=%ld avxbad=%ld avx=%ld busy=%ld naps=%ld naperr=%ld\n", round,
		       behaviour(1), label(), bad, bad_avx, avx_checks, busy_rounds, naps, nap_errors);
		fflush(stdout);
		usleep(5000);
	}
	return 0;
}
