/* test-quota: policy/quota.c: every limit at, just under and just over its
 * value, the token buckets refilling on an injected clock (partial refill,
 * Retry-After rounding, the per-day bucket), reload by name, in-flight and
 * queued counting, output charged across a limit mid-stream, KV share and
 * the usage counters. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "policy/quota.h"
#include "testutil.h"

struct fake_clock {
        double now, wall;
};

static double fake_now(void *ud) { return ((struct fake_clock *)ud)->now; }
static double fake_wall(void *ud) { return ((struct fake_clock *)ud)->wall; }

static struct fake_clock clk;

static struct quota_book *book(void)
{
        struct quota_clock c = { fake_now, fake_wall, &clk };
        struct quota_book *b;

        clk = (struct fake_clock){ .now = 1000, .wall = 1.7e9 };
        b = quota_book_new(&c);
        assert_non_null(b);
        return b;
}

/* A set with one tenant "name" of the given [Tenant] keys. */
static struct tenant_set *set_of(const char *name, const char *keys)
{
        struct tenant_set *s = tenant_set_new();
        char text[1024];
        struct moerr e = {0};

        assert_non_null(s);
        snprintf(text, sizeof text, "[Tenant]\n%s", keys);
        if (tenant_set_add_text(s, name, text, &e) < 0)
                fail_msg("%s", e.msg);
        return s;
}

static struct quota_usage usage(struct quota_book *b, const char *name)
{
        struct quota_usage u;

        assert_int_equal(quota_usage_find(b, name, &u), 0);
        return u;
}

/* Admission that must pass. */
static struct quota_ticket admit(struct quota_book *b, const struct tenant *t, int64_t prompt,
                                 int64_t max_output, bool queue)
{
        struct quota_ticket tk;
        struct quota_refusal why;
        int r = quota_admit(b, t, NULL, prompt, max_output, queue, &tk, &why);

        if (r < 0)
                fail_msg("refused: %s", why.msg);
        assert_true(tk.live);
        return tk;
}

/* Admission that must fail with r, status, limit and retry. */
static void refused(struct quota_book *b, const struct tenant *t, const char *model,
                    int64_t prompt, int64_t max_output, bool queue, int r, int status,
                    const char *limit, int64_t retry, const char *msg_part)
{
        struct quota_ticket tk;
        struct quota_refusal why;
        struct quota_usage before = {0}, after;

        quota_usage_find(b, t->name, &before);  /* a tenant not seen yet: zeros */
        assert_int_equal(quota_admit(b, t, model, prompt, max_output, queue, &tk, &why), r);
        printf("  %d %s: %s\n", why.status, why.limit, why.msg);
        assert_false(tk.live);
        assert_int_equal(why.status, status);
        assert_string_equal(why.limit, limit);
        assert_int_equal(why.retry_after_s, retry);
        assert_non_null(strstr(why.msg, t->name));
        assert_non_null(strstr(why.msg, msg_part));
        after = usage(b, t->name);
        assert_int_equal(after.refusals, before.refusals + 1);
        assert_int_equal(after.refused[why.reason], before.refused[why.reason] + 1);
        assert_int_equal(after.requests, before.requests);
        assert_int_equal(after.in_flight, before.in_flight);
        assert_int_equal(after.queued, before.queued);
        assert_int_equal(after.prompt_tokens, before.prompt_tokens);
        assert_int_equal(after.minute_used, before.minute_used);
}

static void quota_reason_names_are_the_config_keys(void **state)
{
        static const char *const keys[] = { "MaxConcurrent", "MaxQueued", "TokensPerMinute",
                                            "TokensPerDay", "MaxContext", "MaxOutputTokens",
                                            "Models", "KVShare", "other" };

        (void)state;
        for (int r = 0; r < QUOTA_N_REASONS; r++) {
                assert_string_equal(quota_reason_name(r), keys[r]);
                assert_int_equal(quota_reason_from_name(keys[r]), r);
        }
        assert_int_equal(quota_reason_from_name("maxconcurrent"), -1);
        assert_int_equal(quota_reason_from_name(NULL), -1);
        assert_string_equal(quota_reason_name(QUOTA_N_REASONS), "other");
}

