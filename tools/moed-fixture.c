/* moed-fixture: command-line front of tools/fixture.c. Writes a deepseek2
 * GGUF model with random weights of a named shape, optionally altered field
 * by field, for tests, benchmarks and experiments. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>

#include "kernels/quant.h"
#include "tools/fixture.h"

enum {
        OPT_VOCAB = 0x100, OPT_NO_VOCAB, OPT_SEED, OPT_GGUF_VERSION, OPT_LIST,
        OPT_LAYERS, OPT_DENSE, OPT_EXPERTS, OPT_EXPERTS_USED, OPT_SHARED, OPT_GROUPS,
        OPT_GROUPS_USED, OPT_VOCAB_SIZE, OPT_CTX, OPT_NAME, OPT_LEGACY, OPT_NO_QLORA,
        OPT_SOFTMAX, OPT_SIGMOID, OPT_NO_BIAS, OPT_NO_NORM, OPT_SCALE, OPT_FUSED, OPT_TIED,
        OPT_NO_YARN, OPT_NO_YARN_LOG, OPT_CHAT_TEMPLATE,
};

static const struct option options[] = {
        { "shape", required_argument, NULL, 's' },
        { "type", required_argument, NULL, 't' },
        { "output", required_argument, NULL, 'o' },
        { "vocab", required_argument, NULL, OPT_VOCAB },
        { "no-vocab", no_argument, NULL, OPT_NO_VOCAB },
        { "seed", required_argument, NULL, OPT_SEED },
        { "gguf-version", required_argument, NULL, OPT_GGUF_VERSION },
        { "layers", required_argument, NULL, OPT_LAYERS },
        { "dense", required_argument, NULL, OPT_DENSE },
        { "experts", required_argument, NULL, OPT_EXPERTS },
        { "experts-used", required_argument, NULL, OPT_EXPERTS_USED },
        { "shared", required_argument, NULL, OPT_SHARED },
        { "groups", required_argument, NULL, OPT_GROUPS },
        { "groups-used", required_argument, NULL, OPT_GROUPS_USED },
        { "vocab-size", required_argument, NULL, OPT_VOCAB_SIZE },
        { "ctx", required_argument, NULL, OPT_CTX },
        { "name", required_argument, NULL, OPT_NAME },
        { "legacy", no_argument, NULL, OPT_LEGACY },
        { "no-qlora", no_argument, NULL, OPT_NO_QLORA },
        { "softmax", no_argument, NULL, OPT_SOFTMAX },
        { "sigmoid", no_argument, NULL, OPT_SIGMOID },
        { "no-bias", no_argument, NULL, OPT_NO_BIAS },
        { "no-norm", no_argument, NULL, OPT_NO_NORM },
        { "scale", required_argument, NULL, OPT_SCALE },
        { "fused", no_argument, NULL, OPT_FUSED },
        { "tied", no_argument, NULL, OPT_TIED },
        { "no-yarn", no_argument, NULL, OPT_NO_YARN },
        { "no-yarn-log", no_argument, NULL, OPT_NO_YARN_LOG },
        { "chat-template", required_argument, NULL, OPT_CHAT_TEMPLATE },
        { "list", no_argument, NULL, OPT_LIST },
        { "help", no_argument, NULL, 'h' },
        { 0 },
};

static void usage(FILE *f)
{
        fprintf(f,
                "usage: moed-fixture [--shape NAME] [--type TYPE] [--vocab PATH | --no-vocab]\n"
                "                    [--seed N] [--gguf-version 2|3] [overrides] -o FILE\n"
                "       moed-fixture --list\n"
                "\n"
                "Writes a deepseek2 GGUF model with seeded random weights.\n"
                "  -s, --shape NAME       named shape (default tiny; --list shows them)\n"
                "  -t, --type TYPE        matrix type: F32 F16 BF16 Q8_0 Q4_0 Q4_K Q5_K Q6_K ...\n"
                "                         (default: the shape's own); rows that are not a block\n"
                "                         multiple fall back to Q8_0, then F16\n"
                "  -o, --output FILE      where to write (required)\n"
                "      --vocab PATH       DeepSeek-V3 tokenizer.json (default: the npm copy in\n"
                "                         the source tree or $MOED_VOCAB_JSON, for V3-style shapes)\n"
                "      --no-vocab         synthetic vocabulary\n"
                "      --seed N           weight seed (default 1)\n"
                "      --gguf-version N   2 or 3 (default 3)\n"
                "overrides:\n"
                "      --layers N --dense N --experts N --experts-used N --shared N\n"
                "      --groups N --groups-used N --vocab-size N --ctx N --name TEXT\n"
                "      --scale F --chat-template TEXT\n"
                "      --legacy (attn_kv_b layout) --no-qlora --softmax --sigmoid --no-bias\n"
                "      --no-norm --fused --tied --no-yarn --no-yarn-log\n");
}

static int parse_type(const char *s, int *out)
{
        for (int t = 0; t < MO_TYPE_COUNT; t++) {
                const struct mo_type_info *ti = mo_type_get(t);
                if (ti && strcasecmp(ti->name, s) == 0) {
                        *out = t;
                        return 0;
                }
        }
        return -EINVAL;
}

static int parse_i64(const char *opt, const char *s, int64_t min, int64_t *out)
{
        char *end;
        long long v;

        errno = 0;
        v = strtoll(s, &end, 0);
        if (errno || end == s || *end || v < min) {
                fprintf(stderr, "moed-fixture: --%s: '%s' is not a number >= %lld\n", opt, s,
                        (long long)min);
                return -EINVAL;
        }
        *out = v;
        return 0;
}

static int parse_f32(const char *opt, const char *s, float *out)
{
        char *end;

        errno = 0;
        *out = strtof(s, &end);
        if (errno || end == s || *end) {
                fprintf(stderr, "moed-fixture: --%s: '%s' is not a number\n", opt, s);
                return -EINVAL;
        }
        return 0;
}

static void list_shapes(void)
{
        for (const char *const *n = fixture_shape_names(); *n; n++) {
                struct fixture_spec s;
                if (fixture_shape(*n, &s, NULL) < 0)
                        continue;
                printf("%-16s %2" PRId64 " layers, embd %5" PRId64 ", %3" PRId64
                       " experts (%" PRId64 " used), vocab %" PRId64 ", %s%s%s\n",
                       *n, s.n_layer, s.n_embd, s.n_expert, s.n_expert_used, s.n_vocab,
                       s.split_mla ? "split MLA" : "attn_kv_b",
                       s.q_lora ? "" : ", no q-LoRA", s.gating == 2 ? ", sigmoid" : ", softmax");
        }
}

struct cli {
        const char *shape, *type, *out, *vocab;
        bool no_vocab;
};

/* Options that change one spec field; 1 if opt was not one of them. */
static int apply_override(struct fixture_spec *s, int opt, const char *arg)
{
        int64_t v;

        switch (opt) {
        case OPT_LAYERS: return parse_i64("layers", arg, 1, &s->n_layer);
        case OPT_DENSE: return parse_i64("dense", arg, 0, &s->n_dense);
        case OPT_EXPERTS: return parse_i64("experts", arg, 1, &s->n_expert);
        case OPT_EXPERTS_USED: return parse_i64("experts-used", arg, 1, &s->n_expert_used);
        case OPT_SHARED: return parse_i64("shared", arg, 0, &s->n_expert_shared);
        case OPT_GROUPS: return parse_i64("groups", arg, 0, &s->n_group);
        case OPT_GROUPS_USED: return parse_i64("groups-used", arg, 0, &s->n_group_used);
        case OPT_VOCAB_SIZE: return parse_i64("vocab-size", arg, 1, &s->n_vocab);
        case OPT_CTX: return parse_i64("ctx", arg, 1, &s->n_ctx_train);
        case OPT_SEED:
                if (parse_i64("seed", arg, 0, &v) < 0)
                        return -EINVAL;
                s->seed = (uint64_t)v;
                return 0;
        case OPT_GGUF_VERSION:
                if (parse_i64("gguf-version", arg, 2, &v) < 0 || v > 3)
                        return -EINVAL;
                s->gguf_version = (uint32_t)v;
                return 0;
        case OPT_SCALE: return parse_f32("scale", arg, &s->expert_scale);
        case OPT_NAME: s->name = arg; return 0;
        case OPT_CHAT_TEMPLATE: s->chat_template = arg; return 0;
        case OPT_LEGACY: s->split_mla = false; return 0;
        case OPT_NO_QLORA: s->q_lora = 0; return 0;
        case OPT_SOFTMAX: s->gating = 1; return 0;
        case OPT_SIGMOID: s->gating = 2; return 0;
        case OPT_NO_BIAS: s->exp_bias = false; return 0;
        case OPT_NO_NORM: s->expert_norm = false; return 0;
        case OPT_FUSED: s->fused_gate_up = true; return 0;
        case OPT_TIED: s->tied_output = true; return 0;
        case OPT_NO_YARN: s->yarn = false; return 0;
        case OPT_NO_YARN_LOG: s->yarn_log_mul = -1.0f; return 0;
        default: return 1;
        }
}

