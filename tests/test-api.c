/* test-api: engine/api.c, the engine thread as the main loop sees it:
 * greedy output against a plain runner, continuous batching (many requests,
 * chunked prefill, queueing, KV preemption, two models) giving every
 * request the text it gets alone, limits and stop strings, cancel, release
 * and stop, heartbeat and stats, seeded sampling, and tokenizing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <math.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/cleanup.h"
#include "engine/api.h"
#include "engine/tokenizer.h"
#include "kernels/quant.h"
#include "tools/runner.h"
#include "testutil.h"

#define THREADS 1
#define WAIT_S 30.0      /* the longest any wait for the engine may take */
#define N_BATCH 16

/* ---- fixtures and engines ---- */

static const char *model_a(void)
{
        return tu_fixture("tiny", MO_TYPE_F32, false);
}

static const char *model_b(void)
{
        return tu_fixture("tiny-softmax", MO_TYPE_Q8_0, false);
}

/* An engine over the given models (ids[i] -> paths[i]), started. Unset
 * config fields get the test's defaults: one thread, a fast heartbeat. */
static struct eng *open_models(struct eng_config c, const char *const *ids,
                               const char *const *paths, size_t n)
{
        struct moerr e = { { 0 } };
        struct eng *g = NULL;

        if (!c.threads)
                c.threads = THREADS;
        if (!(c.heartbeat_s > 0))
                c.heartbeat_s = 0.05;
        if (eng_new(&c, &g, &e) < 0)
                fail_msg("eng_new: %s", e.msg);
        for (size_t i = 0; i < n; i++)
                if (eng_add_model(g, ids[i], paths[i], NULL, NULL, &e) < 0)
                        fail_msg("eng_add_model %s: %s", ids[i], e.msg);
        if (eng_start(g, &e) < 0)
                fail_msg("eng_start: %s", e.msg);
        return g;
}

static struct eng *open_eng(struct eng_config c)
{
        const char *ids[] = { "tiny" };
        const char *paths[] = { model_a() };

        return open_models(c, ids, paths, 1);
}

/* ---- requests and what the main loop collects of them ---- */

struct spec {
        int model;
        const char *prompt;      /* text, tokenized with BOS */
        int64_t max_tokens;
        float temperature;       /* 0: greedy */
        uint64_t seed;
        const char *stop[2];
        bool ignore_eos;
        uint32_t tenant;
};

/* Everything the updates of one request said. */
struct col {
        struct eng *g;
        struct eng_req *req;
        int64_t n_prompt;
        char *text;
        size_t len, cap;
        int64_t tokens;          /* sum of new_tokens */
        int updates, finals;
        enum eng_finish finish;
        char why[256];
        bool has_why;
        struct eng_usage usage;
        bool released;           /* the test dropped the handle */
        char err[256];           /* first contract violation seen */

        /* Actions taken from the callback. */
        int64_t cancel_at;       /* eng_cancel once this many tokens came (0: never) */
        enum eng_finish cancel_reason;
        const char *cancel_why;
        int64_t cancel_seen;     /* tokens seen when it cancelled (-1: not yet) */
        int64_t cancel_gen;      /* the engine's tokens_generated just after */
        int64_t release_at;      /* eng_req_release once this many tokens came */
        struct col *release_other; /* released at this one's first update */
};

static void col_err(struct col *c, const char *msg)
{
        if (!c->err[0])
                snprintf(c->err, sizeof c->err, "%s", msg);
}

static bool utf8_ok(const char *s, size_t n)
{
        for (size_t i = 0; i < n;) {
                unsigned char b = (unsigned char)s[i];
                size_t k = b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 :
                           (b >> 3) == 30 ? 4 : 0;
                if (!k || i + k > n)
                        return false;
                for (size_t j = 1; j < k; j++)
                        if (((unsigned char)s[i + j] & 0xC0) != 0x80)
                                return false;
                i += k;
        }
        return true;
}

static void col_append(struct col *c, const char *s, size_t n)
{
        if (c->len + n + 1 > c->cap) {
                c->cap = (c->len + n + 1) * 2;
                c->text = realloc(c->text, c->cap);
                assert_non_null(c->text);
        }
        memcpy(c->text + c->len, s, n);
        c->len += n;
        c->text[c->len] = 0;
}

static void on_update(struct eng_req *r, void *user, const struct eng_update *u, void *ud)
{
        struct col *c = user;

        (void)ud;
        if (c->req != r)
                col_err(c, "the update names another handle");
        if (c->released)
                col_err(c, "an update after eng_req_release");
        if (c->finals)
                col_err(c, "an update after the final one");
        if (u->new_tokens < 0 || (u->len && !u->text))
                col_err(c, "a malformed update");
        if (!utf8_ok(u->text, u->len))
                col_err(c, "an update splits a UTF-8 character");
        c->updates++;
        c->tokens += u->new_tokens;
        if (u->len)
                col_append(c, u->text, u->len);
        if (c->release_other && !c->release_other->released) {
                eng_req_release(c->release_other->req);
                c->release_other->released = true;
        }
        if (u->finish != ENG_FINISH_NONE) {
                c->finals++;
                c->finish = u->finish;
                c->usage = u->usage;
                c->has_why = u->why != NULL;
                snprintf(c->why, sizeof c->why, "%s", u->why ? u->why : "");
                return;
        }
        if (c->cancel_at && c->cancel_seen < 0 && c->tokens >= c->cancel_at) {
                struct eng_stats st;
                c->cancel_seen = c->tokens;
                eng_cancel(r, c->cancel_reason, c->cancel_why);
                /* The engine may be ahead of what was dispatched: its own
                 * count bounds what it had generated at the cancel. */
                eng_get_stats(c->g, &st);
                c->cancel_gen = st.tokens_generated;
                eng_cancel(r, ENG_FINISH_CANCELLED, "asked twice"); /* safe, no effect */
        }
        if (c->release_at && c->tokens >= c->release_at && !c->released) {
                eng_req_release(r);
                c->released = true;
        }
}

static void col_init(struct col *c)
{
        memset(c, 0, sizeof *c);
        c->cancel_seen = -1;
}

static void col_free(struct col *c)
{
        if (c->req && !c->released)
                eng_req_release(c->req);
        free(c->text);
        memset(c, 0, sizeof *c);
}

static void tokenize(struct eng *g, int model, const char *text, int32_t **ids, size_t *n)
{
        struct moerr e = { { 0 } };

        if (eng_tokenize(g, model, text, strlen(text), false, true, ids, n, &e) < 0)
                fail_msg("eng_tokenize '%s': %s", text, e.msg);
}

static struct eng_params params_of(const struct spec *s, const int32_t *ids, size_t n,
                                   struct col *c)
{
        struct eng_params p = {
                .model = s->model,
                .prompt = ids,
                .n_prompt = n,
                .max_tokens = s->max_tokens,
                .stop = s->stop,
                .n_stop = 2,
                .ignore_eos = s->ignore_eos,
                .tenant = s->tenant,
                .weight = 1,
                .user = c,
        };

        sampler_params_default(&p.sampling);
        p.sampling.temperature = s->temperature;
        p.sampling.seed = s->seed;
        return p;
}

/* Submits a prompt given as token ids; returns eng_submit's result. */
static int submit_tok(struct eng *g, const struct spec *s, const int32_t *ids, size_t n,
                      struct col *c, struct moerr *e)
{
        struct eng_params p;

        col_init(c);
        c->g = g;
        c->n_prompt = (int64_t)n;
        p = params_of(s, ids, n, c);
        return eng_submit(g, &p, &c->req, e);
}

static void submit(struct eng *g, const struct spec *s, struct col *c)
{
        struct moerr e = { { 0 } };
        int32_t *ids = NULL;
        size_t n = 0;
        int r;

        tokenize(g, s->model, s->prompt, &ids, &n);
        r = submit_tok(g, s, ids, n, c, &e);
        free(ids); /* copied by eng_submit */
        if (r < 0)
                fail_msg("eng_submit '%s': %s (%d)", s->prompt, e.msg, r);
}

/* A prompt of n byte-level tokens, different for every seed. */
static int32_t *synth_prompt(size_t n, int seed)
{
        int32_t *ids = malloc((n ? n : 1) * sizeof *ids);

        assert_non_null(ids);
        for (size_t i = 0; i < n; i++)
                ids[i] = 3 + (int32_t)((i * 37 + (size_t)seed * 101) % 250);
        return ids;
}

static void submit_synth(struct eng *g, const struct spec *s, size_t n, int seed, struct col *c)
{
        struct moerr e = { { 0 } };
        int32_t *ids = synth_prompt(n, seed);
        int r = submit_tok(g, s, ids, n, c, &e);

        free(ids);
        if (r < 0)
                fail_msg("eng_submit of %zu tokens: %s (%d)", n, e.msg, r);
}

static bool col_done(const struct col *c, int64_t until_tokens)
{
        return c->released || c->finals || (until_tokens > 0 && c->tokens >= until_tokens);
}

/* The main loop: waits on eng_event_fd and dispatches until every request
 * not released has finished (or, with until_tokens, has that many tokens).
 * Fails the test after WAIT_S. *max_running, if given, gets the most
 * running sequences seen. */
static void drive_until(struct eng *g, struct col **cols, size_t n, int64_t until_tokens,
                        int64_t *max_running)
{
        double end = eng_now() + WAIT_S;

        for (;;) {
                struct pollfd pfd = { .fd = eng_event_fd(g), .events = POLLIN };
                bool done = true;
                double left;
                int r;

                for (size_t i = 0; i < n; i++)
                        done &= col_done(cols[i], until_tokens);
                if (done)
                        break;
                left = end - eng_now();
                if (left <= 0) {
                        for (size_t i = 0; i < n; i++)
                                if (!col_done(cols[i], until_tokens))
                                        fail_msg("request %zu: no final update after %.0f s "
                                                 "(%lld tokens, %d updates)", i, WAIT_S,
                                                 (long long)cols[i]->tokens, cols[i]->updates);
                }
                r = poll(&pfd, 1, (int)(left * 1000) + 1);
                if (r < 0 && errno != EINTR)
                        fail_msg("poll: %s", strerror(errno));
                if (r > 0)
                        eng_dispatch(g, on_update, NULL);
                if (max_running) {
                        struct eng_stats st;
                        eng_get_stats(g, &st);
                        *max_running = MO_MAX(*max_running, st.running);
                }
        }
        for (size_t i = 0; i < n; i++)
                if (cols[i]->err[0])
                        fail_msg("request %zu: %s", i, cols[i]->err);
}

