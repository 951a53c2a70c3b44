/* sampler.c: turns one row of logits into a token (penalties, greedy or
 * top-k / temperature / top-p / min-p with a seeded generator, in the order
 * of llama.cpp's common sampler), and the stop-string matcher that decides
 * how much generated text may be shown. */
#include "sampler.h"

#include <errno.h>
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common/cleanup.h"

/* A window larger than any context we serve, small enough to allocate. */
#define SAMPLER_MAX_LAST_N (1 << 20)

/* Passes over the vocabulary work in blocks: a block whose best logit
 * cannot matter is skipped whole, and the plain draw finds its block
 * before it looks at single tokens. */
#define SAMPLER_BLOCK 256

struct sampler_cand {
        float v;     /* logit, then probability relative to the best (<= 1) */
        int32_t id;
};

struct sampler {
        struct sampler_params p;
        int64_t n_vocab;
        uint64_t rng[4];

        /* Penalties: count[t] is how often t occurs in the window. seen
         * lists the tokens to visit: the window itself as a ring when
         * penalty_last_n > 0, the distinct tokens when it is -1 (all). */
        bool penalize;
        int32_t *count;
        int32_t *seen;
        int64_t seen_len, seen_cap, seen_head;

        struct sampler_cand *cand; /* this thread's scratch, set by sampler_sample */
        double *block_sum;         /* per SAMPLER_BLOCK: sum of probabilities */
        float *block_max;          /* per SAMPLER_BLOCK: largest probability */
};

void sampler_params_default(struct sampler_params *p)
{
        *p = (struct sampler_params){
                .temperature = 1.0f,
                .top_k = 0,
                .top_p = 1.0f,
                .min_p = 0.0f,
                .repeat_penalty = 1.0f,
                .penalty_last_n = 64,
                .presence_penalty = 0.0f,
                .frequency_penalty = 0.0f,
                .seed = 0,
        };
}

/* !(lo <= x <= hi) also rejects NaN. */
static int sampler_check_range(float x, float lo, float hi, bool lo_open, const char *name,
                               struct moerr *e)
{
        if (!(x >= lo && x <= hi) || (lo_open && x == lo))
                return moerr_set(e, -EINVAL, "%s must be in %c%g, %g], got %g", name,
                                 lo_open ? '(' : '[', (double)lo, (double)hi, (double)x);
        return 0;
}

int sampler_params_check(const struct sampler_params *p, struct moerr *e)
{
        int r;

        if ((r = sampler_check_range(p->temperature, 0.0f, 100.0f, false, "temperature", e)) < 0 ||
            (r = sampler_check_range(p->top_p, 0.0f, 1.0f, true, "top_p", e)) < 0 ||
            (r = sampler_check_range(p->min_p, 0.0f, 1.0f, false, "min_p", e)) < 0 ||
            (r = sampler_check_range(p->repeat_penalty, 0.0f, 10.0f, true, "repeat_penalty",
                                     e)) < 0 ||
            (r = sampler_check_range(p->presence_penalty, -2.0f, 2.0f, false,
                                     "presence_penalty", e)) < 0 ||
            (r = sampler_check_range(p->frequency_penalty, -2.0f, 2.0f, false,
                                     "frequency_penalty", e)) < 0)
                return r;
        if (p->penalty_last_n < -1 || p->penalty_last_n > SAMPLER_MAX_LAST_N)
                return moerr_set(e, -EINVAL, "penalty_last_n must be in [-1, %d], got %d",
                                 SAMPLER_MAX_LAST_N, p->penalty_last_n);
        return 0;
}

/* splitmix64 spreads any seed (0 included) over xoshiro256**'s state. */
static uint64_t sampler_splitmix(uint64_t *x)
{
        uint64_t z = (*x += 0x9e3779b97f4a7c15ull);

        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
}

static uint64_t sampler_rotl(uint64_t x, int k)
{
        return (x << k) | (x >> (64 - k));
}

static uint64_t sampler_next(struct sampler *s)
{
        uint64_t *st = s->rng;
        uint64_t out = sampler_rotl(st[1] * 5, 7) * 9;
        uint64_t t = st[1] << 17;

        st[2] ^= st[0];
        st[3] ^= st[1];
        st[1] ^= st[2];
        st[0] ^= st[3];
        st[2] ^= t;
        st[3] = sampler_rotl(st[3], 45);
        return out;
}

