/* Creates short-lived threads without pause: threads appear while we attach. */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

static volatile long finished;

static void *short_lived(void *arg)
{
	(void)arg;
	usleep(500);
	__atomic_add_fetch(&finished, 1, __ATOMIC_RELAXED);
	return NULL;
}

int main(void)
{
	pthread_t thread;
	pthread_attr_t attr;

	setvbuf(stdout, NULL, _IOLBF, 0);
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	printf("ready\n");
	for (long created = 1;; created++) {
		while (pthread_create(&thread, &attr, short_lived, NULL) != 0)
			usleep(100);
		if (created % 1000 == 0)
			printf("created %ld finished %ld\n", created, finished);
		usleep(50);
	}
}
