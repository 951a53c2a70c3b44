/* fuzz-gguf: libFuzzer target for engine/gguf.c. Any input either fails to
 * open with a message or opens into a gguf whose every key, array element
 * and tensor byte can be read through the accessors without a fault.
 * Seeds: `test-gguf --write-seeds DIR` (see tests/test-gguf.c). */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/gguf.h"
#include "kernels/quant.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Keeps reads from being optimised away. */
static volatile uint64_t sink;

static uint64_t float_bits(double d)
{
        uint64_t u;

        memcpy(&u, &d, sizeof u);
        return u;
}

#define CHECK(cond) do { if (!(cond)) __builtin_trap(); } while (0)

static void walk_key(const struct gguf *g, int64_t i)
{
        const char *key = gguf_key(g, i);
        struct moerr e = { { 0 } };
        enum gguf_vtype et;
        const char *s;
        uint64_t count, u64;
        uint32_t u32;
        int32_t i32;
        size_t len;
        float f;
        bool b;

        CHECK(key);
        CHECK(gguf_find_key(g, key) == i);
        CHECK(gguf_kv_type(g, i) < GGUF_VTYPE_COUNT);
        /* Every getter on every key: a value or a clean refusal. */
        CHECK(gguf_get_u32(g, key, &u32, &e) <= 0);
        CHECK(gguf_get_u64(g, key, &u64, &e) <= 0);
        CHECK(gguf_get_i32(g, key, &i32, &e) <= 0);
        CHECK(gguf_get_f32(g, key, &f, &e) <= 0);
        CHECK(gguf_get_bool(g, key, &b, &e) <= 0);
        if (gguf_get_str(g, key, &s, &len, &e) == 0)
                for (size_t k = 0; k < len; k++)
                        sink += (uint8_t)s[k];
        if (gguf_get_arr(g, key, &et, &count, &e) < 0)
                return;
        CHECK(gguf_kv_type(g, i) == GGUF_ARRAY);
        for (uint64_t k = 0; k < count; k++) {
                s = gguf_arr_str(g, i, k, &len);
                CHECK(!s == (et != GGUF_STRING));
                if (s && len)
                        sink += (uint8_t)s[0] + (uint8_t)s[len - 1];
                sink += (uint64_t)gguf_arr_int(g, i, k);
                sink += float_bits(gguf_arr_float(g, i, k));
        }
        CHECK(!gguf_arr_str(g, i, count, &len));
}

static void walk_tensor(const struct gguf *g, int64_t i)
{
        const struct gguf_tensor *t = gguf_tensor_at(g, i);
        const uint8_t *p;
        size_t rows = 1;

        CHECK(t);
        CHECK(gguf_find_tensor(g, t->name) == t);
        CHECK(strlen(t->name) <= 63);
        CHECK(mo_type_get(t->type));
        CHECK(t->n_dims >= 1 && t->n_dims <= GGUF_MAX_DIMS);
        for (int d = 0; d < GGUF_MAX_DIMS; d++) {
                CHECK(t->ne[d] >= 1);
                CHECK(d < t->n_dims || t->ne[d] == 1);
                if (d > 0)
                        rows *= (size_t)t->ne[d];
        }
        CHECK(t->nbytes == mo_row_bytes(t->type, t->ne[0]) * rows);
        CHECK(t->offset % gguf_alignment(g) == 0);
        p = t->data;
        CHECK(p == (const uint8_t *)gguf_file_data(g) + gguf_data_offset(g) + t->offset);
        CHECK(t->offset + t->nbytes <= gguf_file_size(g) - gguf_data_offset(g));
        /* First and last byte: ASan flags either if outside the input. */
        sink += p[0] + p[t->nbytes - 1];
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        struct moerr e = { { 0 } };
        struct gguf *g = NULL;

        if (gguf_open_buffer(data, size, &g, &e) < 0) {
                CHECK(!g && e.msg[0]);
                return 0;
        }
        CHECK(gguf_version(g) == 2 || gguf_version(g) == 3);
        CHECK(gguf_alignment(g) && !(gguf_alignment(g) & (gguf_alignment(g) - 1)));
        CHECK(!gguf_key(g, gguf_n_kv(g)));
        CHECK(!gguf_tensor_at(g, gguf_n_tensors(g)));
        for (int64_t i = 0; i < gguf_n_kv(g); i++)
                walk_key(g, i);
        for (int64_t i = 0; i < gguf_n_tensors(g); i++)
                walk_tensor(g, i);
        gguf_close(g);
        return 0;
}