/* Uniform in [0, 1), 53 bits. */
static double sampler_uniform(struct sampler *s)
{
        return (double)(sampler_next(s) >> 11) * 0x1.0p-53;
}

static bool sampler_top_k_on(const struct sampler *s)
{
        return s->p.top_k > 0 && s->p.top_k < s->n_vocab;
}

static int64_t sampler_cand_needed(const struct sampler *s)
{
        if (sampler_top_k_on(s))
                return s->p.top_k;
        if (s->p.top_p < 1.0f || s->p.min_p > 0.0f)
                return s->n_vocab + 1; /* sampler_gather writes one ahead */
        return 0; /* plain temperature draws straight from the logits */
}

/* The candidate array can hold the whole vocabulary (1 MB for V3). A
 * daemon keeps a sampler per request but samples on one thread, so the
 * array is per thread, not per sampler: 64 requests do not cost 64 MB. */
static pthread_key_t cand_key;
static pthread_once_t cand_once = PTHREAD_ONCE_INIT;

struct cand_scratch {
        struct sampler_cand *p;
        int64_t cap;
};

static void cand_scratch_free(void *v)
{
        struct cand_scratch *c = v;

        if (c)
                free(c->p);
        free(c);
}

static void cand_key_make(void)
{
        pthread_key_create(&cand_key, cand_scratch_free);
}

/* This thread's candidate array of at least n entries, or NULL. */
static struct sampler_cand *cand_scratch(int64_t n)
{
        struct cand_scratch *c;

        pthread_once(&cand_once, cand_key_make);
        c = pthread_getspecific(cand_key);
        if (!c) {
                if (!(c = calloc(1, sizeof *c)) || pthread_setspecific(cand_key, c) != 0) {
                        free(c);
                        return NULL;
                }
        }
        if (c->cap < n) {
                struct sampler_cand *p = realloc(c->p, (size_t)n * sizeof *p);
                if (!p)
                        return NULL;
                c->p = p;
                c->cap = n;
        }
        return c->p;
}

void sampler_free(struct sampler *s)
{
        if (!s)
                return;
        free(s->count);
        free(s->seen);
        free(s->block_sum);
        free(s->block_max);
        free(s);
}

struct sampler *sampler_new(const struct sampler_params *p, int64_t n_vocab)
{
        struct sampler *s;
        uint64_t seed = p->seed;
        int64_t n_cand;

        if (n_vocab <= 0 || n_vocab > INT32_MAX || sampler_params_check(p, NULL) < 0)
                return NULL;
        s = calloc(1, sizeof *s);
        if (!s)
                return NULL;
        s->p = *p;
        s->n_vocab = n_vocab;
        for (int i = 0; i < 4; i++)
                s->rng[i] = sampler_splitmix(&seed);
        s->penalize = p->penalty_last_n != 0 &&
                      (p->repeat_penalty != 1.0f || p->presence_penalty != 0.0f ||
                       p->frequency_penalty != 0.0f);
        if (s->penalize) {
                s->count = calloc((size_t)n_vocab, sizeof *s->count);
                s->seen_cap = p->penalty_last_n > 0 ? p->penalty_last_n : 64;
                s->seen = malloc((size_t)s->seen_cap * sizeof *s->seen);
                if (!s->count || !s->seen)
                        goto fail;
        }
        s->block_sum = malloc((size_t)(n_vocab / SAMPLER_BLOCK + 1) * sizeof *s->block_sum);
        s->block_max = malloc((size_t)(n_vocab / SAMPLER_BLOCK + 1) * sizeof *s->block_max);
        if (!s->block_sum || !s->block_max)
                goto fail;
        n_cand = sampler_cand_needed(s);
        if (n_cand > 0 && !cand_scratch(n_cand))
                goto fail;
        return s;
fail:
        sampler_free(s);
        return NULL;
}

/* The window is a ring: the token falling out of it stops counting. */
static void sampler_accept_window(struct sampler *s, int32_t token)
{
        if (s->seen_len == s->seen_cap)
                s->count[s->seen[s->seen_head]]--;
        else
                s->seen_len++;
        s->seen[s->seen_head] = token;
        s->seen_head = (s->seen_head + 1) % s->seen_cap;
        s->count[token]++;
}

