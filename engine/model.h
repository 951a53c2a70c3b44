/* model: a deepseek2-architecture model bound to a mapped GGUF file.
 *
 * Reads the hyperparameters with llama.cpp's defaults and quirks, decides
 * the MLA layout (split attn_k_b/attn_v_b, or the older attn_kv_b), checks
 * every tensor's presence, type and shape against them, and hands the
 * forward pass weight views into the mapping (nothing is copied except the
 * transposed k_b that older files need for the absorbed attention). */
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "common/moerr.h"
#include "engine/moe.h"
#include "kernels/backend.h"

struct gguf;
struct tokenizer;

struct mo_hparams {
        int64_t n_vocab, n_ctx_train, n_embd, n_layer, n_dense;
        int64_t n_ff;           /* dense FFN */
        int64_t n_head;
        int64_t q_lora;         /* 0: plain attn_q */
        int64_t kv_lora;
        int64_t n_rot;          /* rope dims */
        int64_t n_nope;         /* dk - rope */
        int64_t n_v;            /* dv */
        int64_t n_expert, n_expert_used, n_expert_shared, n_ff_exp;
        int64_t n_group, n_group_used;
        enum moe_gating gating;
        bool expert_norm;
        float expert_scale;
        float rms_eps;
        float rope_base;
        bool yarn;
        float yarn_factor;      /* s */
        int64_t yarn_orig_ctx;
        float yarn_log_mul;     /* m = file value / 0.1; < 0 when absent */
        float yarn_beta_fast, yarn_beta_slow;
        bool split_mla;         /* attn_k_b/attn_v_b present */
        bool fused_gate_up;     /* ffn_gate_up_exps */
};

struct mo_layer {
        const float *attn_norm, *attn_q_a_norm, *attn_kv_a_norm, *ffn_norm; /* F32 */
        mo_weight attn_q, attn_q_a, attn_q_b;  /* attn_q when q_lora == 0 */
        mo_weight attn_kv_a_mqa;
        mo_weight *k_b;         /* n_head views: kv_lora rows x n_nope cols */
        mo_weight *v_b;         /* n_head views: n_v rows x kv_lora cols */
        mo_weight attn_output;
        /* dense layers */
        mo_weight ffn_gate, ffn_up, ffn_down;
        /* MoE layers */
        mo_weight ffn_gate_inp; /* router: n_expert rows */
        const float *exp_probs_b; /* n_expert or NULL */
        mo_weight *gate_exps, *up_exps, *down_exps; /* n_expert views each */
        mo_weight gate_shexp, up_shexp, down_shexp;
};

struct mo_model {
        struct gguf *file;
        struct mo_hparams hp;
        char *name;             /* general.name or the file's base name */
        mo_weight token_embd, output;
        const float *output_norm;
        struct mo_layer *layers;
        float kq_scale;
        float rope_freq[256];   /* n_rot/2 frequencies, YaRN applied */
        float rope_mscale;
        mo_rope rope;
        struct moe_router router_proto; /* per-layer bias filled at run time */
        uint64_t weight_bytes;  /* all tensor bytes in the file */
        struct tokenizer *tok;
        void *owned;            /* transposed k_b of older files */
};

/* Opens, validates and binds a model file; includes the tokenizer. */
int model_load(const char *path, struct mo_model **out, struct moerr *e);
/* The same over a gguf already open (takes ownership of g on success). */
int model_from_gguf(struct gguf *g, struct mo_model **out, struct moerr *e);
void model_free(struct mo_model *m);

/* RoPE frequencies (n_rot/2, YaRN ramp applied), rotation magnitude and
 * softmax scale for hyperparameters, as llama.cpp derives them. */
void model_rope_init(const struct mo_hparams *hp, float *freq, float *mscale, float *kq_scale);

/* Bytes of weights one decoded token reads (dense parts, used and shared
 * experts, output matrix): what moed-bench divides by. */
uint64_t model_weight_bytes_per_token(const struct mo_model *m);
/* Human-readable one-line summary: layers, experts, layout, types. */
void model_describe(const struct mo_model *m, char *buf, size_t cap);
