/* test-moe: engine/moe.c. Every routing case is worked out by hand in the
 * comments (logits are chosen as logs so that the probabilities are round
 * numbers), plus a randomized comparison against a full sort. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/moe.h"

#define MAXX 64

/* The logit whose sigmoid is p: ln(p / (1 - p)). */
static float logit_of(float p)
{
        return logf(p / (1.0f - p));
}

struct routed {
        int32_t ids[MAXX];
        float w[MAXX];
};

static struct routed route(const struct moe_router *r, const float *logits)
{
        struct routed out;
        float scratch[2 * MAXX];

        memset(&out, 0xff, sizeof out);
        assert_int_equal(moe_router_check(r, NULL), 0);
        moe_route(r, logits, out.ids, out.w, scratch);
        return out;
}

static void assert_route(const struct routed *got, int n, const int32_t *ids, const float *w)
{
        for (int k = 0; k < n; k++) {
                assert_int_equal(got->ids[k], ids[k]);
                assert_float_equal(got->w[k], w[k], 1e-6f * fmaxf(1.0f, fabsf(w[k])));
        }
}

/* Softmax case shared by several tests: exp(logits) = 1, 4, 2, 8, 3, 2,
 * sum 20, so probs = .05 .2 .1 .4 .15 .1. */
static void softmax6_logits(float *l)
{
        const float e[6] = { 1, 4, 2, 8, 3, 2 };

        for (int i = 0; i < 6; i++)
                l[i] = logf(e[i]);
}

static struct moe_router softmax6_router(int n_used)
{
        return (struct moe_router){ .n_expert = 6, .n_used = n_used, .gating = MOE_SOFTMAX,
                                    .scale = 1.0f };
}

static void moe_softmax_plain_topk_uses_raw_probabilities(void **state)
{
        struct moe_router r = softmax6_router(3);
        float l[6];

        softmax6_logits(l);
        /* V2-Lite: top-3 of .05 .2 .1 .4 .15 .1 is 3 (.4), 1 (.2), 4 (.15);
         * no norm, scale 1: the weights are the probabilities. */
        struct routed got = route(&r, l);
        assert_route(&got, 3, (int32_t[]){ 3, 1, 4 }, (float[]){ 0.4f, 0.2f, 0.15f });
}

static void moe_softmax_is_shift_invariant(void **state)
{
        struct moe_router r = softmax6_router(3);
        float l[6];

        /* expf(1000) overflows: only a max-subtracted softmax gets this right. */
        softmax6_logits(l);
        for (int i = 0; i < 6; i++)
                l[i] += 1000.0f;
        struct routed got = route(&r, l);
        /* Float spacing near 1000 is 6e-5, hence the looser bound. */
        const float want[3] = { 0.4f, 0.2f, 0.15f };
        const int32_t want_ids[3] = { 3, 1, 4 };
        for (int k = 0; k < 3; k++) {
                assert_int_equal(got.ids[k], want_ids[k]);
                assert_float_equal(got.w[k], want[k], 1e-4f);
        }
}

static void moe_sigmoid_bias_changes_selection_not_weights(void **state)
{
        const float bias[4] = { 0.0f, 0.0f, 0.3f, 0.6f };
        struct moe_router r = { .n_expert = 4, .n_used = 2, .gating = MOE_SIGMOID,
                                .bias = bias, .scale = 1.0f };
        /* sigmoid: .9 .75 .5 .25; unbiased top-2 would be 0, 1.
         * sel = .9 .75 .8 .85 -> top-2 is 0 (.9), 3 (.85).
         * Weights are the unbiased probs: .9 and .25. */
        const float l[4] = { logf(9.0f), logf(3.0f), 0.0f, -logf(3.0f) };

        struct routed got = route(&r, l);
        assert_route(&got, 2, (int32_t[]){ 0, 3 }, (float[]){ 0.9f, 0.25f });

        r.bias = NULL;
        got = route(&r, l);
        assert_route(&got, 2, (int32_t[]){ 0, 1 }, (float[]){ 0.9f, 0.75f });
}

