/* test-openai: ipc/openai.c. Every field parsed and its wrong types and
 * range edges refused with the field named; limits on body size, depth,
 * messages and stops; bad JSON, bad UTF-8 and NULs; and every response
 * builder's output read back through jansson. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "ipc/openai.h"

#define CHAT_MSGS "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]"
#define CHAT_BASE "{\"model\":\"m\"," CHAT_MSGS
#define COMPL_BASE "{\"model\":\"m\",\"prompt\":\"hi\""

/* ---- helpers ---- */

static struct oai_request *parse_ok_l(enum oai_kind k, const char *body, size_t len,
                                      const struct oai_limits *l)
{
        struct oai_request *r = NULL;
        struct oai_error e = { 0 };
        int ret = oai_parse(k, body, len, l, &r, &e);

        if (ret < 0)
                print_error("unexpected refusal of %.200s: %s [param %s, code %s]\n", body,
                            e.message, e.param, e.code);
        assert_int_equal(ret, 0);
        assert_non_null(r);
        assert_int_equal(r->kind, k);
        return r;
}

static struct oai_request *parse_ok(enum oai_kind k, const char *body)
{
        return parse_ok_l(k, body, strlen(body), NULL);
}

/* The error object must also survive oai_error_json. */
static void check_error_json(const struct oai_error *e)
{
        char *s = oai_error_json(e);
        json_t *j, *err;

        assert_non_null(s);
        j = json_loads(s, 0, NULL);
        assert_non_null(j);
        err = json_object_get(j, "error");
        assert_true(json_is_object(err));
        assert_string_equal(json_string_value(json_object_get(err, "message")), e->message);
        assert_string_equal(json_string_value(json_object_get(err, "type")), e->type);
        if (e->param[0])
                assert_string_equal(json_string_value(json_object_get(err, "param")), e->param);
        else
                assert_true(json_is_null(json_object_get(err, "param")));
        json_decref(j);
        free(s);
}

static struct oai_error parse_err_l(enum oai_kind k, const char *body, size_t len,
                                    const struct oai_limits *l, int status, const char *param,
                                    const char *code)
{
        struct oai_request *r = (struct oai_request *)1;
        struct oai_error e = { 0 };
        int ret = oai_parse(k, body, len, l, &r, &e);

        if (ret >= 0 || strcmp(e.param, param) != 0 || strcmp(e.code, code) != 0 ||
            e.status != status)
                print_error("body %.300s\n  gave %d status %d param '%s' code '%s': %s\n"
                            "  want status %d param '%s' code '%s'\n",
                            body, ret, e.status, e.param, e.code, e.message, status, param,
                            code);
        assert_true(ret < 0);
        assert_null(r);
        assert_int_equal(e.status, status);
        assert_string_equal(e.param, param);
        assert_string_equal(e.code, code);
        assert_string_equal(e.type, "invalid_request_error");
        assert_true(strlen(e.message) > 5);
        check_error_json(&e);
        if (oai_parse(k, body, len, l, &r, &e) != ret)
                fail_msg("second parse of the same body differs");
        return e;
}

static struct oai_error parse_err(enum oai_kind k, const char *body, const char *param,
                                  const char *code)
{
        return parse_err_l(k, body, strlen(body), NULL, 400, param, code);
}

/* base (an object without its closing brace) + "," + extra + "}". */
static char *with(const char *base, const char *extra)
{
        char *s = NULL;

        assert_true(asprintf(&s, "%s,%s}", base, extra) > 0);
        return s;
}

static json_t *load(const char *s)
{
        json_error_t je;
        json_t *j = json_loads(s, JSON_ALLOW_NUL, &je); /* our text may hold NULs */

        if (!j)
                print_error("not JSON (%s): %s\n", je.text, s);
        assert_non_null(j);
        return j;
}

/* The JSON inside one SSE event "data: {...}\n\n". */
static json_t *load_sse(char *s)
{
        size_t n;
        json_t *j;

        assert_non_null(s);
        n = strlen(s);
        assert_true(n > 8);
        assert_memory_equal(s, "data: ", 6);
        assert_memory_equal(s + n - 2, "\n\n", 2);
        assert_null(memchr(s + 6, '\n', n - 8));
        s[n - 2] = '\0';
        j = load(s + 6);
        free(s);
        return j;
}

static const char *jstr(json_t *o, const char *path)
{
        json_t *v = json_object_get(o, path);

        assert_true(json_is_string(v));
        return json_string_value(v);
}

static json_int_t jint(json_t *o, const char *key)
{
        json_t *v = json_object_get(o, key);

        assert_true(json_is_integer(v));
        return json_integer_value(v);
}

/* ---- parsing: good requests ---- */

static void chat_defaults(void **state)
{
        struct oai_request *r = parse_ok(OAI_CHAT, CHAT_BASE "}");

        assert_string_equal(r->model, "m");
        assert_int_equal(r->n_messages, 1);
        assert_string_equal(r->messages[0].role, "user");
        assert_string_equal(r->messages[0].content, "hi");
        assert_null(r->prompt);
        assert_null(r->prompt_tokens);
        assert_int_equal(r->max_tokens, -1);
        assert_true(r->sampling.temperature == 1.0f);
        assert_true(r->sampling.top_p == 1.0f);
        assert_int_equal(r->sampling.top_k, 0);
        assert_true(r->sampling.min_p == 0.0f);
        assert_true(r->sampling.repeat_penalty == 1.0f);
        assert_true(r->sampling.presence_penalty == 0.0f);
        assert_true(r->sampling.frequency_penalty == 0.0f);
        assert_false(r->has_seed);
        assert_int_equal(r->sampling.seed, 0);
        assert_null(r->stop);
        assert_int_equal(r->n_stop, 0);
        assert_false(r->stream);
        assert_false(r->include_usage);
        assert_null(r->user);
        oai_request_free(r);
}

