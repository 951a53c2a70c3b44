/* fuzz-tokenizer.c: not written yet. */