static void sampler_accept_all(struct sampler *s, int32_t token)
{
        if (s->count[token]++ > 0)
                return;
        if (s->seen_len == s->seen_cap) {
                int32_t *n = realloc(s->seen, (size_t)s->seen_cap * 2 * sizeof *n);
                if (!n) {
                        /* Out of memory: the token will not be penalised. */
                        s->count[token]--;
                        return;
                }
                s->seen = n;
                s->seen_cap *= 2;
        }
        s->seen[s->seen_len++] = token;
}

void sampler_accept(struct sampler *s, int32_t token)
{
        if (!s->penalize || token < 0 || token >= s->n_vocab)
                return;
        if (s->p.penalty_last_n > 0)
                sampler_accept_window(s, token);
        else
                sampler_accept_all(s, token);
}

/* Each token of the window is penalised once however often it occurs: a
 * visited token's count is negated, and restored afterwards. */
static void sampler_apply_penalties(struct sampler *s, float *logits)
{
        const struct sampler_params *p = &s->p;

        for (int64_t i = 0; i < s->seen_len; i++) {
                int32_t t = s->seen[i], c = s->count[t];
                if (c <= 0)
                        continue;
                float l = logits[t];
                if (p->repeat_penalty != 1.0f)
                        l = l <= 0.0f ? l * p->repeat_penalty : l / p->repeat_penalty;
                logits[t] = l - ((float)c * p->frequency_penalty + p->presence_penalty);
                s->count[t] = -c;
        }
        for (int64_t i = 0; i < s->seen_len; i++)
                if (s->count[s->seen[i]] < 0)
                        s->count[s->seen[i]] = -s->count[s->seen[i]];
}

/* The passes over the whole vocabulary use GCC/clang vector extensions:
 * 4 floats a step, one SSE/NEON register on any 64-bit target. */
#define SAMPLER_LANES 4
typedef float sampler_vf __attribute__((vector_size(4 * SAMPLER_LANES)));
typedef int32_t sampler_vi __attribute__((vector_size(4 * SAMPLER_LANES)));

static sampler_vf sampler_load(const float *p)
{
        sampler_vf v;

        memcpy(&v, p, sizeof v);
        return v;
}

/* mask ? a : b, lane by lane (mask lanes are 0 or -1). */
static sampler_vf sampler_select(sampler_vi mask, sampler_vf a, sampler_vf b)
{
        return (sampler_vf)(((sampler_vi)a & mask) | ((sampler_vi)b & ~mask));
}

static sampler_vf sampler_splat(float x)
{
        return (sampler_vf){ 0 } + x;
}

/* Cleans the logits in place (NaN ranks below everything, +inf becomes the
 * largest finite value so that differences to the maximum stay numbers)
 * and returns the lowest index among the largest. */
static int64_t sampler_clean_argmax(float *l, int64_t n)
{
        sampler_vf m = sampler_splat(-INFINITY);
        sampler_vi at = { 0 }, idx = { 0, 1, 2, 3 };
        int64_t i = 0, best;

        /* Lane indices are int32: n_vocab is at most INT32_MAX. */
        for (; i + SAMPLER_LANES <= n; i += SAMPLER_LANES, idx += SAMPLER_LANES) {
                sampler_vf x = sampler_load(l + i);
                x = sampler_select(x != x, sampler_splat(-INFINITY), x);
                x = sampler_select(x > FLT_MAX, sampler_splat(FLT_MAX), x);
                memcpy(l + i, &x, sizeof x);
                sampler_vi gt = x > m;
                m = sampler_select(gt, x, m);
                at = (gt & idx) | (~gt & at);
        }
        best = at[0];
        for (int j = 1; j < SAMPLER_LANES; j++)
                if (m[j] > m[0] || (m[j] == m[0] && at[j] < best))
                        m[0] = m[j], best = at[j];
        if (i == 0)
                best = -1;
        for (; i < n; i++) {
                float x = l[i];
                l[i] = x != x ? -INFINITY : x > FLT_MAX ? FLT_MAX : x;
                if (best < 0 || l[i] > l[best])
                        best = i;
        }
        return best;
}

