/* moed-run.c: not written yet. */