static void drive(struct eng *g, struct col **cols, size_t n)
{
        drive_until(g, cols, n, 0, NULL);
}

/* Waits until the engine thread has gone once more round its loop after
 * now, so the counters of the steps that produced what was dispatched are
 * recorded (the heartbeat beats at the top of the loop). */
static void settle(struct eng *g)
{
        double t = eng_now();

        while (eng_heartbeat(g) <= t) {
                if (eng_now() - t > WAIT_S)
                        fail_msg("the engine's heartbeat stopped");
                nanosleep(&(struct timespec){ .tv_nsec = 1000000 }, NULL);
        }
}

/* Waits for no sequence running or waiting (released requests included). */
static void wait_idle(struct eng *g)
{
        double t = eng_now();
        struct eng_stats st;

        for (;;) {
                eng_get_stats(g, &st);
                if (st.running == 0 && st.waiting == 0)
                        break;
                if (eng_now() - t > WAIT_S)
                        fail_msg("the engine never became idle (%lld running, %lld waiting)",
                                 (long long)st.running, (long long)st.waiting);
                nanosleep(&(struct timespec){ .tv_nsec = 1000000 }, NULL);
        }
        settle(g);
}

/* One request on its own (the engine idle before and after). */
static void run_alone(struct eng *g, const struct spec *s, struct col *out)
{
        struct col *cs[] = { out };

        submit(g, s, out);
        drive(g, cs, 1);
}

static void expect_final(const struct col *c, const char *what)
{
        if (c->finals != 1)
                fail_msg("%s: %d final updates", what, c->finals);
        if (c->tokens != c->usage.completion_tokens)
                fail_msg("%s: the updates counted %lld tokens, usage says %lld", what,
                         (long long)c->tokens, (long long)c->usage.completion_tokens);
        if (c->usage.prompt_tokens != c->n_prompt)
                fail_msg("%s: usage prompt_tokens %lld, the prompt had %lld", what,
                         (long long)c->usage.prompt_tokens, (long long)c->n_prompt);
        if (c->usage.total_s < c->usage.queue_s || c->usage.queue_s < 0 ||
            c->usage.first_token_s < 0 || c->usage.total_s < c->usage.first_token_s)
                fail_msg("%s: usage times out of order (queue %g, first %g, total %g)", what,
                         c->usage.queue_s, c->usage.first_token_s, c->usage.total_s);
}

/* got must be what want (the request alone, or the reference) produced. */
static void expect_same(const struct col *got, const struct col *want, const char *what)
{
        size_t i = 0;

        expect_final(got, what);
        if (got->finish == ENG_FINISH_ERROR)
                fail_msg("%s: finished with an error: %s", what, got->why);
        while (i < got->len && i < want->len && got->text[i] == want->text[i])
                i++;
        if (got->len != want->len || i != got->len)
                fail_msg("%s: text differs at byte %zu (%zu bytes, want %zu; %lld tokens, "
                         "want %lld)", what, i, got->len, want->len,
                         (long long)got->usage.completion_tokens,
                         (long long)want->usage.completion_tokens);
        if (got->usage.completion_tokens != want->usage.completion_tokens ||
            got->finish != want->finish)
                fail_msg("%s: %lld tokens, finish %s; want %lld, %s", what,
                         (long long)got->usage.completion_tokens, eng_finish_name(got->finish),
                         (long long)want->usage.completion_tokens,
                         eng_finish_name(want->finish));
}

/* Prompts of 8 to ~40 tokens, different for every i. */
static const char *prompt_text(int i)
{
        static const char *const words[] = {
                "the", "cat", "sat", "on", "a", "mat", "and", "then", "it", "was",
                "with", "you", "there", "int", "return", "moe",
        };
        static char buf[64][512];
        char *b = buf[i % 64];
        int n = snprintf(b, sizeof buf[0], "Request %d:", i);

        for (int w = 0; w < 3 + (i * 5) % 23; w++)
                n += snprintf(b + n, sizeof buf[0] - (size_t)n, " %s", words[(i * 7 + w * 3) % 16]);
        return b;
}

static struct spec batch_spec(int i)
{
        return (struct spec){
                .prompt = prompt_text(i),
                .max_tokens = 4 + (i * 7) % 29,
                .ignore_eos = i % 2 == 0,
        };
}

/* ---- 1. greedy output against the runner ---- */

static int32_t argmax(const float *x, int64_t n)
{
        int64_t best = 0;

        for (int64_t i = 1; i < n; i++)
                if (x[i] > x[best])
                        best = i;
        return (int32_t)best;
}

/* Greedy decoding on a runner of its own, token by token. */
static void reference(const char *path, const char *text, int64_t max_tokens, bool ignore_eos,
                      struct col *out)
{
        struct moerr e = { { 0 } };
        struct runner *rn = NULL;
        struct kv_seq seq = { 0 };
        struct tok_stream *ts;
        int32_t *ids = NULL;
        size_t n = 0;
        float *logits;
        char buf[256];
        const struct tokenizer *t;
        int k;

        col_init(out);
        if (runner_open(path, THREADS, 4096, 64, &rn, &e) < 0)
                fail_msg("runner_open: %s", e.msg);
        t = rn->m->tok;
        logits = malloc((size_t)rn->m->hp.n_vocab * sizeof *logits);
        ts = tok_stream_new(t, false);
        assert_non_null(logits);
        assert_non_null(ts);
        assert_int_equal(tok_encode(t, text, strlen(text), tok_add_bos(t), false, &ids, &n, &e),
                         0);
        out->n_prompt = (int64_t)n;
        if (runner_feed(rn, &seq, ids, (int64_t)n, false, logits, &e) < 0)
                fail_msg("runner_feed: %s", e.msg);
        out->finish = ENG_FINISH_LENGTH;
        for (int64_t i = 0; i < max_tokens; i++) {
                int32_t tok = argmax(logits, rn->m->hp.n_vocab);
                out->tokens++;
                if (!ignore_eos && tok_is_eog(t, tok)) {
                        out->finish = ENG_FINISH_STOP;
                        break;
                }
                k = tok_stream_feed(ts, tok, buf, sizeof buf);
                assert_true(k >= 0);
                col_append(out, buf, (size_t)k);
                if (i + 1 < max_tokens && runner_feed(rn, &seq, &tok, 1, false, logits, &e) < 0)
                        fail_msg("runner_feed: %s", e.msg);
        }
        while ((k = tok_stream_flush(ts, buf, sizeof buf)) > 0)
                col_append(out, buf, (size_t)k);
        out->finals = 1;
        out->usage.prompt_tokens = out->n_prompt;
        out->usage.completion_tokens = out->tokens;
        kv_seq_release(rn->kv, &seq);
        tok_stream_free(ts);
        free(ids);
        free(logits);
        runner_close(rn);
}

static void test_greedy_matches_runner(void **state)
{
        struct eng *g = open_eng((struct eng_config){ 0 });
        const char *texts[] = { "Hello", "The cat sat on the mat and then", prompt_text(40) };
        char what[64];

        (void)state;
        for (size_t i = 0; i < 3; i++) {
                for (int eos = 0; eos < 2; eos++) {
                        struct spec s = { .prompt = texts[i], .max_tokens = 24,
                                          .ignore_eos = eos };
                        struct col got, want;
                        reference(model_a(), texts[i], 24, eos, &want);
                        run_alone(g, &s, &got);
                        snprintf(what, sizeof what, "prompt %zu, ignore_eos %d", i, eos);
                        expect_same(&got, &want, what);
                        /* Greedy text of a random model is not empty. */
                        assert_true(got.usage.completion_tokens > 0);
                        if (eos)
                                assert_int_equal(got.usage.completion_tokens, 24);
                        if (got.finish == ENG_FINISH_LENGTH)
                                assert_false(got.has_why);
                        col_free(&got);
                        col_free(&want);
                }
        }
        eng_free(g);
}

/* ---- 2. many requests at once ---- */

static void alone_results(struct eng *g, struct col *alone, int n)
{
        for (int i = 0; i < n; i++) {
                struct spec s = batch_spec(i);
                run_alone(g, &s, &alone[i]);
                expect_final(&alone[i], "alone");
        }
}

static void run_batch(struct eng_config c, const struct col *alone, int64_t *max_running)
{
        struct eng *g = open_eng(c);
        struct col cols[N_BATCH], *cs[N_BATCH];
        char what[96];
        struct eng_stats st;

        for (int i = 0; i < N_BATCH; i++) {
                struct spec s = batch_spec(i);
                submit(g, &s, &cols[i]);
                cs[i] = &cols[i];
        }
        drive_until(g, cs, N_BATCH, 0, max_running);
        for (int i = 0; i < N_BATCH; i++) {
                snprintf(what, sizeof what, "request %d (step_tokens %lld, max_running %lld)", i,
                         (long long)c.step_tokens, (long long)c.max_running);
                expect_same(&cols[i], &alone[i], what);
                col_free(&cols[i]);
        }
        settle(g);
        eng_get_stats(g, &st);
        assert_int_equal(st.running, 0);
        assert_int_equal(st.waiting, 0);
        eng_free(g);
}

static void test_batch_equals_alone(void **state)
{
        struct eng *g = open_eng((struct eng_config){ 0 });
        struct col alone[N_BATCH];
        int64_t max_running = 0;
        int32_t *ids;
        size_t n;

        (void)state;
        alone_results(g, alone, N_BATCH);
        /* Some prompts are longer than 8 tokens, so their prefill is chunked. */
        tokenize(g, 0, prompt_text(N_BATCH - 1), &ids, &n);
        assert_true(n > 16);
        free(ids);
        eng_free(g);

        run_batch((struct eng_config){ 0 }, alone, NULL);
        run_batch((struct eng_config){ .step_tokens = 8 }, alone, NULL);
        run_batch((struct eng_config){ .step_tokens = 16, .max_running = 3 }, alone,
                  &max_running);
        if (max_running > 3 || max_running < 1)
                fail_msg("max_running 3, yet %lld sequences ran at once",
                         (long long)max_running);
        for (int i = 0; i < N_BATCH; i++)
                col_free(&alone[i]);
}

