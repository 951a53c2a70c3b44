/* vocab-json: reads a Hugging Face tokenizer.json (byte-level BPE) into the
 * arrays GGUF stores, the way llama.cpp's converter does: tokens by id,
 * padded to n_vocab with "[PAD<id>]", token types (special added tokens and
 * "<｜…｜>"-looking ones CONTROL, other added tokens USER_DEFINED, padding
 * UNUSED), merges as "left right", BOS/EOS from tokenizer_config.json. */
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "common/moerr.h"
#include "engine/tokenizer.h"

struct vocab_json {
        struct tok_spec spec;  /* points into the arrays below */
        struct tok_str *tokens;
        int32_t *types;
        struct tok_str *merges;
        char *chat_template;   /* from tokenizer_config.json, or NULL */
        void *storage;
};

/* n_vocab 0: as many as the file has; larger: padded. BOS/EOS, add_bos and
 * the chat template come from the tokenizer_config.json beside
 * tokenizer_json when there is one (else bos = eos = -1, no template).
 * spec.pre is "deepseek-v3". */
int vocab_json_load(const char *tokenizer_json, int64_t n_vocab, struct vocab_json *out,
                    struct moerr *e);
void vocab_json_free(struct vocab_json *v);