static void chat_all_fields(void **state)
{
        const char *body =
                "{\"model\":\"deepseek-v3\",\"messages\":["
                "{\"role\":\"system\",\"content\":\"be brief\"},"
                "{\"role\":\"developer\",\"content\":\"dev\"},"
                "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},"
                "{\"type\":\"text\",\"text\":\"b\\u00e9\"}]},"
                "{\"role\":\"assistant\",\"content\":\"ok\",\"name\":\"x\"},"
                "{\"role\":\"assistant\"}],"
                "\"max_tokens\":7,\"temperature\":0.5,\"top_p\":0.9,\"top_k\":40,"
                "\"min_p\":0.05,\"presence_penalty\":0.5,\"frequency_penalty\":-0.5,"
                "\"repetition_penalty\":1.1,\"seed\":-1,\"stop\":[\"\\n\\n\",\"END\"],"
                "\"stream\":true,\"stream_options\":{\"include_usage\":true},\"n\":1,"
                "\"user\":\"alice\"}";
        struct oai_request *r = parse_ok(OAI_CHAT, body);

        assert_string_equal(r->model, "deepseek-v3");
        assert_int_equal(r->n_messages, 5);
        assert_string_equal(r->messages[0].role, "system");
        assert_string_equal(r->messages[1].role, "system");
        assert_string_equal(r->messages[1].content, "dev");
        assert_string_equal(r->messages[2].content, "ab\xc3\xa9");
        assert_string_equal(r->messages[3].role, "assistant");
        assert_string_equal(r->messages[3].content, "ok");
        assert_string_equal(r->messages[4].content, "");
        assert_int_equal(r->max_tokens, 7);
        assert_true(r->sampling.temperature == 0.5f);
        assert_true(r->sampling.top_p == 0.9f);
        assert_int_equal(r->sampling.top_k, 40);
        assert_true(r->sampling.min_p == 0.05f);
        assert_true(r->sampling.presence_penalty == 0.5f);
        assert_true(r->sampling.frequency_penalty == -0.5f);
        assert_true(r->sampling.repeat_penalty == 1.1f);
        assert_true(r->has_seed);
        assert_true(r->sampling.seed == UINT64_MAX);
        assert_int_equal(r->n_stop, 2);
        assert_string_equal(r->stop[0], "\n\n");
        assert_string_equal(r->stop[1], "END");
        assert_true(r->stream);
        assert_true(r->include_usage);
        assert_string_equal(r->user, "alice");
        oai_request_free(r);
}

static void null_means_absent(void **state)
{
        const char *extra =
                "\"max_tokens\":null,\"max_completion_tokens\":null,\"temperature\":null,"
                "\"top_p\":null,\"top_k\":null,\"min_p\":null,\"presence_penalty\":null,"
                "\"frequency_penalty\":null,\"repetition_penalty\":null,\"seed\":null,"
                "\"stop\":null,\"stream\":null,\"stream_options\":null,\"n\":null,"
                "\"user\":null";
        char *body = with(CHAT_BASE, extra);
        struct oai_request *r = parse_ok(OAI_CHAT, body);

        assert_int_equal(r->max_tokens, -1);
        assert_true(r->sampling.temperature == 1.0f);
        assert_false(r->has_seed);
        assert_int_equal(r->n_stop, 0);
        assert_false(r->stream);
        assert_null(r->user);
        oai_request_free(r);
        free(body);
        r = parse_ok(OAI_CHAT, CHAT_BASE ",\"stream_options\":{\"include_usage\":null}}");
        assert_false(r->include_usage);
        oai_request_free(r);
        /* A required field given as null is missing. */
        parse_err(OAI_CHAT, "{\"model\":null," CHAT_MSGS "}", "model",
                  "missing_required_parameter");
        parse_err(OAI_CHAT, "{\"model\":\"m\",\"messages\":null}", "messages",
                  "missing_required_parameter");
        parse_err(OAI_COMPLETION, "{\"model\":\"m\",\"prompt\":null}", "prompt",
                  "missing_required_parameter");
        parse_err(OAI_CHAT, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\","
                  "\"content\":null}]}", "messages[0].content", "missing_required_parameter");
}

static void unknown_fields_ignored(void **state)
{
        char *body = with(CHAT_BASE, "\"tools\":[{\"type\":\"function\"}],\"logit_bias\":{},"
                          "\"foo\":{\"bar\":[1,2,{\"x\":null}]},\"prompt\":5,"
                          "\"add_special\":\"no\",\"content\":7");
        struct oai_request *r = parse_ok(OAI_CHAT, body);

        assert_int_equal(r->n_messages, 1);
        assert_null(r->prompt);
        oai_request_free(r);
        free(body);
        /* A completion does not read "messages". */
        r = parse_ok(OAI_COMPLETION, COMPL_BASE ",\"messages\":5,\"stream\":false}");
        assert_string_equal(r->prompt, "hi");
        assert_int_equal(r->prompt_len, 2);
        assert_int_equal(r->n_messages, 0);
        oai_request_free(r);
}

static void max_completion_tokens_overrides(void **state)
{
        struct oai_request *r =
                parse_ok(OAI_CHAT, CHAT_BASE ",\"max_completion_tokens\":9,\"max_tokens\":3}");

        assert_int_equal(r->max_tokens, 9);
        oai_request_free(r);
        r = parse_ok(OAI_COMPLETION, COMPL_BASE ",\"max_tokens\":3}");
        assert_int_equal(r->max_tokens, 3);
        oai_request_free(r);
}

static void completion_prompt_forms(void **state)
{
        struct oai_request *r = parse_ok(OAI_COMPLETION, "{\"model\":\"m\",\"prompt\":[\"one\"]}");

        assert_string_equal(r->prompt, "one");
        assert_int_equal(r->prompt_len, 3);
        assert_null(r->prompt_tokens);
        oai_request_free(r);

        r = parse_ok(OAI_COMPLETION, "{\"model\":\"m\",\"prompt\":[0,5,2147483647]}");
        assert_null(r->prompt);
        assert_int_equal(r->n_prompt_tokens, 3);
        assert_int_equal(r->prompt_tokens[0], 0);
        assert_int_equal(r->prompt_tokens[1], 5);
        assert_int_equal(r->prompt_tokens[2], INT32_MAX);
        oai_request_free(r);

        r = parse_ok(OAI_COMPLETION, "{\"model\":\"m\",\"prompt\":\"\"}");
        assert_string_equal(r->prompt, "");
        assert_int_equal(r->prompt_len, 0);
        oai_request_free(r);
}

static void token_ids_out_of_range(void **state)
{
        parse_err(OAI_COMPLETION, "{\"model\":\"m\",\"prompt\":[1,2147483648]}", "prompt[1]",
                  "invalid_value");
        parse_err(OAI_COMPLETION, "{\"model\":\"m\",\"prompt\":[-1]}", "prompt[0]",
                  "invalid_value");
        parse_err(OAI_COMPLETION, "{\"model\":\"m\",\"prompt\":[1,-9223372036854775808]}",
                  "prompt[1]", "invalid_value");
        parse_err(OAI_COMPLETION, "{\"model\":\"m\",\"prompt\":[1,2.0]}", "prompt[1]",
                  "invalid_type");
        parse_err(OAI_COMPLETION, "{\"model\":\"m\",\"prompt\":[1,\"a\"]}", "prompt[1]",
                  "invalid_type");
        parse_err(OAI_TOKENIZE, "{\"content\":[3,null]}", "content[1]", "invalid_type");
        /* Beyond int64, jansson itself refuses. */
        parse_err(OAI_COMPLETION, "{\"model\":\"m\",\"prompt\":[99999999999999999999]}", "",
                  "invalid_json");
}

