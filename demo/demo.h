/* libcare.livepatch demo: a tiny long-running program with a bug to live-patch. */
#ifndef LIBCARE_DEMO_H
#define LIBCARE_DEMO_H

int demo_total(int a, int b);

#endif
