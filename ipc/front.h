/* front: what both doors (HTTP and D-Bus) share, so a feature exists on
 * both. It maps a caller to a tenant (policy/), checks a parsed request
 * against the models and limits, renders and tokenizes it, submits it to
 * the engine, routes the engine's updates back to the door's sink, and
 * keeps the counters that /metrics, status and usage report.
 *
 * Main-loop thread only. */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <jansson.h>

#include "engine/api.h"
#include "ipc/openai.h"
#include "policy/tenant.h"

struct front;
struct front_req;

enum front_door { FRONT_HTTP, FRONT_DBUS };
const char *front_door_name(enum front_door d);

/* Who is calling, as the door established it (SO_PEERCRED/SO_PEERGROUPS,
 * or the bus's sender credentials). */
struct front_caller {
        enum front_door door;
        uid_t uid;
        gid_t gid;
        pid_t pid;
        const gid_t *groups;      /* supplementary groups */
        size_t n_groups;
        const char *bearer;       /* raw bearer token, or NULL */
};

/* A refusal, in the shapes both doors need. */
struct front_error {
        struct oai_error oai;     /* HTTP status and OpenAI error object */
        const char *dbus_name;    /* "org.moed.Error.InvalidArgument", ... */
        int retry_after_s;        /* > 0: send Retry-After */
};
#define FRONT_ERR_ACCESS "org.moed.Error.AccessDenied"
#define FRONT_ERR_QUOTA "org.moed.Error.QuotaExceeded"
#define FRONT_ERR_INVALID "org.moed.Error.InvalidArgument"
#define FRONT_ERR_NO_MODEL "org.moed.Error.NoSuchModel"
#define FRONT_ERR_UNAVAILABLE "org.moed.Error.Unavailable"
#define FRONT_ERR_FAILED "org.moed.Error.Failed"
/* Maps an oai_error (parse failure) to a front_error. */
void front_error_from_oai(struct front_error *fe, const struct oai_error *oe);

/* How a door receives a request's output; called from front_dispatch. */
struct front_sink {
        /* Newly visible text (whole UTF-8 characters). */
        void (*text)(void *ud, const char *s, size_t n);
        /* Last call for this request; the front_req is freed after it
         * returns. finish_reason is OpenAI's word ("stop", "length", or
         * "cancelled"/"error" for ours); why says more or is NULL. */
        void (*finished)(void *ud, const char *finish_reason, const char *why,
                         const struct oai_usage *usage);
};

struct front_limits {
        int64_t max_queued;       /* requests waiting in the engine, all tenants */
        int64_t default_max_tokens; /* when the request names none: 0 = rest of context */
};

/* tenants: taken (freed by front_free / replaced by front_set_tenants). */
int front_new(struct eng *g, struct tenant_set *tenants, const struct front_limits *l,
              struct front **out, struct moerr *e);
void front_free(struct front *f);
/* Reload: new requests see the new tenants; running ones keep going (their
 * counters move over by tenant name). Takes ownership of t. */
void front_set_tenants(struct front *f, struct tenant_set *t);
/* Reload: new limits for new requests. */
void front_set_limits(struct front *f, const struct front_limits *l);
/* A reason not to serve at all (a failed residency check in strict
 * mode), or NULL to serve again: new requests get 503 / Unavailable with
 * it. Copied. */
void front_set_refusal(struct front *f, const char *why);
/* Serving: not draining and no refusal (GET /health). */
bool front_serving(const struct front *f);
/* Where each request's audit record goes (the daemon owns it; NULL: none). */
struct audit;
void front_set_audit(struct front *f, struct audit *a);
/* The per-tenant quotas and usage (for persistence by the daemon). */
struct quota_book *front_quota(struct front *f);
/* Draining: new requests get 503 / Unavailable. */
void front_set_draining(struct front *f, bool on);
bool front_draining(const struct front *f);
/* State words for status: "loading", "serving", "draining" (status says
 * "refusing" while a refusal is set). */
void front_set_state(struct front *f, const char *state);

/* The caller's tenant, or NULL with err set (401 for an unknown bearer
 * token, 403 for no tenant). */
const struct tenant *front_identify(struct front *f, const struct front_caller *c,
                                    struct front_error *err);

/* Starts a chat or completion. On success *out is the caller's handle and
 * sink gets the output, ending with exactly one finished() call. On
 * failure nothing was started and err says why (and counts as a refusal
 * for the tenant where one was identified). */
int front_submit(struct front *f, const struct front_caller *c, const struct oai_request *r,
                 const struct front_sink *sink, void *ud, struct front_req **out,
                 struct front_error *err);
/* The door's client went away (or asked to stop): the request is
 * cancelled, no sink call is made any more, and the handle is freed. */
void front_abandon(struct front_req *q);
/* Asks the request to end soon (finishes through the sink as usual). */
void front_cancel(struct front_req *q, const char *why);
/* Response identity: "chatcmpl-…"/"cmpl-…", creation time, model id. */
const char *front_req_id(const struct front_req *q);
int64_t front_req_created(const struct front_req *q);
const char *front_req_model(const struct front_req *q);
int64_t front_req_prompt_tokens(const struct front_req *q);

/* The engine's event fd and its handler (call when readable). */
int front_event_fd(const struct front *f);
void front_dispatch(struct front *f);

/* Cancels every request still running (drain deadline). */
void front_cancel_all(struct front *f, const char *why);
size_t front_active(const struct front *f);

/* POST /v1/moed/tokenize: the token ids of the request's prompt. */
int front_tokenize(struct front *f, const struct front_caller *c, const struct oai_request *r,
                   int32_t **ids, size_t *n, struct front_error *err);

/* Reports as JSON (caller json_decref's); NULL with err on refusal. */
json_t *front_models(struct front *f);
json_t *front_status(struct front *f);
/* The caller's tenant usage; every tenant for admins (tenant Admin=yes, or
 * uid 0). */
json_t *front_usage(struct front *f, const struct front_caller *c, struct front_error *err);
/* Prometheus text exposition format 0.0.4; malloc'ed. */
char *front_metrics(struct front *f);
/* Extra keys of the status report (devices, residency), set by the
 * daemon; takes the reference. */
void front_set_status_extra(struct front *f, const char *key, json_t *value);
/* Once a second: updates the tokens/s window. */
void front_tick(struct front *f);

/* "serving N models, M requests" for sd_notify STATUS. */
void front_status_line(struct front *f, char *buf, size_t cap);
