/* fixture.c: not written yet. */
