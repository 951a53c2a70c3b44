/* test-gguf: engine/gguf.c and engine/gguf-write.c. Files are built by the
 * writer; bad files are valid ones with bytes patched, so each rejection
 * test breaks exactly one rule and checks that the message names it.
 * `test-gguf --write-seeds DIR` writes the fuzzer's seed corpus instead. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/cleanup.h"
#include "common/mapguard.h"
#include "engine/gguf-write.h"
#include "engine/gguf.h"
#include "kernels/quant.h"
#include "testutil.h"

struct image {
        uint8_t *p;
        size_t n;
};

static struct image write_mem(struct gguf_writer *w)
{
        struct image im = { 0 };
        struct moerr e = { { 0 } };
        void *p;
        int r;

        r = gguf_writer_write_mem(w, &p, &im.n, &e);
        if (r < 0)
                print_error("write_mem: %s\n", e.msg);
        assert_int_equal(r, 0);
        im.p = p;
        gguf_writer_free(w);
        return im;
}

static struct gguf *open_ok(const struct image *im)
{
        struct gguf *g = NULL;
        struct moerr e = { { 0 } };
        int r = gguf_open_buffer(im->p, im->n, &g, &e);

        if (r < 0)
                print_error("gguf_open_buffer: %s\n", e.msg);
        assert_int_equal(r, 0);
        assert_non_null(g);
        return g;
}

/* Opens a copy of exactly n bytes, so that a read past it trips ASan. */
static void expect_reject_(const void *buf, size_t n, const char *needle, const char *file, int line)
{
        void *copy = malloc(n ? n : 1);
        struct gguf *g = (struct gguf *)1;
        struct moerr e = { { 0 } };
        int r;

        assert_non_null(copy);
        memcpy(copy, buf, n);
        r = gguf_open_buffer(copy, n, &g, &e);
        free(copy);
        if (r >= 0 || g || !strstr(e.msg, needle)) {
                print_error("%s:%d: expected rejection mentioning \"%s\"; got %d, \"%s\"\n",
                            file, line, needle, r, e.msg);
                gguf_close(r >= 0 ? g : NULL);
                _fail(file, line);
        }
        assert_int_equal(r, -EINVAL);
}
#define expect_reject(im, needle) expect_reject_((im)->p, (im)->n, needle, __FILE__, __LINE__)

/* tu_tmpdir()/name in the caller's buffer (tu_path's strings would show
 * up as leaks in the sanitizer build). */
#define TMP_PATH(name) tmp_path((char[4096]){ 0 }, (name))
static const char *tmp_path(char *buf, const char *name)
{
        snprintf(buf, 4096, "%s/%s", tu_tmpdir(), name);
        return buf;
}

static void put_u32(uint8_t *p, uint32_t v) { memcpy(p, &v, sizeof v); }
static void put_u64(uint8_t *p, uint64_t v) { memcpy(p, &v, sizeof v); }
static uint64_t get_u64(const uint8_t *p) { uint64_t v; memcpy(&v, p, sizeof v); return v; }

/* The u64 length prefix of a name in the file (key or tensor name). */
static uint8_t *find_name(const struct image *im, const char *name)
{
        size_t len = strlen(name);
        uint8_t needle[128];
        uint8_t *p;

        put_u64(needle, len);
        memcpy(needle + 8, name, len);
        p = memmem(im->p, im->n, needle, 8 + len);
        assert_non_null(p);
        return p;
}

/* The value type id of a key (its value follows it). */
static uint8_t *kv_type_at(const struct image *im, const char *key)
{
        return find_name(im, key) + 8 + strlen(key);
}

struct tinfo {
        uint8_t *n_dims, *ne, *type, *offset;
};

static struct tinfo tensor_info_at(const struct image *im, const char *name)
{
        struct tinfo t;
        uint32_t n_dims;

        t.n_dims = find_name(im, name) + 8 + strlen(name);
        memcpy(&n_dims, t.n_dims, sizeof n_dims);
        t.ne = t.n_dims + 4;
        t.type = t.ne + 8 * n_dims;
        t.offset = t.type + 4;
        return t;
}

static void fill_pattern(void *dst, size_t n, uint32_t seed)
{
        uint8_t *p = dst;

        for (size_t i = 0; i < n; i++) {
                seed = seed * 1103515245u + 12345u;
                p[i] = (uint8_t)(seed >> 16);
        }
}

/* A small valid file: a few keys of each kind and three tensors, the last
 * exactly one alignment unit long, so that the file has no trailing
 * padding and every strict prefix of it cuts into tensor data. */
static struct gguf_writer *small_writer(void)
{
        static const char *const toks[] = { "a", "bb", "ccc" };
        static const int32_t ids[] = { 1, -2, 3 };
        struct gguf_writer *w = gguf_writer_new();
        uint8_t q8[2 * 34];
        float fa[16], fc[8];

        assert_non_null(w);
        gguf_w_str(w, "general.architecture", "deepseek2");
        gguf_w_u32(w, "test.count", 7);
        gguf_w_bool(w, "test.flag", true);
        gguf_w_arr_str(w, "test.tokens", toks, NULL, 3);
        gguf_w_arr(w, "test.ids", GGUF_I32, ids, 3);
        gguf_w_u32(w, "test.aaa", 1);
        gguf_w_u32(w, "test.aab", 2);
        tu_randf(fa, 16, 1);
        tu_randf(fc, 8, 2);
        fill_pattern(q8, sizeof q8, 3);
        assert_int_equal(gguf_w_tensor(w, "t.a", MO_TYPE_F32, 2, (int64_t[]){ 8, 2 }, fa), 0);
        assert_int_equal(gguf_w_tensor(w, "t.b", MO_TYPE_Q8_0, 1, (int64_t[]){ 64 }, q8), 0);
        assert_int_equal(gguf_w_tensor(w, "t.c", MO_TYPE_F32, 1, (int64_t[]){ 8 }, fc), 0);
        return w;
}

static struct image small_image(void)
{
        return write_mem(small_writer());
}

/* --- round trips --- */

