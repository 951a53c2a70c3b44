/* quota.c: the per-tenant admission checks, token buckets and usage
 * counters behind quota.h. A book is a small array of entries found by
 * name: a daemon has tens of tenants, not thousands, and a slot index that
 * never moves is what lets a ticket outlive a reload. */
#include "quota.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/cleanup.h"

/* Shortfalls below this are rounding in the refill arithmetic, not a
 * missing token. */
#define TOKEN_EPS 1e-6

/* A bucket restored from disk before its tenant's limit is known. */
#define CAP_UNKNOWN (-1)

enum { MINUTE, DAY, N_BUCKETS };

static const double bucket_period[N_BUCKETS] = { 60, 86400 };
static const enum quota_reason bucket_reason[N_BUCKETS] = {
        QUOTA_TOKENS_PER_MINUTE, QUOTA_TOKENS_PER_DAY,
};

/* Kept as the tokens taken and not yet refilled rather than the tokens
 * left, so that a changed limit keeps what was used (see quota.h). */
struct bucket {
        double used;        /* may exceed cap by one update's tokens */
        double t;           /* when used was last brought up to date */
        int64_t cap;        /* the limit it refills at, or CAP_UNKNOWN */
};

struct entry {
        char *name;
        struct quota_usage u;   /* the counters; name, left and used filled on read */
        struct bucket k[N_BUCKETS];
};

struct quota_book {
        struct quota_clock clock;
        struct entry *e;
        size_t n;
};

static const char *const reason_names[QUOTA_N_REASONS] = {
        [QUOTA_MAX_CONCURRENT] = "MaxConcurrent",
        [QUOTA_MAX_QUEUED] = "MaxQueued",
        [QUOTA_TOKENS_PER_MINUTE] = "TokensPerMinute",
        [QUOTA_TOKENS_PER_DAY] = "TokensPerDay",
        [QUOTA_MAX_CONTEXT] = "MaxContext",
        [QUOTA_MAX_OUTPUT] = "MaxOutputTokens",
        [QUOTA_MODELS] = "Models",
        [QUOTA_KV_SHARE] = "KVShare",
        [QUOTA_OTHER] = "other",
};

const char *quota_reason_name(enum quota_reason r)
{
        return (unsigned)r < QUOTA_N_REASONS ? reason_names[r] : "other";
}

int quota_reason_from_name(const char *name)
{
        for (int i = 0; name && i < QUOTA_N_REASONS; i++)
                if (!strcmp(reason_names[i], name))
                        return i;
        return -1;
}

/* ---- clocks ------------------------------------------------------------ */

