/* dot-avx512.c: not written yet. */
