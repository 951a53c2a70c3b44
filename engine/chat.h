/* chat: the DeepSeek conversation formats (V2/V2.5, V3, R1), chosen from a
 * model's metadata. Deliberately not a Jinja engine: the formats are few and
 * fixed, and rendering them by hand keeps untrusted templates out. */
#pragma once
#include <stdbool.h>
#include <stddef.h>

#include "common/moerr.h"

struct gguf;

enum chat_format {
        CHAT_DEEPSEEK3,  /* V3: <｜User｜>… <｜Assistant｜>… */
        CHAT_DEEPSEEK_R1, /* V3 markers, answers open with <think> */
        CHAT_DEEPSEEK2,  /* V2/V2.5: "User: …\n\nAssistant: …" */
};

struct chat_msg {
        const char *role;    /* "system", "user", "assistant" */
        const char *content;
};

/* From tokenizer.chat_template (and general.name for R1); V3 when unknown. */
enum chat_format chat_format_detect(const struct gguf *g);
const char *chat_format_name(enum chat_format f);
int chat_format_from_name(const char *name, enum chat_format *f);

/* Renders the conversation, ending with the assistant prompt when
 * add_generation_prompt. The text includes the BOS token's text where the
 * format has it, so tokenize it with parse_special and without add_bos.
 * Rejects unknown roles. *out is malloc'ed, NUL-terminated. */
int chat_render(enum chat_format f, const struct chat_msg *msgs, size_t n,
                bool add_generation_prompt, char **out, struct moerr *e);
