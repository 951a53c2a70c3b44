/* gguf-write.c: not written yet. */