static void quota_unlimited_tenant_passes_everything(void **state)
{
        struct quota_book *b = book();
        struct tenant_set *s = set_of("free", "");
        const struct tenant *t = tenant_set_get(s, 0);
        struct quota_ticket tk[3];
        struct quota_usage u;

        (void)state;
        for (int i = 0; i < 3; i++)
                tk[i] = admit(b, t, 1000000000, 0, true);
        assert_true(tk[0].max_output == TENANT_UNLIMITED);
        assert_true(quota_charge_output(b, &tk[0], 1000000000, NULL));
        u = usage(b, "free");
        assert_int_equal(u.in_flight, 3);
        assert_int_equal(u.queued, 3);
        assert_true(u.minute_left == TENANT_UNLIMITED && u.day_left == TENANT_UNLIMITED);
        assert_int_equal(u.minute_used, 0);
        assert_int_equal(u.prompt_tokens, 3000000000LL);
        for (int i = 0; i < 3; i++)
                quota_release(b, &tk[i], 0);
        u = usage(b, "free");
        assert_int_equal(u.in_flight, 0);
        assert_int_equal(u.queued, 0);
        assert_int_equal(u.requests, 3);
        tenant_set_free(s);
        quota_book_free(b);
}

static void quota_max_concurrent_at_under_over(void **state)
{
        struct quota_book *b = book();
        struct tenant_set *s = set_of("research", "MaxConcurrent=2\n");
        const struct tenant *t = tenant_set_get(s, 0);
        struct quota_ticket a, c;

        (void)state;
        a = admit(b, t, 10, 0, false);          /* under: 1 of 2 */
        admit(b, t, 10, 0, false);              /* at: 2 of 2 */
        refused(b, t, NULL, 10, 0, false, -EAGAIN, 429, "MaxConcurrent", 1,
                "2 requests in flight, its MaxConcurrent=2");
        quota_release(b, &a, 5);
        quota_release(b, &a, 5);                /* twice: no effect */
        assert_int_equal(usage(b, "research").in_flight, 1);
        c = admit(b, t, 10, 0, false);
        assert_int_equal(usage(b, "research").in_flight, 2);
        assert_int_equal(usage(b, "research").completion_tokens, 5);
        quota_release(b, &c, 0);
        tenant_set_free(s);
        quota_book_free(b);
}

static void quota_max_queued_at_under_over(void **state)
{
        struct quota_book *b = book();
        struct tenant_set *s = set_of("research", "MaxQueued=2\n");
        const struct tenant *t = tenant_set_get(s, 0);
        struct quota_ticket q1, q2, q3, run;

        (void)state;
        q1 = admit(b, t, 1, 0, true);           /* under */
        q2 = admit(b, t, 1, 0, true);           /* at */
        assert_true(q1.queued && q2.queued);
        refused(b, t, NULL, 1, 0, true, -EAGAIN, 429, "MaxQueued", 1,
                "2 requests waiting, its MaxQueued=2");
        run = admit(b, t, 1, 0, false);         /* not queueing: no limit */
        assert_false(run.queued);
        assert_int_equal(usage(b, "research").queued, 2);
        assert_int_equal(usage(b, "research").in_flight, 3);
        quota_set_queued(b, &q1, false);        /* q1 starts running */
        quota_set_queued(b, &q1, false);
        assert_int_equal(usage(b, "research").queued, 1);
        q3 = admit(b, t, 1, 0, true);
        quota_set_queued(b, &run, true);        /* preempted: back in the queue */
        assert_int_equal(usage(b, "research").queued, 3);
        quota_release(b, &q2, 0);               /* ends while queued */
        quota_release(b, &run, 0);
        assert_int_equal(usage(b, "research").queued, 1);
        quota_release(b, &q1, 0);
        quota_release(b, &q3, 0);
        assert_int_equal(usage(b, "research").queued, 0);
        assert_int_equal(usage(b, "research").in_flight, 0);
        quota_set_queued(b, &q3, true);         /* released: ignored */
        assert_int_equal(usage(b, "research").queued, 0);
        tenant_set_free(s);
        quota_book_free(b);
}

