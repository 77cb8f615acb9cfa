/* Prints consecutive numbers, one per millisecond: a stop that loses or repeats work shows. */
#include <stdio.h>
#include <unistd.h>

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (long n = 0;; n++) {
		printf("%ld\n", n);
		usleep(1000);
	}
}
