/* gen.c: the commands that make moed generate: `run` (one answer, streamed
 * to stdout) and `chat` (a conversation read line by line from stdin).
 * Answers are asked for as SSE streams and each piece of text is written
 * and flushed the moment its event is parsed. */
#include "moectl.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/cleanup.h"

/* One answer being received. */
struct gen {
        bool chat;              /* chat chunks (delta.content), else completion chunks (text) */
        bool keep;              /* collect the text (chat keeps it for the next turn) */
        char *text;
        size_t len, cap;
        bool wrote;             /* any text went to stdout */
        char last;              /* the last byte written */
        bool done;              /* "data: [DONE]" came */
        char finish[32];        /* finish_reason, "" until one came */
        char *error;            /* an error event's message, or why a chunk was bad */
};

static void gen_free(struct gen *g)
{
        free(g->text);
        free(g->error);
        g->text = g->error = NULL;
}

static int gen_keep(struct gen *g, const char *s, size_t n)
{
        char *p;
        size_t ncap;

        if (g->len + n + 1 > g->cap) {
                ncap = g->cap ? g->cap : 1024;
                while (ncap < g->len + n + 1)
                        ncap *= 2;
                p = realloc(g->text, ncap);
                if (!p)
                        return -ENOMEM;
                g->text = p;
                g->cap = ncap;
        }
        memcpy(g->text + g->len, s, n);
        g->len += n;
        g->text[g->len] = 0;
        return 0;
}

static int gen_fail(struct gen *g, const char *msg)
{
        free(g->error);
        g->error = strdup(msg);
        return -EPROTO;
}

static int gen_text(struct gen *g, const char *s, size_t n)
{
        if (n == 0)
                return 0;
        fwrite(s, 1, n, stdout);
        fflush(stdout);
        g->wrote = true;
        g->last = s[n - 1];
        if (g->keep && gen_keep(g, s, n) < 0)
                return gen_fail(g, "out of memory");
        return 0;
}

/* One choice of a chunk, or of a whole (non-streamed) answer. */
static int gen_choice(struct gen *g, json_t *choice, bool whole)
{
        json_t *holder = json_object_get(choice, whole ? "message" : "delta");
        json_t *t = g->chat ? json_object_get(holder, "content") : json_object_get(choice, "text");
        const char *fr = json_string_value(json_object_get(choice, "finish_reason"));
        int r = 0;

        if (json_is_string(t))
                r = gen_text(g, json_string_value(t), json_string_length(t));
        if (fr)
                snprintf(g->finish, sizeof g->finish, "%s", fr);
        return r;
}

static int on_event(void *ud, const char *data, size_t len)
{
        struct gen *g = ud;
        json_t *j, *err, *choices;
        const char *msg;
        int r = 0;

        if (len == 6 && memcmp(data, "[DONE]", 6) == 0) {
                g->done = true;
                return 0;
        }
        j = json_loadb(data, len, 0, NULL);
        if (!json_is_object(j)) {
                json_decref(j);
                return gen_fail(g, "moed sent a stream event that is not a JSON object");
        }
        err = json_object_get(j, "error");
        if (err) {
                msg = json_string_value(json_object_get(err, "message"));
                r = gen_fail(g, msg ? msg : json_is_string(err) ? json_string_value(err)
                                                                 : "moed failed the request");
                json_decref(j);
                return r;
        }
        choices = json_object_get(j, "choices");
        if (json_array_size(choices) > 0)
                r = gen_choice(g, json_array_get(choices, 0), false);
        json_decref(j);
        return r;
}

/* A 200 that is plain JSON: a server that did not stream after all. */
static int gen_whole(struct gen *g, const struct client_reply *rep)
{
        json_t *j = json_loadb(rep->body, rep->len, 0, NULL);
        json_t *choices = json_object_get(j, "choices");
        int r;

        if (!json_array_size(choices)) {
                json_decref(j);
                return gen_fail(g, "moed's answer has no choices");
        }
        r = gen_choice(g, json_array_get(choices, 0), true);
        g->done = true;
        json_decref(j);
        return r;
}

/* After a stream: ends the answer's line where one is wanted, then says
 * what went wrong. -1 when the user cancelled, else the exit status. */
static int gen_outcome(const struct moectl_opts *o, int r, const struct moerr *e,
                       const struct client_reply *rep, struct gen *g, bool newline)
{
        if (r == 0 && rep->status == 200 && rep->body)
                r = gen_whole(g, rep);
        if (newline && g->wrote && g->last != '\n') {
                putchar('\n');
                fflush(stdout);
        }
        if (r == -ECANCELED)
                return -1;
        if (g->error) {
                moectl_err("%s", g->error);
                return MOECTL_FAILED;
        }
        if (r < 0 && g->wrote) {
                moectl_err("the connection to moed broke before the answer was complete (%s)",
                           e->msg);
                return MOECTL_FAILED;
        }
        if (r < 0 || rep->status != 200)
                return moectl_fail(o, r, e, rep);
        if (!g->done && !g->finish[0]) {
                moectl_err("moed ended the stream before the answer was complete");
                return MOECTL_FAILED;
        }
        if (strcmp(g->finish, "cancelled") == 0) {
                moectl_err("moed cancelled the answer (it may be shutting down)");
                return MOECTL_FAILED;
        }
        return MOECTL_OK;
}