/* ---- 3. KV pressure ---- */

static struct spec kv_spec(int i)
{
        /* Prompt plus answer of up to ~90 tokens: three of the four blocks. */
        return (struct spec){
                .prompt = prompt_text(i + 20),
                .max_tokens = 30 + (i * 11) % 25,
                .ignore_eos = true,
        };
}

static void test_kv_pressure(void **state)
{
        /* A 128-token context gets the smallest cache the engine makes: 128
         * tokens, four blocks of 32, whatever kv_bytes asks. */
        struct eng_config c = { .kv_bytes = 1, .max_context = 128, .step_tokens = 32 };
        struct eng *g = open_eng(c);
        struct col alone[8], cols[8], *cs[8];
        struct eng_model_info mi;
        struct eng_stats st;
        char what[64];

        (void)state;
        eng_model_get(g, 0, &mi);
        assert_int_equal(mi.n_ctx, 128);
        assert_int_equal(mi.kv_block_tokens, 32);
        assert_int_equal(mi.kv_blocks_total, 4);
        for (int i = 0; i < 8; i++) {
                struct spec s = kv_spec(i);
                run_alone(g, &s, &alone[i]);
                expect_final(&alone[i], "alone");
                assert_int_equal(alone[i].finish, ENG_FINISH_LENGTH);
        }
        eng_get_stats(g, &st);
        assert_int_equal(st.preemptions, 0);
        for (int i = 0; i < 8; i++) {
                struct spec s = kv_spec(i);
                submit(g, &s, &cols[i]);
                cs[i] = &cols[i];
        }
        drive(g, cs, 8);
        for (int i = 0; i < 8; i++) {
                snprintf(what, sizeof what, "request %d under KV pressure", i);
                expect_same(&cols[i], &alone[i], what);
                col_free(&cols[i]);
                col_free(&alone[i]);
        }
        wait_idle(g);
        eng_get_stats(g, &st);
        if (st.preemptions == 0)
                fail_msg("no preemption: the test did not press the cache");
        eng_model_get(g, 0, &mi);
        assert_int_equal(mi.kv_blocks_used, 0);
        assert_int_equal(mi.kv_blocks_total, 4);
        eng_free(g);
}

/* Long prompts of several tenants prefilled in chunks under a tight
 * cache: fair sharing interleaves their chunks, and no request may end
 * with an error for a prompt that fits the cache on its own. */
static void test_kv_pressure_tenants(void **state)
{
        struct eng_config c = { .kv_bytes = 1, .max_context = 128, .step_tokens = 32 };
        struct eng *g = open_eng(c);
        static const size_t lens[3] = { 90, 75, 60 };
        struct col alone[3], cols[3], *cs[3];
        char what[64];

        (void)state;
        for (int i = 0; i < 3; i++) {
                struct spec s = { .max_tokens = 30, .ignore_eos = true };
                struct col *one[] = { &alone[i] };
                submit_synth(g, &s, lens[i], i, &alone[i]);
                drive(g, one, 1);
                expect_final(&alone[i], "alone");
                assert_int_equal(alone[i].finish, ENG_FINISH_LENGTH);
        }
        for (int i = 0; i < 3; i++) {
                struct spec s = { .max_tokens = 30, .ignore_eos = true,
                                  .tenant = (uint32_t)i + 1 };
                submit_synth(g, &s, lens[i], i, &cols[i]);
                cs[i] = &cols[i];
        }
        drive(g, cs, 3);
        for (int i = 0; i < 3; i++) {
                snprintf(what, sizeof what, "tenant %d's long prompt under KV pressure", i + 1);
                expect_same(&cols[i], &alone[i], what);
                col_free(&cols[i]);
                col_free(&alone[i]);
        }
        wait_idle(g);
        eng_free(g);
}

/* ---- 4. limits, stop strings, bad requests ---- */

static void test_max_tokens_and_context(void **state)
{
        struct eng *g = open_eng((struct eng_config){ .max_context = 64 });
        struct spec s = { .prompt = "The cat sat on the mat", .max_tokens = 7,
                          .ignore_eos = true };
        struct col c;

        (void)state;
        run_alone(g, &s, &c);
        expect_final(&c, "max_tokens 7");
        assert_int_equal(c.finish, ENG_FINISH_LENGTH);
        assert_int_equal(c.usage.completion_tokens, 7);
        assert_false(c.has_why);
        assert_true(c.usage.prompt_tokens > 1);
        assert_true(c.usage.first_token_s > 0);
        col_free(&c);

        /* More than the context holds: stops when it is full, and says so. */
        s.max_tokens = 1000;
        run_alone(g, &s, &c);
        expect_final(&c, "max_tokens past the context");
        assert_int_equal(c.finish, ENG_FINISH_LENGTH);
        assert_int_equal(c.usage.prompt_tokens + c.usage.completion_tokens, 64);
        assert_true(c.has_why);
        assert_non_null(strstr(c.why, "context"));
        col_free(&c);
        eng_free(g);
}

/* The prompt of n tokens (all the same id). */
static int submit_ids(struct eng *g, int32_t id, size_t n, int64_t max_tokens, struct col *c,
                      struct moerr *e)
{
        int32_t *ids = malloc((n ? n : 1) * sizeof *ids);
        struct spec s = { .max_tokens = max_tokens, .ignore_eos = true };
        int r;

        assert_non_null(ids);
        for (size_t i = 0; i < n; i++)
                ids[i] = id;
        r = submit_tok(g, &s, ids, n, c, e);
        free(ids);
        return r;
}

static void test_bad_requests(void **state)
{
        struct eng *g = open_eng((struct eng_config){ .max_context = 64 });
        struct moerr e = { { 0 } };
        struct spec s = { .prompt = "x", .max_tokens = 4 };
        struct eng_params p;
        struct eng_req *out = NULL;
        struct col c, *cs[] = { &c };
        int32_t id = 300;

        (void)state;
        /* A prompt that fills the context leaves no room for an answer. */
        assert_int_equal(submit_ids(g, 300, 64, 4, &c, &e), -EINVAL);
        assert_true(strlen(e.msg) > 0);
        assert_non_null(strstr(e.msg, "64"));
        e.msg[0] = 0;
        assert_int_equal(submit_ids(g, 300, 1000, 4, &c, &e), -EINVAL);
        assert_true(strlen(e.msg) > 0);
        /* One token less fits, with room for exactly one. */
        assert_int_equal(submit_ids(g, 300, 63, 4, &c, &e), 0);
        drive(g, cs, 1);
        expect_final(&c, "63-token prompt");
        assert_int_equal(c.usage.prompt_tokens, 63);
        assert_int_equal(c.usage.completion_tokens, 1);
        assert_int_equal(c.finish, ENG_FINISH_LENGTH);
        col_free(&c);

        e.msg[0] = 0;
        assert_int_equal(submit_ids(g, 300, 0, 4, &c, &e), -EINVAL);
        assert_true(strlen(e.msg) > 0);

        p = params_of(&s, &id, 1, NULL);
        p.max_tokens = 0;
        assert_int_equal(eng_submit(g, &p, &out, &e), -EINVAL);
        p = params_of(&s, &id, 1, NULL);
        p.weight = 0;
        assert_int_equal(eng_submit(g, &p, &out, &e), -EINVAL);
        p.weight = NAN;
        assert_int_equal(eng_submit(g, &p, &out, &e), -EINVAL);
        p = params_of(&s, &id, 1, NULL);
        p.model = 1;
        assert_int_equal(eng_submit(g, &p, &out, &e), -EINVAL);
        p.model = -1;
        assert_int_equal(eng_submit(g, &p, &out, &e), -EINVAL);
        p = params_of(&s, &id, 1, NULL);
        p.sampling.temperature = NAN;
        e.msg[0] = 0;
        assert_int_equal(eng_submit(g, &p, &out, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "temperature"));
        p = params_of(&s, &id, 1, NULL);
        p.sampling.top_p = 0;
        assert_int_equal(eng_submit(g, &p, &out, &e), -EINVAL);
        assert_null(out); /* untouched by every refusal */
        eng_free(g);
}

/* Token ids outside the vocabulary are the caller's mistake: refused at
 * submit, or that request alone ends with an error; a request beside it
 * is not hurt. */
static void test_bad_token_ids(void **state)
{
        struct eng *g = open_eng((struct eng_config){ 0 });
        struct eng_model_info mi;
        struct moerr e = { { 0 } };
        int32_t bad[] = { 0, 5, 0 };
        struct spec s = { .prompt = prompt_text(3), .max_tokens = 16, .ignore_eos = true };
        struct col alone, good, badc, *cs[] = { &good, &badc };

        (void)state;
        eng_model_get(g, 0, &mi);
        run_alone(g, &s, &alone);
        for (int k = 0; k < 2; k++) {
                struct eng_params p;
                bad[1] = k == 0 ? (int32_t)mi.n_vocab : -1;
                submit(g, &s, &good);
                col_init(&badc);
                badc.n_prompt = 3;
                p = params_of(&s, bad, 3, &badc);
                if (eng_submit(g, &p, &badc.req, &e) < 0) {
                        assert_true(strlen(e.msg) > 0);
                        badc.released = true; /* nothing to wait for */
                        badc.req = NULL;
                }
                drive(g, cs, 2);
                expect_same(&good, &alone, "the request beside bad token ids");
                if (badc.req)
                        assert_int_equal(badc.finish, ENG_FINISH_ERROR);
                col_free(&good);
                col_free(&badc);
        }
        col_free(&alone);
        eng_free(g);
}

/* A stop string that occurs in text, starting at byte from or later: whole
 * characters, no NUL, not found earlier. */
static bool pick_stop(const char *text, size_t len, size_t from, char *stop, size_t *at)
{
        for (size_t i = from; i + 3 <= len; i++) {
                size_t j = i, chars = 0;
                if (((unsigned char)text[i] & 0xC0) == 0x80)
                        continue;
                while (j < len && chars < 3) {
                        j++;
                        while (j < len && ((unsigned char)text[j] & 0xC0) == 0x80)
                                j++;
                        chars++;
                }
                if (chars < 3 || memchr(text + i, 0, j - i) || j - i >= 64)
                        continue;
                memcpy(stop, text + i, j - i);
                stop[j - i] = 0;
                *at = (size_t)((const char *)memmem(text, len, stop, j - i) - text);
                return true;
        }
        return false;
}

