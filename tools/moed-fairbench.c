/* moed-fairbench: fair sharing between tenants, measured on the engine
 * itself (engine/api.h, no HTTP, a main loop of its own): two backlogged
 * tenants of weights 1 and 3, four equal tenants with requests of
 * different sizes, and an interactive tenant's time to first token beside
 * a batch tenant's flood of long prompts, against its unloaded value taken
 * first in the same run. The targets are the tenants issue's: a 1:3 split
 * within 10%, Jain's index >= 0.95, p99 TTFT under 3x the unloaded one. */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cleanup.h"
#include "engine/api.h"
#include "tools/runner.h"

#define MAX_TENANTS 4
#define DRAIN_S 30.0     /* longest wait for the timed requests of a window */

enum { RUN_WEIGHTS = 1, RUN_SIZES = 2, RUN_INTERACTIVE = 4 };

struct fb_opts {
        const char *model;
        int threads;
        double seconds, interval;
        int64_t max_running, step_tokens;
        unsigned only;
        bool json, check;
};

/* One tenant's workload and what it got. */
struct fb_tenant {
        uint32_t id;
        double weight;
        bool interactive;
        int64_t prompt, max_tokens;
        bool flood;              /* keeps its backlog topped up */
        int64_t outstanding;     /* submitted, not finished */
        int64_t served;          /* tokens (prompt + completion) in the window */
        int64_t finished;
        double *ttft, *ttft_client, *queue; /* timed requests: engine and client
                                               side TTFT, time to the first step */
        size_t n_ttft, cap_ttft;
};

struct fb_req {
        struct fb *b;
        struct fb_tenant *t;
        struct eng_req *h;
        size_t slot;             /* index in b->active */
        double t_submit, client_ttft;
        bool first_seen;
        bool timed;              /* its TTFT is recorded */
};

struct fb {
        const struct fb_opts *o;
        struct eng *g;
        int64_t n_vocab;
        struct fb_tenant ten[MAX_TENANTS];
        size_t n_ten;
        struct fb_req **active;
        size_t n_active, cap_active;
        int64_t target;          /* outstanding requests per flooding tenant */
        bool counting;           /* inside the measured window */
        uint64_t rng;
        int err;
        struct moerr e;
};

/* ---- requests ---- */

static int32_t rand_token(struct fb *b)
{
        b->rng ^= b->rng << 13;
        b->rng ^= b->rng >> 7;
        b->rng ^= b->rng << 17;
        return (int32_t)(3 + b->rng % (uint64_t)(b->n_vocab - 3));
}

static int fb_submit(struct fb *b, struct fb_tenant *t, bool timed)
{
        _cleanup_free_ int32_t *ids = malloc((size_t)t->prompt * sizeof *ids);
        struct fb_req *q = calloc(1, sizeof *q);
        struct eng_params p = {
                .n_prompt = (size_t)t->prompt,
                .max_tokens = t->max_tokens,
                .ignore_eos = true,   /* every request is its full size */
                .tenant = t->id,
                .weight = t->weight,
                .interactive = t->interactive,
        };
        int r;

        if (!ids || !q) {
                free(q);
                return moerr_set(&b->e, -ENOMEM, "out of memory");
        }
        if (b->n_active == b->cap_active) {
                size_t cap = b->cap_active ? b->cap_active * 2 : 256;
                struct fb_req **a = realloc(b->active, cap * sizeof *a);
                if (!a) {
                        free(q);
                        return moerr_set(&b->e, -ENOMEM, "out of memory");
                }
                b->active = a;
                b->cap_active = cap;
        }
        for (int64_t i = 0; i < t->prompt; i++)
                ids[i] = rand_token(b);
        sampler_params_default(&p.sampling);
        p.sampling.temperature = 0;
        p.prompt = ids;
        p.user = q;
        *q = (struct fb_req){ .b = b, .t = t, .timed = timed, .t_submit = eng_now() };
        if ((r = eng_submit(b->g, &p, &q->h, &b->e)) < 0) {
                free(q);
                return r;
        }
        q->slot = b->n_active;
        b->active[b->n_active++] = q;
        t->outstanding++;
        return 0;
}