static void quota_max_context_at_under_over(void **state)
{
        struct quota_book *b = book();
        struct tenant_set *s = set_of("research", "MaxContext=100\n");
        const struct tenant *t = tenant_set_get(s, 0);
        struct quota_ticket tk;

        (void)state;
        tk = admit(b, t, 98, 0, false);         /* under */
        assert_int_equal(tk.max_output, 2);     /* clamped to what is left */
        tk = admit(b, t, 99, 50, false);        /* at: one token of answer */
        assert_int_equal(tk.max_output, 1);
        refused(b, t, NULL, 100, 0, false, -E2BIG, 400, "MaxContext", 0,
                "the prompt is 100 tokens; tenant research has MaxContext=100");
        tk = admit(b, t, 10, 20, false);
        assert_int_equal(tk.max_output, 20);
        tenant_set_free(s);
        quota_book_free(b);
}

static void quota_max_output_refuses_asked_and_clamps_default(void **state)
{
        struct quota_book *b = book();
        struct tenant_set *s = set_of("research", "MaxOutputTokens=50\n");
        const struct tenant *t = tenant_set_get(s, 0);

        (void)state;
        assert_int_equal(admit(b, t, 5, 49, false).max_output, 49);
        assert_int_equal(admit(b, t, 5, 50, false).max_output, 50);
        refused(b, t, NULL, 5, 51, false, -E2BIG, 400, "MaxOutputTokens", 0,
                "max_tokens=51 is over MaxOutputTokens=50");
        assert_int_equal(admit(b, t, 5, 0, false).max_output, 50);
        assert_int_equal(admit(b, t, 5, -1, false).max_output, 50);
        tenant_set_free(s);
        quota_book_free(b);
}

static void quota_models_are_checked(void **state)
{
        struct quota_book *b = book();
        struct tenant_set *s = set_of("research", "Models=m1 m2\n");
        const struct tenant *t = tenant_set_get(s, 0);
        struct quota_ticket tk;
        struct quota_refusal why;

        (void)state;
        assert_int_equal(quota_admit(b, t, "m1", 1, 0, false, &tk, &why), 0);
        assert_int_equal(quota_admit(b, t, "m2", 1, 0, false, &tk, &why), 0);
        assert_int_equal(quota_admit(b, t, NULL, 1, 0, false, &tk, &why), 0);
        refused(b, t, "m3", 1, 0, false, -EACCES, 403, "Models", 0, "may not use model 'm3'");
        tenant_set_free(s);
        quota_book_free(b);
}

static void quota_zero_limits_refuse_with_403(void **state)
{
        struct quota_book *b = book();
        struct tenant_set *s = set_of("none", "MaxConcurrent=0\n");
        struct tenant_set *s2 = set_of("mute", "TokensPerDay=0\n");

        (void)state;
        refused(b, tenant_set_get(s, 0), NULL, 1, 0, false, -EACCES, 403, "MaxConcurrent", 0,
                "MaxConcurrent=0");
        refused(b, tenant_set_get(s2, 0), NULL, 0, 0, false, -EACCES, 403, "TokensPerDay", 0,
                "TokensPerDay=0");
        tenant_set_free(s);
        tenant_set_free(s2);
        quota_book_free(b);
}

/* A size refusal wins over a rate refusal: retrying would not help. */
static void quota_permanent_refusals_come_first(void **state)
{
        struct quota_book *b = book();
        struct tenant_set *s = set_of("research", "MaxConcurrent=1\nMaxContext=10\n");
        const struct tenant *t = tenant_set_get(s, 0);

        (void)state;
        admit(b, t, 1, 0, false);
        refused(b, t, NULL, 10, 0, false, -E2BIG, 400, "MaxContext", 0, "MaxContext=10");
        refused(b, t, NULL, 9, 0, false, -EAGAIN, 429, "MaxConcurrent", 1, "MaxConcurrent=1");
        tenant_set_free(s);
        quota_book_free(b);
}

