/*
 * libcare-demo: prints one line per tick, forever, e.g. "libcare-demo: 2 + 3 = -1".
 * Usage: libcare-demo [INTERVAL_MS]   (default 200)
 * The arithmetic lives in calc.c, a separate translation unit, so it is a real call.
 */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "demo.h"

int main(int argc, char **argv)
{
	long interval_ms = argc > 1 ? strtol(argv[1], NULL, 10) : 200;
	int a = 2, b = 3;

	setvbuf(stdout, NULL, _IOLBF, 0);
	for (;;) {
		printf("libcare-demo: %d + %d = %d\n", a, b, demo_total(a, b));
		usleep((useconds_t)interval_ms * 1000);
	}
	return 0;
}