/* Drops a request from the active set and frees it (its handle released). */
static void fb_drop(struct fb *b, struct fb_req *q)
{
        struct fb_req *last = b->active[--b->n_active];

        last->slot = q->slot;
        b->active[q->slot] = last;
        eng_req_release(q->h);
        q->t->outstanding--;
        free(q);
}

static bool grow(double **a, size_t cap)
{
        double *p = realloc(*a, cap * sizeof *p);

        if (p)
                *a = p;
        return p != NULL;
}

static void fb_record_ttft(struct fb_tenant *t, const struct eng_usage *u, double client_s)
{
        if (t->n_ttft == t->cap_ttft) {
                size_t cap = t->cap_ttft ? t->cap_ttft * 2 : 64;
                if (!grow(&t->ttft, cap) || !grow(&t->ttft_client, cap) ||
                    !grow(&t->queue, cap))
                        return; /* a lost sample, not a wrong one */
                t->cap_ttft = cap;
        }
        t->ttft[t->n_ttft] = u->first_token_s;
        t->queue[t->n_ttft] = u->queue_s;
        t->ttft_client[t->n_ttft++] = client_s;
}

static void fb_update(struct eng_req *r, void *user, const struct eng_update *u, void *ud)
{
        struct fb_req *q = user;
        struct fb *b = ud;
        double now = eng_now();

        (void)r;
        /* Prompt tokens are counted when their prefill has produced the
         * first token; over a long window the edge effect is small. The
         * client side time to first token is what a door's main loop sees,
         * dispatch latency included. */
        if (u->new_tokens > 0 && !q->first_seen) {
                q->first_seen = true;
                if (b->counting)
                        q->t->served += q->t->prompt;
                q->client_ttft = now - q->t_submit;
        }
        if (b->counting)
                q->t->served += u->new_tokens;
        if (u->finish == ENG_FINISH_NONE)
                return;
        if (u->finish != ENG_FINISH_LENGTH && u->finish != ENG_FINISH_STOP && !b->err)
                b->err = moerr_set(&b->e, -EIO, "a request of tenant %u ended with %s: %s",
                                   q->t->id, eng_finish_name(u->finish), u->why ? u->why : "");
        if (q->timed && q->first_seen)
                fb_record_ttft(q->t, &u->usage, q->client_ttft);
        q->t->finished++;
        fb_drop(b, q);
}

/* ---- the main loop ---- */

static int fb_top_up(struct fb *b)
{
        for (size_t i = 0; i < b->n_ten; i++) {
                struct fb_tenant *t = &b->ten[i];
                while (t->flood && t->outstanding < b->target)
                        if (fb_submit(b, t, false) < 0)
                                return -1;
        }
        return 0;
}

/* Runs until t_end, or with t_end <= 0 until no timed request is left:
 * dispatches the engine's updates, keeps the floods topped up and, every
 * interval seconds from *next_tick (if tick), submits a timed request of
 * tick; serial: only once its previous one has finished. */
static int fb_loop(struct fb *b, double t_end, struct fb_tenant *tick, double interval,
                   double *next_tick, bool serial)
{
        double drain_end = eng_now() + DRAIN_S;

        for (;;) {
                struct pollfd pfd = { .fd = eng_event_fd(b->g), .events = POLLIN };
                double now = eng_now(), wake;
                bool timed_left = false;
                if (t_end > 0 && now >= t_end)
                        return 0;
                if (t_end <= 0) {
                        for (size_t i = 0; i < b->n_active; i++)
                                timed_left |= b->active[i]->timed;
                        if (!timed_left)
                                return 0;
                        if (now >= drain_end)
                                return moerr_set(&b->e, -ETIMEDOUT,
                                                 "timed requests still running %.0f s after "
                                                 "the window", DRAIN_S);
                }
                if (tick && serial && tick->outstanding > 0)
                        *next_tick = MO_MAX(*next_tick, now);
                else if (tick && now >= *next_tick) {
                        if (fb_submit(b, tick, true) < 0)
                                return -1;
                        *next_tick += interval;
                }
                if (fb_top_up(b) < 0)
                        return -1;
                wake = t_end > 0 ? t_end : drain_end;
                if (tick && !(serial && tick->outstanding > 0))
                        wake = MO_MIN(wake, *next_tick);
                if (poll(&pfd, 1, (int)MO_MAX(0, ceil((wake - now) * 1000))) < 0 &&
                    errno != EINTR)
                        return moerr_set(&b->e, -errno, "poll: %s", strerror(errno));
                if (pfd.revents & POLLIN)
                        eng_dispatch(b->g, fb_update, b);
                if (b->err)
                        return b->err;
        }
}