/* Options are applied after the shape is known, wherever --shape appears. */
static int parse_args(int argc, char **argv, struct cli *c, struct fixture_spec *s)
{
        struct moerr e = {0};
        int opt, r;

        for (int i = 1; i < argc; i++)
                if (strncmp(argv[i], "--shape=", 8) == 0)
                        c->shape = argv[i] + 8;
                else if ((strcmp(argv[i], "--shape") == 0 || strcmp(argv[i], "-s") == 0) &&
                         i + 1 < argc)
                        c->shape = argv[++i];
        if (fixture_shape(c->shape, s, &e) < 0) {
                fprintf(stderr, "moed-fixture: %s (--list shows the shapes)\n", e.msg);
                return -EINVAL;
        }
        while ((opt = getopt_long(argc, argv, "s:t:o:h", options, NULL)) != -1) {
                switch (opt) {
                case 's': break;
                case 't': c->type = optarg; break;
                case 'o': c->out = optarg; break;
                case OPT_VOCAB: c->vocab = optarg; break;
                case OPT_NO_VOCAB: c->no_vocab = true; break;
                case OPT_LIST: list_shapes(); exit(EXIT_SUCCESS);
                case 'h': usage(stdout); exit(EXIT_SUCCESS);
                case '?': usage(stderr); return -EINVAL;
                default:
                        r = apply_override(s, opt, optarg);
                        if (r != 0)
                                return -EINVAL;
                }
        }
        if (optind < argc) {
                fprintf(stderr, "moed-fixture: unexpected argument '%s'\n", argv[optind]);
                return -EINVAL;
        }
        return 0;
}

