/* kvcache.c: not written yet. */
