/* test-gguf: not written yet; fails until it is. */
#include <stdio.h>
int main(void) { fprintf(stderr, "test-gguf: not written yet\n"); return 1; }
