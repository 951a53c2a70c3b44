/* test-kvcache: engine/kvcache.c, over a small host-only fake backend
 * defined here (so the test does not depend on the CPU backend) that also
 * counts allocations and checks that arenas are zero when handed back. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "engine/kvcache.h"

struct fake {
        int live;          /* allocations not yet freed */
        int fail_after;    /* alloc number that fails (1-based); 0: never */
        int n_alloc;
        int64_t n_zero;    /* calls to zero */
        bool freed_dirty;  /* an arena came back with non-zero bytes */
        size_t sizes[64];
        void *ptrs[64];
};

static struct fake *fake_of(mo_backend *b)
{
        return b->ctx;
}

static void *fake_alloc(mo_backend *b, size_t bytes)
{
        struct fake *f = fake_of(b);
        size_t rounded = (bytes + 63) / 64 * 64;
        void *p;

        if (++f->n_alloc == f->fail_after || f->live == 64)
                return NULL;
        p = aligned_alloc(64, rounded ? rounded : 64);
        if (!p)
                return NULL;
        memset(p, 0, rounded);
        f->ptrs[f->live] = p;
        f->sizes[f->live++] = bytes;
        return p;
}

static void fake_free(mo_backend *b, void *p)
{
        struct fake *f = fake_of(b);

        for (int i = 0; i < f->live; i++) {
                if (f->ptrs[i] != p)
                        continue;
                for (size_t k = 0; k < f->sizes[i]; k++)
                        if (((unsigned char *)p)[k])
                                f->freed_dirty = true;
                f->ptrs[i] = f->ptrs[f->live - 1];
                f->sizes[i] = f->sizes[f->live - 1];
                f->live--;
                break;
        }
        free(p);
}

static void fake_zero(mo_backend *b, void *dst, size_t bytes)
{
        fake_of(b)->n_zero++;
        memset(dst, 0, bytes);
}

static const struct mo_backend_ops fake_ops = {
        .name = "fake",
        .alloc = fake_alloc,
        .free = fake_free,
        .zero = fake_zero,
};

struct env {
        struct fake f;
        mo_backend b;
        struct kv_cache *kv;
};

/* 3 layers, rows of 5 floats, 4 tokens a block, 10 blocks. */
static const struct kv_config small = {
        .n_layer = 3, .row_width = 5, .block_tokens = 4, .n_blocks = 10
};

static int env_setup(void **state)
{
        struct env *v = calloc(1, sizeof *v);

        if (!v)
                return -1;
        v->b = (mo_backend){ .ops = &fake_ops, .ctx = &v->f };
        if (kv_new(&v->b, &small, &v->kv, NULL) < 0)
                return -1;
        *state = v;
        return 0;
}

static int env_teardown(void **state)
{
        struct env *v = *state;

        kv_free(v->kv);
        /* Every arena went back, and zeroed. */
        assert_int_equal(v->f.live, 0);
        assert_false(v->f.freed_dirty);
        free(v);
        return 0;
}

static void assert_seq_empty(const struct kv_seq *s)
{
        assert_null(s->blocks);
        assert_int_equal(s->n_blocks, 0);
        assert_int_equal(s->cap, 0);
        assert_int_equal(s->n_tokens, 0);
}

static void kv_reserve_and_release_account_blocks(void **state)
{
        struct env *v = *state;
        struct kv_seq s = { 0 };

        assert_int_equal(kv_free_blocks(v->kv), 10);
        assert_int_equal(kv_used_blocks(v->kv), 0);
        /* 9 tokens of 4 a block: 3 blocks. */
        assert_int_equal(kv_seq_reserve(v->kv, &s, 9), 0);
        assert_int_equal(s.n_blocks, 3);
        assert_int_equal(kv_free_blocks(v->kv), 7);
        assert_int_equal(kv_used_blocks(v->kv), 3);
        /* Already covered up to 12 tokens: nothing moves. */
        assert_int_equal(kv_seq_reserve(v->kv, &s, 12), 0);
        assert_int_equal(kv_seq_reserve(v->kv, &s, 1), 0);
        assert_int_equal(s.n_blocks, 3);
        assert_int_equal(kv_seq_reserve(v->kv, &s, 13), 0);
        assert_int_equal(s.n_blocks, 4);
        assert_true(s.cap >= 4);
        assert_int_equal(kv_used_blocks(v->kv), 4);
        assert_int_equal(kv_seq_reserve(v->kv, &s, -1), -EINVAL);
        assert_int_equal(s.n_blocks, 4);

        s.n_tokens = 13;
        kv_seq_release(v->kv, &s);
        assert_seq_empty(&s);
        assert_int_equal(kv_free_blocks(v->kv), 10);
        assert_int_equal(kv_used_blocks(v->kv), 0);
        /* Releasing an empty sequence is harmless. */
        kv_seq_release(v->kv, &s);
        assert_int_equal(kv_free_blocks(v->kv), 10);
}

