/* openai.c: the OpenAI request bodies parsed into struct oai_request, and
 * the response, chunk and error bodies written back, all with jansson.
 * Request fields are described by one table (key, kinds, parser), so each
 * rule lives in one small function and every error names its field. */
#include "openai.h"

#include <errno.h>
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "common/cleanup.h"

#define OAI_INVALID "invalid_request_error"
#define OAI_PARAM_MAX 96 /* longest param we build, before oai_error truncates */

void oai_limits_default(struct oai_limits *l)
{
        *l = (struct oai_limits){
                .max_body = 1 << 20,
                .max_depth = 16,
                .max_messages = 1024,
                .max_stops = 4,
                .max_stop_len = 256,
                .max_tokens_cap = 1 << 20,
        };
}

void oai_error_set(struct oai_error *e, int status, const char *type, const char *param,
                   const char *code, const char *fmt, ...)
{
        va_list ap;

        if (!e)
                return;
        e->status = status;
        snprintf(e->type, sizeof e->type, "%s", type ? type : "");
        snprintf(e->param, sizeof e->param, "%s", param ? param : "");
        snprintf(e->code, sizeof e->code, "%s", code ? code : "");
        va_start(ap, fmt);
        vsnprintf(e->message, sizeof e->message, fmt, ap);
        va_end(ap);
}

/* ---- error helpers: each returns the negative errno to pass up ---- */

static int bad_type(struct oai_error *e, const char *param, const char *want)
{
        oai_error_set(e, 400, OAI_INVALID, param, "invalid_type", "%s must be %s", param, want);
        return -EINVAL;
}

__attribute__((format(printf, 3, 4)))
static int bad_value(struct oai_error *e, const char *param, const char *fmt, ...)
{
        char msg[sizeof e->message];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        oai_error_set(e, 400, OAI_INVALID, param, "invalid_value", "%s", msg);
        return -EINVAL;
}

static int missing(struct oai_error *e, const char *param)
{
        oai_error_set(e, 400, OAI_INVALID, param, "missing_required_parameter",
                      "missing required parameter: %s", param);
        return -EINVAL;
}

static int no_memory(struct oai_error *e)
{
        oai_error_set(e, 500, "server_error", NULL, "out_of_memory", "out of memory");
        return -ENOMEM;
}

/* Builds a field name such as "messages[3].content[1].text" (cut short
 * like the error's param when it is very long). */
__attribute__((format(printf, 3, 4)))
static void param_at(char *buf, size_t cap, const char *fmt, ...)
{
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(buf, cap, fmt, ap);
        va_end(ap);
}

/* ---- typed getters: v is never NULL or null here ---- */

/* v is a string of at most max bytes (0: any length) with no NUL in it. */
static int check_string(json_t *v, const char *param, size_t max, struct oai_error *e)
{
        size_t n;

        if (!json_is_string(v))
                return bad_type(e, param, "a string");
        n = json_string_length(v);
        /* jansson refuses \u0000 without JSON_ALLOW_NUL; keep it that way. */
        if (memchr(json_string_value(v), '\0', n))
                return bad_value(e, param, "%s must not contain NUL characters", param);
        if (max && n > max)
                return bad_value(e, param, "%s is too long (%zu bytes, at most %zu)", param, n,
                                 max);
        return 0;
}

/* A copy of a string checked by check_string; *len (optional) its length. */
static int get_string(json_t *v, const char *param, size_t max, char **out, size_t *len,
                      struct oai_error *e)
{
        int r = check_string(v, param, max, e);

        if (r < 0)
                return r;
        *out = strndup(json_string_value(v), json_string_length(v));
        if (!*out)
                return no_memory(e);
        if (len)
                *len = json_string_length(v);
        return 0;
}

static int get_number(json_t *v, const char *param, double *out, struct oai_error *e)
{
        if (!json_is_number(v))
                return bad_type(e, param, "a number");
        *out = json_number_value(v);
        return 0;
}

static int get_int(json_t *v, const char *param, int64_t lo, int64_t hi, int64_t *out,
                   struct oai_error *e)
{
        json_int_t x;

        if (!json_is_integer(v))
                return bad_type(e, param, "an integer");
        x = json_integer_value(v);
        if (x < lo || x > hi)
                return bad_value(e, param, "%s must be in [%" PRId64 ", %" PRId64 "], got %lld",
                                 param, lo, hi, (long long)x);
        *out = x;
        return 0;
}

