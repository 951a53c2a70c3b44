/* moed-bench: prefill and decode speed of a model on the CPU backend, and
 * how close decoding comes to the machine's memory bandwidth: the tool
 * measures that bandwidth itself (a parallel streaming read) and reports the
 * weight bytes each decoded token reads, so results are ratios to a limit
 * measured on the same machine, not bare numbers. */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/cleanup.h"
#include "engine/tokenizer.h"
#include "kernels/backend.h"
#include "tools/runner.h"

struct bench_opts {
        const char *model;
        int threads;
        int64_t prompt, gen, batch, context;
        int repeat;
        bool json;
};

struct bw_arg {
        const uint64_t *p;
        size_t n;
        uint64_t sum;
};

static void *bw_read(void *arg)
{
        struct bw_arg *a = arg;
        uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;

        for (size_t i = 0; i + 4 <= a->n; i += 4) {
                s0 += a->p[i];
                s1 += a->p[i + 1];
                s2 += a->p[i + 2];
                s3 += a->p[i + 3];
        }
        a->sum = s0 ^ s1 ^ s2 ^ s3;
        return NULL;
}

/* Best of several parallel reads of a buffer far larger than the caches. */
static double measure_read_gbps(int threads)
{
        size_t bytes = (size_t)1 << 30, n = bytes / sizeof(uint64_t);
        uint64_t *buf = aligned_alloc(64, bytes), sink = 0;
        struct bw_arg args[256];
        pthread_t tid[256];
        double best = 0;

        if (!buf)
                return 0;
        for (size_t i = 0; i < n; i++)
                buf[i] = i * 0x9E3779B97F4A7C15ull;
        threads = MO_MAX(1, MO_MIN(threads, 256));
        for (int rep = 0; rep < 5; rep++) {
                double t0 = runner_now();
                for (int t = 0; t < threads; t++) {
                        args[t] = (struct bw_arg){ buf + n / threads * t, n / threads, 0 };
                        pthread_create(&tid[t], NULL, bw_read, &args[t]);
                }
                for (int t = 0; t < threads; t++) {
                        pthread_join(tid[t], NULL);
                        sink ^= args[t].sum;
                }
                best = MO_MAX(best, bytes / (runner_now() - t0) / 1e9);
        }
        free(buf);
        return sink == 42 ? best + 1e-12 : best; /* keeps the sums alive */
}

static void random_tokens(int32_t *t, int64_t n, int64_t n_vocab, uint64_t *state)
{
        for (int64_t i = 0; i < n; i++) {
                *state = *state * 6364136223846793005ull + 1442695040888963407ull;
                t[i] = (int32_t)(3 + (*state >> 33) % (uint64_t)(n_vocab - 3));
        }
}

/* Gives seq the rows of ctx's tokens, every layer: a context of
 * ctx->n_tokens without prefilling it again for each sequence. */
static int clone_context(struct runner *r, const struct kv_seq *ctx, struct kv_seq *seq, struct moerr *e)
{
        size_t row = (size_t)(r->m->hp.kv_lora + r->m->hp.n_rot) * sizeof(float);
        int ret = kv_seq_reserve(r->kv, seq, ctx->n_tokens + 1);

        if (ret < 0)
                return moerr_set(e, ret, "KV cache too small for the context");
        for (int64_t l = 0; l < r->m->hp.n_layer; l++)
                for (int64_t t = 0; t < ctx->n_tokens; t++)
                        r->b->ops->copy(r->b, kv_row(r->kv, seq, l, t), kv_row(r->kv, ctx, l, t), row);
        seq->n_tokens = ctx->n_tokens;
        return 0;
}

/* Decodes gen steps of batch sequences, each primed with one token after
 * the context ctx (if not NULL); returns tokens per second over the timed
 * steps. The logits stay where the step left them when the backend's
 * memory is the host's, as in engine/api.c: copying 16 x 129280 floats
 * (8 MB) a step is a cost no server pays. */