static void tokenize_fields(void **state)
{
        struct oai_request *r = parse_ok(OAI_TOKENIZE, "{\"content\":\"abc\"}");

        assert_null(r->model);
        assert_string_equal(r->prompt, "abc");
        assert_true(r->add_special);
        oai_request_free(r);

        r = parse_ok(OAI_TOKENIZE, "{\"model\":\"m\",\"prompt\":\"p\",\"content\":\"c\","
                                   "\"add_special\":false,\"temperature\":\"x\"}");
        assert_string_equal(r->model, "m");
        assert_string_equal(r->prompt, "p");
        assert_false(r->add_special);
        oai_request_free(r);

        r = parse_ok(OAI_TOKENIZE, "{\"prompt\":null,\"content\":[7,8]}");
        assert_int_equal(r->n_prompt_tokens, 2);
        assert_int_equal(r->prompt_tokens[1], 8);
        oai_request_free(r);

        parse_err(OAI_TOKENIZE, "{\"model\":\"m\"}", "prompt", "missing_required_parameter");
        parse_err(OAI_TOKENIZE, "{\"content\":\"a\",\"add_special\":1}", "add_special",
                  "invalid_type");
        parse_err(OAI_TOKENIZE, "{\"content\":5}", "content", "invalid_type");
        parse_err(OAI_TOKENIZE, "{\"prompt\":5,\"content\":\"a\"}", "prompt", "invalid_type");
}

static void content_parts(void **state)
{
        struct oai_request *r = parse_ok(OAI_CHAT,
                "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":["
                "{\"type\":\"text\",\"text\":\"hello \"},{\"type\":\"text\",\"text\":\"\"},"
                "{\"type\":\"text\",\"text\":\"world\",\"extra\":1}]},"
                "{\"role\":\"assistant\",\"content\":[]}]}");

        assert_string_equal(r->messages[0].content, "hello world");
        assert_string_equal(r->messages[1].content, "");
        oai_request_free(r);
}

/* ---- parsing: refusals ---- */

struct bad_case {
        enum oai_kind kind;
        const char *base;  /* NULL: body is the whole request */
        const char *body;
        const char *param;
        const char *code;
};

#define MSG1(m) "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"a\"}," m "]}"

static const struct bad_case bad_cases[] = {
        /* model */
        { OAI_CHAT, NULL, "{\"model\":5," CHAT_MSGS "}", "model", "invalid_type" },
        { OAI_CHAT, NULL, "{\"model\":[\"m\"]," CHAT_MSGS "}", "model", "invalid_type" },
        { OAI_CHAT, NULL, "{\"model\":\"\"," CHAT_MSGS "}", "model", "invalid_value" },
        { OAI_CHAT, NULL, "{" CHAT_MSGS "}", "model", "missing_required_parameter" },
        { OAI_COMPLETION, NULL, "{\"model\":true,\"prompt\":\"a\"}", "model", "invalid_type" },
        { OAI_TOKENIZE, NULL, "{\"model\":{},\"prompt\":\"a\"}", "model", "invalid_type" },
        /* messages */
        { OAI_CHAT, NULL, "{\"model\":\"m\"}", "messages", "missing_required_parameter" },
        { OAI_CHAT, NULL, "{\"model\":\"m\",\"messages\":\"hi\"}", "messages", "invalid_type" },
        { OAI_CHAT, NULL, "{\"model\":\"m\",\"messages\":{}}", "messages", "invalid_type" },
        { OAI_CHAT, NULL, "{\"model\":\"m\",\"messages\":[]}", "messages", "invalid_value" },
        { OAI_CHAT, NULL, MSG1("\"hi\""), "messages[1]", "invalid_type" },
        { OAI_CHAT, NULL, MSG1("{\"role\":3,\"content\":\"a\"}"), "messages[1].role",
          "invalid_type" },
        { OAI_CHAT, NULL, MSG1("{\"role\":\"tool\",\"content\":\"a\"}"), "messages[1].role",
          "invalid_value" },
        { OAI_CHAT, NULL, MSG1("{\"role\":\"User\",\"content\":\"a\"}"), "messages[1].role",
          "invalid_value" },
        { OAI_CHAT, NULL, MSG1("{\"content\":\"a\"}"), "messages[1].role",
          "missing_required_parameter" },
        { OAI_CHAT, NULL, MSG1("{\"role\":\"user\",\"content\":3}"), "messages[1].content",
          "invalid_type" },
        { OAI_CHAT, NULL, MSG1("{\"role\":\"user\",\"content\":{}}"), "messages[1].content",
          "invalid_type" },
        { OAI_CHAT, NULL, MSG1("{\"role\":\"system\"}"), "messages[1].content",
          "missing_required_parameter" },
        { OAI_CHAT, NULL, MSG1("{\"role\":\"user\",\"content\":[\"x\"]}"),
          "messages[1].content[0]", "invalid_type" },
        { OAI_CHAT, NULL, MSG1("{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},"
                               "{\"type\":1,\"text\":\"a\"}]}"),
          "messages[1].content[1].type", "invalid_type" },
        { OAI_CHAT, NULL, MSG1("{\"role\":\"user\",\"content\":[{\"type\":\"image_url\"}]}"),
          "messages[1].content[0].type", "invalid_value" },
        { OAI_CHAT, NULL, MSG1("{\"role\":\"user\",\"content\":[{\"text\":\"a\"}]}"),
          "messages[1].content[0].type", "missing_required_parameter" },
        { OAI_CHAT, NULL, MSG1("{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":[]}]}"),
          "messages[1].content[0].text", "invalid_type" },
        { OAI_CHAT, NULL, MSG1("{\"role\":\"user\",\"content\":[{\"type\":\"text\"}]}"),
          "messages[1].content[0].text", "missing_required_parameter" },
        /* prompt */
        { OAI_COMPLETION, NULL, "{\"model\":\"m\"}", "prompt", "missing_required_parameter" },
        { OAI_COMPLETION, NULL, "{\"model\":\"m\",\"prompt\":5}", "prompt", "invalid_type" },
        { OAI_COMPLETION, NULL, "{\"model\":\"m\",\"prompt\":{}}", "prompt", "invalid_type" },
        { OAI_COMPLETION, NULL, "{\"model\":\"m\",\"prompt\":[]}", "prompt", "invalid_value" },
        { OAI_COMPLETION, NULL, "{\"model\":\"m\",\"prompt\":[true]}", "prompt[0]",
          "invalid_type" },
        { OAI_COMPLETION, NULL, "{\"model\":\"m\",\"prompt\":[[1,2]]}", "prompt[0]",
          "invalid_type" },
        { OAI_COMPLETION, NULL, "{\"model\":\"m\",\"prompt\":[\"a\",\"b\"]}", "prompt",
          "invalid_value" },
        { OAI_COMPLETION, NULL, "{\"model\":\"m\",\"prompt\":[\"a\",1]}", "prompt",
          "invalid_value" },
        /* the other fields, on a good chat or completion */
        { OAI_CHAT, CHAT_BASE, "\"max_tokens\":\"5\"", "max_tokens", "invalid_type" },
        { OAI_CHAT, CHAT_BASE, "\"max_tokens\":5.5", "max_tokens", "invalid_type" },
        { OAI_CHAT, CHAT_BASE, "\"max_tokens\":5.0", "max_tokens", "invalid_type" },
        { OAI_COMPLETION, COMPL_BASE, "\"max_completion_tokens\":[]", "max_completion_tokens",
          "invalid_type" },
        { OAI_CHAT, CHAT_BASE, "\"temperature\":\"1\"", "temperature", "invalid_type" },
        { OAI_COMPLETION, COMPL_BASE, "\"temperature\":true", "temperature", "invalid_type" },
        { OAI_CHAT, CHAT_BASE, "\"top_p\":\"x\"", "top_p", "invalid_type" },
        { OAI_CHAT, CHAT_BASE, "\"top_k\":1.5", "top_k", "invalid_type" },
        { OAI_COMPLETION, COMPL_BASE, "\"top_k\":\"1\"", "top_k", "invalid_type" },
        { OAI_CHAT, CHAT_BASE, "\"min_p\":{}", "min_p", "invalid_type" },
        { OAI_CHAT, CHAT_BASE, "\"presence_penalty\":[0]", "presence_penalty",
          "invalid_type" },
        { OAI_CHAT, CHAT_BASE, "\"frequency_penalty\":false", "frequency_penalty",
          "invalid_type" },
        { OAI_COMPLETION, COMPL_BASE, "\"repetition_penalty\":\"1.1\"", "repetition_penalty",
          "invalid_type" },
        { OAI_CHAT, CHAT_BASE, "\"seed\":1.5", "seed", "invalid_type" },
        { OAI_CHAT, CHAT_BASE, "\"seed\":\"42\"", "seed", "invalid_type" },
        { OAI_CHAT, CHAT_BASE, "\"stop\":5", "stop", "invalid_type" },
        { OAI_CHAT, CHAT_BASE, "\"stop\":{}", "stop", "invalid_type" },
        { OAI_CHAT, CHAT_BASE, "\"stop\":[\"a\",5]", "stop[1]", "invalid_type" },
        { OAI_COMPLETION, COMPL_BASE, "\"stop\":[\"a\",\"b\",null]", "stop[2]",
          "invalid_type" },
        { OAI_CHAT, CHAT_BASE, "\"stream\":\"true\"", "stream", "invalid_type" },
        { OAI_CHAT, CHAT_BASE, "\"stream\":1", "stream", "invalid_type" },
        { OAI_CHAT, CHAT_BASE, "\"stream_options\":true", "stream_options", "invalid_type" },
        { OAI_CHAT, CHAT_BASE, "\"stream_options\":{\"include_usage\":\"yes\"}",
          "stream_options.include_usage", "invalid_type" },
        { OAI_CHAT, CHAT_BASE, "\"n\":\"1\"", "n", "invalid_type" },
        { OAI_CHAT, CHAT_BASE, "\"n\":1.0", "n", "invalid_type" },
        { OAI_CHAT, CHAT_BASE, "\"n\":2", "n", "invalid_value" },
        { OAI_COMPLETION, COMPL_BASE, "\"n\":0", "n", "invalid_value" },
        { OAI_CHAT, CHAT_BASE, "\"user\":5", "user", "invalid_type" },
};

