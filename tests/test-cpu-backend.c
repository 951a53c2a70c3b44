/* test-cpu-backend: not written yet; fails until it is. */
#include <stdio.h>
int main(void) { fprintf(stderr, "test-cpu-backend: not written yet\n"); return 1; }
