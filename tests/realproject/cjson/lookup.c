/* The patient: looks up JSON pointers in an array of 21 numbers (item i = 100 * i) with
 * libcjson_utils, one line per round every 20 ms:
 *   round=<n> /1:=<value or none> /3=<value or none>
 * "/1:" is not an array index (RFC 6901); before the CVE-2025-57052 fix cJSON reads ':'
 * as the digit 10 and answers item 20 (2000); after it, none. "/3" is 300 either way. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <cJSON.h>
#include <cJSON_Utils.h>

static void show(cJSON *root, const char *pointer)
{
	cJSON *item = cJSONUtils_GetPointer(root, pointer);

	if (item != NULL && cJSON_IsNumber(item))
		printf(" %s=%d", pointer, item->valueint);
	else
		printf(" %s=none", pointer);
}

int main(int argc, char **argv)
{
	long rounds = argc > 1 ? atol(argv[1]) : -1;
	cJSON *root = cJSON_CreateArray();

	for (int i = 0; i < 21; i++)
		cJSON_AddItemToArray(root, cJSON_CreateNumber(100 * i));
	for (long round = 0; rounds != 0; rounds--, round++) {
		printf("round=%ld", round);
		show(root, "/1:");
		show(root, "/3");
		printf("\n");
		fflush(stdout);
		usleep(20000);
	}
	cJSON_Delete(root);
	return 0;
}
