/* moed-run: generates text from a model file without the daemon. Raw
 * completion by default (BOS as the file says, only the continuation on
 * stdout); --chat wraps the prompt in the model's conversation format. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cleanup.h"
#include "engine/chat.h"
#include "engine/gguf.h"
#include "engine/sampler.h"
#include "engine/tokenizer.h"
#include "tools/runner.h"

struct run_opts {
        const char *model, *prompt, *system;
        int64_t n_predict;
        int threads;
        bool chat, verbose;
        struct sampler_params sp;
        const char *stops[16];
        size_t n_stops;
};

static void usage(FILE *out)
{
        fprintf(out,
                "usage: moed-run --model FILE --prompt TEXT [-n N] [options]\n"
                "  -m, --model FILE      GGUF model (architecture deepseek2)\n"
                "  -p, --prompt TEXT     prompt text\n"
                "  -n, --n-predict N     tokens to generate (default 64)\n"
                "      --chat            format the prompt as a user turn of the model's chat format\n"
                "      --system TEXT     system message (with --chat)\n"
                "  -t, --threads N       CPU threads (default: all)\n"
                "      --temp T          temperature (0 = greedy; default 0.8)\n"
                "      --top-k K  --top-p P  --min-p P  --repeat-penalty R\n"
                "      --presence-penalty P  --frequency-penalty P\n"
                "      --seed S          seed of the sampler (default 42)\n"
                "      --stop TEXT       stop string (repeatable)\n"
                "  -v, --verbose         timings on stderr\n");
}

static int parse_float(const char *s, float *v)
{
        char *end;

        errno = 0;
        *v = strtof(s, &end);
        return errno || *end || end == s ? -EINVAL : 0;
}

static int parse_args(int argc, char **argv, struct run_opts *o)
{
        enum { O_CHAT = 256, O_SYSTEM, O_TEMP, O_TOPK, O_TOPP, O_MINP, O_REP, O_PRES, O_FREQ, O_SEED, O_STOP };
        static const struct option opts[] = {
                { "model", required_argument, NULL, 'm' }, { "prompt", required_argument, NULL, 'p' },
                { "n-predict", required_argument, NULL, 'n' }, { "threads", required_argument, NULL, 't' },
                { "chat", no_argument, NULL, O_CHAT }, { "system", required_argument, NULL, O_SYSTEM },
                { "temp", required_argument, NULL, O_TEMP }, { "top-k", required_argument, NULL, O_TOPK },
                { "top-p", required_argument, NULL, O_TOPP }, { "min-p", required_argument, NULL, O_MINP },
                { "repeat-penalty", required_argument, NULL, O_REP },
                { "presence-penalty", required_argument, NULL, O_PRES },
                { "frequency-penalty", required_argument, NULL, O_FREQ },
                { "seed", required_argument, NULL, O_SEED }, { "stop", required_argument, NULL, O_STOP },
                { "verbose", no_argument, NULL, 'v' }, { "help", no_argument, NULL, 'h' }, {}
        };
        int c, bad = 0;

        sampler_params_default(&o->sp);
        o->sp.temperature = 0.8f;
        o->sp.seed = 42;
        o->n_predict = 64;
        while ((c = getopt_long(argc, argv, "m:p:n:t:vh", opts, NULL)) != -1) {
                switch (c) {
                case 'm': o->model = optarg; break;
                case 'p': o->prompt = optarg; break;
                case 'n': o->n_predict = strtoll(optarg, NULL, 10); break;
                case 't': bad |= runner_parse_threads(optarg, &o->threads); break;
                case 'v': o->verbose = true; break;
                case O_CHAT: o->chat = true; break;
                case O_SYSTEM: o->system = optarg; break;
                case O_TEMP: bad |= parse_float(optarg, &o->sp.temperature); break;
                case O_TOPK: o->sp.top_k = (int32_t)strtol(optarg, NULL, 10); break;
                case O_TOPP: bad |= parse_float(optarg, &o->sp.top_p); break;
                case O_MINP: bad |= parse_float(optarg, &o->sp.min_p); break;
                case O_REP: bad |= parse_float(optarg, &o->sp.repeat_penalty); break;
                case O_PRES: bad |= parse_float(optarg, &o->sp.presence_penalty); break;
                case O_FREQ: bad |= parse_float(optarg, &o->sp.frequency_penalty); break;
                case O_SEED: o->sp.seed = strtoull(optarg, NULL, 10); break;
                case O_STOP:
                        if (o->n_stops < ARRAY_SIZE(o->stops))
                                o->stops[o->n_stops++] = optarg;
                        break;
                case 'h': usage(stdout); exit(0);
                default: usage(stderr); return -EINVAL;
                }
        }
        if (bad || !o->model || !o->prompt || o->n_predict < 0 || optind != argc) {
                if (bad)
                        fprintf(stderr, "moed-run: a numeric option has a bad value\n");
                usage(stderr);
                return -EINVAL;
        }
        return 0;
}

/* The prompt as token ids: raw text with BOS as the model says, or a chat
 * turn whose rendered text carries its own BOS. */
static int prompt_tokens(const struct run_opts *o, const struct mo_model *m, int32_t **ids, size_t *n,
                         struct moerr *e)
{
        _cleanup_free_ char *text = NULL;
        struct chat_msg msgs[2];
        size_t k = 0;
        int r;