static void moe_groups_of_two_drop_the_group_of_the_best_expert(void **state)
{
        /* Groups of two: g0 {0,1}, g1 {2,3}, g2 {4,5}, g3 {6,7}.
         * probs .9 .1 | .75 .5 | .8 .25 | .2 .5
         * scores (both members): g0 1.0, g1 1.25, g2 1.05, g3 .7
         * keep g1, g2; expert 0 (.9, the best single one) is dropped.
         * top-2 of {.75 .5 .8 .25} = 4 (.8), 2 (.75). */
        const float p[8] = { 0.9f, 0.1f, 0.75f, 0.5f, 0.8f, 0.25f, 0.2f, 0.5f };
        struct moe_router r = { .n_expert = 8, .n_used = 2, .gating = MOE_SIGMOID,
                                .n_group = 4, .n_group_used = 2, .scale = 1.0f };
        float l[8];

        for (int i = 0; i < 8; i++)
                l[i] = logit_of(p[i]);
        struct routed got = route(&r, l);
        assert_route(&got, 2, (int32_t[]){ 4, 2 }, (float[]){ 0.8f, 0.75f });

        /* Without groups the best expert wins. */
        r.n_group = 1;
        got = route(&r, l);
        assert_route(&got, 2, (int32_t[]){ 0, 4 }, (float[]){ 0.9f, 0.8f });
}

static void moe_group_score_is_sum_of_top_two_not_max_or_total(void **state)
{
        /* Groups of four: g0 = .9 .2 .2 .2, g1 = .6 .55 .1 .1.
         *          top-2 sum   max   total
         *   g0        1.1       .9    1.5
         *   g1        1.15      .6    1.35
         * Only the top-2 sum prefers g1; top-2 experts there: 4, 5. */
        const float p[8] = { 0.9f, 0.2f, 0.2f, 0.2f, 0.6f, 0.55f, 0.1f, 0.1f };
        struct moe_router r = { .n_expert = 8, .n_used = 2, .gating = MOE_SIGMOID,
                                .n_group = 2, .n_group_used = 1, .scale = 1.0f };
        float l[8];

        for (int i = 0; i < 8; i++)
                l[i] = logit_of(p[i]);
        struct routed got = route(&r, l);
        assert_route(&got, 2, (int32_t[]){ 4, 5 }, (float[]){ 0.6f, 0.55f });
}

static void moe_groups_score_biased_values(void **state)
{
        /* Groups of two, keep 1 of 2. probs .5 .5 | .8 .1: g1 (.9) loses to
         * g0 (1.0) unbiased, but bias +.2 on expert 3 gives sel .5 .5 | .8 .3,
         * g1 = 1.1 > 1.0: g1 wins; top-1 is expert 2 with weight .8. */
        const float bias[4] = { 0.0f, 0.0f, 0.0f, 0.2f };
        const float p[4] = { 0.5f, 0.5f, 0.8f, 0.1f };
        struct moe_router r = { .n_expert = 4, .n_used = 1, .gating = MOE_SIGMOID,
                                .n_group = 2, .n_group_used = 1, .scale = 1.0f };
        float l[4];

        for (int i = 0; i < 4; i++)
                l[i] = logit_of(p[i]);
        struct routed got = route(&r, l);
        assert_route(&got, 1, (int32_t[]){ 0 }, (float[]){ 0.5f });
        r.bias = bias;
        got = route(&r, l);
        assert_route(&got, 1, (int32_t[]){ 2 }, (float[]){ 0.8f });
}

static void moe_norm_divides_by_sum_of_chosen(void **state)
{
        struct moe_router r = softmax6_router(3);
        float l[6];

        /* .4 .2 .15 sum .75 -> .533333 .266667 .2 */
        r.norm = true;
        softmax6_logits(l);
        struct routed got = route(&r, l);
        assert_route(&got, 3, (int32_t[]){ 3, 1, 4 },
                     (float[]){ 0.4f / 0.75f, 0.2f / 0.75f, 0.2f });
}

