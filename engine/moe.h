/* moe: expert routing of DeepSeek MoE layers, exactly as llama.cpp's
 * build_moe_ffn does it (MODEL-SPEC.md section 4): softmax or sigmoid
 * scores, an optional selection bias, group-limited top-k, optional
 * normalisation of the chosen weights, and the routed scaling factor.
 * Pure functions on host memory: hand-checked by tests. */
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "common/moerr.h"

/* Group-limited routing keeps its group scores on the stack. */
#define MOE_MAX_GROUPS 256

enum moe_gating { MOE_SOFTMAX = 1, MOE_SIGMOID = 2 };

struct moe_router {
        int n_expert;      /* X */
        int n_used;        /* K */
        enum moe_gating gating;
        const float *bias; /* X selection biases, or NULL */
        int n_group;       /* G; <= 1: no grouping */
        int n_group_used;  /* Gu */
        bool norm;         /* normalise the chosen weights */
        float scale;       /* applied when not 0 and not 1 */
};

/* Rejects a router moe_route cannot follow: counts out of range, groups
 * that do not divide the experts, kept groups too small for n_used. */
int moe_router_check(const struct moe_router *r, struct moerr *e);

/* For one token: from the router logits (n_expert) choose n_used experts.
 * ids[k] are the experts (in descending order of selection score), w[k]
 * their weights. Equal scores rank the lower expert id first. scratch holds
 * 2*n_expert floats. A NaN score ranks below every other. */
void moe_route(const struct moe_router *r, const float *logits, int32_t *ids, float *w,
               float *scratch);

/* Groups the routing of n tokens by expert, so each expert runs once over
 * the tokens sent to it: for expert x, its pairs are order[start[x] ..
 * start[x+1]) (indices into the n*n_used (token, slot) pairs, token =
 * pair / n_used). start has n_expert+1 entries, order n*n_used. */
void moe_group_by_expert(int n_expert, int n_used, int64_t n, const int32_t *ids,
                         int64_t *start, int32_t *order);
