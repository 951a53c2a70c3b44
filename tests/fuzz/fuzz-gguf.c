/* fuzz-gguf.c: not written yet. */
