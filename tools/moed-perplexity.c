/* moed-perplexity.c: not written yet. */