static void kv_reserve_is_all_or_nothing_when_out_of_blocks(void **state)
{
        struct env *v = *state;
        struct kv_seq a = { 0 }, b = { 0 };
        int32_t before[8];

        assert_int_equal(kv_seq_reserve(v->kv, &a, 8 * 4), 0);
        memcpy(before, a.blocks, sizeof before);
        /* b wants 3 blocks, 2 are free: refused, b untouched. */
        assert_int_equal(kv_seq_reserve(v->kv, &b, 9), -ENOSPC);
        assert_seq_empty(&b);
        assert_int_equal(kv_free_blocks(v->kv), 2);
        /* a wants 3 more: refused, a keeps exactly what it had. */
        assert_int_equal(kv_seq_reserve(v->kv, &a, 11 * 4), -ENOSPC);
        assert_int_equal(a.n_blocks, 8);
        assert_memory_equal(a.blocks, before, sizeof before);
        assert_int_equal(kv_free_blocks(v->kv), 2);
        /* Exactly the rest fits. */
        assert_int_equal(kv_seq_reserve(v->kv, &b, 8), 0);
        assert_int_equal(kv_free_blocks(v->kv), 0);
        assert_int_equal(kv_seq_reserve(v->kv, &b, 9), -ENOSPC);
        assert_int_equal(b.n_blocks, 2);
        kv_seq_release(v->kv, &a);
        kv_seq_release(v->kv, &b);
        assert_int_equal(kv_free_blocks(v->kv), 10);
}

/* The layout as kernels/backend.h documents it for mo_mla_args, written
 * out independently of kv_row. */
static const float *mla_row(const float *kv, const int32_t *block_table, int64_t block_tokens,
                            int64_t row_width, int64_t j)
{
        return kv + (block_table[j / block_tokens] * block_tokens + j % block_tokens) * row_width;
}

static void kv_row_follows_the_block_table(void **state)
{
        struct env *v = *state;
        struct kv_seq a = { 0 }, b = { 0 };

        /* Interleaved growth gives a a non-contiguous table:
         * a = [0, 2], b = [1] on a fresh cache. */
        assert_int_equal(kv_seq_reserve(v->kv, &a, 4), 0);
        assert_int_equal(kv_seq_reserve(v->kv, &b, 4), 0);
        assert_int_equal(kv_seq_reserve(v->kv, &a, 8), 0);
        assert_int_equal(a.blocks[0], 0);
        assert_int_equal(a.blocks[1], 2);
        assert_int_equal(b.blocks[0], 1);
        /* a's token 5: block 2, slot 1 -> row (2*4 + 1) * 5 = float 45. */
        assert_ptr_equal(kv_row(v->kv, &a, 1, 5), kv_layer(v->kv, 1) + 45);

        for (int64_t l = 0; l < small.n_layer; l++) {
                for (int64_t j = 0; j < 8; j++)
                        assert_ptr_equal(kv_row(v->kv, &a, l, j),
                                         mla_row(kv_layer(v->kv, l), a.blocks, 4, 5, j));
                for (int64_t j = 0; j < 4; j++)
                        assert_ptr_equal(kv_row(v->kv, &b, l, j),
                                         mla_row(kv_layer(v->kv, l), b.blocks, 4, 5, j));
        }
        /* Layers are separate arenas: the same row in two layers differs. */
        assert_ptr_not_equal(kv_row(v->kv, &a, 0, 0), kv_row(v->kv, &a, 1, 0));
        kv_seq_release(v->kv, &a);
        kv_seq_release(v->kv, &b);
}

static void fill_rows(struct kv_cache *kv, const struct kv_seq *s, int64_t n_tokens, float val)
{
        const struct kv_config *c = kv_get_config(kv);

        for (int64_t l = 0; l < c->n_layer; l++)
                for (int64_t j = 0; j < n_tokens; j++)
                        for (int64_t k = 0; k < c->row_width; k++)
                                kv_row(kv, s, l, j)[k] = val;
}

static bool rows_all(struct kv_cache *kv, const struct kv_seq *s, int64_t from, int64_t to,
                     float val)
{
        const struct kv_config *c = kv_get_config(kv);

        for (int64_t l = 0; l < c->n_layer; l++)
                for (int64_t j = from; j < to; j++)
                        for (int64_t k = 0; k < c->row_width; k++)
                                if (kv_row(kv, s, l, j)[k] != val)
                                        return false;
        return true;
}