static void test_stop_strings(void **state)
{
        struct eng *g = open_eng((struct eng_config){ 0 });
        struct spec s = { .prompt = "The cat sat on the mat and then", .max_tokens = 40,
                          .ignore_eos = true };
        struct col full, c;
        char stop[64];
        size_t at = 0;
        int tried = 0;

        (void)state;
        run_alone(g, &s, &full);
        assert_true(full.len >= 12);
        /* A few stop strings from different places of the text. */
        for (size_t from = 1; from < full.len / 2 && tried < 3; from += full.len / 6 + 1) {
                if (!pick_stop(full.text, full.len, from, stop, &at))
                        continue;
                tried++;
                s.stop[0] = "never appears in this text";
                s.stop[1] = stop;
                run_alone(g, &s, &c);
                expect_final(&c, "stop string");
                assert_int_equal(c.finish, ENG_FINISH_STOP);
                if (c.len != at || memcmp(c.text, full.text, at) != 0)
                        fail_msg("stop at byte %zu: got %zu bytes", at, c.len);
                assert_null(memmem(c.text, c.len, stop, strlen(stop)));
                assert_true(c.usage.completion_tokens <= full.usage.completion_tokens);
                col_free(&c);
        }
        assert_true(tried > 0);
        /* A stop string that never completes leaves the text alone, the
         * held-back prefix included. */
        s.stop[0] = "never appears in this text";
        s.stop[1] = NULL;
        run_alone(g, &s, &c);
        expect_same(&c, &full, "absent stop string");
        col_free(&c);
        col_free(&full);
        eng_free(g);
}

/* ---- 5. cancel and release ---- */

static void test_cancel(void **state)
{
        struct eng *g = open_eng((struct eng_config){ 0 });
        struct spec s = { .prompt = prompt_text(5), .max_tokens = 1000, .ignore_eos = true };
        struct col c, d, *cs[] = { &c }, *ds[] = { &d };
        struct eng_stats st;
        int64_t gen;

        (void)state;
        submit(g, &s, &c);
        c.cancel_at = 3;
        c.cancel_reason = ENG_FINISH_CANCELLED;
        c.cancel_why = "test cancel";
        drive(g, cs, 1);
        expect_final(&c, "cancelled");
        assert_int_equal(c.finish, ENG_FINISH_CANCELLED);
        assert_string_equal(c.why, "test cancel");
        assert_true(c.cancel_seen >= 3);
        /* Within one step: the step under way when it was asked (whose
         * count may not be recorded yet) and no other. */
        gen = c.cancel_gen;
        if (c.usage.completion_tokens >= 1000 || c.usage.completion_tokens > gen + 2)
                fail_msg("cancelled when the engine had generated at most %lld tokens, "
                         "finished at %lld", (long long)gen + 1,
                         (long long)c.usage.completion_tokens);
        print_message("cancelled after %lld tokens dispatched (engine at <= %lld), "
                      "finished at %lld\n", (long long)c.cancel_seen, (long long)gen + 1,
                      (long long)c.usage.completion_tokens);
        settle(g);
        eng_get_stats(g, &st);
        assert_int_equal(st.running + st.waiting, 0);
        /* Cancelling a finished request does nothing. */
        eng_cancel(c.req, ENG_FINISH_CANCELLED, "late");
        col_free(&c);

        /* The LENGTH reason (a deadline) is kept; others become CANCELLED. */
        submit(g, &s, &c);
        c.cancel_at = 2;
        c.cancel_reason = ENG_FINISH_LENGTH;
        c.cancel_why = "deadline";
        drive(g, cs, 1);
        assert_int_equal(c.finish, ENG_FINISH_LENGTH);
        assert_string_equal(c.why, "deadline");
        assert_true(c.usage.completion_tokens < 1000);
        col_free(&c);

        submit(g, &s, &c);
        c.cancel_at = 2;
        c.cancel_reason = ENG_FINISH_STOP;
        drive(g, cs, 1);
        assert_int_equal(c.finish, ENG_FINISH_CANCELLED);
        assert_true(c.has_why);
        col_free(&c);

        /* Cancelled right after submit, before any update. */
        submit(g, &s, &d);
        eng_cancel(d.req, ENG_FINISH_CANCELLED, NULL);
        drive(g, ds, 1);
        expect_final(&d, "cancelled at once");
        assert_int_equal(d.finish, ENG_FINISH_CANCELLED);
        assert_true(d.usage.completion_tokens <= 2);
        col_free(&d);
        eng_free(g);
}

static void test_release(void **state)
{
        struct eng *g = open_eng((struct eng_config){ 0 });
        struct col alone[6], cols[6], *cs[6];
        struct eng_model_info mi;
        char what[64];

        (void)state;
        for (int i = 0; i < 6; i++) {
                struct spec s = batch_spec(i);
                s.max_tokens = 40;
                s.ignore_eos = true;
                run_alone(g, &s, &alone[i]);
        }
        for (int i = 0; i < 6; i++) {
                struct spec s = batch_spec(i);
                /* Long enough for the first ones to be released mid-way. */
                s.max_tokens = i < 3 ? 1000 : 40;
                s.ignore_eos = true;
                submit(g, &s, &cols[i]);
                cs[i] = &cols[i];
        }
        /* 0: released by the main loop before any update; 1: from its own
         * callback after 2 tokens; 2: from request 3's first callback. */
        eng_req_release(cols[0].req);
        cols[0].released = true;
        cols[1].release_at = 2;
        cols[3].release_other = &cols[2];
        drive(g, cs, 6);
        assert_true(cols[1].released);
        assert_true(cols[2].released);
        assert_true(cols[1].tokens >= 2 && cols[1].tokens < 1000);
        assert_int_equal(cols[1].finals + cols[2].finals, 0);
        for (int i = 3; i < 6; i++) {
                snprintf(what, sizeof what, "request %d beside released ones", i);
                expect_same(&cols[i], &alone[i], what);
        }
        /* The released ones end too, and give their cache back. */
        wait_idle(g);
        eng_dispatch(g, on_update, NULL);
        for (int i = 0; i < 3; i++)
                if (cols[i].err[0])
                        fail_msg("request %d: %s", i, cols[i].err);
        eng_model_get(g, 0, &mi);
        assert_int_equal(mi.kv_blocks_used, 0);
        for (int i = 0; i < 6; i++) {
                col_free(&cols[i]);
                col_free(&alone[i]);
        }
        eng_free(g);
}

/* A finished request whose final update was never dispatched: releasing
 * it and freeing the engine leaks nothing (ASan). */
static void test_release_undispatched(void **state)
{
        struct eng *g = open_eng((struct eng_config){ 0 });
        struct spec s = { .prompt = "Hello", .max_tokens = 3, .ignore_eos = true };
        struct col c;

        (void)state;
        submit(g, &s, &c);
        wait_idle(g);
        eng_req_release(c.req);
        c.released = true;
        eng_dispatch(g, on_update, NULL);
        assert_int_equal(c.updates, 0);
        col_free(&c);

        /* Released while running, then the engine freed at once: eng_free
         * stops it and frees the request. */
        s.max_tokens = 1000;
        {
                struct col *cs[] = { &c };
                submit(g, &s, &c);
                drive_until(g, cs, 1, 2, NULL);
        }
        eng_req_release(c.req);
        c.released = true;
        col_free(&c);
        eng_free(g);
}

/* ---- 6. stopping the engine ---- */

static void test_stop_running(void **state)
{
        struct eng *g = open_eng((struct eng_config){ .max_running = 3 });
        struct col cols[5], *cs[5];

        (void)state;
        for (int i = 0; i < 5; i++) {
                struct spec s = { .prompt = prompt_text(i), .max_tokens = 2000,
                                  .ignore_eos = true };
                submit(g, &s, &cols[i]);
                cs[i] = &cols[i];
        }
        /* The first three run (the other two wait): stop once they talk. */
        drive_until(g, cs, 3, 2, NULL);
        eng_stop(g);
        eng_dispatch(g, on_update, NULL);
        for (int i = 0; i < 5; i++) {
                if (cols[i].err[0])
                        fail_msg("request %d: %s", i, cols[i].err);
                if (cols[i].finals != 1 || cols[i].finish != ENG_FINISH_SHUTDOWN)
                        fail_msg("request %d: %d finals, finish %s; want shutdown", i,
                                 cols[i].finals, eng_finish_name(cols[i].finish));
                expect_final(&cols[i], "stopped");
                assert_true(cols[i].usage.completion_tokens < 2000);
                assert_true(cols[i].has_why);
        }
        assert_true(cols[0].usage.completion_tokens >= 2);
        eng_stop(g); /* twice is harmless */
        eng_dispatch(g, on_update, NULL);
        for (int i = 0; i < 5; i++) {
                assert_int_equal(cols[i].finals, 1);
                col_free(&cols[i]);
        }
        eng_free(g);
}

/* A request submitted after eng_stop must not hang and leak: refused, or
 * finished with SHUTDOWN. */
static void test_submit_after_stop(void **state)
{
        struct eng *g = open_eng((struct eng_config){ 0 });
        struct spec s = { .prompt = "Hello", .max_tokens = 3 };
        struct moerr e = { { 0 } };
        struct eng_params p;
        int32_t *ids;
        size_t n;
        struct col c;

        (void)state;
        eng_stop(g);
        tokenize(g, 0, s.prompt, &ids, &n);
        col_init(&c);
        c.n_prompt = (int64_t)n;
        p = params_of(&s, ids, n, &c);
        if (eng_submit(g, &p, &c.req, &e) == 0) {
                eng_dispatch(g, on_update, NULL);
                if (c.finals != 1 || c.finish != ENG_FINISH_SHUTDOWN)
                        fail_msg("a request submitted after eng_stop: %d final updates "
                                 "(finish %s)", c.finals, eng_finish_name(c.finish));
        } else {
                assert_true(strlen(e.msg) > 0);
                c.req = NULL;
        }
        free(ids);
        col_free(&c);
        eng_free(g);
}

/* ---- 7. heartbeat and stats ---- */

