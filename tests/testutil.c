/* testutil: helpers shared by the cmocka tests. */
#include "testutil.h"

#include <errno.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/quant.h"
#include "tools/fixture.h"

static char tmpdir[4096];
/* Paths handed out by tu_path, freed at exit so LeakSanitizer stays quiet. */
static char **paths;
static size_t n_paths;

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
        (void)sb; (void)flag; (void)ftw;
        return remove(path);
}

static void rm_tmpdir(void)
{
        if (tmpdir[0])
                nftw(tmpdir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
        for (size_t i = 0; i < n_paths; i++)
                free(paths[i]);
        free(paths);
}

const char *tu_tmpdir(void)
{
        const char *base;

        if (tmpdir[0])
                return tmpdir;
        base = getenv("MOED_TEST_TMP");
        if (!base || !*base)
                base = "/tmp";
        mkdir(base, 0700);
        snprintf(tmpdir, sizeof tmpdir, "%s/moed-test-XXXXXX", base);
        if (!mkdtemp(tmpdir)) {
                fprintf(stderr, "mkdtemp %s: %s\n", tmpdir, strerror(errno));
                abort();
        }
        atexit(rm_tmpdir);
        return tmpdir;
}

char *tu_path(const char *name)
{
        char *p, **np;

        if (asprintf(&p, "%s/%s", tu_tmpdir(), name) < 0)
                abort();
        np = realloc(paths, (n_paths + 1) * sizeof *paths);
        if (!np)
                abort();
        paths = np;
        paths[n_paths++] = p;
        return p;
}

const char *tu_fixture(const char *shape, int weight_type, bool with_vocab)
{
        struct fixture_spec s;
        struct moerr e = {0};
        char name[256];
        char *path;

        snprintf(name, sizeof name, "%s-%s%s.gguf", shape, mo_type_name(weight_type),
                 with_vocab ? "-vocab" : "");
        path = tu_path(name);
        if (access(path, R_OK) == 0)
                return path;
        if (fixture_shape(shape, &s, &e) < 0) {
                fprintf(stderr, "fixture %s: %s\n", shape, e.msg);
                abort();
        }
        s.weight_type = weight_type;
        if (with_vocab) {
                s.vocab_json = fixture_default_vocab();
                if (!s.vocab_json) {
                        fprintf(stderr, "the DeepSeek-V3 tokenizer.json is missing: run "
                                        "npm ci --prefix vocab (MOED_VOCAB_JSON to override)\n");
                        abort();
                }
        }
        if (fixture_write(&s, path, &e) < 0) {
                fprintf(stderr, "fixture %s: %s\n", shape, e.msg);
                abort();
        }
        return path;
}

double tu_rel_err(const float *a, const float *b, size_t n)
{
        double num = 0, den = 0;

        for (size_t i = 0; i < n; i++) {
                double d = (double)a[i] - b[i];
                if (isnan(a[i]) || isnan(b[i]))
                        return INFINITY;
                num += d * d;
                den += (double)b[i] * b[i];
        }
        return den > 0 ? sqrt(num / den) : sqrt(num);
}

double tu_max_abs(const float *a, const float *b, size_t n)
{
        double m = 0;

        for (size_t i = 0; i < n; i++) {
                double d = fabs((double)a[i] - b[i]);
                if (isnan(d))
                        return INFINITY;
                if (d > m)
                        m = d;
        }
        return m;
}

void tu_randf(float *x, size_t n, uint64_t seed)
{
        uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;

        for (size_t i = 0; i < n; i++) {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                x[i] = (float)((double)(s >> 11) / (double)(1ull << 53) * 2.0 - 1.0);
        }
}