static void quota_tokens_per_minute_at_under_over(void **state)
{
        struct quota_book *b = book();
        struct tenant_set *s = set_of("research", "TokensPerMinute=1000\n");
        const struct tenant *t = tenant_set_get(s, 0);

        (void)state;
        /* A prompt must leave one token for the answer: 999 fits, 1000 never. */
        refused(b, t, NULL, 1000, 0, false, -E2BIG, 400, "TokensPerMinute", 0,
                "a prompt of 1000 tokens can never pass TokensPerMinute=1000");
        admit(b, t, 998, 0, false);             /* under: needs 999 of 1000 */
        assert_int_equal(usage(b, "research").minute_left, 2);
        admit(b, t, 1, 0, false);               /* at: needs 2 of the 2 left */
        assert_int_equal(usage(b, "research").minute_left, 1);
        assert_int_equal(usage(b, "research").minute_used, 999);
        /* over by one token: 1 token at 1000/60 per second is 0.06 s -> 1 s */
        refused(b, t, NULL, 1, 0, false, -EAGAIN, 429, "TokensPerMinute", 1,
                "needs 2 tokens (a prompt of 1 and one to answer), 1 are left; retry in 1 s");
        admit(b, t, 0, 0, false);               /* needs 1: fits exactly */
        tenant_set_free(s);
        quota_book_free(b);
}

static void quota_bucket_refills_over_time(void **state)
{
        struct quota_book *b = book();
        struct tenant_set *s = set_of("research", "TokensPerMinute=600\n"); /* 10 tokens/s */
        const struct tenant *t = tenant_set_get(s, 0);

        (void)state;
        admit(b, t, 599, 0, false);             /* 1 left */
        /* 99 short of a 100-token need: 9.9 s, rounded up */
        refused(b, t, NULL, 99, 0, false, -EAGAIN, 429, "TokensPerMinute", 10, "retry in 10 s");
        clk.now += 8.0;                         /* partial refill: 81 left */
        assert_int_equal(usage(b, "research").minute_left, 81);
        /* 19 short: exactly 1.9 s -> 2 */
        refused(b, t, NULL, 99, 0, false, -EAGAIN, 429, "TokensPerMinute", 2, "81 are left");
        clk.now += 1.0;                         /* 91 left, 9 short: exactly 0.9 s -> 1 */
        refused(b, t, NULL, 99, 0, false, -EAGAIN, 429, "TokensPerMinute", 1, "91 are left");
        clk.now += 0.9;                         /* exactly 100 */
        admit(b, t, 99, 0, false);
        assert_int_equal(usage(b, "research").minute_left, 1);
        /* A whole multiple of the rate rounds to itself, not one more. */
        refused(b, t, NULL, 20, 0, false, -EAGAIN, 429, "TokensPerMinute", 2, "retry in 2 s");
        /* A full bucket holds its capacity and no more. */
        clk.now += 1e6;
        assert_int_equal(usage(b, "research").minute_left, 600);
        assert_int_equal(usage(b, "research").minute_used, 0);
        admit(b, t, 599, 0, false);
        refused(b, t, NULL, 1, 0, false, -EAGAIN, 429, "TokensPerMinute", 1, "600");
        tenant_set_free(s);
        quota_book_free(b);
}

