/* tenant: the tenant files (tenants.d/NAME.conf, [Tenant]) and the answer
 * to "which tenant is this caller?". Names of users and groups are resolved
 * once, at load, so a lookup never touches NSS; bearer tokens are kept only
 * as SHA-256 hashes and compared in constant time. */
#include "policy/tenant.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <grp.h>
#include <limits.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "common/cleanup.h"
#include "policy/ini-lines.h"

struct tenant_set {
        struct tenant **t;      /* in the order added: file-name order from a directory */
        size_t n;
};

const char *tenant_match_name(enum tenant_match m)
{
        switch (m) {
        case TENANT_MATCH_NONE:
                return "none";
        case TENANT_MATCH_TOKEN:
                return "token";
        case TENANT_MATCH_USER:
                return "user";
        case TENANT_MATCH_GROUP:
                return "group";
        case TENANT_MATCH_DEFAULT:
                return "default";
        }
        return "?";
}

/* ---- sets and tenants -------------------------------------------------- */

static void tenant_free(struct tenant *t)
{
        if (!t)
                return;
        free(t->name);
        for (size_t i = 0; i < t->n_models; i++)
                free(t->models[i]);
        free(t->models);
        free(t->users);
        free(t->groups);
        if (t->tokens)
                OPENSSL_cleanse(t->tokens, t->n_tokens * sizeof *t->tokens);
        free(t->tokens);
        free(t);
}

static struct tenant *tenant_new(const char *name)
{
        struct tenant *t = calloc(1, sizeof *t);

        if (!t)
                return NULL;
        t->name = strdup(name);
        if (!t->name) {
                free(t);
                return NULL;
        }
        t->weight = 1;
        t->priority = TENANT_INTERACTIVE;
        t->max_concurrent = TENANT_UNLIMITED;
        t->max_queued = TENANT_UNLIMITED;
        t->tokens_per_minute = TENANT_UNLIMITED;
        t->tokens_per_day = TENANT_UNLIMITED;
        t->max_context = TENANT_UNLIMITED;
        t->max_output = TENANT_UNLIMITED;
        t->kv_share = 1;
        return t;
}

struct tenant_set *tenant_set_new(void)
{
        return calloc(1, sizeof(struct tenant_set));
}

void tenant_set_free(struct tenant_set *s)
{
        if (!s)
                return;
        for (size_t i = 0; i < s->n; i++)
                tenant_free(s->t[i]);
        free(s->t);
        free(s);
}

size_t tenant_set_count(const struct tenant_set *s)
{
        return s ? s->n : 0;
}

const struct tenant *tenant_set_get(const struct tenant_set *s, size_t i)
{
        return s && i < s->n ? s->t[i] : NULL;
}

const struct tenant *tenant_find(const struct tenant_set *s, const char *name)
{
        for (size_t i = 0; s && name && i < s->n; i++)
                if (!strcmp(s->t[i]->name, name))
                        return s->t[i];
        return NULL;
}

static int set_append(struct tenant_set *s, struct tenant *t)
{
        struct tenant **nt = realloc(s->t, (s->n + 1) * sizeof *nt);

        if (!nt)
                return -ENOMEM;
        s->t = nt;
        t->id = (uint32_t)s->n;
        s->t[s->n++] = t;
        return 0;
}

/* [A-Za-z0-9_.-]{1,64}, and not hidden: "." and ".." would make poor file
 * names wherever a tenant's name becomes one (usage state). */
static bool valid_tenant_name(const char *s)
{
        size_t n = strlen(s);

        if (n < 1 || n > 64 || s[0] == '.')
                return false;
        for (; *s; s++)
                if (!isalnum((unsigned char)*s) && !strchr("_.-", *s))
                        return false;
        return true;
}

/* The same rule as config.c's [Model ID]. */
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

/* ---- messages ---------------------------------------------------------- */

/* Every problem of a load, one per line, as many as fit in a moerr. */
struct msgs {
        void (*report)(void *user, const char *msg); /* each one, whole */
        void *user;
        char buf[sizeof(((struct moerr *)0)->msg)];
        size_t len;
        int n, dropped;
        int r;                  /* -ENOMEM, sticky */
};

