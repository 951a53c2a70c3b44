/* kvcache: the paged latent KV cache of MLA.
 *
 * Per token and layer MLA needs only the normalized latent c (kv_lora) and
 * the rotated k_pe (rope): one row of row_width = kv_lora + rope floats.
 * Rows are grouped in fixed-size blocks; each layer has an arena of n_blocks
 * blocks in backend memory, and a sequence owns a block table (logical
 * block -> physical block, the same for every layer). Freed blocks are
 * zeroed before they return to the free list, so one sequence's latents are
 * never visible to the next. */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/moerr.h"
#include "kernels/backend.h"

struct kv_config {
        int64_t n_layer;
        int64_t row_width;     /* kv_lora + rope */
        int64_t block_tokens;  /* tokens per block, e.g. 32 */
        int64_t n_blocks;      /* capacity in blocks */
};

/* Capacity helpers: blocks needed for n tokens (0 for n <= 0), or that fit
 * in bytes (at most INT32_MAX, the widest block id). kv_block_bytes is 0
 * for a config with a non-positive dimension or one that overflows. */
int64_t kv_blocks_for_tokens(const struct kv_config *c, int64_t n_tokens);
int64_t kv_blocks_for_bytes(const struct kv_config *c, uint64_t bytes);
uint64_t kv_block_bytes(const struct kv_config *c); /* all layers of one block */

struct kv_seq {
        int32_t *blocks;   /* block table, host memory */
        int64_t n_blocks;  /* blocks held */
        int64_t cap;       /* allocated entries of blocks[] */
        int64_t n_tokens;  /* tokens whose rows are written (set by the caller) */
};

struct kv_cache;

/* The arenas come from b->ops->alloc (zeroed); kv_free zeroes them before
 * handing them back, blocks still held by sequences included. */
int kv_new(mo_backend *b, const struct kv_config *c, struct kv_cache **out, struct moerr *e);
void kv_free(struct kv_cache *kv);
const struct kv_config *kv_get_config(const struct kv_cache *kv);

/* Makes seq hold blocks for at least n_tokens tokens (a zeroed struct
 * kv_seq is an empty sequence). -ENOSPC when the free list is too short,
 * -ENOMEM when the table cannot grow, -EINVAL for n_tokens < 0: in every
 * failure nothing changed. The free list is LIFO: the blocks released last
 * are handed out first. */
int kv_seq_reserve(struct kv_cache *kv, struct kv_seq *seq, int64_t n_tokens);
/* Zeroes and frees every block of seq, and its table; seq is reset. */
void kv_seq_release(struct kv_cache *kv, struct kv_seq *seq);

int64_t kv_free_blocks(const struct kv_cache *kv);
int64_t kv_used_blocks(const struct kv_cache *kv);

/* Base of a layer's arena (backend memory), as mo_mla_args.kv wants it. */
float *kv_layer(struct kv_cache *kv, int64_t layer);
/* Address of the row of token pos of seq in layer (pos < n_blocks*block_tokens). */
float *kv_row(struct kv_cache *kv, const struct kv_seq *seq, int64_t layer, int64_t pos);