static void quota_day_bucket_and_the_longer_wait_is_named(void **state)
{
        struct quota_book *b = book();
        /* 0.1 token/s per day, 10 tokens/s per minute */
        struct tenant_set *s = set_of("research", "TokensPerDay=8640\nTokensPerMinute=600\n");
        const struct tenant *t = tenant_set_get(s, 0);
        struct tenant_set *daily = set_of("daily", "TokensPerDay=8640\n");

        (void)state;
        refused(b, tenant_set_get(daily, 0), NULL, 8640, 0, false, -E2BIG, 400, "TokensPerDay",
                0, "can never pass TokensPerDay=8640");
        admit(b, tenant_set_get(daily, 0), 8639, 0, false);
        tenant_set_free(daily);
        for (int i = 0; i < 14; i++) {          /* 14 x 599 = 8386 in 14 minutes */
                admit(b, t, 599, 0, false);
                clk.now += 60;
        }
        /* day: 8386 + 84 (one minute refilled) ... left = 8640 - used */
        {
                struct quota_usage u = usage(b, "research");
                assert_int_equal(u.day_used, 8386 - 84);   /* 840 s of 0.1/s */
                assert_int_equal(u.day_left, 8640 - 8302);
                assert_int_equal(u.minute_left, 600);
        }
        /* 338 left in the day; a 400-token prompt needs 401: 63 short, 630 s */
        refused(b, t, NULL, 400, 0, false, -EAGAIN, 429, "TokensPerDay", 630,
                "TokensPerDay=8640");
        /* Both short: the minute bucket wants 4 s, the day one 2930 s. */
        admit(b, t, 300, 0, false);             /* day 38 left, minute 300 */
        refused(b, t, NULL, 330, 0, false, -EAGAIN, 429, "TokensPerDay", 2930, "retry in 2930 s");
        clk.now += 2930;
        admit(b, t, 330, 0, false);
        tenant_set_free(s);
        quota_book_free(b);
}

static void quota_output_charged_across_the_minute_limit(void **state)
{
        struct quota_book *b = book();
        struct tenant_set *s = set_of("research", "TokensPerMinute=100\n");
        const struct tenant *t = tenant_set_get(s, 0);
        struct quota_ticket tk = admit(b, t, 10, 0, false);
        struct quota_refusal why;
        struct quota_usage u;

        (void)state;
        assert_true(quota_charge_output(b, &tk, 50, &why));
        assert_true(quota_charge_output(b, &tk, 39, &why));     /* 99: one more fits */
        assert_false(quota_charge_output(b, &tk, 1, &why));     /* 100: the next cannot */
        printf("  %s\n", why.msg);
        assert_true(tk.cut);
        assert_string_equal(why.limit, "TokensPerMinute");
        assert_int_equal(why.status, 429);
        assert_int_equal(why.retry_after_s, 1);
        assert_non_null(strstr(why.msg, "TokensPerMinute=100 of tenant research reached after "
                                        "90 tokens"));
        assert_int_equal(tk.output_tokens, 90);
        u = usage(b, "research");
        assert_int_equal(u.limited, 1);
        assert_int_equal(u.completion_tokens, 90);
        assert_int_equal(u.refusals, 0);
        /* Tokens of the same update still arrive: charged, one cut. */
        assert_false(quota_charge_output(b, &tk, 1, &why));
        assert_int_equal(usage(b, "research").limited, 1);
        assert_int_equal(usage(b, "research").completion_tokens, 91);
        /* The engine's final count adds what was not charged yet. */
        quota_release(b, &tk, 92);
        u = usage(b, "research");
        assert_int_equal(u.completion_tokens, 92);
        assert_int_equal(u.minute_used, 102);   /* over by one update: paid back first */
        assert_int_equal(u.minute_left, 0);
        assert_int_equal(u.in_flight, 0);
        /* 102 + 1 - 100 = 3 tokens short: 1.8 s */
        refused(b, t, NULL, 0, 0, false, -EAGAIN, 429, "TokensPerMinute", 2, "retry in 2 s");
        /* Charging a released ticket does nothing. */
        assert_true(quota_charge_output(b, &tk, 1000, &why));
        assert_int_equal(usage(b, "research").completion_tokens, 92);
        tenant_set_free(s);
        quota_book_free(b);
}

static void quota_output_refills_while_streaming(void **state)
{
        struct quota_book *b = book();
        struct tenant_set *s = set_of("research", "TokensPerMinute=60\n"); /* 1 token/s */
        const struct tenant *t = tenant_set_get(s, 0);
        struct quota_ticket tk = admit(b, t, 58, 0, false);
        struct quota_refusal why;

        (void)state;
        /* A slow stream of one token a second never runs dry. */
        for (int i = 0; i < 200; i++) {
                assert_true(quota_charge_output(b, &tk, 1, &why));
                clk.now += 1;
        }
        /* Two a second does, after about as many tokens as were left. */
        for (int i = 0; i < 100; i++) {
                clk.now += 0.5;
                if (!quota_charge_output(b, &tk, 1, &why))
                        break;
                assert_true(i < 99);
        }
        assert_int_equal(usage(b, "research").limited, 1);
        assert_true(tk.output_tokens > 200 && tk.output_tokens < 210);
        quota_release(b, &tk, 0);
        tenant_set_free(s);
        quota_book_free(b);
}