static void wrong_types_name_the_field(void **state)
{
        for (size_t i = 0; i < sizeof bad_cases / sizeof bad_cases[0]; i++) {
                const struct bad_case *c = &bad_cases[i];
                char *body = c->base ? with(c->base, c->body) : strdup(c->body);
                struct oai_error e = parse_err(c->kind, body, c->param, c->code);

                /* The message names the field too (the top-level name). */
                char top[64];
                size_t n = strcspn(c->param, "[.");

                snprintf(top, sizeof top, "%.*s", (int)n, c->param);
                if (!strstr(e.message, top))
                        fail_msg("message '%s' does not name %s", e.message, top);
                free(body);
        }
}

struct edge {
        const char *field;
        const char *value;
        bool ok;
};

static const struct edge edges[] = {
        { "temperature", "0", true },
        { "temperature", "2", true },
        { "temperature", "2.0", true },
        { "temperature", "-0.0001", false },
        { "temperature", "2.0001", false },
        { "temperature", "1e300", false },
        { "top_p", "0", false },
        { "top_p", "0.0001", true },
        { "top_p", "1", true },
        { "top_p", "1.0001", false },
        { "top_p", "-1e300", false },
        { "top_p", "1e30", false },     /* past int32, inside float */
        { "min_p", "3e38", false },
        { "presence_penalty", "-1e39", false }, /* past float */
        { "top_k", "-2", false },
        { "top_k", "-1", true },
        { "top_k", "0", true },
        { "top_k", "2147483647", true },
        { "top_k", "2147483648", false },
        { "min_p", "-0.0001", false },
        { "min_p", "0", true },
        { "min_p", "1", true },
        { "min_p", "1.0001", false },
        { "presence_penalty", "-2.0001", false },
        { "presence_penalty", "-2", true },
        { "presence_penalty", "2", true },
        { "presence_penalty", "2.0001", false },
        { "frequency_penalty", "-2.0001", false },
        { "frequency_penalty", "-2", true },
        { "frequency_penalty", "2", true },
        { "frequency_penalty", "2.0001", false },
        { "repetition_penalty", "0", false },
        { "repetition_penalty", "0.0001", true },
        { "repetition_penalty", "10", true },
        { "repetition_penalty", "10.001", false },
        { "repetition_penalty", "1e39", false },
        { "max_tokens", "0", false },
        { "max_tokens", "1", true },
        { "max_tokens", "1048576", true },
        { "max_tokens", "1048577", false },
        { "max_tokens", "-1", false },
        { "max_completion_tokens", "0", false },
        { "max_completion_tokens", "1", true },
        { "max_completion_tokens", "1048576", true },
        { "max_completion_tokens", "1048577", false },
        { "seed", "-9223372036854775808", true },
        { "seed", "9223372036854775807", true },
        { "n", "1", true },
};

