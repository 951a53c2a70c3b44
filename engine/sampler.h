/* sampler: picks the next token from logits. Greedy, temperature, top-k,
 * top-p, min-p, repetition/presence/frequency penalties, a seeded generator
 * for reproducible runs; plus stop strings and stop tokens. */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/moerr.h"

struct sampler_params {
        float temperature;       /* <= 0: greedy */
        int32_t top_k;           /* <= 0: off */
        float top_p;             /* >= 1: off */
        float min_p;             /* <= 0: off */
        float repeat_penalty;    /* 1: off (llama.cpp style: divide positive logits) */
        int32_t penalty_last_n;  /* how many recent tokens the penalties see; -1: all */
        float presence_penalty;  /* OpenAI style, 0: off */
        float frequency_penalty; /* OpenAI style, 0: off */
        uint64_t seed;
};

/* temp 1, everything else off (penalty_last_n 64, for when a penalty is
 * turned on), seed 0. */
void sampler_params_default(struct sampler_params *p);
/* Rejects NaN and out-of-range values with a message naming the field:
 * temperature [0, 100], top_p (0, 1], min_p [0, 1], repeat_penalty
 * (0, 10], presence/frequency_penalty [-2, 2], penalty_last_n
 * [-1, 2^20] (0 turns the penalties off). */
int sampler_params_check(const struct sampler_params *p, struct moerr *e);

struct sampler;

/* NULL when out of memory, n_vocab is not in 1..INT32_MAX, or p fails
 * sampler_params_check. */
struct sampler *sampler_new(const struct sampler_params *p, int64_t n_vocab);
void sampler_free(struct sampler *s);
/* Records a token as seen (prompt or generated) for the penalties. */
void sampler_accept(struct sampler *s, int32_t token);
/* Picks a token; logits (n_vocab) may be modified in place. NaN logits
 * count as -inf. The chosen token is not recorded: pass it to
 * sampler_accept. */
int32_t sampler_sample(struct sampler *s, float *logits);

/* Stop strings: tells, as text is generated, whether a stop string has
 * appeared and how much of the text is safe to emit (text that could be the
 * beginning of a stop string is held back). */
struct stop_matcher;
/* Empty (or NULL) stop strings are ignored. */
struct stop_matcher *stop_new(const char *const *stops, size_t n);
void stop_free(struct stop_matcher *m);
/* Appends text. Returns true once a stop string is complete (and on every
 * later call). *emit is set to how many bytes of everything appended so far
 * may be shown (never the stop string itself nor anything after it); it
 * never decreases. When several stop strings complete, the one ending first
 * counts, and of those ending together the longest, so the result does not
 * depend on how the text is split. */
bool stop_feed(struct stop_matcher *m, const char *text, size_t len, size_t *emit);
