/* config: moed.conf and its drop-ins. Owns the table of keys (names,
 * defaults, kinds of value), the value parsers shared with the command line
 * and the messages, each "FILE:LINE: [Section] Key: problem". inih does the
 * Key=Value splitting; lines reach it through policy/ini-lines.h. */
#include "daemon/config.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/cleanup.h"
#include "policy/ini-lines.h"

/* ---- value parsers ---------------------------------------------------- */

/* digits[.digits], no sign, no exponent: strtod would take "nan", "inf",
 * "0x1p4" and "1e9", none of which belong in a config file. */
struct decimal {
        uint64_t ip;
        uint64_t frac;          /* the first fdigits digits after the point */
        int fdigits;
};

static bool parse_decimal(const char **s, struct decimal *d)
{
        const char *p = *s;
        bool any = false;

        *d = (struct decimal){0};
        for (; isdigit((unsigned char)*p); p++, any = true) {
                if (d->ip > (UINT64_MAX - (*p - '0')) / 10)
                        return false;
                d->ip = d->ip * 10 + (*p - '0');
        }
        if (*p == '.')
                for (p++; isdigit((unsigned char)*p); p++, any = true)
                        if (d->fdigits < 18) {
                                d->frac = d->frac * 10 + (*p - '0');
                                d->fdigits++;
                        }
        if (!any)
                return false;
        *s = p;
        return true;
}

static uint64_t pow10u(int n)
{
        uint64_t v = 1;

        while (n-- > 0)
                v *= 10;
        return v;
}

static double decimal_value(const struct decimal *d)
{
        return (double)d->ip + (double)d->frac / (double)pow10u(d->fdigits);
}

static bool parse_u64(const char *s, uint64_t *out)
{
        struct decimal d;

        if (!*s || s[strspn(s, "0123456789")] || !parse_decimal(&s, &d))
                return false;
        *out = d.ip;
        return true;
}

int config_parse_size(const char *s, uint64_t *out)
{
        static const char units[] = "KMGT";
        struct decimal d;
        const char *u;
        unsigned shift = 0;
        unsigned __int128 v;

        if (!s || !parse_decimal(&s, &d))
                return -EINVAL;
        if (*s && (u = strchr(units, *s))) {
                shift = 10 * (unsigned)(u - units + 1);
                s++;
                if (s[0] == 'i' && s[1] == 'B')
                        s += 2;
                else if (*s == 'B')
                        s++;
        } else if (*s == 'B') {
                s++;
        }
        if (*s)
                return -EINVAL;
        v = (unsigned __int128)d.ip << shift;
        v += ((unsigned __int128)d.frac << shift) / pow10u(d.fdigits);
        if (v > UINT64_MAX)
                return -EINVAL;
        *out = (uint64_t)v;
        return 0;
}

int config_parse_threads(const char *s, int *out)
{
        uint64_t v;

        if (!s)
                return -EINVAL;
        if (!strcmp(s, "auto")) {
                *out = 0;
                return 0;
        }
        if (!parse_u64(s, &v) || v < 1 || v > 1024)
                return -EINVAL;
        *out = (int)v;
        return 0;
}

static double time_unit(const char *u, size_t n)
{
        static const struct {
                const char *name;
                double sec;
        } units[] = {
                { "us", 1e-6 },   { "usec", 1e-6 },   { "ms", 1e-3 },    { "msec", 1e-3 },
                { "s", 1 },       { "sec", 1 },       { "second", 1 },   { "seconds", 1 },
                { "m", 60 },      { "min", 60 },      { "minute", 60 },  { "minutes", 60 },
                { "h", 3600 },    { "hr", 3600 },     { "hour", 3600 },  { "hours", 3600 },
                { "d", 86400 },   { "day", 86400 },   { "days", 86400 },
        };

        for (size_t i = 0; i < ARRAY_SIZE(units); i++)
                if (strlen(units[i].name) == n && !memcmp(units[i].name, u, n))
                        return units[i].sec;
        return -1;
}

/* "30", "30s", "500ms", "5min", "1h 30min" (systemd's time spans). A bare
 * number means seconds, and only on its own. */
