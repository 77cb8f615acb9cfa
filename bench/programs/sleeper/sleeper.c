/* sleeper: the fleet benchmarks' patient, a mostly idle single-threaded service.
 * Every 100 ms it calls the noinline function answer(); with an argument "-v" it
 * also prints "sleeper answer=42" (43 after fix.patch, which changes answer() only). */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static volatile int last_argument;

__attribute__((noinline)) int answer(int x)
{
	last_argument = x;	/* makes the function long enough for a 5-byte jmp */
	return x + 1;
}

int main(int argc, char **argv)
{
	int verbose = argc > 1 && strcmp(argv[1], "-v") == 0;

	for (;;) {
		int value = answer(41);

		if (verbose) {
			printf("sleeper answer=%d\n", value);
			fflush(stdout);
		}
		usleep(100000);
	}
	return 0;
}
