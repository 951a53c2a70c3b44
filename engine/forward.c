/* forward.c: not written yet. */