int config_parse_seconds(const char *s, double *out)
{
        double total = 0;
        int groups = 0;
        bool bare = false;

        if (!s)
                return -EINVAL;
        while (isspace((unsigned char)*s))
                s++;
        if (!*s)
                return -EINVAL;
        while (*s) {
                struct decimal d;
                double unit = 1;
                size_t n = 0;

                if (!parse_decimal(&s, &d))
                        return -EINVAL;
                while (*s == ' ')
                        s++;
                while (isalpha((unsigned char)s[n]))
                        n++;
                if (n)
                        unit = time_unit(s, n);
                else
                        bare = true;
                if (unit < 0)
                        return -EINVAL;
                total += decimal_value(&d) * unit;
                groups++;
                for (s += n; isspace((unsigned char)*s); s++)
                        ;
        }
        if ((bare && groups > 1) || !isfinite(total) || total > 1e12)
                return -EINVAL;
        *out = total;
        return 0;
}

static int parse_bool(const char *s, bool *out)
{
        static const char *const yes[] = { "yes", "true", "on", "1" };
        static const char *const no[] = { "no", "false", "off", "0" };

        for (size_t i = 0; i < ARRAY_SIZE(yes); i++) {
                if (!strcasecmp(s, yes[i])) {
                        *out = true;
                        return 0;
                }
                if (!strcasecmp(s, no[i])) {
                        *out = false;
                        return 0;
                }
        }
        return -EINVAL;
}

static bool valid_abs_path(const char *s, size_t max)
{
        size_t n = strlen(s);

        if (s[0] != '/' || n >= max)
                return false;
        for (; *s; s++)
                if ((unsigned char)*s < 0x20 || *s == 0x7f)
                        return false;
        return true;
}

/* all | cpu | 0,1,... : kept verbatim, the backend reads it. */
static bool valid_devices(const char *s)
{
        if (!strcmp(s, "all") || !strcmp(s, "cpu"))
                return true;
        for (;;) {
                int n = 0;
                unsigned v = 0;

                for (; isdigit((unsigned char)*s) && n < 5; s++, n++)
                        v = v * 10 + (unsigned)(*s - '0');
                if (!n || v > 1023)
                        return false;
                if (!*s)
                        return true;
                if (*s++ != ',')
                        return false;
        }
}

static bool valid_model_id(const char *s)
{
        size_t n = strlen(s);

        if (n < 1 || n > 64)
                return false;
        for (; *s; s++)
                if (!isalnum((unsigned char)*s) && !strchr(".-_:", *s))
                        return false;
        return true;
}

/* ---- the keys ---------------------------------------------------------- */

enum kind {
        K_PATH,         /* char *, absolute */
        K_SOCKET,       /* char *, absolute, fits sun_path */
        K_PATHS,        /* ModelDirectories: space-separated absolute paths */
        K_THREADS,      /* int */
        K_DEVICES,      /* char *, verbatim */
        K_SIZE,         /* uint64_t bytes */
        K_SIZE_AUTO,    /* uint64_t bytes, "auto" is 0 */
        K_INT,          /* int64_t */
        K_SECONDS,      /* double */
        K_BOOL,         /* bool */
        K_RESIDENCY,    /* enum residency */
};

struct key {
        const char *name;
        enum kind kind;
        size_t off;
        const char *def;        /* the default, parsed like a value; NULL: unset */
        double min, max;        /* K_INT, K_SIZE, K_SECONDS */
        const char *expect;     /* for "invalid value 'x' (expected ...)" */
};

#define D(f) offsetof(struct moed_config, f)
#define M(f) offsetof(struct config_model, f)