static int get_bool(json_t *v, const char *param, bool *out, struct oai_error *e)
{
        if (!json_is_boolean(v))
                return bad_type(e, param, "a boolean");
        *out = json_is_true(v);
        return 0;
}

/* obj[key], with null read as absent. */
static json_t *member(json_t *obj, const char *key)
{
        json_t *v = json_object_get(obj, key);

        return json_is_null(v) ? NULL : v;
}

/* ---- the fields ---- */

struct oai_parser {
        const struct oai_limits *l;
        struct oai_request *r;
        struct oai_error *e;
        json_t *root;
};

struct oai_field {
        const char *key;
        unsigned kinds; /* 1 << enum oai_kind */
        int (*parse)(struct oai_parser *p, const struct oai_field *f, json_t *v);
        const void *arg;
};

static int parse_model(struct oai_parser *p, const struct oai_field *f, json_t *v)
{
        int r = get_string(v, f->key, OAI_MAX_ID_LEN, &p->r->model, NULL, p->e);

        if (r == 0 && !p->r->model[0])
                return bad_value(p->e, f->key, "model must not be empty");
        return r;
}

static int parse_user(struct oai_parser *p, const struct oai_field *f, json_t *v)
{
        return get_string(v, f->key, OAI_MAX_ID_LEN, &p->r->user, NULL, p->e);
}

/* The roles we accept, and what they are stored as. */
static const char *const oai_roles[][2] = {
        { "system", "system" },
        { "developer", "system" },
        { "user", "user" },
        { "assistant", "assistant" },
};

static int parse_role(struct oai_parser *p, json_t *v, const char *param, char **out)
{
        const char *s;

        if (!v)
                return missing(p->e, param);
        if (!json_is_string(v))
                return bad_type(p->e, param, "a string");
        s = json_string_value(v);
        for (size_t i = 0; i < ARRAY_SIZE(oai_roles); i++) {
                if (strcmp(s, oai_roles[i][0]) != 0)
                        continue;
                *out = strdup(oai_roles[i][1]);
                return *out ? 0 : no_memory(p->e);
        }
        return bad_value(p->e, param, "%s must be one of system, developer, user, assistant",
                         param);
}

/* One {"type":"text","text":...} part; *text points into the tree. */
static int parse_part(struct oai_parser *p, json_t *part, const char *param, json_t **text)
{
        char sub[OAI_PARAM_MAX];
        json_t *type;

        if (!json_is_object(part))
                return bad_type(p->e, param, "an object");
        param_at(sub, sizeof sub, "%s.type", param);
        type = member(part, "type");
        if (!type)
                return missing(p->e, sub);
        if (!json_is_string(type))
                return bad_type(p->e, sub, "a string");
        if (strcmp(json_string_value(type), "text") != 0)
                return bad_value(p->e, sub, "%s: only \"text\" parts are supported", sub);
        param_at(sub, sizeof sub, "%s.text", param);
        *text = member(part, "text");
        if (!*text)
                return missing(p->e, sub);
        return check_string(*text, sub, 0, p->e);
}

/* An array of text parts, joined without a separator (the client's
 * whitespace is kept as sent). */
static int parse_parts(struct oai_parser *p, json_t *arr, const char *param, char **out)
{
        char sub[OAI_PARAM_MAX];
        size_t i, total = 0;
        json_t *part, *text = NULL;
        char *s;
        int r;

        json_array_foreach(arr, i, part) {
                param_at(sub, sizeof sub, "%s[%zu]", param, i);
                if ((r = parse_part(p, part, sub, &text)) < 0)
                        return r;
                total += json_string_length(text);
        }
        s = *out = malloc(total + 1);
        if (!s)
                return no_memory(p->e);
        json_array_foreach(arr, i, part) {
                text = json_object_get(part, "text");
                memcpy(s, json_string_value(text), json_string_length(text));
                s += json_string_length(text);
        }
        *s = '\0';
        return 0;
}

static int parse_content(struct oai_parser *p, struct oai_message *m, json_t *v,
                         const char *param)
{
        /* Only a tool call goes without content, and we take none: "". */
        if (!v && strcmp(m->role, "assistant") == 0) {
                m->content = strdup("");
                return m->content ? 0 : no_memory(p->e);
        }
        if (!v)
                return missing(p->e, param);
        if (json_is_array(v))
                return parse_parts(p, v, param, &m->content);
        if (!json_is_string(v))
                return bad_type(p->e, param, "a string or an array of text parts");
        return get_string(v, param, 0, &m->content, NULL, p->e);
}

