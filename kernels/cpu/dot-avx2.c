/* dot-avx2.c: not written yet. */
