/* moe.c: not written yet. */
