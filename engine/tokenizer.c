/* tokenizer: byte-level BPE for DeepSeek vocabularies. Owns the GPT-2 byte
 * map, the merge table (keyed by pairs of token ids), the PCRE2
 * pre-tokenizers, special-token matching and the UTF-8-safe detokenizer. */
#define PCRE2_CODE_UNIT_WIDTH 8

#include "engine/tokenizer.h"

#include <errno.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cleanup.h"
#include "engine/gguf.h"

#define TOK_MAX_RE 6

/* Unicode White_Space spelled out instead of \s: PCRE2's \s also takes
 * U+180E, JavaScript's takes U+FEFF, while Hugging Face tokenizers and
 * llama.cpp use exactly this property. */
#define WS "\\t\\n\\x{0B}\\f\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}" \
           "\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"

/* deepseek-v3: the three Isolated splits of the tokenizer.json. */
static const char *const re_deepseek3[] = {
        "\\p{N}{1,3}",
        "[\\x{4E00}-\\x{9FA5}\\x{3040}-\\x{309F}\\x{30A0}-\\x{30FF}]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
        "|[^\\r\\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
        "| ?[\\p{P}\\p{S}]+[\\r\\n]*"
        "|[" WS "]*[\\r\\n]+"
        "|[" WS "]+(?![^" WS "])"
        "|[" WS "]+",
        NULL,
};

/* deepseek-llm: llama.cpp's classes for DeepSeek-LLM/V2, the letter class
 * copied code point by code point (escaped so no editor can normalize it). */
#define LLM_LETTERS \
        "A-Za-z\\x{B5}\\x{C0}-\\x{D6}\\x{D8}-\\x{F6}\\x{F8}-\\x{1BA}\\x{1BC}-\\x{1BF}" \
        "\\x{1C4}-\\x{293}\\x{295}-\\x{2AF}\\x{370}-\\x{373}\\x{376}\\x{377}\\x{37B}-\\x{37D}" \
        "\\x{37F}\\x{386}\\x{388}-\\x{38A}\\x{38C}\\x{38E}-\\x{3A1}\\x{3A3}-\\x{3F5}" \
        "\\x{3F7}-\\x{481}\\x{48A}-\\x{52F}\\x{531}-\\x{556}\\x{10A0}-\\x{10C5}" \
        "\\x{13A0}-\\x{13F5}\\x{13F8}-\\x{13FD}\\x{1C90}-\\x{1CBA}\\x{1CBD}-\\x{1CBF}" \
        "\\x{1D00}-\\x{1D2B}\\x{1D6B}-\\x{1D77}\\x{1D79}-\\x{1D9A}\\x{1E00}-\\x{1F15}" \
        "\\x{1F18}-\\x{1F1D}\\x{1F20}-\\x{1F45}\\x{1F48}-\\x{1F4D}\\x{1F50}-\\x{1F57}" \
        "\\x{1F59}\\x{1F5B}\\x{1F5D}\\x{1F5F}-\\x{1F7D}\\x{1F80}-\\x{1FB4}\\x{1FB6}-\\x{1FBC}" \
        "\\x{1FBE}\\x{1FC2}-\\x{1FC4}\\x{1FC6}-\\x{1FCC}\\x{1FD0}-\\x{1FD3}\\x{1FD6}-\\x{1FDB}" \
        "\\x{1FE0}-\\x{1FEC}\\x{1FF2}-\\x{1FF4}\\x{1FF6}-\\x{1FFC}\\x{2102}\\x{2107}" \
        "\\x{210A}-\\x{2113}\\x{2115}\\x{2119}-\\x{211D}\\x{2124}\\x{2126}\\x{2128}" \
        "\\x{212A}-\\x{212D}\\x{212F}-\\x{2134}\\x{2139}\\x{213C}-\\x{213F}\\x{2145}-\\x{2149}" \
        "\\x{214E}\\x{2183}\\x{2184}\\x{2C00}-\\x{2C7B}\\x{2C7E}-\\x{2CE4}\\x{2CEB}-\\x{2CEE}" \
        "\\x{2CF2}\\x{2CF3}\\x{A640}-\\x{A66D}\\x{A680}-\\x{A69B}\\x{A722}-\\x{A76F}" \
        "\\x{A771}-\\x{A787}\\x{A78B}-\\x{A78E}\\x{AB70}-\\x{ABBF}\\x{FB00}-\\x{FB06}" \
        "\\x{FB13}-\\x{FB17}\\x{FF21}-\\x{FF3A}\\x{FF41}-\\x{FF5A}\\x{10400}-\\x{1044F}" \
        "\\x{104B0}-\\x{104D3}\\x{104D8}-\\x{104FB}\\x{10C80}-\\x{10CB2}\\x{10CC0}-\\x{10CF2}" \
        "\\x{118A0}-\\x{118DF}\\x{1E900}-\\x{1E943}"

static const char *const re_deepseek_llm[] = {
        "[\\r\\n]",
        "[" WS "]?[" LLM_LETTERS "]+",
        "[" WS "]?[!-/:-~\\x{FF01}-\\x{FF0F}\\x{FF1A}-\\x{FF5E}\\x{2018}-\\x{201F}"
        "\\x{3000}-\\x{3002}]+",
        "[" WS "]+$",
        "[\\x{4E00}-\\x{9FA5}\\x{800}-\\x{4E00}\\x{AC00}-\\x{D7FF}]+",
        "\\p{N}+",
        NULL,
};

static const struct {
        const char *name;
        const char *const *re;
} pre_types[] = {
        { "deepseek-v3", re_deepseek3 },
        { "deepseek-llm", re_deepseek_llm },
};

/* Texts of control tokens that end a turn besides EOS (llama.cpp's list,
 * cut to those a DeepSeek-family vocabulary may carry). */
static const char *const eog_texts[] = {
        "<|EOT|>", "<|eot_id|>", "<|im_end|>", "<|endoftext|>", "<｜end▁of▁sentence｜>",
};