static void quota_reload_keeps_state_by_name(void **state)
{
        struct quota_book *b = book();
        struct tenant_set *s1 = set_of("research", "TokensPerMinute=1000\nMaxConcurrent=1\n");
        struct tenant_set *s2 = set_of("research", "TokensPerMinute=2000\nMaxConcurrent=2\n");
        struct tenant_set *s3 = set_of("research", "TokensPerMinute=500\n");
        struct tenant_set *s4 = set_of("other", "");
        struct tenant_set *s5 = set_of("research", "");
        struct moerr e = {0};
        struct quota_ticket old;
        struct quota_refusal why;
        struct quota_usage u;

        (void)state;
        assert_int_equal(quota_book_reload(b, s1), 0);
        old = admit(b, tenant_set_get(s1, 0), 800, 0, false);  /* 800 of 1000 used */
        refused(b, tenant_set_get(s1, 0), NULL, 1, 0, false, -EAGAIN, 429, "MaxConcurrent", 1,
                "MaxConcurrent=1");
        /* New set: a raised limit keeps what was used; the old set goes away
         * while its request runs. */
        assert_int_equal(tenant_set_add_text(s2, "other", "[Tenant]\n", &e), 0);
        assert_int_equal(quota_book_reload(b, s2), 0);
        tenant_set_free(s1);
        u = usage(b, "research");
        assert_int_equal(u.minute_left, 1200);
        assert_int_equal(u.requests, 1);
        assert_int_equal(u.refusals, 1);
        assert_int_equal(u.in_flight, 1);
        assert_int_equal(quota_usage_count(b), 2);
        assert_int_equal(usage(b, "other").requests, 0);
        admit(b, tenant_set_get(s2, 0), 10, 0, false);          /* MaxConcurrent=2 now */
        /* A lowered limit: 810 used of 500 -> nothing left; the running
         * stream is charged under the new limit. */
        assert_int_equal(quota_book_reload(b, s3), 0);
        assert_int_equal(usage(b, "research").minute_left, 0);
        assert_false(quota_charge_output(b, &old, 1, &why));
        assert_non_null(strstr(why.msg, "TokensPerMinute=500"));
        /* 811 + 1 - 500 = 312 short at 500/60 per second: 37.44 s -> 38 */
        refused(b, tenant_set_get(s3, 0), NULL, 0, 0, false, -EAGAIN, 429, "TokensPerMinute",
                38, "retry in 38 s");
        quota_release(b, &old, 0);
        /* research is gone from the next set: its counters stay. */
        assert_int_equal(quota_book_reload(b, s4), 0);
        u = usage(b, "research");
        assert_int_equal(u.requests, 2);
        assert_int_equal(u.in_flight, 1);
        assert_int_equal(u.completion_tokens, 1);
        /* Unlimited for a while: the bucket forgets what was used. */
        assert_int_equal(quota_book_reload(b, s2), 0);
        assert_int_equal(usage(b, "research").minute_left, 2000 - 811);
        assert_int_equal(quota_book_reload(b, s5), 0);
        assert_true(usage(b, "research").minute_left == TENANT_UNLIMITED);
        assert_int_equal(quota_book_reload(b, s2), 0);
        assert_int_equal(usage(b, "research").minute_left, 2000);
        tenant_set_free(s5);
        tenant_set_free(s2);
        tenant_set_free(s3);
        tenant_set_free(s4);
        quota_book_free(b);
}