static int parse_message(struct oai_parser *p, size_t i, json_t *v, struct oai_message *m)
{
        char param[OAI_PARAM_MAX], sub[OAI_PARAM_MAX];
        int r;

        param_at(param, sizeof param, "messages[%zu]", i);
        if (!json_is_object(v))
                return bad_type(p->e, param, "an object");
        param_at(sub, sizeof sub, "%s.role", param);
        if ((r = parse_role(p, member(v, "role"), sub, &m->role)) < 0)
                return r;
        param_at(sub, sizeof sub, "%s.content", param);
        return parse_content(p, m, member(v, "content"), sub);
}

static int parse_messages(struct oai_parser *p, const struct oai_field *f, json_t *v)
{
        struct oai_request *r = p->r;
        size_t n, i;
        json_t *m;
        int ret;

        if (!json_is_array(v))
                return bad_type(p->e, f->key, "an array of messages");
        n = json_array_size(v);
        if (n == 0)
                return bad_value(p->e, f->key, "messages must not be empty");
        if (n > p->l->max_messages)
                return bad_value(p->e, f->key, "too many messages (%zu, at most %zu)", n,
                                 p->l->max_messages);
        r->messages = calloc(n, sizeof *r->messages);
        if (!r->messages)
                return no_memory(p->e);
        json_array_foreach(v, i, m) {
                r->n_messages = i + 1; /* so that oai_request_free sees a partial one */
                if ((ret = parse_message(p, i, m, &r->messages[i])) < 0)
                        return ret;
        }
        return 0;
}

/* An array of token ids, each in [0, INT32_MAX]. */
static int parse_token_ids(struct oai_parser *p, const char *key, json_t *arr)
{
        struct oai_request *r = p->r;
        char param[OAI_PARAM_MAX];
        size_t i;
        json_t *t;
        int64_t id = 0;
        int ret;

        r->prompt_tokens = malloc(json_array_size(arr) * sizeof *r->prompt_tokens);
        if (!r->prompt_tokens)
                return no_memory(p->e);
        json_array_foreach(arr, i, t) {
                param_at(param, sizeof param, "%s[%zu]", key, i);
                if (!json_is_integer(t))
                        return bad_type(p->e, param, "a token id (an integer)");
                if ((ret = get_int(t, param, 0, INT32_MAX, &id, p->e)) < 0)
                        return ret;
                r->prompt_tokens[i] = (int32_t)id;
        }
        r->n_prompt_tokens = json_array_size(arr);
        return 0;
}

/* A string, an array of one string, or an array of token ids. */
static int parse_prompt(struct oai_parser *p, const struct oai_field *f, json_t *v)
{
        char param[OAI_PARAM_MAX];
        json_t *first;

        /* "content" is tokenize's alias: "prompt" wins when both are given. */
        if (strcmp(f->key, "content") == 0 && member(p->root, "prompt"))
                return 0;
        if (json_is_string(v))
                return get_string(v, f->key, 0, &p->r->prompt, &p->r->prompt_len, p->e);
        if (!json_is_array(v))
                return bad_type(p->e, f->key,
                                "a string, an array of one string or an array of token ids");
        if (json_array_size(v) == 0)
                return bad_value(p->e, f->key, "%s must not be empty", f->key);
        first = json_array_get(v, 0);
        if (json_is_integer(first))
                return parse_token_ids(p, f->key, v);
        param_at(param, sizeof param, "%s[0]", f->key);
        if (!json_is_string(first))
                return bad_type(p->e, param, "a string or a token id");
        if (json_array_size(v) > 1)
                return bad_value(p->e, f->key, "only one prompt per request is supported");
        return get_string(first, param, 0, &p->r->prompt, &p->r->prompt_len, p->e);
}

static int parse_max_tokens(struct oai_parser *p, const struct oai_field *f, json_t *v)
{
        return get_int(v, f->key, 1, p->l->max_tokens_cap, &p->r->max_tokens, p->e);
}

/* A sampling field: OpenAI's own bounds first (lo..hi, where it has any),
 * then float range, then the engine's sampler_params_check on the whole
 * set. The defaults pass that check, so a failure is this field's. */