static float sampler_block_max(const float *l, int64_t n)
{
        sampler_vf m = sampler_splat(-INFINITY);
        float best = -INFINITY;
        int64_t i = 0;

        for (; i + SAMPLER_LANES <= n; i += SAMPLER_LANES) {
                sampler_vf x = sampler_load(l + i);
                m = sampler_select(x > m, x, m);
        }
        for (int j = 0; j < SAMPLER_LANES; j++)
                best = m[j] > best ? m[j] : best;
        for (; i < n; i++)
                best = l[i] > best ? l[i] : best;
        return best;
}

/* e^x for x <= 0 (or -inf), branch-free: e^x = 2^k e^r with |r| <= ln2/2
 * and a Taylor polynomial of e^r (relative error about 1e-7). Below -87
 * (where 2^k would leave the normal range) the result is 0, exactly as
 * -inf needs. */
static sampler_vf sampler_exp(sampler_vf x)
{
        const float ln2_hi = 0.693145751953125f, ln2_lo = 1.428606820e-6f;
        sampler_vi under = x < -87.0f;
        sampler_vf xc = sampler_select(under, sampler_splat(-87.0f), x);
        /* Truncating y - 0.5 rounds y to nearest, as y <= 0. */
        sampler_vi k = __builtin_convertvector(xc * 1.44269504f - 0.5f, sampler_vi);
        sampler_vf kf = __builtin_convertvector(k, sampler_vf);
        sampler_vf r = xc - kf * ln2_hi - kf * ln2_lo;
        sampler_vf p = 1.0f + r * (1.0f + r * (1.0f / 2 + r * (1.0f / 6 + r * (1.0f / 24 +
                       r * (1.0f / 120 + r * (1.0f / 720 + r * (1.0f / 5040)))))));
        sampler_vf scale = (sampler_vf)((k + 127) << 23);

        return (sampler_vf)((sampler_vi)(p * scale) & ~under);
}

static float sampler_exp1(float x)
{
        return sampler_exp(sampler_splat(x))[0];
}

/* v[i] = e^((l[i] - max) / T) in place, with the sum and the largest v
 * of each block. Returns the total. */
static double sampler_exp_all(struct sampler *s, float *l, float max)
{
        float inv_t = 1.0f / s->p.temperature;
        int64_t n = s->n_vocab;
        double z = 0.0;

        for (int64_t b0 = 0, b = 0; b0 < n; b0 += SAMPLER_BLOCK, b++) {
                int64_t len = MO_MIN(SAMPLER_BLOCK, n - b0), i = 0;
                sampler_vf acc = { 0 }, m = { 0 };
                float *v = l + b0, sum = 0.0f, best = 0.0f;
                for (; i + SAMPLER_LANES <= len; i += SAMPLER_LANES) {
                        sampler_vf e = sampler_exp((sampler_load(v + i) - max) * inv_t);
                        memcpy(v + i, &e, sizeof e);
                        acc += e;
                        m = sampler_select(e > m, e, m);
                }
                for (int j = 0; j < SAMPLER_LANES; j++) {
                        sum += acc[j];
                        best = m[j] > best ? m[j] : best;
                }
                for (; i < len; i++) {
                        v[i] = sampler_exp1((v[i] - max) * inv_t);
                        sum += v[i];
                        best = v[i] > best ? v[i] : best;
                }
                s->block_sum[b] = sum;
                s->block_max[b] = best;
                z += sum;
        }
        return z;
}

/* Higher value first, lower id on ties: one total order for every sort. */
static bool sampler_before(const struct sampler_cand *a, const struct sampler_cand *b)
{
        return a->v > b->v || (a->v == b->v && a->id < b->id);
}

static int sampler_cand_cmp(const void *pa, const void *pb)
{
        const struct sampler_cand *a = pa, *b = pb;

        return sampler_before(a, b) ? -1 : sampler_before(b, a) ? 1 : 0;
}

/* Min-heap on sampler_before (the root is the worst kept). */
static void sampler_heap_down(struct sampler_cand *h, int64_t n, int64_t i)
{
        for (;;) {
                int64_t l = 2 * i + 1, r = l + 1, w = i;
                if (l < n && sampler_before(&h[w], &h[l]))
                        w = l;
                if (r < n && sampler_before(&h[w], &h[r]))
                        w = r;
                if (w == i)
                        return;
                struct sampler_cand t = h[i];
                h[i] = h[w];
                h[w] = t;
                i = w;
        }
}