static double clock_read(clockid_t id)
{
        struct timespec ts;

        clock_gettime(id, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

double quota_book_now(const struct quota_book *b)
{
        return b->clock.now ? b->clock.now(b->clock.ud) : clock_read(CLOCK_MONOTONIC);
}

double quota_book_wall(const struct quota_book *b)
{
        return b->clock.wall ? b->clock.wall(b->clock.ud) : clock_read(CLOCK_REALTIME);
}

/* ---- buckets ----------------------------------------------------------- */

static int64_t tenant_cap(const struct tenant *t, int k)
{
        return k == MINUTE ? t->tokens_per_minute : t->tokens_per_day;
}

/* What the bucket holds as taken at time now, refilled at the limit it had
 * (a restored bucket whose limit is not known yet refills at cap). */
static double bucket_used(const struct bucket *k, int64_t cap, double period, double now)
{
        int64_t was = k->cap == CAP_UNKNOWN ? cap : k->cap;

        if (was == TENANT_UNLIMITED)
                return 0;
        if (was == CAP_UNKNOWN || now <= k->t)
                return k->used;
        return fmax(0, k->used - (now - k->t) * (double)was / period);
}

/* Brings the bucket up to now under its old limit, then takes cap. */
static void bucket_touch(struct bucket *k, int64_t cap, double period, double now)
{
        if (cap == CAP_UNKNOWN && k->cap == CAP_UNKNOWN)
                return; /* no rate yet: the time since the restore keeps counting */
        k->used = bucket_used(k, cap, period, now);
        k->t = now;
        k->cap = cap;
        if (cap == TENANT_UNLIMITED)
                k->used = 0;
}

static void bucket_take(struct bucket *k, double n)
{
        if (k->cap != TENANT_UNLIMITED && k->cap != CAP_UNKNOWN)
                k->used = fmax(0, k->used + n);
}

/* Whole seconds until the bucket has refilled deficit tokens: rounded up,
 * at least 1 (a client told 0 would retry at once and fail again). */
static int64_t refill_wait(double deficit, int64_t cap, double period)
{
        double s = ceil(deficit * period / (double)cap - TOKEN_EPS);

        if (s < 1)
                return 1;
        return s > 1e15 ? (int64_t)1e15 : (int64_t)s;
}

/* ---- entries ----------------------------------------------------------- */

struct quota_book *quota_book_new(const struct quota_clock *clock)
{
        struct quota_book *b = calloc(1, sizeof *b);

        if (b && clock)
                b->clock = *clock;
        return b;
}

void quota_book_free(struct quota_book *b)
{
        if (!b)
                return;
        for (size_t i = 0; i < b->n; i++)
                free(b->e[i].name);
        free(b->e);
        free(b);
}

static struct entry *entry_find(const struct quota_book *b, const char *name)
{
        for (size_t i = 0; name && i < b->n; i++)
                if (!strcmp(b->e[i].name, name))
                        return &b->e[i];
        return NULL;
}

/* The entry of name, created (buckets full, limits unknown) when new. */
static struct entry *entry_get(struct quota_book *b, const char *name)
{
        struct entry *e = entry_find(b, name), *ne;

        if (e || !name)
                return e;
        if (!(ne = realloc(b->e, (b->n + 1) * sizeof *ne)))
                return NULL;
        b->e = ne;
        e = &b->e[b->n];
        memset(e, 0, sizeof *e);
        if (!(e->name = strdup(name)))
                return NULL;
        for (int k = 0; k < N_BUCKETS; k++)
                e->k[k] = (struct bucket){ .t = quota_book_now(b), .cap = CAP_UNKNOWN };
        b->n++;
        return e;
}

static void entry_touch(struct quota_book *b, struct entry *e, const struct tenant *t)
{
        double now = quota_book_now(b);

        for (int k = 0; k < N_BUCKETS; k++)
                bucket_touch(&e->k[k], tenant_cap(t, k), bucket_period[k], now);
}

/* Up to now under the limits the entry already has. */
static void entry_refill(struct quota_book *b, struct entry *e)
{
        double now = quota_book_now(b);

        for (int k = 0; k < N_BUCKETS; k++)
                bucket_touch(&e->k[k], e->k[k].cap, bucket_period[k], now);
}

int quota_book_reload(struct quota_book *b, const struct tenant_set *s)
{
        for (size_t i = 0; i < tenant_set_count(s); i++) {
                const struct tenant *t = tenant_set_get(s, i);
                struct entry *e = entry_get(b, t->name);

                if (!e)
                        return -ENOMEM;
                entry_touch(b, e, t);
        }
        return 0;
}

/* ---- admission --------------------------------------------------------- */

__attribute__((format(printf, 5, 0)))
static void refusal_set(struct quota_refusal *why, enum quota_reason r, int status,
                        int64_t retry, const char *fmt, va_list ap)
{
        if (!why)
                return;
        why->reason = r;
        why->limit = quota_reason_name(r);
        why->status = status;
        why->retry_after_s = retry;
        vsnprintf(why->msg, sizeof why->msg, fmt, ap);
}

__attribute__((format(printf, 7, 8)))
static int refuse(struct entry *e, struct quota_refusal *why, int ret, enum quota_reason r,
                  int status, int64_t retry, const char *fmt, ...)
{
        va_list ap;

        e->u.refusals++;
        e->u.refused[r]++;
        va_start(ap, fmt);
        refusal_set(why, r, status, retry, fmt, ap);
        va_end(ap);
        return ret;
}

/* The checks that waiting cannot cure. */
static int admit_size(struct entry *e, const struct tenant *t, const char *model,
                      int64_t prompt, int64_t max_output, struct quota_refusal *why)
{
        const char *n = t->name;

        if (model && !tenant_allows_model(t, model))
                return refuse(e, why, -EACCES, QUOTA_MODELS, 403, 0,
                              "tenant %s may not use model '%s' (Models=)", n, model);
        if (t->max_context != TENANT_UNLIMITED && prompt >= t->max_context)
                return refuse(e, why, -E2BIG, QUOTA_MAX_CONTEXT, 400, 0,
                              "the prompt is %lld tokens; tenant %s has MaxContext=%lld "
                              "(prompt and answer), so at most %lld for the prompt",
                              (long long)prompt, n, (long long)t->max_context,
                              (long long)(t->max_context > 0 ? t->max_context - 1 : 0));
        if (max_output > t->max_output)
                return refuse(e, why, -E2BIG, QUOTA_MAX_OUTPUT, 400, 0,
                              "max_tokens=%lld is over MaxOutputTokens=%lld of tenant %s",
                              (long long)max_output, (long long)t->max_output, n);
        if (t->max_concurrent == 0)
                return refuse(e, why, -EACCES, QUOTA_MAX_CONCURRENT, 403, 0,
                              "tenant %s may run no requests (MaxConcurrent=0)", n);
        for (int k = 0; k < N_BUCKETS; k++) {
                int64_t cap = tenant_cap(t, k);
                const char *key = quota_reason_name(bucket_reason[k]);

                if (cap == 0)
                        return refuse(e, why, -EACCES, bucket_reason[k], 403, 0,
                                      "tenant %s may use no tokens (%s=0)", n, key);
                if (cap != TENANT_UNLIMITED && prompt >= cap)
                        return refuse(e, why, -E2BIG, bucket_reason[k], 400, 0,
                                      "a prompt of %lld tokens can never pass %s=%lld of "
                                      "tenant %s (it needs one more token for the answer)",
                                      (long long)prompt, key, (long long)cap, n);
        }
        return 0;
}

/* The checks that waiting cures: slots, then the buckets. */
static int admit_rate(struct entry *e, const struct tenant *t, int64_t prompt, bool will_queue,
                      struct quota_refusal *why)
{
        double need = (double)prompt + 1;
        int64_t worst_wait = 0;
        int worst = -1;

        if (e->u.in_flight >= t->max_concurrent)
                return refuse(e, why, -EAGAIN, QUOTA_MAX_CONCURRENT, 429, 1,
                              "tenant %s has %lld requests in flight, its MaxConcurrent=%lld; "
                              "retry when one ends", t->name, (long long)e->u.in_flight,
                              (long long)t->max_concurrent);
        if (will_queue && e->u.queued >= t->max_queued)
                return refuse(e, why, -EAGAIN, QUOTA_MAX_QUEUED, 429, 1,
                              "tenant %s has %lld requests waiting, its MaxQueued=%lld",
                              t->name, (long long)e->u.queued, (long long)t->max_queued);
        for (int k = 0; k < N_BUCKETS; k++) {
                int64_t cap = e->k[k].cap, wait;
                double over = e->k[k].used + need - (double)cap;

                if (cap == TENANT_UNLIMITED || over <= TOKEN_EPS)
                        continue;
                if ((wait = refill_wait(over, cap, bucket_period[k])) > worst_wait) {
                        worst_wait = wait;
                        worst = k;
                }
        }
        if (worst >= 0) {
                int64_t cap = e->k[worst].cap;
                double left = fmax(0, (double)cap - e->k[worst].used);

                return refuse(e, why, -EAGAIN, bucket_reason[worst], 429, worst_wait,
                              "tenant %s has used its %s=%lld: the request needs %lld tokens "
                              "(a prompt of %lld and one to answer), %lld are left; retry in "
                              "%lld s", t->name, quota_reason_name(bucket_reason[worst]),
                              (long long)cap, (long long)prompt + 1, (long long)prompt,
                              (long long)floor(left + TOKEN_EPS), (long long)worst_wait);
        }
        return 0;
}

int quota_admit(struct quota_book *b, const struct tenant *t, const char *model,
                int64_t prompt_tokens, int64_t max_output, bool will_queue,
                struct quota_ticket *tk, struct quota_refusal *why)
{
        struct entry *e;
        int64_t prompt = MO_MAX(prompt_tokens, 0), out;
        int r;

        if (why)
                memset(why, 0, sizeof *why);
        memset(tk, 0, sizeof *tk);
        if (!(e = entry_get(b, t->name))) {
                if (why) {
                        why->reason = QUOTA_OTHER;
                        why->limit = quota_reason_name(QUOTA_OTHER);
                        why->status = 500;
                        snprintf(why->msg, sizeof why->msg, "out of memory");
                }
                return -ENOMEM;
        }
        entry_touch(b, e, t);
        if ((r = admit_size(e, t, model, prompt, max_output, why)) < 0 ||
            (r = admit_rate(e, t, prompt, will_queue, why)) < 0)
                return r;
        for (int k = 0; k < N_BUCKETS; k++)
                bucket_take(&e->k[k], (double)prompt);
        e->u.in_flight++;
        e->u.queued += will_queue;
        e->u.requests++;
        e->u.prompt_tokens += prompt;
        out = max_output > 0 ? max_output : t->max_output;
        if (t->max_context != TENANT_UNLIMITED)
                out = MO_MIN(out, t->max_context - prompt);
        *tk = (struct quota_ticket){
                .slot = (size_t)(e - b->e),
                .prompt_tokens = prompt,
                .max_output = out,
                .queued = will_queue,
                .live = true,
        };
        return 0;
}

static struct entry *ticket_entry(struct quota_book *b, const struct quota_ticket *tk)
{
        return tk && tk->live && tk->slot < b->n ? &b->e[tk->slot] : NULL;
}

void quota_set_queued(struct quota_book *b, struct quota_ticket *tk, bool queued)
{
        struct entry *e = ticket_entry(b, tk);

        if (!e || tk->queued == queued)
                return;
        e->u.queued += queued ? 1 : -1;
        tk->queued = queued;
}

bool quota_charge_output(struct quota_book *b, struct quota_ticket *tk, int64_t n,
                         struct quota_refusal *why)
{
        struct entry *e = ticket_entry(b, tk);
        int64_t wait = 0;
        int worst = -1;

        if (!e)
                return true;
        entry_refill(b, e);
        if (n > 0) {
                for (int k = 0; k < N_BUCKETS; k++)
                        bucket_take(&e->k[k], (double)n);
                tk->output_tokens += n;
                e->u.completion_tokens += n;
        }
        for (int k = 0; k < N_BUCKETS; k++) {
                int64_t cap = e->k[k].cap, w;
                double over = e->k[k].used + 1 - (double)cap;

                if (cap == TENANT_UNLIMITED || cap == CAP_UNKNOWN || over <= TOKEN_EPS)
                        continue;
                if ((w = refill_wait(over, cap, bucket_period[k])) > wait) {
                        wait = w;
                        worst = k;
                }
        }
        if (worst < 0)
                return true;
        if (!tk->cut)
                e->u.limited++;
        tk->cut = true;
        if (why) {
                memset(why, 0, sizeof *why);
                why->reason = bucket_reason[worst];
                why->limit = quota_reason_name(why->reason);
                why->status = 429;
                why->retry_after_s = wait;
                snprintf(why->msg, sizeof why->msg,
                         "%s=%lld of tenant %s reached after %lld tokens of this answer; "
                         "more in %lld s", why->limit, (long long)e->k[worst].cap, e->name,
                         (long long)tk->output_tokens, (long long)wait);
        }
        return false;
}

void quota_release(struct quota_book *b, struct quota_ticket *tk, int64_t completion_tokens)
{
        struct entry *e = ticket_entry(b, tk);
        int64_t rest;

        if (!e)
                return;
        entry_refill(b, e);
        rest = completion_tokens - tk->output_tokens;
        if (rest > 0) {
                for (int k = 0; k < N_BUCKETS; k++)
                        bucket_take(&e->k[k], (double)rest);
                tk->output_tokens += rest;
                e->u.completion_tokens += rest;
        }
        e->u.in_flight--;
        if (tk->queued)
                e->u.queued--;
        tk->queued = false;
        tk->live = false;
}

void quota_undo(struct quota_book *b, struct quota_ticket *tk)
{
        struct entry *e = ticket_entry(b, tk);
        int64_t back;

        if (!e)
                return;
        entry_refill(b, e);
        back = tk->prompt_tokens + tk->output_tokens;
        for (int k = 0; k < N_BUCKETS; k++)
                bucket_take(&e->k[k], -(double)back);
        e->u.requests--;
        e->u.prompt_tokens -= tk->prompt_tokens;
        e->u.completion_tokens -= tk->output_tokens;
        e->u.refusals++;
        e->u.refused[QUOTA_OTHER]++;
        e->u.in_flight--;
        if (tk->queued)
                e->u.queued--;
        tk->queued = false;
        tk->live = false;
}

int quota_count_refusal(struct quota_book *b, const char *name, enum quota_reason r)
{
        struct entry *e = entry_get(b, name);

        if (!e)
                return -ENOMEM;
        if ((unsigned)r >= QUOTA_N_REASONS)
                r = QUOTA_OTHER;
        e->u.refusals++;
        e->u.refused[r]++;
        return 0;
}

/* ---- KV share ---------------------------------------------------------- */

int64_t quota_kv_cap(const struct tenant *t, int64_t blocks_total)
{
        double cap;

        if (blocks_total <= 0)
                return 0;
        cap = floor(t->kv_share * (double)blocks_total);
        if (cap < 1)
                return 1;
        return cap >= (double)blocks_total ? blocks_total : (int64_t)cap;
}

int quota_kv_check(const struct tenant *t, int64_t blocks_total, int64_t blocks_used,
                   int64_t blocks_wanted, struct quota_refusal *why)
{
        int64_t cap = quota_kv_cap(t, blocks_total);
        double pct = t->kv_share * 100;

        if (why)
                memset(why, 0, sizeof *why);
        if (blocks_wanted > cap) {
                if (why) {
                        why->reason = QUOTA_KV_SHARE;
                        why->limit = quota_reason_name(QUOTA_KV_SHARE);
                        why->status = 400;
                        snprintf(why->msg, sizeof why->msg,
                                 "the request needs %lld KV-cache blocks; tenant %s may hold "
                                 "KVShare=%g%% of %lld, %lld blocks", (long long)blocks_wanted,
                                 t->name, pct, (long long)blocks_total, (long long)cap);
                }
                return -E2BIG;
        }
        if (blocks_used > cap - blocks_wanted) {
                if (why) {
                        why->reason = QUOTA_KV_SHARE;
                        why->limit = quota_reason_name(QUOTA_KV_SHARE);
                        why->status = 429;
                        why->retry_after_s = 1;
                        snprintf(why->msg, sizeof why->msg,
                                 "tenant %s holds %lld of its %lld KV-cache blocks "
                                 "(KVShare=%g%%) and the request needs %lld more",
                                 t->name, (long long)blocks_used, (long long)cap, pct,
                                 (long long)blocks_wanted);
                }
                return -EAGAIN;
        }
        return 0;
}

/* ---- usage ------------------------------------------------------------- */

size_t quota_usage_count(const struct quota_book *b)
{
        return b->n;
}

static void entry_usage(const struct quota_book *b, const struct entry *e,
                        struct quota_usage *u)
{
        double now = quota_book_now(b);

        *u = e->u;
        u->name = e->name;
        for (int k = 0; k < N_BUCKETS; k++) {
                const struct bucket *bk = &e->k[k];
                double used = bucket_used(bk, bk->cap, bucket_period[k], now);
                int64_t left = TENANT_UNLIMITED;

                if (bk->cap != TENANT_UNLIMITED && bk->cap != CAP_UNKNOWN)
                        left = (int64_t)floor(fmax(0, (double)bk->cap - used + TOKEN_EPS));
                used = ceil(used - TOKEN_EPS);
                if (k == MINUTE) {
                        u->minute_left = left;
                        u->minute_used = used > 0 ? (int64_t)used : 0;
                } else {
                        u->day_left = left;
                        u->day_used = used > 0 ? (int64_t)used : 0;
                }
        }
}

int quota_usage_get(const struct quota_book *b, size_t i, struct quota_usage *u)
{
        if (i >= b->n)
                return -ERANGE;
        entry_usage(b, &b->e[i], u);
        return 0;
}

int quota_usage_find(const struct quota_book *b, const char *name, struct quota_usage *u)
{
        const struct entry *e = entry_find(b, name);

        if (!e)
                return -ENOENT;
        entry_usage(b, e, u);
        return 0;
}

int quota_restore(struct quota_book *b, const char *name, const struct quota_usage *u,
                  double age_s)
{
        struct entry *e = entry_get(b, name);
        double now = quota_book_now(b);
        int64_t in_flight, queued;

        if (!e)
                return -ENOMEM;
        in_flight = e->u.in_flight;
        queued = e->u.queued;
        e->u = *u;
        e->u.name = NULL;
        e->u.in_flight = in_flight;
        e->u.queued = queued;
        e->k[MINUTE].used = (double)MO_MAX(u->minute_used, 0);
        e->k[DAY].used = (double)MO_MAX(u->day_used, 0);
        for (int k = 0; k < N_BUCKETS; k++) {
                e->k[k].t = now - fmax(0, age_s);
                /* A bucket known to be unlimited takes the debt too: the
                 * limit may come back before the debt would have refilled. */
                if (e->k[k].cap == TENANT_UNLIMITED)
                        e->k[k].cap = CAP_UNKNOWN;
        }
        return 0;
}
