/* chat: renders conversations in the DeepSeek formats exactly as their Hugging
 * Face templates do (V3 and R1 with the tool-output turns, V2 with BOS), and
 * picks the format from a model's chat template and name. */
#include "engine/chat.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/cleanup.h"
#include "engine/gguf.h"

#define BOS "<｜begin▁of▁sentence｜>"
#define EOS "<｜end▁of▁sentence｜>"
#define USER "<｜User｜>"
#define ASSISTANT "<｜Assistant｜>"

static const struct {
        const char *name;
        enum chat_format f;
} names[] = {
        { "deepseek3", CHAT_DEEPSEEK3 },
        { "deepseek-r1", CHAT_DEEPSEEK_R1 },
        { "deepseek2", CHAT_DEEPSEEK2 },
        { "deepseek-v3", CHAT_DEEPSEEK3 },
        { "deepseek-v2", CHAT_DEEPSEEK2 },
        { "r1", CHAT_DEEPSEEK_R1 },
};

const char *chat_format_name(enum chat_format f)
{
        for (size_t i = 0; i < ARRAY_SIZE(names); i++)
                if (names[i].f == f)
                        return names[i].name;
        return "unknown";
}

int chat_format_from_name(const char *name, enum chat_format *f)
{
        for (size_t i = 0; name && i < ARRAY_SIZE(names); i++)
                if (strcmp(name, names[i].name) == 0) {
                        *f = names[i].f;
                        return 0;
                }
        return -EINVAL;
}

static bool meta_contains(const struct gguf *g, const char *key, const char *needle)
{
        const char *s;
        size_t len;

        if (gguf_get_str(g, key, &s, &len, NULL) < 0)
                return false;
        return memmem(s, len, needle, strlen(needle)) != NULL;
}

/* The markers llama.cpp looks for; R1's template is V3's plus <think>. */
enum chat_format chat_format_detect(const struct gguf *g)
{
        static const char tmpl[] = "tokenizer.chat_template";
        bool v3, v2;

        if (!g)
                return CHAT_DEEPSEEK3;
        v3 = meta_contains(g, tmpl, ASSISTANT) && meta_contains(g, tmpl, USER) &&
             meta_contains(g, tmpl, EOS);
        v2 = meta_contains(g, tmpl, "'Assistant: ' + message['content'] + eos_token");
        if (v2 && !v3)
                return CHAT_DEEPSEEK2;
        if (meta_contains(g, tmpl, "<think>") || meta_contains(g, "general.name", "R1"))
                return CHAT_DEEPSEEK_R1;
        return CHAT_DEEPSEEK3;
}

struct sbuf {
        char *s;
        size_t n, cap;
        bool oom;
};

static void sb_addn(struct sbuf *b, const char *s, size_t n)
{
        if (b->oom)
                return;
        if (b->n + n + 1 > b->cap) {
                size_t cap = MO_MAX(b->cap * 2, b->n + n + 1);
                char *p = realloc(b->s, MO_MAX(cap, (size_t)256));

                if (!p) {
                        b->oom = true;
                        return;
                }
                b->s = p;
                b->cap = MO_MAX(cap, (size_t)256);
        }
        memcpy(b->s + b->n, s, n);
        b->n += n;
        b->s[b->n] = '\0';
}

static void sb_add(struct sbuf *b, const char *s)
{
        sb_addn(b, s, strlen(s));
}

enum role { ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT, ROLE_TOOL };

static int role_of(enum chat_format f, const struct chat_msg *m, size_t i, enum role *r,
                   struct moerr *e)
{
        static const char *const roles[] = { "system", "user", "assistant", "tool" };
        size_t n = f == CHAT_DEEPSEEK2 ? 3 : 4; /* V2's template has no tool turns */

        if (!m->role || !m->content)
                return moerr_set(e, -EINVAL, "message %zu has no %s", i, m->role ? "content" : "role");
        for (size_t k = 0; k < n; k++)
                if (strcmp(m->role, roles[k]) == 0) {
                        *r = (enum role)k;
                        return 0;
                }
        return moerr_set(e, -EINVAL, "message %zu: unknown role \"%s\" for the %s format", i,
                         m->role, chat_format_name(f));
}