/* The k best logits, sorted. A heap of k, whose root (the worst kept) is
 * a threshold: a block of logits none of which beats it is skipped after
 * one vectorized maximum. Later ids lose ties, so "beats" is ">". */
static int64_t sampler_top_k(struct sampler *s, const float *logits)
{
        struct sampler_cand *h = s->cand;
        int64_t k = s->p.top_k, n = s->n_vocab;

        for (int64_t i = 0; i < k; i++)
                h[i] = (struct sampler_cand){ logits[i], (int32_t)i };
        for (int64_t i = k / 2 - 1; i >= 0; i--)
                sampler_heap_down(h, k, i);
        for (int64_t b0 = k; b0 < n; b0 += SAMPLER_BLOCK) {
                int64_t end = MO_MIN(b0 + SAMPLER_BLOCK, n);
                if (sampler_block_max(logits + b0, end - b0) <= h[0].v)
                        continue;
                for (int64_t i = b0; i < end; i++) {
                        if (logits[i] <= h[0].v)
                                continue;
                        h[0] = (struct sampler_cand){ logits[i], (int32_t)i };
                        sampler_heap_down(h, k, 0);
                }
        }
        qsort(h, (size_t)k, sizeof *h, sampler_cand_cmp);
        return k;
}

/* Sum of c[0..n).v; four partial sums so the additions do not queue up
 * behind each other. */
static double sampler_cand_mass(const struct sampler_cand *c, int64_t n)
{
        double part[4] = { 0 };
        int64_t i = 0;

        for (; i + 4 <= n; i += 4)
                for (int j = 0; j < 4; j++)
                        part[j] += c[i + j].v;
        for (; i < n; i++)
                part[0] += c[i].v;
        return part[0] + part[1] + part[2] + part[3];
}

/* Draws from cand[0..n) in proportion to v, which sum to total. */
static int32_t sampler_draw(struct sampler *s, const struct sampler_cand *cand, int64_t n,
                            double total)
{
        double r = sampler_uniform(s) * total, acc = 0.0;
        int64_t last = 0;

        for (int64_t i = 0; i < n; i++) {
                if (cand[i].v <= 0.0f)
                        continue;
                acc += cand[i].v;
                last = i;
                if (r < acc)
                        return cand[i].id;
        }
        return cand[last].id; /* rounding left r at the very top */
}

/* Of cand[0..n), sorted, how many reach mass need (all if none does). */
static int64_t sampler_prefix_for(const struct sampler_cand *cand, int64_t n, double need)
{
        double acc = 0.0;

        for (int64_t i = 0; i < n; i++) {
                acc += cand[i].v;
                if (acc >= need)
                        return i + 1;
        }
        return n;
}

/* cand[0..n) sorted, v relative probabilities (cand[0].v = 1), z the mass
 * top-p measures against. Cuts to top-p then min-p and draws. */
static int32_t sampler_finish_sorted(struct sampler *s, struct sampler_cand *cand, int64_t n,
                                     double z)
{
        int64_t keep = n;

        if (s->p.top_p < 1.0f)
                keep = sampler_prefix_for(cand, n, (double)s->p.top_p * z);
        /* min-p: p < min_p * p_max, with p_max the first (v = 1). */
        while (keep > 1 && cand[keep - 1].v < s->p.min_p)
                keep--;
        return sampler_draw(s, cand, keep, sampler_cand_mass(cand, keep));
}

static int32_t sampler_sample_top_k(struct sampler *s, const float *logits)
{
        int64_t n = sampler_top_k(s, logits);
        struct sampler_cand *c = s->cand;
        float max = c[0].v, inv_t = 1.0f / s->p.temperature;
        double z = 0.0;

        if (max == -INFINITY)
                return c[0].id;
        for (int64_t i = 0; i < n; i++) {
                c[i].v = sampler_exp1((c[i].v - max) * inv_t);
                z += c[i].v;
        }
        return sampler_finish_sorted(s, c, n, z);
}

static void sampler_swap(struct sampler_cand *a, struct sampler_cand *b)
{
        struct sampler_cand t = *a;

        *a = *b;
        *b = t;
}