static void moe_norm_clamps_tiny_sums(void **state)
{
        /* probs 1e-6 and 2e-6 sum to 3e-6 < 2^-14 = 6.103515625e-5, so they
         * are divided by 2^-14 (times 16384): .032768 and .016384. */
        struct moe_router r = { .n_expert = 2, .n_used = 2, .gating = MOE_SIGMOID,
                                .norm = true, .scale = 1.0f };
        const float l[2] = { logit_of(1e-6f), logit_of(2e-6f) };
        struct routed got = route(&r, l);

        assert_int_equal(got.ids[0], 1);
        assert_int_equal(got.ids[1], 0);
        assert_float_equal(got.w[0], 0.032768f, 1e-5f * 0.032768f);
        assert_float_equal(got.w[1], 0.016384f, 1e-5f * 0.016384f);
}

static void moe_scale_multiplies_unless_zero_or_one(void **state)
{
        struct moe_router r = softmax6_router(3);
        float l[6];

        softmax6_logits(l);
        /* V2 236B: x16 -> 6.4 3.2 2.4 */
        r.scale = 16.0f;
        struct routed got = route(&r, l);
        assert_route(&got, 3, (int32_t[]){ 3, 1, 4 }, (float[]){ 6.4f, 3.2f, 2.4f });
        /* 0 means "no scale" in GGUF files that leave the key out. */
        r.scale = 0.0f;
        got = route(&r, l);
        assert_route(&got, 3, (int32_t[]){ 3, 1, 4 }, (float[]){ 0.4f, 0.2f, 0.15f });
}

static void moe_norm_then_scale(void **state)
{
        struct moe_router r = softmax6_router(3);
        float l[6];

        /* V3: (.4 .2 .15) / .75 * 2.5 = 1.333333 .666667 .5 */
        r.norm = true;
        r.scale = 2.5f;
        softmax6_logits(l);
        struct routed got = route(&r, l);
        assert_route(&got, 3, (int32_t[]){ 3, 1, 4 },
                     (float[]){ 0.4f / 0.75f * 2.5f, 0.2f / 0.75f * 2.5f, 0.5f });
}

static void moe_ties_go_to_lower_expert_id(void **state)
{
        /* exp(logits) = 1 3 2 3 2 (sum 11): 1 and 3 tie for first, 2 and 4
         * for third; top-3 is 1, 3, 2 with 3/11 3/11 2/11. */
        const float e[5] = { 1, 3, 2, 3, 2 };
        struct moe_router r = { .n_expert = 5, .n_used = 3, .gating = MOE_SOFTMAX,
                                .scale = 1.0f };
        float l[5];

        for (int i = 0; i < 5; i++)
                l[i] = logf(e[i]);
        struct routed got = route(&r, l);
        assert_route(&got, 3, (int32_t[]){ 1, 3, 2 },
                     (float[]){ 3.0f / 11, 3.0f / 11, 2.0f / 11 });

        /* All equal: the first n_used, each 1/5. */
        memset(l, 0, sizeof l);
        got = route(&r, l);
        assert_route(&got, 3, (int32_t[]){ 0, 1, 2 }, (float[]){ 0.2f, 0.2f, 0.2f });
}

static void moe_all_experts_used_sorts_them_all(void **state)
{
        struct moe_router r = softmax6_router(6);
        float l[6];

        /* .05 .2 .1 .4 .15 .1 in order: 3 1 4 2 5 0 (2 before 5: a tie);
         * the sum is 1, so norm changes nothing. */
        r.norm = true;
        softmax6_logits(l);
        struct routed got = route(&r, l);
        assert_route(&got, 6, (int32_t[]){ 3, 1, 4, 2, 5, 0 },
                     (float[]){ 0.4f, 0.2f, 0.15f, 0.1f, 0.1f, 0.05f });
}