static void test_heartbeat_and_stats(void **state)
{
        struct eng *g = open_eng((struct eng_config){ .heartbeat_s = 0.05 });
        struct col cols[5], *cs[5];
        struct eng_stats st;
        int64_t prompt = 0, completion = 0, hist = 0;
        double h0, h1, seen[64];
        int n_seen = 0;

        (void)state;
        for (int i = 1; i < 12; i++)
                assert_true(eng_step_hist_bounds[i] > eng_step_hist_bounds[i - 1]);
        eng_get_stats(g, &st);
        assert_int_equal(st.steps, 0);
        assert_int_equal(st.running + st.waiting, 0);
        assert_int_equal(st.tokens_generated + st.tokens_prefilled, 0);

        /* Idle, it beats every 50 ms: about ten distinct beats in half a
         * second (the 1 s default would give one or two). */
        h0 = eng_heartbeat(g);
        for (int i = 0; i < 25; i++) {
                h1 = eng_heartbeat(g);
                if (h1 > eng_now())
                        fail_msg("heartbeat %.3f is in the future", h1);
                if (!n_seen || h1 != seen[n_seen - 1])
                        seen[n_seen++] = h1;
                nanosleep(&(struct timespec){ .tv_nsec = 20000000 }, NULL);
        }
        if (n_seen < 5 || seen[n_seen - 1] - h0 < 0.2)
                fail_msg("idle heartbeat: %d distinct beats in 0.5 s, %.3f s apart", n_seen,
                         seen[n_seen - 1] - h0);

        for (int i = 0; i < 5; i++) {
                struct spec s = batch_spec(i);
                submit(g, &s, &cols[i]);
                cs[i] = &cols[i];
        }
        eng_get_stats(g, &st);
        assert_true(st.waiting + st.running > 0);
        drive(g, cs, 5);
        settle(g);
        for (int i = 0; i < 5; i++) {
                expect_final(&cols[i], "stats");
                prompt += cols[i].usage.prompt_tokens;
                completion += cols[i].usage.completion_tokens;
                col_free(&cols[i]);
        }
        eng_get_stats(g, &st);
        for (int i = 0; i < 12; i++)
                hist += st.step_hist[i];
        assert_int_equal(st.running, 0);
        assert_int_equal(st.waiting, 0);
        assert_int_equal(st.preemptions, 0);
        assert_true(st.steps > 0);
        assert_int_equal(hist, st.steps);
        assert_true(st.step_sum_s > 0);
        assert_true(st.busy_s >= st.step_sum_s * 0.999);
        /* Every step decodes or prefills, so there are at most as many
         * steps as tokens. */
        assert_true(st.steps <= st.tokens_prefilled + st.tokens_generated);
        if (st.tokens_generated != completion || st.tokens_prefilled != prompt)
                fail_msg("stats: %lld tokens generated, %lld prefilled; the requests had %lld "
                         "completion and %lld prompt tokens",
                         (long long)st.tokens_generated, (long long)st.tokens_prefilled,
                         (long long)completion, (long long)prompt);
        /* Idle again: the heartbeat goes on. */
        h0 = eng_heartbeat(g);
        settle(g);
        assert_true(eng_heartbeat(g) > h0);
        eng_free(g);
}

/* Prompt tokens are counted as prefilled however the prompt is chunked
 * (a last chunk of one token included), generated tokens as generated. */
static void test_stats_chunked(void **state)
{
        struct eng *g = open_eng((struct eng_config){ .step_tokens = 8 });
        struct spec s = { .max_tokens = 5, .ignore_eos = true };
        struct col c, *cs[] = { &c };
        struct eng_stats st;
        const size_t lens[] = { 9, 17, 1, 8 };
        int64_t prompt = 0, completion = 0;

        (void)state;
        for (size_t i = 0; i < 4; i++) {
                submit_synth(g, &s, lens[i], (int)i, &c);
                drive(g, cs, 1);
                expect_final(&c, "chunked");
                prompt += (int64_t)lens[i];
                completion += c.usage.completion_tokens;
                col_free(&c);
        }
        settle(g);
        eng_get_stats(g, &st);
        if (st.tokens_generated != completion || st.tokens_prefilled != prompt)
                fail_msg("stats: %lld tokens generated, %lld prefilled; the requests had %lld "
                         "completion and %lld prompt tokens",
                         (long long)st.tokens_generated, (long long)st.tokens_prefilled,
                         (long long)completion, (long long)prompt);
        eng_free(g);
}

/* ---- 8. two models ---- */

static void test_two_models(void **state)
{
        const char *ids[] = { "a", "b" };
        const char *paths[] = { model_a(), model_b() };
        struct eng *g = open_models((struct eng_config){ 0 }, ids, paths, 2);
        struct eng_model_info mi;
        struct col alone[8], cols[8], *cs[8];
        struct moerr e = { { 0 } };
        bool differ = false;
        char what[64];

        (void)state;
        assert_int_equal(eng_model_count(g), 2);
        assert_int_equal(eng_model_find(g, "a"), 0);
        assert_int_equal(eng_model_find(g, "b"), 1);
        assert_int_equal(eng_model_find(g, "c"), -1);
        assert_int_equal(eng_model_find(g, ""), -1);
        eng_model_get(g, 1, &mi);
        assert_string_equal(mi.id, "b");
        assert_string_equal(mi.name, "tiny-softmax");
        assert_string_equal(mi.path, model_b());
        assert_int_equal(mi.n_ctx, 64 * 40);
        assert_int_equal(mi.n_vocab, 512);
        assert_int_equal(mi.n_layer, 3);
        assert_int_equal(mi.n_expert, 8);
        assert_int_equal(mi.n_expert_used, 2);
        assert_int_equal(mi.chat, CHAT_DEEPSEEK3);
        assert_true(mi.weight_bytes > 0);
        assert_int_equal(mi.kv_block_tokens, 32);
        assert_int_equal(mi.kv_blocks_used, 0);
        assert_true(mi.kv_blocks_total * 32 >= 4 * 64 * 40);
        eng_model_get(g, 0, &mi);
        assert_string_equal(mi.id, "a");
        assert_string_equal(mi.name, "tiny");
        /* F32 weights are bigger than the other model's Q8_0 ones. */
        {
                struct eng_model_info mb;
                eng_model_get(g, 1, &mb);
                assert_true(mi.weight_bytes > mb.weight_bytes);
        }
        /* Models come before the start. */
        assert_int_equal(eng_add_model(g, "c", model_a(), NULL, NULL, &e), -EBUSY);

        for (int i = 0; i < 8; i++) {
                struct spec s = batch_spec(i / 2);
                s.model = i % 2;
                s.max_tokens = 20;
                s.ignore_eos = true;
                run_alone(g, &s, &alone[i]);
        }
        for (int i = 0; i < 8; i += 2)
                differ |= alone[i].len != alone[i + 1].len ||
                          memcmp(alone[i].text, alone[i + 1].text, alone[i].len) != 0;
        assert_true(differ);
        for (int i = 0; i < 8; i++) {
                struct spec s = batch_spec(i / 2);
                s.model = i % 2;
                s.max_tokens = 20;
                s.ignore_eos = true;
                submit(g, &s, &cols[i]);
                cs[i] = &cols[i];
        }
        drive(g, cs, 8);
        for (int i = 0; i < 8; i++) {
                snprintf(what, sizeof what, "request %d to model %d", i, i % 2);
                expect_same(&cols[i], &alone[i], what);
                col_free(&cols[i]);
                col_free(&alone[i]);
        }
        eng_free(g);
}

static void test_setup_errors(void **state)
{
        struct eng_config c = { .threads = THREADS };
        struct moerr e = { { 0 } };
        struct eng *g = NULL;

        (void)state;
        assert_int_equal(eng_new(&c, &g, &e), 0);
        /* Nothing to serve. */
        assert_int_equal(eng_start(g, &e), -EINVAL);
        assert_true(eng_add_model(g, "x", tu_path("missing.gguf"), NULL, NULL, &e) < 0);
        assert_int_equal(eng_model_count(g), 0);
        assert_int_equal(eng_add_model(g, "x", model_a(), NULL, NULL, &e), 0);
        assert_int_equal(eng_add_model(g, "x", model_b(), NULL, NULL, &e), -EEXIST);
        assert_int_equal(eng_model_count(g), 1);
        /* Freed without ever starting. */
        eng_free(g);
        eng_free(NULL);
}

static void progress_cb(const char *id, double f, void *ud)
{
        double *last = ud;

        assert_string_equal(id, "p");
        assert_true(f >= *last && f <= 1);
        *last = f;
}

static void test_progress(void **state)
{
        struct eng_config c = { .threads = THREADS };
        struct moerr e = { { 0 } };
        struct eng *g = NULL;
        double last = 0;

        (void)state;
        assert_int_equal(eng_new(&c, &g, &e), 0);
        assert_int_equal(eng_add_model(g, "p", model_a(), progress_cb, &last, &e), 0);
        assert_true(last == 1.0);
        eng_free(g);
}

/* ---- 9. seeded sampling ---- */

static void test_seeded_sampling(void **state)
{
        struct eng *g = open_eng((struct eng_config){ 0 });
        struct spec s = { .prompt = "The cat sat on", .max_tokens = 24, .temperature = 0.8f,
                          .seed = 42, .ignore_eos = true };
        struct col a, b, other, greedy, cols[4], *cs[4];

        (void)state;
        run_alone(g, &s, &a);
        run_alone(g, &s, &b);
        expect_same(&b, &a, "seed 42 twice");
        /* The same beside other sampled requests. */
        for (int i = 0; i < 4; i++) {
                struct spec t = s;
                if (i > 0) {
                        t.prompt = prompt_text(i);
                        t.seed = (uint64_t)i;
                }
                submit(g, &t, &cols[i]);
                cs[i] = &cols[i];
        }
        drive(g, cs, 4);
        expect_same(&cols[0], &a, "seed 42 in a batch");
        for (int i = 0; i < 4; i++)
                col_free(&cols[i]);
        /* The seed and the temperature matter. */
        s.seed = 43;
        run_alone(g, &s, &other);
        s.temperature = 0;
        run_alone(g, &s, &greedy);
        assert_false(other.len == a.len && memcmp(other.text, a.text, a.len) == 0);
        assert_false(greedy.len == a.len && memcmp(greedy.text, a.text, a.len) == 0);
        col_free(&a);
        col_free(&b);
        col_free(&other);
        col_free(&greedy);
        eng_free(g);
}

/* ---- 10. tokenizing and chat ---- */

