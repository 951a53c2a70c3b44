/* quota: how much each tenant may use and how much it has used. Pure
 * policy (no sockets, no engine, time from an injectable clock): the door
 * asks quota_admit() before a request reaches the engine, charges tokens
 * as they are generated and releases the request at its end. Counters are
 * kept by tenant name in a quota_book, so they survive a reload (and are
 * saved across restarts by policy/usage-store.c).
 *
 * Tokens: prompt and completion tokens are drawn from two token buckets
 * per tenant, one per minute (capacity TokensPerMinute, refilled at
 * TokensPerMinute/60 per second) and one per day (TokensPerDay, refilled at
 * TokensPerDay/86400 per second); both start full. The prompt is charged at
 * admission, which needs both buckets to hold prompt_tokens + 1 (room for
 * at least one answer token); completion tokens are charged as they are
 * generated, and a stream whose next token no longer fits ends with
 * finish "length" (quota_charge_output says so). A bucket may go below
 * zero by the tokens of one update; it pays that back before it admits.
 *
 * Order of checks in quota_admit: first what waiting can never cure
 * (Models, MaxContext, MaxOutputTokens, a zero limit, a prompt larger than
 * a bucket), then what it can (MaxConcurrent, MaxQueued, then the token
 * buckets; when both buckets are short, the one with the longer wait is
 * named), so a client is never told to retry a request that cannot pass.
 *
 * MaxOutputTokens: a client that asks for more (max_tokens over the limit)
 * is refused with 400; a client that asks for nothing gets the limit as its
 * ceiling (the ticket's max_output). MaxContext bounds prompt + output: the
 * prompt must be shorter than MaxContext, and max_output is clamped to what
 * is left of it.
 *
 * Reload: quota_book_reload() with the new tenant set; the state of a name
 * that remains is kept and the new limits apply from then on, to new
 * requests and to the tokens running streams still generate. Tokens used
 * carry over a changed limit: a tenant that used 800 of 1000 and gets 2000
 * has 1200 left. Names that disappear keep their counters (the tenant may
 * come back). Tickets hold no tenant pointer, so a running request outlives
 * the tenant set it was admitted under.
 *
 * Not thread-safe: one thread (the daemon's event loop) owns a book. */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "policy/tenant.h"

/* Time, in seconds. now: monotonic, for the buckets (NULL: CLOCK_MONOTONIC).
 * wall: Unix time, only to age the buckets saved across a restart (NULL:
 * CLOCK_REALTIME). */
struct quota_clock {
        double (*now)(void *ud);
        double (*wall)(void *ud);
        void *ud;
};

/* Why a request was refused or cut short; the names are the config keys. */
enum quota_reason {
        QUOTA_MAX_CONCURRENT,     /* "MaxConcurrent" */
        QUOTA_MAX_QUEUED,         /* "MaxQueued" */
        QUOTA_TOKENS_PER_MINUTE,  /* "TokensPerMinute" */
        QUOTA_TOKENS_PER_DAY,     /* "TokensPerDay" */
        QUOTA_MAX_CONTEXT,        /* "MaxContext" */
        QUOTA_MAX_OUTPUT,         /* "MaxOutputTokens" */
        QUOTA_MODELS,             /* "Models" */
        QUOTA_KV_SHARE,           /* "KVShare" */
        QUOTA_OTHER,              /* "other": not a quota (bad input, no such model) */
        QUOTA_N_REASONS,
};
const char *quota_reason_name(enum quota_reason r);
/* The reason of a name from quota_reason_name(), or -1. */
int quota_reason_from_name(const char *name);

struct quota_refusal {
        enum quota_reason reason;
        const char *limit;        /* quota_reason_name(reason) */
        char msg[256];            /* names the tenant, the limit and the numbers */
        int64_t retry_after_s;    /* for Retry-After; 0: waiting will not help */
        int status;               /* HTTP status: 429 (rate, concurrency), 400, 403 */
};

/* One admitted request, kept by the caller (in its request) until
 * quota_release() or quota_undo(). */
struct quota_ticket {
        size_t slot;              /* the tenant's entry in the book (private) */
        int64_t prompt_tokens;
        int64_t max_output;       /* ceiling on output tokens (TENANT_UNLIMITED: none);
                                     the caller takes the smaller of it and its own */
        int64_t output_tokens;    /* charged so far */
        bool queued;              /* counted in the tenant's queue */
        bool cut;                 /* quota_charge_output() has said false */
        bool live;                /* admitted, not yet released */
};

struct quota_book;

/* clock may be NULL (the system clocks); it is copied. NULL: out of memory. */
struct quota_book *quota_book_new(const struct quota_clock *clock);
void quota_book_free(struct quota_book *b);
/* Applies a new tenant set (see "Reload" above); every tenant of s gets an
 * entry, so usage lists it even before its first request. -ENOMEM. */