__attribute__((format(printf, 2, 3)))
static void msg_add(struct msgs *m, const char *fmt, ...)
{
        char line[2 * PATH_MAX];
        size_t n;
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(line, sizeof line, fmt, ap);
        va_end(ap);
        if (m->report)
                m->report(m->user, line);
        n = strlen(line);
        m->n++;
        /* Keep room for the "(and N more)" tail. */
        if (m->len + n + 2 + 24 > sizeof m->buf) {
                m->dropped++;
                return;
        }
        if (m->len)
                m->buf[m->len++] = '\n';
        memcpy(m->buf + m->len, line, n + 1);
        m->len += n;
}

static int msg_finish(const struct msgs *m, struct moerr *e)
{
        if (m->r < 0)
                return moerr_set(e, m->r, "out of memory reading tenants");
        if (!m->n)
                return 0;
        if (m->dropped)
                return moerr_set(e, -EINVAL, "%s\n(and %d more)", m->buf, m->dropped);
        return moerr_set(e, -EINVAL, "%s", m->buf);
}

/* ---- values ------------------------------------------------------------ */

/* digits[.digits], locale-free: strtod would also take "nan", "1e3", and
 * a decimal comma under some locales. */
static bool parse_real(const char *s, double *out)
{
        double v = 0, scale = 1;
        bool any = false, point = false;

        for (; *s; s++) {
                if (*s == '.' && !point) {
                        point = true;
                } else if (isdigit((unsigned char)*s)) {
                        if (point)
                                v += (*s - '0') * (scale /= 10);
                        else
                                v = v * 10 + (*s - '0');
                        any = true;
                } else {
                        return false;
                }
        }
        if (!any || v > 1e15)
                return false;
        *out = v;
        return true;
}