static const struct key daemon_keys[] = {
        { "Socket", K_SOCKET, D(socket), "/run/moed/moed.sock", 0, 0,
          "an absolute path shorter than 108 bytes" },
        { "Threads", K_THREADS, D(threads), "auto", 0, 0, "auto or 1..1024" },
        { "Devices", K_DEVICES, D(devices), "all", 0, 0,
          "all, cpu or device numbers like 0,1" },
        { "KVCacheSize", K_SIZE_AUTO, D(kv_cache_bytes), "auto", 0, 0,
          "auto or a size like 8G" },
        { "MaxConnections", K_INT, D(max_connections), "512", 1, 1e6,
          "an integer in 1..1000000" },
        { "MaxRequestSize", K_SIZE, D(max_request_bytes), "1M", 1024, 1 << 30,
          "a size in 1K..1G" },
        { "MaxQueuedRequests", K_INT, D(max_queued), "1024", 0, 1e6,
          "an integer in 0..1000000" },
        { "MaxRunning", K_INT, D(max_running), "64", 1, 65536, "an integer in 1..65536" },
        { "StepTokens", K_INT, D(step_tokens), "256", 1, 1 << 20,
          "an integer in 1..1048576" },
        { "IdleTimeoutSec", K_SECONDS, D(idle_timeout_s), "30", 1e-3, 1e7,
          "a duration like 30s, 500ms or 5min, at least 1ms" },
        { "DrainTimeoutSec", K_SECONDS, D(drain_timeout_s), "30", 0, 1e7,
          "a duration like 30s, 500ms or 5min" },
        { "EngineStallSec", K_SECONDS, D(watchdog_stall_s), "60", 1e-3, 1e7,
          "a duration like 60s or 2min, at least 1ms" },
        { "TenantsDirectory", K_PATH, D(tenants_dir), "/etc/moed/tenants.d", 0, 0,
          "an absolute path" },
        { "StateDirectory", K_PATH, D(state_dir), "/var/lib/moed", 0, 0, "an absolute path" },
        { "ModelDirectories", K_PATHS, D(model_dirs), "/var/lib/moed/models", 0, 0,
          "absolute paths separated by spaces" },
        { "AllowNetworkFilesystems", K_BOOL, D(allow_network_fs), "no", 0, 0, "yes or no" },
        { "Residency", K_RESIDENCY, D(residency), "strict", 0, 0, "strict or relaxed" },
        { "AuditFile", K_PATH, D(audit_file), NULL, 0, 0, "an absolute path" },
};

static const struct key model_keys[] = {
        { "Path", K_PATH, M(path), NULL, 0, 0, "an absolute path" },
        { "MaxContext", K_INT, M(max_context), "0", 0, 1 << 24,
          "an integer in 0..16777216 (0: the model's own)" },
};

static const struct key *find_key(const struct key *keys, size_t n, const char *name)
{
        for (size_t i = 0; i < n; i++)
                if (!strcmp(keys[i].name, name))
                        return &keys[i];
        return NULL;
}

static int set_string(char **field, const char *v)
{
        char *s = NULL;

        if (v && !(s = strdup(v)))
                return -ENOMEM;
        free(*field);
        *field = s;
        return 0;
}

static void free_strv(char **v, size_t n)
{
        for (size_t i = 0; i < n; i++)
                free(v[i]);
        free(v);
}

static int set_paths(struct moed_config *c, const char *v)
{
        _cleanup_free_ char *copy = strdup(v);
        char **dirs = NULL, *save = NULL;
        size_t n = 0;

        if (!copy)
                return -ENOMEM;
        for (char *t = strtok_r(copy, " \t", &save); t; t = strtok_r(NULL, " \t", &save)) {
                char **nd;

                if (!valid_abs_path(t, PATH_MAX)) {
                        free_strv(dirs, n);
                        return -EINVAL;
                }
                nd = realloc(dirs, (n + 1) * sizeof *dirs);
                if (!nd || !(nd[n] = strdup(t))) {
                        free_strv(nd ? nd : dirs, n);
                        return -ENOMEM;
                }
                dirs = nd;
                n++;
        }
        if (!n)
                return -EINVAL;
        free_strv(c->model_dirs, c->n_model_dirs);
        c->model_dirs = dirs;
        c->n_model_dirs = n;
        return 0;
}

/* Parses v (NULL: the key's unset state) into base + k->off. 0, -EINVAL, -ENOMEM. */
static int set_value(const struct key *k, void *base, const char *v)
{
        void *field = (char *)base + k->off;
        uint64_t u;
        double d;
        bool b;

        if (!v)
                return k->kind == K_PATH ? set_string(field, NULL) : -EINVAL;
        switch (k->kind) {
        case K_PATH:
                return valid_abs_path(v, PATH_MAX) ? set_string(field, v) : -EINVAL;
        case K_SOCKET:
                return valid_abs_path(v, 108) ? set_string(field, v) : -EINVAL;
        case K_PATHS:
                return set_paths(base, v);
        case K_THREADS:
                return config_parse_threads(v, field);
        case K_DEVICES:
                return valid_devices(v) ? set_string(field, v) : -EINVAL;
        case K_SIZE_AUTO:
                if (!strcmp(v, "auto")) {
                        *(uint64_t *)field = 0;
                        return 0;
                }
                __attribute__((fallthrough));
        case K_SIZE:
                if (config_parse_size(v, &u) < 0 || u < k->min || (k->max && u > k->max))
                        return -EINVAL;
                *(uint64_t *)field = u;
                return 0;
        case K_INT:
                if (!parse_u64(v, &u) || u < k->min || u > k->max)
                        return -EINVAL;
                *(int64_t *)field = (int64_t)u;
                return 0;
        case K_SECONDS:
                if (config_parse_seconds(v, &d) < 0 || d < k->min || d > k->max)
                        return -EINVAL;
                *(double *)field = d;
                return 0;
        case K_BOOL:
                if (parse_bool(v, &b) < 0)
                        return -EINVAL;
                *(bool *)field = b;
                return 0;
        case K_RESIDENCY:
                if (!strcmp(v, "strict"))
                        *(enum residency *)field = RESIDENCY_STRICT;
                else if (!strcmp(v, "relaxed"))
                        *(enum residency *)field = RESIDENCY_RELAXED;
                else
                        return -EINVAL;
                return 0;
        }
        return -EINVAL;
}

