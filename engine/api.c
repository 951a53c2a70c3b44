/* api: the engine thread. It owns the models' forward contexts and KV
 * caches, runs continuous batching (every running sequence decodes one
 * token per step while waiting ones are prefilled in chunks under the
 * step's token budget), samples, detokenizes and applies stop strings, and
 * hands text to the main loop through per-request buffers and an eventfd. */
#include "engine/api.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "common/cleanup.h"
#include "engine/forward.h"
#include "engine/gguf.h"
#include "engine/kvcache.h"
#include "engine/model.h"
#include "engine/tokenizer.h"

#define KV_BLOCK_TOKENS 32
#define AUTO_KV_CAP (2ull << 30)
#define INTERACTIVE_WINDOW_S 10.0

const double eng_step_hist_bounds[12] = {
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 1e300,
};

/* Intrusive doubly linked lists (a request is on at most one engine list
 * and, independently, on the ready list). */
struct link {
        struct link *prev, *next;
};
static void list_init(struct link *h) { h->prev = h->next = h; }
static bool list_empty(const struct link *h) { return h->next == h; }
static void list_del(struct link *l)
{
        l->prev->next = l->next;
        l->next->prev = l->prev;
        l->prev = l->next = l;
}
static void list_add_tail(struct link *h, struct link *l)
{
        l->prev = h->prev;
        l->next = h;
        h->prev->next = l;
        h->prev = l;
}
static void list_add_head(struct link *h, struct link *l) { list_add_tail(h->next, l); }
#define container_of(p, type, member) ((type *)((char *)(p) - offsetof(type, member)))
#define req_of(l) container_of(l, struct eng_req, node)

struct eng_model {
        char *id, *path;
        struct mo_model *m;
        struct fwd_ctx *f;
        struct kv_cache *kv;
        int64_t n_ctx;
        enum chat_format chat;
};

/* Virtual token counters of tenants (weighted fair sharing). */
struct tenant_vt {
        uint32_t tenant;
        double served;    /* tokens processed / weight */
        int64_t backlog;  /* sequences waiting or running */
};

struct eng {
        struct eng_config c;
        mo_backend *b;
        struct eng_model *models;
        size_t n_models;
        float *logits;           /* max_running rows of the largest vocabulary */
        struct fwd_seq *batch;
        struct eng_req **batch_req;

        pthread_t thread;
        bool started;
        int efd;
        _Atomic uint64_t heartbeat_ns;

        pthread_mutex_t lock;    /* everything below */
        pthread_cond_t wake;
        bool stopping;
        struct link incoming;    /* submitted, not yet seen by the engine */
        struct link ready;       /* requests with updates for the main loop */
        struct eng_stats stats;
        size_t next_model;       /* round robin over models with work */

        /* Engine-thread only. */
        struct link waiting;     /* need (re)prefill, in arrival order */
        struct link running;     /* fully prefilled, decoding */
        struct tenant_vt *vt;
        size_t n_vt, cap_vt;
        int n_decode;            /* the step's first n_decode entries decode */
        double last_interactive; /* when an interactive request last came */
};

enum req_state { REQ_NEW, REQ_WAITING, REQ_RUNNING, REQ_DONE };

struct eng_req {
        struct eng *g;
        int refs;                /* caller + engine; under g->lock */
        struct link node;        /* incoming / waiting / running */
        struct link ready_node;  /* g->ready */

        /* Set at submit, then engine-thread only. */
        int model;
        int32_t *tokens;         /* prompt then generated */
        int64_t n_tokens, cap_tokens, n_prompt;
        int64_t max_tokens;
        bool ignore_eos;
        uint32_t tenant;
        double weight;
        double kv_share;
        bool interactive;
        void *user;
        struct sampler *smp;
        struct stop_matcher *stop;
        struct tok_stream *ts;
        enum req_state state;
        struct kv_seq kv;
        int64_t generated;
        char *text;              /* all generated text (for stop strings) */
        size_t text_len, text_cap, text_sent;
        bool stopped;            /* a stop string completed */
        double t_submit, t_sched, t_first;

        /* Shared with the main loop, under g->lock. */
        enum eng_finish cancel;  /* asked by the caller */
        char *cancel_why;
        bool released;
        char *out;               /* text not yet dispatched */
        size_t out_len, out_cap;
        int64_t out_tokens;
        enum eng_finish finish;
        char *why;
        struct eng_usage usage;
        bool final_sent;
};