static void gguf_roundtrips_every_scalar_type(void **state)
{
        struct gguf_writer *w = gguf_writer_new();
        uint8_t u8 = 200; int8_t i8 = -100; uint16_t u16 = 60000; int16_t i16 = -30000;
        int64_t i64 = -5000000000LL; double f64 = 3.25; uint64_t u64 = UINT64_MAX;
        struct moerr e = { { 0 } };
        struct image im;
        struct gguf *g;
        uint32_t vu32; int32_t vi32; uint64_t vu64; float vf; bool vb;
        const char *s; size_t len;

        gguf_w_scalar(w, "v.u8", GGUF_U8, &u8);
        gguf_w_scalar(w, "v.i8", GGUF_I8, &i8);
        gguf_w_scalar(w, "v.u16", GGUF_U16, &u16);
        gguf_w_scalar(w, "v.i16", GGUF_I16, &i16);
        gguf_w_u32(w, "v.u32", 4000000000u);
        gguf_w_i32(w, "v.i32", -7);
        gguf_w_f32(w, "v.f32", 1.5f);
        gguf_w_bool(w, "v.bool", true);
        gguf_w_str(w, "v.str", "héllo");
        gguf_w_u64(w, "v.u64", u64);
        gguf_w_scalar(w, "v.i64", GGUF_I64, &i64);
        gguf_w_scalar(w, "v.f64", GGUF_F64, &f64);
        gguf_w_u32(w, "v.later", 1);
        gguf_w_u32(w, "v.later", 2); /* set twice: keeps the last value, one entry */
        im = write_mem(w);
        g = open_ok(&im);

        assert_int_equal(gguf_version(g), 3);
        assert_int_equal(gguf_n_kv(g), 13);
        assert_int_equal(gguf_n_tensors(g), 0);
        static const char *const keys[] = { "v.u8", "v.i8", "v.u16", "v.i16", "v.u32", "v.i32",
                                             "v.f32", "v.bool", "v.str", "v.u64", "v.i64", "v.f64" };
        for (int t = 0; t < 12; t++) { /* insertion order, and each type as written */
                int64_t i = gguf_find_key(g, keys[t]);

                assert_int_equal(i, t);
                assert_string_equal(gguf_key(g, i), keys[t]);
                assert_int_equal(gguf_kv_type(g, i), t < 9 ? t : t + 1);
        }
        assert_int_equal(gguf_get_u32(g, "v.u8", &vu32, &e), 0);
        assert_int_equal(vu32, 200);
        assert_int_equal(gguf_get_i32(g, "v.i8", &vi32, &e), 0);
        assert_int_equal(vi32, -100);
        assert_int_equal(gguf_get_u32(g, "v.u16", &vu32, &e), 0);
        assert_int_equal(vu32, 60000);
        assert_int_equal(gguf_get_i32(g, "v.i16", &vi32, &e), 0);
        assert_int_equal(vi32, -30000);
        assert_int_equal(gguf_get_u32(g, "v.u32", &vu32, &e), 0);
        assert_int_equal(vu32, 4000000000u);
        assert_int_equal(gguf_get_u64(g, "v.u32", &vu64, &e), 0);
        assert_int_equal(vu64, 4000000000u);
        assert_int_equal(gguf_get_i32(g, "v.i32", &vi32, &e), 0);
        assert_int_equal(vi32, -7);
        assert_int_equal(gguf_get_f32(g, "v.f32", &vf, &e), 0);
        assert_true(vf == 1.5f);
        assert_int_equal(gguf_get_bool(g, "v.bool", &vb, &e), 0);
        assert_true(vb);
        assert_int_equal(gguf_get_str(g, "v.str", &s, &len, &e), 0);
        assert_int_equal(len, strlen("héllo"));
        assert_memory_equal(s, "héllo", len);
        assert_int_equal(gguf_get_u64(g, "v.u64", &vu64, &e), 0);
        assert_true(vu64 == UINT64_MAX);
        assert_int_equal(gguf_get_u64(g, "v.u8", &vu64, &e), 0);
        assert_int_equal(vu64, 200);
        assert_int_equal(gguf_get_f32(g, "v.f64", &vf, &e), 0);
        assert_true(vf == 3.25f);
        assert_int_equal(gguf_get_u32(g, "v.later", &vu32, &e), 0);
        assert_int_equal(vu32, 2);
        assert_int_equal(gguf_find_key(g, "v.u"), -1); /* prefix of a key is not a key */
        assert_null(gguf_key(g, 13));
        assert_int_equal(gguf_kv_type(g, -1), GGUF_VTYPE_COUNT);
        gguf_close(g);
        free(im.p);
}

static void gguf_roundtrips_arrays(void **state)
{
        static const uint8_t a_u8[] = { 0, 255, 7 };
        static const int16_t a_i16[] = { -32768, 32767 };
        static const uint64_t a_u64[] = { 0, UINT64_MAX / 2 };
        static const int64_t a_i64[] = { INT64_MIN, -1, INT64_MAX };
        static const float a_f32[] = { 0.5f, -2.0f, 1e30f };
        static const double a_f64[] = { 1e300, -0.125 };
        static const uint8_t a_bool[] = { 1, 0, 1, 1 };
        static const char *const strs[] = { "", "with\0nul", "tok" };
        static const size_t lens[] = { 0, 8, 3 };
        struct gguf_writer *w = gguf_writer_new();
        uint8_t nested[12 + 2 * (12 + 8)];
        struct moerr e = { { 0 } };
        enum gguf_vtype et;
        uint64_t count;
        struct image im;
        struct gguf *g;
        const char *s;
        size_t len;
        int64_t k;

        /* An array of two arrays of two u32: the spec allows it. */
        put_u32(nested, GGUF_ARRAY);
        put_u64(nested + 4, 2);
        for (int i = 0; i < 2; i++) {
                uint8_t *p = nested + 12 + i * 20;

                put_u32(p, GGUF_U32);
                put_u64(p + 4, 2);
                put_u32(p + 12, 10 * i);
                put_u32(p + 16, 10 * i + 1);
        }
        gguf_w_arr(w, "a.u8", GGUF_U8, a_u8, 3);
        gguf_w_arr(w, "a.i16", GGUF_I16, a_i16, 2);
        gguf_w_arr(w, "a.u64", GGUF_U64, a_u64, 2);
        gguf_w_arr(w, "a.i64", GGUF_I64, a_i64, 3);
        gguf_w_arr(w, "a.f32", GGUF_F32, a_f32, 3);
        gguf_w_arr(w, "a.f64", GGUF_F64, a_f64, 2);
        gguf_w_arr(w, "a.bool", GGUF_BOOL, a_bool, 4);
        gguf_w_arr_str(w, "a.str", strs, lens, 3);
        gguf_w_arr(w, "a.empty", GGUF_I32, NULL, 0);
        gguf_w_raw(w, "a.nested", GGUF_ARRAY, nested, sizeof nested);
        im = write_mem(w);
        g = open_ok(&im);

        assert_int_equal(gguf_get_arr(g, "a.u8", &et, &count, &e), 0);
        assert_int_equal(et, GGUF_U8);
        assert_int_equal(count, 3);
        k = gguf_find_key(g, "a.u8");
        assert_int_equal(gguf_kv_type(g, k), GGUF_ARRAY);
        for (int i = 0; i < 3; i++)
                assert_int_equal(gguf_arr_int(g, k, i), a_u8[i]);
        k = gguf_find_key(g, "a.i16");
        assert_int_equal(gguf_arr_int(g, k, 0), -32768);
        assert_int_equal(gguf_arr_int(g, k, 1), 32767);
        k = gguf_find_key(g, "a.u64");
        assert_true(gguf_arr_int(g, k, 1) == (int64_t)(UINT64_MAX / 2));
        k = gguf_find_key(g, "a.i64");
        for (int i = 0; i < 3; i++)
                assert_true(gguf_arr_int(g, k, i) == a_i64[i]);
        k = gguf_find_key(g, "a.f32");
        for (int i = 0; i < 3; i++)
                assert_true(gguf_arr_float(g, k, i) == (double)a_f32[i]);
        assert_true(isnan(gguf_arr_float(g, k, 3))); /* out of bounds */
        assert_int_equal(gguf_arr_int(g, k, 0), 0);   /* wrong element type */
        k = gguf_find_key(g, "a.f64");
        assert_true(gguf_arr_float(g, k, 0) == 1e300);
        assert_true(gguf_arr_float(g, k, 1) == -0.125);
        k = gguf_find_key(g, "a.bool");
        assert_int_equal(gguf_get_arr(g, "a.bool", &et, &count, &e), 0);
        assert_int_equal(et, GGUF_BOOL);
        for (int i = 0; i < 4; i++)
                assert_int_equal(gguf_arr_int(g, k, i), a_bool[i]);
        k = gguf_find_key(g, "a.str");
        assert_int_equal(gguf_get_arr(g, "a.str", &et, &count, &e), 0);
        assert_int_equal(et, GGUF_STRING);
        assert_int_equal(count, 3);
        for (int i = 2; i >= 0; i--) { /* any order */
                s = gguf_arr_str(g, k, i, &len);
                assert_non_null(s);
                assert_int_equal(len, lens[i]);
                assert_memory_equal(s, strs[i], len);
        }
        assert_null(gguf_arr_str(g, k, 3, &len));
        assert_null(gguf_arr_str(g, gguf_find_key(g, "a.u8"), 0, &len));
        assert_null(gguf_arr_str(g, 99, 0, &len));
        assert_int_equal(gguf_get_arr(g, "a.empty", &et, &count, &e), 0);
        assert_int_equal(et, GGUF_I32);
        assert_int_equal(count, 0);
        assert_int_equal(gguf_get_arr(g, "a.nested", &et, &count, &e), 0);
        assert_int_equal(et, GGUF_ARRAY);
        assert_int_equal(count, 2);
        k = gguf_find_key(g, "a.nested");
        assert_int_equal(gguf_arr_int(g, k, 0), 0);
        assert_null(gguf_arr_str(g, k, 0, &len));
        gguf_close(g);
        free(im.p);
}