static void range_edges(void **state)
{
        for (size_t i = 0; i < sizeof edges / sizeof edges[0]; i++) {
                char extra[128];
                char *body;

                snprintf(extra, sizeof extra, "\"%s\":%s", edges[i].field, edges[i].value);
                for (int k = OAI_CHAT; k <= OAI_COMPLETION; k++) {
                        body = with(k == OAI_CHAT ? CHAT_BASE : COMPL_BASE, extra);
                        if (edges[i].ok)
                                oai_request_free(parse_ok((enum oai_kind)k, body));
                        else
                                parse_err((enum oai_kind)k, body, edges[i].field,
                                          "invalid_value");
                        free(body);
                }
        }
}

static void range_values_stored(void **state)
{
        struct oai_request *r = parse_ok(OAI_CHAT, CHAT_BASE ",\"top_k\":2147483647,"
                                         "\"temperature\":0,\"max_tokens\":1048576,"
                                         "\"seed\":9223372036854775807}");
        struct oai_limits l;

        assert_int_equal(r->sampling.top_k, INT32_MAX);
        assert_true(r->sampling.temperature == 0.0f);
        assert_int_equal(r->max_tokens, 1 << 20);
        assert_true(r->has_seed);
        assert_true(r->sampling.seed == (uint64_t)INT64_MAX);
        oai_request_free(r);

        /* The cap comes from the limits. */
        oai_limits_default(&l);
        l.max_tokens_cap = 10;
        r = parse_ok_l(OAI_CHAT, CHAT_BASE ",\"max_tokens\":10}",
                       strlen(CHAT_BASE ",\"max_tokens\":10}"), &l);
        oai_request_free(r);
        parse_err_l(OAI_CHAT, CHAT_BASE ",\"max_tokens\":11}",
                    strlen(CHAT_BASE ",\"max_tokens\":11}"), &l, 400, "max_tokens",
                    "invalid_value");
}

static void n_two_refused(void **state)
{
        struct oai_error e = parse_err(OAI_CHAT, CHAT_BASE ",\"n\":2}", "n", "invalid_value");

        assert_non_null(strstr(e.message, "n must be 1"));
}

static void stop_forms(void **state)
{
        char s256[257], s257[258], *body;
        struct oai_request *r;

        memset(s256, 'x', 256);
        s256[256] = '\0';
        memset(s257, 'y', 257);
        s257[257] = '\0';

        r = parse_ok(OAI_CHAT, CHAT_BASE ",\"stop\":\"###\"}");
        assert_int_equal(r->n_stop, 1);
        assert_string_equal(r->stop[0], "###");
        oai_request_free(r);

        r = parse_ok(OAI_CHAT, CHAT_BASE ",\"stop\":[\"a\",\"b\",\"\",\"d\"]}");
        assert_int_equal(r->n_stop, 4);
        assert_string_equal(r->stop[3], "d");
        oai_request_free(r);

        r = parse_ok(OAI_CHAT, CHAT_BASE ",\"stop\":[]}");
        assert_int_equal(r->n_stop, 0);
        oai_request_free(r);

        parse_err(OAI_CHAT, CHAT_BASE ",\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}", "stop",
                  "invalid_value");

        assert_true(asprintf(&body, CHAT_BASE ",\"stop\":\"%s\"}", s256) > 0);
        r = parse_ok(OAI_CHAT, body);
        assert_int_equal(strlen(r->stop[0]), 256);
        oai_request_free(r);
        free(body);
        assert_true(asprintf(&body, CHAT_BASE ",\"stop\":\"%s\"}", s257) > 0);
        parse_err(OAI_CHAT, body, "stop", "invalid_value");
        free(body);
        assert_true(asprintf(&body, CHAT_BASE ",\"stop\":[\"%s\",\"%s\"]}", s256, s257) > 0);
        parse_err(OAI_CHAT, body, "stop[1]", "invalid_value");
        free(body);
        /* Bytes, not characters: 128 two-byte characters fit, 129 do not. */
        {
                char big[2 * 129 + 1] = { 0 };

                for (int i = 0; i < 129; i++)
                        memcpy(big + 2 * i, "\xc3\xa9", 2);
                assert_true(asprintf(&body, CHAT_BASE ",\"stop\":\"%.256s\"}", big) > 0);
                oai_request_free(parse_ok(OAI_CHAT, body));
                free(body);
                assert_true(asprintf(&body, CHAT_BASE ",\"stop\":\"%s\"}", big) > 0);
                parse_err(OAI_CHAT, body, "stop", "invalid_value");
                free(body);
        }
}

static void malformed_json(void **state)
{
        struct oai_error e;

        e = parse_err(OAI_CHAT, "{\"model\": }", "", "invalid_json");
        assert_non_null(strstr(e.message, "line 1"));
        assert_non_null(strstr(e.message, "column"));
        e = parse_err(OAI_CHAT, "{\"model\":\"m\",\n\"messages\":[}", "", "invalid_json");
        assert_non_null(strstr(e.message, "line 2"));
        parse_err(OAI_CHAT, "", "", "invalid_json");
        parse_err(OAI_CHAT, CHAT_BASE "} trailing", "", "invalid_json");
        parse_err(OAI_CHAT, "5", "", "invalid_json");
        parse_err(OAI_CHAT, "{'model':'m'}", "", "invalid_json");
        /* Valid JSON, but not an object. */
        parse_err(OAI_CHAT, "[" CHAT_BASE "}]", "", "invalid_type");
        /* NULL body with len 0 is an empty body. */
        parse_err_l(OAI_CHAT, NULL, 0, NULL, 400, "", "invalid_json");
}

static void invalid_utf8_refused(void **state)
{
        static const char *const bad[] = {
                "\xff",            /* never valid */
                "\xc0\xaf",        /* overlong '/' */
                "\xed\xa0\x80",    /* a surrogate */
                "\xf4\x90\x80\x80",/* past U+10FFFF */
                "\xe2\x82",        /* cut short */
        };
        char *body;

        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
                assert_true(asprintf(&body, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\","
                                     "\"content\":\"a%sb\"}]}", bad[i]) > 0);
                parse_err(OAI_CHAT, body, "", "invalid_json");
                free(body);
                /* In an ignored field, and in a key, too. */
                assert_true(asprintf(&body, "{\"x%s\":1," CHAT_MSGS ",\"model\":\"m\"}",
                                     bad[i]) > 0);
                parse_err(OAI_CHAT, body, "", "invalid_json");
                free(body);
        }
}

