/* moed-tokenize: prints the token ids of a text under a model's tokenizer
 * as a JSON array. Only the tokenizer is loaded, so it is instant even for
 * the largest files. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cleanup.h"
#include "engine/gguf.h"
#include "engine/tokenizer.h"

static void usage(FILE *out)
{
        fprintf(out, "usage: moed-tokenize --model FILE [--no-bos] [--no-parse-special] (TEXT | --file F)\n"
                     "  prints the token ids as a JSON array; BOS is added when the model asks for it\n");
}

static int read_file(const char *path, char **buf, size_t *len, struct moerr *e)
{
        _cleanup_fclose_ FILE *f = fopen(path, "rb");
        size_t cap = 1 << 16, n = 0;
        char *b = NULL;

        if (!f)
                return moerr_set(e, -errno, "%s: %m", path);
        for (;;) {
                char *nb = realloc(b, cap + 1);
                if (!nb) {
                        free(b);
                        return moerr_set(e, -ENOMEM, "%s: out of memory", path);
                }
                b = nb;
                n += fread(b + n, 1, cap - n, f);
                if (n < cap)
                        break;
                cap *= 2;
        }
        if (ferror(f)) {
                free(b);
                return moerr_set(e, -EIO, "%s: read error", path);
        }
        b[n] = 0;
        *buf = b;
        *len = n;
        return 0;
}

int main(int argc, char **argv)
{
        static const struct option opts[] = {
                { "model", required_argument, NULL, 'm' }, { "file", required_argument, NULL, 'f' },
                { "no-bos", no_argument, NULL, 'B' }, { "no-parse-special", no_argument, NULL, 'S' },
                { "help", no_argument, NULL, 'h' }, {}
        };
        const char *model = NULL, *file = NULL;
        bool bos = true, special = true;
        _cleanup_free_ char *text = NULL;
        _cleanup_free_ int32_t *ids = NULL;
        struct tokenizer *t = NULL;
        struct gguf *g = NULL;
        struct moerr e = {0};
        size_t len = 0, n = 0;
        int c, r;

        while ((c = getopt_long(argc, argv, "m:f:h", opts, NULL)) != -1) {
                switch (c) {
                case 'm': model = optarg; break;
                case 'f': file = optarg; break;
                case 'B': bos = false; break;
                case 'S': special = false; break;
                case 'h': usage(stdout); return 0;
                default: usage(stderr); return 2;
                }
        }
        if (!model || (file ? optind != argc : optind != argc - 1)) {
                usage(stderr);
                return 2;
        }
        if (file)
                r = read_file(file, &text, &len, &e);
        else
                r = (text = strdup(argv[optind])) ? (len = strlen(text), 0) : -ENOMEM;
        if (r >= 0 && (r = gguf_open(model, &g, &e)) < 0)
                moerr_prefix(&e, r, "%s", model);
        if (r >= 0)
                r = tok_new_from_gguf(g, &t, &e);
        if (r >= 0)
                r = tok_encode(t, text, len, bos && tok_add_bos(t), special, &ids, &n, &e);
        if (r < 0) {
                fprintf(stderr, "moed-tokenize: %s\n", e.msg[0] ? e.msg : strerror(-r));
        } else {
                putchar('[');
                for (size_t i = 0; i < n; i++)
                        printf(i ? ", %d" : "%d", ids[i]);
                puts("]");
        }
        tok_free(t);
        gguf_close(g);
        return r < 0 ? 1 : 0;
}