static void gguf_indexes_a_large_string_array(void **state)
{
        enum { N = 129280 };
        struct gguf_writer *w = gguf_writer_new();
        char (*buf)[16] = malloc(N * sizeof *buf);
        const char **strs = malloc(N * sizeof *strs);
        struct image im;
        struct gguf *g;
        size_t len;
        int64_t k;

        assert_non_null(buf);
        assert_non_null(strs);
        for (int i = 0; i < N; i++) {
                snprintf(buf[i], sizeof buf[i], "tok%d", i * 7);
                strs[i] = buf[i];
        }
        gguf_w_arr_str(w, "tokenizer.ggml.tokens", strs, NULL, N);
        im = write_mem(w);
        g = open_ok(&im);
        k = gguf_find_key(g, "tokenizer.ggml.tokens");
        assert_true(k >= 0);
        for (uint64_t i = 0; i < N; i += 1 + i / 3) {
                const char *s = gguf_arr_str(g, k, i, &len);

                assert_non_null(s);
                assert_int_equal(len, strlen(buf[i]));
                assert_memory_equal(s, buf[i], len);
        }
        assert_non_null(gguf_arr_str(g, k, N - 1, &len));
        assert_memory_equal(gguf_arr_str(g, k, N - 1, &len), buf[N - 1], len);
        gguf_close(g);
        free(im.p);
        free(buf);
        free(strs);
}

struct fill_ctx {
        int calls;
};

static int fill_by_name(void *ctx, const char *name, int type, const int64_t ne[4], void *dst,
                        size_t nbytes)
{
        struct fill_ctx *c = ctx;

        c->calls++;
        assert_int_equal(nbytes, mo_row_bytes(type, ne[0]) * ne[1] * ne[2] * ne[3]);
        fill_pattern(dst, nbytes, (uint32_t)strlen(name) * 31u + (uint32_t)name[0]);
        return 0;
}

static int fill_fails(void *ctx, const char *name, int type, const int64_t ne[4], void *dst,
                      size_t nbytes)
{
        return -EIO;
}

struct tcase {
        const char *name;
        int type;
        int n_dims;
        int64_t ne[4];
};

static const struct tcase tcases[] = {
        { "w.f32", MO_TYPE_F32, 1, { 5 } },
        { "w.f16", MO_TYPE_F16, 2, { 3, 7 } },
        { "w.bf16", MO_TYPE_BF16, 3, { 2, 3, 4 } },
        { "w.q8_0", MO_TYPE_Q8_0, 2, { 64, 3 } },
        { "w.q4_0", MO_TYPE_Q4_0, 4, { 32, 2, 2, 2 } },
        { "w.q4_k", MO_TYPE_Q4_K, 2, { 512, 2 } },
        { "w.q5_k", MO_TYPE_Q5_K, 1, { 256 } },
        { "w.q6_k", MO_TYPE_Q6_K, 3, { 256, 1, 3 } },
};

static size_t tcase_bytes(const struct tcase *c)
{
        size_t n = mo_row_bytes(c->type, c->ne[0]);

        for (int d = 1; d < c->n_dims; d++)
                n *= (size_t)c->ne[d];
        return n;
}

/* Writes tcases (odd ones through the fill callback), reads them back. */
static void check_tensors_roundtrip(uint32_t version, uint32_t alignment, bool to_file)
{
        struct gguf_writer *w = gguf_writer_new();
        struct fill_ctx fc = { 0 };
        struct moerr e = { { 0 } };
        uint8_t *data[ARRAY_SIZE(tcases)];
        struct image im = { 0 };
        struct gguf *g;
        uint32_t a;

        if (version)
                gguf_writer_set_version(w, version);
        if (alignment)
                gguf_writer_set_alignment(w, alignment);
        gguf_w_str(w, "general.name", "roundtrip");
        for (size_t i = 0; i < ARRAY_SIZE(tcases); i++) {
                const struct tcase *c = &tcases[i];
                size_t n = tcase_bytes(c);

                data[i] = malloc(n);
                assert_non_null(data[i]);
                if (i % 2) {
                        fill_pattern(data[i], n, (uint32_t)strlen(c->name) * 31u + (uint32_t)c->name[0]);
                        assert_int_equal(gguf_w_tensor_fill(w, c->name, c->type, c->n_dims, c->ne,
                                                            fill_by_name, &fc), 0);
                } else {
                        fill_pattern(data[i], n, (uint32_t)i);
                        assert_int_equal(gguf_w_tensor(w, c->name, c->type, c->n_dims, c->ne, data[i]), 0);
                }
        }
        if (to_file) {
                char name[64];
                const char *path;
                int r;

                snprintf(name, sizeof name, "rt-v%u-a%u.gguf", version, alignment);
                path = TMP_PATH(name);
                r = gguf_writer_write(w, path, &e);
                if (r < 0)
                        print_error("%s\n", e.msg);
                assert_int_equal(r, 0);
                gguf_writer_free(w);
                r = gguf_open(path, &g, &e);
                if (r < 0)
                        print_error("%s\n", e.msg);
                assert_int_equal(r, 0);
        } else {
                im = write_mem(w);
                g = open_ok(&im);
        }
        assert_int_equal(fc.calls, ARRAY_SIZE(tcases) / 2);
        assert_int_equal(gguf_version(g), version ? version : 3);
        a = alignment ? alignment : GGUF_DEFAULT_ALIGNMENT;
        assert_int_equal(gguf_alignment(g), a);
        assert_int_equal(gguf_data_offset(g) % a, 0);
        assert_int_equal(gguf_n_tensors(g), ARRAY_SIZE(tcases));
        for (size_t i = 0; i < ARRAY_SIZE(tcases); i++) {
                const struct tcase *c = &tcases[i];
                const struct gguf_tensor *t = gguf_tensor_at(g, (int64_t)i);

                assert_non_null(t);
                assert_ptr_equal(gguf_find_tensor(g, c->name), t);
                assert_string_equal(t->name, c->name);
                assert_int_equal(t->type, c->type);
                assert_int_equal(t->n_dims, c->n_dims);
                for (int d = 0; d < 4; d++)
                        assert_int_equal(t->ne[d], d < c->n_dims ? c->ne[d] : 1);
                assert_int_equal(t->nbytes, tcase_bytes(c));
                assert_int_equal(t->offset % a, 0);
                assert_ptr_equal(t->data, (const uint8_t *)gguf_file_data(g) + gguf_data_offset(g) + t->offset);
                assert_memory_equal(t->data, data[i], t->nbytes);
                free(data[i]);
        }
        assert_null(gguf_tensor_at(g, (int64_t)ARRAY_SIZE(tcases)));
        assert_null(gguf_find_tensor(g, "w.missing"));
        if (alignment) {
                assert_int_equal(gguf_get_u32(g, "general.alignment", &a, &e), 0);
                assert_int_equal(a, alignment);
        }
        gguf_close(g);
        free(im.p);
}

