/* vocab-json: turns a Hugging Face tokenizer.json (+ tokenizer_config.json)
 * into the tokenizer.ggml.* arrays llama.cpp's converter would write, so
 * fixtures and tests use the real DeepSeek-V3 vocabulary without a GGUF. */
#include "tools/vocab-json.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cleanup.h"

/* Strings made here (padding, joined merges); the rest point into the JSON. */
struct vj_chunk {
        struct vj_chunk *next;
        size_t used, cap;
        char data[];
};

struct vj_storage {
        json_t *root;
        struct vj_chunk *chunks;
};

static char *vj_alloc(struct vj_storage *st, size_t n)
{
        struct vj_chunk *c = st->chunks;

        if (!c || c->cap - c->used < n) {
                size_t cap = MO_MAX(n, (size_t)1 << 20);

                c = malloc(sizeof *c + cap);
                if (!c)
                        return NULL;
                c->next = st->chunks;
                c->used = 0;
                c->cap = cap;
                st->chunks = c;
        }
        c->used += n;
        return c->data + c->used - n;
}

static void vj_storage_free(struct vj_storage *st)
{
        if (!st)
                return;
        json_decref(st->root);
        while (st->chunks) {
                struct vj_chunk *c = st->chunks;

                st->chunks = c->next;
                free(c);
        }
        free(st);
}

/* llama.cpp's does_token_look_special: added tokens some models forget to
 * mark special are CONTROL all the same. */
static bool looks_special(const char *s, size_t n)
{
        static const char *const exact[] = { "<pad>", "<mask>", "<2mass>", "[@BOS@]" };
        const struct { const char *pre, *post; } shapes[] = {
                { "<|", "|>" }, { "<｜", "｜>" }, { "<unused", ">" },
        };

        for (size_t i = 0; i < ARRAY_SIZE(exact); i++)
                if (strlen(exact[i]) == n && memcmp(exact[i], s, n) == 0)
                        return true;
        for (size_t i = 0; i < ARRAY_SIZE(shapes); i++) {
                size_t a = strlen(shapes[i].pre), b = strlen(shapes[i].post);

                if (n >= a + b && memcmp(s, shapes[i].pre, a) == 0 &&
                    memcmp(s + n - b, shapes[i].post, b) == 0)
                        return true;
        }
        return false;
}

/* The converter pre-normalizes user-defined tokens: U+2581 becomes a space. */
static int user_defined_text(struct vj_storage *st, struct tok_str *t)
{
        static const char lower_block[] = "\xE2\x96\x81";
        size_t w = 0;
        char *p;

        if (!memmem(t->s, t->len, lower_block, 3))
                return 0;
        p = vj_alloc(st, t->len);
        if (!p)
                return -ENOMEM;
        for (size_t i = 0; i < t->len;) {
                if (i + 3 <= t->len && memcmp(t->s + i, lower_block, 3) == 0) {
                        p[w++] = ' ';
                        i += 3;
                } else {
                        p[w++] = t->s[i++];
                }
        }
        *t = (struct tok_str){ p, w };
        return 0;
}

static int64_t max_id(json_t *vocab, json_t *added)
{
        int64_t m = -1;
        const char *key;
        json_t *v;
        size_t i;

        json_object_foreach(vocab, key, v)
                if (json_is_integer(v))
                        m = MO_MAX(m, (int64_t)json_integer_value(v));
        json_array_foreach(added, i, v)
                m = MO_MAX(m, (int64_t)json_integer_value(json_object_get(v, "id")));
        return m;
}

static int set_base_vocab(struct vocab_json *out, json_t *vocab, struct moerr *e)
{
        int64_t n = out->spec.n_vocab;
        void *it;

        for (it = json_object_iter(vocab); it; it = json_object_iter_next(vocab, it)) {
                json_t *v = json_object_iter_value(it);
                json_int_t id = json_integer_value(v);

                if (!json_is_integer(v) || id < 0 || id >= n)
                        return moerr_set(e, -EINVAL, "model.vocab: \"%s\" has a bad id",
                                         json_object_iter_key(it));
                if (out->tokens[id].s)
                        return moerr_set(e, -EINVAL, "model.vocab: id %lld is used twice",
                                         (long long)id);
                out->tokens[id] = (struct tok_str){ json_object_iter_key(it),
                                                    json_object_iter_key_len(it) };
                out->types[id] = TOK_NORMAL;
        }
        return 0;
}