struct oai_sampling {
        size_t off;          /* in struct sampler_params */
        bool is_int;         /* int32_t, else float */
        double lo, hi;
        const char *engine;  /* the name sampler_params_check uses */
};

#define SAMPLING(name, field, is_int, lo, hi) \
        static const struct oai_sampling name = { offsetof(struct sampler_params, field), \
                                                  is_int, lo, hi, #field }
SAMPLING(s_temperature, temperature, false, 0, 2);
SAMPLING(s_top_p, top_p, false, -HUGE_VAL, HUGE_VAL);
/* -1 is vLLM's "off"; the engine reads any value <= 0 as off. */
SAMPLING(s_top_k, top_k, true, -1, INT32_MAX);
SAMPLING(s_min_p, min_p, false, -HUGE_VAL, HUGE_VAL);
SAMPLING(s_presence, presence_penalty, false, -HUGE_VAL, HUGE_VAL);
SAMPLING(s_frequency, frequency_penalty, false, -HUGE_VAL, HUGE_VAL);
SAMPLING(s_repetition, repeat_penalty, false, -HUGE_VAL, HUGE_VAL);

static void sampling_store(struct sampler_params *sp, const struct oai_sampling *s, double x)
{
        char *dst = (char *)sp + s->off;

        /* x is already inside the target type's range (see parse_sampling). */
        if (s->is_int) {
                int32_t i = (int32_t)x;

                memcpy(dst, &i, sizeof i);
        } else {
                float fl = (float)x;

                memcpy(dst, &fl, sizeof fl);
        }
}

static int parse_sampling(struct oai_parser *p, const struct oai_field *f, json_t *v)
{
        const struct oai_sampling *s = f->arg;
        struct moerr me = { { 0 } };
        int64_t i = 0;
        double x = 0;
        int r;

        if (s->is_int) {
                r = get_int(v, f->key, (int64_t)s->lo, (int64_t)s->hi, &i, p->e);
                x = (double)i;
        } else {
                r = get_number(v, f->key, &x, p->e);
        }
        if (r < 0)
                return r;
        if (!(x >= s->lo && x <= s->hi))
                return bad_value(p->e, f->key, "%s must be in [%g, %g], got %g", f->key, s->lo,
                                 s->hi, x);
        if (fabs(x) > FLT_MAX) /* (float)x would be undefined */
                return bad_value(p->e, f->key, "%s is out of range, got %g", f->key, x);
        sampling_store(&p->r->sampling, s, x);
        if (sampler_params_check(&p->r->sampling, &me) == 0)
                return 0;
        if (strcmp(f->key, s->engine) == 0)
                return bad_value(p->e, f->key, "%s", me.msg);
        return bad_value(p->e, f->key, "%s is out of range (%s)", f->key, me.msg);
}

static int parse_seed(struct oai_parser *p, const struct oai_field *f, json_t *v)
{
        int64_t seed = 0;
        int r = get_int(v, f->key, INT64_MIN, INT64_MAX, &seed, p->e);

        if (r < 0)
                return r;
        p->r->sampling.seed = (uint64_t)seed; /* a negative seed is as good as any */
        p->r->has_seed = true;
        return 0;
}

static int parse_stop_string(struct oai_parser *p, json_t *v, const char *param)
{
        struct oai_request *r = p->r;
        int ret = get_string(v, param, p->l->max_stop_len, &r->stop[r->n_stop], NULL, p->e);

        if (ret == 0)
                r->n_stop++;
        return ret;
}

static int parse_stop(struct oai_parser *p, const struct oai_field *f, json_t *v)
{
        char param[OAI_PARAM_MAX];
        size_t n, i;
        json_t *s;
        int r;

        if (!json_is_string(v) && !json_is_array(v))
                return bad_type(p->e, f->key, "a string or an array of strings");
        n = json_is_array(v) ? json_array_size(v) : 1;
        if (n > p->l->max_stops)
                return bad_value(p->e, f->key, "too many stop sequences (%zu, at most %zu)", n,
                                 p->l->max_stops);
        if (n == 0)
                return 0;
        p->r->stop = calloc(n, sizeof *p->r->stop);
        if (!p->r->stop)
                return no_memory(p->e);
        if (json_is_string(v))
                return parse_stop_string(p, v, f->key);
        json_array_foreach(v, i, s) {
                param_at(param, sizeof param, "%s[%zu]", f->key, i);
                if ((r = parse_stop_string(p, s, param)) < 0)
                        return r;
        }
        return 0;
}

static int parse_stream(struct oai_parser *p, const struct oai_field *f, json_t *v)
{
        return get_bool(v, f->key, &p->r->stream, p->e);
}

static int parse_stream_options(struct oai_parser *p, const struct oai_field *f, json_t *v)
{
        json_t *u;

        if (!json_is_object(v))
                return bad_type(p->e, f->key, "an object");
        u = member(v, "include_usage");
        if (!u)
                return 0;
        return get_bool(u, "stream_options.include_usage", &p->r->include_usage, p->e);
}

static int parse_n(struct oai_parser *p, const struct oai_field *f, json_t *v)
{
        int64_t n = 0;
        int r = get_int(v, f->key, INT64_MIN, INT64_MAX, &n, p->e);

        if (r == 0 && n != 1)
                return bad_value(p->e, f->key,
                                 "n must be 1 (one choice per request), got %" PRId64, n);
        return r;
}

static int parse_add_special(struct oai_parser *p, const struct oai_field *f, json_t *v)
{
        return get_bool(v, f->key, &p->r->add_special, p->e);
}

#define K_CHAT (1u << OAI_CHAT)
#define K_COMPL (1u << OAI_COMPLETION)
#define K_TOK (1u << OAI_TOKENIZE)
#define K_GEN (K_CHAT | K_COMPL)

/* Parsed in this order; a later key overrides an earlier one it aliases
 * (max_completion_tokens over the older max_tokens). */
static const struct oai_field oai_fields[] = {
        { "model", K_GEN | K_TOK, parse_model, NULL },
        { "messages", K_CHAT, parse_messages, NULL },
        { "prompt", K_COMPL | K_TOK, parse_prompt, NULL },
        { "content", K_TOK, parse_prompt, NULL },
        { "max_tokens", K_GEN, parse_max_tokens, NULL },
        { "max_completion_tokens", K_GEN, parse_max_tokens, NULL },
        { "temperature", K_GEN, parse_sampling, &s_temperature },
        { "top_p", K_GEN, parse_sampling, &s_top_p },
        { "top_k", K_GEN, parse_sampling, &s_top_k },
        { "min_p", K_GEN, parse_sampling, &s_min_p },
        { "presence_penalty", K_GEN, parse_sampling, &s_presence },
        { "frequency_penalty", K_GEN, parse_sampling, &s_frequency },
        { "repetition_penalty", K_GEN, parse_sampling, &s_repetition },
        { "seed", K_GEN, parse_seed, NULL },
        { "stop", K_GEN, parse_stop, NULL },
        { "stream", K_GEN, parse_stream, NULL },
        { "stream_options", K_GEN, parse_stream_options, NULL },
        { "n", K_GEN, parse_n, NULL },
        { "user", K_GEN | K_TOK, parse_user, NULL },
        { "add_special", K_TOK, parse_add_special, NULL },
};

/* ---- the request as a whole ---- */

/* True when v nests deeper than left levels (a scalar is 0, [] is 1). The
 * recursion stops at left, and jansson itself stops at 2048. */
static bool too_deep(json_t *v, int left)
{
        const char *key;
        json_t *c;
        size_t i;

        if (!json_is_object(v) && !json_is_array(v))
                return false;
        if (left <= 0)
                return true;
        if (json_is_array(v)) {
                json_array_foreach(v, i, c)
                        if (too_deep(c, left - 1))
                                return true;
                return false;
        }
        json_object_foreach(v, key, c)
                if (too_deep(c, left - 1))
                        return true;
        return false;
}

static json_t *load_body(const char *body, size_t len, const struct oai_limits *l,
                         struct oai_error *e, int *r)
{
        json_error_t je;
        json_t *root;

        *r = -EINVAL;
        if (len > l->max_body) {
                oai_error_set(e, 413, OAI_INVALID, NULL, "body_too_large",
                              "request body is %zu bytes, at most %zu are accepted", len,
                              l->max_body);
                *r = -E2BIG;
                return NULL;
        }
        root = json_loadb(body ? body : "", len, 0, &je);
        if (!root && json_error_code(&je) == json_error_null_character)
                snprintf(je.text, sizeof je.text, "strings must not contain \\u0000");
        if (!root && json_error_code(&je) == json_error_out_of_memory)
                *r = no_memory(e);
        else if (!root)
                oai_error_set(e, 400, OAI_INVALID, NULL,
                              json_error_code(&je) == json_error_stack_overflow ? "too_deep"
                                                                                : "invalid_json",
                              "invalid JSON at line %d, column %d (byte %d): %s", je.line,
                              je.column, je.position, je.text);
        else if (too_deep(root, l->max_depth))
                oai_error_set(e, 400, OAI_INVALID, NULL, "too_deep",
                              "JSON nesting is deeper than %d levels", l->max_depth);
        else if (!json_is_object(root))
                oai_error_set(e, 400, OAI_INVALID, NULL, "invalid_type",
                              "the request body must be a JSON object");
        else
                return root;
        json_decref(root);
        return NULL;
}

static struct oai_request *request_new(enum oai_kind kind)
{
        struct oai_request *r = calloc(1, sizeof *r);

        if (!r)
                return NULL;
        r->kind = kind;
        r->max_tokens = -1;
        r->add_special = true;
        /* OpenAI's defaults, whatever the engine's may become. */
        sampler_params_default(&r->sampling);
        r->sampling.temperature = 1.0f;
        r->sampling.top_p = 1.0f;
        r->sampling.top_k = 0;
        r->sampling.min_p = 0.0f;
        r->sampling.repeat_penalty = 1.0f;
        r->sampling.presence_penalty = 0.0f;
        r->sampling.frequency_penalty = 0.0f;
        r->sampling.seed = 0;
        return r;
}

static int parse_fields(struct oai_parser *p)
{
        const struct oai_request *r = p->r;
        unsigned bit = 1u << r->kind;
        json_t *v;
        int ret;

        for (size_t i = 0; i < ARRAY_SIZE(oai_fields); i++) {
                const struct oai_field *f = &oai_fields[i];

                if (!(f->kinds & bit) || !(v = member(p->root, f->key)))
                        continue;
                if ((ret = f->parse(p, f, v)) < 0)
                        return ret;
        }
        if (r->kind != OAI_TOKENIZE && !r->model)
                return missing(p->e, "model");
        if (r->kind == OAI_CHAT && !r->messages)
                return missing(p->e, "messages");
        if (r->kind != OAI_CHAT && !r->prompt && !r->prompt_tokens)
                return missing(p->e, "prompt");
        return 0;
}

int oai_parse(enum oai_kind kind, const char *body, size_t len, const struct oai_limits *l,
              struct oai_request **out, struct oai_error *err)
{
        struct oai_limits defaults;
        struct oai_parser p = { .e = err };
        json_auto_t *root = NULL;
        int r;

        *out = NULL;
        if (!l)
                oai_limits_default(&defaults);
        p.l = l ? l : &defaults;
        if (kind != OAI_CHAT && kind != OAI_COMPLETION && kind != OAI_TOKENIZE)
                return bad_value(err, NULL, "unknown request kind %d", (int)kind);
        root = load_body(body, len, p.l, err, &r);
        if (!root)
                return r;
        p.root = root;
        p.r = request_new(kind);
        if (!p.r)
                return no_memory(err);
        if ((r = parse_fields(&p)) < 0) {
                oai_request_free(p.r);
                return r;
        }
        *out = p.r;
        return 0;
}

void oai_request_free(struct oai_request *r)
{
        if (!r)
                return;
        free(r->model);
        for (size_t i = 0; i < r->n_messages; i++) {
                free(r->messages[i].role);
                free(r->messages[i].content);
        }
        free(r->messages);
        free(r->prompt);
        free(r->prompt_tokens);
        for (size_t i = 0; i < r->n_stop; i++)
                free(r->stop[i]);
        free(r->stop);
        free(r->user);
        free(r);
}

/* ---- the bodies we send ---- */

/* Length of the valid UTF-8 sequence (RFC 3629: no overlong forms, no
 * surrogates, nothing past U+10FFFF) at s, or 0. */
static size_t utf8_valid_len(const unsigned char *s, size_t n)
{
        size_t len = s[0] < 0x80 ? 1 : s[0] < 0xc2 ? 0 : s[0] < 0xe0 ? 2 : s[0] < 0xf0 ? 3
                   : s[0] < 0xf5 ? 4 : 0;
        unsigned char lo = 0x80, hi = 0xbf; /* bounds of the second byte */

        if (len == 0 || len > n)
                return 0;
        if (s[0] == 0xe0)
                lo = 0xa0;
        else if (s[0] == 0xed)
                hi = 0x9f;
        else if (s[0] == 0xf0)
                lo = 0x90;
        else if (s[0] == 0xf4)
                hi = 0x8f;
        if (len > 1 && (s[1] < lo || s[1] > hi))
                return 0;
        for (size_t i = 2; i < len; i++)
                if (s[i] < 0x80 || s[i] > 0xbf)
                        return 0;
        return len;
}

/* Text that json_stringn refused: each byte that does not start a valid
 * sequence becomes U+FFFD. */
static json_t *json_repaired(const char *s, size_t len)
{
        const unsigned char *u = (const unsigned char *)s;
        _cleanup_free_ char *buf = malloc(len * 3 + 1);
        size_t o = 0, k;

        if (!buf)
                return NULL;
        for (size_t i = 0; i < len; i += k ? k : 1) {
                k = utf8_valid_len(u + i, len - i);
                if (k) {
                        memcpy(buf + o, s + i, k);
                        o += k;
                } else {
                        memcpy(buf + o, "\xef\xbf\xbd", 3);
                        o += 3;
                }
        }
        return json_stringn(buf, o);
}

static json_t *text_json(const char *s, size_t len)
{
        json_t *j;

        if (!s)
                return json_null();
        j = json_stringn(s, len);
        return j ? j : json_repaired(s, len);
}

static json_t *str_json(const char *s)
{
        return text_json(s, s ? strlen(s) : 0);
}

/* An object from key, value pairs ending with a NULL key. Takes every
 * value; NULL when one of them is NULL or memory runs out. */
__attribute__((sentinel))
static json_t *obj(const char *key, ...)
{
        json_t *o = json_object(), *v;
        bool ok = o != NULL;
        va_list ap;

        va_start(ap, key);
        for (; key; key = va_arg(ap, const char *)) {
                v = va_arg(ap, json_t *);
                if (ok && v)
                        ok = json_object_set_new(o, key, v) == 0; /* takes v even on failure */
                else
                        ok = false, json_decref(v);
        }
        va_end(ap);
        if (!ok)
                json_decref(o);
        return ok ? o : NULL;
}

/* [v], taking v. */
static json_t *arr1(json_t *v)
{
        json_t *a = json_array();

        if (!a || !v || json_array_append_new(a, v) < 0) {
                if (!a)
                        json_decref(v);
                json_decref(a);
                return NULL;
        }
        return a;
}

static json_t *usage_json(const struct oai_usage *u)
{
        return obj("prompt_tokens", json_integer(u->prompt_tokens),
                   "completion_tokens", json_integer(u->completion_tokens),
                   "total_tokens", json_integer(u->prompt_tokens + u->completion_tokens),
                   NULL);
}

/* moed's extension object: engine timings and the finish detail. */
static json_t *moed_json(const struct oai_usage *u)
{
        return obj("queue_s", json_real(u->queue_s),
                   "first_token_s", json_real(u->first_token_s),
                   "total_s", json_real(u->total_s),
                   "finish_detail", str_json(u->detail),
                   NULL);
}

static json_t *with_moed(json_t *o, const struct oai_usage *u)
{
        if (o && u && u->total_s > 0)
                json_object_set_new(o, "moed", moed_json(u));
        return o;
}

/* Takes j; NULL stays NULL. With a prefix, an SSE event: prefix, JSON, "\n\n". */
static char *dump(json_t *j, const char *prefix)
{
        _cleanup_free_ char *s = NULL;
        char *out = NULL;

        if (!j)
                return NULL;
        s = json_dumps(j, JSON_COMPACT);
        json_decref(j);
        if (!s || !prefix)
                return TAKE_PTR(s);
        if (asprintf(&out, "%s%s\n\n", prefix, s) < 0)
                return NULL;
        return out;
}

static json_t *error_obj(const struct oai_error *e)
{
        return obj("error", obj("message", str_json(e->message),
                                "type", str_json(e->type),
                                "param", e->param[0] ? str_json(e->param) : json_null(),
                                "code", e->code[0] ? str_json(e->code) : json_null(),
                                NULL),
                   NULL);
}

char *oai_error_json(const struct oai_error *e)
{
        return dump(error_obj(e), NULL);
}

char *oai_error_sse(const struct oai_error *e)
{
        return dump(error_obj(e), "data: ");
}

/* {"index":0, key: val, "logprobs":null, "finish_reason":...}, taking val. */
static json_t *choice_json(const char *key, json_t *val, const char *finish_reason)
{
        return obj("index", json_integer(0), key, val, "logprobs", json_null(),
                   "finish_reason", str_json(finish_reason), NULL);
}

/* Text as given, "" for NULL. */
static json_t *content_json(const char *text, size_t len)
{
        return text ? text_json(text, len) : json_string("");
}

char *oai_response_json(enum oai_kind kind, const char *id, int64_t created, const char *model,
                        const char *text, size_t len, const char *finish_reason,
                        const struct oai_usage *u)
{
        static const struct oai_usage zero;
        bool chat = kind == OAI_CHAT;
        json_t *c;

        if (kind != OAI_CHAT && kind != OAI_COMPLETION)
                return NULL;
        if (chat)
                c = choice_json("message", obj("role", json_string("assistant"),
                                               "content", content_json(text, len), NULL),
                                finish_reason);
        else
                c = choice_json("text", content_json(text, len), finish_reason);
        return dump(with_moed(obj("id", str_json(id),
                                  "object", json_string(chat ? "chat.completion" :
                                                               "text_completion"),
                                  "created", json_integer(created),
                                  "model", str_json(model),
                                  "choices", arr1(c),
                                  "usage", usage_json(u ? u : &zero),
                                  NULL), u),
                    NULL);
}

/* The chat delta: role (and "" content) on the first chunk, content when
 * there is text, {} on the last. */
static json_t *delta_json(bool role_chunk, const char *text, size_t len)
{
        if (role_chunk)
                return obj("role", json_string("assistant"), "content", content_json(text, len),
                           NULL);
        if (text)
                return obj("content", text_json(text, len), NULL);
        return json_object();
}

char *oai_chunk_sse(enum oai_kind kind, const char *id, int64_t created, const char *model,
                    bool role_chunk, const char *text, size_t len, const char *finish_reason,
                    const struct oai_usage *u)
{
        bool chat = kind == OAI_CHAT;
        json_t *choices;

        if (kind != OAI_CHAT && kind != OAI_COMPLETION)
                return NULL;
        if (u)
                choices = json_array();
        else if (chat)
                choices = arr1(choice_json("delta", delta_json(role_chunk, text, len),
                                           finish_reason));
        else
                choices = arr1(choice_json("text", content_json(text, len), finish_reason));
        return dump(obj("id", str_json(id),
                        "object", json_string(chat ? "chat.completion.chunk" : "text_completion"),
                        "created", json_integer(created),
                        "model", str_json(model),
                        "choices", choices,
                        "usage", u ? usage_json(u) : json_null(),
                        NULL),
                    "data: ");
}

char *oai_finish_sse(enum oai_kind kind, const char *id, int64_t created, const char *model,
                     const char *finish_reason, const struct oai_usage *u)
{
        bool chat = kind == OAI_CHAT;
        json_t *c;

        if (kind != OAI_CHAT && kind != OAI_COMPLETION)
                return NULL;
        c = chat ? choice_json("delta", json_object(), finish_reason) :
                   choice_json("text", json_string(""), finish_reason);
        return dump(with_moed(obj("id", str_json(id),
                                  "object", json_string(chat ? "chat.completion.chunk" :
                                                               "text_completion"),
                                  "created", json_integer(created),
                                  "model", str_json(model),
                                  "choices", arr1(c),
                                  "usage", json_null(),
                                  NULL), u),
                    "data: ");
}

char *oai_models_json(const char *const *ids, size_t n, int64_t created)
{
        json_t *data = json_array();

        for (size_t i = 0; data && i < n; i++) {
                json_t *m = obj("id", str_json(ids[i]), "object", json_string("model"),
                                "created", json_integer(created),
                                "owned_by", json_string("moed"), NULL);

                if (!m || json_array_append_new(data, m) < 0) {
                        json_decref(data);
                        data = NULL;
                }
        }
        return dump(obj("object", json_string("list"), "data", data, NULL), NULL);
}

char *oai_tokens_json(const char *model, const int32_t *ids, size_t n)
{
        json_t *tokens = json_array();

        for (size_t i = 0; tokens && i < n; i++) {
                if (json_array_append_new(tokens, json_integer(ids[i])) < 0) {
                        json_decref(tokens);
                        tokens = NULL;
                }
        }
        return dump(obj("model", str_json(model), "tokens", tokens,
                        "count", json_integer((json_int_t)n), NULL),
                    NULL);
}