static void gguf_roundtrips_tensors_of_several_types(void **state)
{
        check_tensors_roundtrip(0, 0, false);
}

static void gguf_roundtrips_v2_and_v3_in_memory_with_alignments(void **state)
{
        check_tensors_roundtrip(2, 0, false);
        check_tensors_roundtrip(3, 64, false);
        check_tensors_roundtrip(2, 8, false);
        check_tensors_roundtrip(3, 1, false);
}

static void gguf_roundtrips_v2_and_v3_through_files(void **state)
{
        DIR *d;
        struct dirent *de;

        check_tensors_roundtrip(3, 0, true);
        check_tensors_roundtrip(2, 128, true);
        check_tensors_roundtrip(3, 16, true);
        d = opendir(tu_tmpdir());
        assert_non_null(d);
        while ((de = readdir(d)))
                assert_null(strstr(de->d_name, ".tmp-")); /* no temporary left behind */
        closedir(d);
}

static void gguf_reads_the_small_file(void **state)
{
        struct image im = small_image();
        struct gguf *g = open_ok(&im);
        struct moerr e = { { 0 } };
        const struct gguf_tensor *t;
        const char *s;
        size_t len;
        uint32_t v;
        bool b;

        assert_int_equal(gguf_get_str(g, "general.architecture", &s, &len, &e), 0);
        assert_int_equal(len, 9);
        assert_memory_equal(s, "deepseek2", 9);
        assert_int_equal(gguf_get_u32(g, "test.count", &v, &e), 0);
        assert_int_equal(v, 7);
        assert_int_equal(gguf_get_bool(g, "test.flag", &b, &e), 0);
        assert_true(b);
        assert_int_equal(gguf_arr_int(g, gguf_find_key(g, "test.ids"), 1), -2);
        t = gguf_find_tensor(g, "t.c");
        assert_non_null(t);
        /* The last tensor ends the file: truncation tests rely on it. */
        assert_int_equal(gguf_data_offset(g) + t->offset + t->nbytes, im.n);
        gguf_close(g);
        free(im.p);
}

static void gguf_getters_report_type_mismatch_and_absence(void **state)
{
        struct gguf_writer *w = gguf_writer_new();
        struct moerr e = { { 0 } };
        enum gguf_vtype et;
        struct image im;
        struct gguf *g;
        const char *s;
        uint64_t count, u64;
        size_t len;
        uint32_t u32;
        int32_t i32;
        float f;
        bool b;

        gguf_w_str(w, "deepseek2.block_count", "sixty-one");
        gguf_w_i32(w, "x.neg", -1);
        gguf_w_u64(w, "x.big", 1ull << 40);
        gguf_w_u32(w, "x.u32max", UINT32_MAX);
        gguf_w_u32(w, "x.one", 1);
        gguf_w_scalar(w, "x.hugef64", GGUF_F64, &(double){ 1e300 });
        im = write_mem(w);
        g = open_ok(&im);

        assert_int_equal(gguf_get_u32(g, "deepseek2.block_count", &u32, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "key 'deepseek2.block_count' has type string, expected an integer"));
        assert_int_equal(gguf_get_u32(g, "deepseek2.missing", &u32, &e), -ENOENT);
        assert_non_null(strstr(e.msg, "deepseek2.missing"));
        assert_non_null(strstr(e.msg, "not found"));
        assert_int_equal(gguf_get_u64(g, "nope", &u64, &e), -ENOENT);
        assert_int_equal(gguf_get_i32(g, "nope", &i32, &e), -ENOENT);
        assert_int_equal(gguf_get_f32(g, "nope", &f, &e), -ENOENT);
        assert_int_equal(gguf_get_bool(g, "nope", &b, &e), -ENOENT);
        assert_int_equal(gguf_get_str(g, "nope", &s, &len, &e), -ENOENT);
        assert_int_equal(gguf_get_arr(g, "nope", &et, &count, &e), -ENOENT);

        assert_int_equal(gguf_get_u32(g, "x.neg", &u32, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "-1 does not fit in u32"));
        assert_int_equal(gguf_get_u64(g, "x.neg", &u64, &e), -EINVAL);
        assert_int_equal(gguf_get_u32(g, "x.big", &u32, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "1099511627776 does not fit in u32"));
        assert_int_equal(gguf_get_i32(g, "x.u32max", &i32, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "does not fit in i32"));
        assert_int_equal(gguf_get_i32(g, "x.neg", &i32, &e), 0);
        assert_int_equal(i32, -1);
        assert_int_equal(gguf_get_f32(g, "x.one", &f, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "has type u32, expected a float"));
        assert_int_equal(gguf_get_f32(g, "x.hugef64", &f, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "does not fit in f32"));
        assert_int_equal(gguf_get_bool(g, "x.one", &b, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "expected bool"));
        assert_int_equal(gguf_get_str(g, "x.one", &s, &len, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "expected string"));
        assert_int_equal(gguf_get_arr(g, "x.one", &et, &count, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "expected array"));
        gguf_close(g);
        free(im.p);
}

/* --- rejections --- */

static void gguf_rejects_wrong_magic(void **state)
{
        struct image im = small_image();

        im.p[0] = 'L';
        expect_reject(&im, "not a GGUF file");
        free(im.p);
}