static void quota_undo_gives_the_tokens_back(void **state)
{
        struct quota_book *b = book();
        struct tenant_set *s = set_of("research", "TokensPerMinute=100\nMaxQueued=1\n");
        const struct tenant *t = tenant_set_get(s, 0);
        struct quota_ticket tk = admit(b, t, 90, 0, true);
        struct quota_usage u;

        (void)state;
        assert_int_equal(usage(b, "research").minute_left, 10);
        quota_undo(b, &tk);
        quota_undo(b, &tk);
        u = usage(b, "research");
        assert_int_equal(u.minute_left, 100);
        assert_int_equal(u.requests, 0);
        assert_int_equal(u.prompt_tokens, 0);
        assert_int_equal(u.refusals, 1);
        assert_int_equal(u.refused[QUOTA_OTHER], 1);
        assert_int_equal(u.in_flight, 0);
        assert_int_equal(u.queued, 0);
        admit(b, t, 98, 0, true);
        tenant_set_free(s);
        quota_book_free(b);
}

static void quota_kv_share(void **state)
{
        struct tenant_set *s = set_of("half", "KVShare=50%\n");
        struct tenant_set *s2 = set_of("tiny", "KVShare=0.001\n");
        struct tenant_set *s3 = set_of("all", "");
        const struct tenant *t = tenant_set_get(s, 0);
        struct quota_refusal why;

        (void)state;
        assert_int_equal(quota_kv_cap(t, 7), 3);
        assert_int_equal(quota_kv_cap(t, 8), 4);
        assert_int_equal(quota_kv_cap(t, 0), 0);
        assert_int_equal(quota_kv_cap(tenant_set_get(s2, 0), 100), 1);  /* at least one */
        assert_int_equal(quota_kv_cap(tenant_set_get(s3, 0), 12345), 12345);
        /* cap 4 of 8 */
        assert_int_equal(quota_kv_check(t, 8, 0, 3, &why), 0);           /* under */
        assert_int_equal(quota_kv_check(t, 8, 1, 3, &why), 0);           /* at */
        assert_int_equal(quota_kv_check(t, 8, 2, 3, &why), -EAGAIN);     /* over */
        printf("  %s\n", why.msg);
        assert_int_equal(why.status, 429);
        assert_int_equal(why.retry_after_s, 1);
        assert_string_equal(why.limit, "KVShare");
        assert_non_null(strstr(why.msg, "tenant half holds 2 of its 4 KV-cache blocks"));
        assert_int_equal(quota_kv_check(t, 8, 0, 5, &why), -E2BIG);      /* never fits */
        printf("  %s\n", why.msg);
        assert_int_equal(why.status, 400);
        assert_int_equal(why.retry_after_s, 0);
        assert_non_null(strstr(why.msg, "KVShare=50% of 8, 4 blocks"));
        assert_int_equal(quota_kv_check(t, 8, 0, 4, NULL), 0);
        tenant_set_free(s);
        tenant_set_free(s2);
        tenant_set_free(s3);
}

static void quota_usage_lists_every_tenant(void **state)
{
        struct quota_book *b = book();
        struct tenant_set *s = set_of("a", "");
        struct moerr e = {0};
        struct quota_usage u;

        (void)state;
        assert_int_equal(quota_usage_count(b), 0);
        assert_int_equal(quota_usage_get(b, 0, &u), -ERANGE);
        assert_int_equal(quota_usage_find(b, "a", &u), -ENOENT);
        assert_int_equal(tenant_set_add_text(s, "b", "[Tenant]\n", &e), 0);
        assert_int_equal(quota_book_reload(b, s), 0);
        assert_int_equal(quota_count_refusal(b, "c", QUOTA_KV_SHARE), 0);
        assert_int_equal(quota_count_refusal(b, "a", QUOTA_OTHER), 0);
        assert_int_equal(quota_count_refusal(b, "a", QUOTA_N_REASONS + 3), 0);
        assert_int_equal(quota_usage_count(b), 3);
        assert_int_equal(quota_usage_get(b, 0, &u), 0);
        assert_string_equal(u.name, "a");
        assert_int_equal(u.refusals, 2);
        assert_int_equal(u.refused[QUOTA_OTHER], 2);
        assert_int_equal(quota_usage_get(b, 1, &u), 0);
        assert_string_equal(u.name, "b");
        assert_int_equal(u.refusals, 0);
        assert_int_equal(quota_usage_get(b, 2, &u), 0);
        assert_string_equal(u.name, "c");
        assert_int_equal(u.refused[QUOTA_KV_SHARE], 1);
        assert_true(u.minute_left == TENANT_UNLIMITED);        /* limit unknown */
        assert_int_equal(quota_usage_get(b, 3, &u), -ERANGE);
        tenant_set_free(s);
        quota_book_free(b);
}

