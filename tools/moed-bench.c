/* moed-bench.c: not written yet. */