static void gguf_rejects_versions_0_1_and_4(void **state)
{
        struct image im = small_image();

        put_u32(im.p + 4, 0);
        expect_reject(&im, "version 0");
        put_u32(im.p + 4, 1);
        expect_reject(&im, "version 1 is obsolete");
        put_u32(im.p + 4, 4);
        expect_reject(&im, "version 4 is newer");
        put_u32(im.p + 4, 2); /* 2 reads like 3 */
        gguf_close(open_ok(&im));
        free(im.p);
}

static void gguf_rejects_byte_swapped_file(void **state)
{
        struct image im = small_image();

        put_u32(im.p + 4, 0x03000000u);
        expect_reject(&im, "byte-swapped");
        free(im.p);
}

static void gguf_rejects_every_truncation(void **state)
{
        struct image im = small_image();

        for (size_t n = 0; n < im.n; n++) {
                struct gguf *g = (struct gguf *)1;
                struct moerr e = { { 0 } };
                void *copy = malloc(n ? n : 1);
                int r;

                assert_non_null(copy);
                memcpy(copy, im.p, n);
                r = gguf_open_buffer(copy, n, &g, &e);
                if (r != -EINVAL || g || !e.msg[0])
                        fail_msg("prefix of %zu/%zu bytes: r=%d msg='%s'", n, im.n, r, e.msg);
                free(copy);
        }
        free(im.p);
}

static void gguf_rejects_absurd_counts(void **state)
{
        struct image im = small_image();
        uint8_t saved[8];

        memcpy(saved, im.p + 16, 8);
        put_u64(im.p + 16, 1ull << 60);
        expect_reject(&im, "metadata count 1152921504606846976 cannot fit");
        memcpy(im.p + 16, saved, 8);
        put_u64(im.p + 8, 1ull << 60);
        expect_reject(&im, "tensor count 1152921504606846976 cannot fit");
        put_u64(im.p + 8, UINT64_MAX);
        expect_reject(&im, "cannot fit");
        free(im.p);
}

static void gguf_rejects_absurd_string_lengths(void **state)
{
        struct image im = small_image();
        uint8_t *key = find_name(&im, "general.architecture");
        uint8_t *val = kv_type_at(&im, "general.architecture") + 4;

        put_u64(key, 1ull << 60);
        expect_reject(&im, "key length 1152921504606846976 exceeds");
        put_u64(key, strlen("general.architecture"));
        put_u64(val, UINT64_MAX);
        expect_reject(&im, "key 'general.architecture': string length 18446744073709551615 exceeds");
        free(im.p);
}

static void gguf_rejects_absurd_array_count(void **state)
{
        struct image im = small_image();
        uint8_t *count = kv_type_at(&im, "test.tokens") + 4 + 4;

        assert_int_equal(get_u64(count), 3);
        put_u64(count, 1ull << 60);
        expect_reject(&im, "key 'test.tokens': array of 1152921504606846976 string elements cannot fit");
        put_u64(count, 3);
        count = kv_type_at(&im, "test.ids") + 4 + 4;
        assert_int_equal(get_u64(count), 3);
        put_u64(count, 1ull << 62);
        expect_reject(&im, "key 'test.ids': array of 4611686018427387904 i32 elements cannot fit");
        free(im.p);
}

static void gguf_rejects_string_element_past_end(void **state)
{
        struct image im = small_image();
        uint8_t *first = kv_type_at(&im, "test.tokens") + 4 + 4 + 8;

        assert_int_equal(get_u64(first), 1);
        put_u64(first + 8 + 1, 1ull << 40); /* element 1's length */
        expect_reject(&im, "key 'test.tokens'[1]: string length 1099511627776 exceeds");
        free(im.p);
}

static void gguf_rejects_unknown_value_type(void **state)
{
        struct image im = small_image();
        uint8_t *type = kv_type_at(&im, "test.count");

        put_u32(type, 13);
        expect_reject(&im, "key 'test.count': unknown value type 13");
        put_u32(type, GGUF_U32);
        type = kv_type_at(&im, "test.ids") + 4;
        put_u32(type, 0xffffffffu);
        expect_reject(&im, "key 'test.ids': unknown array element type 4294967295");
        free(im.p);
}

static void gguf_rejects_bad_bool(void **state)
{
        static const uint8_t bools[] = { 0, 1, 1 };
        struct gguf_writer *w = small_writer();
        struct image im;

        gguf_w_arr(w, "test.bools", GGUF_BOOL, bools, 3);
        im = write_mem(w);
        *(kv_type_at(&im, "test.flag") + 4) = 2;
        expect_reject(&im, "key 'test.flag': bool value 2");
        *(kv_type_at(&im, "test.flag") + 4) = 1;
        *(kv_type_at(&im, "test.bools") + 4 + 4 + 8 + 2) = 0xff;
        expect_reject(&im, "key 'test.bools'[2]: bool value 255");
        free(im.p);
}

static void gguf_rejects_duplicate_key(void **state)
{
        struct image im = small_image();

        find_name(&im, "test.aab")[8 + 7] = 'a';
        expect_reject(&im, "duplicate key 'test.aaa'");
        free(im.p);
}

static void gguf_rejects_duplicate_tensor(void **state)
{
        struct image im = small_image();

        find_name(&im, "t.c")[8 + 2] = 'a';
        expect_reject(&im, "duplicate tensor 't.a'");
        free(im.p);
}

static void gguf_rejects_bad_n_dims(void **state)
{
        struct image im = small_image();
        struct tinfo t = tensor_info_at(&im, "t.b");

        put_u32(t.n_dims, 5);
        expect_reject(&im, "tensor 't.b': n_dims 5 is not in 1..4");
        put_u32(t.n_dims, 0);
        expect_reject(&im, "tensor 't.b': n_dims 0");
        free(im.p);
}

static void gguf_rejects_unknown_tensor_type(void **state)
{
        struct image im = small_image();
        struct tinfo t = tensor_info_at(&im, "t.b");

        put_u32(t.type, 99);
        expect_reject(&im, "tensor 't.b': unknown tensor type id 99");
        put_u32(t.type, 4); /* Q4_2, removed from ggml */
        expect_reject(&im, "unknown tensor type id 4");
        put_u32(t.type, 0x80000000u);
        expect_reject(&im, "unknown tensor type id 2147483648");
        free(im.p);
}

static void gguf_rejects_ne0_not_block_multiple(void **state)
{
        struct image im = small_image();
        struct tinfo t = tensor_info_at(&im, "t.b");

        put_u64(t.ne, 48);
        expect_reject(&im, "tensor 't.b': ne[0] = 48 is not a multiple of the Q8_0 block size 32");
        free(im.p);
}

static void gguf_rejects_bad_shapes(void **state)
{
        struct image im = small_image();
        struct tinfo t = tensor_info_at(&im, "t.a");

        put_u64(t.ne + 8, UINT64_MAX);
        expect_reject(&im, "tensor 't.a': ne[1] is -1, must be at least 1");
        put_u64(t.ne + 8, 0);
        expect_reject(&im, "ne[1] is 0");
        put_u64(t.ne, 1ull << 40);
        put_u64(t.ne + 8, 1ull << 40);
        expect_reject(&im, "tensor 't.a': element count overflows");
        put_u64(t.ne, 1ull << 62);
        put_u64(t.ne + 8, 1);
        expect_reject(&im, "tensor 't.a': byte size overflows");
        free(im.p);
}