/* Moves the best of c[0..n) to the front until their mass reaches need,
 * and returns how many that takes (n if the mass never does): the sorted
 * prefix of sampler_prefix_for, found by quickselect instead of a sort. */
static int64_t sampler_select_mass(struct sampler_cand *c, int64_t n, double need)
{
        int64_t kept = 0;

        while (n > 16) {
                /* Median of three as pivot, moved to the end. */
                int64_t mid = n / 2, store = 0;
                if (sampler_before(&c[mid], &c[0]))
                        sampler_swap(&c[mid], &c[0]);
                if (sampler_before(&c[n - 1], &c[0]))
                        sampler_swap(&c[n - 1], &c[0]);
                if (sampler_before(&c[mid], &c[n - 1]))
                        sampler_swap(&c[mid], &c[n - 1]);
                /* Branch-free Lomuto: when c[i] does not beat the pivot
                 * the swap exchanges two that do not, which is harmless,
                 * and a guessed branch would miss half the time. */
                struct sampler_cand pivot = c[n - 1];
                for (int64_t i = 0; i < n - 1; i++) {
                        bool b = (c[i].v > pivot.v) | ((c[i].v == pivot.v) & (c[i].id < pivot.id));
                        sampler_swap(&c[i], &c[store]);
                        store += b;
                }
                sampler_swap(&c[store], &c[n - 1]);
                double better = sampler_cand_mass(c, store);
                /* c[0..store) beat the pivot, now at c[store]. */
                if (better >= need) {
                        n = store;
                        continue;
                }
                need -= better + c[store].v;
                kept += store + 1;
                if (need <= 0.0)
                        return kept;
                c += store + 1;
                n -= store + 1;
        }
        qsort(c, (size_t)n, sizeof *c, sampler_cand_cmp);
        return kept + sampler_prefix_for(c, n, need);
}

/* Appends to c (from *n) the tokens of v with lo <= v < hi, skipping the
 * blocks whose largest is below lo. Returns their mass. */
static double sampler_gather(const struct sampler *s, const float *v, float lo, float hi,
                             struct sampler_cand *c, int64_t *n)
{
        int64_t first = *n, k = *n; /* a local k: c may alias *n for the compiler */

        for (int64_t b0 = 0, b = 0; b0 < s->n_vocab; b0 += SAMPLER_BLOCK, b++) {
                int64_t end = MO_MIN(b0 + SAMPLER_BLOCK, s->n_vocab);
                if (s->block_max[b] < lo)
                        continue;
                /* Branch-free: in a broad distribution about half of a
                 * band's tokens qualify, and a branch would miss often.
                 * c has room for one more than the tokens left to gather. */
                for (int64_t i = b0; i < end; i++) {
                        c[k] = (struct sampler_cand){ v[i], (int32_t)i };
                        k += (v[i] >= lo) & (v[i] < hi);
                }
        }
        *n = k;
        return sampler_cand_mass(c + first, k - first);
}

/* Of the candidates just gathered after c[0..*n), moves the first keep
 * with v >= min_p down to follow c[*n - 1]. Returns their mass. */
static double sampler_keep_min_p(struct sampler_cand *c, int64_t *n, int64_t keep, float min_p)
{
        int64_t base = *n;
        double sum = 0.0;

        for (int64_t i = 0; i < keep; i++) {
                if (c[base + i].v < min_p)
                        continue;
                c[(*n)++] = c[base + i];
                sum += c[base + i].v;
        }
        return sum;
}

/* top-p over the whole vocabulary without sorting it. Bands of
 * probability, from the top (v in [1/2, 1], then [1/16, 1/2), ...), are
 * gathered until their mass reaches top_p: every band before the last one
 * lies wholly inside the nucleus, and only the last band is searched
 * (quickselect by mass) for where the nucleus ends. A peaked distribution
 * stops after the first band, touching only the blocks that hold it. */
