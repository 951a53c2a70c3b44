/* test-sampler: engine/sampler.c. Greedy and seeded reproducibility,
 * distributions of 20000 draws against the probabilities worked out by
 * hand (chi-square), hand-checked penalties, parameter checks, NaN logits,
 * and the stop-string matcher against a brute-force reference. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/sampler.h"

#define BIG_VOCAB 129280

static struct sampler_params params(float temp, int32_t top_k, float top_p, float min_p)
{
        struct sampler_params p;

        sampler_params_default(&p);
        p.temperature = temp;
        p.top_k = top_k;
        p.top_p = top_p;
        p.min_p = min_p;
        p.seed = 1234;
        return p;
}

/* Deterministic standard normal numbers for synthetic logits. */
static double gauss(uint64_t *st)
{
        double u1, u2;

        *st = *st * 6364136223846793005ull + 1442695040888963407ull;
        u1 = ((double)(*st >> 11) + 1.0) * 0x1.0p-53;
        *st = *st * 6364136223846793005ull + 1442695040888963407ull;
        u2 = (double)(*st >> 11) * 0x1.0p-53;
        return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* Draws n times from the same logits; counts[] by token. */
static void draw_counts(const struct sampler_params *p, const float *logits, int64_t n_vocab,
                        int n, int *counts)
{
        struct sampler *s = sampler_new(p, n_vocab);
        float *l = malloc((size_t)n_vocab * sizeof *l);

        assert_non_null(s);
        assert_non_null(l);
        memset(counts, 0, (size_t)n_vocab * sizeof *counts);
        for (int i = 0; i < n; i++) {
                memcpy(l, logits, (size_t)n_vocab * sizeof *l);
                int32_t t = sampler_sample(s, l);
                assert_in_range(t, 0, n_vocab - 1);
                counts[t]++;
        }
        free(l);
        sampler_free(s);
}

/* Chi-square of counts against probabilities want[] over the given
 * tokens; a token with want 0 must never be drawn. Five categories at
 * most here: 30 is far beyond the 1e-4 quantile (about 25.7 for 5 degrees
 * of freedom), and the seed is fixed, so this does not flake. */
static void assert_distribution(const int *counts, const int32_t *ids, const double *want,
                                int k, int n)
{
        double chi2 = 0.0;
        int seen = 0;

        for (int i = 0; i < k; i++) {
                int c = counts[ids[i]];
                seen += c;
                if (want[i] == 0.0) {
                        assert_int_equal(c, 0);
                        continue;
                }
                double e = want[i] * n;
                chi2 += (c - e) * (c - e) / e;
        }
        if (chi2 >= 30.0)
                fail_msg("chi-square %.1f too large", chi2);
        assert_int_equal(seen, n);
}

static void sampler_greedy_takes_argmax_lowest_on_ties(void **state)
{
        struct sampler_params p = params(0.0f, 0, 1.0f, 0.0f);
        struct sampler *s = sampler_new(&p, 7);
        float l[7] = { 0.5f, 3.0f, -1.0f, 3.0f, NAN, 2.0f, -INFINITY };

        assert_non_null(s);
        /* 1 and 3 tie at 3.0; NaN is not a maximum. */
        assert_int_equal(sampler_sample(s, l), 1);
        float l2[7] = { NAN, NAN, 0.0f, NAN, 5.0f, NAN, 4.9f };
        assert_int_equal(sampler_sample(s, l2), 4);
        sampler_free(s);
}

static void sampler_greedy_on_big_vocab_finds_the_peak(void **state)
{
        struct sampler_params p = params(0.0f, 0, 1.0f, 0.0f);
        struct sampler *s = sampler_new(&p, BIG_VOCAB);
        float *l = malloc(BIG_VOCAB * sizeof *l);
        uint64_t st = 7;

        assert_non_null(s);
        assert_non_null(l);
        for (int64_t peak = 0; peak < BIG_VOCAB; peak += 12345) {
                for (int64_t i = 0; i < BIG_VOCAB; i++)
                        l[i] = (float)gauss(&st);
                l[peak] = 100.0f;
                assert_int_equal(sampler_sample(s, l), peak);
        }
        free(l);
        sampler_free(s);
}

static void sampler_seed_reproduces_and_other_seed_differs(void **state)
{
        struct sampler_params p = params(1.0f, 0, 1.0f, 0.0f);
        float base[1000], l[1000];
        int32_t a[300], b[300], c[300];
        int differ = 0;

        for (int i = 0; i < 1000; i++)
                base[i] = (float)(i % 7) * 0.1f;
        struct sampler *s1 = sampler_new(&p, 1000), *s2 = sampler_new(&p, 1000);
        p.seed = 1235;
        struct sampler *s3 = sampler_new(&p, 1000);
        assert_true(s1 && s2 && s3);
        for (int i = 0; i < 300; i++) {
                memcpy(l, base, sizeof l);
                a[i] = sampler_sample(s1, l);
                memcpy(l, base, sizeof l);
                b[i] = sampler_sample(s2, l);
                memcpy(l, base, sizeof l);
                c[i] = sampler_sample(s3, l);
                differ += a[i] != c[i];
        }
        assert_memory_equal(a, b, sizeof a);
        /* Two streams over ~1000 near-equal tokens agree by chance ~0.1%. */
        assert_true(differ > 280);
        sampler_free(s1);
        sampler_free(s2);
        sampler_free(s3);
}

/* Four tokens with exp(logit) = 1 2 3 4: probabilities .1 .2 .3 .4. */
static void small_logits(float *l)
{
        for (int i = 0; i < 4; i++)
                l[i] = logf((float)(i + 1));
}

static const int32_t ids4[4] = { 0, 1, 2, 3 };

static void sampler_temperature_matches_softmax(void **state)
{
        float l[4];
        int counts[4];

        small_logits(l);
        /* T = 1: .1 .2 .3 .4 */
        struct sampler_params p = params(1.0f, 0, 1.0f, 0.0f);
        draw_counts(&p, l, 4, 20000, counts);
        assert_distribution(counts, ids4, (double[]){ 0.1, 0.2, 0.3, 0.4 }, 4, 20000);
        /* T = 0.5 squares the weights: 1 4 9 16 over 30. */
        p = params(0.5f, 0, 1.0f, 0.0f);
        draw_counts(&p, l, 4, 20000, counts);
        assert_distribution(counts, ids4,
                            (double[]){ 1 / 30.0, 4 / 30.0, 9 / 30.0, 16 / 30.0 }, 4, 20000);
        /* T = 2 takes square roots: 1 1.414 1.732 2 over 6.146. */
        p = params(2.0f, 0, 1.0f, 0.0f);
        draw_counts(&p, l, 4, 20000, counts);
        double z = 1 + sqrt(2) + sqrt(3) + 2;
        assert_distribution(counts, ids4, (double[]){ 1 / z, sqrt(2) / z, sqrt(3) / z, 2 / z },
                            4, 20000);
}

static void sampler_top_k_keeps_the_k_best(void **state)
{
        float l[4];
        int counts[4];

        small_logits(l);
        /* top-2 keeps .3 .4 -> 3/7 4/7 */
        struct sampler_params p = params(1.0f, 2, 1.0f, 0.0f);
        draw_counts(&p, l, 4, 20000, counts);
        assert_distribution(counts, ids4, (double[]){ 0, 0, 3 / 7.0, 4 / 7.0 }, 4, 20000);
        /* top-1 is greedy whatever the temperature. */
        p = params(5.0f, 1, 1.0f, 0.0f);
        draw_counts(&p, l, 4, 2000, counts);
        assert_int_equal(counts[3], 2000);
}

static void sampler_top_p_keeps_the_smallest_nucleus(void **state)
{
        float l[4];
        int counts[4];

        small_logits(l);
        /* .4 .3 reach .65 (cum .7): keep 2 -> 4/7 3/7 */
        struct sampler_params p = params(1.0f, 0, 0.65f, 0.0f);
        draw_counts(&p, l, 4, 20000, counts);
        assert_distribution(counts, ids4, (double[]){ 0, 0, 3 / 7.0, 4 / 7.0 }, 4, 20000);
        /* .75 needs .4 .3 .2 (cum .9) -> 2/9 3/9 4/9 */
        p = params(1.0f, 0, 0.75f, 0.0f);
        draw_counts(&p, l, 4, 20000, counts);
        assert_distribution(counts, ids4, (double[]){ 0, 2 / 9.0, 3 / 9.0, 4 / 9.0 }, 4,
                            20000);
        /* Tiny p keeps at least the best one. */
        p = params(1.0f, 0, 1e-6f, 0.0f);
        draw_counts(&p, l, 4, 2000, counts);
        assert_int_equal(counts[3], 2000);
}

static void sampler_min_p_drops_below_fraction_of_best(void **state)
{
        float l[4];
        int counts[4];

        small_logits(l);
        /* min_p .6 of p_max .4 is .24: keep .3 .4 -> 3/7 4/7 */
        struct sampler_params p = params(1.0f, 0, 1.0f, 0.6f);
        draw_counts(&p, l, 4, 20000, counts);
        assert_distribution(counts, ids4, (double[]){ 0, 0, 3 / 7.0, 4 / 7.0 }, 4, 20000);
        /* min_p .4: threshold .16 keeps .2 .3 .4 -> 2/9 3/9 4/9 */
        p = params(1.0f, 0, 1.0f, 0.4f);
        draw_counts(&p, l, 4, 20000, counts);
        assert_distribution(counts, ids4, (double[]){ 0, 2 / 9.0, 3 / 9.0, 4 / 9.0 }, 4,
                            20000);
}

static void sampler_chain_top_k_temperature_top_p_min_p(void **state)
{
        float l[6];
        int counts[6];
        const int32_t ids6[6] = { 0, 1, 2, 3, 4, 5 };

        /* exp(logits) = 1 2 3 4 5 6. top-k 4 keeps 3 4 5 6; T = .5 squares:
         * 9 16 25 36 over 86 = .105 .186 .291 .419. top-p .65: .419 + .291 =
         * .709 >= .65, keep 6 and 5. min-p .7: 25/36 = .69 < .7 drops 5 too:
         * only 6 is left. With min-p .6 instead, 25/61 and 36/61. */
        for (int i = 0; i < 6; i++)
                l[i] = logf((float)(i + 1));
        struct sampler_params p = params(0.5f, 4, 0.65f, 0.7f);
        draw_counts(&p, l, 6, 2000, counts);
        assert_int_equal(counts[5], 2000);
        p = params(0.5f, 4, 0.65f, 0.6f);
        draw_counts(&p, l, 6, 20000, counts);
        assert_distribution(counts, ids6, (double[]){ 0, 0, 0, 0, 25 / 61.0, 36 / 61.0 }, 6,
                            20000);
}

/* 129280 tokens: four real ones at scattered ids with .1 .2 .3 .3, and
 * the rest share .1, so the vocabulary-wide paths (no top-k) and their
 * block skipping are exercised with a tail that carries real mass. */
static const int32_t big_ids[4] = { 100, 5000, 70000, 129000 };

static float *big_logits(void)
{
        float *l = malloc(BIG_VOCAB * sizeof *l);
        const float p[4] = { 0.1f, 0.2f, 0.3f, 0.3f };

        assert_non_null(l);
        for (int64_t i = 0; i < BIG_VOCAB; i++)
                l[i] = logf(0.1f / (BIG_VOCAB - 4));
        for (int i = 0; i < 4; i++)
                l[big_ids[i]] = logf(p[i]);
        return l;
}

/* Each draw over the full vocabulary costs a pass over it: fewer draws here
 * (the chi-square bound scales with the count). */
#define BIG_DRAWS 3000

static void sampler_big_vocab_temperature_top_p_min_p(void **state)
{
        float *l = big_logits();
        int *counts = malloc(BIG_VOCAB * sizeof *counts);
        int junk = 0;

        assert_non_null(counts);
        /* Plain: .1 .2 .3 .3 and .1 for all the others together. */
        struct sampler_params p = params(1.0f, 0, 1.0f, 0.0f);
        draw_counts(&p, l, BIG_VOCAB, BIG_DRAWS, counts);
        for (int64_t i = 0; i < BIG_VOCAB; i++)
                junk += counts[i];
        for (int i = 0; i < 4; i++)
                junk -= counts[big_ids[i]];
        double e = 0.1 * BIG_DRAWS;
        if ((junk - e) * (junk - e) / e > 15.0)
                fail_msg("tail drawn %d times, want about %.0f", junk, e);
        /* Among the four: .1 .2 .3 .3 over .9. */
        assert_distribution(counts, big_ids, (double[]){ 1 / 9.0, 2 / 9.0, 3 / 9.0, 3 / 9.0 },
                            4, BIG_DRAWS - junk);

        /* top-p .65: .3 .3 .2 (cum .8) -> .25 .375 .375, nothing else. */
        p = params(1.0f, 0, 0.65f, 0.0f);
        draw_counts(&p, l, BIG_VOCAB, BIG_DRAWS, counts);
        assert_distribution(counts, big_ids, (double[]){ 0, 0.25, 0.375, 0.375 }, 4, BIG_DRAWS);
        /* top-p .95 needs the tail too: .9 + some of the .1 spread evenly. */
        p = params(1.0f, 0, 0.95f, 0.0f);
        draw_counts(&p, l, BIG_VOCAB, BIG_DRAWS, counts);
        assert_true(counts[big_ids[0]] > 0);

        /* min-p .5 of .3 = .15 keeps .2 .3 .3 -> .25 .375 .375. */
        p = params(1.0f, 0, 1.0f, 0.5f);
        draw_counts(&p, l, BIG_VOCAB, BIG_DRAWS, counts);
        assert_distribution(counts, big_ids, (double[]){ 0, 0.25, 0.375, 0.375 }, 4, BIG_DRAWS);
        free(counts);
        free(l);
}

struct ranked {
        float l;
        int32_t id;
};

static int ranked_cmp(const void *a, const void *b)
{
        const struct ranked *x = a, *y = b;

        if (x->l != y->l)
                return x->l > y->l ? -1 : 1;
        return x->id - y->id;
}

static void sampler_top_p_draws_only_inside_the_nucleus(void **state)
{
        const float temp = 0.7f, top_p = 0.9f;
        float *base = malloc(BIG_VOCAB * sizeof *base), *l = malloc(BIG_VOCAB * sizeof *l);
        struct ranked *r = malloc(BIG_VOCAB * sizeof *r);
        bool *in = calloc(BIG_VOCAB, sizeof *in);
        uint64_t st = 99;
        double z = 0.0, acc = 0.0;

        assert_true(base && l && r && in);
        for (int64_t i = 0; i < BIG_VOCAB; i++) {
                base[i] = (float)(3.0 * gauss(&st));
                r[i] = (struct ranked){ base[i], (int32_t)i };
        }
        /* The reference nucleus, from a full sort in double precision. */
        qsort(r, BIG_VOCAB, sizeof *r, ranked_cmp);
        for (int64_t i = 0; i < BIG_VOCAB; i++)
                z += exp((r[i].l - r[0].l) / temp);
        int64_t size = 0;
        while (acc < top_p * z)
                acc += exp((r[size].l - r[0].l) / temp), in[r[size++].id] = true;

        struct sampler_params p = params(temp, 0, top_p, 0.0f);
        struct sampler *s = sampler_new(&p, BIG_VOCAB);
        assert_non_null(s);
        for (int k = 0; k < 500; k++) {
                memcpy(l, base, BIG_VOCAB * sizeof *l);
                int32_t t = sampler_sample(s, l);
                if (!in[t])
                        fail_msg("token %d (logit %g) is outside the nucleus of %lld",
                                 t, (double)base[t], (long long)size);
        }
        sampler_free(s);
        free(base);
        free(l);
        free(r);
        free(in);
}

static void sampler_nan_and_inf_logits_are_safe(void **state)
{
        const struct sampler_params modes[] = {
                params(0.0f, 0, 1.0f, 0.0f), params(1.0f, 0, 1.0f, 0.0f),
                params(1.0f, 3, 1.0f, 0.0f), params(1.0f, 0, 0.9f, 0.0f),
                params(1.0f, 0, 1.0f, 0.1f), params(1e-30f, 0, 1.0f, 0.0f),
        };
        float l[37];

        for (size_t m = 0; m < sizeof modes / sizeof modes[0]; m++) {
                struct sampler *s = sampler_new(&modes[m], 37);
                assert_non_null(s);
                /* All NaN: any valid token, no crash. */
                for (int i = 0; i < 37; i++)
                        l[i] = NAN;
                assert_in_range(sampler_sample(s, l), 0, 36);
                /* One finite logit among NaN: it is the only choice. */
                for (int k = 0; k < 50; k++) {
                        for (int i = 0; i < 37; i++)
                                l[i] = NAN;
                        l[29] = -3.0f;
                        assert_int_equal(sampler_sample(s, l), 29);
                }
                /* +inf wins over everything finite. */
                for (int k = 0; k < 50; k++) {
                        for (int i = 0; i < 37; i++)
                                l[i] = (float)i;
                        l[5] = INFINITY;
                        l[6] = NAN;
                        assert_int_equal(sampler_sample(s, l), 5);
                }
                sampler_free(s);
        }
}

static void sampler_penalties_change_logits_as_specified(void **state)
{
        struct sampler_params p = params(0.0f, 0, 1.0f, 0.0f);
        float l[5] = { 2.0f, -2.0f, 1.0f, 0.5f, 3.0f };

        p.repeat_penalty = 2.0f;
        p.frequency_penalty = 0.5f;
        p.presence_penalty = 0.25f;
        p.penalty_last_n = -1;
        struct sampler *s = sampler_new(&p, 5);
        assert_non_null(s);
        /* Seen: 0 twice, 1 once, 3 once; 2 and 4 never (and 7 is no token). */
        sampler_accept(s, 0);
        sampler_accept(s, 1);
        sampler_accept(s, 0);
        sampler_accept(s, 3);
        sampler_accept(s, 7);
        assert_int_equal(sampler_sample(s, l), 4);
        /* 0: 2 / 2 = 1, minus 2*.5 + .25 -> -.25
         * 1: -2 * 2 = -4, minus 1*.5 + .25 -> -4.75
         * 3: .5 / 2 = .25, minus .75 -> -.5 */
        assert_float_equal(l[0], -0.25f, 1e-6f);
        assert_float_equal(l[1], -4.75f, 1e-6f);
        assert_float_equal(l[2], 1.0f, 0.0f);
        assert_float_equal(l[3], -0.5f, 1e-6f);
        assert_float_equal(l[4], 3.0f, 0.0f);
        sampler_free(s);
}

static void sampler_penalty_window_forgets_old_tokens(void **state)
{
        struct sampler_params p = params(0.0f, 0, 1.0f, 0.0f);
        float l[5] = { 2.0f, -2.0f, 1.0f, 0.5f, 3.0f };

        p.repeat_penalty = 2.0f;
        p.frequency_penalty = 0.5f;
        p.presence_penalty = 0.25f;
        p.penalty_last_n = 2;
        struct sampler *s = sampler_new(&p, 5);
        assert_non_null(s);
        /* The window of 2 holds 0 and 3, once each; 1 fell out. */
        sampler_accept(s, 0);
        sampler_accept(s, 1);
        sampler_accept(s, 0);
        sampler_accept(s, 3);
        sampler_sample(s, l);
        /* 0: 2 / 2 = 1, minus .5 + .25 -> .25; 3: .25 - .75 -> -.5 */
        assert_float_equal(l[0], 0.25f, 1e-6f);
        assert_float_equal(l[1], -2.0f, 0.0f);
        assert_float_equal(l[3], -0.5f, 1e-6f);
        /* Penalties apply anew to fresh logits: the counts survive a call. */
        float l2[5] = { 2.0f, -2.0f, 1.0f, 0.5f, 3.0f };
        sampler_sample(s, l2);
        assert_float_equal(l2[0], 0.25f, 1e-6f);
        sampler_free(s);
}

static void sampler_negative_presence_can_favour_seen_tokens(void **state)
{
        struct sampler_params p = params(0.0f, 0, 1.0f, 0.0f);
        float l[3] = { 1.0f, 2.0f, 2.5f };

        /* -(-2) lifts token 0 from 1 to 3, above 2.5. */
        p.presence_penalty = -2.0f;
        struct sampler *s = sampler_new(&p, 3);
        assert_non_null(s);
        sampler_accept(s, 0);
        assert_int_equal(sampler_sample(s, l), 0);
        assert_float_equal(l[0], 3.0f, 1e-6f);
        sampler_free(s);
}

static void sampler_params_check_names_the_bad_field(void **state)
{
        struct sampler_params p;
        struct moerr e = { { 0 } };

        sampler_params_default(&p);
        assert_int_equal(sampler_params_check(&p, &e), 0);

#define EXPECT_BAD(field, assign)                                                   \
        do {                                                                        \
                sampler_params_default(&p);                                         \
                assign;                                                             \
                assert_int_equal(sampler_params_check(&p, &e), -EINVAL);            \
                assert_non_null(strstr(e.msg, field));                              \
                assert_null(sampler_new(&p, 10));                                   \
        } while (0)
        EXPECT_BAD("temperature", p.temperature = NAN);
        EXPECT_BAD("temperature", p.temperature = -0.5f);
        EXPECT_BAD("temperature", p.temperature = 101.0f);
        EXPECT_BAD("top_p", p.top_p = 0.0f);
        EXPECT_BAD("top_p", p.top_p = 1.5f);
        EXPECT_BAD("top_p", p.top_p = NAN);
        EXPECT_BAD("min_p", p.min_p = -0.1f);
        EXPECT_BAD("min_p", p.min_p = 1.1f);
        EXPECT_BAD("repeat_penalty", p.repeat_penalty = 0.0f);
        EXPECT_BAD("repeat_penalty", p.repeat_penalty = INFINITY);
        EXPECT_BAD("presence_penalty", p.presence_penalty = 2.5f);
        EXPECT_BAD("frequency_penalty", p.frequency_penalty = -2.5f);
        EXPECT_BAD("frequency_penalty", p.frequency_penalty = NAN);
        EXPECT_BAD("penalty_last_n", p.penalty_last_n = -2);
#undef EXPECT_BAD

        /* The edges are allowed. */
        sampler_params_default(&p);
        p.temperature = 0.0f;
        p.top_p = 1.0f;
        p.min_p = 1.0f;
        p.presence_penalty = -2.0f;
        p.frequency_penalty = 2.0f;
        p.penalty_last_n = -1;
        assert_int_equal(sampler_params_check(&p, &e), 0);
        assert_null(sampler_new(&p, 0));
}

/* Feeds text in the given pieces; returns the final emit and whether it
 * stopped, checking on the way that emit never shrinks nor passes what
 * was fed. */
static bool feed_pieces(const char *const *stops, size_t n_stops, const char *const *pieces,
                        size_t n_pieces, size_t *emit)
{
        struct stop_matcher *m = stop_new(stops, n_stops);
        size_t fed = 0, last = 0;
        bool stopped = false;

        assert_non_null(m);
        for (size_t i = 0; i < n_pieces && !stopped; i++) {
                fed += strlen(pieces[i]);
                stopped = stop_feed(m, pieces[i], strlen(pieces[i]), emit);
                assert_true(*emit >= last);
                assert_true(*emit <= fed);
                last = *emit;
        }
        stop_free(m);
        return stopped;
}

static void stop_matches_across_token_boundaries(void **state)
{
        const char *stops[] = { "</s>" };
        struct stop_matcher *m = stop_new(stops, 1);
        size_t emit;

        assert_non_null(m);
        assert_false(stop_feed(m, "Hello <", 7, &emit));
        assert_int_equal(emit, 6); /* "<" is held back */
        assert_false(stop_feed(m, "/", 1, &emit));
        assert_int_equal(emit, 6);
        assert_true(stop_feed(m, "s>tail", 6, &emit));
        assert_int_equal(emit, 6); /* "Hello " and nothing more */
        /* Once stopped, always stopped. */
        assert_true(stop_feed(m, "more", 4, &emit));
        assert_int_equal(emit, 6);
        stop_free(m);
}

static void stop_releases_held_text_when_it_diverges(void **state)
{
        const char *stops[] = { "STOP" };
        struct stop_matcher *m = stop_new(stops, 1);
        size_t emit;

        assert_non_null(m);
        assert_false(stop_feed(m, "ST", 2, &emit));
        assert_int_equal(emit, 0);
        /* "START": no suffix of it begins "STOP", so all of it shows. */
        assert_false(stop_feed(m, "ART", 3, &emit));
        assert_int_equal(emit, 5);
        /* "STARTSTO" holds "STO"; one more "O" releases it. */
        assert_false(stop_feed(m, "STO", 3, &emit));
        assert_int_equal(emit, 5);
        assert_false(stop_feed(m, "O", 1, &emit));
        assert_int_equal(emit, 9);
        stop_free(m);
}

static void stop_overlapping_prefixes(void **state)
{
        const char *stops[] = { "ab", "abc", "b" };
        size_t emit;

        /* "xa" holds "a"; "c" makes "xac", no stop can start there. */
        assert_false(feed_pieces(stops, 3, (const char *[]){ "xa", "c" }, 2, &emit));
        assert_int_equal(emit, 3);
        /* "ab" and "b" both end at byte 5 of "xacab": the longer counts,
         * so the emitted text is "xac". */
        assert_true(feed_pieces(stops, 3, (const char *[]){ "xa", "c", "a", "b" }, 4, &emit));
        assert_int_equal(emit, 3);
        /* "b" alone. */
        assert_true(feed_pieces(stops, 3, (const char *[]){ "xb" }, 1, &emit));
        assert_int_equal(emit, 1);
        /* "abc" in one piece: "ab" ends first, so "abc" never gets the
         * chance; nothing is emitted either way. */
        assert_true(feed_pieces(stops, 3, (const char *[]){ "abc" }, 1, &emit));
        assert_int_equal(emit, 0);
}

static void stop_ignores_empty_stop_strings(void **state)
{
        const char *stops[] = { "", NULL, "" };
        size_t emit;

        assert_false(feed_pieces(stops, 3, (const char *[]){ "abc", "" }, 2, &emit));
        assert_int_equal(emit, 3);
        const char *some[] = { "", "zz" };
        assert_false(feed_pieces(some, 2, (const char *[]){ "abz" }, 1, &emit));
        assert_int_equal(emit, 2);
        assert_false(feed_pieces(NULL, 0, (const char *[]){ "abc" }, 1, &emit));
        assert_int_equal(emit, 3);
}

/* The reference: the stop whose first occurrence ends first (ties: the
 * longer) in the whole text. */
static bool reference_stop(const char *const *stops, size_t n, const char *text, size_t *at)
{
        size_t best_end = SIZE_MAX;

        for (size_t i = 0; i < n; i++) {
                const char *hit = stops[i][0] ? strstr(text, stops[i]) : NULL;
                if (!hit)
                        continue;
                size_t s = (size_t)(hit - text), e = s + strlen(stops[i]);
                if (e < best_end || (e == best_end && s < *at))
                        best_end = e, *at = s;
        }
        return best_end != SIZE_MAX;
}

static void stop_agrees_with_reference_for_any_split(void **state)
{
        /* Many stops over a small alphabet make overlaps common. */
        const char *stops[] = { "abab", "bab", "ca", "aaa", "cbc", "bcab", "", "ccc",
                                "abcabc", "ba" };
        const size_t n = sizeof stops / sizeof stops[0];
        unsigned seed = 77;
        char text[41];

        for (int iter = 0; iter < 3000; iter++) {
                size_t len = 1 + rand_r(&seed) % 40, at = 0, emit = 0, pos = 0;
                for (size_t i = 0; i < len; i++)
                        text[i] = "abc"[rand_r(&seed) % 3];
                text[len] = 0;
                bool want = reference_stop(stops, n, text, &at);

                struct stop_matcher *m = stop_new(stops, n);
                bool got = false;
                assert_non_null(m);
                while (pos < len && !got) {
                        size_t piece = (size_t)rand_r(&seed) % 5;
                        piece = piece < len - pos ? piece : len - pos;
                        got = stop_feed(m, text + pos, piece, &emit);
                        pos += piece;
                }
                stop_free(m);
                assert_int_equal(got, want);
                if (want) {
                        assert_int_equal(emit, at);
                } else {
                        /* Everything shown but a held suffix that could begin a stop. */
                        assert_true(emit <= len);
                        assert_true(len - emit < 6);
                }
        }
}

static double now_s(void)
{
        struct timespec t;

        clock_gettime(CLOCK_MONOTONIC, &t);
        return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void sampler_big_vocab_is_fast(void **state)
{
        const struct {
                const char *name;
                struct sampler_params p;
        } cfg[] = {
                { "greedy", params(0.0f, 0, 1.0f, 0.0f) },
                { "temperature 0.8", params(0.8f, 0, 1.0f, 0.0f) },
                { "top_k 40 top_p .95 min_p .05", params(0.8f, 40, 0.95f, 0.05f) },
                { "top_p .9 temperature .6", params(0.6f, 0, 0.9f, 0.0f) },
                { "min_p .05", params(1.0f, 0, 1.0f, 0.05f) },
        };
        float *base = malloc(BIG_VOCAB * sizeof *base), *l = malloc(BIG_VOCAB * sizeof *l);
        uint64_t st = 5;

        assert_true(base && l);
        /* Peaked like a language model's logits: a broad normal floor and
         * a few strong candidates. */
        for (int64_t i = 0; i < BIG_VOCAB; i++)
                base[i] = (float)(2.0 * gauss(&st));
        for (int i = 0; i < 8; i++)
                base[(i * 7919) % BIG_VOCAB] += 12.0f - (float)i;
        for (size_t c = 0; c < sizeof cfg / sizeof cfg[0]; c++) {
                struct sampler *s = sampler_new(&cfg[c].p, BIG_VOCAB);
                double t = 0.0;
                assert_non_null(s);
                for (int k = 0; k < 50; k++) {
                        memcpy(l, base, BIG_VOCAB * sizeof *l);
                        double t0 = now_s();
                        sampler_sample(s, l);
                        t += now_s() - t0;
                }
                printf("sampler on %d logits, %s: %.0f us a call\n", BIG_VOCAB, cfg[c].name,
                       t / 50 * 1e6);
                /* Loose enough for sanitizer builds on a busy machine; a
                 * full sort per call would still fail it. */
                assert_true(t / 50 < 0.05);
                sampler_free(s);
        }
        free(base);
        free(l);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(sampler_greedy_takes_argmax_lowest_on_ties),
                cmocka_unit_test(sampler_greedy_on_big_vocab_finds_the_peak),
                cmocka_unit_test(sampler_seed_reproduces_and_other_seed_differs),
                cmocka_unit_test(sampler_temperature_matches_softmax),
                cmocka_unit_test(sampler_top_k_keeps_the_k_best),
                cmocka_unit_test(sampler_top_p_keeps_the_smallest_nucleus),
                cmocka_unit_test(sampler_min_p_drops_below_fraction_of_best),
                cmocka_unit_test(sampler_chain_top_k_temperature_top_p_min_p),
                cmocka_unit_test(sampler_big_vocab_temperature_top_p_min_p),
                cmocka_unit_test(sampler_top_p_draws_only_inside_the_nucleus),
                cmocka_unit_test(sampler_nan_and_inf_logits_are_safe),
                cmocka_unit_test(sampler_penalties_change_logits_as_specified),
                cmocka_unit_test(sampler_penalty_window_forgets_old_tokens),
                cmocka_unit_test(sampler_negative_presence_can_favour_seen_tokens),
                cmocka_unit_test(sampler_params_check_names_the_bad_field),
                cmocka_unit_test(stop_matches_across_token_boundaries),
                cmocka_unit_test(stop_releases_held_text_when_it_diverges),
                cmocka_unit_test(stop_overlapping_prefixes),
                cmocka_unit_test(stop_ignores_empty_stop_strings),
                cmocka_unit_test(stop_agrees_with_reference_for_any_split),
                cmocka_unit_test(sampler_big_vocab_is_fast),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