/* The real vocabulary is V3's: only shapes with V3's pre-tokenizer take it
 * by default. */
static int choose_vocab(const struct cli *c, struct fixture_spec *s)
{
        if (c->vocab && c->no_vocab) {
                fprintf(stderr, "moed-fixture: --vocab and --no-vocab exclude each other\n");
                return -EINVAL;
        }
        if (c->vocab) {
                s->vocab_json = c->vocab;
        } else if (!c->no_vocab && strcmp(s->pre, "deepseek-v3") == 0) {
                s->vocab_json = fixture_default_vocab();
                if (!s->vocab_json)
                        fprintf(stderr, "moed-fixture: note: DeepSeek-V3 tokenizer.json not "
                                        "found (npm ci --prefix vocab, or $MOED_VOCAB_JSON); "
                                        "writing a synthetic vocabulary\n");
        }
        return 0;
}

int main(int argc, char **argv)
{
        struct cli c = { .shape = "tiny" };
        struct fixture_spec s;
        struct moerr e = {0};
        struct timespec t0, t1;
        struct stat st;
        int r;

        if (parse_args(argc, argv, &c, &s) < 0 || choose_vocab(&c, &s) < 0)
                return EXIT_FAILURE;
        if (c.type && parse_type(c.type, &s.weight_type) < 0) {
                fprintf(stderr, "moed-fixture: unknown weight type '%s'\n", c.type);
                return EXIT_FAILURE;
        }
        if (!c.out) {
                fprintf(stderr, "moed-fixture: no output file (-o FILE)\n");
                return EXIT_FAILURE;
        }
        clock_gettime(CLOCK_MONOTONIC, &t0);
        r = fixture_write(&s, c.out, &e);
        if (r < 0) {
                fprintf(stderr, "moed-fixture: %s: %s\n", c.out, e.msg);
                return EXIT_FAILURE;
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        if (stat(c.out, &st) == 0)
                fprintf(stderr, "moed-fixture: wrote %s (%s, %s, %.1f MiB) in %.2f s\n", c.out,
                        s.name, mo_type_name(s.weight_type), (double)st.st_size / (1 << 20),
                        (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9);
        return EXIT_SUCCESS;
}
