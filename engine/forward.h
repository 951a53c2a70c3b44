/* forward: one step of the model over a batch of sequences.
 *
 * Written once against kernels/backend.h, llama2.c-style: the layer loop
 * reads like the model. Each sequence contributes n_tokens new tokens at
 * positions pos0 .. pos0+n_tokens-1 (prefill chunks and single decode
 * tokens mix freely); their latent rows are written to the paged cache and
 * attention runs in the absorbed MLA form over it. */
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "common/moerr.h"
#include "engine/kvcache.h"
#include "engine/model.h"

struct fwd_seq {
        struct kv_seq *kv;      /* must hold blocks for pos0 + n_tokens */
        const int32_t *tokens;  /* n_tokens ids */
        int64_t n_tokens;
        int64_t pos0;           /* tokens already in the cache */
        bool all_logits;        /* logits for every token, else the last only */
};

struct fwd_ctx;

/* Scratch for up to max_tokens tokens per step. */
int fwd_new(struct mo_model *m, mo_backend *b, int64_t max_tokens, struct fwd_ctx **out,
            struct moerr *e);
void fwd_free(struct fwd_ctx *f);

/* Runs one step. logits (host memory) receives, in sequence order, n_tokens
 * rows per all_logits sequence and one row per other sequence, n_vocab each.
 * Sets each seq's kv->n_tokens to pos0 + n_tokens. logits may be NULL when
 * fwd_logits() can be read in place instead. */
int fwd_step(struct fwd_ctx *f, struct kv_cache *kv, struct fwd_seq *seqs, int n_seqs,
             float *logits, struct moerr *e);

/* The last step's logits where the host can read them in place (a backend
 * whose memory is host memory), valid until the next step; else NULL, and
 * fwd_step must be given a buffer. The caller may change them (a sampler
 * does). Saves a copy of n_out x n_vocab floats (33 MB for 64 sequences of
 * a 129k vocabulary). */
float *fwd_logits(const struct fwd_ctx *f);
bool fwd_logits_in_place(const struct fwd_ctx *f);

/* Reference attention for tests: when set, attention runs in the
 * decompressed form (k_nope and v rebuilt per cached token, F32) instead of
 * the absorbed one. */
void fwd_set_decompressed(struct fwd_ctx *f, bool on);

/* At most `pairs` (token, expert) pairs go through the experts of a MoE
 * layer at once (clamped to [max_tokens, the size fwd_new allocated]);
 * the logits do not depend on it. Returns the value in force. For tests of
 * the split, and for hosts that want the smaller wave. */
int64_t fwd_set_wave_pairs(struct fwd_ctx *f, int64_t pairs);

/* Shards the routed experts over n_devices virtual devices that share this
 * process and its backend (0 or 1: unsharded, the default). Each MoE layer
 * then dispatches token rows to the devices owning their experts and
 * combines the outputs back through the local collective
 * (kernels/collective.h), with the placement starting contiguous and
 * balanced. The logits are bit-for-bit those of the unsharded pass, for
 * any device count and any placement. Attention is not sharded (on GPUs
 * it would run data-parallel; see docs/multinode.md). Each call starts a
 * fresh placement. */
int fwd_set_devices(struct fwd_ctx *f, int n_devices, struct moerr *e);

struct placement; /* engine/placement.h */
/* The expert placement of a sharded pass (NULL when unsharded): its loads
 * are fed by every step; rebalance or pin it between steps. */
struct placement *fwd_placement(struct fwd_ctx *f);