        if (!o->chat)
                return tok_encode(m->tok, o->prompt, strlen(o->prompt), tok_add_bos(m->tok), false, ids, n, e);
        if (o->system)
                msgs[k++] = (struct chat_msg){ "system", o->system };
        msgs[k++] = (struct chat_msg){ "user", o->prompt };
        r = chat_render(chat_format_detect(m->file), msgs, k, true, &text, e);
        if (r < 0)
                return r;
        return tok_encode(m->tok, text, strlen(text), false, true, ids, n, e);
}

struct text_buf {
        char *s;
        size_t len, cap, shown;
};

static int text_append(struct text_buf *t, const char *p, size_t n)
{
        if (t->len + n + 1 > t->cap) {
                size_t cap = 2 * (t->len + n + 1);
                char *ns = realloc(t->s, cap);
                if (!ns)
                        return -ENOMEM;
                t->s = ns;
                t->cap = cap;
        }
        memcpy(t->s + t->len, p, n);
        t->len += n;
        return 0;
}

/* Shows the text up to emit, the part no stop string can still claim. */
static void text_show(struct text_buf *t, size_t emit)
{
        if (emit > t->shown) {
                fwrite(t->s + t->shown, 1, emit - t->shown, stdout);
                fflush(stdout);
                t->shown = emit;
        }
}

/* Feeds detokenized bytes through the stop matcher; true once stopped. */
static bool text_feed(struct text_buf *t, struct stop_matcher *sm, const char *p, int n, int *err)
{
        size_t emit;
        bool stop;

        if (n <= 0)
                return false;
        if ((*err = text_append(t, p, n)) < 0)
                return true;
        stop = stop_feed(sm, p, n, &emit);
        text_show(t, emit);
        return stop;
}

static int generate(const struct run_opts *o, struct runner *r, const int32_t *prompt, size_t n_prompt,
                    struct moerr *e)
{
        struct mo_model *m = r->m;
        _cleanup_free_ float *logits = malloc(m->hp.n_vocab * sizeof(float));
        struct sampler *s = sampler_new(&o->sp, m->hp.n_vocab);
        struct tok_stream *ts = tok_stream_new(m->tok, false);
        struct stop_matcher *sm = stop_new(o->stops, o->n_stops);
        struct kv_seq seq = {0};
        struct text_buf text = {0};
        double t0 = runner_now(), t1;
        bool stopped = false;
        int64_t n_gen = 0;
        int ret, err = 0;

        if (!logits || !s || !ts || !sm) {
                ret = moerr_set(e, -ENOMEM, "out of memory");
                goto out;
        }
        for (size_t i = 0; i < n_prompt; i++)
                sampler_accept(s, prompt[i]);
        ret = runner_feed(r, &seq, prompt, (int64_t)n_prompt, false, logits, e);
        t1 = runner_now();
        while (ret >= 0 && !stopped && n_gen < o->n_predict) {
                char piece[256];
                int32_t tok = sampler_sample(s, logits);

                n_gen++;
                if (tok_is_eog(m->tok, tok))
                        break;
                sampler_accept(s, tok);
                stopped = text_feed(&text, sm, piece, tok_stream_feed(ts, tok, piece, sizeof piece), &err);
                if (!stopped && n_gen < o->n_predict)
                        ret = runner_feed(r, &seq, &tok, 1, false, logits, e);
        }
        if (ret >= 0 && !stopped) {
                char tail[64];
                stopped = text_feed(&text, sm, tail, tok_stream_flush(ts, tail, sizeof tail), &err);
                if (!stopped)
                        text_show(&text, text.len); /* nothing held back can become a stop now */
        }
        if (ret >= 0 && err < 0)
                ret = moerr_set(e, err, "out of memory");
        if (ret >= 0) {
                fputc('\n', stdout);
                fflush(stdout); /* before the timings on stderr */
        }
        if (o->verbose && ret >= 0) {
                double t2 = runner_now();
                fprintf(stderr, "moed-run: load %.2f s, prompt %zu tokens in %.3f s (%.1f tok/s), "
                        "generated %lld tokens in %.3f s (%.2f tok/s)\n", r->load_s, n_prompt, t1 - t0,
                        n_prompt / (t1 - t0), (long long)n_gen, t2 - t1, n_gen / (t2 - t1));
        }
out:
        free(text.s);
        kv_seq_release(r->kv, &seq);
        stop_free(sm);
        tok_stream_free(ts);
        sampler_free(s);
        return ret;
}

int main(int argc, char **argv)
{
        struct run_opts o = {0};
        struct moerr e = {0};
        struct runner *r = NULL;
        _cleanup_free_ int32_t *ids = NULL;
        size_t n = 0;
        int ret;

        if (parse_args(argc, argv, &o) < 0)
                return 2;
        if ((ret = sampler_params_check(&o.sp, &e)) < 0) {
                fprintf(stderr, "moed-run: %s\n", e.msg);
                return 2;
        }
        ret = runner_open(o.model, o.threads, 0, 256, &r, &e);
        if (ret >= 0)
                ret = prompt_tokens(&o, r->m, &ids, &n, &e);
        if (ret >= 0 && (int64_t)n + o.n_predict > r->m->hp.n_ctx_train)
                ret = moerr_set(&e, -E2BIG, "prompt (%zu tokens) plus %lld to generate exceed the model's "
                                "context of %lld", n, (long long)o.n_predict, (long long)r->m->hp.n_ctx_train);
        if (ret >= 0) /* now that the sizes are known, the cache fits them exactly */
                ret = runner_set_cache(r, (int64_t)n + o.n_predict + 1, &e);
        if (ret >= 0)
                ret = generate(&o, r, ids, n, &e);
        if (ret < 0)
                fprintf(stderr, "moed-run: %s\n", e.msg);
        runner_close(r);
        return ret < 0 ? 1 : 0;
}