struct trie_node {
        int32_t child, sibling; /* first child, next sibling; -1 for none */
        int32_t id;             /* token ending here, or -1 */
        uint8_t byte;
};

struct tokenizer {
        int64_t n_vocab;
        char pre[32];
        char *text_blob;               /* token texts as stored, NUL-separated */
        struct tok_str *tokens;
        int32_t *types;
        char *piece_blob;              /* bytes each token decodes to */
        uint32_t *piece_off, *piece_len;

        int32_t *str_ids;              /* open addressing: token text -> id */
        size_t str_mask;
        uint64_t *pair_keys;           /* open addressing: (left, right) -> merge */
        int32_t *pair_rank, *pair_merged;
        size_t pair_mask;

        int32_t byte_tok[256];         /* token of each single byte, or -1 */
        struct trie_node *trie;        /* special and added tokens; node 0 is the root */
        int32_t n_trie;
        bool special_first[256];

        pcre2_code *re[TOK_MAX_RE];
        int n_re;

        int32_t bos, eos;
        bool add_bos;
        int32_t eog[8];
        int n_eog;
};

/* ---- GPT-2 byte map ---- */

static bool byte_is_printable(int b)
{
        return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
}

/* Code point that byte b is written as in byte-level token texts: the 68
 * unprintable bytes (0x00-0x20, 0x7F-0xA0, 0xAD) take U+0100 onwards in order. */
static uint32_t byte_to_cp(int b)
{
        if (byte_is_printable(b))
                return (uint32_t)b;
        if (b <= 0x20)
                return 256u + (uint32_t)b;
        if (b <= 0xA0)
                return 256u + 33u + (uint32_t)(b - 0x7F);
        return 256u + 67u; /* 0xAD */
}

/* Byte that code point cp stands for, or -1 when it is not a mapped one. */
static int cp_to_byte(uint32_t cp)
{
        if (cp < 256)
                return byte_is_printable((int)cp) ? (int)cp : -1;
        if (cp <= 256 + 32)
                return (int)(cp - 256);
        if (cp <= 256 + 66)
                return (int)(cp - 256 - 33 + 0x7F);
        return cp == 256 + 67 ? 0xAD : -1;
}

static size_t utf8_put(uint32_t cp, char *out)
{
        if (cp < 0x80) {
                out[0] = (char)cp;
                return 1;
        }
        if (cp < 0x800) {
                out[0] = (char)(0xC0 | cp >> 6);
                out[1] = (char)(0x80 | (cp & 0x3F));
                return 2;
        }
        if (cp < 0x10000) {
                out[0] = (char)(0xE0 | cp >> 12);
                out[1] = (char)(0x80 | (cp >> 6 & 0x3F));
                out[2] = (char)(0x80 | (cp & 0x3F));
                return 3;
        }
        out[0] = (char)(0xF0 | cp >> 18);
        out[1] = (char)(0x80 | (cp >> 12 & 0x3F));
        out[2] = (char)(0x80 | (cp >> 6 & 0x3F));
        out[3] = (char)(0x80 | (cp & 0x3F));
        return 4;
}

/* Strict UTF-8 (no overlongs, surrogates or code points past U+10FFFF, the
 * rules PCRE2 checks). Returns the length of the sequence at s, 0 when the
 * n bytes are a valid but incomplete start, or -k when the first k bytes
 * are an invalid maximal subpart (each becomes one U+FFFD). */
static int utf8_check(const uint8_t *s, size_t n)
{
        uint8_t b = s[0], lo = 0x80, hi = 0xBF;
        int need;

        if (b < 0x80)
                return 1;
        if (b < 0xC2)
                return -1;
        if (b < 0xE0) {
                need = 1;
        } else if (b < 0xF0) {
                need = 2;
                lo = b == 0xE0 ? 0xA0 : 0x80;
                hi = b == 0xED ? 0x9F : 0xBF;
        } else if (b < 0xF5) {
                need = 3;
                lo = b == 0xF0 ? 0x90 : 0x80;
                hi = b == 0xF4 ? 0x8F : 0xBF;
        } else {
                return -1;
        }
        for (int k = 1; k <= need; k++) {
                if ((size_t)k >= n)
                        return 0;
                if (s[k] < lo || s[k] > hi)
                        return -k;
                lo = 0x80;
                hi = 0xBF;
        }
        return need + 1;
}

static uint32_t utf8_decode(const uint8_t *s, int len)
{
        static const uint8_t lead_mask[] = { 0, 0x7F, 0x1F, 0x0F, 0x07 };
        uint32_t cp = s[0] & lead_mask[len];

        for (int k = 1; k < len; k++)
                cp = cp << 6 | (s[k] & 0x3F);
        return cp;
}

/* Length of the longest valid UTF-8 prefix of s. */
static size_t utf8_valid_prefix(const uint8_t *s, size_t n)
{
        size_t i = 0;

        while (i < n) {
                int l;

                if (s[i] < 0x80) {
                        i++;
                        continue;
                }
                l = utf8_check(s + i, n - i);
                if (l <= 0)
                        break;
                i += (size_t)l;
        }
        return i;
}

/* ---- hash tables ---- */

static uint64_t hash_bytes(const char *s, size_t n)
{
        uint64_t h = 0xcbf29ce484222325ull;

        for (size_t i = 0; i < n; i++)
                h = (h ^ (uint8_t)s[i]) * 0x100000001b3ull;
        return h ^ h >> 29;
}

static size_t table_size(int64_t n)
{
        size_t size = 64;

        while (size < (size_t)n * 2)
                size <<= 1;
        return size;
}

static int32_t str_lookup(const struct tokenizer *t, const char *s, size_t n)
{
        for (size_t i = hash_bytes(s, n) & t->str_mask;; i = (i + 1) & t->str_mask) {
                int32_t id = t->str_ids[i];

                if (id < 0)
                        return -1;
                if (t->tokens[id].len == n && memcmp(t->tokens[id].s, s, n) == 0)
                        return id;
        }
}