static int set_defaults(const struct key *keys, size_t n, void *base)
{
        for (size_t i = 0; i < n; i++) {
                int r = set_value(&keys[i], base, keys[i].def);

                if (r < 0)
                        return r;
        }
        return 0;
}

struct moed_config *config_new_default(void)
{
        struct moed_config *c = calloc(1, sizeof *c);

        if (c && set_defaults(daemon_keys, ARRAY_SIZE(daemon_keys), c) < 0) {
                config_free(c);
                return NULL;
        }
        return c;
}

static void model_clear(struct config_model *m)
{
        free(m->id);
        free(m->path);
        free(m->origin);
}

void config_free(struct moed_config *c)
{
        if (!c)
                return;
        free(c->socket);
        free(c->devices);
        free(c->tenants_dir);
        free(c->state_dir);
        free_strv(c->model_dirs, c->n_model_dirs);
        free(c->audit_file);
        for (size_t i = 0; i < c->n_models; i++)
                model_clear(&c->models[i]);
        free(c->models);
        free(c);
}

void config_errors_clear(struct config_errors *e)
{
        if (!e)
                return;
        free_strv(e->msgs, e->n);
        e->msgs = NULL;
        e->n = 0;
}

__attribute__((format(printf, 2, 3)))
static int add_error(struct config_errors *e, const char *fmt, ...)
{
        char *msg, **nm;
        va_list ap;
        int r;

        va_start(ap, fmt);
        r = vasprintf(&msg, fmt, ap);
        va_end(ap);
        if (r < 0)
                return -ENOMEM;
        nm = realloc(e->msgs, (e->n + 1) * sizeof *nm);
        if (!nm) {
                free(msg);
                return -ENOMEM;
        }
        e->msgs = nm;
        e->msgs[e->n++] = msg;
        return 0;
}

/* ---- one file ---------------------------------------------------------- */

enum section { SECT_NONE, SECT_DAEMON, SECT_MODEL, SECT_BAD };

struct parse {
        struct moed_config *c;
        struct config_errors *errs;
        const char *file;
        enum section sect;
        size_t model;           /* SECT_MODEL: index in c->models */
        char sect_text[100];    /* "[Model x]", quoted, for messages */
        struct {                /* models with a section in this file */
                size_t model;
                int line;
        } *mine;
        size_t n_mine;
        bool failed;
        int r;                  /* -ENOMEM, sticky */
};

__attribute__((format(printf, 3, 4)))
static void perr(struct parse *p, int line, const char *fmt, ...)
{
        char *what;
        va_list ap;
        int r;

        p->failed = true;
        va_start(ap, fmt);
        r = vasprintf(&what, fmt, ap);
        va_end(ap);
        if (r < 0) {
                p->r = -ENOMEM;
                return;
        }
        if (add_error(p->errs, "%s:%d: %s", p->file, line, what) < 0)
                p->r = -ENOMEM;
        free(what);
}

static void on_error(void *user, int line, const char *problem)
{
        perr(user, line, "%s", problem);
}

static int new_model(struct parse *p, const char *id, int line)
{
        struct config_model *nm = realloc(p->c->models, (p->c->n_models + 1) * sizeof *nm);
        struct config_model *m;

        if (!nm)
                return -ENOMEM;
        p->c->models = nm;
        m = &nm[p->c->n_models];
        *m = (struct config_model){0};
        if (!(m->id = strdup(id)) || asprintf(&m->origin, "%s:%d", p->file, line) < 0 ||
            set_defaults(model_keys, ARRAY_SIZE(model_keys), m) < 0) {
                m->origin = NULL;
                model_clear(m);
                return -ENOMEM;
        }
        p->model = p->c->n_models++;
        return 0;
}

