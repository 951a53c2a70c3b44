/* runner: what the command-line tools share to drive the engine without the
 * daemon: a model, the CPU backend, a KV cache and a forward context, and
 * feeding tokens to a sequence in batch-sized chunks. */
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "common/moerr.h"
#include "engine/forward.h"
#include "engine/kvcache.h"
#include "engine/model.h"

struct runner {
        struct mo_model *m;
        mo_backend *b;
        struct kv_cache *kv;
        struct fwd_ctx *f;
        int64_t max_batch;
        double load_s;   /* seconds spent in model_load */
};

/* cache_tokens: total tokens the KV cache holds over all sequences (0: no
 * cache yet; call runner_set_cache once the size is known). */
int runner_open(const char *path, int threads, int64_t cache_tokens, int64_t max_batch,
                struct runner **out, struct moerr *e);
void runner_close(struct runner *r);
/* Replaces the KV cache with an empty one of cache_tokens tokens. */
int runner_set_cache(struct runner *r, int64_t cache_tokens, struct moerr *e);

/* Appends n tokens to seq (reserving cache), in chunks of max_batch. out
 * receives the logits of the last token, or of every token (n rows) when
 * all_logits. */
int runner_feed(struct runner *r, struct kv_seq *seq, const int32_t *toks, int64_t n,
                bool all_logits, float *out, struct moerr *e);

double runner_now(void); /* monotonic seconds */
/* Parses "auto"/0 or a count for --threads. */
int runner_parse_threads(const char *s, int *out);