/* Later ids win over earlier ones with the same text, as in llama.cpp. */
static void str_insert(struct tokenizer *t, int32_t id)
{
        const struct tok_str *k = &t->tokens[id];

        for (size_t i = hash_bytes(k->s, k->len) & t->str_mask;; i = (i + 1) & t->str_mask) {
                int32_t old = t->str_ids[i];

                if (old < 0 || (t->tokens[old].len == k->len &&
                                memcmp(t->tokens[old].s, k->s, k->len) == 0)) {
                        t->str_ids[i] = id;
                        return;
                }
        }
}

static inline uint64_t pair_key(int32_t a, int32_t b)
{
        return (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
}

static inline size_t pair_slot(uint64_t key, size_t mask)
{
        key *= 0x9E3779B97F4A7C15ull;
        return (size_t)(key ^ key >> 31) & mask;
}

#define PAIR_EMPTY UINT64_MAX

/* Returns the merge's rank and result, or -1 when the pair does not merge. */
static inline int32_t pair_lookup(const struct tokenizer *t, int32_t a, int32_t b, int32_t *merged)
{
        uint64_t key = pair_key(a, b);

        for (size_t i = pair_slot(key, t->pair_mask);; i = (i + 1) & t->pair_mask) {
                if (t->pair_keys[i] == key) {
                        *merged = t->pair_merged[i];
                        return t->pair_rank[i];
                }
                if (t->pair_keys[i] == PAIR_EMPTY)
                        return -1;
        }
}

/* The first rank of a pair listed twice wins, as in llama.cpp. */
static void pair_insert(struct tokenizer *t, int32_t a, int32_t b, int32_t rank, int32_t merged)
{
        uint64_t key = pair_key(a, b);
        size_t i = pair_slot(key, t->pair_mask);

        while (t->pair_keys[i] != PAIR_EMPTY && t->pair_keys[i] != key)
                i = (i + 1) & t->pair_mask;
        if (t->pair_keys[i] == key)
                return;
        t->pair_keys[i] = key;
        t->pair_rank[i] = rank;
        t->pair_merged[i] = merged;
}

/* ---- construction ---- */

static bool type_is_special(int32_t type)
{
        return type == TOK_CONTROL || type == TOK_USER_DEFINED || type == TOK_UNKNOWN;
}

static int copy_tokens(struct tokenizer *t, const struct tok_spec *spec, struct moerr *e)
{
        size_t total = 0, n;
        char *p;

        if (spec->n_vocab <= 0 || spec->n_vocab > INT32_MAX)
                return moerr_set(e, -EINVAL, "bad vocabulary size");
        n = (size_t)spec->n_vocab;
        for (int64_t i = 0; i < spec->n_vocab; i++) {
                if (!spec->tokens[i].s && spec->tokens[i].len)
                        return moerr_set(e, -EINVAL, "token %lld has no text", (long long)i);
                total += spec->tokens[i].len + 1;
        }
        t->tokens = calloc(n, sizeof *t->tokens);
        t->types = calloc(n, sizeof *t->types);
        t->text_blob = p = malloc(total ? total : 1);
        if (!t->tokens || !t->types || !p)
                return moerr_set(e, -ENOMEM, "out of memory");
        for (int64_t i = 0; i < spec->n_vocab; i++) {
                int32_t type = spec->types ? spec->types[i] : TOK_NORMAL;

                if (type < 0 || type > TOK_BYTE)
                        return moerr_set(e, -EINVAL, "token %lld has unknown type %d",
                                         (long long)i, type);
                if (spec->tokens[i].len)
                        memcpy(p, spec->tokens[i].s, spec->tokens[i].len);
                p[spec->tokens[i].len] = '\0';
                t->tokens[i] = (struct tok_str){ p, spec->tokens[i].len };
                t->types[i] = type ? type : TOK_NORMAL;
                p += spec->tokens[i].len + 1;
        }
        return 0;
}

/* Normal tokens are stored byte-level: undo the map. Code points outside
 * it (not in a proper byte-level vocabulary) pass through as they are. */
static size_t decode_byte_level(const struct tok_str *s, char *out)
{
        const uint8_t *p = (const uint8_t *)s->s;
        size_t i = 0, n = 0;

        while (i < s->len) {
                int l = utf8_check(p + i, s->len - i), b;

                if (l <= 0) {
                        out[n++] = (char)p[i++];
                        continue;
                }
                b = l > 1 ? cp_to_byte(utf8_decode(p + i, l)) : (byte_is_printable(p[i]) ? p[i] : -1);
                if (b >= 0) {
                        out[n++] = (char)b;
                } else {
                        memcpy(out + n, p + i, (size_t)l);
                        n += (size_t)l;
                }
                i += (size_t)l;
        }
        return n;
}

static int build_pieces(struct tokenizer *t, struct moerr *e)
{
        size_t total = 0, off = 0;

        for (int64_t i = 0; i < t->n_vocab; i++)
                total += t->tokens[i].len;
        if (total > UINT32_MAX)
                return moerr_set(e, -EFBIG, "token texts too large");
        t->piece_blob = malloc(total ? total : 1);
        t->piece_off = malloc((size_t)t->n_vocab * sizeof *t->piece_off);
        t->piece_len = malloc((size_t)t->n_vocab * sizeof *t->piece_len);
        if (!t->piece_blob || !t->piece_off || !t->piece_len)
                return moerr_set(e, -ENOMEM, "out of memory");
        for (int64_t i = 0; i < t->n_vocab; i++) {
                const struct tok_str *s = &t->tokens[i];
                size_t n = 0;

                switch (t->types[i]) {
                case TOK_NORMAL:
                        n = decode_byte_level(s, t->piece_blob + off);
                        break;
                case TOK_CONTROL:
                case TOK_USER_DEFINED:
                case TOK_UNKNOWN:
                        memcpy(t->piece_blob + off, s->s, s->len);
                        n = s->len;
                        break;
                default: /* unused and byte tokens render as nothing, as in llama.cpp */
                        break;
                }
                t->piece_off[i] = (uint32_t)off;
                t->piece_len[i] = (uint32_t)n;
                off += n;
        }
        return 0;
}

static int build_vocab_map(struct tokenizer *t, struct moerr *e)
{
        size_t size = table_size(t->n_vocab);

        t->str_ids = malloc(size * sizeof *t->str_ids);
        if (!t->str_ids)
                return moerr_set(e, -ENOMEM, "out of memory");
        memset(t->str_ids, 0xff, size * sizeof *t->str_ids);
        t->str_mask = size - 1;
        for (int64_t i = 0; i < t->n_vocab; i++)
                str_insert(t, (int32_t)i);
        for (int b = 0; b < 256; b++) {
                char buf[4];
                size_t n = utf8_put(byte_to_cp(b), buf);

                t->byte_tok[b] = str_lookup(t, buf, n);
        }
        return 0;
}

static int parse_merge(const struct tokenizer *t, const struct tok_str *m, int64_t rank,
                       int32_t ids[3], struct moerr *e)
{
        const char *sp = m->len > 1 ? memchr(m->s + 1, ' ', m->len - 1) : NULL;
        char buf[1024];
        size_t nl, nr;

        if (!sp)
                return moerr_set(e, -EINVAL, "merge %lld \"%.*s\" is not \"left right\"",
                                 (long long)rank, (int)MO_MIN(m->len, 200), m->s);
        nl = (size_t)(sp - m->s);
        nr = m->len - nl - 1;
        if (nl + nr > sizeof buf)
                return moerr_set(e, -EINVAL, "merge %lld is too long", (long long)rank);
        memcpy(buf, m->s, nl);
        memcpy(buf + nl, sp + 1, nr);
        ids[0] = str_lookup(t, m->s, nl);
        ids[1] = str_lookup(t, sp + 1, nr);
        ids[2] = str_lookup(t, buf, nl + nr);
        if (ids[0] < 0 || ids[1] < 0 || ids[2] < 0)
                return moerr_set(e, -EINVAL, "merge %lld \"%.*s\" names a token not in the vocabulary",
                                 (long long)rank, (int)MO_MIN(m->len, 200), m->s);
        return 0;
}

static int build_merges(struct tokenizer *t, const struct tok_spec *spec, struct moerr *e)
{
        size_t size = table_size(spec->n_merges);

        if (spec->n_merges < 0 || spec->n_merges > INT32_MAX || (spec->n_merges && !spec->merges))
                return moerr_set(e, -EINVAL, "bad merge count %lld", (long long)spec->n_merges);
        t->pair_keys = malloc(size * sizeof *t->pair_keys);
        t->pair_rank = malloc(size * sizeof *t->pair_rank);
        t->pair_merged = malloc(size * sizeof *t->pair_merged);
        if (!t->pair_keys || !t->pair_rank || !t->pair_merged)
                return moerr_set(e, -ENOMEM, "out of memory");
        memset(t->pair_keys, 0xff, size * sizeof *t->pair_keys);
        t->pair_mask = size - 1;
        for (int64_t i = 0; i < spec->n_merges; i++) {
                int32_t ids[3];
                int r;

                if (!spec->merges[i].s)
                        return moerr_set(e, -EINVAL, "merge %lld has no text", (long long)i);
                r = parse_merge(t, &spec->merges[i], i, ids, e);
                if (r < 0)
                        return r;
                pair_insert(t, ids[0], ids[1], (int32_t)i, ids[2]);
        }
        return 0;
}

static int32_t trie_child(const struct tokenizer *t, int32_t node, uint8_t byte)
{
        for (int32_t c = t->trie[node].child; c >= 0; c = t->trie[c].sibling)
                if (t->trie[c].byte == byte)
                        return c;
        return -1;
}

static int build_trie(struct tokenizer *t, struct moerr *e)
{
        size_t cap = 1;

        for (int64_t i = 0; i < t->n_vocab; i++)
                if (type_is_special(t->types[i]))
                        cap += t->tokens[i].len;
        t->trie = malloc(cap * sizeof *t->trie);
        if (!t->trie)
                return moerr_set(e, -ENOMEM, "out of memory");
        t->trie[0] = (struct trie_node){ -1, -1, -1, 0 };
        t->n_trie = 1;
        for (int64_t i = 0; i < t->n_vocab; i++) {
                const struct tok_str *s = &t->tokens[i];
                int32_t node = 0;

                if (!type_is_special(t->types[i]) || !s->len)
                        continue;
                t->special_first[(uint8_t)s->s[0]] = true;
                for (size_t k = 0; k < s->len; k++) {
                        uint8_t b = (uint8_t)s->s[k];
                        int32_t c = trie_child(t, node, b);

                        if (c < 0) {
                                c = t->n_trie++;
                                t->trie[c] = (struct trie_node){ -1, t->trie[node].child, -1, b };
                                t->trie[node].child = c;
                        }
                        node = c;
                }
                t->trie[node].id = (int32_t)i;
        }
        return 0;
}

static int compile_pre(struct tokenizer *t, const char *pre, struct moerr *e)
{
        const char *const *re = NULL;

        for (size_t i = 0; i < ARRAY_SIZE(pre_types); i++)
                if (pre && strcmp(pre, pre_types[i].name) == 0)
                        re = pre_types[i].re;
        if (!re)
                return moerr_set(e, -EOPNOTSUPP,
                                 "pre-tokenizer \"%s\" is not supported (supported: deepseek-v3, deepseek-llm)",
                                 pre ? pre : "(none)");
        snprintf(t->pre, sizeof t->pre, "%s", pre);
        for (t->n_re = 0; re[t->n_re]; t->n_re++) {
                int err;
                PCRE2_SIZE off;

                t->re[t->n_re] = pcre2_compile((PCRE2_SPTR)re[t->n_re], PCRE2_ZERO_TERMINATED,
                                               PCRE2_UTF | PCRE2_UCP | PCRE2_DOLLAR_ENDONLY,
                                               &err, &off, NULL);
                if (!t->re[t->n_re]) {
                        PCRE2_UCHAR msg[256];

                        pcre2_get_error_message(err, msg, sizeof msg);
                        return moerr_set(e, -EINVAL, "pre-tokenizer %s regex %d: %s at %zu", pre,
                                         t->n_re, (const char *)msg, (size_t)off);
                }
                /* without JIT (not built in, or no executable memory) the
                 * interpreter gives the same results, only slower */
                (void)pcre2_jit_compile(t->re[t->n_re], PCRE2_JIT_COMPLETE);
        }
        return 0;
}

static void find_eog(struct tokenizer *t)
{
        if (t->eos >= 0)
                t->eog[t->n_eog++] = t->eos;
        for (size_t i = 0; i < ARRAY_SIZE(eog_texts); i++) {
                int32_t id = str_lookup(t, eog_texts[i], strlen(eog_texts[i]));

                if (id >= 0 && id != t->eos && t->types[id] == TOK_CONTROL &&
                    t->n_eog < (int)ARRAY_SIZE(t->eog))
                        t->eog[t->n_eog++] = id;
        }
}

static int check_spec(const struct tok_spec *spec, struct moerr *e)
{
        if (spec->n_vocab <= 0 || !spec->tokens)
                return moerr_set(e, -EINVAL, "empty vocabulary");
        if (spec->n_vocab > INT32_MAX)
                return moerr_set(e, -EINVAL, "vocabulary of %lld tokens is too large",
                                 (long long)spec->n_vocab);
        if (spec->bos < -1 || spec->bos >= spec->n_vocab)
                return moerr_set(e, -EINVAL, "BOS id %d out of range (vocabulary of %lld)",
                                 spec->bos, (long long)spec->n_vocab);
        if (spec->eos < -1 || spec->eos >= spec->n_vocab)
                return moerr_set(e, -EINVAL, "EOS id %d out of range (vocabulary of %lld)",
                                 spec->eos, (long long)spec->n_vocab);
        if (spec->add_bos && spec->bos < 0)
                return moerr_set(e, -EINVAL, "add_bos is set but there is no BOS token");
        return 0;
}

int tok_new(const struct tok_spec *spec, struct tokenizer **out, struct moerr *e)
{
        struct tokenizer *t;
        int r;

        *out = NULL;
        r = check_spec(spec, e);
        if (r < 0)
                return r;
        t = calloc(1, sizeof *t);
        if (!t)
                return moerr_set(e, -ENOMEM, "out of memory");
        t->n_vocab = spec->n_vocab;
        t->bos = spec->bos;
        t->eos = spec->eos;
        t->add_bos = spec->add_bos;
        r = compile_pre(t, spec->pre, e);
        if (r >= 0)
                r = copy_tokens(t, spec, e);
        if (r >= 0)
                r = build_vocab_map(t, e);
        if (r >= 0)
                r = build_merges(t, spec, e);
        if (r >= 0)
                r = build_pieces(t, e);
        if (r >= 0)
                r = build_trie(t, e);
        if (r < 0) {
                tok_free(t);
                return r;
        }
        find_eog(t);
        *out = t;
        return 0;
}

void tok_free(struct tokenizer *t)
{
        if (!t)
                return;
        for (int i = 0; i < t->n_re; i++)
                pcre2_code_free(t->re[i]);
        free(t->text_blob);
        free(t->tokens);
        free(t->types);
        free(t->piece_blob);
        free(t->piece_off);
        free(t->piece_len);
        free(t->str_ids);
        free(t->pair_keys);
        free(t->pair_rank);
        free(t->pair_merged);
        free(t->trie);
        free(t);
}

/* ---- from GGUF ---- */

static int gguf_str_array(const struct gguf *g, const char *key, struct tok_str **out,
                          int64_t *n, struct moerr *e)
{
        enum gguf_vtype et;
        uint64_t count;
        int64_t ki;
        int r;

        r = gguf_get_arr(g, key, &et, &count, e);
        if (r < 0)
                return r;
        if (et != GGUF_STRING)
                return moerr_set(e, -EINVAL, "%s is not an array of strings", key);
        if (count > INT32_MAX)
                return moerr_set(e, -EINVAL, "%s has too many elements", key);
        ki = gguf_find_key(g, key);
        *out = calloc(count ? count : 1, sizeof **out);
        if (!*out)
                return moerr_set(e, -ENOMEM, "out of memory");
        for (uint64_t i = 0; i < count; i++) {
                size_t len = 0;
                const char *s = gguf_arr_str(g, ki, i, &len);

                if (!s)
                        return moerr_set(e, -EINVAL, "%s[%llu] is unreadable", key,
                                         (unsigned long long)i);
                (*out)[i] = (struct tok_str){ s, len };
        }
        *n = (int64_t)count;
        return 0;
}

static int gguf_types(const struct gguf *g, int64_t n_vocab, int32_t **out, struct moerr *e)
{
        static const char key[] = "tokenizer.ggml.token_type";
        enum gguf_vtype et;
        uint64_t count;
        int64_t ki;
        int r;

        r = gguf_get_arr(g, key, &et, &count, e);
        if (r == -ENOENT)
                return 0; /* all normal */
        if (r < 0)
                return r;
        if (et == GGUF_STRING || et == GGUF_ARRAY || et == GGUF_F32 || et == GGUF_F64)
                return moerr_set(e, -EINVAL, "%s is not an array of integers", key);
        if ((int64_t)count != n_vocab)
                return moerr_set(e, -EINVAL, "%s has %llu entries for %lld tokens", key,
                                 (unsigned long long)count, (long long)n_vocab);
        ki = gguf_find_key(g, key);
        *out = malloc((size_t)(n_vocab ? n_vocab : 1) * sizeof **out);
        if (!*out)
                return moerr_set(e, -ENOMEM, "out of memory");
        for (int64_t i = 0; i < n_vocab; i++) {
                int64_t v = gguf_arr_int(g, ki, (uint64_t)i);

                (*out)[i] = v < 0 || v > TOK_BYTE ? -1 : (int32_t)v;
        }
        return 0;
}

static int gguf_token_id(const struct gguf *g, const char *key, int32_t *id, struct moerr *e)
{
        int r = gguf_get_i32(g, key, id, e);

        if (r == -ENOENT) {
                *id = -1;
                return 0;
        }
        return r;
}

static int gguf_check_model(const struct gguf *g, char *pre, size_t cap, struct moerr *e)
{
        const char *s;
        size_t len;
        int r;

        r = gguf_get_str(g, "tokenizer.ggml.model", &s, &len, e);
        if (r < 0)
                return r;
        if (len != 4 || memcmp(s, "gpt2", 4) != 0)
                return moerr_set(e, -EOPNOTSUPP,
                                 "tokenizer.ggml.model \"%.*s\" is not supported (only \"gpt2\", byte-level BPE)",
                                 (int)MO_MIN(len, 64), s);
        r = gguf_get_str(g, "tokenizer.ggml.pre", &s, &len, e);
        if (r == -ENOENT)
                return moerr_set(e, -EOPNOTSUPP,
                                 "tokenizer.ggml.pre is missing (supported: deepseek-v3, deepseek-llm)");
        if (r < 0)
                return r;
        snprintf(pre, cap, "%.*s", (int)MO_MIN(len, cap - 1), s);
        if (len >= cap || strlen(pre) != len)
                return moerr_set(e, -EOPNOTSUPP,
                                 "pre-tokenizer \"%.*s\" is not supported (supported: deepseek-v3, deepseek-llm)",
                                 (int)MO_MIN(len, 64), s);
        return 0;
}

int tok_new_from_gguf(const struct gguf *g, struct tokenizer **out, struct moerr *e)
{
        _cleanup_free_ struct tok_str *tokens = NULL;
        _cleanup_free_ struct tok_str *merges = NULL;
        _cleanup_free_ int32_t *types = NULL;
        struct tok_spec spec = { .bos = -1, .eos = -1, .add_bos = true };
        char pre[64];
        int r;

        *out = NULL;
        r = gguf_check_model(g, pre, sizeof pre, e);
        if (r >= 0)
                r = gguf_str_array(g, "tokenizer.ggml.tokens", &tokens, &spec.n_vocab, e);
        if (r >= 0)
                r = gguf_types(g, spec.n_vocab, &types, e);
        if (r >= 0)
                r = gguf_str_array(g, "tokenizer.ggml.merges", &merges, &spec.n_merges, e);
        if (r >= 0)
                r = gguf_token_id(g, "tokenizer.ggml.bos_token_id", &spec.bos, e);
        if (r >= 0)
                r = gguf_token_id(g, "tokenizer.ggml.eos_token_id", &spec.eos, e);
        if (r >= 0 && gguf_find_key(g, "tokenizer.ggml.add_bos_token") >= 0)
                r = gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &spec.add_bos, e);
        if (r < 0)
                return r;
        /* DeepSeek files default to add_bos; one without a BOS cannot */
        if (spec.bos < 0)
                spec.add_bos = false;
        spec.pre = pre;
        spec.tokens = tokens;
        spec.types = types;
        spec.merges = merges;
        return tok_new(&spec, out, e);
}

