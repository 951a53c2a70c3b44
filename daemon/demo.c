/* demo: where the demo model lives, and writing it. */
#include "daemon/demo.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/cleanup.h"
#include "common/log.h"
#include "kernels/quant.h"
#include "tools/fixture.h"

static int cache_dir(char **out)
{
        const char *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");

        if (xdg && *xdg == '/')
                return asprintf(out, "%s/moed", xdg) < 0 ? -ENOMEM : 0;
        if (home && *home == '/')
                return asprintf(out, "%s/.cache/moed", home) < 0 ? -ENOMEM : 0;
        return -ENOENT;
}

static int write_demo(const char *path, struct moerr *e)
{
        _cleanup_free_ char *tmp = NULL;
        struct fixture_spec s;
        int r;

        if ((r = fixture_shape("tiny", &s, e)) < 0)
                return r;
        s.weight_type = MO_TYPE_Q8_0;
        s.vocab_json = fixture_default_vocab();
        s.name = "moed demo (random weights)";
        if (asprintf(&tmp, "%s.%d.tmp", path, (int)getpid()) < 0)
                return moerr_set(e, -ENOMEM, "out of memory");
        mo_log(LOG_INFO, "writing the demo model to %s%s", path,
               s.vocab_json ? "" : " (synthetic vocabulary: the DeepSeek-V3 tokenizer.json "
               "was not found; set MOED_VOCAB_JSON)");
        if ((r = fixture_write(&s, tmp, e)) < 0) {
                unlink(tmp);
                return r;
        }
        if (rename(tmp, path) < 0) {
                r = -errno;
                unlink(tmp);
                return moerr_set(e, r, "rename %s: %s", path, strerror(-r));
        }
        return 0;
}

int demo_model_path(char **out, struct moerr *e)
{
        const char *env = getenv("MOED_DEMO_MODEL");
        _cleanup_free_ char *dir = NULL, *path = NULL;
        int r;

        if (env && *env) {
                if (!(*out = strdup(env)))
                        return moerr_set(e, -ENOMEM, "out of memory");
                return access(env, R_OK) == 0 ? 0 : write_demo(env, e);
        }
        if (cache_dir(&dir) < 0)
                return moerr_set(e, -ENOENT, "no cache directory: set HOME or XDG_CACHE_HOME, "
                                 "or pass --model");
        if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
                /* ~/.cache itself may be missing */
                _cleanup_free_ char *parent = strdup(dir);
                char *slash = parent ? strrchr(parent, '/') : NULL;
                if (slash)
                        *slash = 0;
                if (!parent || (mkdir(parent, 0700) < 0 && errno != EEXIST) ||
                    (mkdir(dir, 0700) < 0 && errno != EEXIST))
                        return moerr_set(e, -errno, "cannot create %s: %s", dir, strerror(errno));
        }
        if (asprintf(&path, "%s/demo.gguf", dir) < 0)
                return moerr_set(e, -ENOMEM, "out of memory");
        if (access(path, R_OK) != 0 && (r = write_demo(path, e)) < 0)
                return r;
        *out = TAKE_PTR(path);
        return 0;
}