static void model_section(struct parse *p, const char *id, int line)
{
        void *nm;

        if (!valid_model_id(id)) {
                p->sect = SECT_BAD;
                perr(p, line, "%s: invalid model id (1..64 letters, digits, '.', '-', '_', ':')",
                     p->sect_text);
                return;
        }
        for (size_t i = 0; i < p->n_mine; i++)
                if (!strcmp(p->c->models[p->mine[i].model].id, id)) {
                        p->sect = SECT_BAD;
                        perr(p, line, "%s: duplicate section (first at line %d)", p->sect_text,
                             p->mine[i].line);
                        return;
                }
        p->sect = SECT_MODEL;
        for (p->model = 0; p->model < p->c->n_models; p->model++)
                if (!strcmp(p->c->models[p->model].id, id))
                        break;
        if (p->model == p->c->n_models && new_model(p, id, line) < 0)
                goto oom;
        nm = realloc(p->mine, (p->n_mine + 1) * sizeof *p->mine);
        if (!nm)
                goto oom;
        p->mine = nm;
        p->mine[p->n_mine].model = p->model;
        p->mine[p->n_mine++].line = line;
        return;
oom:
        p->sect = SECT_BAD;
        p->r = -ENOMEM;
}

static void on_section(void *user, const char *name, int line)
{
        struct parse *p = user;
        char q[96];

        inil_quote(q, sizeof q, name);
        snprintf(p->sect_text, sizeof p->sect_text, "[%s]", q);
        if (!strcmp(name, "Daemon")) {
                p->sect = SECT_DAEMON;
        } else if (!strncmp(name, "Model ", 6)) {
                model_section(p, name + 6, line);
        } else if (!strcmp(name, "Model")) {
                p->sect = SECT_BAD;
                perr(p, line, "%s: a model section needs an id: [Model ID]", p->sect_text);
        } else {
                p->sect = SECT_BAD;
                perr(p, line, "%s: unknown section", p->sect_text);
        }
}

static void on_key(void *user, const char *name, const char *value, int line)
{
        struct parse *p = user;
        const struct key *k = NULL;
        struct config_model *m = NULL;
        void *base = p->c;
        char qk[64], qv[64];
        int r;

        inil_quote(qk, sizeof qk, name);
        switch (p->sect) {
        case SECT_NONE:
                perr(p, line, "%s: outside of any section ([Daemon] or [Model ID])", qk);
                return;
        case SECT_BAD:
                return; /* the section was reported */
        case SECT_DAEMON:
                k = find_key(daemon_keys, ARRAY_SIZE(daemon_keys), name);
                break;
        case SECT_MODEL:
                k = find_key(model_keys, ARRAY_SIZE(model_keys), name);
                base = m = &p->c->models[p->model];
                break;
        }
        if (!*name) {
                perr(p, line, "%s: missing key name before '='", p->sect_text);
                return;
        }
        if (!k) {
                perr(p, line, "%s %s: unknown key", p->sect_text, qk);
                return;
        }
        /* systemd's rule: an empty assignment puts the default back. */
        r = set_value(k, base, *value ? value : k->def);
        if (r == -ENOMEM) {
                p->r = r;
                return;
        }
        if (r < 0) {
                inil_quote(qv, sizeof qv, value);
                perr(p, line, "%s %s: invalid value '%s' (expected %s)", p->sect_text, qk, qv,
                     k->expect);
                return;
        }
        if (m && !strcmp(k->name, "Path")) {
                free(m->origin);
                if (asprintf(&m->origin, "%s:%d", p->file, line) < 0) {
                        m->origin = NULL;
                        p->r = -ENOMEM;
                }
        }
}

static const struct inil_ops config_ops = {
        .section = on_section,
        .key = on_key,
        .error = on_error,
};

/* Applies f or text as the file called name. 0, -EINVAL or -ENOMEM. */
static int apply(struct moed_config *c, const char *name, FILE *f, const char *text,
                 struct config_errors *errs)
{
        struct parse p = { .c = c, .errs = errs, .file = name };
        int r;

        r = inil_parse(f, text, &config_ops, &p);
        free(p.mine);
        if (r == -EIO) {
                p.failed = true;
                if (add_error(errs, "%s: read error", name) < 0)
                        r = -ENOMEM;
        }
        if (p.r < 0 || r == -ENOMEM)
                return -ENOMEM;
        return p.failed ? -EINVAL : 0;
}

int config_apply_text(struct moed_config *c, const char *name, const char *text,
                      struct config_errors *errs)
{
        if (!c || !name || !text || !errs)
                return -EINVAL;
        return apply(c, name, NULL, text, errs);
}