double eng_now(void)
{
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void beat(struct eng *g)
{
        atomic_store(&g->heartbeat_ns, (uint64_t)(eng_now() * 1e9));
}

double eng_heartbeat(const struct eng *g)
{
        return atomic_load(&((struct eng *)g)->heartbeat_ns) * 1e-9;
}

const char *eng_finish_name(enum eng_finish f)
{
        switch (f) {
        case ENG_FINISH_NONE: return "none";
        case ENG_FINISH_STOP: return "stop";
        case ENG_FINISH_LENGTH: return "length";
        case ENG_FINISH_CANCELLED: return "cancelled";
        case ENG_FINISH_SHUTDOWN: return "shutdown";
        case ENG_FINISH_ERROR: return "error";
        }
        return "?";
}

/* ---- set-up ---- */

int eng_new(const struct eng_config *c, struct eng **out, struct moerr *e)
{
        struct eng *g = calloc(1, sizeof *g);
        int ret;

        if (!g)
                return moerr_set(e, -ENOMEM, "out of memory");
        g->c = *c;
        if (g->c.step_tokens <= 0)
                g->c.step_tokens = 256;
        if (g->c.max_running <= 0)
                g->c.max_running = 64;
        if (g->c.heartbeat_s <= 0)
                g->c.heartbeat_s = 1;
        g->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        pthread_mutex_init(&g->lock, NULL);
        pthread_cond_init(&g->wake, NULL);
        list_init(&g->incoming);
        list_init(&g->ready);
        list_init(&g->waiting);
        list_init(&g->running);
        beat(g);
        if (g->efd < 0) {
                ret = moerr_set(e, -errno, "eventfd: %s", strerror(errno));
                eng_free(g);
                return ret;
        }
        if ((ret = mo_backend_cpu_new(c->threads, &g->b, e)) < 0) {
                eng_free(g);
                return ret;
        }
        *out = g;
        return 0;
}

/* Reads every weight page once, so the first requests do not stall on the
 * disk and the progress of a long load can be reported. */
static void prefault(struct eng_model *em, eng_progress_fn progress, void *ud)
{
        const volatile unsigned char *p = gguf_file_data(em->m->file);
        uint64_t n = gguf_file_size(em->m->file), step = 64ull << 20;
        unsigned sum = 0;

        for (uint64_t off = 0; off < n; off += 4096) {
                sum += p[off];
                if (progress && off % step == 0)
                        progress(em->id, (double)off / (double)n, ud);
        }
        (void)sum;
        if (progress)
                progress(em->id, 1.0, ud);
}

static int model_kv_new(struct eng *g, struct eng_model *em, struct moerr *e)
{
        const struct mo_hparams *hp = &em->m->hp;
        struct kv_config kc = {
                .n_layer = hp->n_layer,
                .row_width = hp->kv_lora + hp->n_rot,
                .block_tokens = KV_BLOCK_TOKENS,
        };
        uint64_t bytes = g->c.kv_bytes;

        if (!bytes) {
                kc.n_blocks = kv_blocks_for_tokens(&kc, 4 * em->n_ctx);
                bytes = MO_MIN(kc.n_blocks * kv_block_bytes(&kc), AUTO_KV_CAP);
        }
        kc.n_blocks = 1; /* kv_block_bytes wants a whole config */
        kc.n_blocks = kv_blocks_for_bytes(&kc, bytes);
        if (kc.n_blocks < kv_blocks_for_tokens(&kc, MO_MIN(em->n_ctx, 4096)))
                kc.n_blocks = kv_blocks_for_tokens(&kc, MO_MIN(em->n_ctx, 4096));
        return kv_new(g->b, &kc, &em->kv, e);
}

int eng_add_model(struct eng *g, const char *id, const char *path, eng_progress_fn progress,
                  void *ud, struct moerr *e)
{
        return eng_add_model_as(g, id, path, path, progress, ud, e);
}

int eng_add_model_as(struct eng *g, const char *id, const char *load_path,
                     const char *shown_path, eng_progress_fn progress, void *ud,
                     struct moerr *e)
{
        struct eng_model *ms, *em;
        int ret;

        if (g->started)
                return moerr_set(e, -EBUSY, "models are added before the engine starts");
        if (eng_model_find(g, id) >= 0)
                return moerr_set(e, -EEXIST, "model id %s given twice", id);
        ms = realloc(g->models, (g->n_models + 1) * sizeof *ms);
        if (!ms)
                return moerr_set(e, -ENOMEM, "out of memory");
        g->models = ms;
        em = &ms[g->n_models];
        memset(em, 0, sizeof *em);
        em->id = strdup(id);
        em->path = strdup(shown_path);
        if (!em->id || !em->path) {
                ret = moerr_set(e, -ENOMEM, "out of memory");
                goto fail;
        }
        if ((ret = model_load(load_path, &em->m, e)) < 0)
                goto fail;
        em->n_ctx = em->m->hp.n_ctx_train;
        if (g->c.max_context > 0 && g->c.max_context < em->n_ctx)
                em->n_ctx = g->c.max_context;
        em->chat = chat_format_detect(em->m->file);
        prefault(em, progress, ud);
        if ((ret = model_kv_new(g, em, e)) < 0 ||
            (ret = fwd_new(em->m, g->b, g->c.step_tokens, &em->f, e)) < 0)
                goto fail;
        g->n_models++;
        return 0;
fail:
        fwd_free(em->f);
        kv_free(em->kv);
        model_free(em->m);
        free(em->id);
        free(em->path);
        return moerr_prefix(e, ret, "model %s", id);
}

size_t eng_model_count(const struct eng *g) { return g->n_models; }

int eng_model_find(const struct eng *g, const char *id)
{
        for (size_t i = 0; i < g->n_models; i++)
                if (strcmp(g->models[i].id, id) == 0)
                        return (int)i;
        return -1;
}

void eng_model_get(struct eng *g, size_t i, struct eng_model_info *out)
{
        struct eng_model *em = &g->models[i];
        const struct mo_hparams *hp = &em->m->hp;

        *out = (struct eng_model_info){
                .id = em->id,
                .name = em->m->name,
                .path = em->path,
                .n_ctx = em->n_ctx,
                .n_vocab = hp->n_vocab,
                .weight_bytes = em->m->weight_bytes,
                .n_expert = hp->n_expert,
                .n_expert_used = hp->n_expert_used,
                .n_layer = hp->n_layer,
                .chat = em->chat,
                .kv_block_tokens = KV_BLOCK_TOKENS,
        };
        pthread_mutex_lock(&g->lock);
        out->kv_blocks_used = kv_used_blocks(em->kv);
        out->kv_blocks_total = out->kv_blocks_used + kv_free_blocks(em->kv);
        pthread_mutex_unlock(&g->lock);
}

int eng_render_chat(struct eng *g, int model, const struct chat_msg *msgs, size_t n,
                    char **text, struct moerr *e)
{
        return chat_render(g->models[model].chat, msgs, n, true, text, e);
}

int eng_tokenize(struct eng *g, int model, const char *text, size_t len, bool parse_special,
                 bool add_bos, int32_t **ids, size_t *n, struct moerr *e)
{
        const struct tokenizer *t = g->models[model].m->tok;

        return tok_encode(t, text, len, add_bos && tok_add_bos(t), parse_special, ids, n, e);
}

int eng_token_piece(struct eng *g, int model, int32_t id, char *buf, size_t cap)
{
        return tok_piece(g->models[model].m->tok, id, true, buf, cap);
}

/* ---- requests ---- */

static void req_free(struct eng_req *r)
{
        /* Prompts and answers are not left behind in freed memory. */
        if (r->tokens)
                memset(r->tokens, 0, (size_t)r->cap_tokens * sizeof *r->tokens);
        if (r->text)
                memset(r->text, 0, r->text_cap);
        if (r->out)
                memset(r->out, 0, r->out_cap);
        free(r->tokens);
        free(r->text);
        free(r->out);
        free(r->why);
        free(r->cancel_why);
        sampler_free(r->smp);
        stop_free(r->stop);
        tok_stream_free(r->ts);
        free(r);
}

/* Drops one reference; g->lock held. */
static void req_unref_locked(struct eng_req *r)
{
        if (--r->refs == 0)
                req_free(r);
}

int eng_submit(struct eng *g, const struct eng_params *p, struct eng_req **out,
               struct moerr *e)
{
        struct eng_model *em;
        struct eng_req *r;

        if (p->model < 0 || (size_t)p->model >= g->n_models)
                return moerr_set(e, -EINVAL, "no such model");
        em = &g->models[p->model];
        if (p->n_prompt == 0)
                return moerr_set(e, -EINVAL, "the prompt is empty");
        if ((int64_t)p->n_prompt >= em->n_ctx)
                return moerr_set(e, -EINVAL,
                                 "the prompt has %zu tokens; model %s takes at most %lld "
                                 "(its context is %lld tokens, one is left for the answer)",
                                 p->n_prompt, em->id, (long long)em->n_ctx - 1,
                                 (long long)em->n_ctx);
        if (p->max_tokens <= 0 || !(p->weight > 0))
                return moerr_set(e, -EINVAL, "max_tokens and weight must be positive");
        /* A bad id would fail the whole step, and with it every request
         * batched beside this one. */
        for (size_t i = 0; i < p->n_prompt; i++)
                if (p->prompt[i] < 0 || p->prompt[i] >= em->m->hp.n_vocab)
                        return moerr_set(e, -EINVAL,
                                         "prompt token %zu (id %d) is outside the vocabulary "
                                         "of model %s (%lld tokens)", i, p->prompt[i], em->id,
                                         (long long)em->m->hp.n_vocab);
        if (sampler_params_check(&p->sampling, e) < 0)
                return -EINVAL;
        r = calloc(1, sizeof *r);
        if (!r)
                return moerr_set(e, -ENOMEM, "out of memory");
        r->g = g;
        r->refs = 2;
        list_init(&r->node);
        list_init(&r->ready_node);
        r->model = p->model;
        r->n_prompt = r->n_tokens = (int64_t)p->n_prompt;
        r->max_tokens = MO_MIN(p->max_tokens, em->n_ctx - r->n_prompt);
        r->cap_tokens = r->n_prompt + MO_MIN(r->max_tokens, 256);
        r->tokens = malloc((size_t)r->cap_tokens * sizeof *r->tokens);
        r->ignore_eos = p->ignore_eos;
        r->tenant = p->tenant;
        r->weight = p->weight;
        r->kv_share = p->kv_share > 0 && p->kv_share < 1 ? p->kv_share : 1;
        r->interactive = p->interactive;
        r->user = p->user;
        r->smp = sampler_new(&p->sampling, em->m->hp.n_vocab);
        r->stop = stop_new(p->stop, p->n_stop);
        r->ts = tok_stream_new(em->m->tok, false);
        r->t_submit = eng_now();
        if (!r->tokens || !r->smp || !r->stop || !r->ts) {
                req_free(r);
                return moerr_set(e, -ENOMEM, "out of memory");
        }
        memcpy(r->tokens, p->prompt, p->n_prompt * sizeof *p->prompt);
        pthread_mutex_lock(&g->lock);
        if (g->stopping) {
                /* No engine thread would ever take it. */
                pthread_mutex_unlock(&g->lock);
                req_free(r);
                return moerr_set(e, -ESHUTDOWN, "the engine is stopping");
        }
        list_add_tail(&g->incoming, &r->node);
        g->stats.waiting++;
        pthread_cond_signal(&g->wake);
        pthread_mutex_unlock(&g->lock);
        *out = r;
        return 0;
}

void eng_cancel(struct eng_req *r, enum eng_finish reason, const char *why)
{
        struct eng *g = r->g;

        pthread_mutex_lock(&g->lock);
        if (!r->cancel && r->finish == ENG_FINISH_NONE) {
                r->cancel = reason == ENG_FINISH_LENGTH ? reason : ENG_FINISH_CANCELLED;
                r->cancel_why = why ? strdup(why) : NULL;
                pthread_cond_signal(&g->wake);
        }
        pthread_mutex_unlock(&g->lock);
}

void eng_req_release(struct eng_req *r)
{
        struct eng *g = r->g;

        pthread_mutex_lock(&g->lock);
        r->released = true;
        if (!r->cancel && r->finish == ENG_FINISH_NONE) {
                r->cancel = ENG_FINISH_CANCELLED;
                pthread_cond_signal(&g->wake);
        }
        if (!list_empty(&r->ready_node)) {
                list_del(&r->ready_node);
                r->refs--;   /* the ready list's reference */
        }
        req_unref_locked(r);
        pthread_mutex_unlock(&g->lock);
}

/* ---- output to the main loop (g->lock held) ---- */

static void wake_main(struct eng *g)
{
        uint64_t one = 1;

        if (write(g->efd, &one, sizeof one) < 0) {
                /* EAGAIN: the counter is saturated, the loop wakes anyway */
        }
}

static void mark_ready_locked(struct eng *g, struct eng_req *r)
{
        if (r->released || !list_empty(&r->ready_node))
                return;
        r->refs++;
        list_add_tail(&g->ready, &r->ready_node);
}

static int out_append_locked(struct eng_req *r, const char *s, size_t n)
{
        if (r->out_len + n > r->out_cap) {
                size_t cap = MO_MAX(r->out_cap * 2, r->out_len + n + 256);
                char *p = malloc(cap);
                if (!p)
                        return -ENOMEM;
                if (r->out) {
                        memcpy(p, r->out, r->out_len);
                        memset(r->out, 0, r->out_cap);
                        free(r->out);
                }
                r->out = p;
                r->out_cap = cap;
        }
        memcpy(r->out + r->out_len, s, n);
        r->out_len += n;
        return 0;
}

/* ---- the engine thread ---- */

/* Where a tenant arriving or coming back from idle starts: the counter of
 * the least-served backlogged tenant or, with none backlogged, the highest
 * counter of all, so that neither idle time nor arriving late banks
 * credit (VTC's counter lift). */
static double vt_floor(const struct eng *g)
{
        double lo = -1, hi = 0;

        for (size_t i = 0; i < g->n_vt; i++) {
                if (g->vt[i].backlog > 0 && (lo < 0 || g->vt[i].served < lo))
                        lo = g->vt[i].served;
                hi = MO_MAX(hi, g->vt[i].served);
        }
        return lo >= 0 ? lo : hi;
}

static struct tenant_vt *vt_get(struct eng *g, uint32_t tenant)
{
        for (size_t i = 0; i < g->n_vt; i++)
                if (g->vt[i].tenant == tenant)
                        return &g->vt[i];
        if (g->n_vt == g->cap_vt) {
                size_t cap = g->cap_vt ? g->cap_vt * 2 : 8;
                struct tenant_vt *v = realloc(g->vt, cap * sizeof *v);
                if (!v)
                        return NULL;
                g->vt = v;
                g->cap_vt = cap;
        }
        g->vt[g->n_vt] = (struct tenant_vt){ .tenant = tenant, .served = vt_floor(g) };
        return &g->vt[g->n_vt++];
}

/* A tenant coming back from idle is lifted to vt_floor. */
static void vt_backlog(struct eng *g, uint32_t tenant, int delta)
{
        struct tenant_vt *v = vt_get(g, tenant);

        if (!v)
                return;
        if (delta > 0 && v->backlog == 0)
                v->served = MO_MAX(v->served, vt_floor(g));
        v->backlog += delta;
}

static void vt_charge(struct eng *g, const struct eng_req *r, int64_t tokens)
{
        struct tenant_vt *v = vt_get(g, r->tenant);

        if (v)
                v->served += (double)tokens / r->weight;
}

static double vt_served(struct eng *g, uint32_t tenant)
{
        struct tenant_vt *v = vt_get(g, tenant);

        return v ? v->served : 0;
}

static int text_append(struct eng_req *r, const char *s, size_t n)
{
        if (r->text_len + n > r->text_cap) {
                size_t cap = MO_MAX(r->text_cap * 2, r->text_len + n + 256);
                char *p = malloc(cap);
                if (!p)
                        return -ENOMEM;
                if (r->text) {
                        memcpy(p, r->text, r->text_len);
                        memset(r->text, 0, r->text_cap);
                        free(r->text);
                }
                r->text = p;
                r->text_cap = cap;
        }
        memcpy(r->text + r->text_len, s, n);
        r->text_len += n;
        return 0;
}

/* Adds detokenized text and runs the stop strings over it. */
static int feed_text(struct eng_req *r, const char *s, size_t n, size_t *emit)
{
        if (r->stopped)
                return 0;
        if (text_append(r, s, n) < 0)
                return -ENOMEM;
        r->stopped = stop_feed(r->stop, s, n, emit);
        return 0;
}

/* Ends a request: frees its cache (zeroed), records usage and queues the
 * final update. Engine thread; takes the lock. */
static void finish(struct eng *g, struct eng_req *r, enum eng_finish f, const char *why)
{
        double now = eng_now();
        size_t emit, stop_emit = r->text_sent;

        if (r->state == REQ_DONE)
                return;
        if (!r->stopped && r->ts) {
                char buf[1024];
                int n;
                while ((n = tok_stream_flush(r->ts, buf, sizeof buf)) > 0)
                        if (feed_text(r, buf, (size_t)n, &stop_emit) < 0)
                                break;
        }
        if (r->state == REQ_WAITING || r->state == REQ_RUNNING)
                vt_backlog(g, r->tenant, -1);
        kv_seq_release(g->models[r->model].kv, &r->kv);
        if (r->state != REQ_NEW)
                list_del(&r->node);
        /* Without a completed stop string, text held back as a possible
         * stop prefix is shown after all. */
        emit = r->stopped ? MO_MAX(stop_emit, r->text_sent) : r->text_len;
        pthread_mutex_lock(&g->lock);
        if (r->state == REQ_NEW)
                list_del(&r->node);
        if (r->state == REQ_RUNNING)
                g->stats.running--;
        else
                g->stats.waiting--;
        r->state = REQ_DONE;
        if (emit > r->text_sent && out_append_locked(r, r->text + r->text_sent,
                                                     emit - r->text_sent) == 0)
                r->text_sent = emit;
        r->finish = f;
        r->why = why ? strdup(why) : NULL;
        r->usage = (struct eng_usage){
                .prompt_tokens = r->n_prompt,
                .completion_tokens = r->generated,
                .queue_s = r->t_sched ? r->t_sched - r->t_submit : now - r->t_submit,
                .first_token_s = r->t_first ? r->t_first - r->t_submit : 0,
                .total_s = now - r->t_submit,
        };
        mark_ready_locked(g, r);
        req_unref_locked(r); /* the engine's reference */
        pthread_mutex_unlock(&g->lock);
}

/* Takes new requests and applies cancellations. Lock held on entry and
 * exit; dropped around finish(). */
static void intake_locked(struct eng *g)
{
        struct link todo;

        list_init(&todo);
        while (!list_empty(&g->incoming)) {
                struct eng_req *r = req_of(g->incoming.next);
                list_del(&r->node);
                list_add_tail(&todo, &r->node);
        }
        pthread_mutex_unlock(&g->lock);
        while (!list_empty(&todo)) {
                struct eng_req *r = req_of(todo.next);
                list_del(&r->node);
                r->state = REQ_WAITING;
                list_add_tail(&g->waiting, &r->node);
                vt_backlog(g, r->tenant, 1);
                if (r->interactive)
                        g->last_interactive = eng_now();
        }
        pthread_mutex_lock(&g->lock);
}

static void apply_cancels(struct eng *g, struct link *l)
{
        for (struct link *n = l->next, *next; n != l; n = next) {
                struct eng_req *r = req_of(n);
                enum eng_finish c;
                char *why;
                next = n->next;
                pthread_mutex_lock(&g->lock);
                c = r->cancel;
                why = TAKE_PTR(r->cancel_why);
                pthread_mutex_unlock(&g->lock);
                if (c)
                        finish(g, r, c, why ? why : c == ENG_FINISH_CANCELLED ?
                                                  "cancelled by the client" : NULL);
                free(why);
        }
}

static bool has_work(struct eng *g)
{
        return !list_empty(&g->waiting) || !list_empty(&g->running);
}

static bool model_has_work(struct eng *g, int model)
{
        for (struct link *n = g->running.next; n != &g->running; n = n->next)
                if (req_of(n)->model == model)
                        return true;
        for (struct link *n = g->waiting.next; n != &g->waiting; n = n->next)
                if (req_of(n)->model == model)
                        return true;
        return false;
}

/* Gives a sequence's cache back; a running one returns to waiting and is
 * prefilled again later from its tokens, a waiting one that was partly
 * prefilled starts its prefill over. */
static void preempt(struct eng *g, int model, struct eng_req *r)
{
        bool running = r->state == REQ_RUNNING;

        kv_seq_release(g->models[model].kv, &r->kv);
        if (running) {
                list_del(&r->node);
                r->state = REQ_WAITING;
                list_add_head(&g->waiting, &r->node);
        }
        pthread_mutex_lock(&g->lock);
        if (running) {
                g->stats.running--;
                g->stats.waiting++;
        }
        g->stats.preemptions++;
        pthread_mutex_unlock(&g->lock);
}

static bool in_batch(const struct eng *g, int n, const struct eng_req *r)
{
        for (int i = 0; i < n; i++)
                if (g->batch_req[i] == r)
                        return true;
        return false;
}

/* Frees the cache of a sequence of the most-served tenant (a partly
 * prefilled waiting one before a running one, the youngest first) so keep
 * can go on; never one of a tenant served less than keep's, which must
 * then wait itself. Never one of the step's first n entries: their blocks are in
 * the batch already. Returns false when nothing can be preempted. */
static bool preempt_one(struct eng *g, int model, const struct eng_req *keep, int n)
{
        struct link *lists[] = { &g->waiting, &g->running };
        struct eng_req *victim = NULL;

        for (size_t k = 0; k < 2; k++)
                for (struct link *l = lists[k]->prev; l != lists[k]; l = l->prev) {
                        struct eng_req *r = req_of(l);
                        if (r->model != model || r == keep || r->kv.n_blocks == 0 ||
                            in_batch(g, n, r) ||
                            vt_served(g, r->tenant) < vt_served(g, keep->tenant))
                                continue;
                        if (!victim || vt_served(g, r->tenant) > vt_served(g, victim->tenant))
                                victim = r;
                }
        if (!victim)
                return false;
        preempt(g, model, victim);
        return true;
}

static int grow_tokens(struct eng_req *r)
{
        int64_t cap;
        int32_t *t;

        if (r->n_tokens < r->cap_tokens)
                return 0;
        cap = r->cap_tokens * 2;
        t = malloc((size_t)cap * sizeof *t);
        if (!t)
                return -ENOMEM;
        memcpy(t, r->tokens, (size_t)r->n_tokens * sizeof *t);
        memset(r->tokens, 0, (size_t)r->cap_tokens * sizeof *t);
        free(r->tokens);
        r->tokens = t;
        r->cap_tokens = cap;
        return 0;
}

/* Appends one sampled token: text, stop strings, limits. */
static void accept_token(struct eng *g, struct eng_req *r, int32_t tok)
{
        const struct eng_model *em = &g->models[r->model];
        char buf[1024];
        size_t emit = r->text_sent;
        int n;

        if (!r->t_first)
                r->t_first = eng_now();
        r->generated++;
        if (!r->ignore_eos && tok_is_eog(em->m->tok, tok)) {
                finish(g, r, ENG_FINISH_STOP, NULL);
                return;
        }
        sampler_accept(r->smp, tok);
        if (grow_tokens(r) < 0) {
                finish(g, r, ENG_FINISH_ERROR, "out of memory");
                return;
        }
        r->tokens[r->n_tokens++] = tok;
        /* A piece longer than buf stays pending in the stream and comes
         * out with the next token, or at the flush in finish(). */
        n = tok_stream_feed(r->ts, tok, buf, sizeof buf);
        if (n > 0 && feed_text(r, buf, (size_t)n, &emit) < 0) {
                finish(g, r, ENG_FINISH_ERROR, "out of memory");
                return;
        }
        pthread_mutex_lock(&g->lock);
        r->out_tokens++;
        if (emit > r->text_sent && out_append_locked(r, r->text + r->text_sent,
                                                     emit - r->text_sent) == 0)
                r->text_sent = emit;
        mark_ready_locked(g, r);
        pthread_mutex_unlock(&g->lock);
        if (r->stopped)
                finish(g, r, ENG_FINISH_STOP, NULL);
        else if (r->generated >= r->max_tokens)
                finish(g, r, ENG_FINISH_LENGTH, r->n_tokens >= em->n_ctx ?
                       "the model's context is full" : NULL);
}

/* Blocks held by a tenant's sequences of one model. */
static int64_t tenant_blocks(struct eng *g, int model, uint32_t tenant)
{
        struct link *lists[] = { &g->waiting, &g->running };
        int64_t n = 0;

        for (size_t k = 0; k < 2; k++)
                for (struct link *l = lists[k]->next; l != lists[k]; l = l->next)
                        if (req_of(l)->model == model && req_of(l)->tenant == tenant)
                                n += req_of(l)->kv.n_blocks;
        return n;
}

/* Sequences of a model holding a place in the batch: running ones and
 * prefills under way. New ones are admitted only below max_running, so
 * every admitted sequence decodes in every step. */
static int64_t admitted(struct eng *g, int model)
{
        struct link *lists[] = { &g->waiting, &g->running };
        int64_t n = 0;

        for (size_t k = 0; k < 2; k++)
                for (struct link *l = lists[k]->next; l != lists[k]; l = l->next)
                        n += req_of(l)->model == model &&
                             (k == 1 || req_of(l)->kv.n_blocks > 0);
        return n;
}

/* Would r's whole prompt take its tenant over its share of the cache? A
 * tenant holding nothing may always start one sequence. */
static bool over_kv_share(struct eng *g, int model, const struct eng_req *r)
{
        const struct kv_config *kc = kv_get_config(g->models[model].kv);
        int64_t held = tenant_blocks(g, model, r->tenant);

        if (r->kv_share >= 1 || held == 0)
                return false;
        return (double)(held + kv_blocks_for_tokens(kc, r->n_tokens)) >
               r->kv_share * (double)kc->n_blocks;
}

/* Before running sequence r takes another block: if that would take its
 * tenant over its KV share, a younger sequence of the tenant gives its
 * blocks back (recomputed when it resumes) -- r itself when it is the
 * youngest, which the caller then preempts (returns true). A tenant's
 * only sequence always may grow, as over_kv_share lets it start. Sequences
 * among the step's first n keep their blocks. */
static bool kv_share_trim(struct eng *g, int model, struct eng_req *r, int n)
{
        const struct kv_config *kc = kv_get_config(g->models[model].kv);
        struct link *lists[] = { &g->waiting, &g->running };
        int64_t need = kv_blocks_for_tokens(kc, r->n_tokens) - r->kv.n_blocks;

        if (r->kv_share >= 1 || need <= 0)
                return false;
        while ((double)(tenant_blocks(g, model, r->tenant) + need) >
               r->kv_share * (double)kc->n_blocks) {
                struct eng_req *victim = NULL;
                for (size_t k = 0; k < 2 && !victim; k++)
                        for (struct link *l = lists[k]->prev; l != lists[k]; l = l->prev) {
                                struct eng_req *o = req_of(l);
                                if (o->model == model && o->tenant == r->tenant &&
                                    o->kv.n_blocks > 0 && !in_batch(g, n, o)) {
                                        victim = o;
                                        break;
                                }
                        }
                if (!victim || tenant_blocks(g, model, r->tenant) == r->kv.n_blocks)
                        return false;
                if (victim == r)
                        return true;
                preempt(g, model, victim);
        }
        return false;
}

/* The waiting sequence to prefill next: the least-served tenant first
 * (weighted virtual tokens, the VTC rule), interactive before batch on a
 * tie, oldest first among equals. Prefills under way always qualify; new
 * sequences only while there is room in the batch and in their tenant's
 * KV share. */
static struct eng_req *next_waiting(struct eng *g, int model)
{
        int64_t in = admitted(g, model);
        /* While interactive tenants are about, batch tenants leave them an
         * eighth of the batch, so an interactive prompt finds a place at
         * once instead of waiting for a batch answer to end. */
        int64_t reserve = eng_now() - g->last_interactive < INTERACTIVE_WINDOW_S ?
                          g->c.max_running / 8 : 0;
        struct eng_req *best = NULL;
        double best_vt = 0;

        for (struct link *n = g->waiting.next; n != &g->waiting; n = n->next) {
                struct eng_req *r = req_of(n);
                bool started = r->kv.n_blocks > 0;
                bool room = in < g->c.max_running - (r->interactive ? 0 : reserve);
                double vt;
                if (r->model != model || (!started && (!room || over_kv_share(g, model, r))))
                        continue;
                vt = vt_served(g, r->tenant);
                if (!best || vt < best_vt - 1e-9 ||
                    (vt < best_vt + 1e-9 && r->interactive && !best->interactive)) {
                        best = r;
                        best_vt = vt;
                }
        }
        return best;
}

static bool batch_running(struct eng *g, int model)
{
        for (struct link *l = g->running.next; l != &g->running; l = l->next)
                if (req_of(l)->model == model && !req_of(l)->interactive)
                        return true;
        return false;
}

/* The sequence to give up so that waiting r gets need blocks: the youngest
 * of the most-served tenant that is served no less than r's and holds more
 * of the cache than r's would with them (so two tenants do not take blocks
 * back and forth), or NULL. */
static struct eng_req *room_victim(struct eng *g, int model, const struct eng_req *r,
                                   int64_t need)
{
        struct link *lists[] = { &g->waiting, &g->running };
        int64_t mine = tenant_blocks(g, model, r->tenant) + need;
        double vt_r = vt_served(g, r->tenant);
        struct eng_req *victim = NULL;

        for (size_t k = 0; k < 2; k++)
                for (struct link *l = lists[k]->prev; l != lists[k]; l = l->prev) {
                        struct eng_req *o = req_of(l);
                        double vt = vt_served(g, o->tenant);
                        if (o->model != model || o->tenant == r->tenant ||
                            o->kv.n_blocks == 0 || vt < vt_r ||
                            (victim && vt <= vt_served(g, victim->tenant)) ||
                            tenant_blocks(g, model, o->tenant) <= mine)
                                continue;
                        victim = o;
                }
        return victim;
}

/* Under KV pressure, the waiting sequence that goes next (the least-served
 * tenant's, next_waiting) takes its blocks from a more-served tenant's
 * sequences rather than waiting for them to finish. Runs before the step
 * is built, when no sequence is in it yet. */
static void make_room(struct eng *g, int model)
{
        struct kv_cache *kv = g->models[model].kv;
        struct eng_req *r = next_waiting(g, model), *victim;
        int64_t need;

        if (!r || r->kv.n_blocks > 0)
                return;
        need = kv_blocks_for_tokens(kv_get_config(kv), r->n_tokens);
        while (kv_free_blocks(kv) < need && (victim = room_victim(g, model, r, need)))
                preempt(g, model, victim);
        /* Its blocks now, before the step's decodes can take them. */
        if (kv_free_blocks(kv) >= need)
                kv_seq_reserve(kv, &r->kv, r->n_tokens);
}

/* Is an interactive tenant's prompt next in line? Then the step is theirs
 * alone: batch tenants' decodes and prefills sit out one step, so the
 * interactive answer's first token does not wait behind a full batch. */
static bool interactive_next(struct eng *g, int model)
{
        struct eng_req *r = next_waiting(g, model);

        return r && r->interactive && !list_empty(&g->running) && batch_running(g, model);
}

/* A waiting sequence of the model holding the blocks of its whole
 * prefill (one under way), or NULL. */
static struct eng_req *prefill_holder(struct eng *g, int model)
{
        for (struct link *n = g->waiting.next; n != &g->waiting; n = n->next) {
                struct eng_req *r = req_of(n);
                if (r->model == model && r->kv.n_blocks > 0 &&
                    r->kv.n_blocks * KV_BLOCK_TOKENS >= r->n_tokens)
                        return r;
        }
        return NULL;
}

/* Builds one step: a decode token for every running sequence, then prefill
 * chunks while the budget lasts. Returns the number of sequences. */
static int build_step(struct eng *g, int model)
{
        struct eng_model *em = &g->models[model];
        int64_t budget = g->c.step_tokens, batch_budget;
        bool urgent;
        int n = 0;

        make_room(g, model);
        urgent = interactive_next(g, model);
        /* Short steps while interactive tenants are about: a batch prompt
         * is prefilled in smaller chunks, so an interactive request never
         * waits long for the step in flight to end. */
        batch_budget = eng_now() - g->last_interactive < INTERACTIVE_WINDOW_S ?
                       MO_MAX(budget / 8, 1) : budget;
        for (struct link *l = g->running.next, *next; l != &g->running; l = next) {
                struct eng_req *r = req_of(l);
                next = l->next;
                if (r->model != model || n >= g->c.max_running || budget <= 0 ||
                    (urgent && !r->interactive))
                        continue;
                if (kv_share_trim(g, model, r, n)) {
                        next = l->next;
                        preempt(g, model, r);
                        continue;
                }
                while (kv_seq_reserve(em->kv, &r->kv, r->n_tokens) == -ENOSPC)
                        if (!preempt_one(g, model, r, n))
                                break;
                next = l->next; /* preemption may have moved the next one */
                if (r->kv.n_blocks * KV_BLOCK_TOKENS < r->n_tokens) {
                        /* The sequences already in this step, or less-served
                         * tenants' ones, hold the rest of the cache: r waits
                         * for them. Only what cannot fit alone fails. */
                        if (kv_blocks_for_tokens(kv_get_config(em->kv), r->n_tokens) <=
                            kv_used_blocks(em->kv) + kv_free_blocks(em->kv))
                                preempt(g, model, r);
                        else
                                finish(g, r, ENG_FINISH_ERROR, "the KV cache is too small");
                        continue;
                }
                g->batch_req[n] = r;
                g->batch[n++] = (struct fwd_seq){
                        .kv = &r->kv,
                        .tokens = r->tokens + r->n_tokens - 1,
                        .n_tokens = 1,
                        .pos0 = r->n_tokens - 1,
                };
                budget--;
        }
        g->n_decode = n;
        while (budget > 0 && n < g->c.max_running) {
                struct eng_req *r = next_waiting(g, model);
                int64_t chunk;
                bool dup = false;
                if (!r || (urgent && !r->interactive))
                        break;
                for (int i = 0; i < n; i++)
                        dup |= g->batch_req[i] == r;
                if (dup)
                        break;
                /* Blocks for the whole sequence at its first chunk: a prefill
                 * under way never waits halfway for blocks that others hold. */
                if (kv_seq_reserve(em->kv, &r->kv, r->n_tokens) < 0) {
                        if (kv_blocks_for_tokens(kv_get_config(em->kv), r->n_tokens) >
                            kv_used_blocks(em->kv) + kv_free_blocks(em->kv)) {
                                finish(g, r, ENG_FINISH_ERROR,
                                       "the prompt does not fit in the KV cache");
                                continue;
                        }
                        /* r waits for blocks; prefills under way go on. */
                        r = prefill_holder(g, model);
                        if (!r)
                                break;
                        dup = false;
                        for (int i = 0; i < n; i++)
                                dup |= g->batch_req[i] == r;
                        if (dup)
                                break;
                }
                chunk = MO_MIN(r->n_tokens - r->kv.n_tokens,
                               r->interactive ? budget : MO_MIN(budget, batch_budget));
                if (chunk <= 0)
                        break;
                if (!r->interactive)
                        batch_budget -= chunk;
                if (!r->t_sched)
                        r->t_sched = eng_now();
                g->batch_req[n] = r;
                g->batch[n++] = (struct fwd_seq){
                        .kv = &r->kv,
                        .tokens = r->tokens + r->kv.n_tokens,
                        .n_tokens = chunk,
                        .pos0 = r->kv.n_tokens,
                };
                budget -= chunk;
                /* Move it aside so next_waiting looks further. */
                list_del(&r->node);
                list_add_tail(&g->running, &r->node);
                r->state = REQ_RUNNING;
                pthread_mutex_lock(&g->lock);
                g->stats.waiting--;
                g->stats.running++;
                pthread_mutex_unlock(&g->lock);
        }
        return n;
}

static void record_step(struct eng *g, double dt, int64_t prefilled, int64_t generated)
{
        int b = 0;

        while (b < 11 && dt > eng_step_hist_bounds[b])
                b++;
        pthread_mutex_lock(&g->lock);
        g->stats.steps++;
        g->stats.step_hist[b]++;
        g->stats.step_sum_s += dt;
        g->stats.busy_s += dt;
        g->stats.tokens_prefilled += prefilled;
        g->stats.tokens_generated += generated;
        pthread_mutex_unlock(&g->lock);
}

static void run_step(struct eng *g, int model)
{
        struct eng_model *em = &g->models[model];
        int64_t V = em->m->hp.n_vocab, prefilled = 0, generated = 0;
        struct moerr e = { { 0 } };
        double t0 = eng_now();
        int n = build_step(g, model);
        /* Read the logits where the forward pass left them when the host
         * can, rather than keep a second copy of the whole batch's. */
        bool in_place = fwd_logits_in_place(em->f);
        float *logits;

        if (n == 0)
                return;
        if (fwd_step(em->f, em->kv, g->batch, n, in_place ? NULL : g->logits, &e) < 0) {
                for (int i = 0; i < n; i++)
                        finish(g, g->batch_req[i], ENG_FINISH_ERROR, e.msg);
                return;
        }
        logits = in_place ? fwd_logits(em->f) : g->logits;
        for (int i = 0; i < n; i++) {
                struct eng_req *r = g->batch_req[i];
                vt_charge(g, r, g->batch[i].n_tokens);
                if (i >= g->n_decode)
                        prefilled += g->batch[i].n_tokens;
                if (r->kv.n_tokens < r->n_tokens) {
                        /* Prefill continues next step: back to waiting. */
                        list_del(&r->node);
                        list_add_head(&g->waiting, &r->node);
                        r->state = REQ_WAITING;
                        pthread_mutex_lock(&g->lock);
                        g->stats.running--;
                        g->stats.waiting++;
                        pthread_mutex_unlock(&g->lock);
                        continue;
                }
                generated++;
                accept_token(g, r, sampler_sample(r->smp, logits + (int64_t)i * V));
        }
        record_step(g, eng_now() - t0, prefilled, generated);
}

static void finish_all(struct eng *g, struct link *l, enum eng_finish f, const char *why)
{
        while (!list_empty(l))
                finish(g, req_of(l->next), f, why);
}

static void *engine_main(void *arg)
{
        struct eng *g = arg;

        pthread_mutex_lock(&g->lock);
        for (;;) {
                beat(g);
                intake_locked(g);
                if (g->stopping)
                        break;
                pthread_mutex_unlock(&g->lock);
                apply_cancels(g, &g->waiting);
                apply_cancels(g, &g->running);
                if (has_work(g)) {
                        size_t m = g->next_model;
                        for (size_t k = 0; k < g->n_models; k++) {
                                size_t i = (g->next_model + k) % g->n_models;
                                if (model_has_work(g, (int)i)) {
                                        m = i;
                                        break;
                                }
                        }
                        g->next_model = (m + 1) % g->n_models;
                        run_step(g, (int)m);
                }
                pthread_mutex_lock(&g->lock);
                if (!list_empty(&g->ready))
                        wake_main(g);
                if (!has_work(g) && list_empty(&g->incoming) && !g->stopping) {
                        struct timespec ts;
                        double t = 0;
                        clock_gettime(CLOCK_REALTIME, &ts);
                        t = ts.tv_sec + ts.tv_nsec * 1e-9 + g->c.heartbeat_s;
                        ts.tv_sec = (time_t)t;
                        ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
                        pthread_cond_timedwait(&g->wake, &g->lock, &ts);
                }
        }
        pthread_mutex_unlock(&g->lock);
        finish_all(g, &g->waiting, ENG_FINISH_SHUTDOWN, "the daemon is stopping");
        finish_all(g, &g->running, ENG_FINISH_SHUTDOWN, "the daemon is stopping");
        pthread_mutex_lock(&g->lock);
        wake_main(g);
        pthread_mutex_unlock(&g->lock);
        return NULL;
}

int eng_start(struct eng *g, struct moerr *e)
{
        int64_t V = 0;
        int ret;

        if (g->n_models == 0)
                return moerr_set(e, -EINVAL, "no model to serve");
        for (size_t i = 0; i < g->n_models; i++)
                V = MO_MAX(V, g->models[i].m->hp.n_vocab);
        g->logits = malloc((size_t)(g->c.max_running * V) * sizeof *g->logits);
        g->batch = calloc((size_t)g->c.max_running, sizeof *g->batch);
        g->batch_req = calloc((size_t)g->c.max_running, sizeof *g->batch_req);
        if (!g->logits || !g->batch || !g->batch_req)
                return moerr_set(e, -ENOMEM, "out of memory for %lld logits rows",
                                 (long long)g->c.max_running);
        if ((ret = pthread_create(&g->thread, NULL, engine_main, g)) != 0)
                return moerr_set(e, -ret, "cannot start the engine thread: %s", strerror(ret));
        g->started = true;
        return 0;
}

void eng_stop(struct eng *g)
{
        if (!g->started)
                return;
        pthread_mutex_lock(&g->lock);
        g->stopping = true;
        pthread_cond_signal(&g->wake);
        pthread_mutex_unlock(&g->lock);
        pthread_join(g->thread, NULL);
        g->started = false;
}

void eng_free(struct eng *g)
{
        if (!g)
                return;
        eng_stop(g);
        /* Requests never seen by the engine, and undelivered updates. */
        pthread_mutex_lock(&g->lock);
        while (!list_empty(&g->ready)) {
                struct eng_req *r = container_of(g->ready.next, struct eng_req, ready_node);
                list_del(&r->ready_node);
                req_unref_locked(r);
        }
        pthread_mutex_unlock(&g->lock);
        for (size_t i = 0; i < g->n_models; i++) {
                struct eng_model *em = &g->models[i];
                fwd_free(em->f);
                kv_free(em->kv);
                model_free(em->m);
                free(em->id);
                free(em->path);
        }
        free(g->models);
        free(g->logits);
        free(g->batch);
        free(g->batch_req);
        free(g->vt);
        mo_backend_free(g->b);
        if (g->efd >= 0)
                close(g->efd);
        pthread_mutex_destroy(&g->lock);
        pthread_cond_destroy(&g->wake);
        free(g);
}

/* ---- main loop side ---- */

int eng_event_fd(const struct eng *g) { return g->efd; }

void eng_dispatch(struct eng *g, eng_update_fn fn, void *ud)
{
        struct link todo;
        uint64_t v;

        if (read(g->efd, &v, sizeof v) < 0) {
                /* EAGAIN: nothing counted, look anyway */
        }
        list_init(&todo);
        pthread_mutex_lock(&g->lock);
        while (!list_empty(&g->ready)) {
                struct link *l = g->ready.next;
                list_del(l);
                list_add_tail(&todo, l);
        }
        while (!list_empty(&todo)) {
                struct eng_req *r = container_of(todo.next, struct eng_req, ready_node);
                struct eng_update u = { 0 };
                char *text;
                list_del(&r->ready_node);
                if (r->released || r->final_sent) {
                        req_unref_locked(r);
                        continue;
                }
                text = TAKE_PTR(r->out);
                u.text = text;
                u.len = r->out_len;
                u.new_tokens = r->out_tokens;
                u.finish = r->finish;
                u.why = r->why;
                u.usage = r->usage;
                r->final_sent = r->finish != ENG_FINISH_NONE;
                size_t cap = r->out_cap;
                r->out_len = r->out_cap = 0;
                r->out_tokens = 0;
                pthread_mutex_unlock(&g->lock);
                fn(r, r->user, &u, ud);
                if (text) {
                        memset(text, 0, cap);
                        free(text);
                }
                pthread_mutex_lock(&g->lock);
                req_unref_locked(r); /* the ready list's reference */
        }
        pthread_mutex_unlock(&g->lock);
}

void eng_get_stats(struct eng *g, struct eng_stats *out)
{
        pthread_mutex_lock(&g->lock);
        *out = g->stats;
        pthread_mutex_unlock(&g->lock);
}