static void embedded_nul_refused(void **state)
{
        static const char raw[] = "{\"model\":\"m\0\"," CHAT_MSGS "}";
        struct oai_error e;

        e = parse_err(OAI_CHAT, "{\"model\":\"m\\u0000x\"," CHAT_MSGS "}", "", "invalid_json");
        assert_non_null(strstr(e.message, "byte"));
        parse_err(OAI_CHAT, "{\"model\":\"m\",\"messages\":[{\"role\":\"user\","
                  "\"content\":[{\"type\":\"text\",\"text\":\"\\u0000\"}]}]}", "",
                  "invalid_json");
        parse_err(OAI_CHAT, "{\"a\\u0000\":1,\"model\":\"m\"," CHAT_MSGS "}", "",
                  "invalid_json");
        /* A raw NUL byte inside the body (not a terminator). */
        parse_err_l(OAI_CHAT, raw, sizeof raw - 1, NULL, 400, "", "invalid_json");
        /* And after a complete body. */
        parse_err_l(OAI_CHAT, CHAT_BASE "}\0", sizeof(CHAT_BASE "}\0") - 1, NULL, 400, "",
                    "invalid_json");
}

/* {"x": [[...[]...]]} nested depth levels in all. */
static char *nested(int depth)
{
        size_t n = strlen(CHAT_BASE) + 16 + 2 * (size_t)depth;
        char *s = malloc(n), *p = s;

        assert_non_null(s);
        p += sprintf(p, "%s,\"x\":", CHAT_BASE);
        for (int i = 1; i < depth; i++)
                *p++ = '[';
        for (int i = 1; i < depth; i++)
                *p++ = ']';
        strcpy(p, "}");
        return s;
}

static void depth_limit(void **state)
{
        struct oai_limits l;
        char *body;

        /* The base itself is 3 deep (object, messages, message). */
        body = nested(16);
        oai_request_free(parse_ok(OAI_CHAT, body));
        free(body);
        body = nested(17);
        parse_err(OAI_CHAT, body, "", "too_deep");
        free(body);
        /* Past jansson's own limit (2048), still too_deep. */
        body = nested(5000);
        parse_err(OAI_CHAT, body, "", "too_deep");
        free(body);
        /* From the limits, and objects count too. */
        oai_limits_default(&l);
        l.max_depth = 3;
        oai_request_free(parse_ok_l(OAI_CHAT, CHAT_BASE "}", strlen(CHAT_BASE "}"), &l));
        oai_request_free(parse_ok_l(OAI_CHAT, CHAT_BASE ",\"o\":{\"a\":{}}}",
                                    strlen(CHAT_BASE ",\"o\":{\"a\":{}}}"), &l));
        oai_request_free(parse_ok_l(OAI_CHAT, CHAT_BASE ",\"o\":{\"a\":{\"b\":1}}}",
                                    strlen(CHAT_BASE ",\"o\":{\"a\":{\"b\":1}}}"), &l));
        parse_err_l(OAI_CHAT, CHAT_BASE ",\"o\":{\"a\":{\"b\":{}}}}",
                    strlen(CHAT_BASE ",\"o\":{\"a\":{\"b\":{}}}}"), &l, 400, "", "too_deep");
}

static void body_size_limit(void **state)
{
        size_t max = 1 << 20;
        char *body = malloc(max + 2);
        size_t base = strlen(CHAT_BASE "}");
        struct oai_error e;

        assert_non_null(body);
        /* Exactly max_body: whitespace padding is still JSON. */
        memcpy(body, CHAT_BASE "}", base);
        memset(body + base, ' ', max - base);
        body[max] = ' ';
        body[max + 1] = '\0';
        oai_request_free(parse_ok_l(OAI_CHAT, body, max, NULL));
        e = parse_err_l(OAI_CHAT, body, max + 1, NULL, 413, "", "body_too_large");
        assert_non_null(strstr(e.message, "1048576"));
        {
                struct oai_request *r = (struct oai_request *)1;

                assert_int_equal(oai_parse(OAI_CHAT, body, max + 1, NULL, &r, &e), -E2BIG);
        }
        free(body);
}

static void too_many_messages(void **state)
{
        size_t cap = 1025 * 40 + 64;
        char *body = malloc(cap), *p = body;
        struct oai_request *r;

        assert_non_null(body);
        p += sprintf(p, "{\"model\":\"m\",\"messages\":[");
        for (int i = 0; i < 1024; i++)
                p += sprintf(p, "%s{\"role\":\"user\",\"content\":\"%d\"}", i ? "," : "", i);
        strcpy(p, "]}");
        r = parse_ok(OAI_CHAT, body);
        assert_int_equal(r->n_messages, 1024);
        assert_string_equal(r->messages[1023].content, "1023");
        oai_request_free(r);
        /* One more is too many; a bad 1024th names its index. */
        sprintf(p, ",{\"role\":\"user\",\"content\":\"x\"}]}");
        parse_err(OAI_CHAT, body, "messages", "invalid_value");
        sprintf(p, "]}");
        p = strstr(body, "\"1023\"");
        memcpy(p, "1023  ", 6);
        parse_err(OAI_CHAT, body, "messages[1023].content", "invalid_type");
        free(body);
}

static void long_ids_refused(void **state)
{
        char id[OAI_MAX_ID_LEN + 2];
        char *body;

        memset(id, 'a', sizeof id - 1);
        id[sizeof id - 1] = '\0';
        assert_true(asprintf(&body, "{\"model\":\"%s\"," CHAT_MSGS "}", id) > 0);
        parse_err(OAI_CHAT, body, "model", "invalid_value");
        free(body);
        assert_true(asprintf(&body, CHAT_BASE ",\"user\":\"%s\"}", id) > 0);
        parse_err(OAI_CHAT, body, "user", "invalid_value");
        free(body);
        id[OAI_MAX_ID_LEN] = '\0';
        assert_true(asprintf(&body, "{\"model\":\"%s\"," CHAT_MSGS ",\"user\":\"%s\"}", id,
                             id) > 0);
        oai_request_free(parse_ok(OAI_CHAT, body));
        free(body);
}

static void error_set_truncates(void **state)
{
        struct oai_error e;
        char longp[200];

        memset(longp, 'p', sizeof longp - 1);
        longp[sizeof longp - 1] = '\0';
        oai_error_set(&e, 400, "invalid_request_error", longp, NULL, "%s and %d", "x", 5);
        assert_int_equal(e.status, 400);
        assert_int_equal(strlen(e.param), sizeof e.param - 1);
        assert_string_equal(e.code, "");
        assert_string_equal(e.message, "x and 5");
        oai_error_set(NULL, 400, "t", NULL, NULL, "nothing"); /* allowed */
}

