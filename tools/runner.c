/* runner: the engine set-up the command-line tools share. */
#include "tools/runner.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/cleanup.h"
#include "engine/tokenizer.h"

double runner_now(void)
{
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int runner_parse_threads(const char *s, int *out)
{
        char *end;
        long v;

        if (strcmp(s, "auto") == 0) {
                *out = 0;
                return 0;
        }
        errno = 0;
        v = strtol(s, &end, 10);
        if (errno || *end || v < 0 || v > 1024)
                return -EINVAL;
        *out = (int)v;
        return 0;
}

int runner_open(const char *path, int threads, int64_t cache_tokens, int64_t max_batch,
                struct runner **out, struct moerr *e)
{
        struct runner *r = calloc(1, sizeof *r);
        double t0 = runner_now();
        int ret;

        if (!r)
                return moerr_set(e, -ENOMEM, "out of memory");
        r->max_batch = max_batch;
        if ((ret = model_load(path, &r->m, e)) < 0)
                goto fail;
        r->load_s = runner_now() - t0;
        if ((ret = mo_backend_cpu_new(threads, &r->b, e)) < 0)
                goto fail;
        if ((cache_tokens > 0 && (ret = runner_set_cache(r, cache_tokens, e)) < 0) ||
            (ret = fwd_new(r->m, r->b, max_batch, &r->f, e)) < 0)
                goto fail;
        *out = r;
        return 0;
fail:
        runner_close(r);
        return ret;
}

int runner_set_cache(struct runner *r, int64_t cache_tokens, struct moerr *e)
{
        struct kv_config kc = {
                .n_layer = r->m->hp.n_layer,
                .row_width = r->m->hp.kv_lora + r->m->hp.n_rot,
                .block_tokens = 32,
        };

        kv_free(r->kv);
        r->kv = NULL;
        kc.n_blocks = kv_blocks_for_tokens(&kc, cache_tokens);
        return kv_new(r->b, &kc, &r->kv, e);
}

void runner_close(struct runner *r)
{
        if (!r)
                return;
        fwd_free(r->f);
        kv_free(r->kv);
        mo_backend_free(r->b);
        model_free(r->m);
        free(r);
}

int runner_feed(struct runner *r, struct kv_seq *seq, const int32_t *toks, int64_t n,
                bool all_logits, float *out, struct moerr *e)
{
        int64_t V = r->m->hp.n_vocab;
        int ret;

        if ((ret = kv_seq_reserve(r->kv, seq, seq->n_tokens + n)) < 0)
                return moerr_set(e, ret, "the KV cache is full (%lld tokens asked)",
                                 (long long)(seq->n_tokens + n));
        for (int64_t done = 0; done < n;) {
                int64_t chunk = MO_MIN(n - done, r->max_batch);
                struct fwd_seq s = {
                        .kv = seq,
                        .tokens = toks + done,
                        .n_tokens = chunk,
                        .pos0 = seq->n_tokens,
                        .all_logits = all_logits,
                };
                float *dst = all_logits ? out + done * V : out;
                if ((ret = fwd_step(r->f, r->kv, &s, 1, dst, e)) < 0)
                        return ret;
                done += chunk;
        }
        return 0;
}
