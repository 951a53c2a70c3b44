/* dot.c: not written yet. */