int quota_book_reload(struct quota_book *b, const struct tenant_set *s);
/* The book's clocks. */
double quota_book_now(const struct quota_book *b);
double quota_book_wall(const struct quota_book *b);

/* Admission of one request of tenant t for model (NULL: not checked here)
 * with a prompt of prompt_tokens. max_output: the client's max_tokens, or
 * <= 0 when it gave none. will_queue: the request will wait for the engine
 * rather than run at once.
 * In flight are all of a tenant's admitted requests not yet released,
 * waiting or running: MaxConcurrent bounds them all, MaxQueued those among
 * them that wait (MaxConcurrent=4 MaxQueued=1: four at most, and of these
 * at most one waiting for the engine; MaxQueued=0: 429 rather than wait).
 * The caller says when a request starts running (quota_set_queued). On
 * success (0) the request is
 * counted in flight (and queued), its prompt charged, *tk filled. Else
 * nothing is charged, a refusal is counted and *why says why:
 * -EAGAIN  429, waiting helps (MaxConcurrent, MaxQueued, the buckets);
 * -E2BIG   400, the request is too large (MaxContext, MaxOutputTokens, a
 *          prompt no bucket can ever hold);
 * -EACCES  403 (Models; a limit of 0);
 * -ENOMEM  500. */
int quota_admit(struct quota_book *b, const struct tenant *t, const char *model,
                int64_t prompt_tokens, int64_t max_output, bool will_queue,
                struct quota_ticket *tk, struct quota_refusal *why);
/* The request started running (false) or went back to waiting (true). */
void quota_set_queued(struct quota_book *b, struct quota_ticket *tk, bool queued);
/* Charges n generated tokens. false: the tenant's buckets cannot pay for
 * one more token; the caller ends the stream with finish "length" and
 * why->msg ("TokensPerMinute=20000 of tenant research reached ..."), and
 * the cut is counted once per request (quota_usage.limited). The tokens are
 * charged either way: they were generated. */
bool quota_charge_output(struct quota_book *b, struct quota_ticket *tk, int64_t n,
                         struct quota_refusal *why);
/* The request ended. completion_tokens: the engine's final count; what
 * quota_charge_output() has not seen yet is charged now. Idempotent. */
void quota_release(struct quota_book *b, struct quota_ticket *tk, int64_t completion_tokens);
/* Takes back an admission the caller could not carry out (the engine
 * refused the request): tokens go back to the buckets, the request counts
 * as refused (reason QUOTA_OTHER) instead of accepted. */
void quota_undo(struct quota_book *b, struct quota_ticket *tk);
/* Counts a refusal decided outside quota_admit (unknown model, bad input,
 * KVShare) for tenant name. -ENOMEM. */
int quota_count_refusal(struct quota_book *b, const char *name, enum quota_reason r);

/* KVShare: the most KV-cache blocks tenant t may hold out of blocks_total:
 * kv_share * blocks_total rounded down, but at least one block (a share
 * too small for a block would lock the tenant out without a word). */
int64_t quota_kv_cap(const struct tenant *t, int64_t blocks_total);
/* May t take blocks_wanted more blocks while it holds blocks_used? 0 yes;
 * -EAGAIN (429, once its other requests end) or -E2BIG (400, more than its
 * cap even alone) with *why. Counts nothing: see quota_count_refusal(). */
int quota_kv_check(const struct tenant *t, int64_t blocks_total, int64_t blocks_used,
                   int64_t blocks_wanted, struct quota_refusal *why);

/* Usage of one tenant, for /v1/moed/usage, metrics and the usage store. */
struct quota_usage {
        const char *name;         /* valid until the book next changes */
        int64_t requests;         /* admitted */
        int64_t refusals;         /* all reasons */
        int64_t refused[QUOTA_N_REASONS];
        int64_t prompt_tokens, completion_tokens;
        int64_t limited;          /* streams ended early by a token bucket */
        int64_t in_flight, queued;
        int64_t minute_left, day_left; /* tokens in the buckets now (TENANT_UNLIMITED:
                                          no limit known) */
        int64_t minute_used, day_used; /* tokens the buckets have yet to refill */
};
size_t quota_usage_count(const struct quota_book *b);
/* Entries in the order tenants were first seen. -ERANGE past the end. */
int quota_usage_get(const struct quota_book *b, size_t i, struct quota_usage *u);
/* -ENOENT when the book has no such name. */
int quota_usage_find(const struct quota_book *b, const char *name, struct quota_usage *u);
/* Puts saved usage back (policy/usage-store.c): the counters of u and the
 * buckets' minute_used and day_used as they were age_s seconds ago (they
 * refill for that time at the rate of the tenant's limits once known). In
 * flight and queued are left alone. Replaces what the name had. -ENOMEM. */
int quota_restore(struct quota_book *b, const char *name, const struct quota_usage *u,
                  double age_s);