static void kv_released_blocks_come_back_zeroed(void **state)
{
        struct env *v = *state;
        struct kv_seq a = { 0 }, b = { 0 };
        int32_t held[3];

        assert_int_equal(kv_seq_reserve(v->kv, &a, 12), 0);
        memcpy(held, a.blocks, sizeof held);
        fill_rows(v->kv, &a, 12, 42.0f);
        assert_true(rows_all(v->kv, &a, 0, 12, 42.0f));
        v->f.n_zero = 0;
        kv_seq_release(v->kv, &a);
        /* One zeroing per block per layer, through the backend. */
        assert_int_equal(v->f.n_zero, 3 * 3);

        /* LIFO: b gets the very blocks a held, in a's order. */
        assert_int_equal(kv_seq_reserve(v->kv, &b, 12), 0);
        assert_memory_equal(b.blocks, held, sizeof held);
        assert_true(rows_all(v->kv, &b, 0, 12, 0.0f));
        kv_seq_release(v->kv, &b);
}

static void kv_free_zeroes_blocks_still_held(void **state)
{
        struct fake f = { 0 };
        mo_backend b = { .ops = &fake_ops, .ctx = &f };
        struct kv_cache *kv = NULL;
        struct kv_seq s = { 0 };

        assert_int_equal(kv_new(&b, &small, &kv, NULL), 0);
        assert_int_equal(f.live, 3);
        assert_int_equal(kv_seq_reserve(kv, &s, 40), 0);
        fill_rows(kv, &s, 40, 7.0f);
        /* The owner forgot to release: the latents must still not leak. */
        kv_free(kv);
        assert_int_equal(f.live, 0);
        assert_false(f.freed_dirty);
        free(s.blocks);
}

static void kv_capacity_helpers_round_and_saturate(void **state)
{
        const struct kv_config huge_row = { .n_layer = 2, .row_width = INT64_MAX,
                                            .block_tokens = 4, .n_blocks = 1 };
        const struct kv_config bad = { .n_layer = 0, .row_width = 5, .block_tokens = 4,
                                       .n_blocks = 1 };

        assert_int_equal(kv_blocks_for_tokens(&small, 0), 0);
        assert_int_equal(kv_blocks_for_tokens(&small, -3), 0);
        assert_int_equal(kv_blocks_for_tokens(&small, 1), 1);
        assert_int_equal(kv_blocks_for_tokens(&small, 4), 1);
        assert_int_equal(kv_blocks_for_tokens(&small, 5), 2);
        /* No overflow at the top: (INT64_MAX + 3) / 4 would wrap. */
        assert_int_equal(kv_blocks_for_tokens(&small, INT64_MAX), INT64_MAX / 4 + 1);

        /* 4 tokens x 5 floats x 4 bytes x 3 layers = 240. */
        assert_int_equal(kv_block_bytes(&small), 240);
        assert_int_equal(kv_blocks_for_bytes(&small, 0), 0);
        assert_int_equal(kv_blocks_for_bytes(&small, 239), 0);
        assert_int_equal(kv_blocks_for_bytes(&small, 240 * 10 + 239), 10);
        assert_int_equal(kv_blocks_for_bytes(&small, UINT64_MAX), INT32_MAX);

        assert_int_equal(kv_block_bytes(&huge_row), 0);
        assert_int_equal(kv_blocks_for_bytes(&huge_row, UINT64_MAX), 0);
        assert_int_equal(kv_block_bytes(&bad), 0);
        assert_int_equal(kv_blocks_for_bytes(&bad, 1 << 20), 0);

        /* V3: 61 layers x 576 floats x 32 tokens x 4 bytes = 4497408;
         * 8 GiB / 4497408 = 1909.97. */
        const struct kv_config v3 = { .n_layer = 61, .row_width = 576, .block_tokens = 32,
                                      .n_blocks = 1 };
        assert_int_equal(kv_block_bytes(&v3), 4497408);
        assert_int_equal(kv_blocks_for_bytes(&v3, (uint64_t)8 << 30), 1909);
}

static void kv_new_rejects_bad_configs_and_cleans_up(void **state)
{
        struct fake f = { 0 };
        mo_backend b = { .ops = &fake_ops, .ctx = &f };
        struct kv_cache *kv = NULL;
        struct moerr e = { { 0 } };
        struct kv_config c;

        c = small, c.block_tokens = 0;
        assert_int_equal(kv_new(&b, &c, &kv, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "positive"));
        c = small, c.n_blocks = (int64_t)INT32_MAX + 1;
        assert_int_equal(kv_new(&b, &c, &kv, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "int32"));
        c = small, c.row_width = INT64_MAX / 2;
        assert_int_equal(kv_new(&b, &c, &kv, &e), -EOVERFLOW);
        assert_null(kv);
        assert_int_equal(f.live, 0);

        /* The second layer's arena fails: the first goes back. */
        f.fail_after = 2;
        assert_int_equal(kv_new(&b, &small, &kv, &e), -ENOMEM);
        assert_non_null(strstr(e.msg, "layer 1"));
        assert_null(kv);
        assert_int_equal(f.live, 0);
}