static void gguf_rejects_long_tensor_name(void **state)
{
        char name[65];
        struct gguf_writer *w = gguf_writer_new();
        struct image im;

        memset(name, 'n', 63);
        name[63] = '\0';
        assert_int_equal(gguf_w_tensor(w, name, MO_TYPE_F32, 1, (int64_t[]){ 8 }, (float[8]){ 0 }), 0);
        im = write_mem(w);
        gguf_close(open_ok(&im)); /* 63 bytes is the limit, and allowed */
        put_u64(find_name(&im, name), 64);
        expect_reject(&im, "name is 64 bytes, longer than 63");
        free(im.p);
}

static void gguf_rejects_misaligned_offset(void **state)
{
        struct image im = small_image();
        struct tinfo t = tensor_info_at(&im, "t.b");

        assert_int_equal(get_u64(t.offset), 64);
        put_u64(t.offset, 72);
        expect_reject(&im, "tensor 't.b': offset 72 is not a multiple of the alignment 32");
        free(im.p);
}

static void gguf_rejects_tensor_past_end(void **state)
{
        struct image im = small_image();
        struct tinfo t = tensor_info_at(&im, "t.c");

        put_u64(t.offset, get_u64(t.offset) + 32);
        expect_reject(&im, "tensor 't.c': 32 bytes at offset 192 of the data section extend past the end");
        put_u64(t.offset, UINT64_MAX - 31); /* aligned, and would wrap around */
        expect_reject(&im, "extend past the end of the file");
        put_u64(t.offset, 160);
        put_u64(tensor_info_at(&im, "t.a").ne + 8, 1ull << 40);
        expect_reject(&im, "tensor 't.a': 35184372088832 bytes at offset 0");
        free(im.p);
}

static void gguf_rejects_overlapping_tensors(void **state)
{
        struct image im = small_image();
        struct tinfo t = tensor_info_at(&im, "t.c");

        put_u64(t.offset, 32); /* inside t.a's 64 bytes */
        expect_reject(&im, "tensors 't.a' (offset 0, 64 bytes) and 't.c' (offset 32) overlap");
        put_u64(t.offset, 0);
        expect_reject(&im, "overlap");
        free(im.p);
}

static void gguf_rejects_bad_alignment(void **state)
{
        struct gguf_writer *w = gguf_writer_new();
        struct image im;
        uint8_t *val;

        gguf_writer_set_alignment(w, 64);
        im = write_mem(w);
        val = kv_type_at(&im, "general.alignment") + 4;
        put_u32(val, 0);
        expect_reject(&im, "general.alignment 0 is not a power of two");
        put_u32(val, 48);
        expect_reject(&im, "general.alignment 48 is not a power of two");
        put_u32(val - 4, GGUF_I32);
        put_u32(val, 64);
        expect_reject(&im, "key 'general.alignment' has type i32, expected u32");
        free(im.p);

        w = gguf_writer_new();
        gguf_w_u64(w, "general.alignment", 32);
        im = write_mem(w);
        expect_reject(&im, "key 'general.alignment' has type u64, expected u32");
        free(im.p);
}

static void gguf_rejects_deeply_nested_arrays(void **state)
{
        enum { DEPTH = 12 };
        uint8_t raw[DEPTH * 12];
        struct gguf_writer *w = gguf_writer_new();
        struct image im;

        for (int i = 0; i < DEPTH; i++) {
                put_u32(raw + 12 * i, i == DEPTH - 1 ? GGUF_U8 : GGUF_ARRAY);
                put_u64(raw + 12 * i + 4, i == DEPTH - 1 ? 0 : 1);
        }
        gguf_w_raw(w, "x.deep", GGUF_ARRAY, raw, sizeof raw);
        im = write_mem(w);
        expect_reject(&im, "key 'x.deep'[0][0][0][0][0][0][0][0]: arrays nested deeper than 8 levels");
        free(im.p);
}

static void gguf_rejects_nul_in_names(void **state)
{
        struct image im = small_image();

        find_name(&im, "test.count")[8 + 4] = '\0';
        expect_reject(&im, "contains a NUL byte");
        free(im.p);
        im = small_image();
        find_name(&im, "t.b")[8 + 1] = '\0';
        expect_reject(&im, "tensor #1: name contains a NUL byte");
        free(im.p);
}

/* --- files --- */

static void gguf_open_reports_missing_and_tiny_files(void **state)
{
        struct gguf *g = (struct gguf *)1;
        struct moerr e = { { 0 } };
        const char *path = TMP_PATH("tiny.gguf");
        FILE *f;

        assert_int_equal(gguf_open(TMP_PATH("absent.gguf"), &g, &e), -ENOENT);
        assert_null(g);
        assert_non_null(strstr(e.msg, "absent.gguf: cannot open"));
        f = fopen(path, "wb");
        assert_non_null(f);
        fwrite("GGUF", 1, 4, f);
        fclose(f);
        assert_int_equal(gguf_open(path, &g, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "too small"));
        assert_int_equal(gguf_open(tu_tmpdir(), &g, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "not a regular file"));
}

static void gguf_open_names_the_file_in_errors(void **state)
{
        struct image im = small_image();
        const char *path = TMP_PATH("bad-magic.gguf");
        struct gguf *g = NULL;
        struct moerr e = { { 0 } };
        FILE *f;

        im.p[1] = 'X';
        f = fopen(path, "wb");
        assert_non_null(f);
        assert_int_equal(fwrite(im.p, 1, im.n, f), im.n);
        fclose(f);
        assert_int_equal(gguf_open(path, &g, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "bad-magic.gguf: not a GGUF file"));
        free(im.p);
}

/* A valid header claiming a 1.5 GB tensor over a sparse file: opening must
 * not touch the data, so it is instant whatever the size. */
static void gguf_opens_a_sparse_1_5_gb_file_without_reading_it(void **state)
{
        const uint64_t rows = 12 * 1024 * 1024; /* 128 B each: 1.5 GiB */
        struct gguf_writer *w = gguf_writer_new();
        const char *path = TMP_PATH("sparse.gguf");
        struct moerr e = { { 0 } };
        struct timespec t0, t1;
        struct image im;
        struct gguf *g;
        double ms;
        int fd;

        gguf_w_str(w, "general.name", "sparse");
        assert_int_equal(gguf_w_tensor(w, "big", MO_TYPE_F32, 2, (int64_t[]){ 32, 1 }, (float[32]){ 0 }), 0);
        im = write_mem(w);
        put_u64(tensor_info_at(&im, "big").ne + 8, rows);
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, im.p, im.n - 128), (ssize_t)(im.n - 128));
        assert_int_equal(ftruncate(fd, (off_t)(im.n - 128 + rows * 128)), 0);
        close(fd);
        clock_gettime(CLOCK_MONOTONIC, &t0);
        assert_int_equal(gguf_open(path, &g, &e), 0);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
        assert_int_equal(gguf_tensor_at(g, 0)->nbytes, rows * 128);
        assert_true(ms < 500.0); /* milliseconds in practice; generous for loaded machines */
        gguf_close(g);
        unlink(path);
        free(im.p);
}

