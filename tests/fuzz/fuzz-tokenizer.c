/* fuzz-tokenizer: libFuzzer target for engine/tokenizer.c with the real
 * DeepSeek-V3 vocabulary ($MOED_VOCAB_JSON, loaded once). The first byte
 * picks the options; the rest must encode without error and come back
 * byte for byte through tok_piece, and through tok_stream as valid UTF-8. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/tokenizer.h"
#include "tools/vocab-json.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct vocab_json vj;
static struct tokenizer *tok, *tok_llm;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
        const char *path = getenv("MOED_VOCAB_JSON");
        struct tok_spec spec;
        struct moerr e = {{0}};

        if (!path) {
                fprintf(stderr, "fuzz-tokenizer: set MOED_VOCAB_JSON to the DeepSeek-V3 tokenizer.json\n");
                abort();
        }
        if (vocab_json_load(path, 129280, &vj, &e) < 0 || tok_new(&vj.spec, &tok, &e) < 0) {
                fprintf(stderr, "fuzz-tokenizer: %s\n", e.msg);
                abort();
        }
        spec = vj.spec;
        spec.pre = "deepseek-llm";
        if (tok_new(&spec, &tok_llm, &e) < 0) {
                fprintf(stderr, "fuzz-tokenizer: %s\n", e.msg);
                abort();
        }
        return 0;
}

static bool valid_utf8(const uint8_t *p, size_t n)
{
        for (size_t i = 0; i < n;) {
                size_t l = p[i] < 0x80 ? 1 : p[i] < 0xC2 ? 0 : p[i] < 0xE0 ? 2 : p[i] < 0xF0 ? 3 :
                           p[i] < 0xF5 ? 4 : 0;

                if (!l || i + l > n)
                        return false;
                for (size_t k = 1; k < l; k++)
                        if ((p[i + k] & 0xC0) != 0x80)
                                return false;
                if ((p[i] == 0xE0 && p[i + 1] < 0xA0) || (p[i] == 0xED && p[i + 1] > 0x9F) ||
                    (p[i] == 0xF0 && p[i + 1] < 0x90) || (p[i] == 0xF4 && p[i + 1] > 0x8F))
                        return false;
                i += l;
        }
        return true;
}

static void check_stream(const struct tokenizer *t, const int32_t *ids, size_t n,
                         const uint8_t *text, size_t len)
{
        struct tok_stream *s = tok_stream_new(t, true);
        uint8_t *out = malloc(3 * len + 64);
        char buf[64];
        size_t w = 0;
        int k;

        if (!s || !out)
                abort();
        for (size_t i = 0; i < n; i++) {
                if ((k = tok_stream_feed(s, ids[i], buf, sizeof buf)) < 0)
                        abort();
                memcpy(out + w, buf, (size_t)k);
                w += (size_t)k;
        }
        while ((k = tok_stream_flush(s, buf, sizeof buf)) > 0) {
                memcpy(out + w, buf, (size_t)k);
                w += (size_t)k;
        }
        if (k < 0 || !valid_utf8(out, w))
                abort();
        /* valid input streams back unchanged */
        if (valid_utf8(text, len) && (w != len || memcmp(out, text, len) != 0))
                abort();
        tok_stream_free(s);
        free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        const struct tokenizer *t;
        bool special, bos;
        int32_t *ids = NULL;
        size_t n = 0, w = 0;
        uint8_t *back;
        struct moerr e;

        if (size < 1)
                return 0;
        special = data[0] & 1;
        t = data[0] & 2 ? tok_llm : tok;
        bos = data[0] & 4;
        data++;
        size--;
        if (tok_encode(t, (const char *)data, size, bos, special, &ids, &n, &e) < 0)
                abort();
        if (bos && (n < 1 || ids[0] != tok_bos(t)))
                abort();
        back = malloc(size + 64);
        if (!back)
                abort();
        for (size_t i = bos; i < n; i++) {
                char buf[512];
                int k = tok_piece(t, ids[i], true, buf, sizeof buf);

                if (k < 0 || w + (size_t)k > size)
                        abort();
                memcpy(back + w, buf, (size_t)k);
                w += (size_t)k;
        }
        if (w != size || memcmp(back, data, size) != 0)
                abort();
        check_stream(t, ids + bos, n - bos, data, size);
        free(back);
        free(ids);
        return 0;
}