/* Many sequences growing and releasing at random, with the invariants
 * checked after every step: no block is owned twice, free + used = total,
 * each sequence holds what its tokens need, freshly handed blocks are
 * zero, and no sequence's rows are disturbed by another's. */
#define PROP_SEQS 7

struct prop {
        struct kv_seq s[PROP_SEQS];
        int64_t tokens[PROP_SEQS];
};

static void prop_check(struct kv_cache *kv, const struct prop *p)
{
        const struct kv_config *c = kv_get_config(kv);
        bool owned[64] = { false };
        int64_t used = 0;

        assert_true(c->n_blocks <= 64);
        for (int i = 0; i < PROP_SEQS; i++) {
                const struct kv_seq *s = &p->s[i];
                assert_int_equal(s->n_blocks, kv_blocks_for_tokens(c, p->tokens[i]));
                for (int64_t k = 0; k < s->n_blocks; k++) {
                        assert_in_range(s->blocks[k], 0, c->n_blocks - 1);
                        assert_false(owned[s->blocks[k]]);
                        owned[s->blocks[k]] = true;
                }
                used += s->n_blocks;
                assert_true(rows_all(kv, s, 0, s->n_blocks * c->block_tokens, (float)(i + 1)));
        }
        assert_int_equal(kv_used_blocks(kv), used);
        assert_int_equal(kv_free_blocks(kv) + kv_used_blocks(kv), c->n_blocks);
}

static int prop_step(struct kv_cache *kv, struct prop *p, int i, unsigned *seed)
{
        struct kv_seq *s = &p->s[i];
        const struct kv_config *c = kv_get_config(kv);

        if (rand_r(seed) % 4 == 0) {
                kv_seq_release(kv, s);
                p->tokens[i] = 0;
                return 0;
        }
        int64_t want = p->tokens[i] + rand_r(seed) % 13;
        int64_t old_rows = s->n_blocks * c->block_tokens;
        int64_t free_before = kv_free_blocks(kv);
        int r = kv_seq_reserve(kv, s, want);

        if (r == -ENOSPC) {
                assert_true(kv_blocks_for_tokens(c, want) - s->n_blocks > free_before);
                assert_int_equal(kv_free_blocks(kv), free_before);
                return r;
        }
        assert_int_equal(r, 0);
        p->tokens[i] = want;
        /* New blocks arrive zeroed; then they take this sequence's mark. */
        int64_t new_rows = s->n_blocks * c->block_tokens;
        assert_true(rows_all(kv, s, old_rows, new_rows, 0.0f));
        for (int64_t l = 0; l < c->n_layer; l++)
                for (int64_t j = old_rows; j < new_rows; j++)
                        for (int64_t k = 0; k < c->row_width; k++)
                                kv_row(kv, s, l, j)[k] = (float)(i + 1);
        return 0;
}

static void kv_random_interleaving_keeps_invariants(void **state)
{
        struct env *v = *state;
        struct prop p = { 0 };
        unsigned seed = 2024;
        int n_enospc = 0;

        for (int step = 0; step < 3000; step++) {
                int i = rand_r(&seed) % PROP_SEQS;
                n_enospc += prop_step(v->kv, &p, i, &seed) == -ENOSPC;
                prop_check(v->kv, &p);
        }
        /* The walk must actually have run the cache dry now and then. */
        assert_true(n_enospc > 0);
        for (int i = 0; i < PROP_SEQS; i++)
                kv_seq_release(v->kv, &p.s[i]);
        assert_int_equal(kv_free_blocks(v->kv), small.n_blocks);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(kv_reserve_and_release_account_blocks,
                                                env_setup, env_teardown),
                cmocka_unit_test_setup_teardown(kv_reserve_is_all_or_nothing_when_out_of_blocks,
                                                env_setup, env_teardown),
                cmocka_unit_test_setup_teardown(kv_row_follows_the_block_table,
                                                env_setup, env_teardown),
                cmocka_unit_test_setup_teardown(kv_released_blocks_come_back_zeroed,
                                                env_setup, env_teardown),
                cmocka_unit_test(kv_free_zeroes_blocks_still_held),
                cmocka_unit_test(kv_capacity_helpers_round_and_saturate),
                cmocka_unit_test(kv_new_rejects_bad_configs_and_cleans_up),
                cmocka_unit_test_setup_teardown(kv_random_interleaving_keeps_invariants,
                                                env_setup, env_teardown),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
