/* N threads counting, an optional thread blocked in read(0), functions to call remotely.
 * usage: threads N busy|sleep|orphan [reader]   (orphan: the main thread exits, workers sleep)
 * Prints the addresses the tests need, then "ready". */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

volatile long counters[64];
volatile long usr1_count;
volatile long rt_count;
static int busy;

static void on_usr1(int signo)
{
	(void)signo;
	usr1_count++;
}

static void on_rt(int signo)
{
	(void)signo;
	rt_count++;
}

__attribute__((noinline)) long resolver_like(long a, long b)
{
	return a * 1000 + b + 42;
}

/* At entry rsp + 8 must be 16-byte aligned: returns (rsp + 8) % 16. */
__attribute__((naked)) long entry_alignment(void)
{
	__asm__("lea 8(%rsp), %rax\n\tand $15, %rax\n\tret\n");
}

__attribute__((noinline)) void spin_forever(void)
{
	for (;;)
		__asm__ volatile("");
}

__attribute__((noinline)) int seven(void)
{
	return 7;
}

/* Sets every bit of xmm0 and the MXCSR rounding mode to "toward zero", as a function of
 * the patient may (the ABI lets it clobber vector registers), and returns 5. */
__attribute__((noinline)) long clobber_vector(void)
{
	unsigned int mxcsr = 0x7f80;
	__asm__ volatile("pcmpeqd %%xmm0, %%xmm0\n\tldmxcsr %0" : : "m"(mxcsr) : "xmm0");
	return 5;
}

static void *worker(void *arg)
{
	long index = (long)arg;
	for (;;) {
		counters[index]++;
		if (!busy)
			usleep(200);
	}
	return NULL;
}

static void *reader(void *arg)
{
	char buffer[256];
	(void)arg;
	printf("reader %ld\n", (long)syscall(SYS_gettid));
	for (;;) {
		ssize_t got = read(0, buffer, sizeof(buffer) - 1);
		if (got <= 0) {
			printf("eof\n");
			exit(0);
		}
		buffer[got] = 0;
		printf("read %s\n", buffer);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	int count = argc > 1 ? atoi(argv[1]) : 4;
	pthread_t thread;

	setvbuf(stdout, NULL, _IOLBF, 0);
	busy = argc > 2 && strcmp(argv[2], "busy") == 0;
	signal(SIGUSR1, on_usr1);
	signal(SIGRTMIN, on_rt);
	printf("counters %p\nresolver %p\nalign %p\nseven %p\nusr1 %p\nspin %p\nrt %p\nclobber %p\n",
	       (void *)counters, (void *)resolver_like, (void *)entry_alignment, (void *)seven, (void *)&usr1_count, (void *)spin_forever, (void *)&rt_count,
	       (void *)clobber_vector);
	for (long index = 1; index < count; index++)
		pthread_create(&thread, NULL, worker, (void *)index);
	if (argc > 3 && strcmp(argv[3], "reader") == 0)
		pthread_create(&thread, NULL, reader, NULL);
	else
		printf("reader none\n");
	printf("ready\n");
	if (strcmp(argv[2], "orphan") == 0)
		pthread_exit(NULL);
	for (;;) {
		counters[0]++;
		usleep(1000);
	}
}
