/* front: the path a request takes between a door and the engine: tenant,
 * model, limits, chat format and tokens, submission, output routing, and
 * the per-tenant counters behind status, usage and /metrics. */
#include "ipc/front.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "common/cleanup.h"
#include "common/log.h"
#include "moed-config.h"
#include "policy/audit.h"
#include "policy/quota.h"

struct front_req {
        struct front *f;
        struct eng_req *er;
        struct front_sink sink;
        void *ud;
        char id[40];
        int64_t created;
        const char *model;
        int64_t n_prompt;
        struct quota_ticket tk;
        bool started;            /* the engine has produced something */
        /* For the audit record: who asked, and the content only for
         * tenants with LogContent=yes. */
        enum front_door door;
        uid_t uid;
        gid_t gid;
        pid_t pid;
        char *tenant;
        char *prompt_text, *answer;
        size_t answer_len, answer_cap;
        struct front_req *prev, *next;
};

struct front {
        struct eng *g;
        struct tenant_set *tenants;
        struct front_limits lim;
        bool draining;
        char *refusal;
        char state[16];
        double started;
        json_t *extra;
        struct quota_book *quota;
        struct audit *audit;     /* the daemon's, or NULL */
        struct front_req *reqs;  /* active, doubly linked */
        size_t n_active;
        /* tokens/s over the last ten ticks */
        int64_t tok_hist[10];
        double tok_time[10];
        unsigned tick;
};

const char *front_door_name(enum front_door d)
{
        return d == FRONT_DBUS ? "dbus" : "http";
}

