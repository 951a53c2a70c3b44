/* fuzz-openai: libFuzzer target for ipc/openai.c. Any input, parsed as each
 * of the three request kinds, is either refused with a well-formed error
 * (status, message, and an error body that is valid JSON) or accepted into
 * a request whose every string is NUL-free valid UTF-8 within its limits
 * and whose texts come back intact through the response builders. The
 * input itself is also fed to the builders as text: always valid JSON.
 * Seeds: tests/fuzz/seeds-openai/. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "ipc/openai.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond) do { if (!(cond)) __builtin_trap(); } while (0)

/* NUL-free (no byte before len), valid UTF-8 (jansson agrees), <= max. */
static void check_str(const char *s, size_t len, size_t max)
{
        json_t *j;

        CHECK(s);
        CHECK(strlen(s) == len);
        CHECK(!max || len <= max);
        j = json_stringn(s, len);
        CHECK(j);
        json_decref(j);
}

/* Takes s, a body from a builder: valid JSON (inside "data: ...\n\n" for
 * an SSE event), one line. */
static json_t *load_body(char *s, bool sse)
{
        size_t n;
        json_t *j;

        CHECK(s);
        n = strlen(s);
        if (sse) {
                CHECK(n > 8 && memcmp(s, "data: ", 6) == 0 && memcmp(s + n - 2, "\n\n", 2) == 0);
                s[n - 2] = '\0';
        }
        CHECK(!strchr(s + (sse ? 6 : 0), '\n'));
        j = json_loads(s + (sse ? 6 : 0), JSON_ALLOW_NUL, NULL);
        CHECK(j && json_is_object(j));
        free(s);
        return j;
}

/* The first choice's text (message.content, delta.content or text). */
static json_t *choice_text(json_t *j, const char *key)
{
        json_t *c = json_array_get(json_object_get(j, "choices"), 0);
        json_t *v = json_object_get(c, key);

        if (json_is_object(v))
                v = json_object_get(v, "content");
        CHECK(json_is_string(v));
        return v;
}

/* text (valid UTF-8 or not) through every text-carrying builder. */
static void build_text(enum oai_kind kind, const char *model, const char *text, size_t len)
{
        bool valid = false;
        json_t *j, *v;

        if ((j = json_stringn(text, len))) {
                valid = true;
                json_decref(j);
        }
        j = load_body(oai_response_json(kind, "id", 1, model, text, len, "stop", NULL), false);
        v = choice_text(j, kind == OAI_CHAT ? "message" : "text");
        CHECK(!valid || (json_string_length(v) == len &&
                         memcmp(json_string_value(v), text, len) == 0));
        json_decref(j);
        j = load_body(oai_chunk_sse(kind, "id", 1, model, false, text, len, NULL, NULL), true);
        v = choice_text(j, kind == OAI_CHAT ? "delta" : "text");
        CHECK(!valid || json_string_length(v) == len);
        json_decref(j);
}

static void check_messages(const struct oai_request *r, const struct oai_limits *l)
{
        CHECK(r->n_messages >= 1 && r->n_messages <= l->max_messages);
        for (size_t i = 0; i < r->n_messages; i++) {
                const struct oai_message *m = &r->messages[i];

                CHECK(m->role && (strcmp(m->role, "system") == 0 ||
                                  strcmp(m->role, "user") == 0 ||
                                  strcmp(m->role, "assistant") == 0));
                CHECK(m->content);
                check_str(m->content, strlen(m->content), 0);
                build_text(OAI_CHAT, r->model, m->content, strlen(m->content));
        }
}

static void check_prompt(const struct oai_request *r)
{
        const char *model = r->model ? r->model : "m";
        json_t *j;

        CHECK(!r->prompt != !r->prompt_tokens);
        if (r->prompt) {
                check_str(r->prompt, r->prompt_len, 0);
                build_text(OAI_COMPLETION, model, r->prompt, r->prompt_len);
                return;
        }
        CHECK(r->n_prompt_tokens >= 1);
        for (size_t i = 0; i < r->n_prompt_tokens; i++)
                CHECK(r->prompt_tokens[i] >= 0);
        j = load_body(oai_tokens_json(r->model, r->prompt_tokens, r->n_prompt_tokens), false);
        CHECK(json_array_size(json_object_get(j, "tokens")) == r->n_prompt_tokens);
        json_decref(j);
}

static void check_request(enum oai_kind kind, const struct oai_request *r,
                          const struct oai_limits *l)
{
        struct moerr e = { { 0 } };

        CHECK(r->kind == kind);
        CHECK(r->model || kind == OAI_TOKENIZE);
        if (r->model) {
                check_str(r->model, strlen(r->model), OAI_MAX_ID_LEN);
                json_decref(load_body(oai_models_json((const char *const *)&r->model, 1, 0),
                                      false));
        }
        if (r->user)
                check_str(r->user, strlen(r->user), OAI_MAX_ID_LEN);
        CHECK(r->max_tokens == -1 || (r->max_tokens >= 1 && r->max_tokens <= l->max_tokens_cap));
        CHECK(sampler_params_check(&r->sampling, &e) == 0);
        CHECK(r->sampling.temperature <= 2.0f);
        CHECK(r->has_seed || r->sampling.seed == 0);
        CHECK(r->n_stop <= l->max_stops && (!r->n_stop || r->stop));
        for (size_t i = 0; i < r->n_stop; i++)
                check_str(r->stop[i], strlen(r->stop[i]), l->max_stop_len);
        if (kind == OAI_CHAT) {
                CHECK(!r->prompt && !r->prompt_tokens);
                check_messages(r, l);
        } else {
                CHECK(!r->messages && !r->n_messages);
                check_prompt(r);
        }
}

static void check_error(const struct oai_error *e)
{
        json_t *j, *o;

        CHECK(e->status == 400 || e->status == 413 || e->status == 500);
        CHECK(e->message[0] && e->type[0] && e->code[0]);
        j = load_body(oai_error_json(e), false);
        o = json_object_get(j, "error");
        CHECK(json_is_string(json_object_get(o, "message")));
        CHECK(json_is_string(json_object_get(o, "code")));
        json_decref(j);
        json_decref(load_body(oai_error_sse(e), true));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        static const enum oai_kind kinds[] = { OAI_CHAT, OAI_COMPLETION, OAI_TOKENIZE };
        const char *body = (const char *)data;
        struct oai_limits l;

        oai_limits_default(&l);
        for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
                struct oai_request *r = NULL;
                struct oai_error e;

                memset(&e, 0, sizeof e);
                if (oai_parse(kinds[k], body, size, &l, &r, &e) < 0) {
                        CHECK(!r);
                        check_error(&e);
                        continue;
                }
                CHECK(r);
                check_request(kinds[k], r, &l);
                oai_request_free(r);
        }
        /* Raw bytes as generated text: repaired where not UTF-8, never bad JSON. */
        build_text(OAI_CHAT, "m", body, size);
        build_text(OAI_COMPLETION, "m", body, size);
        return 0;
}
