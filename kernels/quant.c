/* quant.c: not written yet. */