static int fb_open(struct fb *b, const struct fb_opts *o, struct moerr *e)
{
        struct eng_config c = {
                .threads = o->threads,
                .max_running = o->max_running,
                .step_tokens = o->step_tokens,
        };
        struct eng_model_info mi;
        int r;

        memset(b, 0, sizeof *b);
        b->o = o;
        b->rng = 0x9E3779B97F4A7C15ull;
        if ((r = eng_new(&c, &b->g, e)) < 0)
                return r;
        if ((r = eng_add_model(b->g, "bench", o->model, NULL, NULL, e)) < 0 ||
            (r = eng_start(b->g, e)) < 0) {
                eng_free(b->g);
                return r;
        }
        eng_model_get(b->g, 0, &mi);
        b->n_vocab = mi.n_vocab;
        /* A flooding tenant keeps twice a full batch waiting beside the
         * batch it may be running. */
        b->target = 3 * (o->max_running > 0 ? o->max_running : 64);
        return 0;
}

static void fb_close(struct fb *b)
{
        while (b->n_active)
                fb_drop(b, b->active[b->n_active - 1]);
        free(b->active);
        for (size_t i = 0; i < b->n_ten; i++) {
                free(b->ten[i].ttft);
                free(b->ten[i].ttft_client);
                free(b->ten[i].queue);
        }
        eng_free(b->g);
}

static struct fb_tenant *fb_tenant(struct fb *b, double weight, bool interactive,
                                   int64_t prompt, int64_t max_tokens, bool flood)
{
        struct fb_tenant *t = &b->ten[b->n_ten];

        *t = (struct fb_tenant){ .id = (uint32_t)b->n_ten + 1, .weight = weight,
                                 .interactive = interactive, .prompt = prompt,
                                 .max_tokens = max_tokens, .flood = flood };
        b->n_ten++;
        return t;
}

/* A measured window of the floods alone. */
static int fb_window(struct fb *b, double seconds)
{
        int r;

        b->counting = true;
        r = fb_loop(b, eng_now() + seconds, NULL, 0, NULL, false);
        b->counting = false;
        return r;
}

/* ---- the three measurements ---- */

struct fb_result {
        /* weights */
        int64_t w_tokens[2];
        double w_ratio, w_dev;
        /* sizes */
        int64_t s_tokens[4], s_size[4];
        double jain;
        /* interactive */
        double ttft_unloaded, ttft_loaded, ttft_ratio, p50_unloaded, p50_loaded;
        double ttftc_unloaded, ttftc_loaded, queue_unloaded, queue_loaded;
        double step_unloaded, step_loaded;  /* mean step, seconds */
        size_t n_unloaded, n_loaded;
        int64_t batch_tokens;
        int64_t preemptions[3];
};

static int64_t fb_preemptions(struct fb *b)
{
        struct eng_stats st;

        eng_get_stats(b->g, &st);
        return st.preemptions;
}

