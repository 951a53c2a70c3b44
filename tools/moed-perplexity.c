/* moed-perplexity: perplexity of a model over a text file, defined exactly
 * as llama.cpp's perplexity tool does, so numbers can be compared with it:
 * the file is tokenized whole with BOS first; chunk i is tokens
 * [i*N, (i+1)*N) with its first token replaced by BOS; the predictions of
 * the last N/2-1 tokens of each chunk are scored; PPL = exp(mean NLL). */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cleanup.h"
#include "engine/tokenizer.h"
#include "tools/runner.h"

static void usage(FILE *out)
{
        fprintf(out, "usage: moed-perplexity --model FILE --file TEXT --ctx N [--chunks K] [--threads T] "
                     "[--batch B]\n");
}

static int read_text(const char *path, char **out, size_t *len, struct moerr *e)
{
        _cleanup_fclose_ FILE *f = fopen(path, "rb");
        long size;
        char *b;

        if (!f)
                return moerr_set(e, -errno, "%s: %m", path);
        if (fseek(f, 0, SEEK_END) < 0 || (size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) < 0)
                return moerr_set(e, -errno, "%s: cannot size: %m", path);
        b = malloc(size + 1);
        if (!b)
                return moerr_set(e, -ENOMEM, "%s: out of memory", path);
        if (fread(b, 1, size, f) != (size_t)size) {
                free(b);
                return moerr_set(e, -EIO, "%s: short read", path);
        }
        b[size] = 0;
        *out = b;
        *len = size;
        return 0;
}

/* -log softmax(logits)[target], in double. */
static double nll(const float *logits, int64_t n, int32_t target)
{
        double mx = -INFINITY, sum = 0;

        for (int64_t i = 0; i < n; i++)
                mx = fmax(mx, logits[i]);
        for (int64_t i = 0; i < n; i++)
                sum += exp(logits[i] - mx);
        return log(sum) + mx - logits[target];
}

static int perplexity(struct runner *r, const int32_t *toks, size_t n_toks, int64_t ctx, int64_t chunks,
                      struct moerr *e)
{
        int64_t V = r->m->hp.n_vocab, first = ctx / 2, n_max = (int64_t)n_toks / ctx;
        _cleanup_free_ float *logits = malloc((size_t)ctx * V * sizeof(float));
        _cleanup_free_ int32_t *chunk = malloc(ctx * sizeof(int32_t));
        double sum = 0, sum2 = 0;
        int64_t count = 0;
        int ret = 0;

        if ((int64_t)n_toks < 2 * ctx)
                return moerr_set(e, -EINVAL, "the text has %zu tokens; at least 2*ctx = %lld are needed",
                                 n_toks, (long long)(2 * ctx));
        if (chunks <= 0 || chunks > n_max)
                chunks = n_max;
        if (!logits || !chunk)
                return moerr_set(e, -ENOMEM, "out of memory for %lld logits", (long long)ctx * V);
        fprintf(stderr, "perplexity: %zu tokens, %lld chunks of %lld\n", n_toks, (long long)chunks, (long long)ctx);
        for (int64_t i = 0; i < chunks && ret >= 0; i++) {
                struct kv_seq seq = {0};
                memcpy(chunk, toks + i * ctx, ctx * sizeof(int32_t));
                if (tok_add_bos(r->m->tok))
                        chunk[0] = tok_bos(r->m->tok);
                ret = runner_feed(r, &seq, chunk, ctx, true, logits, e);
                kv_seq_release(r->kv, &seq);
                for (int64_t j = first; ret >= 0 && j < ctx - 1; j++) {
                        double v = nll(logits + j * V, V, toks[i * ctx + j + 1]);
                        sum += v;
                        sum2 += v * v;
                        count++;
                }
                if (ret >= 0) {
                        printf("[%lld]%.4f,", (long long)(i + 1), exp(sum / count));
                        fflush(stdout);
                }
        }
        if (ret < 0)
                return ret;
        {
                double mean = sum / count, var = sum2 / count - mean * mean;
                double err = count > 1 ? sqrt(fmax(var, 0) / (count - 1)) * exp(mean) : 0;
                printf("\nFinal estimate: PPL = %.4f +/- %.5f\n", exp(mean), err);
                printf("PPL = %.4f\n", exp(mean));
        }
        return 0;
}

int main(int argc, char **argv)
{
        static const struct option opts[] = {
                { "model", required_argument, NULL, 'm' }, { "file", required_argument, NULL, 'f' },
                { "ctx", required_argument, NULL, 'c' }, { "chunks", required_argument, NULL, 'k' },
                { "threads", required_argument, NULL, 't' }, { "batch", required_argument, NULL, 'b' },
                { "help", no_argument, NULL, 'h' }, {}
        };
        const char *model = NULL, *file = NULL;
        int64_t ctx = 512, chunks = 0, batch = 512;
        _cleanup_free_ char *text = NULL;
        _cleanup_free_ int32_t *toks = NULL;
        struct runner *r = NULL;
        struct moerr e = {0};
        size_t len = 0, n = 0;
        int c, threads = 0, ret;

        while ((c = getopt_long(argc, argv, "m:f:c:k:t:b:h", opts, NULL)) != -1) {
                switch (c) {
                case 'm': model = optarg; break;
                case 'f': file = optarg; break;
                case 'c': ctx = strtoll(optarg, NULL, 10); break;
                case 'k': chunks = strtoll(optarg, NULL, 10); break;
                case 'b': batch = strtoll(optarg, NULL, 10); break;
                case 't':
                        if (runner_parse_threads(optarg, &threads) < 0) {
                                fprintf(stderr, "moed-perplexity: bad --threads\n");
                                return 2;
                        }
                        break;
                case 'h': usage(stdout); return 0;
                default: usage(stderr); return 2;
                }
        }
        if (!model || !file || ctx < 4 || ctx > (1 << 20) || batch < 1 || optind != argc) {
                usage(stderr);
                return 2;
        }
        ret = read_text(file, &text, &len, &e);
        if (ret >= 0)
                ret = runner_open(model, threads, ctx, MO_MIN(batch, ctx), &r, &e);
        if (ret >= 0 && ctx > r->m->hp.n_ctx_train)
                ret = moerr_set(&e, -EINVAL, "--ctx %lld exceeds the model's context %lld", (long long)ctx,
                                (long long)r->m->hp.n_ctx_train);
        if (ret >= 0)
                ret = tok_encode(r->m->tok, text, len, tok_add_bos(r->m->tok), false, &toks, &n, &e);
        if (ret >= 0)
                ret = perplexity(r, toks, n, ctx, chunks, &e);
        if (ret < 0)
                fprintf(stderr, "moed-perplexity: %s\n", e.msg);
        runner_close(r);
        return ret < 0 ? 1 : 0;
}
