/* test-sampler: not written yet; fails until it is. */
#include <stdio.h>
int main(void) { fprintf(stderr, "test-sampler: not written yet\n"); return 1; }
