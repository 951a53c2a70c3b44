/* test-tokenizer: not written yet; fails until it is. */
#include <stdio.h>
int main(void) { fprintf(stderr, "test-tokenizer: not written yet\n"); return 1; }
