/* moe.c: the router of DeepSeek MoE layers (which experts a token visits and
 * with what weight) and the regrouping of a batch's routing by expert.
 * Follows llama.cpp's build_moe_ffn step for step; see DEEPSEEK-REFERENCE 3.6. */
#include "moe.h"

#include <assert.h>
#include <errno.h>
#include <math.h>

/* llama.cpp clamps the sum of the chosen weights to this before dividing. */
#define MOE_NORM_MIN_SUM 6.103515625e-5f

static void moe_probs(enum moe_gating gating, const float *logits, int n, float *probs)
{
        if (gating == MOE_SIGMOID) {
                for (int i = 0; i < n; i++)
                        probs[i] = 1.0f / (1.0f + expf(-logits[i]));
                return;
        }

        float max = -INFINITY;
        for (int i = 0; i < n; i++)
                if (logits[i] > max)
                        max = logits[i];
        float sum = 0.0f;
        for (int i = 0; i < n; i++) {
                probs[i] = expf(logits[i] - max);
                sum += probs[i];
        }
        for (int i = 0; i < n; i++)
                probs[i] /= sum;
}

/* The order every selection here uses: higher score first, and on equal
 * scores the lower index, so that routing never depends on the sort. */
static bool moe_before(const float *score, int a, int b)
{
        return score[a] > score[b] || (score[a] == score[b] && a < b);
}

/* Inserts candidate c into best[0..*n) (kept sorted by moe_before, at most
 * cap entries). Small k (8 of 256 for V3) makes insertion cheaper than a
 * heap or a sort. */
static void moe_insert(const float *score, int32_t *best, int *n, int cap, int32_t c)
{
        int i;

        if (*n < cap) {
                i = (*n)++;
        } else {
                if (!moe_before(score, c, best[cap - 1]))
                        return;
                i = cap - 1; /* the last one drops out */
        }
        while (i > 0 && moe_before(score, c, best[i - 1])) {
                best[i] = best[i - 1];
                i--;
        }
        best[i] = c;
}

static float moe_group_score(const float *sel, int first, int size)
{
        float top1 = -INFINITY, top2 = -INFINITY;

        for (int i = first; i < first + size; i++) {
                if (sel[i] > top1) {
                        top2 = top1;
                        top1 = sel[i];
                } else if (sel[i] > top2) {
                        top2 = sel[i];
                }
        }
        /* A group of one expert has no second value; its score is its own. */
        return size < 2 ? top1 : top1 + top2;
}

/* Sets sel to -inf for every expert outside the n_group_used best groups. */
static void moe_limit_groups(const struct moe_router *r, float *sel)
{
        float gscore[MOE_MAX_GROUPS];
        int32_t best[MOE_MAX_GROUPS];
        int n_best = 0;
        bool keep[MOE_MAX_GROUPS] = { false };
        int g_size = r->n_expert / r->n_group;

        for (int g = 0; g < r->n_group; g++) {
                gscore[g] = moe_group_score(sel, g * g_size, g_size);
                moe_insert(gscore, best, &n_best, r->n_group_used, g);
        }
        for (int i = 0; i < n_best; i++)
                keep[best[i]] = true;
        for (int g = 0; g < r->n_group; g++)
                if (!keep[g])
                        for (int i = g * g_size; i < (g + 1) * g_size; i++)
                                sel[i] = -INFINITY;
}

int moe_router_check(const struct moe_router *r, struct moerr *e)
{
        if (r->n_expert < 1)
                return moerr_set(e, -EINVAL, "router: n_expert %d < 1", r->n_expert);
        if (r->n_used < 1 || r->n_used > r->n_expert)
                return moerr_set(e, -EINVAL, "router: n_used %d outside 1..%d",
                                 r->n_used, r->n_expert);
        if (r->gating != MOE_SOFTMAX && r->gating != MOE_SIGMOID)
                return moerr_set(e, -EINVAL, "router: unknown gating %d", (int)r->gating);
        if (r->n_group <= 1)
                return 0;
        if (r->n_group > MOE_MAX_GROUPS || r->n_expert % r->n_group)
                return moerr_set(e, -EINVAL, "router: n_group %d does not divide %d experts "
                                 "(or exceeds %d)", r->n_group, r->n_expert, MOE_MAX_GROUPS);
        if (r->n_group_used < 1 || r->n_group_used > r->n_group)
                return moerr_set(e, -EINVAL, "router: n_group_used %d outside 1..%d",
                                 r->n_group_used, r->n_group);
        /* Fewer kept experts than n_used would route to masked experts. */
        if ((int64_t)r->n_group_used * (r->n_expert / r->n_group) < r->n_used)
                return moerr_set(e, -EINVAL, "router: %d kept groups hold fewer than %d experts",
                                 r->n_group_used, r->n_used);
        return 0;
}

void moe_route(const struct moe_router *r, const float *logits, int32_t *ids, float *w,
               float *scratch)
{
        float *probs = scratch, *sel = scratch + r->n_expert;
        int n_best = 0;

        assert(r->n_used >= 1 && r->n_used <= r->n_expert);
        moe_probs(r->gating, logits, r->n_expert, probs);
        for (int i = 0; i < r->n_expert; i++) {
                sel[i] = r->bias ? probs[i] + r->bias[i] : probs[i];
                /* A NaN would make the order inconsistent; it ranks last. */
                if (isnan(sel[i]))
                        sel[i] = -INFINITY;
        }
        if (r->n_group > 1)
                moe_limit_groups(r, sel);
        for (int i = 0; i < r->n_expert; i++)
                moe_insert(sel, ids, &n_best, r->n_used, i);

        float sum = 0.0f;
        for (int k = 0; k < r->n_used; k++) {
                w[k] = probs[ids[k]];
                sum += w[k];
        }
        if (r->norm)
                for (int k = 0; k < r->n_used; k++)
                        w[k] /= fmaxf(sum, MOE_NORM_MIN_SUM);
        if (r->scale != 0.0f && r->scale != 1.0f)
                for (int k = 0; k < r->n_used; k++)
                        w[k] *= r->scale;
}

void moe_group_by_expert(int n_expert, int n_used, int64_t n, const int32_t *ids,
                         int64_t *start, int32_t *order)
{
        int64_t n_pairs = n * n_used;

        for (int x = 0; x <= n_expert; x++)
                start[x] = 0;
        for (int64_t p = 0; p < n_pairs; p++) {
                assert(ids[p] >= 0 && ids[p] < n_expert);
                start[ids[p] + 1]++;
        }
        for (int x = 0; x < n_expert; x++)
                start[x + 1] += start[x];
        /* start[x] serves as expert x's cursor: after the pass it has moved
         * to where x + 1 begins, so one shift restores the starts without a
         * second array. Scanning pairs in order keeps each expert's tokens
         * in token order (a stable sort). */
        for (int64_t p = 0; p < n_pairs; p++)
                order[start[ids[p]]++] = (int32_t)p;
        for (int x = n_expert; x > 0; x--)
                start[x] = start[x - 1];
        start[0] = 0;
}