/* R1's template keeps only what follows the last </think> of an answer. */
static const char *strip_reasoning(const char *s)
{
        const char *p, *last = NULL;

        for (p = s; (p = strstr(p, "</think>")); p += strlen("</think>"))
                last = p + strlen("</think>");
        return last ? last : s;
}

static void render_v3(struct sbuf *b, bool r1, const struct chat_msg *msgs, const enum role *roles,
                      size_t n, bool add_generation_prompt)
{
        bool first_sys = true, is_tool = false, first_output = true;

        sb_add(b, BOS);
        for (size_t i = 0; i < n; i++)
                if (roles[i] == ROLE_SYSTEM) {
                        if (!first_sys)
                                sb_add(b, "\n\n");
                        sb_add(b, msgs[i].content);
                        first_sys = false;
                }
        for (size_t i = 0; i < n; i++) {
                const char *c = msgs[i].content;

                switch (roles[i]) {
                case ROLE_SYSTEM:
                        break;
                case ROLE_USER:
                        is_tool = false;
                        sb_add(b, USER);
                        sb_add(b, c);
                        break;
                case ROLE_ASSISTANT:
                        sb_add(b, is_tool ? "<｜tool▁outputs▁end｜>" : ASSISTANT);
                        sb_add(b, r1 ? strip_reasoning(c) : c);
                        sb_add(b, EOS);
                        is_tool = false;
                        break;
                case ROLE_TOOL:
                        sb_add(b, first_output ? "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>"
                                               : "\n<｜tool▁output▁begin｜>");
                        sb_add(b, c);
                        sb_add(b, "<｜tool▁output▁end｜>");
                        first_output = false;
                        is_tool = true;
                        break;
                }
        }
        if (is_tool)
                sb_add(b, "<｜tool▁outputs▁end｜>");
        else if (add_generation_prompt)
                sb_add(b, r1 ? ASSISTANT "<think>\n" : ASSISTANT);
}

/* V2 renders system turns where they stand, each followed by a blank line. */
static void render_v2(struct sbuf *b, const struct chat_msg *msgs, const enum role *roles, size_t n,
                      bool add_generation_prompt)
{
        sb_add(b, BOS);
        for (size_t i = 0; i < n; i++) {
                const char *c = msgs[i].content;

                if (roles[i] == ROLE_USER) {
                        sb_add(b, "User: ");
                        sb_add(b, c);
                        sb_add(b, "\n\n");
                } else if (roles[i] == ROLE_ASSISTANT) {
                        sb_add(b, "Assistant: ");
                        sb_add(b, c);
                        sb_add(b, EOS);
                } else {
                        sb_add(b, c);
                        sb_add(b, "\n\n");
                }
        }
        if (add_generation_prompt)
                sb_add(b, "Assistant:");
}

int chat_render(enum chat_format f, const struct chat_msg *msgs, size_t n,
                bool add_generation_prompt, char **out, struct moerr *e)
{
        _cleanup_free_ enum role *roles = NULL;
        struct sbuf b = {0};
        int r;

        *out = NULL;
        if (f != CHAT_DEEPSEEK3 && f != CHAT_DEEPSEEK_R1 && f != CHAT_DEEPSEEK2)
                return moerr_set(e, -EINVAL, "unknown chat format %d", (int)f);
        roles = malloc((n ? n : 1) * sizeof *roles);
        if (!roles)
                return moerr_set(e, -ENOMEM, "out of memory");
        for (size_t i = 0; i < n; i++)
                if ((r = role_of(f, &msgs[i], i, &roles[i], e)) < 0)
                        return r;
        if (f == CHAT_DEEPSEEK2)
                render_v2(&b, msgs, roles, n, add_generation_prompt);
        else
                render_v3(&b, f == CHAT_DEEPSEEK_R1, msgs, roles, n, add_generation_prompt);
        if (b.oom) {
                free(b.s);
                return moerr_set(e, -ENOMEM, "out of memory");
        }
        *out = b.s;
        return 0;
}