static int32_t sampler_sample_top_p(struct sampler *s, float *logits, float max)
{
        static const float bands[] = { 0.5f, 0x1p-4f, 0x1p-8f, 0x1p-12f, 0x1p-16f,
                                       0x1p-24f, 0x1p-32f, 0.0f };
        double z = sampler_exp_all(s, logits, max), target = (double)s->p.top_p * z;
        double before = 0.0, sum = 0.0, mass;
        float hi = INFINITY, min_p = s->p.min_p;
        struct sampler_cand *c = s->cand;
        int64_t n = 0, n_band = 0;

        for (size_t k = 0;; k++) {
                n_band = 0;
                mass = sampler_gather(s, logits, bands[k], hi, c + n, &n_band);
                if (before + mass >= target || bands[k] == 0.0f)
                        break;
                /* The whole band is in the nucleus; min-p may still drop some. */
                sum += sampler_keep_min_p(c, &n, n_band, min_p);
                before += mass;
                hi = bands[k];
        }
        int64_t keep = sampler_select_mass(c + n, n_band, target - before);
        sum += sampler_keep_min_p(c, &n, keep, min_p);
        return sampler_draw(s, c, n, sum);
}

/* min-p alone needs no sort and no normalisation over the vocabulary. */
static int32_t sampler_sample_min_p(struct sampler *s, const float *logits, float max)
{
        float inv_t = 1.0f / s->p.temperature;
        /* A slightly looser bound in logit space skips most blocks; the
         * exact test is on the probability, as in the other paths. */
        float floor = max + (logf(s->p.min_p) - 1e-3f) * s->p.temperature;
        double z = 0.0;
        int64_t n = 0;

        for (int64_t b0 = 0; b0 < s->n_vocab; b0 += SAMPLER_BLOCK) {
                int64_t end = MO_MIN(b0 + SAMPLER_BLOCK, s->n_vocab);
                if (sampler_block_max(logits + b0, end - b0) < floor)
                        continue;
                for (int64_t i = b0; i < end; i++) {
                        float v = sampler_exp1((logits[i] - max) * inv_t);
                        if (logits[i] >= floor && v >= s->p.min_p) {
                                s->cand[n++] = (struct sampler_cand){ v, (int32_t)i };
                                z += v;
                        }
                }
        }
        return sampler_draw(s, s->cand, n, z);
}

/* Temperature alone: the draw walks block sums first, then one block. */
static int32_t sampler_sample_plain(struct sampler *s, float *logits, float max)
{
        double z = sampler_exp_all(s, logits, max);
        double r = sampler_uniform(s) * z, acc = 0.0;
        int64_t b = 0, last = -1, i, end;

        /* r < z, and acc sums the same terms in the same order as z. */
        while (b < (s->n_vocab + SAMPLER_BLOCK - 1) / SAMPLER_BLOCK - 1 &&
               r >= acc + s->block_sum[b])
                acc += s->block_sum[b++];
        end = MO_MIN((b + 1) * SAMPLER_BLOCK, s->n_vocab);
        for (i = b * SAMPLER_BLOCK; i < end; i++) {
                if (logits[i] <= 0.0f)
                        continue;
                acc += logits[i];
                last = i;
                if (r < acc)
                        return (int32_t)i;
        }
        /* Rounding between the block's sum and its terms. */
        return (int32_t)(last >= 0 ? last : sampler_clean_argmax(logits, s->n_vocab));
}

int32_t sampler_sample(struct sampler *s, float *logits)
{
        int64_t best;

        /* Penalties first: they touch few logits, and NaN and inf pass
         * through them unchanged to the cleaning below. */
        if (s->penalize)
                sampler_apply_penalties(s, logits);
        best = sampler_clean_argmax(logits, s->n_vocab);
        /* A temperature so small that 1/T overflows is greedy too (and
         * would otherwise make 0 * inf = NaN of the best logit). */
        if (!(1.0f / s->p.temperature <= FLT_MAX) || logits[best] == -INFINITY)
                return (int32_t)best;
        if (sampler_cand_needed(s) > 0 && !(s->cand = cand_scratch(sampler_cand_needed(s))))
                return (int32_t)best; /* out of memory: greedy rather than nothing */
        if (sampler_top_k_on(s))
                return sampler_sample_top_k(s, logits);
        if (s->p.top_p < 1.0f)
                return sampler_sample_top_p(s, logits, logits[best]);
        if (s->p.min_p > 0.0f)
                return sampler_sample_min_p(s, logits, logits[best]);
        return sampler_sample_plain(s, logits, logits[best]);
}

/* Stop strings. buf keeps the last max_len - 1 bytes of text already seen
 * (a stop string can start there and end in new text) followed by the
 * newest text; base is the offset of buf[0] in everything fed. */