/* ---- builders ---- */

static void error_json_shapes(void **state)
{
        struct oai_error e;
        json_t *j, *err;
        char *s;

        oai_error_set(&e, 400, "invalid_request_error", "messages[1].content", "invalid_type",
                      "messages[1].content must be a \"string\"");
        check_error_json(&e);
        s = oai_error_json(&e);
        j = load(s);
        free(s);
        err = json_object_get(j, "error");
        assert_string_equal(jstr(err, "code"), "invalid_type");
        assert_string_equal(jstr(err, "message"), "messages[1].content must be a \"string\"");
        assert_int_equal(json_object_size(err), 4);
        json_decref(j);

        oai_error_set(&e, 503, "server_error", "", "", "draining");
        j = load_sse(oai_error_sse(&e));
        err = json_object_get(j, "error");
        assert_true(json_is_null(json_object_get(err, "param")));
        assert_true(json_is_null(json_object_get(err, "code")));
        assert_string_equal(jstr(err, "type"), "server_error");
        assert_string_equal(jstr(err, "message"), "draining");
        json_decref(j);
}

static void check_usage(json_t *o, int64_t p, int64_t c)
{
        json_t *u = json_object_get(o, "usage");

        assert_true(json_is_object(u));
        assert_int_equal(jint(u, "prompt_tokens"), p);
        assert_int_equal(jint(u, "completion_tokens"), c);
        assert_int_equal(jint(u, "total_tokens"), p + c);
}

static void check_head(json_t *o, const char *object, const char *id, int64_t created,
                       const char *model)
{
        assert_string_equal(jstr(o, "object"), object);
        assert_string_equal(jstr(o, "id"), id);
        assert_int_equal(jint(o, "created"), created);
        assert_string_equal(jstr(o, "model"), model);
}

static json_t *choice0(json_t *o)
{
        json_t *c = json_object_get(o, "choices");

        assert_true(json_is_array(c));
        assert_int_equal(json_array_size(c), 1);
        c = json_array_get(c, 0);
        assert_int_equal(jint(c, "index"), 0);
        return c;
}

static void response_json_chat(void **state)
{
        static const char text[] = "caf\xc3\xa9 \"q\"\n\0tail";
        struct oai_usage u = { .prompt_tokens = 12, .completion_tokens = 34 };
        char *s = oai_response_json(OAI_CHAT, "chatcmpl-1", 1700000000, "deepseek-v3", text,
                                    sizeof text - 1, "stop", &u);
        json_t *j, *c, *m, *content;

        assert_non_null(s);
        assert_null(strchr(s, '\n')); /* compact */
        j = load(s);
        free(s);
        check_head(j, "chat.completion", "chatcmpl-1", 1700000000, "deepseek-v3");
        c = choice0(j);
        assert_string_equal(jstr(c, "finish_reason"), "stop");
        m = json_object_get(c, "message");
        assert_string_equal(jstr(m, "role"), "assistant");
        content = json_object_get(m, "content");
        assert_int_equal(json_string_length(content), sizeof text - 1);
        assert_memory_equal(json_string_value(content), text, sizeof text - 1);
        check_usage(j, 12, 34);
        json_decref(j);

        /* A prefix of the text, and no usage given. */
        s = oai_response_json(OAI_CHAT, "x", 0, "m", text, 3, "length", NULL);
        j = load(s);
        free(s);
        m = json_object_get(choice0(j), "message");
        assert_string_equal(jstr(m, "content"), "caf");
        check_usage(j, 0, 0);
        json_decref(j);
        assert_null(oai_response_json(OAI_TOKENIZE, "x", 0, "m", "a", 1, "stop", &u));
}

static void response_json_completion(void **state)
{
        struct oai_usage u = { .prompt_tokens = 5, .completion_tokens = 1 };
        char *s = oai_response_json(OAI_COMPLETION, "cmpl-9", 42, "m", "hello", 5, "length",
                                    &u);
        json_t *j, *c;

        j = load(s);
        free(s);
        check_head(j, "text_completion", "cmpl-9", 42, "m");
        c = choice0(j);
        assert_string_equal(jstr(c, "text"), "hello");
        assert_string_equal(jstr(c, "finish_reason"), "length");
        assert_true(json_is_null(json_object_get(c, "logprobs")));
        assert_null(json_object_get(c, "message"));
        check_usage(j, 5, 1);
        json_decref(j);
}