static double decode(struct runner *r, int64_t batch, int64_t gen, const struct kv_seq *ctx, float *logits,
                     uint64_t *rng, struct moerr *e)
{
        int64_t V = r->m->hp.n_vocab;
        _cleanup_free_ struct kv_seq *kvs = calloc(batch, sizeof *kvs);
        _cleanup_free_ struct fwd_seq *seqs = calloc(batch, sizeof *seqs);
        _cleanup_free_ int32_t *toks = calloc(batch, sizeof *toks);
        double t0 = 0, rate = -1;
        int ret = 0;

        if (!kvs || !seqs || !toks)
                return moerr_set(e, -ENOMEM, "out of memory"), -1;
        for (int64_t s = 0; ctx && s < batch && ret >= 0; s++)
                ret = clone_context(r, ctx, &kvs[s], e);
        for (int64_t step = 0; step <= gen && ret >= 0; step++) {
                if (step == 1)
                        t0 = runner_now(); /* step 0 primes the caches */
                random_tokens(toks, batch, V, rng);
                for (int64_t s = 0; s < batch && ret >= 0; s++) {
                        ret = kv_seq_reserve(r->kv, &kvs[s], kvs[s].n_tokens + 1);
                        seqs[s] = (struct fwd_seq){ .kv = &kvs[s], .tokens = &toks[s], .n_tokens = 1,
                                                    .pos0 = kvs[s].n_tokens };
                }
                if (ret < 0)
                        moerr_set(e, ret, "KV cache too small");
                else    /* in place where the backend allows, as the daemon reads them */
                        ret = fwd_step(r->f, r->kv, seqs, (int)batch,
                                       fwd_logits_in_place(r->f) ? NULL : logits, e);
        }
        if (ret >= 0)
                rate = batch * gen / (runner_now() - t0);
        for (int64_t s = 0; s < batch; s++)
                kv_seq_release(r->kv, &kvs[s]);
        return rate;
}

static int bench(const struct bench_opts *o, struct moerr *e)
{
        struct runner *r = NULL;
        /* Rows per step: the prompt, the batch, or a context's chunk. */
        int64_t cap = MO_MAX(MO_MAX(o->prompt, o->batch), MO_MIN(o->context, 512));
        double mem_gbps, t0, first_s, prefill_s, dec1, decb = 0;
        _cleanup_free_ float *logits = NULL;
        _cleanup_free_ int32_t *toks = NULL;
        struct kv_seq seq = {0}, ctx = {0};
        uint64_t rng = 1, bpt;
        int ret;

        mem_gbps = measure_read_gbps(o->threads > 0 ? o->threads : (int)sysconf(_SC_NPROCESSORS_ONLN));
        ret = runner_open(o->model, o->threads,
                          o->prompt + (o->context + o->gen + 2) * (o->batch + 2) + 64 * o->batch, cap, &r, e);
        if (ret < 0)
                return ret;
        logits = malloc((size_t)cap * r->m->hp.n_vocab * sizeof(float));
        toks = malloc(MO_MAX(MO_MAX(o->prompt, o->context), 1) * sizeof(int32_t));
        if (!logits || !toks) {
                ret = moerr_set(e, -ENOMEM, "out of memory");
                goto out;
        }
        /* Time to first token: the load plus one forward step. */
        t0 = runner_now();
        toks[0] = tok_bos(r->m->tok) >= 0 ? tok_bos(r->m->tok) : 0;
        ret = runner_feed(r, &seq, toks, 1, false, logits, e);
        first_s = r->load_s + runner_now() - t0;
        kv_seq_release(r->kv, &seq);
        if (ret < 0)
                goto out;
        /* Each measurement is repeated and the best kept: on a shared or
         * virtual machine, interference only ever slows a run down. */
        prefill_s = 1e30;
        dec1 = decb = 0;
        for (int rep = 0; rep < o->repeat && ret >= 0; rep++) {
                double d1, db = 0;

                /* Prefill: one prompt in one step (matrix-matrix kernels). */
                random_tokens(toks, o->prompt, r->m->hp.n_vocab, &rng);
                t0 = runner_now();
                ret = runner_feed(r, &seq, toks, o->prompt, false, logits, e);
                prefill_s = MO_MIN(prefill_s, runner_now() - t0);
                kv_seq_release(r->kv, &seq);
                if (ret < 0)
                        goto out;
                /* Decode after a context of random tokens, prefilled once
                 * and copied to each sequence (not timed). */
                if (o->context > 0) {
                        random_tokens(toks, o->context, r->m->hp.n_vocab, &rng);
                        if ((ret = runner_feed(r, &ctx, toks, o->context, false, logits, e)) < 0)
                                goto out;
                }
                d1 = decode(r, 1, o->gen, o->context > 0 ? &ctx : NULL, logits, &rng, e);
                if (d1 > 0 && o->batch > 1)
                        db = decode(r, o->batch, o->gen, o->context > 0 ? &ctx : NULL, logits, &rng, e);
                kv_seq_release(r->kv, &ctx);
                if (d1 < 0 || db < 0) {
                        ret = -EIO;
                        goto out;
                }
                dec1 = MO_MAX(dec1, d1);
                decb = MO_MAX(decb, db);
        }
        if (o->batch <= 1)
                decb = dec1;
        bpt = model_weight_bytes_per_token(r->m);
        if (o->json) {
                printf("{\"model\": \"%s\", \"threads\": %d, \"simd\": \"%s\", \"load_s\": %.3f, "
                       "\"first_token_s\": %.3f, \"prompt\": %lld, \"prefill_tok_s\": %.2f, \"gen\": %lld, "
                       "\"batch\": %lld, \"decode_tok_s\": %.2f, \"decode_b1_tok_s\": %.2f, "
                       "\"weight_bytes_per_token\": %llu, \"weight_read_gbps\": %.3f, \"mem_read_gbps\": %.3f, "
                       "\"weight_read_ratio\": %.3f, \"prefill_over_decode\": %.2f, \"batch_speedup\": %.2f, "
                       "\"context\": %lld, \"repeat\": %d}\n",
                       r->m->name, mo_cpu_threads(r->b), mo_cpu_simd_level(), r->load_s, first_s,
                       (long long)o->prompt, o->prompt / prefill_s, (long long)o->gen, (long long)o->batch,
                       decb, dec1, (unsigned long long)bpt, bpt * dec1 / 1e9, mem_gbps,
                       bpt * dec1 / 1e9 / mem_gbps, o->prompt / prefill_s / dec1, decb / dec1,
                       (long long)o->context, o->repeat);
        } else {
                char desc[512];
                model_describe(r->m, desc, sizeof desc);
                printf("model          %s\n", desc);
                printf("threads        %d (%s)\n", mo_cpu_threads(r->b), mo_cpu_simd_level());
                printf("load           %.3f s, first token after %.3f s\n", r->load_s, first_s);
                printf("prefill        %lld tokens: %.2f tok/s (%.1fx decode)\n", (long long)o->prompt,
                       o->prompt / prefill_s, o->prompt / prefill_s / dec1);
                if (o->context > 0)
                        printf("decode         after a context of %lld tokens\n", (long long)o->context);
                printf("decode b=1     %.2f tok/s, %.1f MB of weights per token: %.2f GB/s\n", dec1, bpt / 1e6,
                       bpt * dec1 / 1e9);
                if (o->batch > 1)
                        printf("decode b=%-5lld %.2f tok/s (%.2fx batch 1)\n", (long long)o->batch, decb, decb / dec1);
                printf("memory read    %.2f GB/s measured: weights stream at %.0f%% of it\n", mem_gbps,
                       100 * bpt * dec1 / 1e9 / mem_gbps);
        }
out:
        kv_seq_release(r->kv, &ctx);
        runner_close(r);
        return ret;
}