struct stop_matcher {
        char **stops;
        size_t *lens;
        size_t n, max_len;
        char *buf;
        size_t buf_len, buf_cap;
        size_t base;
        bool stopped;
        size_t stop_at;
};

void stop_free(struct stop_matcher *m)
{
        if (!m)
                return;
        for (size_t i = 0; i < m->n; i++)
                free(m->stops[i]);
        free(m->stops);
        free(m->lens);
        free(m->buf);
        free(m);
}

struct stop_matcher *stop_new(const char *const *stops, size_t n)
{
        struct stop_matcher *m = calloc(1, sizeof *m);

        if (!m)
                return NULL;
        m->stops = calloc(n ? n : 1, sizeof *m->stops);
        m->lens = calloc(n ? n : 1, sizeof *m->lens);
        if (!m->stops || !m->lens)
                goto fail;
        for (size_t i = 0; i < n; i++) {
                /* An empty stop string would match everywhere: ignored. */
                if (!stops[i] || !stops[i][0])
                        continue;
                m->stops[m->n] = strdup(stops[i]);
                if (!m->stops[m->n])
                        goto fail;
                m->lens[m->n] = strlen(stops[i]);
                m->max_len = MO_MAX(m->max_len, m->lens[m->n]);
                m->n++;
        }
        return m;
fail:
        stop_free(m);
        return NULL;
}

static bool stop_append(struct stop_matcher *m, const char *text, size_t len)
{
        if (m->buf_len + len > m->buf_cap) {
                size_t cap = MO_MAX(m->buf_cap * 2, m->buf_len + len);
                char *b = realloc(m->buf, cap ? cap : 1);
                if (!b)
                        return false;
                m->buf = b;
                m->buf_cap = cap;
        }
        if (len)
                memcpy(m->buf + m->buf_len, text, len);
        m->buf_len += len;
        return true;
}

/* The earliest-ending stop string that ends after buf[old_len] (earlier
 * ones were found by earlier feeds); of two ending together the longer. So
 * the answer does not depend on how the text was split into feeds. */
static bool stop_find(const struct stop_matcher *m, size_t old_len, size_t *start)
{
        size_t best_end = SIZE_MAX;

        for (size_t i = 0; i < m->n; i++) {
                size_t len = m->lens[i];
                size_t from = old_len + 1 > len ? old_len + 1 - len : 0;
                if (from + len > m->buf_len)
                        continue;
                const char *hit = memmem(m->buf + from, m->buf_len - from, m->stops[i], len);
                if (!hit)
                        continue;
                size_t s = (size_t)(hit - m->buf);
                if (s + len < best_end || (s + len == best_end && s < *start)) {
                        best_end = s + len;
                        *start = s;
                }
        }
        return best_end != SIZE_MAX;
}

/* Longest suffix of buf that some stop string begins with. */
static size_t stop_held(const struct stop_matcher *m)
{
        for (size_t h = MO_MIN(m->buf_len, m->max_len - 1); h > 0; h--)
                for (size_t i = 0; i < m->n; i++)
                        if (m->lens[i] > h &&
                            memcmp(m->buf + m->buf_len - h, m->stops[i], h) == 0)
                                return h;
        return 0;
}

bool stop_feed(struct stop_matcher *m, const char *text, size_t len, size_t *emit)
{
        size_t old_len = m->buf_len, start = 0, keep;

        if (m->stopped) {
                *emit = m->stop_at;
                return true;
        }
        if (m->n == 0) {
                m->base += len;
                *emit = m->base;
                return false;
        }
        if (!stop_append(m, text, len)) {
                /* Out of memory: end here rather than risk showing a stop
                 * string; what was held back stays unshown. */
                m->stopped = true;
                m->stop_at = m->base + old_len - stop_held(m);
                *emit = m->stop_at;
                return true;
        }
        if (stop_find(m, old_len, &start)) {
                m->stopped = true;
                m->stop_at = m->base + start;
                *emit = m->stop_at;
                return true;
        }
        *emit = m->base + m->buf_len - stop_held(m);
        keep = MO_MIN(m->buf_len, m->max_len - 1);
        if (keep)
                memmove(m->buf, m->buf + m->buf_len - keep, keep);
        m->base += m->buf_len - keep;
        m->buf_len = keep;
        return false;
}