static void quota_restore_refills_for_the_time_away(void **state)
{
        struct quota_book *b = book();
        struct tenant_set *s = set_of("research", "TokensPerMinute=600\n");
        struct quota_usage saved = { .requests = 7, .refusals = 2, .prompt_tokens = 900,
                                     .completion_tokens = 30, .limited = 1, .minute_used = 500,
                                     .day_used = 930, .in_flight = 99, .queued = 99 };
        struct quota_usage u;

        (void)state;
        saved.refused[QUOTA_MAX_QUEUED] = 2;
        /* Saved 20 s ago; the limit is learnt 10 s later, at the reload. */
        assert_int_equal(quota_restore(b, "research", &saved, 20), 0);
        u = usage(b, "research");
        assert_int_equal(u.minute_used, 500);
        assert_int_equal(u.in_flight, 0);
        assert_int_equal(u.queued, 0);
        assert_true(u.minute_left == TENANT_UNLIMITED);
        clk.now += 10;
        assert_int_equal(quota_book_reload(b, s), 0);
        u = usage(b, "research");
        assert_int_equal(u.minute_used, 200);                  /* 30 s at 10/s */
        assert_int_equal(u.minute_left, 400);
        assert_int_equal(u.day_used, 0);                       /* unlimited per day */
        assert_int_equal(u.requests, 7);
        assert_int_equal(u.refused[QUOTA_MAX_QUEUED], 2);
        assert_int_equal(u.limited, 1);
        /* Restored after the reload: refills at the known rate. */
        assert_int_equal(quota_restore(b, "research", &saved, 5), 0);
        assert_int_equal(usage(b, "research").minute_used, 450);
        tenant_set_free(s);
        quota_book_free(b);
}

static void quota_default_clock_is_monotonic(void **state)
{
        struct quota_book *b = quota_book_new(NULL);
        double a, c;

        (void)state;
        assert_non_null(b);
        a = quota_book_now(b);
        c = quota_book_now(b);
        assert_true(c >= a && a > 0);
        assert_true(quota_book_wall(b) > 1.6e9);
        quota_book_free(b);
        quota_book_free(NULL);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(quota_reason_names_are_the_config_keys),
                cmocka_unit_test(quota_unlimited_tenant_passes_everything),
                cmocka_unit_test(quota_max_concurrent_at_under_over),
                cmocka_unit_test(quota_max_queued_at_under_over),
                cmocka_unit_test(quota_max_context_at_under_over),
                cmocka_unit_test(quota_max_output_refuses_asked_and_clamps_default),
                cmocka_unit_test(quota_models_are_checked),
                cmocka_unit_test(quota_zero_limits_refuse_with_403),
                cmocka_unit_test(quota_permanent_refusals_come_first),
                cmocka_unit_test(quota_tokens_per_minute_at_under_over),
                cmocka_unit_test(quota_bucket_refills_over_time),
                cmocka_unit_test(quota_day_bucket_and_the_longer_wait_is_named),
                cmocka_unit_test(quota_output_charged_across_the_minute_limit),
                cmocka_unit_test(quota_output_refills_while_streaming),
                cmocka_unit_test(quota_reload_keeps_state_by_name),
                cmocka_unit_test(quota_undo_gives_the_tokens_back),
                cmocka_unit_test(quota_kv_share),
                cmocka_unit_test(quota_usage_lists_every_tenant),
                cmocka_unit_test(quota_restore_refills_for_the_time_away),
                cmocka_unit_test(quota_default_clock_is_monotonic),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