static void test_tokenize_and_chat(void **state)
{
        struct eng *g = open_eng((struct eng_config){ 0 });
        struct moerr e = { { 0 } };
        struct chat_msg msgs[] = { { "system", "Be brief." }, { "user", "Hello there" } };
        struct chat_msg bad[] = { { "wizard", "hi" } };
        int32_t *ids = NULL;
        size_t n = 0;
        char piece[128], joined[256];
        size_t jl = 0;
        char *text = NULL;
        bool user_tok = false, asst_tok = false;
        int k;

        (void)state;
        const char *hello = "Hello world, the cat";
        assert_int_equal(eng_tokenize(g, 0, hello, strlen(hello), false, true, &ids, &n, &e), 0);
        assert_true(n >= 2);
        /* BOS first; the other pieces spell the text. */
        k = eng_token_piece(g, 0, ids[0], piece, sizeof piece);
        assert_true(k > 0);
        assert_memory_equal(piece, "<｜begin▁of▁sentence｜>", (size_t)k);
        for (size_t i = 1; i < n; i++) {
                k = eng_token_piece(g, 0, ids[i], piece, sizeof piece);
                assert_true(k > 0 && jl + (size_t)k < sizeof joined);
                memcpy(joined + jl, piece, (size_t)k);
                jl += (size_t)k;
        }
        assert_int_equal(jl, strlen(hello));
        assert_memory_equal(joined, hello, jl);
        free(ids);
        assert_int_equal(eng_tokenize(g, 0, hello, strlen(hello), false, false, &ids, &n, &e), 0);
        k = eng_token_piece(g, 0, ids[0], piece, sizeof piece);
        assert_true(k == 1 && piece[0] == 'H');
        free(ids);
        assert_true(eng_token_piece(g, 0, 512, piece, sizeof piece) < 0);
        assert_true(eng_token_piece(g, 0, -1, piece, sizeof piece) < 0);

        /* The chat text's markers become single special tokens. */
        assert_int_equal(eng_render_chat(g, 0, msgs, 2, &text, &e), 0);
        assert_non_null(strstr(text, "Be brief."));
        assert_non_null(strstr(text, "<｜User｜>Hello there"));
        assert_non_null(strstr(text, "<｜Assistant｜>"));
        assert_int_equal(eng_tokenize(g, 0, text, strlen(text), true, false, &ids, &n, &e), 0);
        for (size_t i = 0; i < n; i++) {
                k = eng_token_piece(g, 0, ids[i], piece, sizeof piece - 1);
                assert_true(k > 0);
                piece[k] = 0;
                user_tok |= strcmp(piece, "<｜User｜>") == 0;
                asst_tok |= strcmp(piece, "<｜Assistant｜>") == 0;
        }
        assert_true(user_tok && asst_tok);
        free(ids);
        /* Without parse_special the markers are plain text. */
        assert_int_equal(eng_tokenize(g, 0, text, strlen(text), false, false, &ids, &n, &e), 0);
        for (size_t i = 0; i < n; i++) {
                k = eng_token_piece(g, 0, ids[i], piece, sizeof piece - 1);
                piece[k > 0 ? k : 0] = 0;
                assert_true(strcmp(piece, "<｜User｜>") != 0);
        }
        free(ids);
        free(text);
        text = NULL;
        e.msg[0] = 0;
        assert_true(eng_render_chat(g, 0, bad, 1, &text, &e) < 0);
        assert_true(strlen(e.msg) > 0);
        assert_null(text);
        eng_free(g);
}

/* ---- 11. fair sharing between tenants ---- */

/* Every request of these tests is submitted before the engine starts, so it
 * takes them all at its first step and what it schedules does not depend on
 * the main loop's timing. Service is counted in tokens (prompt and
 * completion) at an event of the run (a request's finish or admission),
 * from the engine's own timestamps of every request (usage, on the
 * eng_now clock); only a request under way at that moment is apportioned,
 * linearly over its prefill or its decoding. */

/* One tenant's workload: n requests of one size. */
struct fload {
        uint32_t tenant;
        double weight, kv_share;
        bool interactive;
        size_t prompt;
        int64_t max_tokens;
        int n;
};

/* One request and its life on the engine's clock. */
struct freq {
        struct col c;            /* first: on_update's user pointer */
        const struct fload *l;
        double t_submit, err;    /* eng_submit's stamp lies within t_submit +- err */
        double sched, first, fin;
};

struct frun {
        struct eng *g;
        struct freq *q;
        size_t n, cap;
        int seed;
};

/* An engine over the tiny model, not started yet: requests queue up. */
static void fair_open(struct frun *fr, struct eng_config c, size_t cap)
{
        struct moerr e = { { 0 } };

        memset(fr, 0, sizeof *fr);
        if (!c.threads)
                c.threads = THREADS;
        if (!(c.heartbeat_s > 0))
                c.heartbeat_s = 0.05;
        if (eng_new(&c, &fr->g, &e) < 0)
                fail_msg("eng_new: %s", e.msg);
        if (eng_add_model(fr->g, "tiny", model_a(), NULL, NULL, &e) < 0)
                fail_msg("eng_add_model: %s", e.msg);
        /* Never reallocated: the engine holds pointers to the cols. */
        fr->q = calloc(cap, sizeof *fr->q);
        assert_non_null(fr->q);
        fr->cap = cap;
}

static void fair_start(struct frun *fr)
{
        struct moerr e = { { 0 } };

        if (eng_start(fr->g, &e) < 0)
                fail_msg("eng_start: %s", e.msg);
}

static void fair_close(struct frun *fr)
{
        for (size_t i = 0; i < fr->n; i++)
                col_free(&fr->q[i].c);
        free(fr->q);
        eng_free(fr->g);
}

static struct freq *fair_submit(struct frun *fr, const struct fload *l)
{
        struct spec s = { .max_tokens = l->max_tokens, .ignore_eos = true,
                          .tenant = l->tenant };
        struct moerr e = { { 0 } };
        int32_t *ids = synth_prompt(l->prompt, fr->seed++);
        struct freq *q;
        struct eng_params p;
        double t0;
        int r;

        assert_true(fr->n < fr->cap);
        q = &fr->q[fr->n++];
        q->l = l;
        col_init(&q->c);
        q->c.g = fr->g;
        q->c.n_prompt = (int64_t)l->prompt;
        p = params_of(&s, ids, l->prompt, &q->c);
        p.weight = l->weight;
        p.kv_share = l->kv_share;
        p.interactive = l->interactive;
        t0 = eng_now();
        r = eng_submit(fr->g, &p, &q->c.req, &e);
        q->err = (eng_now() - t0) / 2;
        q->t_submit = t0 + q->err;
        free(ids);
        if (r < 0)
                fail_msg("eng_submit (tenant %u): %s (%d)", l->tenant, e.msg, r);
        return q;
}

/* The workloads' requests, tenant after tenant, or round robin. */
static void fair_submit_all(struct frun *fr, const struct fload *l, size_t n, bool interleave)
{
        int most = 0;

        for (size_t t = 0; t < n; t++)
                most = MO_MAX(most, l[t].n);
        if (!interleave) {
                for (size_t t = 0; t < n; t++)
                        for (int i = 0; i < l[t].n; i++)
                                fair_submit(fr, &l[t]);
                return;
        }
        for (int i = 0; i < most; i++)
                for (size_t t = 0; t < n; t++)
                        if (i < l[t].n)
                                fair_submit(fr, &l[t]);
}

/* Runs every request from index from on to its end; each must get its
 * whole answer. */
static void fair_drive(struct frun *fr, size_t from)
{
        size_t n = fr->n - from;
        struct col **cs = calloc(n ? n : 1, sizeof *cs);

        assert_non_null(cs);
        for (size_t i = 0; i < n; i++)
                cs[i] = &fr->q[from + i].c;
        drive(fr->g, cs, n);
        free(cs);
        for (size_t i = from; i < fr->n; i++) {
                struct freq *q = &fr->q[i];
                expect_final(&q->c, "fair share");
                if (q->c.finish != ENG_FINISH_LENGTH ||
                    q->c.usage.completion_tokens != q->l->max_tokens)
                        fail_msg("tenant %u: finished %s (%s) after %lld of %lld tokens",
                                 q->l->tenant, eng_finish_name(q->c.finish), q->c.why,
                                 (long long)q->c.usage.completion_tokens,
                                 (long long)q->l->max_tokens);
                q->sched = q->t_submit + q->c.usage.queue_s;
                q->first = q->t_submit + q->c.usage.first_token_s;
                q->fin = q->t_submit + q->c.usage.total_s;
        }
}

/* Tokens of q processed by time t (prefill, then one token per step). */
static double fair_tokens(const struct freq *q, double t)
{
        double p = (double)q->l->prompt, m = (double)q->l->max_tokens;

        if (t >= q->fin)
                return p + m;
        if (t <= q->sched)
                return 0;
        if (t < q->first)
                return p * (t - q->sched) / MO_MAX(q->first - q->sched, 1e-9);
        return p + 1 + (m - 1) * (t - q->first) / MO_MAX(q->fin - q->first, 1e-9);
}

/* A tenant's service by time t, over requests from index from on, in
 * tokens divided by its weight. */
static double fair_service(const struct frun *fr, size_t from, uint32_t tenant, double t)
{
        double s = 0, w = 1;

        for (size_t i = from; i < fr->n; i++)
                if (fr->q[i].l->tenant == tenant) {
                        s += fair_tokens(&fr->q[i], t);
                        w = fr->q[i].l->weight;
                }
        return s / w;
}

/* The latest admission (sched) or finish of a tenant's requests. */
static double fair_last(const struct frun *fr, size_t from, uint32_t tenant, bool fin)
{
        double t = -1;

        for (size_t i = from; i < fr->n; i++)
                if (fr->q[i].l->tenant == tenant)
                        t = MO_MAX(t, fin ? fr->q[i].fin : fr->q[i].sched);
        return t;
}

static double jain(const double *x, size_t n)
{
        double s = 0, s2 = 0;

        for (size_t i = 0; i < n; i++) {
                s += x[i];
                s2 += x[i] * x[i];
        }
        return s2 > 0 ? s * s / ((double)n * s2) : 0;
}

/* Two tenants of weights 1 and 3 flood the engine with equal requests:
 * when the weight-3 one has had all of its requests served (the other
 * still waiting), the tokens served split 1:3 within 10%. The light
 * tenant's requests come first, so arrival order alone would favour it;
 * should it run out of requests first, the split is taken then. */
