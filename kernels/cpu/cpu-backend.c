/* cpu-backend.c: not written yet. */