static void usage(FILE *out)
{
        fprintf(out, "usage: moed-bench --model FILE [--threads T] [--prompt P] [--gen G] [--batch B] [--context C]\n"
                     "                  [--repeat N] [--json]\n"
                     "  defaults: all threads, P 128, G 32, B 1, C 0, N 3 (the best of N runs is reported)\n"
                     "  --context C: decode after C tokens of context in every sequence\n");
}

int main(int argc, char **argv)
{
        static const struct option opts[] = {
                { "model", required_argument, NULL, 'm' }, { "threads", required_argument, NULL, 't' },
                { "prompt", required_argument, NULL, 'p' }, { "gen", required_argument, NULL, 'n' },
                { "batch", required_argument, NULL, 'b' }, { "json", no_argument, NULL, 'j' },
                { "repeat", required_argument, NULL, 'r' }, { "context", required_argument, NULL, 'c' },
                { "help", no_argument, NULL, 'h' }, {}
        };
        struct bench_opts o = { .prompt = 128, .gen = 32, .batch = 1, .repeat = 3 };
        struct moerr e = {0};
        int c, r;

        while ((c = getopt_long(argc, argv, "m:t:p:n:b:r:c:jh", opts, NULL)) != -1) {
                switch (c) {
                case 'm': o.model = optarg; break;
                case 't':
                        if (runner_parse_threads(optarg, &o.threads) < 0) {
                                fprintf(stderr, "moed-bench: bad --threads\n");
                                return 2;
                        }
                        break;
                case 'p': o.prompt = strtoll(optarg, NULL, 10); break;
                case 'n': o.gen = strtoll(optarg, NULL, 10); break;
                case 'b': o.batch = strtoll(optarg, NULL, 10); break;
                case 'j': o.json = true; break;
                case 'r': o.repeat = (int)strtol(optarg, NULL, 10); break;
                case 'c': o.context = strtoll(optarg, NULL, 10); break;
                case 'h': usage(stdout); return 0;
                default: usage(stderr); return 2;
                }
        }
        if (!o.model || o.prompt < 1 || o.prompt > 65536 || o.gen < 1 || o.batch < 1 || o.batch > 4096 || o.repeat < 1 || o.repeat > 100 ||
            o.context < 0 || o.context > 65536 ||
            optind != argc) {
                usage(stderr);
                return 2;
        }
        r = bench(&o, &e);
        if (r < 0)
                fprintf(stderr, "moed-bench: %s\n", e.msg[0] ? e.msg : strerror(-r));
        return r < 0 ? 1 : 0;
}