static int set_added(struct vocab_json *out, struct vj_storage *st, json_t *added, struct moerr *e)
{
        json_t *a;
        size_t i;

        json_array_foreach(added, i, a) {
                json_t *content = json_object_get(a, "content");
                json_int_t id = json_integer_value(json_object_get(a, "id"));
                struct tok_str s;

                if (!json_is_string(content) || id < 0 || id >= out->spec.n_vocab)
                        return moerr_set(e, -EINVAL, "added_tokens[%zu] is malformed", i);
                s = (struct tok_str){ json_string_value(content), json_string_length(content) };
                if (json_is_true(json_object_get(a, "special")) || looks_special(s.s, s.len)) {
                        out->types[id] = TOK_CONTROL;
                } else {
                        out->types[id] = TOK_USER_DEFINED;
                        if (user_defined_text(st, &s) < 0)
                                return moerr_set(e, -ENOMEM, "out of memory");
                }
                out->tokens[id] = s;
        }
        return 0;
}

static int pad_vocab(struct vocab_json *out, struct vj_storage *st, struct moerr *e)
{
        for (int64_t i = 0; i < out->spec.n_vocab; i++) {
                char buf[32];
                int n;
                char *p;

                if (out->tokens[i].s)
                        continue;
                n = snprintf(buf, sizeof buf, "[PAD%lld]", (long long)i);
                p = vj_alloc(st, (size_t)n);
                if (!p)
                        return moerr_set(e, -ENOMEM, "out of memory");
                memcpy(p, buf, (size_t)n);
                out->tokens[i] = (struct tok_str){ p, (size_t)n };
                out->types[i] = TOK_UNUSED;
        }
        return 0;
}

/* Merges are "left right" strings in older files and [left, right] pairs
 * in newer ones; GGUF always stores the former. */
static int set_merges(struct vocab_json *out, struct vj_storage *st, json_t *merges, struct moerr *e)
{
        size_t n = json_array_size(merges);
        json_t *m;
        size_t i;

        out->merges = calloc(n ? n : 1, sizeof *out->merges);
        if (!out->merges)
                return moerr_set(e, -ENOMEM, "out of memory");
        json_array_foreach(merges, i, m) {
                json_t *l = json_array_get(m, 0), *r = json_array_get(m, 1);
                size_t nl, nr;
                char *p;

                if (json_is_string(m)) {
                        out->merges[i] = (struct tok_str){ json_string_value(m), json_string_length(m) };
                        continue;
                }
                if (json_array_size(m) != 2 || !json_is_string(l) || !json_is_string(r))
                        return moerr_set(e, -EINVAL, "model.merges[%zu] is malformed", i);
                nl = json_string_length(l);
                nr = json_string_length(r);
                p = vj_alloc(st, nl + nr + 1);
                if (!p)
                        return moerr_set(e, -ENOMEM, "out of memory");
                memcpy(p, json_string_value(l), nl);
                p[nl] = ' ';
                memcpy(p + nl + 1, json_string_value(r), nr);
                out->merges[i] = (struct tok_str){ p, nl + nr + 1 };
        }
        out->spec.merges = out->merges;
        out->spec.n_merges = (int64_t)n;
        return 0;
}

/* bos_token / eos_token are a string or an AddedToken object. */
static int32_t config_token(const struct vocab_json *out, json_t *config, const char *key)
{
        json_t *v = json_object_get(config, key);
        const char *s;
        size_t n;

        if (json_is_object(v))
                v = json_object_get(v, "content");
        if (!json_is_string(v))
                return -1;
        s = json_string_value(v);
        n = json_string_length(v);
        for (int64_t i = out->spec.n_vocab - 1; i >= 0; i--)
                if (out->tokens[i].len == n && memcmp(out->tokens[i].s, s, n) == 0)
                        return (int32_t)i;
        return -1;
}

static char *config_template(json_t *config)
{
        json_t *t = json_object_get(config, "chat_template"), *item;
        size_t i;

        if (json_is_string(t))
                return strdup(json_string_value(t));
        json_array_foreach(t, i, item) {
                json_t *name = json_object_get(item, "name"), *tmpl = json_object_get(item, "template");

                if (json_is_string(name) && strcmp(json_string_value(name), "default") == 0 &&
                    json_is_string(tmpl))
                        return strdup(json_string_value(tmpl));
        }
        return NULL;
}

