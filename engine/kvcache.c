/* kvcache.c: the paged latent KV cache: per-layer arenas in backend memory,
 * the free list of physical blocks, and per-sequence block tables.
 * The free list is a LIFO stack: the most recently zeroed block is handed
 * out first (its memory is the likeliest to still be in a cache). */
#include "kvcache.h"

#include <assert.h>
#include <errno.h>
#include <stdlib.h>

struct kv_cache {
        mo_backend *b;
        struct kv_config c;
        size_t arena_bytes;
        size_t block_floats;  /* block_tokens * row_width */
        float **arenas;       /* n_layer, backend memory */
        int32_t *free_list;   /* stack of free physical blocks, top at n_free-1 */
        int64_t n_free;
};

static bool kv_mul(uint64_t a, uint64_t b, uint64_t *out)
{
        return !__builtin_mul_overflow(a, b, out);
}

static bool kv_config_valid(const struct kv_config *c)
{
        return c->n_layer > 0 && c->row_width > 0 && c->block_tokens > 0 && c->n_blocks > 0;
}

uint64_t kv_block_bytes(const struct kv_config *c)
{
        uint64_t per_layer, all;

        if (!kv_config_valid(c))
                return 0;
        if (!kv_mul((uint64_t)c->block_tokens, (uint64_t)c->row_width, &per_layer) ||
            !kv_mul(per_layer, sizeof(float), &per_layer) ||
            !kv_mul(per_layer, (uint64_t)c->n_layer, &all))
                return 0;
        return all;
}

int64_t kv_blocks_for_tokens(const struct kv_config *c, int64_t n_tokens)
{
        if (n_tokens <= 0 || c->block_tokens <= 0)
                return 0;
        /* Not (n + bt - 1) / bt: that overflows near INT64_MAX. */
        return n_tokens / c->block_tokens + (n_tokens % c->block_tokens != 0);
}

int64_t kv_blocks_for_bytes(const struct kv_config *c, uint64_t bytes)
{
        uint64_t per_block = kv_block_bytes(c);
        uint64_t n;

        if (per_block == 0)
                return 0;
        n = bytes / per_block;
        /* Block ids are int32 in the tables the kernels read. */
        return n > INT32_MAX ? INT32_MAX : (int64_t)n;
}

static void kv_free_arenas(struct kv_cache *kv)
{
        if (!kv->arenas)
                return;
        for (int64_t l = 0; l < kv->c.n_layer; l++) {
                if (!kv->arenas[l])
                        continue;
                /* Blocks still held by live sequences hold latents too. */
                kv->b->ops->zero(kv->b, kv->arenas[l], kv->arena_bytes);
                kv->b->ops->free(kv->b, kv->arenas[l]);
        }
        free(kv->arenas);
        kv->arenas = NULL;
}

void kv_free(struct kv_cache *kv)
{
        if (!kv)
                return;
        kv_free_arenas(kv);
        free(kv->free_list);
        free(kv);
}

static int kv_alloc_arenas(struct kv_cache *kv, struct moerr *e)
{
        kv->arenas = calloc((size_t)kv->c.n_layer, sizeof *kv->arenas);
        if (!kv->arenas)
                return moerr_set(e, -ENOMEM, "kv cache: out of memory for %lld layer arenas",
                                 (long long)kv->c.n_layer);
        for (int64_t l = 0; l < kv->c.n_layer; l++) {
                kv->arenas[l] = kv->b->ops->alloc(kv->b, kv->arena_bytes);
                if (!kv->arenas[l])
                        return moerr_set(e, -ENOMEM, "kv cache: cannot allocate %zu bytes "
                                         "for layer %lld on backend %s", kv->arena_bytes,
                                         (long long)l, kv->b->ops->name);
        }
        return 0;
}