static void moe_v3_style_route_end_to_end(void **state)
{
        /* sigmoid, bias, 4 groups of 2 keep 2, top-3, norm, x2.5.
         * probs  .5 .6 | .9 .1 | .3 .3 | .7 .2
         * bias   .0 .0 | .0 .0 | .4 .4 | .0 .0
         * sel    .5 .6 | .9 .1 | .7 .7 | .7 .2
         * groups  1.1    1.0     1.4     .9    -> keep g2, g0
         * top-3 of {0:.5 1:.6 4:.7 5:.7}: 4, 5, 1 (expert 2, .9, is dropped)
         * weights .3 .3 .6 sum 1.2 -> .25 .25 .5, x2.5 -> .625 .625 1.25 */
        const float p[8] = { 0.5f, 0.6f, 0.9f, 0.1f, 0.3f, 0.3f, 0.7f, 0.2f };
        const float bias[8] = { 0, 0, 0, 0, 0.4f, 0.4f, 0, 0 };
        struct moe_router r = { .n_expert = 8, .n_used = 3, .gating = MOE_SIGMOID,
                                .bias = bias, .n_group = 4, .n_group_used = 2,
                                .norm = true, .scale = 2.5f };
        float l[8];

        for (int i = 0; i < 8; i++)
                l[i] = logit_of(p[i]);
        struct routed got = route(&r, l);
        assert_route(&got, 3, (int32_t[]){ 4, 5, 1 }, (float[]){ 0.625f, 0.625f, 1.25f });
}

/* The reference: all experts sorted by (sel desc, id asc), groups masked
 * by a full sort of group scores. Slow and obvious. */
struct ranked {
        float s;
        int id;
};

static int ranked_cmp(const void *a, const void *b)
{
        const struct ranked *x = a, *y = b;

        if (x->s != y->s)
                return x->s > y->s ? -1 : 1;
        return x->id - y->id;
}

static void reference_route(const struct moe_router *r, const float *l, int32_t *ids, float *w)
{
        float probs[MAXX], sel[MAXX], sum = 0;
        struct ranked all[MAXX], groups[MAXX];
        int gs = r->n_group > 1 ? r->n_expert / r->n_group : r->n_expert;
        int ng = r->n_group > 1 ? r->n_group : 1;

        for (int i = 0; i < r->n_expert; i++) {
                probs[i] = 1.0f / (1.0f + expf(-l[i]));
                sel[i] = probs[i] + (r->bias ? r->bias[i] : 0.0f);
        }
        for (int g = 0; g < ng && ng > 1; g++) {
                struct ranked in[MAXX];
                for (int i = 0; i < gs; i++)
                        in[i] = (struct ranked){ sel[g * gs + i], i };
                qsort(in, gs, sizeof in[0], ranked_cmp);
                groups[g] = (struct ranked){ in[0].s + in[1].s, g };
        }
        if (ng > 1) {
                qsort(groups, ng, sizeof groups[0], ranked_cmp);
                for (int k = r->n_group_used; k < ng; k++)
                        for (int i = 0; i < gs; i++)
                                sel[groups[k].id * gs + i] = -INFINITY;
        }
        for (int i = 0; i < r->n_expert; i++)
                all[i] = (struct ranked){ sel[i], i };
        qsort(all, r->n_expert, sizeof all[0], ranked_cmp);
        for (int k = 0; k < r->n_used; k++) {
                ids[k] = all[k].id;
                w[k] = probs[ids[k]];
                sum += w[k];
        }
        for (int k = 0; k < r->n_used; k++)
                w[k] = w[k] / fmaxf(sum, 6.103515625e-5f) * r->scale;
}

static void moe_matches_full_sort_reference_on_random_logits(void **state)
{
        float bias[MAXX], l[MAXX];
        struct moe_router r = { .n_expert = MAXX, .n_used = 8, .gating = MOE_SIGMOID,
                                .bias = bias, .n_group = 8, .n_group_used = 4,
                                .norm = true, .scale = 2.5f };
        unsigned seed = 12345;

        for (int iter = 0; iter < 2000; iter++) {
                int32_t ids[8];
                float w[8];
                for (int i = 0; i < MAXX; i++) {
                        /* Coarse values make ties frequent. */
                        l[i] = (float)((int)(rand_r(&seed) % 9) - 4) * 0.5f;
                        bias[i] = (float)(rand_r(&seed) % 3) * 0.125f;
                }
                struct routed got = route(&r, l);
                reference_route(&r, l, ids, w);
                assert_route(&got, 8, ids, w);
        }
}