static bool parse_limit(const char *s, int64_t *out)
{
        int64_t v = 0;

        if (!strcmp(s, "infinity")) {
                *out = TENANT_UNLIMITED;
                return true;
        }
        if (!*s)
                return false;
        for (; *s; s++) {
                if (!isdigit((unsigned char)*s) || v > (INT64_MAX - 1 - (*s - '0')) / 10)
                        return false;
                v = v * 10 + (*s - '0');
        }
        *out = v;
        return true;
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

static bool parse_id_number(const char *s, uint32_t *out)
{
        uint64_t v = 0;

        if (!*s || s[strspn(s, "0123456789")] || strlen(s) > 10)
                return false;
        for (; *s; s++)
                v = v * 10 + (uint64_t)(*s - '0');
        if (v >= UINT32_MAX) /* (uid_t)-1 means "no user" */
                return false;
        *out = (uint32_t)v;
        return true;
}

static int hexval(int c)
{
        if (c >= '0' && c <= '9')
                return c - '0';
        c = tolower(c);
        return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

static bool parse_token_hash(const char *s, uint8_t out[32])
{
        if (strncmp(s, "sha256:", 7) || strlen(s) != 7 + 64)
                return false;
        s += 7;
        for (int i = 0; i < 32; i++) {
                int hi = hexval((unsigned char)s[2 * i]), lo = hexval((unsigned char)s[2 * i + 1]);

                if (hi < 0 || lo < 0)
                        return false;
                out[i] = (uint8_t)(hi << 4 | lo);
        }
        return true;
}

/* getpwnam_r/getgrnam_r want a buffer whose size nobody knows in advance. */
static int lookup_user(const char *name, uid_t *out)
{
        size_t size = 4096;

        for (;;) {
                _cleanup_free_ char *buf = malloc(size);
                struct passwd pw, *res = NULL;
                int r;

                if (!buf)
                        return -ENOMEM;
                r = getpwnam_r(name, &pw, buf, size, &res);
                if (r == ERANGE && size < (1u << 20)) {
                        size *= 2;
                        continue;
                }
                if (res) {
                        *out = pw.pw_uid;
                        return 0;
                }
                return r == 0 || r == ENOENT || r == ESRCH || r == EBADF || r == EPERM ? -ESRCH : -r;
        }
}

static int lookup_group(const char *name, gid_t *out)
{
        size_t size = 4096;

        for (;;) {
                _cleanup_free_ char *buf = malloc(size);
                struct group gr, *res = NULL;
                int r;

                if (!buf)
                        return -ENOMEM;
                r = getgrnam_r(name, &gr, buf, size, &res);
                if (r == ERANGE && size < (1u << 20)) {
                        size *= 2;
                        continue;
                }
                if (res) {
                        *out = gr.gr_gid;
                        return 0;
                }
                return r == 0 || r == ENOENT || r == ESRCH || r == EBADF || r == EPERM ? -ESRCH : -r;
        }
}

static bool has_uid(const struct tenant *t, uid_t uid)
{
        for (size_t i = 0; i < t->n_users; i++)
                if (t->users[i] == uid)
                        return true;
        return false;
}

static bool has_gid(const struct tenant *t, gid_t gid)
{
        for (size_t i = 0; i < t->n_groups; i++)
                if (t->groups[i] == gid)
                        return true;
        return false;
}

/* Constant time per comparison; every hash is compared, found or not. */
static bool has_token(const struct tenant *t, const uint8_t h[32])
{
        bool found = false;

        for (size_t i = 0; i < t->n_tokens; i++)
                found |= CRYPTO_memcmp(t->tokens[i], h, 32) == 0;
        return found;
}

/* ---- one tenant file --------------------------------------------------- */

struct tparse {
        struct tenant_set *s;   /* the tenants before this one */
        struct tenant *t;
        const char *file;
        enum { TS_NONE, TS_TENANT, TS_BAD } sect;
        struct msgs *m;
        int n0;                 /* m->n before this file */
};

enum tkind { T_USERS, T_GROUPS, T_TOKENS, T_MODELS, T_WEIGHT, T_PRIORITY, T_LIMIT, T_KVSHARE,
             T_BOOL };

struct tkey {
        const char *name;
        enum tkind kind;
        size_t off;
        const char *expect;
};

#define T(f) offsetof(struct tenant, f)
static const struct tkey tenant_keys[] = {
        { "Users", T_USERS, 0, "user names or uids" },
        { "Groups", T_GROUPS, 0, "group names or gids" },
        { "Tokens", T_TOKENS, 0, "sha256: and 64 hex digits (moectl hash-token)" },
        { "Weight", T_WEIGHT, T(weight), "a number in (0, 1000]" },
        { "Priority", T_PRIORITY, T(priority), "interactive or batch" },
        { "MaxConcurrent", T_LIMIT, T(max_concurrent), "an integer >= 0 or infinity" },
        { "MaxQueued", T_LIMIT, T(max_queued), "an integer >= 0 or infinity" },
        { "TokensPerMinute", T_LIMIT, T(tokens_per_minute), "an integer >= 0 or infinity" },
        { "TokensPerDay", T_LIMIT, T(tokens_per_day), "an integer >= 0 or infinity" },
        { "MaxContext", T_LIMIT, T(max_context), "an integer >= 0 or infinity" },
        { "MaxOutputTokens", T_LIMIT, T(max_output), "an integer >= 0 or infinity" },
        { "KVShare", T_KVSHARE, T(kv_share), "a share in (0, 1] such as 50% or 0.5" },
        { "Models", T_MODELS, 0, "model ids" },
        { "LogContent", T_BOOL, T(log_content), "yes or no" },
        { "Admin", T_BOOL, T(admin), "yes or no" },
};

__attribute__((format(printf, 4, 5)))
static void kerr(struct tparse *p, int line, const char *key, const char *fmt, ...)
{
        char what[384], qk[64];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(what, sizeof what, fmt, ap);
        va_end(ap);
        inil_quote(qk, sizeof qk, key);
        msg_add(p->m, "%s:%d: [Tenant] %s: %s", p->file, line, qk, what);
}

static void bad_value(struct tparse *p, int line, const struct tkey *k, const char *v)
{
        char q[64];

        inil_quote(q, sizeof q, v);
        kerr(p, line, k->name, "invalid value '%s' (expected %s)", q, k->expect);
}

static int grow(void *pp, size_t n, size_t size)
{
        void *np = reallocarray(*(void **)pp, n + 1, size);

        if (!np)
                return -ENOMEM;
        *(void **)pp = np;
        return 0;
}

static void add_user(struct tparse *p, int line, const char *item)
{
        char q[64];
        uid_t uid = 0;
        int r = 0;

        if (!parse_id_number(item, &uid))
                r = lookup_user(item, &uid);
        inil_quote(q, sizeof q, item);
        if (r == -ENOMEM) {
                p->m->r = r;
                return;
        }
        if (r < 0) {
                kerr(p, line, "Users", r == -ESRCH ? "unknown user '%s'" : "cannot look up '%s': %s",
                     q, strerror(-r));
                return;
        }
        for (size_t i = 0; i < p->s->n; i++)
                if (has_uid(p->s->t[i], uid)) {
                        kerr(p, line, "Users", "user '%s' (uid %u) is already in tenant '%s'", q,
                             (unsigned)uid, p->s->t[i]->name);
                        return;
                }
        if (has_uid(p->t, uid))
                return;
        if (grow(&p->t->users, p->t->n_users, sizeof *p->t->users) < 0) {
                p->m->r = -ENOMEM;
                return;
        }
        p->t->users[p->t->n_users++] = uid;
}

static void add_group(struct tparse *p, int line, const char *item)
{
        char q[64];
        gid_t gid = 0;
        int r = 0;

        if (!parse_id_number(item, &gid))
                r = lookup_group(item, &gid);
        inil_quote(q, sizeof q, item);
        if (r == -ENOMEM) {
                p->m->r = r;
                return;
        }
        if (r < 0) {
                kerr(p, line, "Groups", r == -ESRCH ? "unknown group '%s'" : "cannot look up '%s': %s",
                     q, strerror(-r));
                return;
        }
        if (has_gid(p->t, gid))
                return;
        if (grow(&p->t->groups, p->t->n_groups, sizeof *p->t->groups) < 0) {
                p->m->r = -ENOMEM;
                return;
        }
        p->t->groups[p->t->n_groups++] = gid;
}

static void add_token(struct tparse *p, int line, const struct tkey *k, const char *item)
{
        uint8_t h[32];

        if (!parse_token_hash(item, h)) {
                bad_value(p, line, k, item);
                return;
        }
        for (size_t i = 0; i < p->s->n; i++)
                if (has_token(p->s->t[i], h)) {
                        /* The first 8 hex digits are enough to find it in both files. */
                        kerr(p, line, "Tokens", "token %.15s... is already in tenant '%s'", item,
                             p->s->t[i]->name);
                        return;
                }
        if (has_token(p->t, h))
                return;
        if (grow(&p->t->tokens, p->t->n_tokens, sizeof *p->t->tokens) < 0) {
                p->m->r = -ENOMEM;
                return;
        }
        memcpy(p->t->tokens[p->t->n_tokens++], h, 32);
}

static void add_model(struct tparse *p, int line, const struct tkey *k, const char *item)
{
        char *id;

        if (!valid_model_id(item)) {
                bad_value(p, line, k, item);
                return;
        }
        for (size_t i = 0; i < p->t->n_models; i++)
                if (!strcmp(p->t->models[i], item))
                        return;
        if (grow(&p->t->models, p->t->n_models, sizeof *p->t->models) < 0 || !(id = strdup(item))) {
                p->m->r = -ENOMEM;
                return;
        }
        p->t->models[p->t->n_models++] = id;
}

/* Lists add up over repeated keys (a line holds only ~200 characters);
 * an empty value empties the list, as in systemd's files. */
static void set_list(struct tparse *p, int line, const struct tkey *k, const char *v)
{
        _cleanup_free_ char *copy = NULL;
        char *save = NULL;
        struct tenant *t = p->t;

        if (!*v) {
                switch (k->kind) {
                case T_USERS:
                        free(t->users);
                        t->users = NULL;
                        t->n_users = 0;
                        break;
                case T_GROUPS:
                        free(t->groups);
                        t->groups = NULL;
                        t->n_groups = 0;
                        break;
                case T_TOKENS:
                        free(t->tokens);
                        t->tokens = NULL;
                        t->n_tokens = 0;
                        break;
                default:
                        for (size_t i = 0; i < t->n_models; i++)
                                free(t->models[i]);
                        free(t->models);
                        t->models = NULL;
                        t->n_models = 0;
                        break;
                }
                return;
        }
        copy = strdup(v);
        if (!copy) {
                p->m->r = -ENOMEM;
                return;
        }
        for (char *it = strtok_r(copy, " \t", &save); it; it = strtok_r(NULL, " \t", &save)) {
                switch (k->kind) {
                case T_USERS:
                        add_user(p, line, it);
                        break;
                case T_GROUPS:
                        add_group(p, line, it);
                        break;
                case T_TOKENS:
                        add_token(p, line, k, it);
                        break;
                default:
                        add_model(p, line, k, it);
                        break;
                }
        }
}

static bool set_scalar(struct tenant *t, const struct tkey *k, const char *v)
{
        void *field = (char *)t + k->off;
        double d;
        size_t n;

        switch (k->kind) {
        case T_WEIGHT:
                if (!*v)
                        v = "1";
                if (!parse_real(v, &d) || d <= 0 || d > 1000)
                        return false;
                t->weight = d;
                return true;
        case T_PRIORITY:
                if (!*v || !strcmp(v, "interactive"))
                        t->priority = TENANT_INTERACTIVE;
                else if (!strcmp(v, "batch"))
                        t->priority = TENANT_BATCH;
                else
                        return false;
                return true;
        case T_LIMIT:
                return parse_limit(*v ? v : "infinity", field);
        case T_KVSHARE: {
                char num[32];
                bool pct;

                if (!*v)
                        v = "1";
                n = strlen(v);
                pct = v[n - 1] == '%';
                if (n - pct >= sizeof num)
                        return false;
                memcpy(num, v, n - pct);
                num[n - pct] = '\0';
                if (!parse_real(num, &d))
                        return false;
                if (pct)
                        d /= 100;
                if (d <= 0 || d > 1)
                        return false;
                t->kv_share = d;
                return true;
        }
        case T_BOOL:
                return parse_bool(*v ? v : "no", field) == 0;
        default:
                return false;
        }
}

static void on_key(void *user, const char *name, const char *value, int line)
{
        struct tparse *p = user;
        const struct tkey *k = NULL;

        if (p->sect == TS_BAD)
                return;
        if (p->sect == TS_NONE) {
                char q[64];

                inil_quote(q, sizeof q, name);
                msg_add(p->m, "%s:%d: %s: outside of any section ([Tenant])", p->file, line, q);
                return;
        }
        for (size_t i = 0; i < ARRAY_SIZE(tenant_keys) && !k; i++)
                if (!strcmp(tenant_keys[i].name, name))
                        k = &tenant_keys[i];
        if (!k) {
                kerr(p, line, name, "unknown key");
                return;
        }
        switch (k->kind) {
        case T_USERS:
        case T_GROUPS:
        case T_TOKENS:
        case T_MODELS:
                set_list(p, line, k, value);
                break;
        default:
                if (!set_scalar(p->t, k, value))
                        bad_value(p, line, k, value);
                break;
        }
}

static void on_section(void *user, const char *name, int line)
{
        struct tparse *p = user;
        char q[80];

        if (!strcmp(name, "Tenant")) {
                p->sect = TS_TENANT;
                return;
        }
        p->sect = TS_BAD;
        inil_quote(q, sizeof q, name);
        msg_add(p->m, "%s:%d: [%s]: unknown section", p->file, line, q);
}

static void on_error(void *user, int line, const char *problem)
{
        struct tparse *p = user;

        msg_add(p->m, "%s:%d: %s", p->file, line, problem);
}

static const struct inil_ops tenant_ops = {
        .section = on_section,
        .key = on_key,
        .error = on_error,
};

/* Parses one tenant (f or text) called name, shown as file in messages, and
 * adds it to s when it has no problem. */
static void add_one(struct tenant_set *s, const char *name, const char *file, FILE *f,
                    const char *text, struct msgs *m)
{
        struct tparse p = { .s = s, .file = file, .m = m, .n0 = m->n };
        char q[80];
        int r;

        inil_quote(q, sizeof q, name);
        if (!valid_tenant_name(name)) {
                msg_add(m, "%s: invalid tenant name '%s' (1..64 of A-Z a-z 0-9 _ . -, not "
                        "starting with '.')", file, q);
                return;
        }
        if (tenant_find(s, name)) {
                msg_add(m, "%s: tenant '%s' already exists", file, q);
                return;
        }
        p.t = tenant_new(name);
        if (!p.t) {
                m->r = -ENOMEM;
                return;
        }
        r = inil_parse(f, text, &tenant_ops, &p);
        if (r == -EIO)
                msg_add(m, "%s: read error", file);
        else if (r < 0)
                m->r = r;
        if (m->r < 0 || m->n > p.n0 || set_append(s, p.t) < 0) {
                if (m->r == 0 && m->n == p.n0)
                        m->r = -ENOMEM;
                tenant_free(p.t);
        }
}

int tenant_set_add_text(struct tenant_set *s, const char *name, const char *text,
                        struct moerr *e)
{
        _cleanup_free_ char *file = NULL;
        struct msgs m = {0};
        char q[96];

        if (!s || !name || !text)
                return moerr_set(e, -EINVAL, "tenant_set_add_text: missing argument");
        /* Messages name the file this text would be. */
        inil_quote(q, sizeof q, name);
        if (asprintf(&file, "%s.conf", q) < 0) {
                file = NULL;
                return moerr_set(e, -ENOMEM, "out of memory");
        }
        add_one(s, name, file, NULL, text, &m);
        return msg_finish(&m, e);
}

static int cmp_names(const void *a, const void *b)
{
        return strcmp(*(char *const *)a, *(char *const *)b);
}

static bool is_tenant_file(const char *name)
{
        size_t n = strlen(name);

        return name[0] != '.' && n > 5 && !strcmp(name + n - 5, ".conf");
}

static void load_file(struct tenant_set *s, const char *dir, const char *fname, struct msgs *m)
{
        _cleanup_free_ char *path = NULL, *name = NULL;
        _cleanup_fclose_ FILE *f = NULL;
        struct stat st;

        char label[PATH_MAX + 16];

        if (asprintf(&path, "%s/%s", dir, fname) < 0 ||
            !(name = strndup(fname, strlen(fname) - 5))) {
                path = NULL;
                m->r = -ENOMEM;
                return;
        }
        /* A file name may hold any byte but '/' and NUL. */
        inil_quote(label, sizeof label, path);
        f = fopen(path, "re");
        if (!f || fstat(fileno(f), &st) < 0) {
                msg_add(m, "%s: cannot open: %s", label, strerror(errno));
                return;
        }
        if (!S_ISREG(st.st_mode)) {
                msg_add(m, "%s: not a regular file", label);
                return;
        }
        add_one(s, name, label, f, NULL, m);
}

int tenant_set_load_dir(const char *dir, struct tenant_set **out, struct moerr *e)
{
        return tenant_set_load_dir_report(dir, out, NULL, NULL, e);
}

int tenant_set_load_dir_report(const char *dir, struct tenant_set **out,
                               void (*report)(void *user, const char *msg), void *user,
                               struct moerr *e)
{
        struct tenant_set *s;
        struct msgs m = { .report = report, .user = user };
        char **names = NULL;
        size_t n = 0;
        struct dirent *de;
        DIR *d;
        int r;

        if (!dir || !out)
                return moerr_set(e, -EINVAL, "tenant_set_load_dir: missing argument");
        s = tenant_set_new();
        if (!s)
                return moerr_set(e, -ENOMEM, "out of memory");
        d = opendir(dir);
        if (!d && errno != ENOENT) {
                r = -errno;
                tenant_set_free(s);
                return moerr_set(e, r, "%s: cannot read directory: %s", dir, strerror(-r));
        }
        while (d && (de = readdir(d))) {
                char **nn;

                if (!is_tenant_file(de->d_name))
                        continue;
                nn = reallocarray(names, n + 1, sizeof *nn);
                if (nn)
                        names = nn;
                if (!nn || !(names[n] = strdup(de->d_name))) {
                        m.r = -ENOMEM;
                        break;
                }
                n++;
        }
        if (d)
                closedir(d);
        if (names)
                qsort(names, n, sizeof *names, cmp_names);
        for (size_t i = 0; i < n && m.r == 0; i++)
                load_file(s, dir, names[i], &m);
        for (size_t i = 0; i < n; i++)
                free(names[i]);
        free(names);
        r = msg_finish(&m, e);
        if (r < 0) {
                tenant_set_free(s);
                return r;
        }
        *out = s;
        return 0;
}

int tenant_set_single_user(uid_t uid, struct tenant_set **out, struct moerr *e)
{
        _cleanup_free_ char *buf = NULL;
        struct passwd pw, *res = NULL;
        struct tenant_set *s;
        struct tenant *t;
        char name[80];
        long size = sysconf(_SC_GETPW_R_SIZE_MAX);

        if (!out)
                return moerr_set(e, -EINVAL, "tenant_set_single_user: missing argument");
        if (size < 4096)
                size = 16384;
        buf = malloc(size);
        if (buf && getpwuid_r(uid, &pw, buf, size, &res) == 0 && res &&
            valid_tenant_name(pw.pw_name))
                snprintf(name, sizeof name, "%s", pw.pw_name);
        else
                snprintf(name, sizeof name, "uid%u", (unsigned)uid);
        s = tenant_set_new();
        t = tenant_new(name);
        if (!s || !t || grow(&t->users, 0, sizeof *t->users) < 0) {
                tenant_free(t);
                tenant_set_free(s);
                return moerr_set(e, -ENOMEM, "out of memory");
        }
        t->users[t->n_users++] = uid;
        t->admin = true;
        if (set_append(s, t) < 0) {
                tenant_free(t);
                tenant_set_free(s);
                return moerr_set(e, -ENOMEM, "out of memory");
        }
        *out = s;
        return 0;
}

/* ---- questions --------------------------------------------------------- */

static int sha256(const char *token, uint8_t h[32])
{
        unsigned int len = 0;

        if (!EVP_Digest(token, strlen(token), h, &len, EVP_sha256(), NULL) || len != 32)
                return -EIO;
        return 0;
}

int tenant_hash_token(const char *token, char out[72])
{
        static const char hex[] = "0123456789abcdef";
        uint8_t h[32];

        if (!token || !out)
                return -EINVAL;
        if (sha256(token, h) < 0)
                return -EIO;
        memcpy(out, "sha256:", 7);
        for (int i = 0; i < 32; i++) {
                out[7 + 2 * i] = hex[h[i] >> 4];
                out[8 + 2 * i] = hex[h[i] & 15];
        }
        out[71] = '\0';
        OPENSSL_cleanse(h, sizeof h);
        return 0;
}

const struct tenant *tenant_lookup(const struct tenant_set *s, uid_t uid, gid_t gid,
                                   const gid_t *groups, size_t n_groups, const char *bearer,
                                   enum tenant_match *how)
{
        const struct tenant *best = NULL;
        enum tenant_match m = TENANT_MATCH_NONE;
        uint8_t h[32];

        if (!s)
                goto done;
        if (bearer) {
                /* A token that matches nothing is refused, not treated as
                 * the uid: the caller asked to be someone in particular. */
                m = TENANT_MATCH_TOKEN;
                if (sha256(bearer, h) < 0)
                        goto done;
                for (size_t i = 0; i < s->n; i++)
                        if (has_token(s->t[i], h) && !best)
                                best = s->t[i];
                OPENSSL_cleanse(h, sizeof h);
                goto done;
        }
        for (size_t i = 0; i < s->n; i++)
                if (has_uid(s->t[i], uid)) {
                        best = s->t[i];
                        m = TENANT_MATCH_USER;
                        goto done;
                }
        /* File-name order, whatever order the tenants were added in. */
        for (size_t i = 0; i < s->n; i++) {
                const struct tenant *t = s->t[i];
                bool in = has_gid(t, gid);

                for (size_t g = 0; g < n_groups && !in; g++)
                        in = has_gid(t, groups[g]);
                if (in && (!best || strcmp(t->name, best->name) < 0))
                        best = t;
        }
        if (best) {
                m = TENANT_MATCH_GROUP;
                goto done;
        }
        best = tenant_find(s, "default");
        m = best ? TENANT_MATCH_DEFAULT : TENANT_MATCH_NONE;
done:
        if (how)
                *how = m;
        return best;
}

bool tenant_allows_model(const struct tenant *t, const char *model)
{
        if (!t || !model)
                return false;
        if (!t->models)
                return true;
        for (size_t i = 0; i < t->n_models; i++)
                if (!strcmp(t->models[i], model))
                        return true;
        return false;
}
