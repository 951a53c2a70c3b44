/* api: the engine as the daemon sees it. Loaded models, one engine thread
 * running the step loop (continuous batching: decode tokens of running
 * sequences and chunked prefill of waiting ones share each step), and
 * requests whose output the main loop collects.
 *
 * Threading contract: every function here is called from one thread (the
 * main loop) except where noted; the engine thread talks back only through
 * eng_event_fd() becoming readable, after which the main loop calls
 * eng_dispatch(). Nothing here blocks on clients. */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/moerr.h"
#include "engine/chat.h"
#include "engine/sampler.h"

struct eng;
struct eng_req;

struct eng_config {
        int threads;              /* CPU worker threads; 0: one per online CPU */
        uint64_t kv_bytes;        /* KV cache per model; 0: enough for 4 full contexts */
        int64_t step_tokens;      /* token budget of one step (decode + prefill); 0: 256 */
        int64_t max_running;      /* sequences decoding at once; 0: 64 */
        int64_t max_context;      /* cap on a model's context; 0: the model's own */
        double heartbeat_s;       /* the idle engine wakes this often to beat; 0: 1 s */
};

/* Loading progress, called on the loading thread: fraction in [0, 1]. */
typedef void (*eng_progress_fn)(const char *model_id, double fraction, void *ud);

int eng_new(const struct eng_config *c, struct eng **out, struct moerr *e);
/* Loads a model under the id clients will ask for. Before eng_start only. */
int eng_add_model(struct eng *g, const char *id, const char *path, eng_progress_fn progress,
                  void *ud, struct moerr *e);
/* The same, loading from load_path (say /proc/self/fd/N of a file the
 * residency check opened) while reports show shown_path. */
int eng_add_model_as(struct eng *g, const char *id, const char *load_path,
                     const char *shown_path, eng_progress_fn progress, void *ud,
                     struct moerr *e);
/* Starts the engine thread. */
int eng_start(struct eng *g, struct moerr *e);
/* Stops the thread: requests still running finish with ENG_FINISH_SHUTDOWN
 * (their final events are dispatched by the next eng_dispatch). */
void eng_stop(struct eng *g);
/* Stops if needed and frees everything. Requests still referenced by the
 * caller must have been released before. */
void eng_free(struct eng *g);

/* Models, in the order added. */
struct eng_model_info {
        const char *id;           /* the config's name, what clients ask for */
        const char *name;         /* general.name of the file */
        const char *path;
        int64_t n_ctx;            /* usable context (tokens) */
        int64_t n_vocab;
        uint64_t weight_bytes;
        int64_t n_params_expert, n_expert, n_expert_used, n_layer;
        enum chat_format chat;
        int64_t kv_blocks_total, kv_blocks_used, kv_block_tokens;
};
size_t eng_model_count(const struct eng *g);
/* i < eng_model_count; the kv counts are a snapshot. */
void eng_model_get(struct eng *g, size_t i, struct eng_model_info *out);
/* Index of a model by id, or -1. */
int eng_model_find(const struct eng *g, const char *id);

/* Tokenizing and chat formatting, on the caller's thread (read-only use of
 * the model's tokenizer, safe beside the engine thread). */
int eng_render_chat(struct eng *g, int model, const struct chat_msg *msgs, size_t n,
                    char **text, struct moerr *e);
/* add_bos: as the model file says; parse_special: chat-rendered text only. */
int eng_tokenize(struct eng *g, int model, const char *text, size_t len, bool parse_special,
                 bool add_bos, int32_t **ids, size_t *n, struct moerr *e);
/* The text of one token (for the tokenize endpoint); bytes written or <0. */
int eng_token_piece(struct eng *g, int model, int32_t id, char *buf, size_t cap);

struct eng_params {
        int model;                /* index from eng_model_find */
        const int32_t *prompt;    /* copied */
        size_t n_prompt;
        int64_t max_tokens;       /* tokens to generate; > 0 */
        struct sampler_params sampling;
        const char *const *stop;  /* stop strings, copied */
        size_t n_stop;
        bool ignore_eos;
        uint32_t tenant;          /* opaque to the engine: fair-share key */
        double weight;            /* tenant's share under contention; > 0 */
        double kv_share;          /* most of the KV cache the tenant may hold,
                                     (0, 1]; 0 or 1: no cap */
        bool interactive;         /* preferred over batch tenants on a tie */
        void *user;               /* handed back in events */
};

enum eng_finish {
        ENG_FINISH_NONE = 0,      /* still running */
        ENG_FINISH_STOP,          /* end-of-generation token or stop string */
        ENG_FINISH_LENGTH,        /* max_tokens or the context is full */
        ENG_FINISH_CANCELLED,     /* eng_cancel (client gone, drained, asked) */
        ENG_FINISH_SHUTDOWN,      /* the engine stopped */
        ENG_FINISH_ERROR,         /* the engine failed on this request */
};
const char *eng_finish_name(enum eng_finish f); /* "stop", "length", ... */

struct eng_usage {
        int64_t prompt_tokens, completion_tokens;
        double queue_s;           /* submit to first scheduled */
        double first_token_s;     /* submit to first generated token */
        double total_s;           /* submit to finish */
};

/* Queues a request; the engine takes it on its next step. The returned
 * handle is the caller's until eng_req_release. -EINVAL with a message for
 * a prompt that does not fit the model's context or bad parameters. */
int eng_submit(struct eng *g, const struct eng_params *p, struct eng_req **out,
               struct moerr *e);
/* Asks the engine to end the request; it finishes with reason (CANCELLED
 * or LENGTH) within one step. Safe to call more than once. */
void eng_cancel(struct eng_req *r, enum eng_finish reason, const char *why);
/* Drops the caller's handle (cancelling first if still running); no event
 * for it is dispatched afterwards. */
void eng_req_release(struct eng_req *r);

/* One batch of output of one request. text holds the newly visible bytes
 * (whole UTF-8 characters, stop strings held back and never shown); it is
 * valid during the callback only. */
struct eng_update {
        const char *text;
        size_t len;
        int64_t new_tokens;       /* tokens generated since the last update */
        enum eng_finish finish;   /* NONE while running */
        const char *why;          /* detail for CANCELLED/LENGTH/ERROR, or NULL */
        struct eng_usage usage;   /* final when finish != NONE */
};
typedef void (*eng_update_fn)(struct eng_req *r, void *user, const struct eng_update *u,
                              void *ud);

/* Readable when updates wait; eng_dispatch clears it. */
int eng_event_fd(const struct eng *g);
/* Delivers every pending update, in order per request; a request's final
 * update comes last. The callback may call eng_cancel/eng_req_release on
 * any request. */
void eng_dispatch(struct eng *g, eng_update_fn fn, void *ud);

/* Monotonic seconds of the engine thread's last heartbeat (it beats every
 * step and at least every heartbeat_s when idle): the watchdog pings only
 * while this is recent. Any thread. */
double eng_heartbeat(const struct eng *g);

struct eng_stats {
        int64_t waiting, running;     /* sequences */
        int64_t steps;
        int64_t tokens_prefilled, tokens_generated;
        double busy_s;                /* time inside steps */
        /* step time histogram: counts of steps <= bounds[i] seconds */
        int64_t step_hist[12];
        double step_sum_s;
        int64_t preemptions;
};
extern const double eng_step_hist_bounds[12];
/* A snapshot; any thread. */
void eng_get_stats(struct eng *g, struct eng_stats *out);

double eng_now(void); /* monotonic seconds */