static int apply_path(struct moed_config *c, const char *path, struct config_errors *errs)
{
        _cleanup_fclose_ FILE *f = fopen(path, "re");
        struct stat st;

        if (!f || fstat(fileno(f), &st) < 0)
                return add_error(errs, "%s: cannot open: %s", path, strerror(errno)) ?: -EINVAL;
        if (S_ISDIR(st.st_mode))
                return add_error(errs, "%s: is a directory", path) ?: -EINVAL;
        return apply(c, path, f, NULL, errs);
}

static int cmp_names(const void *a, const void *b)
{
        return strcmp(*(char *const *)a, *(char *const *)b);
}

static bool is_dropin(const char *name)
{
        size_t n = strlen(name);

        return name[0] != '.' && n > 5 && !strcmp(name + n - 5, ".conf");
}

/* Every *.conf of dir in strcmp order. A missing directory has none. */
static int apply_dropins(struct moed_config *c, const char *dir, struct config_errors *errs)
{
        DIR *d = opendir(dir);
        char **names = NULL;
        size_t n = 0;
        struct dirent *de;
        int r = 0;

        if (!d)
                return errno == ENOENT ? 0 :
                       add_error(errs, "%s: cannot read directory: %s", dir, strerror(errno)) ?:
                       -EINVAL;
        while ((de = readdir(d))) {
                char **nn;

                if (!is_dropin(de->d_name))
                        continue;
                nn = realloc(names, (n + 1) * sizeof *nn);
                if (!nn || !(nn[n] = strdup(de->d_name))) {
                        names = nn ? nn : names;
                        r = -ENOMEM;
                        break;
                }
                names = nn;
                n++;
        }
        closedir(d);
        if (r == 0)
                qsort(names, n, sizeof *names, cmp_names);
        for (size_t i = 0; i < n && r != -ENOMEM; i++) {
                _cleanup_free_ char *path = NULL;
                int k;

                if (asprintf(&path, "%s/%s", dir, names[i]) < 0) {
                        path = NULL;
                        r = -ENOMEM;
                        break;
                }
                k = apply_path(c, path, errs);
                if (k < 0 && r == 0)
                        r = k;
                if (k == -ENOMEM)
                        r = k;
        }
        free_strv(names, n);
        return r;
}

static const char *file_problem(const char *path)
{
        struct stat st;
        int fd;

        if (stat(path, &st) < 0)
                return strerror(errno);
        if (!S_ISREG(st.st_mode))
                return "not a regular file";
        fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
        if (fd < 0)
                return strerror(errno);
        close(fd);
        return NULL;
}

int config_check(const struct moed_config *c, bool check_files, struct config_errors *errs)
{
        size_t n0 = errs->n;

        for (size_t i = 0; i < c->n_models; i++) {
                const struct config_model *m = &c->models[i];
                const char *why;
                char q[PATH_MAX + 16];

                if (!m->path) {
                        if (add_error(errs, "%s: [Model %s] Path: missing (every model needs one)",
                                      m->origin ?: "?", m->id) < 0)
                                return -ENOMEM;
                        continue;
                }
                if (!check_files || !(why = file_problem(m->path)))
                        continue;
                inil_quote(q, sizeof q, m->path);
                if (add_error(errs, "%s: [Model %s] Path: '%s': %s", m->origin ?: "?", m->id, q,
                              why) < 0)
                        return -ENOMEM;
        }
        return errs->n > n0 ? -EINVAL : 0;
}

int config_load(const char *path, const char *dropin_dir, bool check_files,
                struct moed_config **out, struct config_errors *errs)
{
        _cleanup_free_ char *dir = NULL;
        struct moed_config *c;
        size_t n0;
        int r;

        if (!path || !out || !errs)
                return -EINVAL;
        n0 = errs->n;
        c = config_new_default();
        if (!c)
                return -ENOMEM;
        r = apply_path(c, path, errs);
        if (r != -ENOMEM && !dropin_dir && asprintf(&dir, "%s.d", path) < 0) {
                dir = NULL;
                r = -ENOMEM;
        }
        if (r != -ENOMEM)
                r = apply_dropins(c, dropin_dir ? dropin_dir : dir, errs);
        if (r != -ENOMEM)
                r = config_check(c, check_files, errs);
        if (r == -ENOMEM || errs->n > n0) {
                config_free(c);
                return r == -ENOMEM ? r : -EINVAL;
        }
        *out = c;
        return 0;
}
