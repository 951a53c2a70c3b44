/* moed-tokenize.c: not written yet. */