/* ---- accessors ---- */

int64_t tok_n_vocab(const struct tokenizer *t) { return t->n_vocab; }
int32_t tok_bos(const struct tokenizer *t) { return t->bos; }
int32_t tok_eos(const struct tokenizer *t) { return t->eos; }
bool tok_add_bos(const struct tokenizer *t) { return t->add_bos; }

bool tok_is_eog(const struct tokenizer *t, int32_t id)
{
        for (int i = 0; i < t->n_eog; i++)
                if (t->eog[i] == id)
                        return true;
        return false;
}

int32_t tok_find(const struct tokenizer *t, const char *text)
{
        return str_lookup(t, text, strlen(text));
}

/* ---- encoding ---- */

struct bpe_sym {
        int32_t id, prev, next;
};

struct bpe_cand {
        int32_t rank, pos, left, right, merged;
};

struct enc {
        const struct tokenizer *t;
        int32_t *ids;
        size_t n, cap;
        pcre2_match_data *md[TOK_MAX_RE];
        struct bpe_sym *sym;
        size_t sym_cap;
        struct bpe_cand *heap;
        size_t heap_n, heap_cap;
        struct tok_str *pieces; /* pre-tokenize only: collect pieces instead of BPE */
        size_t n_pieces, pieces_cap;
        bool collect;
};