/* --- the writer's own checks --- */

/* A file of one 64 KiB tensor, written to path; returns its data offset. */
static size_t write_big_file(const char *path)
{
        enum { N = 16 * 1024 };
        struct gguf_writer *w = gguf_writer_new();
        struct moerr e = { { 0 } };
        float *x = malloc(N * sizeof *x);
        struct gguf *g;
        size_t off;

        assert_non_null(x);
        for (int i = 0; i < N; i++)
                x[i] = 1.0f + (float)i;
        assert_int_equal(gguf_w_tensor(w, "big", MO_TYPE_F32, 1, (int64_t[]){ N }, x), 0);
        assert_int_equal(gguf_writer_write(w, path, &e), 0);
        gguf_writer_free(w);
        free(x);
        assert_int_equal(gguf_open(path, &g, &e), 0);
        off = gguf_data_offset(g);
        gguf_close(g);
        return off;
}

/* Someone copies another file over a model in use: the pages past the new
 * end must read as zeros and mark the file, not kill the process. */
static void gguf_survives_its_file_cut_short_while_mapped(void **state)
{
        const char *path = TMP_PATH("cut.gguf");
        size_t off = write_big_file(path);
        struct moerr e = { { 0 } };
        const struct gguf_tensor *t;
        const volatile float *data;
        struct gguf *g;

        (void)state;
        assert_int_equal(gguf_open(path, &g, &e), 0);
        t = gguf_find_tensor(g, "big");
        data = t->data;
        assert_true(data[16 * 1024 - 1] == 16384.0f);
        assert_false(gguf_damaged(g));
        assert_int_equal(truncate(path, (off_t)off), 0);
        assert_true(data[16 * 1024 - 1] == 0.0f);
        assert_true(data[8 * 1024] == 0.0f);
        assert_true(gguf_damaged(g));
        gguf_close(g);

        /* A new mapping of the file, written again, starts unmarked. */
        write_big_file(path);
        assert_int_equal(gguf_open(path, &g, &e), 0);
        assert_false(gguf_damaged(g));
        gguf_close(g);
        unlink(path);
}

/* The guard answers only for its own mappings: a SIGBUS anywhere else
 * still ends the process (in a child here). */
static void gguf_guard_leaves_other_mappings_fatal(void **state)
{
        const char *path = TMP_PATH("other.gguf");
        size_t off = write_big_file(path);
        struct moerr e = { { 0 } };
        struct gguf *g;
        int status;
        pid_t pid;

        (void)state;
        assert_int_equal(gguf_open(path, &g, &e), 0);
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                int fd = open(path, O_RDONLY);
                const volatile uint8_t *p;

                /* The default action behind the guard, not the test
                 * harness's handler, which would carry on with the tests
                 * in this child; guarding another mapping puts it back. */
                signal(SIGBUS, SIG_DFL);
                if (fd < 0 || mo_mapguard_add(gguf_file_data(g), gguf_file_size(g)) < 0)
                        _exit(3);
                p = mmap(NULL, off + 64 * 1024, PROT_READ, MAP_PRIVATE, fd, 0);
                if (p == MAP_FAILED || ftruncate(open(path, O_WRONLY), (off_t)off) < 0)
                        _exit(3);
                _exit(p[off + 32 * 1024] == 0 ? 0 : 4);
        }
        assert_int_equal(waitpid(pid, &status, 0), pid);
        /* Killed by SIGBUS, or by the sanitizer's report of it. */
        if (WIFSIGNALED(status))
                assert_int_equal(WTERMSIG(status), SIGBUS);
        else
                assert_true(WIFEXITED(status) && WEXITSTATUS(status) != 0 && WEXITSTATUS(status) != 3);
        gguf_close(g);
        unlink(path);
}

static void gguf_writer_refuses_bad_tensors(void **state)
{
        struct gguf_writer *w = gguf_writer_new();
        char name[70];
        struct moerr e = { { 0 } };
        void *buf;
        size_t n;

        memset(name, 'x', 64);
        name[64] = '\0';
        assert_int_equal(gguf_w_tensor(w, "a", MO_TYPE_F32, 1, (int64_t[]){ 4 }, (float[4]){ 0 }), 0);
        assert_int_equal(gguf_w_tensor(w, "a", MO_TYPE_F32, 1, (int64_t[]){ 4 }, (float[4]){ 0 }), -EEXIST);
        assert_int_equal(gguf_w_tensor(w, name, MO_TYPE_F32, 1, (int64_t[]){ 4 }, (float[4]){ 0 }), -EINVAL);
        assert_int_equal(gguf_w_tensor(w, "b", 99, 1, (int64_t[]){ 4 }, (float[4]){ 0 }), -EINVAL);
        assert_int_equal(gguf_w_tensor(w, "c", MO_TYPE_F32, 5, (int64_t[]){ 1, 1, 1, 1, 1 }, (float[1]){ 0 }), -EINVAL);
        assert_int_equal(gguf_w_tensor(w, "d", MO_TYPE_Q8_0, 1, (int64_t[]){ 33 }, (uint8_t[64]){ 0 }), -EINVAL);
        assert_int_equal(gguf_w_tensor(w, "e", MO_TYPE_F32, 2, (int64_t[]){ 4, 0 }, NULL), -EINVAL);
        assert_int_equal(gguf_writer_write_mem(w, &buf, &n, &e), -EEXIST); /* the first failure */
        assert_non_null(strstr(e.msg, "tensor 'a' added twice"));
        assert_null(buf);
        gguf_writer_free(w);

        w = gguf_writer_new();
        gguf_writer_set_alignment(w, 24);
        assert_int_equal(gguf_writer_write_mem(w, &buf, &n, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "alignment 24 is not a power of two"));
        gguf_writer_free(w);

        w = gguf_writer_new();
        gguf_writer_set_version(w, 1);
        assert_int_equal(gguf_writer_write_mem(w, &buf, &n, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "version 1 cannot be written"));
        gguf_writer_free(w);
}

static void gguf_writer_follows_an_alignment_key_set_directly(void **state)
{
        struct gguf_writer *w = gguf_writer_new();
        struct image im;
        struct gguf *g;

        gguf_w_u32(w, "general.alignment", 256);
        assert_int_equal(gguf_w_tensor(w, "a", MO_TYPE_F32, 1, (int64_t[]){ 3 }, (float[3]){ 1, 2, 3 }), 0);
        assert_int_equal(gguf_w_tensor(w, "b", MO_TYPE_F32, 1, (int64_t[]){ 1 }, (float[1]){ 4 }), 0);
        im = write_mem(w);
        g = open_ok(&im);
        assert_int_equal(gguf_alignment(g), 256);
        assert_int_equal(gguf_data_offset(g) % 256, 0);
        assert_int_equal(gguf_find_tensor(g, "b")->offset, 256);
        assert_true(*(const float *)gguf_find_tensor(g, "b")->data == 4.0f);
        gguf_close(g);
        free(im.p);
}