static void test_fair_weights(void **state)
{
        const struct fload l[2] = {
                { .tenant = 1, .weight = 1, .prompt = 8, .max_tokens = 8, .n = 45 },
                { .tenant = 2, .weight = 3, .prompt = 8, .max_tokens = 8, .n = 96 },
        };
        struct frun fr;
        double t, s1, s2, dev;

        (void)state;
        fair_open(&fr, (struct eng_config){ .max_running = 4, .step_tokens = 64 }, 141);
        fair_submit_all(&fr, l, 2, false);
        fair_start(&fr);
        fair_drive(&fr, 0);
        t = MO_MIN(fair_last(&fr, 0, 2, true), fair_last(&fr, 0, 1, false));
        /* Service is tokens / weight: equal service is the 1:3 split. */
        s1 = fair_service(&fr, 0, 1, t);
        s2 = fair_service(&fr, 0, 2, t);
        dev = s2 / s1 - 1;
        print_message("weights 1:3: %.0f and %.0f tokens served, 1:%.2f (%+.1f%%)\n", s1,
                      s2 * 3, s2 * 3 / s1, dev * 100);
        if (fabs(dev) > 0.10)
                fail_msg("weights 1:3: tokens served split 1:%.2f (%.0f and %.0f tokens), "
                         "more than 10%% off", s2 * 3 / s1, s1, s2 * 3);
        fair_close(&fr);
}

/* Four tenants of equal weight with requests of different sizes: while all
 * of them still have requests waiting, Jain's index of their service is at
 * least 0.95. */
static void test_fair_sizes(void **state)
{
        const struct fload l[4] = {
                { .tenant = 1, .weight = 1, .prompt = 4, .max_tokens = 12, .n = 48 },
                { .tenant = 2, .weight = 1, .prompt = 24, .max_tokens = 8, .n = 24 },
                { .tenant = 3, .weight = 1, .prompt = 8, .max_tokens = 40, .n = 16 },
                { .tenant = 4, .weight = 1, .prompt = 40, .max_tokens = 24, .n = 12 },
        };
        struct frun fr;
        double t = 1e300, x[4], j;

        (void)state;
        fair_open(&fr, (struct eng_config){ .max_running = 4, .step_tokens = 64 }, 100);
        fair_submit_all(&fr, l, 4, true);
        fair_start(&fr);
        fair_drive(&fr, 0);
        /* The first moment a tenant has nothing left waiting. */
        for (uint32_t k = 1; k <= 4; k++)
                t = MO_MIN(t, fair_last(&fr, 0, k, false));
        for (uint32_t k = 1; k <= 4; k++)
                x[k - 1] = fair_service(&fr, 0, k, t);
        j = jain(x, 4);
        print_message("sizes 16/32/48/64 tokens: served %.0f %.0f %.0f %.0f, Jain %.3f\n",
                      x[0], x[1], x[2], x[3], j);
        if (j < 0.95)
                fail_msg("four equal tenants served %.0f, %.0f, %.0f and %.0f tokens: "
                         "Jain's index %.3f < 0.95", x[0], x[1], x[2], x[3], j);
        fair_close(&fr);
}

/* A tenant that was idle banks no credit: tenant 1 has the engine to
 * itself for a while, then tenant 2 arrives (first) and both flood it; the
 * newcomer does not get the engine to itself until it has caught up with
 * the other's past service. These requests arrive at a running engine, so
 * the first step or two may see only some of them. */
static void test_fair_idle_credit(void **state)
{
        const struct fload solo = { .tenant = 1, .weight = 1, .prompt = 8, .max_tokens = 24,
                                    .n = 16 };
        const struct fload l[2] = {
                { .tenant = 2, .weight = 1, .prompt = 8, .max_tokens = 24, .n = 24 },
                { .tenant = 1, .weight = 1, .prompt = 8, .max_tokens = 24, .n = 24 },
        };
        struct frun fr;
        double t, s1, s2;
        size_t from;

        (void)state;
        fair_open(&fr, (struct eng_config){ .max_running = 4, .step_tokens = 64 }, 70);
        fair_submit_all(&fr, &solo, 1, false);
        fair_start(&fr);
        fair_drive(&fr, 0);
        wait_idle(fr.g);
        from = fr.n;
        fair_submit_all(&fr, l, 2, true);
        fair_drive(&fr, from);
        t = MO_MIN(fair_last(&fr, from, 1, false), fair_last(&fr, from, 2, false));
        s1 = fair_service(&fr, from, 1, t);
        s2 = fair_service(&fr, from, 2, t);
        print_message("after idle: tenant 1 served %.0f, the newcomer %.0f tokens (%.0f%%)\n",
                      s1, s2, 100 * s2 / (s1 + s2));
        if (s2 > 0.6 * (s1 + s2))
                fail_msg("a newcomer after another tenant's solo run took %.0f%% of the "
                         "engine (%.0f tokens to %.0f) while both were backlogged",
                         100 * s2 / (s1 + s2), s2, s1);
        fair_close(&fr);
}

/* On a tie of the counters an interactive tenant goes first, and only on
 * a tie: with one sequence at a time and equal requests, the batch
 * tenant's requests (queued first) alternate with the interactive one's,
 * which begins. */
static void test_fair_interactive_ties(void **state)
{
        const struct fload l[2] = {
                { .tenant = 7, .weight = 1, .prompt = 8, .max_tokens = 8, .n = 4 },
                { .tenant = 8, .weight = 1, .prompt = 8, .max_tokens = 8, .n = 4,
                  .interactive = true },
        };
        struct frun fr;
        struct freq *order[8];

        (void)state;
        fair_open(&fr, (struct eng_config){ .max_running = 1 }, 8);
        fair_submit_all(&fr, l, 2, false);
        fair_start(&fr);
        fair_drive(&fr, 0);
        for (size_t i = 0; i < 8; i++)
                order[i] = &fr.q[i];
        /* One at a time: admissions are a whole request apart. */
        for (size_t i = 1; i < 8; i++)
                for (size_t k = i; k > 0 && order[k]->sched < order[k - 1]->sched; k--) {
                        struct freq *x = order[k];
                        order[k] = order[k - 1];
                        order[k - 1] = x;
                }
        for (size_t i = 0; i < 8; i++) {
                bool want_interactive = i % 2 == 0;
                if (order[i]->l->interactive != want_interactive)
                        fail_msg("admission %zu went to the %s tenant: want the two "
                                 "alternating, the interactive one first", i,
                                 order[i]->l->interactive ? "interactive" : "batch");
                if (i > 0 && order[i]->sched + order[i]->err <
                                     order[i - 1]->fin - order[i - 1]->err)
                        fail_msg("max_running 1, yet admission %zu came before the "
                                 "previous request finished", i);
        }
        fair_close(&fr);
}

/* Blocks held by a tenant at time t, at least (a sequence holds its
 * prompt's blocks from its first chunk and one more token per step). */
static int64_t fair_blocks_lo(const struct frun *fr, uint32_t tenant, double t)
{
        int64_t n = 0;

        for (size_t i = 0; i < fr->n; i++) {
                const struct freq *q = &fr->q[i];
                double tok;
                if (q->l->tenant != tenant || t <= q->sched + q->err || t >= q->fin - q->err)
                        continue;
                tok = t >= q->first ? fair_tokens(q, t) - 2 : (double)q->l->prompt;
                tok = MO_MAX(tok, (double)q->l->prompt);
                n += (int64_t)ceil(tok / 32);
        }
        return n;
}

/* Whether any request of tenant waits at t (not admitted yet), surely. */
static bool fair_waits(const struct frun *fr, uint32_t tenant, double t)
{
        for (size_t i = 0; i < fr->n; i++)
                if (fr->q[i].l->tenant == tenant && t < fr->q[i].sched - fr->q[i].err)
                        return true;
        return false;
}

/* The most blocks tenant held at the moments between the run's events
 * when other waited, or -1 if other never waited. */
static int64_t fair_peak_blocks(const struct frun *fr, uint32_t tenant, uint32_t other)
{
        int64_t peak = -1;

        for (size_t i = 0; i < fr->n; i++) {
                const double ev[3] = { fr->q[i].sched, fr->q[i].first, fr->q[i].fin };
                for (int k = 0; k < 3; k++)
                        for (int side = -1; side <= 1; side += 2) {
                                double t = ev[k] + side * (fr->q[i].err + 1e-4);
                                if (fair_waits(fr, other, t))
                                        peak = MO_MAX(peak, fair_blocks_lo(fr, tenant, t));
                        }
        }
        return peak;
}

/* The cache in use, sampled every millisecond or so while fair_drive's
 * requests run: (time, blocks) with the time bracketing the reading. */
struct ksample {
        double t0, t1;
        int64_t used;
};

static size_t fair_drive_sampled(struct frun *fr, struct ksample **out)
{
        size_t n = 0, cap = 1024;
        struct ksample *ks = malloc(cap * sizeof *ks);
        double end = eng_now() + WAIT_S;

        assert_non_null(ks);
        for (;;) {
                struct pollfd pfd = { .fd = eng_event_fd(fr->g), .events = POLLIN };
                struct eng_model_info mi;
                bool done = true;
                for (size_t i = 0; i < fr->n; i++)
                        done &= col_done(&fr->q[i].c, 0);
                if (done)
                        break;
                if (eng_now() > end)
                        fail_msg("no final update after %.0f s", WAIT_S);
                if (poll(&pfd, 1, 1) > 0)
                        eng_dispatch(fr->g, on_update, NULL);
                if (n == cap) {
                        cap *= 2;
                        ks = realloc(ks, cap * sizeof *ks);
                        assert_non_null(ks);
                }
                ks[n].t0 = eng_now();
                eng_model_get(fr->g, 0, &mi);
                ks[n].t1 = eng_now();
                ks[n++].used = mi.kv_blocks_used;
        }
        fair_drive(fr, 0); /* all final: checks them and takes their times */
        *out = ks;
        return n;
}

/* KVShare: a tenant capped at a quarter of the cache holds no more than
 * that (and at most one sequence beyond it) while another tenant waits,
 * neither when its sequences start nor as their answers grow. */
