/* usage-store.c: usage.json, written atomically and checked on the way
 * back (see usage-store.h for the format). A file that fails any check is
 * set aside whole rather than half-read: partial counts would look real. */
#include "usage-store.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/cleanup.h"

#define TMP_FILE USAGE_STORE_FILE ".tmp"
#define FORMAT "moed-usage"

/* The counters saved per tenant, besides "refused". */
static const struct {
        const char *key;
        size_t off;
} fields[] = {
        { "requests", offsetof(struct quota_usage, requests) },
        { "refusals", offsetof(struct quota_usage, refusals) },
        { "prompt_tokens", offsetof(struct quota_usage, prompt_tokens) },
        { "completion_tokens", offsetof(struct quota_usage, completion_tokens) },
        { "limited", offsetof(struct quota_usage, limited) },
        { "minute_used", offsetof(struct quota_usage, minute_used) },
        { "day_used", offsetof(struct quota_usage, day_used) },
};

static int64_t *field(struct quota_usage *u, size_t i)
{
        return (int64_t *)((char *)u + fields[i].off);
}

/* The tenant name rule of policy/tenant.c: [A-Za-z0-9_.-]{1,64}, not
 * starting with '.'. */
static bool valid_name(const char *s)
{
        size_t n = strlen(s);

        if (n == 0 || n > 64 || s[0] == '.')
                return false;
        for (size_t i = 0; i < n; i++)
                if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-",
                            s[i]))
                        return false;
        return true;
}

/* SHA-256 of the canonical form of o, in lowercase hex. */
static int digest_hex(const json_t *o, char hex[65])
{
        _cleanup_free_ char *s = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned int len = 0;

        if (!s || !EVP_Digest(s, strlen(s), md, &len, EVP_sha256(), NULL) || len != 32)
                return -ENOMEM;
        for (unsigned int i = 0; i < len; i++)
                snprintf(hex + 2 * i, 3, "%02x", md[i]);
        return 0;
}

/* ---- save -------------------------------------------------------------- */

static json_t *tenant_json(const struct quota_usage *u)
{
        json_t *o = json_object(), *refused = json_object();
        struct quota_usage c = *u;

        if (!o || !refused || json_object_set_new(o, "refused", refused) < 0) {
                json_decref(o);
                return NULL;
        }
        for (size_t i = 0; i < ARRAY_SIZE(fields); i++)
                if (json_object_set_new(o, fields[i].key,
                                        json_integer(MO_MAX(*field(&c, i), 0))) < 0)
                        goto fail;
        for (int r = 0; r < QUOTA_N_REASONS; r++)
                if (json_object_set_new(refused, quota_reason_name(r),
                                        json_integer(MO_MAX(u->refused[r], 0))) < 0)
                        goto fail;
        return o;
fail:
        json_decref(o);
        return NULL;
}

/* The whole file's text, checksum included. */
static char *usage_text(const struct quota_book *b)
{
        json_auto_t *root = json_object();
        json_t *tenants = json_object();
        char hex[65];
        struct quota_usage u;
        double wall = quota_book_wall(b);

        if (!root || !tenants || json_object_set_new(root, "tenants", tenants) < 0)
                return NULL;
        for (size_t i = 0; i < quota_usage_count(b); i++) {
                if (quota_usage_get(b, i, &u) < 0 ||
                    json_object_set_new(tenants, u.name, tenant_json(&u)) < 0)
                        return NULL;
        }
        if (json_object_set_new(root, "format", json_string(FORMAT)) < 0 ||
            json_object_set_new(root, "version", json_integer(USAGE_STORE_VERSION)) < 0 ||
            json_object_set_new(root, "saved_at", json_integer(wall > 0 ? (json_int_t)wall : 0)) < 0 ||
            digest_hex(root, hex) < 0 ||
            json_object_set_new(root, "sha256", json_string(hex)) < 0)
                return NULL;
        return json_dumps(root, JSON_INDENT(2) | JSON_SORT_KEYS);
}