int kv_new(mo_backend *b, const struct kv_config *c, struct kv_cache **out, struct moerr *e)
{
        uint64_t block_bytes, arena_bytes;
        int r;

        if (!kv_config_valid(c))
                return moerr_set(e, -EINVAL, "kv cache: every dimension must be positive "
                                 "(layers %lld, row %lld, block %lld tokens, %lld blocks)",
                                 (long long)c->n_layer, (long long)c->row_width,
                                 (long long)c->block_tokens, (long long)c->n_blocks);
        if (c->n_blocks > INT32_MAX)
                return moerr_set(e, -EINVAL, "kv cache: %lld blocks exceed the int32 block ids",
                                 (long long)c->n_blocks);
        if (!kv_mul((uint64_t)c->block_tokens, (uint64_t)c->row_width, &block_bytes) ||
            !kv_mul(block_bytes, sizeof(float), &block_bytes) ||
            !kv_mul(block_bytes, (uint64_t)c->n_blocks, &arena_bytes) || arena_bytes > SIZE_MAX)
                return moerr_set(e, -EOVERFLOW, "kv cache: arena size overflows");

        struct kv_cache *kv = calloc(1, sizeof *kv);
        if (!kv)
                return moerr_set(e, -ENOMEM, "kv cache: out of memory");
        kv->b = b;
        kv->c = *c;
        kv->arena_bytes = (size_t)arena_bytes;
        kv->block_floats = (size_t)(c->block_tokens * c->row_width);
        kv->free_list = malloc((size_t)c->n_blocks * sizeof *kv->free_list);
        if (!kv->free_list) {
                kv_free(kv);
                return moerr_set(e, -ENOMEM, "kv cache: out of memory for the free list");
        }
        /* Stacked in reverse so that a fresh cache hands out 0, 1, 2, ... */
        for (int64_t i = 0; i < c->n_blocks; i++)
                kv->free_list[i] = (int32_t)(c->n_blocks - 1 - i);
        kv->n_free = c->n_blocks;
        r = kv_alloc_arenas(kv, e);
        if (r < 0) {
                kv_free(kv);
                return r;
        }
        *out = kv;
        return 0;
}

const struct kv_config *kv_get_config(const struct kv_cache *kv)
{
        return &kv->c;
}

int64_t kv_free_blocks(const struct kv_cache *kv)
{
        return kv->n_free;
}

int64_t kv_used_blocks(const struct kv_cache *kv)
{
        return kv->c.n_blocks - kv->n_free;
}

float *kv_layer(struct kv_cache *kv, int64_t layer)
{
        assert(layer >= 0 && layer < kv->c.n_layer);
        return kv->arenas[layer];
}

static int kv_seq_grow_table(struct kv_seq *seq, int64_t need)
{
        int64_t cap = seq->cap > 0 ? seq->cap : 4;
        int32_t *t;

        while (cap < need)
                cap = cap > INT64_MAX / 2 ? need : cap * 2;
        t = realloc(seq->blocks, (size_t)cap * sizeof *t);
        if (!t)
                return -ENOMEM;
        seq->blocks = t;
        seq->cap = cap;
        return 0;
}

int kv_seq_reserve(struct kv_cache *kv, struct kv_seq *seq, int64_t n_tokens)
{
        int64_t need, more;
        int r;

        if (n_tokens < 0)
                return -EINVAL;
        need = kv_blocks_for_tokens(&kv->c, n_tokens);
        if (need <= seq->n_blocks)
                return 0;
        more = need - seq->n_blocks;
        /* Checked before anything moves, so a refusal leaves seq as it was. */
        if (more > kv->n_free)
                return -ENOSPC;
        if (need > seq->cap) {
                r = kv_seq_grow_table(seq, need);
                if (r < 0)
                        return r;
        }
        for (int64_t i = 0; i < more; i++)
                seq->blocks[seq->n_blocks++] = kv->free_list[--kv->n_free];
        return 0;
}

void kv_seq_release(struct kv_cache *kv, struct kv_seq *seq)
{
        size_t bytes = kv->block_floats * sizeof(float);

        /* Pushed last-first, so that reserving again hands the blocks back
         * in the order this sequence held them. */
        for (int64_t i = seq->n_blocks - 1; i >= 0; i--) {
                int32_t blk = seq->blocks[i];
                assert(blk >= 0 && blk < kv->c.n_blocks && kv->n_free < kv->c.n_blocks);
                for (int64_t l = 0; l < kv->c.n_layer; l++)
                        kv->b->ops->zero(kv->b, kv->arenas[l] + (size_t)blk * kv->block_floats,
                                         bytes);
                kv->free_list[kv->n_free++] = blk;
        }
        free(seq->blocks);
        *seq = (struct kv_seq){ 0 };
}

float *kv_row(struct kv_cache *kv, const struct kv_seq *seq, int64_t layer, int64_t pos)
{
        int64_t bt = kv->c.block_tokens;

        assert(pos >= 0 && pos / bt < seq->n_blocks);
        return kv_layer(kv, layer) +
               ((int64_t)seq->blocks[pos / bt] * bt + pos % bt) * kv->c.row_width;
}