static json_t *gen_request(const struct moectl_opts *o, const char *model, bool stream)
{
        json_t *req = json_pack("{s:s, s:b}", "model", model, "stream", stream);

        if (req && stream &&
            json_object_set_new(req, "stream_options", json_pack("{s:b}", "include_usage", 1)))
                goto fail;
        if (req && moectl_add_sampling(o, req) < 0)
                goto fail;
        return req;
fail:
        json_decref(req);
        return NULL;
}

static int stream(struct client *c, const struct moectl_opts *o, const char *path, json_t *req,
                  struct gen *g, const volatile sig_atomic_t *cancel, bool newline,
                  long *status)
{
        struct client_reply rep = { .retry_after = -1 };
        _cleanup_free_ char *body = json_dumps(req, JSON_COMPACT);
        struct moerr e = { "" };
        int r;

        if (!body) {
                moectl_err("out of memory");
                return MOECTL_FAILED;
        }
        r = client_stream(c, path, body, on_event, g, cancel, &rep, &e);
        r = gen_outcome(o, r, &e, &rep, g, newline);
        if (status)
                *status = rep.status;
        client_reply_free(&rep);
        return r;
}

/* run --json: the whole answer in one piece, as moed sends it. */
static int run_json(struct client *c, const struct moectl_opts *o, const char *path, json_t *req)
{
        struct client_reply rep = { .retry_after = -1 };
        _cleanup_free_ char *body = json_dumps(req, JSON_COMPACT);
        _cleanup_free_ char *out = NULL;
        struct moerr e = { "" };
        json_t *j;
        int r;

        if (!body) {
                moectl_err("out of memory");
                return MOECTL_FAILED;
        }
        r = client_request(c, path, body, 0, &rep, &e);
        if (r < 0 || rep.status != 200) {
                r = moectl_fail(o, r, &e, &rep);
                client_reply_free(&rep);
                return r;
        }
        j = json_loadb(rep.body ? rep.body : "", rep.len, 0, NULL);
        out = j ? json_dumps(j, JSON_COMPACT) : NULL;
        json_decref(j);
        client_reply_free(&rep);
        if (!out) {
                moectl_err("moed's answer is not JSON");
                return MOECTL_FAILED;
        }
        puts(out);
        return MOECTL_OK;
}

static json_t *message(const char *role, const char *content)
{
        return json_pack("{s:s, s:s}", "role", role, "content", content);
}

int cmd_run(struct client *c, const struct moectl_opts *o, const char *model, const char *prompt)
{
        _cleanup_free_ char *in = NULL;
        struct gen g = { .chat = !o->raw };
        const char *path = o->raw ? "/v1/completions" : "/v1/chat/completions";
        json_t *req, *msgs = NULL;
        int r;

        if (strcmp(prompt, "-") == 0) {
                in = moectl_read_stdin();
                if (!in) {
                        moectl_err("reading the prompt from stdin failed");
                        return MOECTL_FAILED;
                }
                prompt = in;
        }
        req = gen_request(o, model, !o->json);
        if (!req)
                goto oom;
        if (o->raw) {
                r = json_object_set_new(req, "prompt", json_string(prompt));
        } else {
                msgs = json_array();
                r = o->system ? json_array_append_new(msgs, message("system", o->system)) : 0;
                r |= json_array_append_new(msgs, message("user", prompt));
                r |= json_object_set_new(req, "messages", msgs);
        }
        if (r) {
                json_decref(req);
                moectl_err("the prompt is not valid UTF-8 text");
                return MOECTL_USAGE;
        }
        if (o->json)
                r = run_json(c, o, path, req);
        else
                /* A terminal gets the answer's last line ended; a pipe gets
                 * exactly the text. */
                r = stream(c, o, path, req, &g, NULL, isatty(STDOUT_FILENO), NULL);
        json_decref(req);
        gen_free(&g);
        return r;
oom:
        moectl_err("out of memory");
        return MOECTL_FAILED;
}

static volatile sig_atomic_t interrupted, at_prompt, prompt_newline;

/* Ctrl-C while an answer streams sets the flag that the transfer's
 * progress callback polls. At the prompt it quits at once: a flag checked
 * before the read would leave a window where the signal lands just before
 * read() blocks and is lost. Nothing is pending then (stdout was flushed). */
static void on_sigint(int sig)
{
        if (at_prompt) {
                if (prompt_newline)
                        (void)!write(STDOUT_FILENO, "\n", 1);
                _exit(MOECTL_OK);
        }
        interrupted = 1;
}

static int catch_sigint(void)
{
        struct sigaction sa = { .sa_handler = on_sigint };

        sigemptyset(&sa.sa_mask);
        return sigaction(SIGINT, &sa, NULL);
}

