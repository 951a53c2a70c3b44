/* openai: the OpenAI-compatible request and response bodies, parsed and
 * written with jansson. Parsing validates every field it uses (type,
 * range, size, UTF-8) and names the offending field in its error; unknown
 * fields are ignored. Nothing here knows about sockets or the engine. */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/sampler.h"

enum oai_kind {
        OAI_CHAT,         /* POST /v1/chat/completions */
        OAI_COMPLETION,   /* POST /v1/completions */
        OAI_TOKENIZE,     /* POST /v1/moed/tokenize */
};

struct oai_limits {
        size_t max_body;        /* bytes */
        int max_depth;          /* JSON nesting (objects + arrays) */
        size_t max_messages;
        size_t max_stops;       /* OpenAI allows 4 */
        size_t max_stop_len;    /* bytes per stop string */
        int64_t max_tokens_cap; /* largest max_tokens accepted */
};
/* 1 MiB, depth 16, 1024 messages, 4 stops of 256 bytes, 1<<20 tokens. */
void oai_limits_default(struct oai_limits *l);

/* Longest "model" and "user" accepted, in bytes (they end up in logs). */
#define OAI_MAX_ID_LEN 256

struct oai_message {
        char *role;             /* "system", "user", "assistant" (others rejected;
                                   "developer" is stored as "system") */
        char *content;          /* string, or the text parts joined (no separator);
                                   "" for an assistant message without content */
};

struct oai_request {
        enum oai_kind kind;
        char *model;            /* required for chat and completion; tokenize: NULL
                                   when absent */
        struct oai_message *messages;   /* chat */
        size_t n_messages;
        char *prompt;           /* completion/tokenize text (NUL-terminated); NULL
                                   when given as token ids */
        size_t prompt_len;
        int32_t *prompt_tokens; /* completion/tokenize given as token ids, else NULL */
        size_t n_prompt_tokens;
        int64_t max_tokens;     /* max_tokens or max_completion_tokens; -1 absent */
        struct sampler_params sampling; /* OpenAI defaults (temperature 1, top_p 1)
                                           with the request's fields applied */
        bool has_seed;
        char **stop;            /* string or array of strings */
        size_t n_stop;
        bool stream;
        bool include_usage;     /* stream_options.include_usage */
        bool add_special;       /* tokenize: add BOS (default true) */
        char *user;             /* recorded only */
};

/* OpenAI's error object, plus the HTTP status to send it with. Codes used by
 * oai_parse: "invalid_json", "too_deep", "body_too_large",
 * "invalid_type", "invalid_value", "missing_required_parameter",
 * "out_of_memory" (status 500, type "server_error"). */
struct oai_error {
        int status;             /* 400, 413, ... */
        char type[32];          /* "invalid_request_error" */
        char param[64];         /* the field, e.g. "messages[2].content", or "" */
        char code[32];          /* e.g. "invalid_type", or "" */
        char message[256];
};
void oai_error_set(struct oai_error *e, int status, const char *type, const char *param,
                   const char *code, const char *fmt, ...) __attribute__((format(printf, 6, 7)));

/* 0, or -EINVAL/-E2BIG/-ENOMEM with err filled (status 400 for bad JSON,
 * types and values; 413 for a body over max_body). l NULL: the defaults.
 * null for an optional field means absent; unknown fields are ignored. */
int oai_parse(enum oai_kind kind, const char *body, size_t len, const struct oai_limits *l,
              struct oai_request **out, struct oai_error *err);
void oai_request_free(struct oai_request *r);

/* Bodies to send; each is malloc'ed, NUL-terminated, NULL when out of memory
 * (or for a kind the builder has no shape for). Text is written as given
 * (NUL bytes included); any invalid UTF-8 in it becomes U+FFFD so that a
 * body is always valid JSON. A NULL string is written as null. */
struct oai_usage {
        int64_t prompt_tokens, completion_tokens;
        /* moed's own, sent as a "moed" object beside the standard fields
         * when total_s > 0: the engine's timings and why a request ended
         * early (a limit, a cancellation). */
        double queue_s, first_token_s, total_s;
        const char *detail;
};
/* {"error":{"message":…,"type":…,"param":…|null,"code":…|null}} */
char *oai_error_json(const struct oai_error *e);
/* A whole (non-streamed) answer, chat or completion. finish_reason: "stop",
 * "length", ...; u NULL counts as zeros. */
char *oai_response_json(enum oai_kind kind, const char *id, int64_t created, const char *model,
                        const char *text, size_t len, const char *finish_reason,
                        const struct oai_usage *u);
/* One SSE event "data: {...}\n\n" of a stream: a chat.completion.chunk or a
 * text_completion chunk. The chat stream's first chunk carries
 * delta.role = "assistant" (role_chunk); text chunks carry delta.content;
 * the last carries finish_reason (and an empty delta); a usage-only chunk
 * (choices empty) when u is given. Every other chunk carries "usage": null.
 * Completion chunks have no role and ignore role_chunk. */
char *oai_chunk_sse(enum oai_kind kind, const char *id, int64_t created, const char *model,
                    bool role_chunk, const char *text, size_t len, const char *finish_reason,
                    const struct oai_usage *u);
/* The stream's last content event: finish_reason, an empty delta, and the
 * "moed" object of u (timings, detail) when u is given. */
char *oai_finish_sse(enum oai_kind kind, const char *id, int64_t created, const char *model,
                     const char *finish_reason, const struct oai_usage *u);
/* "data: [DONE]\n\n" is a constant: */
#define OAI_SSE_DONE "data: [DONE]\n\n"
/* An SSE event carrying an error object, for a stream that fails after its
 * headers went out. */
char *oai_error_sse(const struct oai_error *e);

/* GET /v1/models: ids with their created time and owner "moed". */
char *oai_models_json(const char *const *ids, size_t n, int64_t created);
/* POST /v1/moed/tokenize: {"model":…,"tokens":[…],"count":N}. */
char *oai_tokens_json(const char *model, const int32_t *ids, size_t n);