static int write_all(int fd, const char *p, size_t n)
{
        while (n > 0) {
                ssize_t w = write(fd, p, n);

                if (w < 0 && errno == EINTR)
                        continue;
                if (w <= 0)
                        return w < 0 ? -errno : -EIO;
                p += w;
                n -= (size_t)w;
        }
        return 0;
}

int usage_store_save(const char *state_dir, const struct quota_book *b, struct moerr *e)
{
        _cleanup_free_ char *text = usage_text(b);
        _cleanup_close_ int dfd = -1;
        _cleanup_close_ int fd = -1;
        const char *step;
        int r;

        if (!text)
                return moerr_set(e, -ENOMEM, "%s/%s: out of memory", state_dir, USAGE_STORE_FILE);
        dfd = open(state_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0)
                return moerr_set(e, -errno, "%s: cannot open the state directory: %m", state_dir);
        fd = openat(dfd, TMP_FILE, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (fd < 0)
                return moerr_set(e, -errno, "%s/%s: cannot create: %m", state_dir, TMP_FILE);
        step = "write";
        if ((r = write_all(fd, text, strlen(text))) < 0 || (r = write_all(fd, "\n", 1)) < 0)
                goto fail;
        step = "fsync";
        if (fsync(fd) < 0)
                goto fail_errno;
        step = "close";
        if (close(TAKE_FD(fd)) < 0)
                goto fail_errno;
        step = "rename";
        if (renameat(dfd, TMP_FILE, dfd, USAGE_STORE_FILE) < 0)
                goto fail_errno;
        /* The rename is durable once the directory is. */
        if (fsync(dfd) < 0)
                return moerr_set(e, -errno, "%s: fsync of the state directory: %m", state_dir);
        return 0;
fail_errno:
        r = -errno;
fail:
        unlinkat(dfd, TMP_FILE, 0);
        return moerr_set(e, r, "%s/%s: %s failed: %s; %s is unchanged", state_dir, TMP_FILE,
                         step, strerror(-r), USAGE_STORE_FILE);
}

/* ---- load -------------------------------------------------------------- */

struct loaded {
        const char *name;       /* points into the parsed JSON */
        struct quota_usage u;
};

static bool count_ok(const json_t *v)
{
        return json_is_integer(v) && json_integer_value(v) >= 0;
}

/* One tenant's object into l; a message into why on failure. */
static int parse_tenant(const char *name, json_t *o, struct loaded *l, char *why, size_t cap)
{
        const char *key;
        json_t *v;

        if (!valid_name(name)) {
                snprintf(why, cap, "a tenant name is not valid");
                return -EBADMSG;
        }
        if (!json_is_object(o)) {
                snprintf(why, cap, "tenant %s is not an object", name);
                return -EBADMSG;
        }
        memset(l, 0, sizeof *l);
        l->name = name;
        for (size_t i = 0; i < ARRAY_SIZE(fields); i++) {
                v = json_object_get(o, fields[i].key);
                if (!count_ok(v)) {
                        snprintf(why, cap, "tenant %s: \"%s\" is %s", name, fields[i].key,
                                 v ? "not an integer >= 0" : "missing");
                        return -EBADMSG;
                }
                *field(&l->u, i) = json_integer_value(v);
        }
        if (!json_is_object(json_object_get(o, "refused"))) {
                snprintf(why, cap, "tenant %s: \"refused\" is not an object", name);
                return -EBADMSG;
        }
        json_object_foreach(json_object_get(o, "refused"), key, v) {
                int r = quota_reason_from_name(key);

                if (r < 0 || !count_ok(v)) {
                        snprintf(why, cap, "tenant %s: refusals by reason: %s", name,
                                 r < 0 ? "an unknown reason" : "not an integer >= 0");
                        return -EBADMSG;
                }
                l->u.refused[r] = json_integer_value(v);
        }
        if (json_object_size(o) != ARRAY_SIZE(fields) + 1) {
                snprintf(why, cap, "tenant %s has unknown keys", name);
                return -EBADMSG;
        }
        return 0;
}

/* Checks the parsed file top down; fills *out (n entries) or why. */
static int parse_usage(json_t *root, struct loaded **out, size_t *n, json_int_t *saved_at,
                       char *why, size_t cap)
{
        json_t *v = json_object_get(root, "version"), *tenants, *sum;
        char hex[65];
        const char *name;
        size_t i = 0;
        int r;

        if (!json_is_object(root) || !json_is_string(json_object_get(root, "format")) ||
            strcmp(json_string_value(json_object_get(root, "format")), FORMAT) != 0) {
                snprintf(why, cap, "not a moed usage file: no \"format\": \"%s\"", FORMAT);
                return -EBADMSG;
        }
        if (!json_is_integer(v) || json_integer_value(v) != USAGE_STORE_VERSION) {
                snprintf(why, cap, "version %s, this moed reads version %d",
                         json_is_integer(v) ? "other than ours" : "missing or not a number",
                         USAGE_STORE_VERSION);
                return -EBADMSG;
        }
        sum = json_incref(json_object_get(root, "sha256"));
        json_object_del(root, "sha256");
        r = json_is_string(sum) ? digest_hex(root, hex) : 0;
        if (r == 0 && (!json_is_string(sum) || strcmp(json_string_value(sum), hex) != 0)) {
                snprintf(why, cap, "%s", json_is_string(sum) ?
                         "the SHA-256 checksum does not match the content" :
                         "the SHA-256 checksum is missing");
                r = -EBADMSG;
        }
        json_decref(sum);
        if (r < 0)
                return r;
        v = json_object_get(root, "saved_at");
        tenants = json_object_get(root, "tenants");
        if (!count_ok(v) || !json_is_object(tenants) || json_object_size(root) != 4) {
                snprintf(why, cap, "%s", !count_ok(v) ? "\"saved_at\" is not an integer >= 0" :
                         !json_is_object(tenants) ? "\"tenants\" is not an object" :
                         "unknown keys at the top level");
                return -EBADMSG;
        }
        *saved_at = json_integer_value(v);
        if (!(*out = calloc(json_object_size(tenants) + 1, sizeof **out)))
                return -ENOMEM;
        json_object_foreach(tenants, name, v) {
                if ((r = parse_tenant(name, v, &(*out)[i], why, cap)) < 0)
                        return r;
                i++;
        }
        *n = i;
        return 0;
}

/* Reads the whole of fd, at most USAGE_STORE_MAX_BYTES + 1. */
static int read_all(int fd, char **out, size_t *len)
{
        size_t cap = 4096, n = 0;
        char *buf = malloc(cap), *nb;

        if (!buf)
                return -ENOMEM;
        for (;;) {
                ssize_t got;

                if (n == cap) {
                        if (cap > USAGE_STORE_MAX_BYTES)
                                break;
                        if (!(nb = realloc(buf, cap * 2))) {
                                free(buf);
                                return -ENOMEM;
                        }
                        buf = nb;
                        cap *= 2;
                }
                got = read(fd, buf + n, cap - n);
                if (got < 0 && errno == EINTR)
                        continue;
                if (got < 0) {
                        int r = -errno;
                        free(buf);
                        return r;
                }
                if (got == 0)
                        break;
                n += (size_t)got;
        }
        *out = buf;
        *len = n;
        return 0;
}

/* Renames the corrupt file out of the way; the new name into aside. */
static int set_aside(int dfd, double wall, char *aside, size_t cap)
{
        long long t = wall > 0 ? (long long)wall : 0;

        for (int i = 1; i < 100; i++) {
                if (i == 1)
                        snprintf(aside, cap, "%s.corrupt-%lld", USAGE_STORE_FILE, t);
                else
                        snprintf(aside, cap, "%s.corrupt-%lld-%d", USAGE_STORE_FILE, t, i);
                if (renameat2(dfd, USAGE_STORE_FILE, dfd, aside, RENAME_NOREPLACE) == 0) {
                        fsync(dfd);
                        return 0;
                }
                if (errno != EEXIST)
                        return -errno;
        }
        return -EEXIST;
}

/* Control and non-ASCII bytes (a parser message may quote the file) as '?'. */
static void printable(char *s)
{
        for (; *s; s++)
                if ((unsigned char)*s < 0x20 || (unsigned char)*s >= 0x7f)
                        *s = '?';
}

static int corrupt(const char *dir, int dfd, const struct quota_book *b, char *why,
                   struct moerr *e)
{
        char aside[96];
        int r = set_aside(dfd, quota_book_wall(b), aside, sizeof aside);

        printable(why);
        if (r < 0)
                return moerr_set(e, -EBADMSG, "%s/%s is corrupt (%s); it could not be moved "
                                 "aside (%s) and will be overwritten at the next save; usage "
                                 "counts start from zero", dir, USAGE_STORE_FILE, why,
                                 strerror(-r));
        return moerr_set(e, -EBADMSG, "%s/%s is corrupt (%s); moved aside to %s, usage counts "
                         "start from zero", dir, USAGE_STORE_FILE, why, aside);
}

int usage_store_load(const char *state_dir, struct quota_book *b, struct moerr *e)
{
        _cleanup_close_ int dfd = -1;
        _cleanup_close_ int fd = -1;
        _cleanup_free_ char *buf = NULL;
        _cleanup_free_ struct loaded *l = NULL;
        json_auto_t *root = NULL;
        json_error_t jerr;
        json_int_t saved_at = 0;
        struct stat st;
        char why[256];
        size_t len = 0, n = 0;
        int r;

        dfd = open(state_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0 && errno == ENOENT)
                return 0;
        if (dfd < 0)
                return moerr_set(e, -errno, "%s: cannot open the state directory: %m", state_dir);
        fd = openat(dfd, USAGE_STORE_FILE, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
        if (fd < 0 && errno == ENOENT)
                return 0;
        if (fd < 0 && errno == ELOOP)
                return moerr_set(e, -ELOOP, "%s/%s is a symbolic link; not following it",
                                 state_dir, USAGE_STORE_FILE);
        if (fd < 0)
                return moerr_set(e, -errno, "%s/%s: cannot open: %m", state_dir, USAGE_STORE_FILE);
        if (fstat(fd, &st) < 0)
                return moerr_set(e, -errno, "%s/%s: %m", state_dir, USAGE_STORE_FILE);
        if (!S_ISREG(st.st_mode))
                return moerr_set(e, -EINVAL, "%s/%s is not a regular file", state_dir,
                                 USAGE_STORE_FILE);
        if ((r = read_all(fd, &buf, &len)) < 0)
                return moerr_set(e, r, "%s/%s: cannot read: %s", state_dir, USAGE_STORE_FILE,
                                 strerror(-r));
        if (len > USAGE_STORE_MAX_BYTES) {
                snprintf(why, sizeof why, "larger than %u bytes", USAGE_STORE_MAX_BYTES);
                return corrupt(state_dir, dfd, b, why, e);
        }
        root = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
        if (!root) {
                snprintf(why, sizeof why, "not JSON: %s at line %d, column %d", jerr.text,
                         jerr.line, jerr.column);
                return corrupt(state_dir, dfd, b, why, e);
        }
        r = parse_usage(root, &l, &n, &saved_at, why, sizeof why);
        if (r == -ENOMEM)
                return moerr_set(e, r, "%s/%s: out of memory", state_dir, USAGE_STORE_FILE);
        if (r < 0)
                return corrupt(state_dir, dfd, b, why, e);
        for (size_t i = 0; i < n; i++)
                if (quota_restore(b, l[i].name, &l[i].u,
                                  quota_book_wall(b) - (double)saved_at) < 0)
                        return moerr_set(e, -ENOMEM, "%s/%s: out of memory", state_dir,
                                         USAGE_STORE_FILE);
        return 0;
}
