/* vocab-json.c: not written yet. */