static void ferr(struct front_error *fe, int status, const char *dbus_name, const char *param,
                 const char *code, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
static void ferr(struct front_error *fe, int status, const char *dbus_name, const char *param,
                 const char *code, const char *fmt, ...)
{
        char msg[256];
        va_list ap;
        const char *type = status == 429 ? "rate_limit_error" :
                           status == 401 || status == 403 ? "permission_error" :
                           status >= 500 ? "server_error" : "invalid_request_error";

        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        memset(fe, 0, sizeof *fe);
        oai_error_set(&fe->oai, status, type, param, code, "%s", msg);
        fe->dbus_name = dbus_name;
}

void front_error_from_oai(struct front_error *fe, const struct oai_error *oe)
{
        memset(fe, 0, sizeof *fe);
        fe->oai = *oe;
        fe->dbus_name = FRONT_ERR_INVALID;
}

int front_new(struct eng *g, struct tenant_set *tenants, const struct front_limits *l,
              struct front **out, struct moerr *e)
{
        struct front *f = calloc(1, sizeof *f);

        if (!f || !(f->extra = json_object()) || !(f->quota = quota_book_new(NULL)) ||
            quota_book_reload(f->quota, tenants) < 0) {
                if (f) {
                        json_decref(f->extra);
                        quota_book_free(f->quota);
                }
                free(f);
                return moerr_set(e, -ENOMEM, "out of memory");
        }
        f->g = g;
        f->tenants = tenants;
        f->lim = *l;
        f->started = eng_now();
        snprintf(f->state, sizeof f->state, "loading");
        *out = f;
        return 0;
}

void front_free(struct front *f)
{
        if (!f)
                return;
        while (f->reqs)
                front_abandon(f->reqs);
        quota_book_free(f->quota);
        tenant_set_free(f->tenants);
        json_decref(f->extra);
        free(f->refusal);
        free(f);
}

void front_set_tenants(struct front *f, struct tenant_set *t)
{
        /* Running requests hold quota tickets by slot, not tenant pointers,
         * so the old set can go at once. */
        if (quota_book_reload(f->quota, t) < 0)
                mo_log(LOG_ERR, "reload: out of memory for the quota book");
        tenant_set_free(f->tenants);
        f->tenants = t;
}

struct quota_book *front_quota(struct front *f) { return f->quota; }

void front_set_audit(struct front *f, struct audit *a) { f->audit = a; }

/* One record per refused request: who, what, and the reason. */
static void audit_refusal(struct front *f, const struct front_caller *c, const struct tenant *t,
                          const struct oai_request *r, int64_t n_prompt,
                          const struct front_error *err)
{
        struct audit_record rec = {
                .tenant = t ? t->name : NULL,
                .uid = c->uid,
                .gid = c->gid,
                .pid = c->pid,
                .door = front_door_name(c->door),
                .model = r ? r->model : NULL,
                .prompt_tokens = n_prompt,
                .refusal = err->oai.message,
        };

        if (f->audit)
                audit_log(f->audit, &rec);
}

static void audit_finish(struct front_req *q, const char *finish, const struct eng_usage *u)
{
        struct audit_record rec = {
                .tenant = q->tenant,
                .uid = q->uid,
                .gid = q->gid,
                .pid = q->pid,
                .door = front_door_name(q->door),
                .model = q->model,
                .request_id = q->id,
                .prompt_tokens = u ? u->prompt_tokens : q->n_prompt,
                .completion_tokens = u ? u->completion_tokens : q->tk.output_tokens,
                .queue_s = u ? u->queue_s : 0,
                .first_token_s = u ? u->first_token_s : 0,
                .total_s = u ? u->total_s : 0,
                .finish_reason = finish,
                .prompt_text = q->prompt_text,
                .answer_text = q->answer ? q->answer : (q->prompt_text ? "" : NULL),
        };

        if (q->f->audit)
                audit_log(q->f->audit, &rec);
}

/* The prompt as the tenant sent it, for its audit record (LogContent=yes). */
static char *prompt_for_log(const struct oai_request *r)
{
        size_t len = 0;
        char *s, *p;

        if (r->kind != OAI_CHAT)
                return strdup(r->prompt ? r->prompt : "");
        for (size_t i = 0; i < r->n_messages; i++)
                len += strlen(r->messages[i].role) + strlen(r->messages[i].content) + 3;
        if (!(s = p = malloc(len + 1)))
                return NULL;
        for (size_t i = 0; i < r->n_messages; i++)
                p += sprintf(p, "%s: %s\n", r->messages[i].role, r->messages[i].content);
        *p = 0;
        return s;
}

void front_set_limits(struct front *f, const struct front_limits *l)
{
        f->lim = *l;
}

void front_set_refusal(struct front *f, const char *why)
{
        free(f->refusal);
        f->refusal = why ? strdup(why) : NULL;
}

bool front_serving(const struct front *f)
{
        return !f->draining && !f->refusal;
}

void front_set_draining(struct front *f, bool on)
{
        f->draining = on;
        if (on)
                front_set_state(f, "draining");
}

bool front_draining(const struct front *f) { return f->draining; }

void front_set_state(struct front *f, const char *state)
{
        snprintf(f->state, sizeof f->state, "%s", state);
}

void front_set_status_extra(struct front *f, const char *key, json_t *value)
{
        json_object_set_new(f->extra, key, value);
}

const struct tenant *front_identify(struct front *f, const struct front_caller *c,
                                    struct front_error *err)
{
        enum tenant_match how = TENANT_MATCH_NONE;
        const struct tenant *t = tenant_lookup(f->tenants, c->uid, c->gid, c->groups,
                                               c->n_groups, c->bearer, &how);

        if (t)
                return t;
        if (how == TENANT_MATCH_TOKEN)
                ferr(err, 401, FRONT_ERR_ACCESS, NULL, "invalid_api_key",
                     "the bearer token matches no tenant");
        else
                ferr(err, 403, FRONT_ERR_ACCESS, NULL, "no_tenant",
                     "uid %u belongs to no tenant of this moed (ask the administrator to add "
                     "you to a tenant in /etc/moed/tenants.d)", (unsigned)c->uid);
        return NULL;
}

static int find_model(struct front *f, const struct tenant *t, const char *id,
                      struct front_error *err)
{
        int m = id ? eng_model_find(f->g, id) : -1;

        if (m < 0) {
                ferr(err, 404, FRONT_ERR_NO_MODEL, "model", "model_not_found",
                     "the model '%s' does not exist (GET /v1/models lists them)",
                     id ? id : "");
                return -1;
        }
        if (t && !tenant_allows_model(t, id)) {
                ferr(err, 403, FRONT_ERR_ACCESS, "model", "model_not_allowed",
                     "tenant %s may not use model '%s'", t->name, id);
                return -1;
        }
        return m;
}

/* The prompt's tokens: the chat rendered in the model's format, or the
 * completion text (BOS as the model says), or ids given by the client. */
static int prompt_tokens(struct front *f, int m, const struct oai_request *r, int32_t **ids,
                         size_t *n, struct front_error *err)
{
        struct moerr e = { { 0 } };
        struct eng_model_info mi;
        int ret;

        if (r->kind == OAI_CHAT) {
                _cleanup_free_ struct chat_msg *msgs = calloc(r->n_messages + 1, sizeof *msgs);
                _cleanup_free_ char *text = NULL;
                if (!msgs)
                        goto oom;
                for (size_t i = 0; i < r->n_messages; i++)
                        msgs[i] = (struct chat_msg){ r->messages[i].role, r->messages[i].content };
                if ((ret = eng_render_chat(f->g, m, msgs, r->n_messages, &text, &e)) < 0) {
                        ferr(err, 400, FRONT_ERR_INVALID, "messages", "invalid_value", "%s", e.msg);
                        return ret;
                }
                ret = eng_tokenize(f->g, m, text, strlen(text), true, false, ids, n, &e);
                memset(text, 0, strlen(text));
        } else if (r->prompt_tokens) {
                eng_model_get(f->g, (size_t)m, &mi);
                for (size_t i = 0; i < r->n_prompt_tokens; i++)
                        if (r->prompt_tokens[i] < 0 || r->prompt_tokens[i] >= mi.n_vocab) {
                                ferr(err, 400, FRONT_ERR_INVALID, "prompt", "invalid_value",
                                     "token id %d is outside the vocabulary (0..%lld)",
                                     r->prompt_tokens[i], (long long)mi.n_vocab - 1);
                                return -EINVAL;
                        }
                if (!(*ids = malloc((r->n_prompt_tokens + 1) * sizeof **ids)))
                        goto oom;
                memcpy(*ids, r->prompt_tokens, r->n_prompt_tokens * sizeof **ids);
                *n = r->n_prompt_tokens;
                ret = 0;
        } else {
                ret = eng_tokenize(f->g, m, r->prompt ? r->prompt : "", r->prompt_len, false,
                                   r->kind != OAI_TOKENIZE || r->add_special, ids, n, &e);
        }
        if (ret < 0)
                ferr(err, ret == -ENOMEM ? 500 : 400, FRONT_ERR_INVALID, "prompt", NULL, "%s", e.msg);
        return ret;
oom:
        ferr(err, 500, FRONT_ERR_FAILED, NULL, NULL, "out of memory");
        return -ENOMEM;
}

static void req_link(struct front *f, struct front_req *q)
{
        q->next = f->reqs;
        if (f->reqs)
                f->reqs->prev = q;
        f->reqs = q;
        f->n_active++;
}

static void req_unlink_free(struct front_req *q)
{
        struct front *f = q->f;

        if (q->prev)
                q->prev->next = q->next;
        else
                f->reqs = q->next;
        if (q->next)
                q->next->prev = q->prev;
        f->n_active--;
        if (q->prompt_text)
                memset(q->prompt_text, 0, strlen(q->prompt_text));
        if (q->answer)
                memset(q->answer, 0, q->answer_cap);
        free(q->prompt_text);
        free(q->answer);
        free(q->tenant);
        free(q);
}

static void make_id(char *buf, size_t cap, enum oai_kind k)
{
        uint8_t rnd[12];
        size_t n;

        if (getrandom(rnd, sizeof rnd, 0) != sizeof rnd)
                memset(rnd, 0, sizeof rnd);
        n = (size_t)snprintf(buf, cap, "%s", k == OAI_CHAT ? "chatcmpl-" : "cmpl-");
        for (size_t i = 0; i < sizeof rnd && n + 2 < cap; i++, n += 2)
                snprintf(buf + n, cap - n, "%02x", rnd[i]);
}

/* The engine-wide queue bound, then the tenant's quotas (policy/quota). */
static int admit(struct front *f, const struct tenant *t, const char *model, int64_t n_prompt,
                 int64_t max_tokens, struct quota_ticket *tk, struct front_error *err)
{
        struct quota_refusal why;
        struct eng_stats st;
        int r;

        eng_get_stats(f->g, &st);
        if (st.waiting >= f->lim.max_queued) {
                quota_count_refusal(f->quota, t->name, QUOTA_OTHER);
                ferr(err, 429, FRONT_ERR_QUOTA, NULL, "queue_full",
                     "the engine's queue is full (%lld requests waiting); retry shortly",
                     (long long)st.waiting);
                err->retry_after_s = 1;
                return -EBUSY;
        }
        if ((r = quota_admit(f->quota, t, model, n_prompt, max_tokens, st.waiting > 0, tk,
                             &why)) == 0)
                return 0;
        ferr(err, why.status, why.status == 429 ? FRONT_ERR_QUOTA :
                              why.status == 403 ? FRONT_ERR_ACCESS : FRONT_ERR_INVALID,
             why.reason == QUOTA_MAX_OUTPUT ? "max_tokens" : NULL, quota_reason_name(why.reason),
             "%s", why.msg);
        err->retry_after_s = (int)MO_MIN(why.retry_after_s, 86400);
        return r;
}

static int submit(struct front *f, const struct front_caller *c, const struct oai_request *r,
                  const struct front_sink *sink, void *ud, struct front_req **out,
                  struct front_error *err, const struct tenant **tp, int64_t *n_prompt)
{
        const struct tenant *t;
        struct eng_model_info mi;
        struct eng_params p = { 0 };
        struct moerr e = { { 0 } };
        _cleanup_free_ int32_t *ids = NULL;
        struct front_req *q;
        size_t n = 0;
        int m, ret;

        if (f->draining) {
                ferr(err, 503, FRONT_ERR_UNAVAILABLE, NULL, "draining",
                     "moed is shutting down and takes no new requests");
                return -ESHUTDOWN;
        }
        if (f->refusal) {
                ferr(err, 503, FRONT_ERR_UNAVAILABLE, NULL, "not_serving",
                     "moed refuses to serve: %s", f->refusal);
                return -EPERM;
        }
        if (!(t = *tp = front_identify(f, c, err)))
                return -EACCES;
        if ((m = find_model(f, t, r->model, err)) < 0 ||
            (ret = prompt_tokens(f, m, r, &ids, &n, err)) < 0) {
                quota_count_refusal(f->quota, t->name, m < 0 ? QUOTA_MODELS : QUOTA_OTHER);
                return m < 0 ? -ENOENT : ret;
        }
        *n_prompt = (int64_t)n;
        eng_model_get(f->g, (size_t)m, &mi);
        if ((int64_t)n >= mi.n_ctx) {
                quota_count_refusal(f->quota, t->name, QUOTA_OTHER);
                ferr(err, 400, FRONT_ERR_INVALID, r->kind == OAI_CHAT ? "messages" : "prompt",
                     "context_length_exceeded",
                     "the prompt is %zu tokens; model '%s' takes at most %lld", n, mi.id,
                     (long long)mi.n_ctx - 1);
                return -E2BIG;
        }
        if (!(q = calloc(1, sizeof *q))) {
                ferr(err, 500, FRONT_ERR_FAILED, NULL, NULL, "out of memory");
                return -ENOMEM;
        }
        if ((ret = admit(f, t, mi.id, (int64_t)n, r->max_tokens, &q->tk, err)) < 0) {
                free(q);
                return ret;
        }
        p.model = m;
        p.prompt = ids;
        p.n_prompt = n;
        p.max_tokens = r->max_tokens > 0 ? r->max_tokens :
                       f->lim.default_max_tokens > 0 ? f->lim.default_max_tokens : mi.n_ctx;
        p.max_tokens = MO_MIN(p.max_tokens, q->tk.max_output);
        p.sampling = r->sampling;
        p.stop = (const char *const *)r->stop;
        p.n_stop = r->n_stop;
        p.tenant = (uint32_t)q->tk.slot; /* stable across reloads, unlike t->id */
        p.weight = t->weight;
        p.kv_share = t->kv_share;
        p.interactive = t->priority == TENANT_INTERACTIVE;
        p.user = q;
        if ((ret = eng_submit(f->g, &p, &q->er, &e)) < 0) {
                quota_undo(f->quota, &q->tk);
                free(q);
                ferr(err, ret == -ESHUTDOWN ? 503 : 400,
                     ret == -ESHUTDOWN ? FRONT_ERR_UNAVAILABLE : FRONT_ERR_INVALID, NULL, NULL,
                     "%s", e.msg);
                return ret;
        }
        memset(ids, 0, n * sizeof *ids);
        q->f = f;
        q->sink = *sink;
        q->ud = ud;
        q->created = (int64_t)time(NULL);
        q->model = mi.id;
        q->n_prompt = (int64_t)n;
        q->door = c->door;
        q->uid = c->uid;
        q->gid = c->gid;
        q->pid = c->pid;
        q->tenant = strdup(t->name);
        if (t->log_content)
                q->prompt_text = prompt_for_log(r);
        make_id(q->id, sizeof q->id, r->kind);
        req_link(f, q);
        *out = q;
        return 0;
}

int front_submit(struct front *f, const struct front_caller *c, const struct oai_request *r,
                 const struct front_sink *sink, void *ud, struct front_req **out,
                 struct front_error *err)
{
        const struct tenant *t = NULL;
        int64_t n_prompt = 0;
        int ret = submit(f, c, r, sink, ud, out, err, &t, &n_prompt);

        if (ret < 0)
                audit_refusal(f, c, t, r, n_prompt, err);
        return ret;
}

void front_abandon(struct front_req *q)
{
        audit_finish(q, "cancelled", NULL);
        eng_req_release(q->er);
        quota_release(q->f->quota, &q->tk, q->tk.output_tokens);
        req_unlink_free(q);
}

void front_cancel(struct front_req *q, const char *why)
{
        eng_cancel(q->er, ENG_FINISH_CANCELLED, why);
}

const char *front_req_id(const struct front_req *q) { return q->id; }
int64_t front_req_created(const struct front_req *q) { return q->created; }
const char *front_req_model(const struct front_req *q) { return q->model; }
int64_t front_req_prompt_tokens(const struct front_req *q) { return q->n_prompt; }

int front_event_fd(const struct front *f) { return eng_event_fd(f->g); }

/* Keeps the answer for the audit record of a LogContent=yes tenant; on
 * out of memory the record simply lacks it. */
static void answer_append(struct front_req *q, const char *s, size_t n)
{
        if (q->answer_len + n + 1 > q->answer_cap) {
                size_t cap = MO_MAX(q->answer_cap * 2, q->answer_len + n + 256);
                char *a = malloc(cap);
                if (!a)
                        return;
                if (q->answer) {
                        memcpy(a, q->answer, q->answer_len);
                        memset(q->answer, 0, q->answer_cap);
                        free(q->answer);
                }
                q->answer = a;
                q->answer_cap = cap;
        }
        memcpy(q->answer + q->answer_len, s, n);
        q->answer_len += n;
        q->answer[q->answer_len] = 0;
}

static const char *finish_word(enum eng_finish fin)
{
        switch (fin) {
        case ENG_FINISH_STOP: return "stop";
        case ENG_FINISH_LENGTH: return "length";
        case ENG_FINISH_ERROR: return "error";
        default: return "cancelled";
        }
}

static void on_update(struct eng_req *er, void *user, const struct eng_update *u, void *ud)
{
        struct front_req *q = user;
        struct front *f = ud;
        struct quota_refusal why;
        struct oai_usage usage;

        if (!q->started) {
                q->started = true;
                quota_set_queued(f->quota, &q->tk, false);
        }
        /* Crossing a token budget mid-stream ends the answer as "length",
         * with the limit named, rather than cutting it without a word. */
        if (u->new_tokens && !quota_charge_output(f->quota, &q->tk, u->new_tokens, &why) &&
            u->finish == ENG_FINISH_NONE)
                eng_cancel(er, ENG_FINISH_LENGTH, why.msg);
        if (u->len && q->prompt_text)
                answer_append(q, u->text, u->len);
        if (u->len)
                q->sink.text(q->ud, u->text, u->len);
        if (u->finish == ENG_FINISH_NONE)
                return;
        usage = (struct oai_usage){
                .prompt_tokens = u->usage.prompt_tokens,
                .completion_tokens = u->usage.completion_tokens,
                .queue_s = u->usage.queue_s,
                .first_token_s = u->usage.first_token_s,
                .total_s = u->usage.total_s,
                .detail = u->why,
        };
        quota_release(f->quota, &q->tk, u->usage.completion_tokens);
        audit_finish(q, finish_word(u->finish), &u->usage);
        q->sink.finished(q->ud, finish_word(u->finish), u->why, &usage);
        eng_req_release(er);
        req_unlink_free(q);
}

void front_dispatch(struct front *f)
{
        eng_dispatch(f->g, on_update, f);
}

void front_cancel_all(struct front *f, const char *why)
{
        for (struct front_req *q = f->reqs; q; q = q->next)
                front_cancel(q, why);
}

size_t front_active(const struct front *f) { return f->n_active; }

int front_tokenize(struct front *f, const struct front_caller *c, const struct oai_request *r,
                   int32_t **ids, size_t *n, struct front_error *err)
{
        const struct tenant *t = front_identify(f, c, err);
        int m;

        if (!t)
                return -EACCES;
        if ((m = find_model(f, t, r->model, err)) < 0)
                return -ENOENT;
        return prompt_tokens(f, m, r, ids, n, err);
}

json_t *front_models(struct front *f)
{
        json_t *a = json_array();

        for (size_t i = 0; a && i < eng_model_count(f->g); i++) {
                struct eng_model_info mi;
                eng_model_get(f->g, i, &mi);
                json_array_append_new(a, json_pack("{s:s, s:s, s:I, s:I}", "id", mi.id, "name",
                                                   mi.name, "context", (json_int_t)mi.n_ctx,
                                                   "weight_bytes", (json_int_t)mi.weight_bytes));
        }
        return a;
}

json_t *front_status(struct front *f)
{
        struct eng_stats st;
        json_t *models = json_array(), *o;

        eng_get_stats(f->g, &st);
        for (size_t i = 0; models && i < eng_model_count(f->g); i++) {
                struct eng_model_info mi;
                eng_model_get(f->g, i, &mi);
                json_array_append_new(models, json_pack(
                        "{s:s, s:s, s:s, s:s, s:I, s:I, s:I, s:I, s:I, s:I}", "id", mi.id, "name",
                        mi.name, "path", mi.path, "chat_format", chat_format_name(mi.chat),
                        "context", (json_int_t)mi.n_ctx, "weight_bytes",
                        (json_int_t)mi.weight_bytes, "experts", (json_int_t)mi.n_expert,
                        "kv_blocks_total", (json_int_t)mi.kv_blocks_total, "kv_blocks_used",
                        (json_int_t)mi.kv_blocks_used, "kv_block_tokens",
                        (json_int_t)mi.kv_block_tokens));
        }
        o = json_pack("{s:s, s:s, s:f, s:o, s:{s:I, s:I, s:I}, s:{s:I, s:I, s:I}}", "version",
                      MOED_VERSION, "state", f->refusal && !f->draining ? "refusing" : f->state,
                      "uptime_s", eng_now() - f->started,
                      "models", models, "queue", "waiting", (json_int_t)st.waiting, "running",
                      (json_int_t)st.running, "active_requests", (json_int_t)f->n_active,
                      "engine", "steps", (json_int_t)st.steps, "tokens_prefilled",
                      (json_int_t)st.tokens_prefilled, "tokens_generated",
                      (json_int_t)st.tokens_generated);
        if (o)
                json_object_update(o, f->extra);
        return o;
}

static bool is_admin(const struct tenant *t, const struct front_caller *c)
{
        return c->uid == 0 || (t && t->admin);
}

static json_t *usage_json(const struct quota_usage *u)
{
        json_t *refused = json_object();

        for (int k = 0; refused && k < QUOTA_N_REASONS; k++)
                if (u->refused[k])
                        json_object_set_new(refused, quota_reason_name(k),
                                            json_integer(u->refused[k]));
        return json_pack("{s:s, s:I, s:I, s:o, s:I, s:I, s:I, s:I, s:I}", "name", u->name,
                         "requests", (json_int_t)u->requests, "refusals",
                         (json_int_t)u->refusals, "refused", refused, "prompt_tokens",
                         (json_int_t)u->prompt_tokens, "completion_tokens",
                         (json_int_t)u->completion_tokens, "active", (json_int_t)u->in_flight,
                         "queued", (json_int_t)u->queued, "limited", (json_int_t)u->limited);
}

json_t *front_usage(struct front *f, const struct front_caller *c, struct front_error *err)
{
        const struct tenant *t = front_identify(f, c, err);
        bool all = is_admin(t, c);
        struct quota_usage u;
        json_t *list;

        if (!t && !all)
                return NULL;
        if (!(list = json_array()))
                return NULL;
        for (size_t i = 0; i < quota_usage_count(f->quota); i++)
                if (quota_usage_get(f->quota, i, &u) == 0 &&
                    (all || strcmp(u.name, t->name) == 0))
                        json_array_append_new(list, usage_json(&u));
        return json_pack("{s:s?, s:o}", "tenant", t ? t->name : NULL, "tenants", list);
}

void front_tick(struct front *f)
{
        struct eng_stats st;

        eng_get_stats(f->g, &st);
        f->tok_hist[f->tick % 10] = st.tokens_generated;
        f->tok_time[f->tick % 10] = eng_now();
        f->tick++;
}

static double tokens_per_s(const struct front *f)
{
        unsigned newest = (f->tick + 9) % 10, oldest = f->tick >= 10 ? f->tick % 10 : 0;
        double dt;

        if (f->tick < 2)
                return 0;
        dt = f->tok_time[newest] - f->tok_time[oldest];
        return dt > 0 ? (double)(f->tok_hist[newest] - f->tok_hist[oldest]) / dt : 0;
}

/* A growing text buffer for the metrics page. */
struct sbuf {
        char *s;
        size_t len, cap;
        bool oom;
};

static void sb_printf(struct sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(struct sbuf *b, const char *fmt, ...)
{
        va_list ap;
        int n;

        for (int tries = 0; tries < 2 && !b->oom; tries++) {
                va_start(ap, fmt);
                n = vsnprintf(b->s ? b->s + b->len : NULL, b->s ? b->cap - b->len : 0, fmt, ap);
                va_end(ap);
                if (n < 0) {
                        b->oom = true;
                        return;
                }
                if (b->s && b->len + (size_t)n < b->cap) {
                        b->len += (size_t)n;
                        return;
                }
                size_t cap = MO_MAX(b->cap * 2, b->len + (size_t)n + 1024);
                char *p = realloc(b->s, cap);
                if (!p) {
                        b->oom = true;
                        return;
                }
                b->s = p;
                b->cap = cap;
        }
}

static void metric_head(struct sbuf *b, const char *name, const char *type, const char *help)
{
        sb_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void metrics_tenants(struct front *f, struct sbuf *b)
{
        static const struct {
                const char *name, *help;
                size_t off;
        } cs[] = {
                { "moed_requests_total", "Requests admitted, per tenant.",
                  offsetof(struct quota_usage, requests) },
                { "moed_prompt_tokens_total", "Prompt tokens of admitted requests, per tenant.",
                  offsetof(struct quota_usage, prompt_tokens) },
                { "moed_completion_tokens_total", "Tokens generated, per tenant.",
                  offsetof(struct quota_usage, completion_tokens) },
                { "moed_active_requests", "Requests running or queued, per tenant.",
                  offsetof(struct quota_usage, in_flight) },
        };
        size_t n = quota_usage_count(f->quota);
        struct quota_usage u;

        for (size_t k = 0; k < ARRAY_SIZE(cs); k++) {
                metric_head(b, cs[k].name, k == 3 ? "gauge" : "counter", cs[k].help);
                for (size_t i = 0; i < n; i++)
                        if (quota_usage_get(f->quota, i, &u) == 0)
                                sb_printf(b, "%s{tenant=\"%s\"} %" PRId64 "\n", cs[k].name,
                                          u.name, *(const int64_t *)((const char *)&u +
                                                                     cs[k].off));
        }
        metric_head(b, "moed_refusals_total", "counter",
                    "Requests refused, per tenant and limit (other: bad input, no model).");
        for (size_t i = 0; i < n; i++) {
                if (quota_usage_get(f->quota, i, &u) < 0)
                        continue;
                for (int r = 0; r < QUOTA_N_REASONS; r++)
                        if (u.refused[r])
                                sb_printf(b, "moed_refusals_total{tenant=\"%s\",reason=\"%s\"} %"
                                          PRId64 "\n", u.name, quota_reason_name(r),
                                          u.refused[r]);
        }
}

char *front_metrics(struct front *f)
{
        struct sbuf b = { 0 };
        struct eng_model_info mi;
        struct eng_stats st;
        int64_t cum = 0;

        eng_get_stats(f->g, &st);
        metrics_tenants(f, &b);
        metric_head(&b, "moed_queue_depth", "gauge", "Sequences waiting for the engine.");
        sb_printf(&b, "moed_queue_depth %" PRId64 "\n", st.waiting);
        metric_head(&b, "moed_running_sequences", "gauge", "Sequences in the running batch.");
        sb_printf(&b, "moed_running_sequences %" PRId64 "\n", st.running);
        metric_head(&b, "moed_kv_blocks_used", "gauge", "KV cache blocks in use, per model.");
        for (size_t i = 0; i < eng_model_count(f->g); i++) {
                eng_model_get(f->g, i, &mi);
                sb_printf(&b, "moed_kv_blocks_used{model=\"%s\"} %" PRId64 "\n", mi.id,
                          mi.kv_blocks_used);
        }
        metric_head(&b, "moed_kv_blocks_free", "gauge", "KV cache blocks free, per model.");
        for (size_t i = 0; i < eng_model_count(f->g); i++) {
                eng_model_get(f->g, i, &mi);
                sb_printf(&b, "moed_kv_blocks_free{model=\"%s\"} %" PRId64 "\n", mi.id,
                          mi.kv_blocks_total - mi.kv_blocks_used);
        }
        metric_head(&b, "moed_step_seconds", "histogram", "Time of one engine step.");
        for (int i = 0; i < 12; i++) {
                cum += st.step_hist[i];
                if (i == 11)
                        sb_printf(&b, "moed_step_seconds_bucket{le=\"+Inf\"} %" PRId64 "\n", cum);
                else
                        sb_printf(&b, "moed_step_seconds_bucket{le=\"%g\"} %" PRId64 "\n",
                                  eng_step_hist_bounds[i], cum);
        }
        sb_printf(&b, "moed_step_seconds_sum %.6f\nmoed_step_seconds_count %" PRId64 "\n",
                  st.step_sum_s, st.steps);
        metric_head(&b, "moed_tokens_generated_total", "counter", "Tokens generated, all tenants.");
        sb_printf(&b, "moed_tokens_generated_total %" PRId64 "\n", st.tokens_generated);
        metric_head(&b, "moed_tokens_prefilled_total", "counter", "Prompt tokens prefilled.");
        sb_printf(&b, "moed_tokens_prefilled_total %" PRId64 "\n", st.tokens_prefilled);
        metric_head(&b, "moed_tokens_per_second", "gauge",
                    "Tokens generated per second over the last ten seconds.");
        sb_printf(&b, "moed_tokens_per_second %.3f\n", tokens_per_s(f));
        metric_head(&b, "moed_preemptions_total", "counter",
                    "Sequences preempted under KV cache pressure.");
        sb_printf(&b, "moed_preemptions_total %" PRId64 "\n", st.preemptions);
        if (b.oom) {
                free(b.s);
                return NULL;
        }
        return b.s;
}

void front_status_line(struct front *f, char *buf, size_t cap)
{
        size_t n = eng_model_count(f->g);

        snprintf(buf, cap, "%s %zu model%s, %zu request%s", f->draining ? "draining" : "serving",
                 n, n == 1 ? "" : "s", f->n_active, f->n_active == 1 ? "" : "s");
}