static void test_fair_kv_share(void **state)
{
        /* 512 tokens of context: the smallest cache, 16 blocks of 32. */
        struct eng_config c = { .kv_bytes = 1, .max_context = 512, .max_running = 8,
                                .step_tokens = 128 };
        /* Prompts of 2 blocks whose answers stay in them. */
        const struct fload flat[2] = {
                { .tenant = 1, .weight = 1, .kv_share = 0.25, .prompt = 40, .max_tokens = 16,
                  .n = 12 },
                { .tenant = 2, .weight = 1, .prompt = 40, .max_tokens = 16, .n = 12 },
        };
        /* Prompts of one block whose answers grow to four; the other tenant
         * needs 14 blocks at once. */
        const struct fload grow[2] = {
                { .tenant = 1, .weight = 1, .kv_share = 0.25, .prompt = 20, .max_tokens = 100,
                  .n = 6 },
                { .tenant = 2, .weight = 1, .prompt = 430, .max_tokens = 8, .n = 1 },
        };
        const int64_t cap = 4, one = 4; /* 25% of 16 blocks; a grown sequence */
        struct eng_model_info mi;
        struct eng_stats st;
        struct ksample *ks;
        struct frun fr;
        int64_t peak;
        size_t n, seen = 0;

        (void)state;
        fair_open(&fr, c, 24);
        eng_model_get(fr.g, 0, &mi);
        assert_int_equal(mi.kv_blocks_total, 16);
        fair_submit_all(&fr, flat, 2, false);
        fair_start(&fr);
        fair_drive(&fr, 0);
        /* Nothing grows past its prompt's blocks: nothing is preempted, and
         * every sequence holds its blocks from admission to finish. */
        wait_idle(fr.g);
        eng_get_stats(fr.g, &st);
        assert_int_equal(st.preemptions, 0);
        peak = fair_peak_blocks(&fr, 1, 2);
        print_message("KVShare 25%% of 16 blocks, flat sequences: held at most %lld blocks "
                      "while the other tenant waited\n", (long long)peak);
        if (peak < 0)
                fail_msg("the other tenant never waited: the test did not press the share");
        if (peak > cap)
                fail_msg("a tenant with KVShare=25%% held %lld of 16 blocks while another "
                         "waited (its sequences hold 2 blocks each)", (long long)peak);
        eng_model_get(fr.g, 0, &mi);
        assert_int_equal(mi.kv_blocks_used, 0);
        fair_close(&fr);

        /* Sequences growing (some may be preempted): until the other
         * tenant's one request is admitted, every block in use is the
         * capped tenant's, so the cache's own count is its holding. When
         * the machine held up that request's eng_submit too long to place
         * its admission, the run is repeated. */
        for (int attempt = 0;; attempt++) {
                fair_open(&fr, c, 8);
                fair_submit_all(&fr, grow, 2, false);
                fair_start(&fr);
                n = fair_drive_sampled(&fr, &ks);
                assert_int_equal(fr.q[6].l->tenant, 2);
                peak = 0;
                seen = 0;
                for (size_t i = 0; i < n; i++)
                        if (ks[i].t1 < fr.q[6].sched - fr.q[6].err) {
                                peak = MO_MAX(peak, ks[i].used);
                                seen++;
                        }
                free(ks);
                print_message("KVShare 25%% of 16 blocks, growing sequences: held at most "
                              "%lld blocks while the other tenant waited (%zu samples, "
                              "submit +-%.1f ms)\n", (long long)peak, seen,
                              fr.q[6].err * 1e3);
                if (peak > cap + one)
                        fail_msg("a tenant with KVShare=25%% held %lld of 16 blocks (its "
                                 "share is %lld, a sequence grows to %lld) while another "
                                 "waited", (long long)peak, (long long)cap, (long long)one);
                fair_close(&fr);
                if (seen >= 10)
                        break;
                if (attempt == 2)
                        fail_msg("the other tenant's wait was never observed (%zu samples): "
                                 "the test did not press the share", seen);
        }
}

/* Under KV pressure the sequences given up are the most-served tenant's,
 * never those of a tenant below it: one tenant's single request and
 * another's two, each growing to three of the cache's four blocks. The
 * light tenant's request decodes straight through and finishes first;
 * every answer is the one it gets alone, none ends with an error. */
static void test_fair_kv_preempt(void **state)
{
        struct eng_config c = { .kv_bytes = 1, .max_context = 128, .step_tokens = 64 };
        const struct fload heavy = { .tenant = 1, .weight = 1, .prompt = 20, .max_tokens = 60,
                                     .n = 2 };
        const struct fload light = { .tenant = 2, .weight = 1, .prompt = 20, .max_tokens = 60,
                                     .n = 1 };
        struct col alone[3];
        struct eng_stats st;
        char what[96];

        (void)state;
        /* What each request (seeds 0, 1, 2) gives alone. */
        {
                struct frun fr;
                const struct fload one = { .tenant = 9, .weight = 1, .prompt = 20,
                                           .max_tokens = 60, .n = 1 };
                fair_open(&fr, c, 3);
                fair_start(&fr);
                for (int i = 0; i < 3; i++) {
                        fair_submit(&fr, &one);
                        fair_drive(&fr, (size_t)i);
                        alone[i] = fr.q[i].c;
                        alone[i].released = true; /* the handle stays fr's */
                        fr.q[i].c.text = NULL;    /* the text is alone's */
                }
                fair_close(&fr);
        }
        /* The light tenant's request first in the batch, then last. */
        for (int light_first = 1; light_first >= 0; light_first--) {
                struct frun fr;
                struct freq *lq = NULL;
                int seeds[3];
                fair_open(&fr, c, 3);
                for (int i = 0; i < 3; i++) {
                        bool is_light = light_first ? i == 0 : i == 2;
                        struct freq *q;
                        seeds[i] = fr.seed;
                        q = fair_submit(&fr, is_light ? &light : &heavy);
                        if (is_light)
                                lq = q;
                }
                fair_start(&fr);
                fair_drive(&fr, 0);
                for (int i = 0; i < 3; i++) {
                        snprintf(what, sizeof what, "%s tenant's request, light one %s",
                                 &fr.q[i] == lq ? "the light" : "the heavy",
                                 light_first ? "first" : "last");
                        expect_same(&fr.q[i].c, &alone[seeds[i]], what);
                        if (&fr.q[i] != lq && fr.q[i].fin < lq->fin)
                                fail_msg("%s: finished before the light tenant's, which "
                                         "must never be preempted for it", what);
                }
                wait_idle(fr.g);
                eng_get_stats(fr.g, &st);
                print_message("KV pressure, light tenant %s: %lld preemptions\n",
                              light_first ? "first" : "last", (long long)st.preemptions);
                if (st.preemptions == 0)
                        fail_msg("no preemption: the test did not press the cache");
                fair_close(&fr);
        }
        for (int i = 0; i < 3; i++)
                col_free(&alone[i]);
}

/* Under KV pressure a less-served tenant's new sequence does not wait for a
 * more-served tenant's sequences to finish: they give their blocks back.
 * The heavy tenant's four requests fill the cache at the first step; the
 * light tenant's one is admitted at the next, long before any of them
 * ends, and every request still gets its whole answer. */
static void test_fair_kv_admission(void **state)
{
        /* 16 blocks of 32 tokens; a heavy request holds 4 all its life. */
        struct eng_config c = { .kv_bytes = 1, .max_context = 512, .step_tokens = 512 };
        const struct fload l[2] = {
                { .tenant = 1, .weight = 1, .prompt = 100, .max_tokens = 20, .n = 4 },
                { .tenant = 2, .weight = 1, .prompt = 40, .max_tokens = 10, .n = 1 },
        };
        struct eng_stats st;
        struct freq *lq;
        struct frun fr;
        double first_end = 1e300, heavy_start = 0;

        (void)state;
        fair_open(&fr, c, 5);
        fair_submit_all(&fr, l, 2, false);
        fair_start(&fr);
        fair_drive(&fr, 0);
        lq = &fr.q[4];
        assert_int_equal(lq->l->tenant, 2);
        for (int i = 0; i < 4; i++) {
                first_end = MO_MIN(first_end, fr.q[i].fin - fr.q[i].err);
                heavy_start = MO_MAX(heavy_start, fr.q[i].sched + fr.q[i].err);
        }
        print_message("KV admission: the light request waited %.1f ms, the first heavy one "
                      "ended after %.1f ms\n", lq->c.usage.queue_s * 1e3,
                      (first_end - fr.q[0].t_submit) * 1e3);
        /* The heavy ones filled the cache first: the light one came after. */
        if (lq->sched - lq->err < heavy_start)
                fail_msg("the light request started beside the heavy ones: the test did "
                         "not fill the cache");
        if (lq->sched + lq->err >= first_end)
                fail_msg("the light tenant's request waited for the heavy tenant's to end "
                         "(admitted %.1f ms after submit) instead of taking blocks from it",
                         lq->c.usage.queue_s * 1e3);
        wait_idle(fr.g);
        eng_get_stats(fr.g, &st);
        assert_true(st.preemptions >= 1);
        fair_close(&fr);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_greedy_matches_runner),
                cmocka_unit_test(test_batch_equals_alone),
                cmocka_unit_test(test_kv_pressure),
                cmocka_unit_test(test_kv_pressure_tenants),
                cmocka_unit_test(test_max_tokens_and_context),
                cmocka_unit_test(test_bad_requests),
                cmocka_unit_test(test_bad_token_ids),
                cmocka_unit_test(test_stop_strings),
                cmocka_unit_test(test_cancel),
                cmocka_unit_test(test_release),
                cmocka_unit_test(test_release_undispatched),
                cmocka_unit_test(test_stop_running),
                cmocka_unit_test(test_submit_after_stop),
                cmocka_unit_test(test_heartbeat_and_stats),
                cmocka_unit_test(test_stats_chunked),
                cmocka_unit_test(test_two_models),
                cmocka_unit_test(test_setup_errors),
                cmocka_unit_test(test_progress),
                cmocka_unit_test(test_seeded_sampling),
                cmocka_unit_test(test_tokenize_and_chat),
                cmocka_unit_test(test_fair_weights),
                cmocka_unit_test(test_fair_sizes),
                cmocka_unit_test(test_fair_idle_credit),
                cmocka_unit_test(test_fair_interactive_ties),
                cmocka_unit_test(test_fair_kv_share),
                cmocka_unit_test(test_fair_kv_preempt),
                cmocka_unit_test(test_fair_kv_admission),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