static void moe_group_by_expert_is_a_stable_counting_sort(void **state)
{
        /* 3 tokens, 2 slots: pairs 0:(t0,e2) 1:(t0,e0) 2:(t1,e1) 3:(t1,e2)
         * 4:(t2,e2) 5:(t2,e3). Expert counts 1 1 3 1 0 ->
         * start 0 1 2 5 6 6; order e0:[1] e1:[2] e2:[0 3 4] e3:[5] e4:[] */
        const int32_t ids[6] = { 2, 0, 1, 2, 2, 3 };
        const int64_t want_start[6] = { 0, 1, 2, 5, 6, 6 };
        const int32_t want_order[6] = { 1, 2, 0, 3, 4, 5 };
        int64_t start[6];
        int32_t order[6];

        moe_group_by_expert(5, 2, 3, ids, start, order);
        for (int i = 0; i < 6; i++) {
                assert_int_equal(start[i], want_start[i]);
                assert_int_equal(order[i], want_order[i]);
        }
}

static void moe_group_by_expert_of_no_tokens_is_empty(void **state)
{
        int64_t start[4] = { 7, 7, 7, 7 };
        int32_t order[1] = { 0 };

        moe_group_by_expert(3, 2, 0, NULL, start, order);
        for (int i = 0; i < 4; i++)
                assert_int_equal(start[i], 0);
}

static void moe_router_check_rejects_inconsistent_routers(void **state)
{
        struct moerr e = { { 0 } };
        struct moe_router ok = { .n_expert = 256, .n_used = 8, .gating = MOE_SIGMOID,
                                 .n_group = 8, .n_group_used = 4, .norm = true,
                                 .scale = 2.5f };
        struct moe_router r;

        assert_int_equal(moe_router_check(&ok, &e), 0);
        r = ok, r.n_used = 0;
        assert_int_equal(moe_router_check(&r, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "n_used"));
        r = ok, r.n_used = 257;
        assert_int_equal(moe_router_check(&r, &e), -EINVAL);
        r = ok, r.n_group = 7;
        assert_int_equal(moe_router_check(&r, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "n_group"));
        r = ok, r.n_group_used = 9;
        assert_int_equal(moe_router_check(&r, &e), -EINVAL);
        r = ok, r.n_group_used = 0;
        assert_int_equal(moe_router_check(&r, &e), -EINVAL);
        r = ok, r.gating = 3;
        assert_int_equal(moe_router_check(&r, &e), -EINVAL);
        /* One kept group of 32 cannot supply 40 experts. */
        r = ok, r.n_group_used = 1, r.n_used = 40;
        assert_int_equal(moe_router_check(&r, &e), -EINVAL);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(moe_softmax_plain_topk_uses_raw_probabilities),
                cmocka_unit_test(moe_softmax_is_shift_invariant),
                cmocka_unit_test(moe_sigmoid_bias_changes_selection_not_weights),
                cmocka_unit_test(moe_groups_of_two_drop_the_group_of_the_best_expert),
                cmocka_unit_test(moe_group_score_is_sum_of_top_two_not_max_or_total),
                cmocka_unit_test(moe_groups_score_biased_values),
                cmocka_unit_test(moe_norm_divides_by_sum_of_chosen),
                cmocka_unit_test(moe_norm_clamps_tiny_sums),
                cmocka_unit_test(moe_scale_multiplies_unless_zero_or_one),
                cmocka_unit_test(moe_norm_then_scale),
                cmocka_unit_test(moe_ties_go_to_lower_expert_id),
                cmocka_unit_test(moe_all_experts_used_sorts_them_all),
                cmocka_unit_test(moe_v3_style_route_end_to_end),
                cmocka_unit_test(moe_matches_full_sort_reference_on_random_logits),
                cmocka_unit_test(moe_group_by_expert_is_a_stable_counting_sort),
                cmocka_unit_test(moe_group_by_expert_of_no_tokens_is_empty),
                cmocka_unit_test(moe_router_check_rejects_inconsistent_routers),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