static int first_model(struct client *c, const struct moectl_opts *o, char **out)
{
        struct client_reply rep = { .retry_after = -1 };
        json_t *j = NULL;
        const char *id;
        int r;

        r = moectl_call(c, o, "/v1/models", NULL, &j, &rep);
        client_reply_free(&rep);
        if (r)
                return r;
        id = json_string_value(json_object_get(json_array_get(json_object_get(j, "data"), 0),
                                               "id"));
        *out = id ? strdup(id) : NULL;
        json_decref(j);
        if (!id) {
                moectl_err("moed serves no model");
                return MOECTL_FAILED;
        }
        return *out ? MOECTL_OK : MOECTL_FAILED;
}

/* The conversation so far; /reset goes back to the system message. */
static json_t *conversation(const struct moectl_opts *o)
{
        json_t *msgs = json_array();

        if (msgs && o->system && json_array_append_new(msgs, message("system", o->system))) {
                json_decref(msgs);
                return NULL;
        }
        return msgs;
}

enum {
        TURN_ANSWERED = 0,
        TURN_FAILED = -1,       /* refused or failed: the conversation is as it was */
        TURN_CANCELLED = -2,    /* Ctrl-C: likewise */
};

/* One user turn: a TURN_* value, or an exit status (> 0) that ends the
 * chat because asking again cannot help. */
static int chat_turn(struct client *c, const struct moectl_opts *o, json_t *req, json_t *msgs,
                     const char *line)
{
        struct gen g = { .chat = true, .keep = true };
        json_t *user = message("user", line);
        long status = 0;
        int r;

        if (!user) {
                moectl_err("that line is not valid UTF-8; not sent");
                return TURN_FAILED;
        }
        if (json_array_append_new(msgs, user) < 0) {
                moectl_err("out of memory");
                return TURN_FAILED;
        }
        r = stream(c, o, "/v1/chat/completions", req, &g, &interrupted, true, &status);
        if (r == MOECTL_OK &&
            json_array_append_new(msgs, message("assistant", g.text ? g.text : "")) == 0) {
                gen_free(&g);
                return TURN_ANSWERED;
        }
        json_array_remove(msgs, json_array_size(msgs) - 1);
        gen_free(&g);
        if (r < 0) {
                moectl_err("answer cancelled");
                return TURN_CANCELLED;
        }
        if (r == MOECTL_DOWN || status == 403)
                return r;
        return TURN_FAILED;
}

int cmd_chat(struct client *c, const struct moectl_opts *o, const char *model)
{
        _cleanup_free_ char *picked = NULL, *line = NULL;
        bool tty = isatty(STDIN_FILENO);
        json_t *req = NULL, *msgs = NULL;
        size_t cap = 0;
        int r, failures = 0;

        if (o->json) {
                moectl_err("chat has no --json output; use `moectl run --json MODEL PROMPT`");
                return MOECTL_USAGE;
        }
        if (!model) {
                r = first_model(c, o, &picked);
                if (r)
                        return r;
                model = picked;
        }
        req = gen_request(o, model, true);
        msgs = conversation(o);
        if (!req || !msgs || json_object_set(req, "messages", msgs) || catch_sigint() < 0) {
                json_decref(req);
                json_decref(msgs);
                moectl_err("out of memory");
                return MOECTL_FAILED;
        }
        prompt_newline = tty;
        if (tty)
                moectl_err("chatting with %s: /reset starts over, /exit or Ctrl-D quits, "
                           "Ctrl-C stops an answer", model);
        r = MOECTL_OK;
        for (;;) {
                ssize_t n;
                const char *text;

                if (tty)
                        fputs("> ", stdout);
                fflush(stdout);
                at_prompt = 1;
                n = getline(&line, &cap, stdin);
                at_prompt = 0;
                if (n < 0)
                        break;
                while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
                        line[--n] = 0;
                text = line + strspn(line, " \t");
                if (!text[0])
                        continue;
                if (strcmp(text, "/exit") == 0 || strcmp(text, "/quit") == 0)
                        break;
                if (strcmp(text, "/reset") == 0) {
                        json_array_clear(msgs);
                        if (o->system)
                                json_array_append_new(msgs, message("system", o->system));
                        moectl_err("conversation reset");
                        continue;
                }
                if (text[0] == '/' && text[1] != '/') {
                        moectl_err("unknown command %s: /reset starts over, /exit quits "
                                   "(start a line with // to send a /)", text);
                        continue;
                }
                r = chat_turn(c, o, req, msgs, text[0] == '/' ? text + 1 : line);
                /* A Ctrl-C that came as the answer ended was too late to
                 * cancel it; it must not quit at the next prompt either. */
                interrupted = 0;
                if (r > 0)
                        break;
                failures += r == TURN_FAILED;
                r = MOECTL_OK;
        }
        if (tty && r == MOECTL_OK)
                putchar('\n');
        json_decref(req);
        json_decref(msgs);
        if (r == MOECTL_OK && failures)
                r = MOECTL_FAILED;
        return r;
}