static void gguf_writer_reports_fill_and_path_failures(void **state)
{
        struct gguf_writer *w = gguf_writer_new();
        const char *path = TMP_PATH("fill-fails.gguf");
        struct moerr e = { { 0 } };
        DIR *d;
        struct dirent *de;

        assert_int_equal(gguf_w_tensor_fill(w, "f", MO_TYPE_F32, 1, (int64_t[]){ 4 }, fill_fails, NULL), 0);
        assert_int_equal(gguf_writer_write(w, path, &e), -EIO);
        assert_non_null(strstr(e.msg, "tensor 'f': filling its data failed"));
        assert_int_equal(access(path, F_OK), -1); /* nothing half-written is left */
        d = opendir(tu_tmpdir());
        assert_non_null(d);
        while ((de = readdir(d)))
                assert_null(strstr(de->d_name, "fill-fails"));
        closedir(d);
        gguf_writer_free(w);

        w = gguf_writer_new();
        assert_int_equal(gguf_writer_write(w, "/nonexistent-moed-dir/x.gguf", &e), -ENOENT);
        assert_non_null(strstr(e.msg, "/nonexistent-moed-dir/x.gguf"));
        gguf_writer_free(w);
}

/* --- fuzz seeds --- */

static int write_seed(const char *dir, const char *name, struct gguf_writer *w)
{
        struct moerr e = { { 0 } };
        char path[4096];
        void *buf;
        size_t n;
        FILE *f;

        if (gguf_writer_write_mem(w, &buf, &n, &e) < 0) {
                fprintf(stderr, "seed %s: %s\n", name, e.msg);
                return -1;
        }
        gguf_writer_free(w);
        snprintf(path, sizeof path, "%s/%s", dir, name);
        f = fopen(path, "wb");
        if (!f || fwrite(buf, 1, n, f) != n || fclose(f) != 0) {
                fprintf(stderr, "seed %s: cannot write %s\n", name, path);
                free(buf);
                return -1;
        }
        free(buf);
        return 0;
}

static int write_seeds(const char *dir)
{
        static const char *const toks[] = { "<s>", "hello", "", "wörld" };
        static const float fl[] = { 1.0f, -2.5f };
        uint8_t nested[12 + 2 * (12 + 8)];
        struct gguf_writer *w;
        int r = 0;

        mkdir(dir, 0755);
        r |= write_seed(dir, "small-v3.gguf", small_writer());
        w = small_writer();
        gguf_writer_set_version(w, 2);
        gguf_writer_set_alignment(w, 64);
        r |= write_seed(dir, "small-v2-a64.gguf", w);

        w = gguf_writer_new();
        for (int t = 0; t < GGUF_VTYPE_COUNT; t++) {
                uint64_t one = 1;
                char key[32];

                snprintf(key, sizeof key, "s.%s", gguf_vtype_name(t));
                if (t == GGUF_STRING)
                        gguf_w_str(w, key, "str");
                else if (t != GGUF_ARRAY)
                        gguf_w_scalar(w, key, t, &one);
        }
        gguf_w_arr_str(w, "tokenizer.ggml.tokens", toks, NULL, 4);
        gguf_w_arr(w, "a.f32", GGUF_F32, fl, 2);
        put_u32(nested, GGUF_ARRAY);
        put_u64(nested + 4, 2);
        for (int i = 0; i < 2; i++) {
                put_u32(nested + 12 + i * 20, GGUF_U32);
                put_u64(nested + 16 + i * 20, 2);
                put_u64(nested + 24 + i * 20, 0x0000000200000001ull);
        }
        gguf_w_raw(w, "a.nested", GGUF_ARRAY, nested, sizeof nested);
        r |= write_seed(dir, "all-types.gguf", w);

        w = gguf_writer_new();
        gguf_writer_set_alignment(w, 16);
        for (size_t i = 0; i < ARRAY_SIZE(tcases); i++) {
                const struct tcase *c = &tcases[i];
                uint8_t *data = calloc(1, tcase_bytes(c));

                if (!data || gguf_w_tensor(w, c->name, c->type, c->n_dims, c->ne, data) < 0)
                        r = -1;
                free(data);
        }
        r |= write_seed(dir, "tensors.gguf", w);
        return r ? 1 : 0;
}

int main(int argc, char **argv)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(gguf_roundtrips_every_scalar_type),
                cmocka_unit_test(gguf_roundtrips_arrays),
                cmocka_unit_test(gguf_indexes_a_large_string_array),
                cmocka_unit_test(gguf_roundtrips_tensors_of_several_types),
                cmocka_unit_test(gguf_roundtrips_v2_and_v3_in_memory_with_alignments),
                cmocka_unit_test(gguf_roundtrips_v2_and_v3_through_files),
                cmocka_unit_test(gguf_reads_the_small_file),
                cmocka_unit_test(gguf_getters_report_type_mismatch_and_absence),
                cmocka_unit_test(gguf_rejects_wrong_magic),
                cmocka_unit_test(gguf_rejects_versions_0_1_and_4),
                cmocka_unit_test(gguf_rejects_byte_swapped_file),
                cmocka_unit_test(gguf_rejects_every_truncation),
                cmocka_unit_test(gguf_rejects_absurd_counts),
                cmocka_unit_test(gguf_rejects_absurd_string_lengths),
                cmocka_unit_test(gguf_rejects_absurd_array_count),
                cmocka_unit_test(gguf_rejects_string_element_past_end),
                cmocka_unit_test(gguf_rejects_unknown_value_type),
                cmocka_unit_test(gguf_rejects_bad_bool),
                cmocka_unit_test(gguf_rejects_duplicate_key),
                cmocka_unit_test(gguf_rejects_duplicate_tensor),
                cmocka_unit_test(gguf_rejects_bad_n_dims),
                cmocka_unit_test(gguf_rejects_unknown_tensor_type),
                cmocka_unit_test(gguf_rejects_ne0_not_block_multiple),
                cmocka_unit_test(gguf_rejects_bad_shapes),
                cmocka_unit_test(gguf_rejects_long_tensor_name),
                cmocka_unit_test(gguf_rejects_misaligned_offset),
                cmocka_unit_test(gguf_rejects_tensor_past_end),
                cmocka_unit_test(gguf_rejects_overlapping_tensors),
                cmocka_unit_test(gguf_rejects_bad_alignment),
                cmocka_unit_test(gguf_rejects_deeply_nested_arrays),
                cmocka_unit_test(gguf_rejects_nul_in_names),
                cmocka_unit_test(gguf_open_reports_missing_and_tiny_files),
                cmocka_unit_test(gguf_open_names_the_file_in_errors),
                cmocka_unit_test(gguf_opens_a_sparse_1_5_gb_file_without_reading_it),
                cmocka_unit_test(gguf_survives_its_file_cut_short_while_mapped),
                cmocka_unit_test(gguf_guard_leaves_other_mappings_fatal),
                cmocka_unit_test(gguf_writer_refuses_bad_tensors),
                cmocka_unit_test(gguf_writer_follows_an_alignment_key_set_directly),
                cmocka_unit_test(gguf_writer_reports_fill_and_path_failures),
        };

        if (argc == 3 && !strcmp(argv[1], "--write-seeds"))
                return write_seeds(argv[2]);
        return cmocka_run_group_tests(tests, NULL, NULL);
}
