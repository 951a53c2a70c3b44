/* tokenizer: byte-level BPE as DeepSeek models use it (GGUF
 * tokenizer.ggml.model = "gpt2"), with the pre-tokenizers "deepseek-v3" and
 * "deepseek-llm" run through PCRE2, special and added tokens, BOS handling,
 * and incremental detokenization that never splits a UTF-8 character. */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/moerr.h"

struct gguf;

enum tok_type { /* GGUF tokenizer.ggml.token_type values */
        TOK_NORMAL = 1, TOK_UNKNOWN = 2, TOK_CONTROL = 3,
        TOK_USER_DEFINED = 4, TOK_UNUSED = 5, TOK_BYTE = 6,
};

struct tok_str {
        const char *s;
        size_t len;
};

/* Everything a tokenizer is built from, as stored in GGUF. Copied by tok_new. */
struct tok_spec {
        const char *pre;               /* "deepseek-v3" or "deepseek-llm" */
        int64_t n_vocab;
        const struct tok_str *tokens;  /* n_vocab, byte-level form */
        const int32_t *types;          /* n_vocab, enum tok_type; NULL: all normal */
        int64_t n_merges;
        const struct tok_str *merges;  /* "left right", rank = index */
        int32_t bos, eos;              /* -1 when absent */
        bool add_bos;
};

struct tokenizer;

int tok_new(const struct tok_spec *spec, struct tokenizer **out, struct moerr *e);
/* Reads tokenizer.ggml.* keys (model must be "gpt2"). */
int tok_new_from_gguf(const struct gguf *g, struct tokenizer **out, struct moerr *e);
void tok_free(struct tokenizer *t);

int64_t tok_n_vocab(const struct tokenizer *t);
int32_t tok_bos(const struct tokenizer *t);
int32_t tok_eos(const struct tokenizer *t);
bool tok_add_bos(const struct tokenizer *t);
/* True for tokens that end generation (EOS, <|EOT|> and the like). */
bool tok_is_eog(const struct tokenizer *t, int32_t id);
/* Id of a token given its exact text (special tokens too), or -1. */
int32_t tok_find(const struct tokenizer *t, const char *text);

/* Encodes len bytes of text (need not be valid UTF-8: invalid bytes are
 * encoded as their byte tokens, never an error). add_bos prepends BOS;
 * parse_special lets control-token texts in the input become those tokens
 * (user-defined tokens always match). *ids is malloc'ed. */
int tok_encode(const struct tokenizer *t, const char *text, size_t len, bool add_bos,
               bool parse_special, int32_t **ids, size_t *n_ids, struct moerr *e);

/* The pieces BPE would see, without running it: special-token matches,
 * single invalid bytes, and the pre-tokenizer's splits of the rest, in
 * order (each points into text). For tests and tools. *pieces is malloc'ed. */
int tok_pretokenize(const struct tokenizer *t, const char *text, size_t len, bool parse_special,
                    struct tok_str **pieces, size_t *n, struct moerr *e);

/* The raw bytes a token stands for (byte-level mapping undone). Control
 * tokens give their text only when render_special. Returns bytes written
 * (truncated to cap) or a negative errno for an id out of range. */
int tok_piece(const struct tokenizer *t, int32_t id, bool render_special, char *buf, size_t cap);

/* Incremental detokenization: feed ids one by one; each call appends to
 * out only complete UTF-8 characters (held-back bytes wait for the next
 * token; tok_stream_flush emits what remains, invalid bytes as U+FFFD). */
struct tok_stream;
struct tok_stream *tok_stream_new(const struct tokenizer *t, bool render_special);
void tok_stream_free(struct tok_stream *s);
/* Returns bytes written to out (cap must be >= 64), or negative errno.
 * What does not fit in cap stays pending for the next call; flush returns
 * 0 once nothing is left. */
int tok_stream_feed(struct tok_stream *s, int32_t id, char *out, size_t cap);
int tok_stream_flush(struct tok_stream *s, char *out, size_t cap);
