/* make-seeds: writes the starting corpora of the fuzz targets into DIR/gguf
 * and DIR/tokenizer: small GGUF files that use every metadata type, arrays
 * and several tensor types, and texts that reach every tokenizer path. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "engine/gguf-write.h"
#include "kernels/quant.h"

static int write_file(const char *dir, const char *name, const void *data, size_t n)
{
        char path[4096];
        FILE *f;

        snprintf(path, sizeof path, "%s/%s", dir, name);
        f = fopen(path, "wb");
        if (!f || fwrite(data, 1, n, f) != n || fclose(f) != 0) {
                fprintf(stderr, "make-seeds: %s: %s\n", path, strerror(errno));
                return -1;
        }
        return 0;
}

static int write_gguf(const char *dir, const char *name, struct gguf_writer *w)
{
        struct moerr e = {0};
        void *buf = NULL;
        size_t n = 0;
        int r;

        r = gguf_writer_write_mem(w, &buf, &n, &e);
        if (r < 0)
                fprintf(stderr, "make-seeds: %s: %s\n", name, e.msg);
        else
                r = write_file(dir, name, buf, n);
        free(buf);
        gguf_writer_free(w);
        return r;
}

static struct gguf_writer *all_types(uint32_t version)
{
        struct gguf_writer *w = gguf_writer_new();
        static const int32_t ints[] = { 1, -2, 3 };
        static const float floats[] = { 0.5f, -1.0f };
        static const uint8_t bools[] = { 1, 0 };
        static const char *const strs[] = { "a b", "Ġthe", "<｜User｜>" };

        gguf_writer_set_version(w, version);
        gguf_w_str(w, "general.architecture", "deepseek2");
        gguf_w_u32(w, "deepseek2.block_count", 1);
        gguf_w_i32(w, "a.i32", -7);
        gguf_w_u64(w, "a.u64", 1ull << 40);
        gguf_w_f32(w, "a.f32", 1e-6f);
        gguf_w_bool(w, "a.bool", true);
        gguf_w_arr(w, "a.ints", GGUF_I32, ints, 3);
        gguf_w_arr(w, "a.floats", GGUF_F32, floats, 2);
        gguf_w_arr(w, "a.bools", GGUF_BOOL, bools, 2);
        gguf_w_arr_str(w, "tokenizer.ggml.merges", strs, NULL, 3);
        return w;
}

static struct gguf_writer *with_tensors(void)
{
        struct gguf_writer *w = all_types(3);
        float f32[64];
        uint8_t q[256];

        for (int i = 0; i < 64; i++)
                f32[i] = (float)i / 7.0f - 3.0f;
        mo_quantize_row(MO_TYPE_Q8_0, f32, q, 64);
        gguf_w_tensor(w, "blk.0.attn_norm.weight", MO_TYPE_F32, 1, (int64_t[]){ 16 }, f32);
        gguf_w_tensor(w, "token_embd.weight", MO_TYPE_Q8_0, 2, (int64_t[]){ 32, 2 }, q);
        gguf_w_tensor(w, "output.weight", MO_TYPE_F16, 3, (int64_t[]){ 4, 2, 2 }, f32);
        return w;
}

static const char *const texts[] = {
        "Hello, world! The quick brown fox jumps over the lazy dog.",
        "int main(void) {\n\treturn 0;\n}\n",
        "数字 1234567 和 日本語のテキスト、カタカナ。",
        "emoji 👩‍👩‍👧 🇯🇵 ✨ and   runs\t\tof \r\n whitespace",
        "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>",
        "\xff\xfe invalid \xc3 utf-8 \xe2\x82",
        "Привет мир, Γειά σου κόσμε, مرحبا بالعالم",
};

int main(int argc, char **argv)
{
        char dir[4096];

        if (argc != 2) {
                fprintf(stderr, "usage: make-seeds DIR\n");
                return 2;
        }
        mkdir(argv[1], 0755);
        snprintf(dir, sizeof dir, "%s/gguf", argv[1]);
        mkdir(dir, 0755);
        if (write_gguf(dir, "kv-v3.gguf", all_types(3)) < 0 || write_gguf(dir, "kv-v2.gguf", all_types(2)) < 0 ||
            write_gguf(dir, "tensors.gguf", with_tensors()) < 0)
                return 1;
        snprintf(dir, sizeof dir, "%s/tokenizer", argv[1]);
        mkdir(dir, 0755);
        for (size_t i = 0; i < sizeof texts / sizeof *texts; i++) {
                char name[32];
                snprintf(name, sizeof name, "text-%zu", i);
                if (write_file(dir, name, texts[i], strlen(texts[i])) < 0)
                        return 1;
        }
        return 0;
}
