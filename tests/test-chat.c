/* test-chat: not written yet; fails until it is. */
#include <stdio.h>
int main(void) { fprintf(stderr, "test-chat: not written yet\n"); return 1; }
