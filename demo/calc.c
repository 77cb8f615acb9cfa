/* The function with the bug (fix.patch corrects it in the running process). */
#include "demo.h"

int demo_total(int a, int b)
{
	return a - b;
}