static int grow(void **p, size_t *cap, size_t need, size_t elem)
{
        size_t n = *cap ? *cap : 64;
        void *q;

        if (need <= *cap)
                return 0;
        while (n < need)
                n *= 2;
        q = realloc(*p, n * elem);
        if (!q)
                return -ENOMEM;
        *p = q;
        *cap = n;
        return 0;
}

static int emit(struct enc *c, int32_t id)
{
        if (c->n == c->cap && grow((void **)&c->ids, &c->cap, c->n + 1, sizeof *c->ids) < 0)
                return -ENOMEM;
        c->ids[c->n++] = id;
        return 0;
}

static bool cand_less(const struct bpe_cand *a, const struct bpe_cand *b)
{
        return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(struct enc *c, struct bpe_cand v)
{
        size_t i = c->heap_n++;

        while (i > 0 && cand_less(&v, &c->heap[(i - 1) / 2])) {
                c->heap[i] = c->heap[(i - 1) / 2];
                i = (i - 1) / 2;
        }
        c->heap[i] = v;
}

static struct bpe_cand heap_pop(struct enc *c)
{
        struct bpe_cand top = c->heap[0], last = c->heap[--c->heap_n];
        size_t i = 0;

        for (;;) {
                size_t k = 2 * i + 1;

                if (k >= c->heap_n)
                        break;
                if (k + 1 < c->heap_n && cand_less(&c->heap[k + 1], &c->heap[k]))
                        k++;
                if (!cand_less(&c->heap[k], &last))
                        break;
                c->heap[i] = c->heap[k];
                i = k;
        }
        if (c->heap_n)
                c->heap[i] = last;
        return top;
}

static void try_pair(struct enc *c, int32_t l, int32_t r)
{
        int32_t merged, rank;

        if (l < 0 || r < 0)
                return;
        rank = pair_lookup(c->t, c->sym[l].id, c->sym[r].id, &merged);
        if (rank >= 0)
                heap_push(c, (struct bpe_cand){ rank, l, c->sym[l].id, c->sym[r].id, merged });
}

/* Merges the lowest-ranked adjacent pair (leftmost among equals) until none
 * is left, like Hugging Face's BPE. A candidate is stale once either side
 * has changed, which its recorded ids reveal. */
static int bpe(struct enc *c, const uint8_t *s, size_t len)
{
        const struct tokenizer *t = c->t;
        int32_t n = 0;

        if (grow((void **)&c->sym, &c->sym_cap, len, sizeof *c->sym) < 0 ||
            /* n - 1 first pairs, then at most two per merge */
            grow((void **)&c->heap, &c->heap_cap, 3 * len, sizeof *c->heap) < 0)
                return -ENOMEM;
        for (size_t i = 0; i < len; i++) {
                int32_t id = t->byte_tok[s[i]];

                if (id >= 0) { /* a vocabulary without this byte drops it, as llama.cpp does */
                        c->sym[n] = (struct bpe_sym){ id, n - 1, n + 1 };
                        n++;
                }
        }
        if (n == 0)
                return 0;
        c->sym[n - 1].next = -1;
        c->heap_n = 0;
        for (int32_t i = 0; i + 1 < n; i++)
                try_pair(c, i, i + 1);
        while (c->heap_n) {
                struct bpe_cand m = heap_pop(c);
                struct bpe_sym *l = &c->sym[m.pos];
                int32_t r = l->next;

                if (l->id != m.left || r < 0 || c->sym[r].id != m.right)
                        continue;
                l->id = m.merged;
                l->next = c->sym[r].next;
                if (l->next >= 0)
                        c->sym[l->next].prev = m.pos;
                c->sym[r].id = -1;
                try_pair(c, l->prev, m.pos);
                try_pair(c, m.pos, l->next);
        }
        for (int32_t i = 0; i >= 0; i = c->sym[i].next)
                if (emit(c, c->sym[i].id) < 0)
                        return -ENOMEM;
        return 0;
}

static int piece(struct enc *c, const char *s, size_t len)
{
        if (c->collect) {
                if (grow((void **)&c->pieces, &c->pieces_cap, c->n_pieces + 1, sizeof *c->pieces) < 0)
                        return -ENOMEM;
                c->pieces[c->n_pieces++] = (struct tok_str){ s, len };
                return 0;
        }
        return bpe(c, (const uint8_t *)s, len);
}

/* Regex k splits s into its matches and the text between them (Hugging
 * Face's "Isolated"); each part goes on to regex k + 1 on its own, so
 * lookaheads never see past the part. */
static int pre_split(struct enc *c, int k, const char *s, size_t len)
{
        size_t pos = 0, gap = 0;
        int r;

        if (k == c->t->n_re)
                return piece(c, s, len);
        while (pos < len) {
                int rc = pcre2_match(c->t->re[k], (PCRE2_SPTR)s, len, pos, PCRE2_NO_UTF_CHECK,
                                     c->md[k], NULL);
                PCRE2_SIZE *ov;

                /* no match, or a resource limit on a pathological input:
                 * the rest stays one part */
                if (rc < 0)
                        break;
                ov = pcre2_get_ovector_pointer(c->md[k]);
                if (ov[1] <= ov[0]) { /* cannot happen with our patterns; never loop */
                        int l = utf8_check((const uint8_t *)s + pos, len - pos);

                        pos += l > 0 ? (size_t)l : 1;
                        continue;
                }
                if (ov[0] > gap && (r = pre_split(c, k + 1, s + gap, ov[0] - gap)) < 0)
                        return r;
                if ((r = pre_split(c, k + 1, s + ov[0], ov[1] - ov[0])) < 0)
                        return r;
                pos = gap = ov[1];
        }
        if (gap < len)
                return pre_split(c, k + 1, s + gap, len - gap);
        return 0;
}

/* PCRE2 needs valid UTF-8: valid runs are pre-tokenized, each invalid
 * byte becomes its own byte token. */
static int encode_fragment(struct enc *c, const char *s, size_t len)
{
        const uint8_t *p = (const uint8_t *)s;
        size_t i = 0;
        int r;

        while (i < len) {
                size_t v = utf8_valid_prefix(p + i, len - i);

                if (v && (r = pre_split(c, 0, s + i, v)) < 0)
                        return r;
                i += v;
                if (i < len) {
                        if ((r = c->collect ? piece(c, s + i, 1) : bpe(c, p + i, 1)) < 0)
                                return r;
                        i++;
                }
        }
        return 0;
}

/* Longest special token starting at s that may match here, or 0. */
static size_t special_match(const struct tokenizer *t, const char *s, size_t len,
                            bool parse_special, int32_t *id)
{
        int32_t node = 0;
        size_t best = 0;

        for (size_t k = 0; k < len; k++) {
                node = trie_child(t, node, (uint8_t)s[k]);
                if (node < 0)
                        break;
                if (t->trie[node].id >= 0 &&
                    (parse_special || t->types[t->trie[node].id] == TOK_USER_DEFINED)) {
                        best = k + 1;
                        *id = t->trie[node].id;
                }
        }
        return best;
}

static int encode_text(struct enc *c, const char *s, size_t len, bool parse_special)
{
        const struct tokenizer *t = c->t;
        size_t start = 0, i = 0;
        int r;

        while (i < len) {
                int32_t id;
                size_t m;

                if (!t->special_first[(uint8_t)s[i]] ||
                    !(m = special_match(t, s + i, len - i, parse_special, &id))) {
                        i++;
                        continue;
                }
                if ((r = encode_fragment(c, s + start, i - start)) < 0)
                        return r;
                if (c->collect)
                        r = piece(c, s + i, m);
                else
                        r = emit(c, id);
                if (r < 0)
                        return r;
                i += m;
                start = i;
        }
        return encode_fragment(c, s + start, len - start);
}

static int enc_init(struct enc *c, const struct tokenizer *t)
{
        *c = (struct enc){ .t = t };
        for (int k = 0; k < t->n_re; k++) {
                c->md[k] = pcre2_match_data_create_from_pattern(t->re[k], NULL);
                if (!c->md[k])
                        return -ENOMEM;
        }
        return 0;
}

static void enc_done(struct enc *c)
{
        for (int k = 0; k < c->t->n_re; k++)
                pcre2_match_data_free(c->md[k]);
        free(c->sym);
        free(c->heap);
        free(c->ids);
        free(c->pieces);
}

int tok_encode(const struct tokenizer *t, const char *text, size_t len, bool add_bos,
               bool parse_special, int32_t **ids, size_t *n_ids, struct moerr *e)
{
        struct enc c;
        int r;

        *ids = NULL;
        *n_ids = 0;
        if (add_bos && t->bos < 0)
                return moerr_set(e, -EINVAL, "add_bos requested but the vocabulary has no BOS");
        r = enc_init(&c, t);
        if (r >= 0 && add_bos)
                r = emit(&c, t->bos);
        if (r >= 0 && len)
                r = encode_text(&c, text, len, parse_special);
        if (r >= 0 && !c.ids)
                r = grow((void **)&c.ids, &c.cap, 1, sizeof *c.ids); /* callers may free a non-NULL array */
        if (r < 0) {
                enc_done(&c);
                return moerr_set(e, r, "out of memory");
        }
        *ids = c.ids;
        *n_ids = c.n;
        c.ids = NULL;
        enc_done(&c);
        return 0;
}

int tok_pretokenize(const struct tokenizer *t, const char *text, size_t len, bool parse_special,
                    struct tok_str **pieces, size_t *n, struct moerr *e)
{
        struct enc c;
        int r;

        *pieces = NULL;
        *n = 0;
        r = enc_init(&c, t);
        c.collect = true;
        if (r >= 0)
                r = encode_text(&c, text, len, parse_special);
        if (r < 0) {
                enc_done(&c);
                return moerr_set(e, r, "out of memory");
        }
        *pieces = c.pieces;
        *n = c.n_pieces;
        c.pieces = NULL;
        enc_done(&c);
        return 0;
}

/* ---- decoding ---- */

/* The bytes of token id as rendered, or NULL when the id is out of range. */
static const char *piece_of(const struct tokenizer *t, int32_t id, bool render_special, size_t *n)
{
        if (id < 0 || id >= t->n_vocab)
                return NULL;
        *n = t->piece_len[id];
        if (!render_special && (t->types[id] == TOK_CONTROL || t->types[id] == TOK_UNKNOWN))
                *n = 0;
        return t->piece_blob + t->piece_off[id];
}

int tok_piece(const struct tokenizer *t, int32_t id, bool render_special, char *buf, size_t cap)
{
        size_t n;
        const char *p = piece_of(t, id, render_special, &n);

        if (!p)
                return -EINVAL;
        n = MO_MIN(n, cap);
        n = MO_MIN(n, (size_t)INT32_MAX);
        memcpy(buf, p, n);
        return (int)n;
}

struct tok_stream {
        const struct tokenizer *t;
        bool render_special;
        char *pend; /* bytes not yet emitted: an incomplete character, or what did not fit */
        size_t n, cap;
};

struct tok_stream *tok_stream_new(const struct tokenizer *t, bool render_special)
{
        struct tok_stream *s = calloc(1, sizeof *s);

        if (s) {
                s->t = t;
                s->render_special = render_special;
        }
        return s;
}

void tok_stream_free(struct tok_stream *s)
{
        if (s) {
                free(s->pend);
                free(s);
        }
}

/* Moves whole characters from the pending bytes to out; an incomplete one
 * at the end waits unless final. Invalid bytes become U+FFFD, one per
 * maximal invalid subpart (the Unicode and WHATWG practice). */
static int stream_drain(struct tok_stream *s, char *out, size_t cap, bool final)
{
        static const char fffd[] = "\xEF\xBF\xBD";
        const uint8_t *p = (const uint8_t *)s->pend;
        size_t i = 0, w = 0;

        while (i < s->n) {
                int l = utf8_check(p + i, s->n - i);

                if (l == 0 && !final)
                        break;
                if (l > 0) {
                        if (w + (size_t)l > cap)
                                break;
                        memcpy(out + w, p + i, (size_t)l);
                        w += (size_t)l;
                        i += (size_t)l;
                        continue;
                }
                if (w + 3 > cap)
                        break;
                memcpy(out + w, fffd, 3);
                w += 3;
                i += l < 0 ? (size_t)-l : s->n - i;
        }
        if (s->n > i)
                memmove(s->pend, s->pend + i, s->n - i);
        s->n -= i;
        return (int)w;
}

int tok_stream_feed(struct tok_stream *s, int32_t id, char *out, size_t cap)
{
        size_t n;
        const char *p = piece_of(s->t, id, s->render_special, &n);

        if (!p)
                return -EINVAL;
        if (cap < 64 || cap > INT32_MAX)
                return -EINVAL;
        if (grow((void **)&s->pend, &s->cap, s->n + n, 1) < 0)
                return -ENOMEM;
        if (n) /* an empty piece (a control token) with nothing pending: pend may be NULL */
                memcpy(s->pend + s->n, p, n);
        s->n += n;
        return stream_drain(s, out, cap, false);
}

int tok_stream_flush(struct tok_stream *s, char *out, size_t cap)
{
        if (cap < 64 || cap > INT32_MAX)
                return -EINVAL;
        return stream_drain(s, out, cap, true);
}