static int run_weights(const struct fb_opts *o, struct fb_result *res, struct moerr *e)
{
        struct fb b;
        int r;

        if ((r = fb_open(&b, o, e)) < 0)
                return r;
        fb_tenant(&b, 1, false, 64, 64, true);
        fb_tenant(&b, 3, false, 64, 64, true);
        r = fb_window(&b, o->seconds);
        res->w_tokens[0] = b.ten[0].served;
        res->w_tokens[1] = b.ten[1].served;
        res->w_ratio = b.ten[0].served ? (double)b.ten[1].served / (double)b.ten[0].served : 0;
        res->w_dev = res->w_ratio / 3 - 1;
        res->preemptions[0] = fb_preemptions(&b);
        if (r < 0)
                *e = b.e;
        fb_close(&b);
        return r;
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

static int run_sizes(const struct fb_opts *o, struct fb_result *res, struct moerr *e)
{
        static const int64_t sizes[4][2] = { { 8, 24 }, { 96, 32 }, { 32, 160 }, { 256, 64 } };
        double x[4];
        struct fb b;
        int r;

        if ((r = fb_open(&b, o, e)) < 0)
                return r;
        for (int i = 0; i < 4; i++)
                fb_tenant(&b, 1, false, sizes[i][0], sizes[i][1], true);
        r = fb_window(&b, o->seconds);
        for (int i = 0; i < 4; i++) {
                res->s_tokens[i] = b.ten[i].served;
                res->s_size[i] = sizes[i][0] + sizes[i][1];
                x[i] = (double)b.ten[i].served / b.ten[i].weight;
        }
        res->jain = jain(x, 4);
        res->preemptions[1] = fb_preemptions(&b);
        if (r < 0)
                *e = b.e;
        fb_close(&b);
        return r;
}

static int cmp_double(const void *a, const void *b)
{
        double x = *(const double *)a, y = *(const double *)b;

        return (x > y) - (x < y);
}

/* A percentile (nearest rank) of n values; sorts them. With fewer than
 * 100 values the 99th is the largest. */
static double pct(double *v, size_t n, double p)
{
        size_t k;

        if (n == 0)
                return NAN;
        qsort(v, n, sizeof *v, cmp_double);
        k = (size_t)ceil(p / 100 * (double)n);
        return v[k > 0 ? k - 1 : 0];
}

/* The interactive tenant's timed requests of one phase: p99s, then reset. */
static size_t take_ttft(struct fb_tenant *t, double *engine_p99, double *engine_p50,
                        double *client_p99, double *queue_p99)
{
        size_t n = t->n_ttft;

        *engine_p50 = pct(t->ttft, n, 50);
        *engine_p99 = pct(t->ttft, n, 99);
        *client_p99 = pct(t->ttft_client, n, 99);
        *queue_p99 = pct(t->queue, n, 99);
        t->n_ttft = 0;
        return n;
}

/* Mean step time since the last call (the engine's own counters). */
static double mean_step(struct fb *b, struct eng_stats *last)
{
        struct eng_stats st;
        double m;

        eng_get_stats(b->g, &st);
        m = st.steps > last->steps ? (st.step_sum_s - last->step_sum_s) /
                                     (double)(st.steps - last->steps) : NAN;
        *last = st;
        return m;
}

static int run_interactive(const struct fb_opts *o, struct fb_result *res, struct moerr *e)
{
        /* Unloaded, requests come faster for more samples in less time,
         * each after the previous one has finished. */
        double unloaded_s = MO_MAX(5.0, o->seconds / 4), next;
        struct fb_tenant *it, *batch;
        struct eng_stats st = { 0 };
        struct fb b;
        int r;

        if ((r = fb_open(&b, o, e)) < 0)
                return r;
        it = fb_tenant(&b, 1, true, 32, 16, false);
        batch = fb_tenant(&b, 1, false, 512, 64, false);
        next = eng_now();
        if ((r = fb_loop(&b, eng_now() + unloaded_s, it, 0.25, &next, true)) < 0 ||
            (r = fb_loop(&b, 0, NULL, 0, NULL, false)) < 0)
                goto out;
        res->n_unloaded = take_ttft(it, &res->ttft_unloaded, &res->p50_unloaded,
                                    &res->ttftc_unloaded, &res->queue_unloaded);
        res->step_unloaded = mean_step(&b, &st);
        /* The same engine (and counters) under the batch tenant's flood;
         * the first timed request comes a second into it. */
        batch->flood = true;
        b.counting = true;
        next = eng_now() + o->interval;
        if ((r = fb_loop(&b, eng_now() + o->seconds, it, o->interval, &next, false)) < 0)
                goto out;
        b.counting = false;
        /* Slow timed requests still running count too: the flood goes on
         * until they are done. */
        if ((r = fb_loop(&b, 0, NULL, 0, NULL, false)) < 0)
                goto out;
        res->n_loaded = take_ttft(it, &res->ttft_loaded, &res->p50_loaded,
                                  &res->ttftc_loaded, &res->queue_loaded);
        res->step_loaded = mean_step(&b, &st);
        res->ttft_ratio = res->ttft_loaded / res->ttft_unloaded;
        res->batch_tokens = batch->served;
        res->preemptions[2] = fb_preemptions(&b);
out:
        if (r < 0)
                *e = b.e;
        fb_close(&b);
        return r;
}

/* ---- report ---- */

static bool pass_weights(const struct fb_result *r) { return fabs(r->w_dev) <= 0.10; }
static bool pass_sizes(const struct fb_result *r) { return r->jain >= 0.95; }
static bool pass_interactive(const struct fb_result *r) { return r->ttft_ratio < 3; }

static void loadavg(double out[3])
{
        FILE *f = fopen("/proc/loadavg", "re");

        out[0] = out[1] = out[2] = -1;
        if (!f)
                return;
        if (fscanf(f, "%lf %lf %lf", &out[0], &out[1], &out[2]) != 3)
                out[0] = out[1] = out[2] = -1;
        fclose(f);
}

static void report_json(const struct fb_opts *o, const struct eng_model_info *mi,
                        const struct fb_result *r, const double la0[3], const double la1[3])
{
        json_t *j = json_pack("{s:s, s:s, s:i, s:I, s:I, s:f, s:[f,f,f], s:[f,f,f]}",
                              "model", mi->name, "path", o->model, "threads", o->threads,
                              "max_running", (json_int_t)o->max_running,
                              "step_tokens", (json_int_t)o->step_tokens,
                              "seconds", o->seconds, "loadavg_start", la0[0], la0[1], la0[2],
                              "loadavg_end", la1[0], la1[1], la1[2]);

        if (!j)
                return;
        if (o->only & RUN_WEIGHTS)
                json_object_set_new(j, "weights", json_pack(
                        "{s:[I,I], s:f, s:f, s:I, s:b}",
                        "tokens", (json_int_t)r->w_tokens[0], (json_int_t)r->w_tokens[1],
                        "ratio", r->w_ratio, "deviation_pct", 100 * r->w_dev,
                        "preemptions", (json_int_t)r->preemptions[0], "pass", pass_weights(r)));
        if (o->only & RUN_SIZES)
                json_object_set_new(j, "sizes", json_pack(
                        "{s:[I,I,I,I], s:[I,I,I,I], s:f, s:I, s:b}",
                        "request_tokens", (json_int_t)r->s_size[0], (json_int_t)r->s_size[1],
                        (json_int_t)r->s_size[2], (json_int_t)r->s_size[3],
                        "tokens", (json_int_t)r->s_tokens[0], (json_int_t)r->s_tokens[1],
                        (json_int_t)r->s_tokens[2], (json_int_t)r->s_tokens[3],
                        "jain", r->jain, "preemptions", (json_int_t)r->preemptions[1],
                        "pass", pass_sizes(r)));
        if (o->only & RUN_INTERACTIVE)
                json_object_set_new(j, "interactive", json_pack(
                        "{s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:I, s:I, s:I, "
                        "s:I, s:b}",
                        "ttft_p99_unloaded_s", r->ttft_unloaded,
                        "ttft_p99_loaded_s", r->ttft_loaded, "ratio", r->ttft_ratio,
                        "ttft_p50_unloaded_s", r->p50_unloaded,
                        "ttft_p50_loaded_s", r->p50_loaded,
                        "client_ttft_p99_unloaded_s", r->ttftc_unloaded,
                        "client_ttft_p99_loaded_s", r->ttftc_loaded,
                        "queue_p99_unloaded_s", r->queue_unloaded,
                        "queue_p99_loaded_s", r->queue_loaded,
                        "step_mean_unloaded_s", r->step_unloaded,
                        "step_mean_loaded_s", r->step_loaded,
                        "n_unloaded", (json_int_t)r->n_unloaded,
                        "n_loaded", (json_int_t)r->n_loaded,
                        "batch_tokens", (json_int_t)r->batch_tokens,
                        "preemptions", (json_int_t)r->preemptions[2],
                        "pass", pass_interactive(r)));
        json_dumpf(j, stdout, JSON_COMPACT | JSON_REAL_PRECISION(6));
        fputc('\n', stdout);
        json_decref(j);
}

static void report_text(const struct fb_opts *o, const struct eng_model_info *mi,
                        const struct fb_result *r, const double la0[3], const double la1[3])
{
        printf("model        %s (%lld layers, %lld experts, %.1f MB of weights)\n", mi->name,
               (long long)mi->n_layer, (long long)mi->n_expert, mi->weight_bytes / 1e6);
        printf("engine       %d threads (0: all), max_running %lld, step_tokens %lld; %.0f s "
               "windows\n", o->threads, (long long)o->max_running, (long long)o->step_tokens,
               o->seconds);
        printf("load average %.2f %.2f %.2f at the start, %.2f %.2f %.2f at the end\n",
               la0[0], la0[1], la0[2], la1[0], la1[1], la1[2]);
        if (o->only & RUN_WEIGHTS)
                printf("weights 1:3  %lld and %lld tokens: 1:%.2f, %+.1f%% from 1:3 "
                       "(%lld preemptions)  %s (within 10%%)\n",
                       (long long)r->w_tokens[0], (long long)r->w_tokens[1], r->w_ratio,
                       100 * r->w_dev, (long long)r->preemptions[0],
                       pass_weights(r) ? "PASS" : "FAIL");
        if (o->only & RUN_SIZES)
                printf("sizes        requests of %lld/%lld/%lld/%lld tokens: %lld %lld %lld %lld "
                       "tokens, Jain %.3f  %s (>= 0.95)\n",
                       (long long)r->s_size[0], (long long)r->s_size[1],
                       (long long)r->s_size[2], (long long)r->s_size[3],
                       (long long)r->s_tokens[0], (long long)r->s_tokens[1],
                       (long long)r->s_tokens[2], (long long)r->s_tokens[3], r->jain,
                       pass_sizes(r) ? "PASS" : "FAIL");
        if (o->only & RUN_INTERACTIVE) {
                printf("interactive  p99 TTFT %.1f ms unloaded (%zu), %.1f ms beside the flood "
                       "(%zu): %.2fx  %s (under 3x)\n",
                       r->ttft_unloaded * 1e3, r->n_unloaded, r->ttft_loaded * 1e3,
                       r->n_loaded, r->ttft_ratio, pass_interactive(r) ? "PASS" : "FAIL");
                printf("             p50 %.1f and %.1f ms (%.2fx); client side p99 %.1f and "
                       "%.1f ms\n", r->p50_unloaded * 1e3, r->p50_loaded * 1e3,
                       r->p50_loaded / r->p50_unloaded, r->ttftc_unloaded * 1e3,
                       r->ttftc_loaded * 1e3);
                printf("             p99 queue %.1f and %.1f ms; mean step %.1f and %.1f ms\n",
                       r->queue_unloaded * 1e3, r->queue_loaded * 1e3,
                       r->step_unloaded * 1e3, r->step_loaded * 1e3);
                printf("             the batch tenant got %lld tokens (%lld preemptions)\n",
                       (long long)r->batch_tokens, (long long)r->preemptions[2]);
        }
}

static int fairbench(const struct fb_opts *o)
{
        struct fb_result res = { 0 };
        struct eng_model_info mi;
        struct moerr e = { { 0 } };
        double la0[3], la1[3];
        char name[128];
        struct fb b;
        int r;

        /* The model's description, and a load error before any window. */
        if ((r = fb_open(&b, o, &e)) < 0)
                goto fail;
        eng_model_get(b.g, 0, &mi);
        snprintf(name, sizeof name, "%s", mi.name);
        mi.name = name;
        mi.path = o->model;
        mi.id = NULL;
        fb_close(&b);
        loadavg(la0);
        if ((o->only & RUN_WEIGHTS) && (r = run_weights(o, &res, &e)) < 0)
                goto fail;
        if ((o->only & RUN_SIZES) && (r = run_sizes(o, &res, &e)) < 0)
                goto fail;
        if ((o->only & RUN_INTERACTIVE) && (r = run_interactive(o, &res, &e)) < 0)
                goto fail;
        loadavg(la1);
        if (o->json)
                report_json(o, &mi, &res, la0, la1);
        else
                report_text(o, &mi, &res, la0, la1);
        if (o->check && (((o->only & RUN_WEIGHTS) && !pass_weights(&res)) ||
                         ((o->only & RUN_SIZES) && !pass_sizes(&res)) ||
                         ((o->only & RUN_INTERACTIVE) && !pass_interactive(&res))))
                return 3;
        return 0;
fail:
        fprintf(stderr, "moed-fairbench: %s\n", e.msg[0] ? e.msg : strerror(-r));
        return 1;
}

/* ---- command line ---- */

static void usage(FILE *out)
{
        fprintf(out,
                "usage: moed-fairbench --model FILE [--seconds S] [--threads T] [--max-running N]\n"
                "                      [--step-tokens N] [--interval S] [--only LIST] [--json] [--check]\n"
                "  windows of S seconds (default 60) for: weights (tenants of weights 1 and 3),\n"
                "  sizes (4 equal tenants, different request sizes), interactive (p99 time to\n"
                "  first token of one short request every --interval seconds (default 1) beside\n"
                "  a batch flood, against its unloaded value); --only weights,sizes,interactive.\n"
                "  Engine defaults as the daemon's: max_running 64, step_tokens 256, all threads.\n"
                "  --check: exit status 3 when a target is missed.\n");
}

static int parse_only(const char *s, unsigned *out)
{
        _cleanup_free_ char *copy = strdup(s);
        char *save = NULL;

        if (!copy)
                return -ENOMEM;
        *out = 0;
        for (char *w = strtok_r(copy, ",", &save); w; w = strtok_r(NULL, ",", &save)) {
                if (strcmp(w, "weights") == 0)
                        *out |= RUN_WEIGHTS;
                else if (strcmp(w, "sizes") == 0)
                        *out |= RUN_SIZES;
                else if (strcmp(w, "interactive") == 0)
                        *out |= RUN_INTERACTIVE;
                else
                        return -EINVAL;
        }
        return *out ? 0 : -EINVAL;
}

static bool parse_num(const char *s, double lo, double hi, double *out)
{
        char *end;
        double v = strtod(s, &end);

        if (end == s || *end || !(v >= lo && v <= hi))
                return false;
        *out = v;
        return true;
}

int main(int argc, char **argv)
{
        static const struct option opts[] = {
                { "model", required_argument, NULL, 'm' },
                { "seconds", required_argument, NULL, 's' },
                { "threads", required_argument, NULL, 't' },
                { "max-running", required_argument, NULL, 'R' },
                { "step-tokens", required_argument, NULL, 'S' },
                { "interval", required_argument, NULL, 'i' },
                { "only", required_argument, NULL, 'o' },
                { "json", no_argument, NULL, 'j' },
                { "check", no_argument, NULL, 'c' },
                { "help", no_argument, NULL, 'h' },
                { 0 }
        };
        struct fb_opts o = { .seconds = 60, .interval = 1, .max_running = 64,
                             .step_tokens = 256,
                             .only = RUN_WEIGHTS | RUN_SIZES | RUN_INTERACTIVE };
        double v;
        int c;

        while ((c = getopt_long(argc, argv, "m:s:t:R:S:i:o:jch", opts, NULL)) != -1) {
                switch (c) {
                case 'm': o.model = optarg; break;
                case 's':
                        if (!parse_num(optarg, 0.5, 86400, &o.seconds))
                                goto bad;
                        break;
                case 't':
                        if (runner_parse_threads(optarg, &o.threads) < 0)
                                goto bad;
                        break;
                case 'R':
                        if (!parse_num(optarg, 1, 65536, &v))
                                goto bad;
                        o.max_running = (int64_t)v;
                        break;
                case 'S':
                        if (!parse_num(optarg, 1, 1 << 20, &v))
                                goto bad;
                        o.step_tokens = (int64_t)v;
                        break;
                case 'i':
                        if (!parse_num(optarg, 0.01, 3600, &o.interval))
                                goto bad;
                        break;
                case 'o':
                        if (parse_only(optarg, &o.only) < 0)
                                goto bad;
                        break;
                case 'j': o.json = true; break;
                case 'c': o.check = true; break;
                case 'h': usage(stdout); return 0;
                default: usage(stderr); return 2;
                }
        }
        if (!o.model || optind != argc) {
                usage(stderr);
                return 2;
        }
        return fairbench(&o);
bad:
        fprintf(stderr, "moed-fairbench: bad option value '%s'\n", optarg);
        usage(stderr);
        return 2;
}