static int read_config(struct vocab_json *out, const char *tokenizer_json, struct moerr *e)
{
        _cleanup_free_ char *path = NULL;
        const char *slash = strrchr(tokenizer_json, '/');
        json_error_t err;
        json_t *config, *add_bos;
        int r = 0;

        if (asprintf(&path, "%.*stokenizer_config.json", slash ? (int)(slash - tokenizer_json + 1) : 0,
                     tokenizer_json) < 0)
                return moerr_set(e, -ENOMEM, "out of memory");
        config = json_load_file(path, 0, &err);
        if (!config)
                return access(path, F_OK) == 0 ? moerr_set(e, -EINVAL, "%s:%d: %s", path, err.line, err.text)
                                               : 0;
        out->spec.bos = config_token(out, config, "bos_token");
        out->spec.eos = config_token(out, config, "eos_token");
        add_bos = json_object_get(config, "add_bos_token");
        out->spec.add_bos = json_is_boolean(add_bos) ? json_is_true(add_bos) : out->spec.bos >= 0;
        if (out->spec.bos < 0)
                out->spec.add_bos = false;
        if (json_object_get(config, "chat_template") && !(out->chat_template = config_template(config)))
                r = moerr_set(e, -EINVAL, "%s: chat_template is neither a string nor has a default", path);
        json_decref(config);
        return r;
}

static int load(struct vocab_json *out, struct vj_storage *st, const char *path, int64_t n_vocab,
                struct moerr *e)
{
        json_t *model = json_object_get(st->root, "model");
        json_t *vocab = json_object_get(model, "vocab"), *merges = json_object_get(model, "merges");
        json_t *added = json_object_get(st->root, "added_tokens"), *type = json_object_get(model, "type");
        int64_t have;
        int r;

        if (!json_is_object(vocab) || !json_is_array(merges) || (type && !json_is_string(type)))
                return moerr_set(e, -EINVAL, "not a BPE tokenizer.json (model.vocab/merges missing)");
        if (type && strcmp(json_string_value(type), "BPE") != 0)
                return moerr_set(e, -EOPNOTSUPP, "model type %s is not BPE", json_string_value(type));
        have = max_id(vocab, added) + 1;
        if (have <= 0)
                return moerr_set(e, -EINVAL, "empty vocabulary");
        if (n_vocab > 0 && n_vocab < have)
                return moerr_set(e, -EINVAL, "the file has %lld tokens, more than n_vocab %lld",
                                 (long long)have, (long long)n_vocab);
        out->spec.n_vocab = MO_MAX(n_vocab, have);
        out->tokens = calloc((size_t)out->spec.n_vocab, sizeof *out->tokens);
        out->types = calloc((size_t)out->spec.n_vocab, sizeof *out->types);
        if (!out->tokens || !out->types)
                return moerr_set(e, -ENOMEM, "out of memory");
        out->spec.tokens = out->tokens;
        out->spec.types = out->types;
        out->spec.pre = "deepseek-v3";
        out->spec.bos = out->spec.eos = -1;
        if ((r = set_base_vocab(out, vocab, e)) < 0 || (r = set_added(out, st, added, e)) < 0 ||
            (r = pad_vocab(out, st, e)) < 0 || (r = set_merges(out, st, merges, e)) < 0)
                return r;
        return read_config(out, path, e);
}

int vocab_json_load(const char *tokenizer_json, int64_t n_vocab, struct vocab_json *out,
                    struct moerr *e)
{
        struct vj_storage *st;
        json_error_t err;
        int r;

        *out = (struct vocab_json){0};
        st = calloc(1, sizeof *st);
        if (!st)
                return moerr_set(e, -ENOMEM, "out of memory");
        out->storage = st;
        st->root = json_load_file(tokenizer_json, JSON_ALLOW_NUL, &err);
        if (!st->root) {
                r = access(tokenizer_json, R_OK) < 0 ? -errno : -EINVAL;
                vocab_json_free(out);
                return moerr_set(e, r, "%s:%d: %s", tokenizer_json, err.line, err.text);
        }
        r = load(out, st, tokenizer_json, n_vocab, e);
        if (r < 0)
                vocab_json_free(out);
        return r;
}

void vocab_json_free(struct vocab_json *v)
{
        if (!v)
                return;
        free(v->tokens);
        free(v->types);
        free(v->merges);
        free(v->chat_template);
        vj_storage_free(v->storage);
        *v = (struct vocab_json){0};
}
