/* test-tokenizer: engine/tokenizer.c and tools/vocab-json.c against the real
 * DeepSeek-V3 vocabulary: conformance with the JavaScript reference encoder
 * (tests/tok-reference.mjs) on a generated corpus, round trips, special
 * tokens, streaming, the deepseek-llm pre-tokenizer, GGUF loading, errors. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "common/cleanup.h"
#include "engine/gguf-write.h"
#include "engine/gguf.h"
#include "engine/tokenizer.h"
#include "testutil.h"
#include "tools/vocab-json.h"

#define V3_N_VOCAB 129280

#if defined(__SANITIZE_ADDRESS__)
static const bool sanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
static const bool sanitized = true;
#else
static const bool sanitized = false;
#endif
#else
static const bool sanitized = false;
#endif

static struct vocab_json vj;
static struct tokenizer *tok;
static json_t *reference; /* [{text, ids}] from tok-reference.mjs */

static double now(void)
{
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static const char *vocab_path(void)
{
        const char *p = getenv("MOED_VOCAB_JSON");

        if (!p || !*p) {
                fprintf(stderr, "MOED_VOCAB_JSON is not set: run through meson test, or point it "
                                "at the DeepSeek-V3 tokenizer.json (npm ci --prefix vocab)\n");
                return NULL;
        }
        return p;
}

static int setup(void **state)
{
        struct moerr e = {{0}};
        const char *path = vocab_path();
        double t0 = now();

        if (!path)
                return -1;
        if (vocab_json_load(path, V3_N_VOCAB, &vj, &e) < 0) {
                fprintf(stderr, "vocab_json_load %s: %s\n", path, e.msg);
                return -1;
        }
        fprintf(stderr, "vocab_json_load: %.0f ms\n", (now() - t0) * 1e3);
        t0 = now();
        if (tok_new(&vj.spec, &tok, &e) < 0) {
                fprintf(stderr, "tok_new: %s\n", e.msg);
                return -1;
        }
        fprintf(stderr, "tok_new: %.0f ms\n", (now() - t0) * 1e3);
        return 0;
}

static int teardown(void **state)
{
        tok_free(tok);
        vocab_json_free(&vj);
        json_decref(reference);
        return 0;
}

/* ---- helpers ---- */

static int32_t *encode(const struct tokenizer *t, const char *s, size_t len, bool bos, bool special,
                       size_t *n)
{
        struct moerr e = {{0}};
        int32_t *ids = NULL;
        int r = tok_encode(t, s, len, bos, special, &ids, n, &e);

        if (r < 0)
                print_error("tok_encode: %s\n", e.msg);
        assert_int_equal(r, 0);
        assert_non_null(ids);
        return ids;
}

static char *decode(const struct tokenizer *t, const int32_t *ids, size_t n, size_t *len)
{
        size_t cap = 64, w = 0;
        char *out = malloc(cap);

        assert_non_null(out);
        for (size_t i = 0; i < n; i++) {
                char buf[1024];
                int k = tok_piece(t, ids[i], true, buf, sizeof buf);

                assert_true(k >= 0);
                while (w + (size_t)k + 1 > cap)
                        assert_non_null(out = realloc(out, cap *= 2));
                memcpy(out + w, buf, (size_t)k);
                w += (size_t)k;
        }
        out[w] = '\0';
        *len = w;
        return out;
}

static void assert_round_trip(const struct tokenizer *t, const char *s, size_t len, bool special)
{
        size_t n, dl;
        _cleanup_free_ int32_t *ids = encode(t, s, len, false, special, &n);
        _cleanup_free_ char *d = decode(t, ids, n, &dl);

        if (dl != len || memcmp(d, s, len) != 0) {
                print_error("round trip of %zu bytes gave %zu bytes:\n", len, dl);
                for (size_t i = 0; i < len; i++)
                        print_error("%02x", (uint8_t)s[i]);
                print_error("\n");
        }
        assert_int_equal(dl, len);
        assert_memory_equal(d, s, len);
}

static bool valid_utf8(const char *s, size_t n)
{
        const uint8_t *p = (const uint8_t *)s;

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

static void print_ids(const char *label, const int32_t *ids, size_t n)
{
        print_error("  %s (%zu):", label, n);
        for (size_t i = 0; i < n; i++)
                print_error(" %d", ids[i]);
        print_error("\n");
}

static int32_t byte_token(uint8_t b)
{
        char buf[8];
        size_t n;
        /* GPT-2 byte map, written out independently of the tokenizer's */
        uint32_t cp = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE ? b : 0;

        if (!cp) {
                cp = 256;
                for (int i = 0; i < b; i++)
                        if (!((i >= 0x21 && i <= 0x7E) || (i >= 0xA1 && i <= 0xAC) || i >= 0xAE))
                                cp++;
        }
        if (cp < 0x80) {
                buf[0] = (char)cp;
                n = 1;
        } else {
                buf[0] = (char)(0xC0 | cp >> 6);
                buf[1] = (char)(0x80 | (cp & 0x3F));
                n = 2;
        }
        buf[n] = '\0';
        return tok_find(tok, buf);
}

/* ---- the reference ---- */

static json_t *run_reference(void)
{
        const char *root = getenv("MOED_SOURCE_ROOT");
        const char *node = getenv("MOED_NODE");
        _cleanup_free_ char *cmd = NULL;
        json_error_t err;
        json_t *j;
        FILE *f;

        if (!root) {
                print_error("MOED_SOURCE_ROOT is not set (tests/meson.build sets it)\n");
                return NULL;
        }
        if (asprintf(&cmd, "'%s' '%s/tests/tok-reference.mjs'", node && *node ? node : "node", root) < 0)
                return NULL;
        f = popen(cmd, "r");
        if (!f) {
                print_error("cannot run %s\n", cmd);
                return NULL;
        }
        j = json_loadf(f, JSON_ALLOW_NUL, &err);
        if (pclose(f) != 0 || !j) {
                print_error("%s failed (node and the npm package under vocab/ are needed): %s\n",
                            cmd, err.text);
                json_decref(j);
                return NULL;
        }
        return j;
}

static json_t *corpus(void)
{
        if (!reference)
                reference = run_reference();
        assert_non_null(reference);
        assert_true(json_array_size(reference) >= 1000);
        return reference;
}

static void encode_matches_js_reference_on_corpus(void **state)
{
        json_t *ref = corpus(), *item;
        size_t i, bad = 0, n_ids = 0;

        json_array_foreach(ref, i, item) {
                json_t *text = json_object_get(item, "text"), *want = json_object_get(item, "ids");
                const char *s = json_string_value(text);
                size_t len = json_string_length(text), n;
                _cleanup_free_ int32_t *ids = encode(tok, s, len, false, true, &n);
                bool same = n == json_array_size(want);

                for (size_t k = 0; same && k < n; k++)
                        same = ids[k] == json_integer_value(json_array_get(want, k));
                n_ids += n;
                if (same)
                        continue;
                if (bad++ < 10) {
                        _cleanup_free_ int32_t *w = malloc((json_array_size(want) + 1) * sizeof *w);

                        assert_non_null(w);
                        for (size_t k = 0; k < json_array_size(want); k++)
                                w[k] = (int32_t)json_integer_value(json_array_get(want, k));
                        print_error("mismatch on string %zu: %s\n", i,
                                    json_dumps(text, JSON_ENCODE_ANY | JSON_ENSURE_ASCII));
                        print_ids("ours", ids, n);
                        print_ids("reference", w, json_array_size(want));
                }
        }
        fprintf(stderr, "conformance: %zu of %zu strings equal the reference (%zu tokens)\n",
                json_array_size(ref) - bad, json_array_size(ref), n_ids);
        assert_int_equal(bad, 0);
}

static void decode_round_trips_corpus(void **state)
{
        json_t *ref = corpus(), *item;
        size_t i;

        json_array_foreach(ref, i, item) {
                json_t *text = json_object_get(item, "text");

                assert_round_trip(tok, json_string_value(text), json_string_length(text), true);
                assert_round_trip(tok, json_string_value(text), json_string_length(text), false);
        }
}

static void random_bytes_round_trip(void **state)
{
        static const char *const bits[] = { "<｜User｜>", "<|EOT|>", "\xF0\x9F\x98", "\xE2\x82",
                                             "\xED\xA0\x80", "\xC0\xAF", " \n", "12", "é" };
        uint64_t x = 0x9E3779B97F4A7C15ull;

        for (int iter = 0; iter < 3000; iter++) {
                char buf[512];
                size_t len = 0, want;

                x = x * 6364136223846793005ull + 1442695040888963407ull;
                want = (x >> 33) % 300;
                while (len < want) {
                        x = x * 6364136223846793005ull + 1442695040888963407ull;
                        if ((x >> 60) == 0) {
                                const char *b = bits[(x >> 40) % ARRAY_SIZE(bits)];

                                memcpy(buf + len, b, strlen(b));
                                len += strlen(b);
                        } else {
                                buf[len++] = (char)(x >> 24);
                        }
                }
                assert_round_trip(tok, buf, len, iter & 1);
        }
}

static void special_tokens_match_only_with_parse_special(void **state)
{
        static const char s[] = "<｜User｜>hi<｜Assistant｜>";
        size_t n, n2;
        _cleanup_free_ int32_t *with = encode(tok, s, strlen(s), false, true, &n);
        _cleanup_free_ int32_t *without = encode(tok, s, strlen(s), false, false, &n2);

        assert_int_equal(n, 3);
        assert_int_equal(with[0], 128803);
        assert_int_equal(with[2], 128804);
        assert_true(n2 > 3);
        for (size_t i = 0; i < n2; i++) {
                assert_int_not_equal(without[i], 128803);
                assert_int_not_equal(without[i], 128804);
        }
        assert_round_trip(tok, s, strlen(s), false);
}

static void bos_text_parses_to_bos_id(void **state)
{
        static const char s[] = "<｜begin▁of▁sentence｜>x<｜end▁of▁sentence｜>";
        size_t n;
        _cleanup_free_ int32_t *ids = encode(tok, s, strlen(s), false, true, &n);

        assert_int_equal(n, 3);
        assert_int_equal(ids[0], 0);
        assert_int_equal(ids[2], 1);
}

static void special_token_is_cut_out_of_surrounding_text(void **state)
{
        struct tok_str *p = NULL;
        size_t n;
        struct moerr e = {{0}};
        static const char s[] = "<<｜User｜>>";

        assert_int_equal(tok_pretokenize(tok, s, strlen(s), true, &p, &n, &e), 0);
        assert_int_equal(n, 3);
        assert_int_equal(p[1].len, strlen("<｜User｜>"));
        free(p);
}

static void user_defined_tokens_always_match(void **state)
{
        _cleanup_free_ int32_t *types = malloc(V3_N_VOCAB * sizeof *types);
        struct tok_spec spec = vj.spec;
        struct tokenizer *t = NULL;
        struct moerr e = {{0}};
        static const char s[] = "a<｜fim▁hole｜>b";
        size_t n;
        int32_t *ids;

        assert_non_null(types);
        memcpy(types, vj.types, V3_N_VOCAB * sizeof *types);
        types[128800] = TOK_USER_DEFINED;
        spec.types = types;
        assert_int_equal(tok_new(&spec, &t, &e), 0);
        ids = encode(t, s, strlen(s), false, false, &n);
        assert_int_equal(n, 3);
        assert_int_equal(ids[1], 128800);
        free(ids);
        /* a control token is not matched without parse_special */
        ids = encode(tok, s, strlen(s), false, false, &n);
        assert_true(n > 3);
        free(ids);
        tok_free(t);
}

static void add_bos_prepends_bos(void **state)
{
        size_t n;
        _cleanup_free_ int32_t *ids = encode(tok, "Hello", 5, true, false, &n);
        _cleanup_free_ int32_t *empty = encode(tok, "", 0, true, false, &n);

        assert_true(tok_add_bos(tok));
        assert_int_equal(tok_bos(tok), 0);
        assert_int_equal(tok_eos(tok), 1);
        assert_int_equal(ids[0], 0);
        assert_int_equal(ids[1], 19923);
        assert_int_equal(n, 1);
        assert_int_equal(empty[0], 0);
}

static void known_ids_of_the_v3_vocab(void **state)
{
        size_t n;
        _cleanup_free_ int32_t *ids = encode(tok, " the\n\t", 6, false, false, &n);

        assert_int_equal(tok_find(tok, "Ġ"), 223);
        assert_int_equal(tok_find(tok, "Ġthe"), 270);
        assert_int_equal(tok_find(tok, "<｜User｜>"), 128803);
        assert_int_equal(tok_find(tok, "no such token here"), -1);
        assert_int_equal(tok_n_vocab(tok), V3_N_VOCAB);
        assert_int_equal(n, 3);
        assert_int_equal(ids[0], 270);
        assert_int_equal(ids[1], 201);
        assert_int_equal(ids[2], 200);
}

static void end_of_generation_tokens(void **state)
{
        assert_true(tok_is_eog(tok, 1));
        assert_true(tok_is_eog(tok, 128805)); /* <|EOT|> */
        assert_false(tok_is_eog(tok, 0));
        assert_false(tok_is_eog(tok, 270));
}

static void piece_renders_control_tokens_only_when_asked(void **state)
{
        char buf[64];

        assert_int_equal(tok_piece(tok, 0, false, buf, sizeof buf), 0);
        assert_int_equal(tok_piece(tok, 0, true, buf, sizeof buf), strlen("<｜begin▁of▁sentence｜>"));
        assert_memory_equal(buf, "<｜begin▁of▁sentence｜>", strlen("<｜begin▁of▁sentence｜>"));
        assert_int_equal(tok_piece(tok, 270, false, buf, sizeof buf), 4);
        assert_memory_equal(buf, " the", 4);
        assert_int_equal(tok_piece(tok, 270, false, buf, 2), 2);
        assert_int_equal(tok_piece(tok, V3_N_VOCAB - 1, true, buf, sizeof buf), 0); /* padding */
        assert_int_equal(tok_piece(tok, V3_N_VOCAB, true, buf, sizeof buf), -EINVAL);
        assert_int_equal(tok_piece(tok, -1, true, buf, sizeof buf), -EINVAL);
}

static void invalid_utf8_is_encoded_byte_by_byte(void **state)
{
        static const char s[] = "a\xFF" "b\xE2\x82";
        size_t n;
        _cleanup_free_ int32_t *ids = encode(tok, s, strlen(s), false, true, &n);

        assert_int_equal(n, 5);
        assert_int_equal(ids[1], byte_token(0xFF));
        assert_int_equal(ids[3], byte_token(0xE2));
        assert_int_equal(ids[4], byte_token(0x82));
        assert_round_trip(tok, s, strlen(s), true);
}

/* ---- streaming ---- */

static void stream_feed_all(struct tok_stream *st, const int32_t *ids, size_t n, char *out,
                            size_t *w, size_t cap)
{
        char buf[64];

        for (size_t i = 0; i < n; i++) {
                int k = tok_stream_feed(st, ids[i], buf, sizeof buf);

                assert_true(k >= 0);
                assert_true(valid_utf8(buf, (size_t)k));
                assert_true(*w + (size_t)k <= cap);
                memcpy(out + *w, buf, (size_t)k);
                *w += (size_t)k;
        }
        for (int k; (k = tok_stream_flush(st, buf, sizeof buf)) > 0; *w += (size_t)k) {
                assert_true(*w + (size_t)k <= cap);
                memcpy(out + *w, buf, (size_t)k);
        }
}

static void stream_never_splits_utf8(void **state)
{
        static const char s[] = "héllo 😀👨‍👩‍👧‍👦🇯🇵 日本語 ๑๒๓ <｜User｜> done";
        size_t n, w = 0;
        char out[512];
        _cleanup_free_ int32_t *ids = encode(tok, s, strlen(s), false, true, &n);
        struct tok_stream *st = tok_stream_new(tok, true);

        assert_non_null(st);
        stream_feed_all(st, ids, n, out, &w, sizeof out);
        assert_int_equal(w, strlen(s));
        assert_memory_equal(out, s, w);
        tok_stream_free(st);
}

static void stream_holds_partial_emoji_bytes(void **state)
{
        static const uint8_t grin[] = { 0xF0, 0x9F, 0x98, 0x80 };
        struct tok_stream *st = tok_stream_new(tok, false);
        char buf[64];

        assert_non_null(st);
        for (int i = 0; i < 3; i++)
                assert_int_equal(tok_stream_feed(st, byte_token(grin[i]), buf, sizeof buf), 0);
        assert_int_equal(tok_stream_feed(st, byte_token(grin[3]), buf, sizeof buf), 4);
        assert_memory_equal(buf, grin, 4);
        assert_int_equal(tok_stream_flush(st, buf, sizeof buf), 0);
        tok_stream_free(st);
}

static void stream_replaces_invalid_bytes(void **state)
{
        struct tok_stream *st = tok_stream_new(tok, false);
        char buf[64];

        assert_non_null(st);
        /* E2 82 then 'a': the held sequence turns out invalid */
        assert_int_equal(tok_stream_feed(st, byte_token(0xE2), buf, sizeof buf), 0);
        assert_int_equal(tok_stream_feed(st, byte_token(0x82), buf, sizeof buf), 0);
        assert_int_equal(tok_stream_feed(st, byte_token('a'), buf, sizeof buf), 4);
        assert_memory_equal(buf, "\xEF\xBF\xBD" "a", 4);
        /* a lone 0xFF can never start a character */
        assert_int_equal(tok_stream_feed(st, byte_token(0xFF), buf, sizeof buf), 3);
        assert_memory_equal(buf, "\xEF\xBF\xBD", 3);
        /* an incomplete sequence left at the end */
        assert_int_equal(tok_stream_feed(st, byte_token(0xF0), buf, sizeof buf), 0);
        assert_int_equal(tok_stream_flush(st, buf, sizeof buf), 3);
        assert_memory_equal(buf, "\xEF\xBF\xBD", 3);
        assert_int_equal(tok_stream_flush(st, buf, sizeof buf), 0);
        assert_int_equal(tok_stream_feed(st, V3_N_VOCAB, buf, sizeof buf), -EINVAL);
        tok_stream_free(st);
}

static void stream_carries_over_pieces_longer_than_cap(void **state)
{
        int32_t longest = -1;
        int longest_len = 0;
        char piece[1024], out[2048];
        size_t w = 0;
        struct tok_stream *st = tok_stream_new(tok, false);

        for (int32_t id = 0; id < V3_N_VOCAB; id++) {
                int k = tok_piece(tok, id, false, piece, sizeof piece);

                if (k > longest_len && valid_utf8(piece, (size_t)k)) {
                        longest_len = k;
                        longest = id;
                }
        }
        assert_true(longest_len > 64);
        tok_piece(tok, longest, false, piece, sizeof piece);
        stream_feed_all(st, &longest, 1, out, &w, sizeof out);
        assert_int_equal(w, longest_len);
        assert_memory_equal(out, piece, w);
        tok_stream_free(st);
}

/* ---- pre-tokenizers ---- */

static void assert_pieces(const struct tokenizer *t, const char *s, const char *const *want)
{
        struct tok_str *p = NULL;
        size_t n, k = 0;
        struct moerr e = {{0}};

        assert_int_equal(tok_pretokenize(t, s, strlen(s), true, &p, &n, &e), 0);
        for (; want[k]; k++) {
                if (k >= n || p[k].len != strlen(want[k]) || memcmp(p[k].s, want[k], p[k].len) != 0) {
                        print_error("%s: piece %zu is \"%.*s\", want \"%s\"\n", s, k,
                                    k < n ? (int)p[k].len : 0, k < n ? p[k].s : "", want[k]);
                        for (size_t i = 0; i < n; i++)
                                print_error("  [%zu] \"%.*s\"\n", i, (int)p[i].len, p[i].s);
                        fail();
                }
        }
        assert_int_equal(n, k);
        free(p);
}

#define PIECES(t, s, ...) assert_pieces(t, s, (const char *const[]){ __VA_ARGS__, NULL })

static void deepseek_v3_pretokenizer_splits(void **state)
{
        PIECES(tok, "1234567", "123", "456", "7");
        PIECES(tok, "abc日本語テキストdef", "abc", "日本語テキスト", "def");
        PIECES(tok, "Hello, world!", "Hello", ",", " world", "!");
        PIECES(tok, "a  b", "a", " ", " b");
        PIECES(tok, "x.y", "x", ".y");
        PIECES(tok, "end.\n\nNext", "end", ".\n\n", "Next");
        PIECES(tok, "a   \n  b", "a", "   \n", " ", " b");
        PIECES(tok, "<｜User｜>hi", "<｜User｜>", "hi");
}

/* Expected pieces worked out by hand from llama.cpp's DEEPSEEK_LLM regexes:
 * [\r\n] | \s?letters | \s?punct | \s+$ | CJK/Hangul | \p{N}+, each split
 * keeping matches and the text between them. */
static void deepseek_llm_pretokenizer_splits(void **state)
{
        struct tok_spec spec = vj.spec;
        struct tokenizer *t = NULL;
        struct moerr e = {{0}};

        spec.pre = "deepseek-llm";
        assert_int_equal(tok_new(&spec, &t, &e), 0);
        PIECES(t, "Hello, world! 123\nfoo  bar", "Hello", ",", " world", "!", " ", "123", "\n",
               "foo", " ", " bar");
        PIECES(t, "12345678", "12345678");
        PIECES(t, "abc123", "abc", "123");
        PIECES(t, "x  ", "x", "  ");
        PIECES(t, "a\r\nb", "a", "\r", "\n", "b");
        PIECES(t, "你好世界abc", "你好世界", "abc");
        PIECES(t, "안녕 하세요", "안녕", " ", "하세요");
        PIECES(t, "Привет, мир", "Привет", ",", " мир");
        PIECES(t, "x = (a+b);", "x", " =", " (", "a", "+", "b", ");");
        PIECES(t, "中文，标点。", "中文", "，", "标点", "。");
        PIECES(t, "ひらがな", "ひらがな");
        PIECES(t, "don't", "don", "'", "t");
        tok_free(t);
}

/* ---- construction errors ---- */

static void expect_tok_new_error(const struct tok_spec *spec, int err, const char *needle)
{
        struct tokenizer *t = (struct tokenizer *)spec; /* must be reset */
        struct moerr e = {{0}};

        assert_int_equal(tok_new(spec, &t, &e), err);
        assert_null(t);
        if (!strstr(e.msg, needle))
                print_error("message \"%s\" lacks \"%s\"\n", e.msg, needle);
        assert_non_null(strstr(e.msg, needle));
}

static void tok_new_rejects_bad_specs(void **state)
{
        static const struct tok_str tokens[] = { { "a", 1 }, { "b", 1 }, { "ab", 2 } };
        static const struct tok_str bad_merge[] = { { "a c", 3 } };
        static const struct tok_str good_merge[] = { { "a b", 3 } };
        struct tok_spec spec = { .pre = "deepseek-v3", .n_vocab = 3, .tokens = tokens,
                                 .n_merges = 1, .merges = good_merge, .bos = -1, .eos = -1 };
        struct tokenizer *t = NULL;
        struct moerr e = {{0}};
        size_t n;
        int32_t *ids;

        assert_int_equal(tok_new(&spec, &t, &e), 0);
        ids = encode(t, "ab", 2, false, false, &n);
        assert_int_equal(n, 1);
        assert_int_equal(ids[0], 2);
        free(ids);
        tok_free(t);

        spec.merges = bad_merge;
        expect_tok_new_error(&spec, -EINVAL, "not in the vocabulary");
        spec.merges = good_merge;
        spec.n_vocab = 0;
        expect_tok_new_error(&spec, -EINVAL, "empty vocabulary");
        spec.n_vocab = 3;
        spec.bos = 3;
        expect_tok_new_error(&spec, -EINVAL, "BOS id 3 out of range");
        spec.bos = -1;
        spec.add_bos = true;
        expect_tok_new_error(&spec, -EINVAL, "no BOS");
        spec.add_bos = false;
        spec.pre = "qwen2";
        expect_tok_new_error(&spec, -EOPNOTSUPP, "deepseek-v3, deepseek-llm");
}

/* ---- vocab-json ---- */

static void vocab_json_matches_the_converter(void **state)
{
        const struct tok_spec *s = &vj.spec;

        assert_int_equal(s->n_vocab, V3_N_VOCAB);
        assert_string_equal(s->pre, "deepseek-v3");
        assert_int_equal(s->n_merges, 127741);
        assert_int_equal(s->merges[0].len, strlen("Ġ t"));
        assert_memory_equal(s->merges[0].s, "Ġ t", strlen("Ġ t"));
        assert_int_equal(s->types[0], TOK_CONTROL);
        assert_int_equal(s->types[128803], TOK_CONTROL); /* special: false, but looks special */
        assert_int_equal(s->types[128805], TOK_CONTROL);
        assert_int_equal(s->types[5000], TOK_NORMAL);
        assert_int_equal(s->types[128815], TOK_UNUSED);
        assert_int_equal(s->tokens[128815].len, strlen("[PAD128815]"));
        assert_memory_equal(s->tokens[128815].s, "[PAD128815]", s->tokens[128815].len);
        assert_int_equal(s->bos, 0);
        assert_int_equal(s->eos, 1);
        assert_true(s->add_bos);
        assert_non_null(vj.chat_template);
        assert_non_null(strstr(vj.chat_template, "<｜Assistant｜>"));
}

static void vocab_json_loads_fast(void **state)
{
        struct vocab_json v;
        struct moerr e = {{0}};
        double t0 = now(), dt;

        assert_int_equal(vocab_json_load(vocab_path(), 0, &v, &e), 0);
        dt = now() - t0;
        fprintf(stderr, "vocab_json_load: %.0f ms\n", dt * 1e3);
        assert_int_equal(v.spec.n_vocab, 128815);
        /* about half a second in a release build (mostly jansson's parse);
         * sanitizers make it several times slower */
        assert_true(dt < (sanitized ? 15.0 : 2.0));
        vocab_json_free(&v);
}

static char *write_file(const char *name, const char *text)
{
        char *path = tu_path(name);
        FILE *f = fopen(path, "w");

        assert_non_null(f);
        fputs(text, f);
        fclose(f);
        return path;
}

static void vocab_json_reads_array_merges_and_added_tokens(void **state)
{
        const char *dir = tu_tmpdir();
        _cleanup_free_ char *sub = NULL, *cfg = NULL, *tj = NULL;
        struct vocab_json v;
        struct moerr e = {{0}};
        FILE *f;

        assert_true(asprintf(&sub, "%s/arr", dir) > 0);
        assert_int_equal(mkdir(sub, 0700), 0);
        assert_true(asprintf(&tj, "%s/tokenizer.json", sub) > 0);
        assert_true(asprintf(&cfg, "%s/tokenizer_config.json", sub) > 0);
        f = fopen(tj, "w");
        assert_non_null(f);
        fputs("{\"added_tokens\": [{\"id\": 5, \"content\": \"<s>\", \"special\": true},"
              " {\"id\": 6, \"content\": \"my▁word\", \"special\": false},"
              " {\"id\": 7, \"content\": \"<|x|>\", \"special\": false}],"
              " \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2},"
              " \"merges\": [[\"a\", \"b\"]]}}", f);
        fclose(f);
        f = fopen(cfg, "w");
        assert_non_null(f);
        fputs("{\"bos_token\": \"<s>\", \"eos_token\": {\"content\": \"<|x|>\"},"
              " \"add_bos_token\": false, \"chat_template\": \"T\"}", f);
        fclose(f);
        assert_int_equal(vocab_json_load(tj, 10, &v, &e), 0);
        assert_int_equal(v.spec.n_vocab, 10);
        assert_int_equal(v.spec.n_merges, 1);
        assert_int_equal(v.spec.merges[0].len, 3);
        assert_memory_equal(v.spec.merges[0].s, "a b", 3);
        assert_int_equal(v.types[5], TOK_CONTROL);
        assert_int_equal(v.types[6], TOK_USER_DEFINED);
        assert_memory_equal(v.tokens[6].s, "my word", 7); /* U+2581 pre-normalized */
        assert_int_equal(v.types[7], TOK_CONTROL);
        assert_int_equal(v.types[3], TOK_UNUSED);
        assert_memory_equal(v.tokens[9].s, "[PAD9]", 6);
        assert_int_equal(v.spec.bos, 5);
        assert_int_equal(v.spec.eos, 7);
        assert_false(v.spec.add_bos);
        assert_string_equal(v.chat_template, "T");
        vocab_json_free(&v);

        assert_int_equal(vocab_json_load(tj, 4, &v, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "more than n_vocab"));
}

static void vocab_json_rejects_bad_files(void **state)
{
        char *bad = write_file("bad.json", "{\"model\": ");
        char *nomodel = write_file("nomodel.json", "{\"x\": 1}");
        struct vocab_json v;
        struct moerr e = {{0}};

        assert_int_equal(vocab_json_load("/nonexistent/tokenizer.json", 0, &v, &e), -ENOENT);
        assert_non_null(strstr(e.msg, "/nonexistent/tokenizer.json"));
        assert_int_equal(vocab_json_load(bad, 0, &v, &e), -EINVAL);
        assert_int_equal(vocab_json_load(nomodel, 0, &v, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "BPE"));
}

/* ---- GGUF ---- */

static struct gguf *v3_gguf(const char *model, const char *pre, void **mem)
{
        struct gguf_writer *w = gguf_writer_new();
        const struct tok_spec *s = &vj.spec;
        _cleanup_free_ const char **toks = calloc(s->n_vocab, sizeof *toks);
        _cleanup_free_ size_t *lens = calloc(s->n_vocab, sizeof *lens);
        _cleanup_free_ const char **merges = calloc(s->n_merges, sizeof *merges);
        _cleanup_free_ size_t *mlens = calloc(s->n_merges, sizeof *mlens);
        struct moerr e = {{0}};
        struct gguf *g = NULL;
        size_t size;

        assert_non_null(w);
        for (int64_t i = 0; i < s->n_vocab; i++) {
                toks[i] = s->tokens[i].s;
                lens[i] = s->tokens[i].len;
        }
        for (int64_t i = 0; i < s->n_merges; i++) {
                merges[i] = s->merges[i].s;
                mlens[i] = s->merges[i].len;
        }
        gguf_w_str(w, "general.architecture", "deepseek2");
        gguf_w_str(w, "tokenizer.ggml.model", model);
        if (pre)
                gguf_w_str(w, "tokenizer.ggml.pre", pre);
        gguf_w_arr_str(w, "tokenizer.ggml.tokens", toks, lens, (uint64_t)s->n_vocab);
        gguf_w_arr(w, "tokenizer.ggml.token_type", GGUF_I32, s->types, (uint64_t)s->n_vocab);
        gguf_w_arr_str(w, "tokenizer.ggml.merges", merges, mlens, (uint64_t)s->n_merges);
        gguf_w_u32(w, "tokenizer.ggml.bos_token_id", 0);
        gguf_w_u32(w, "tokenizer.ggml.eos_token_id", 1);
        gguf_w_bool(w, "tokenizer.ggml.add_bos_token", true);
        if (gguf_writer_write_mem(w, mem, &size, &e) < 0)
                print_error("gguf write: %s\n", e.msg);
        gguf_writer_free(w);
        assert_non_null(*mem);
        if (gguf_open_buffer(*mem, size, &g, &e) < 0)
                print_error("gguf open: %s\n", e.msg);
        assert_non_null(g);
        return g;
}

static void gguf_tokenizer_equals_json_tokenizer(void **state)
{
        void *mem = NULL;
        struct gguf *g = v3_gguf("gpt2", "deepseek-v3", &mem);
        struct tokenizer *t = NULL;
        struct moerr e = {{0}};
        static const char s[] = "<｜User｜>Hello, 世界! 12345 😀\n\tcode();";
        size_t n1, n2;
        int r = tok_new_from_gguf(g, &t, &e);

        if (r < 0)
                print_error("tok_new_from_gguf: %s\n", e.msg);
        assert_int_equal(r, 0);
        _cleanup_free_ int32_t *a = encode(t, s, strlen(s), true, true, &n1);
        _cleanup_free_ int32_t *b = encode(tok, s, strlen(s), true, true, &n2);
        assert_int_equal(n1, n2);
        assert_memory_equal(a, b, n1 * sizeof *a);
        assert_int_equal(tok_n_vocab(t), V3_N_VOCAB);
        assert_true(tok_add_bos(t));
        assert_true(tok_is_eog(t, 1));
        tok_free(t);
        gguf_close(g);
        free(mem);
}

static void gguf_rejects_unknown_model_and_pre(void **state)
{
        struct tokenizer *t = NULL;
        struct moerr e = {{0}};
        void *mem = NULL;
        struct gguf *g = v3_gguf("llama", "deepseek-v3", &mem);

        assert_int_equal(tok_new_from_gguf(g, &t, &e), -EOPNOTSUPP);
        assert_non_null(strstr(e.msg, "\"llama\""));
        gguf_close(g);
        free(mem);
        g = v3_gguf("gpt2", "qwen2", &mem);
        assert_int_equal(tok_new_from_gguf(g, &t, &e), -EOPNOTSUPP);
        assert_non_null(strstr(e.msg, "\"qwen2\""));
        assert_non_null(strstr(e.msg, "deepseek-v3, deepseek-llm"));
        gguf_close(g);
        free(mem);
        g = v3_gguf("gpt2", NULL, &mem);
        assert_int_equal(tok_new_from_gguf(g, &t, &e), -EOPNOTSUPP);
        assert_non_null(strstr(e.msg, "tokenizer.ggml.pre"));
        assert_null(t);
        gguf_close(g);
        free(mem);
}

/* ---- speed and pathological inputs ---- */

static void encode_is_fast_and_survives_long_runs(void **state)
{
        json_t *ref = corpus(), *item;
        size_t cap = 2u << 20, len = 0, n, i;
        _cleanup_free_ char *text = malloc(cap);
        double t0, dt;

        assert_non_null(text);
        while (len < cap - 65536)
                json_array_foreach(ref, i, item) {
                        size_t l = json_string_length(json_object_get(item, "text"));

                        if (len + l + 1 >= cap)
                                break;
                        memcpy(text + len, json_string_value(json_object_get(item, "text")), l);
                        len += l;
                        text[len++] = ' ';
                }
        t0 = now();
        free(encode(tok, text, len, false, false, &n));
        dt = now() - t0;
        fprintf(stderr, "encode: %.2f MB in %.3f s = %.2f MB/s, %.0f tokens/s\n", len / 1e6, dt,
                len / 1e6 / dt, n / dt);
        /* several MB/s in a release build; this only catches blow-ups */
        assert_true(len / 1e6 / dt > 0.05);

        /* single huge pieces: BPE and the regexes must stay near-linear */
        static const char *const fills[] = { " ", "a", "\n", " \n", "1", "中", "!", "é" };
        for (size_t k = 0; k < ARRAY_SIZE(fills); k++) {
                size_t fl = strlen(fills[k]), total = 0;

                while (total + fl <= (256u << 10)) {
                        memcpy(text + total, fills[k], fl);
                        total += fl;
                }
                t0 = now();
                assert_round_trip(tok, text, total, false);
                dt = now() - t0;
                assert_true(dt < 30.0);
        }
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(vocab_json_matches_the_converter),
                cmocka_unit_test(vocab_json_loads_fast),
                cmocka_unit_test(vocab_json_reads_array_merges_and_added_tokens),
                cmocka_unit_test(vocab_json_rejects_bad_files),
                cmocka_unit_test(tok_new_rejects_bad_specs),
                cmocka_unit_test(known_ids_of_the_v3_vocab),
                cmocka_unit_test(encode_matches_js_reference_on_corpus),
                cmocka_unit_test(decode_round_trips_corpus),
                cmocka_unit_test(random_bytes_round_trip),
                cmocka_unit_test(special_tokens_match_only_with_parse_special),
                cmocka_unit_test(bos_text_parses_to_bos_id),
                cmocka_unit_test(special_token_is_cut_out_of_surrounding_text),
                cmocka_unit_test(user_defined_tokens_always_match),
                cmocka_unit_test(add_bos_prepends_bos),
                cmocka_unit_test(end_of_generation_tokens),
                cmocka_unit_test(piece_renders_control_tokens_only_when_asked),
                cmocka_unit_test(invalid_utf8_is_encoded_byte_by_byte),
                cmocka_unit_test(stream_never_splits_utf8),
                cmocka_unit_test(stream_holds_partial_emoji_bytes),
                cmocka_unit_test(stream_replaces_invalid_bytes),
                cmocka_unit_test(stream_carries_over_pieces_longer_than_cap),
                cmocka_unit_test(deepseek_v3_pretokenizer_splits),
                cmocka_unit_test(deepseek_llm_pretokenizer_splits),
                cmocka_unit_test(gguf_tokenizer_equals_json_tokenizer),
                cmocka_unit_test(gguf_rejects_unknown_model_and_pre),
                cmocka_unit_test(encode_is_fast_and_survives_long_runs),
        };

        return cmocka_run_group_tests(tests, setup, teardown);
}