static void builders_repair_invalid_utf8(void **state)
{
        static const char bad[] = "a\xff" "b\xe2\x82" "c\xed\xa0\x80";
        char *s = oai_response_json(OAI_COMPLETION, "id\xc0", 1, "m", bad, sizeof bad - 1,
                                    NULL, NULL);
        json_t *j, *c;

        j = load(s);
        free(s);
        c = choice0(j);
        assert_string_equal(jstr(c, "text"),
                            "a\xef\xbf\xbd" "b\xef\xbf\xbd\xef\xbf\xbd" "c"
                            "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
        assert_string_equal(jstr(j, "id"), "id\xef\xbf\xbd");
        assert_true(json_is_null(json_object_get(c, "finish_reason")));
        json_decref(j);
}

static void chunk_sse_chat(void **state)
{
        struct oai_usage u = { .prompt_tokens = 3, .completion_tokens = 4 };
        json_t *j, *c, *d;

        /* The first chunk: role, empty content. */
        j = load_sse(oai_chunk_sse(OAI_CHAT, "chatcmpl-2", 7, "m", true, NULL, 0, NULL, NULL));
        check_head(j, "chat.completion.chunk", "chatcmpl-2", 7, "m");
        c = choice0(j);
        d = json_object_get(c, "delta");
        assert_string_equal(jstr(d, "role"), "assistant");
        assert_string_equal(jstr(d, "content"), "");
        assert_true(json_is_null(json_object_get(c, "finish_reason")));
        assert_true(json_is_null(json_object_get(j, "usage")));
        assert_non_null(json_object_get(j, "usage"));
        json_decref(j);

        /* A text chunk: content only. */
        j = load_sse(oai_chunk_sse(OAI_CHAT, "chatcmpl-2", 7, "m", false, "hi\n\nthere", 9,
                                   NULL, NULL));
        d = json_object_get(choice0(j), "delta");
        assert_null(json_object_get(d, "role"));
        assert_string_equal(jstr(d, "content"), "hi\n\nthere");
        json_decref(j);

        /* The last: empty delta, finish_reason. */
        j = load_sse(oai_chunk_sse(OAI_CHAT, "chatcmpl-2", 7, "m", false, NULL, 0, "stop",
                                   NULL));
        c = choice0(j);
        assert_int_equal(json_object_size(json_object_get(c, "delta")), 0);
        assert_string_equal(jstr(c, "finish_reason"), "stop");
        assert_true(json_is_null(json_object_get(j, "usage")));
        json_decref(j);

        /* The usage chunk: no choices. */
        j = load_sse(oai_chunk_sse(OAI_CHAT, "chatcmpl-2", 7, "m", false, NULL, 0, NULL, &u));
        assert_true(json_is_array(json_object_get(j, "choices")));
        assert_int_equal(json_array_size(json_object_get(j, "choices")), 0);
        check_usage(j, 3, 4);
        json_decref(j);
        assert_null(oai_chunk_sse(OAI_TOKENIZE, "x", 0, "m", false, "a", 1, NULL, NULL));
}

static void chunk_sse_completion(void **state)
{
        struct oai_usage u = { .prompt_tokens = 1, .completion_tokens = 2 };
        json_t *j, *c;

        j = load_sse(oai_chunk_sse(OAI_COMPLETION, "cmpl-3", 8, "m", true, "tok", 3, NULL,
                                   NULL));
        check_head(j, "text_completion", "cmpl-3", 8, "m");
        c = choice0(j);
        assert_string_equal(jstr(c, "text"), "tok");
        assert_null(json_object_get(c, "delta"));
        assert_true(json_is_null(json_object_get(c, "finish_reason")));
        assert_true(json_is_null(json_object_get(j, "usage")));
        json_decref(j);

        j = load_sse(oai_chunk_sse(OAI_COMPLETION, "cmpl-3", 8, "m", false, NULL, 0, "length",
                                   NULL));
        c = choice0(j);
        assert_string_equal(jstr(c, "text"), "");
        assert_string_equal(jstr(c, "finish_reason"), "length");
        json_decref(j);

        j = load_sse(oai_chunk_sse(OAI_COMPLETION, "cmpl-3", 8, "m", false, NULL, 0, NULL, &u));
        assert_int_equal(json_array_size(json_object_get(j, "choices")), 0);
        check_usage(j, 1, 2);
        json_decref(j);
        assert_string_equal(OAI_SSE_DONE, "data: [DONE]\n\n");
}

static void models_json(void **state)
{
        const char *ids[] = { "deepseek-v3", "tiny" };
        char *s = oai_models_json(ids, 2, 99);
        json_t *j, *data, *m;

        j = load(s);
        free(s);
        assert_string_equal(jstr(j, "object"), "list");
        data = json_object_get(j, "data");
        assert_int_equal(json_array_size(data), 2);
        for (size_t i = 0; i < 2; i++) {
                m = json_array_get(data, i);
                assert_string_equal(jstr(m, "id"), ids[i]);
                assert_string_equal(jstr(m, "object"), "model");
                assert_int_equal(jint(m, "created"), 99);
                assert_string_equal(jstr(m, "owned_by"), "moed");
        }
        json_decref(j);

        s = oai_models_json(NULL, 0, 0);
        j = load(s);
        free(s);
        assert_int_equal(json_array_size(json_object_get(j, "data")), 0);
        json_decref(j);
}

static void tokens_json(void **state)
{
        const int32_t ids[] = { 0, 1, INT32_MAX };
        char *s = oai_tokens_json("m", ids, 3);
        json_t *j, *t;

        j = load(s);
        free(s);
        assert_string_equal(jstr(j, "model"), "m");
        assert_int_equal(jint(j, "count"), 3);
        t = json_object_get(j, "tokens");
        assert_int_equal(json_array_size(t), 3);
        for (size_t i = 0; i < 3; i++)
                assert_int_equal(json_integer_value(json_array_get(t, i)), ids[i]);
        json_decref(j);

        s = oai_tokens_json(NULL, NULL, 0);
        j = load(s);
        free(s);
        assert_true(json_is_null(json_object_get(j, "model")));
        assert_int_equal(jint(j, "count"), 0);
        assert_int_equal(json_array_size(json_object_get(j, "tokens")), 0);
        json_decref(j);
}

/* A parsed request's texts go back out through the builders intact. */
static void parse_then_build_round_trip(void **state)
{
        struct oai_request *r = parse_ok(OAI_CHAT,
                "{\"model\":\"m\\u00e9\",\"messages\":[{\"role\":\"user\","
                "\"content\":\"\\ud83d\\ude00 \\\"x\\\"\\t\\\\\"}]}");
        char *s = oai_response_json(OAI_CHAT, "id", 1, r->model, r->messages[0].content,
                                    strlen(r->messages[0].content), "stop", NULL);
        json_t *j = load(s);

        assert_string_equal(jstr(j, "model"), "m\xc3\xa9");
        assert_string_equal(jstr(json_object_get(choice0(j), "message"), "content"),
                            "\xf0\x9f\x98\x80 \"x\"\t\\");
        json_decref(j);
        free(s);
        oai_request_free(r);
        oai_request_free(NULL);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(chat_defaults),
                cmocka_unit_test(chat_all_fields),
                cmocka_unit_test(null_means_absent),
                cmocka_unit_test(unknown_fields_ignored),
                cmocka_unit_test(max_completion_tokens_overrides),
                cmocka_unit_test(completion_prompt_forms),
                cmocka_unit_test(token_ids_out_of_range),
                cmocka_unit_test(tokenize_fields),
                cmocka_unit_test(content_parts),
                cmocka_unit_test(wrong_types_name_the_field),
                cmocka_unit_test(range_edges),
                cmocka_unit_test(range_values_stored),
                cmocka_unit_test(n_two_refused),
                cmocka_unit_test(stop_forms),
                cmocka_unit_test(malformed_json),
                cmocka_unit_test(invalid_utf8_refused),
                cmocka_unit_test(embedded_nul_refused),
                cmocka_unit_test(depth_limit),
                cmocka_unit_test(body_size_limit),
                cmocka_unit_test(too_many_messages),
                cmocka_unit_test(long_ids_refused),
                cmocka_unit_test(error_set_truncates),
                cmocka_unit_test(error_json_shapes),
                cmocka_unit_test(response_json_chat),
                cmocka_unit_test(response_json_completion),
                cmocka_unit_test(builders_repair_invalid_utf8),
                cmocka_unit_test(chunk_sse_chat),
                cmocka_unit_test(chunk_sse_completion),
                cmocka_unit_test(models_json),
                cmocka_unit_test(tokens_json),
                cmocka_unit_test(parse_then_build_round_trip),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
