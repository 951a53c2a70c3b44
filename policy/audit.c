/* audit.c: the audit trail: one journald record per request (stderr when
 * there is no journald) and the optional hash-chained JSON-lines file with
 * its start-up tail check, rotation and setting aside of a damaged file.
 * The chain's format and its checker live in audit-verify.c. */
#include "audit.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <systemd/sd-journal.h>

#include "common/cleanup.h"
#include "common/log.h"
#include "policy/audit-verify.h"

/* A record longer than this (content of a huge prompt) cannot be the last
 * line read back at start; such a file is set aside. */
#define TAIL_MAX (16u << 20)
#define MAX_FIELDS 24

struct audit {
        /* the file, when configured */
        char *path;
        char *base;             /* file name in dirfd */
        char *rotating;         /* base + ".rotating" */
        int dirfd, fd;
        uint64_t rotate_bytes;
        uint64_t seq;           /* last seq written; 0: none */
        char last_hash[AUDIT_HASH_HEX + 1];
        uint64_t size;
        uint64_t first_seq;     /* of the current file; 0: empty */
        bool recovered;
        /* the journal */
        int (*send)(void *user, const struct iovec *iov, size_t n);
        void *send_user;
        FILE *fallback;
        char *journal_socket;
};

uint64_t audit_seq(const struct audit *a) { return a->seq; }
uint64_t audit_file_size(const struct audit *a) { return a->size; }
bool audit_recovered(const struct audit *a) { return a->recovered; }

/* ---- the fallback line ---- */

static bool bare(const char *v, size_t n)
{
        if (n == 0)
                return false;
        for (size_t i = 0; i < n; i++) {
                unsigned char ch = (unsigned char)v[i];
                if (ch <= ' ' || ch == 0x7f || ch == '"' || ch == '\\' || ch == '=')
                        return false;
        }
        return true;
}

void audit_write_line(FILE *out, const struct iovec *iov, size_t n)
{
        for (size_t i = 0; i < n; i++) {
                const char *s = iov[i].iov_base, *eq = memchr(s, '=', iov[i].iov_len);
                size_t klen = eq ? (size_t)(eq - s) : iov[i].iov_len;
                const char *v = eq ? eq + 1 : "";
                size_t vlen = eq ? iov[i].iov_len - klen - 1 : 0;

                if (i)
                        fputc(' ', out);
                fwrite(s, 1, klen, out);
                fputc('=', out);
                if (bare(v, vlen)) {
                        fwrite(v, 1, vlen, out);
                        continue;
                }
                fputc('"', out);
                for (size_t k = 0; k < vlen; k++) {
                        unsigned char ch = (unsigned char)v[k];
                        switch (ch) {
                        case '"': fputs("\\\"", out); break;
                        case '\\': fputs("\\\\", out); break;
                        case '\n': fputs("\\n", out); break;
                        case '\r': fputs("\\r", out); break;
                        case '\t': fputs("\\t", out); break;
                        default:
                                if (ch < 0x20 || ch == 0x7f)
                                        fprintf(out, "\\x%02x", ch);
                                else
                                        fputc(ch, out);
                        }
                }
                fputc('"', out);
        }
        fputc('\n', out);
        fflush(out);
}

/* ---- the journal record ---- */

struct fields {
        struct iovec iov[MAX_FIELDS];
        size_t n;
        bool oom;
};

static void field_add(struct fields *f, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void field_add(struct fields *f, const char *fmt, ...)
{
        va_list ap;
        char *s;
        int len;

        if (f->n == MAX_FIELDS)
                return;
        va_start(ap, fmt);
        len = vasprintf(&s, fmt, ap);
        va_end(ap);
        if (len < 0) {
                f->oom = true;
                return;
        }
        f->iov[f->n++] = (struct iovec){ s, (size_t)len };
}

static void fields_free(struct fields *f)
{
        for (size_t i = 0; i < f->n; i++) {
                /* content may be in here: do not leave it in freed memory */
                explicit_bzero(f->iov[i].iov_base, f->iov[i].iov_len);
                free(f->iov[i].iov_base);
        }
}

static bool has_uid(uid_t u) { return u != (uid_t)-1; }
static bool has_gid(gid_t g) { return g != (gid_t)-1; }

static uint64_t usec(double s)
{
        return isfinite(s) && s > 0 ? (uint64_t)llround(s * 1e6) : 0;
}

static void describe(const struct audit_record *r, char *buf, size_t cap)
{
        char who[160], id[80] = "";

        if (r->tenant && has_uid(r->uid))
                snprintf(who, sizeof who, "tenant %s (uid %u)", r->tenant, (unsigned)r->uid);
        else if (r->tenant)
                snprintf(who, sizeof who, "tenant %s", r->tenant);
        else if (has_uid(r->uid))
                snprintf(who, sizeof who, "uid %u (no tenant)", (unsigned)r->uid);
        else
                snprintf(who, sizeof who, "an unknown caller");
        if (r->request_id)
                snprintf(id, sizeof id, " %s", r->request_id);
        if (r->refusal)
                snprintf(buf, cap, "request%s of %s refused: %s", id, who, r->refusal);
        else
                snprintf(buf, cap, "request%s of %s: %" PRId64 "+%" PRId64 " tokens, %s, %.1f s",
                         id, who, r->prompt_tokens, r->completion_tokens,
                         r->finish_reason ? r->finish_reason : "finished",
                         isfinite(r->total_s) && r->total_s > 0 ? r->total_s : 0.0);
}

static void journal_fields(const struct audit_record *r, const char *seq_hash, uint64_t seq,
                           struct fields *f)
{
        char msg[1024];

        describe(r, msg, sizeof msg);
        field_add(f, "MESSAGE_ID=%s", AUDIT_MESSAGE_ID);
        field_add(f, "PRIORITY=%d", LOG_INFO);
        field_add(f, "SYSLOG_IDENTIFIER=moed");
        field_add(f, "MESSAGE=%s", msg);
        if (r->tenant)
                field_add(f, "MOED_TENANT=%s", r->tenant);
        if (has_uid(r->uid))
                field_add(f, "MOED_UID=%u", (unsigned)r->uid);
        if (has_gid(r->gid))
                field_add(f, "MOED_GID=%u", (unsigned)r->gid);
        if (r->pid > 0)
                field_add(f, "MOED_PID=%d", (int)r->pid);
        if (r->door)
                field_add(f, "MOED_DOOR=%s", r->door);
        if (r->model)
                field_add(f, "MOED_MODEL=%s", r->model);
        if (r->request_id)
                field_add(f, "MOED_REQUEST_ID=%s", r->request_id);
        field_add(f, "MOED_PROMPT_TOKENS=%" PRId64, r->prompt_tokens);
        field_add(f, "MOED_COMPLETION_TOKENS=%" PRId64, r->completion_tokens);
        if (!r->refusal) {
                field_add(f, "MOED_QUEUE_USEC=%" PRIu64, usec(r->queue_s));
                if (usec(r->first_token_s))
                        field_add(f, "MOED_FIRST_TOKEN_USEC=%" PRIu64, usec(r->first_token_s));
                field_add(f, "MOED_TOTAL_USEC=%" PRIu64, usec(r->total_s));
        }
        if (r->finish_reason)
                field_add(f, "MOED_FINISH=%s", r->finish_reason);
        if (r->refusal)
                field_add(f, "MOED_REFUSAL=%s", r->refusal);
        if (r->prompt_text)
                field_add(f, "MOED_PROMPT=%s", r->prompt_text);
        if (r->answer_text)
                field_add(f, "MOED_ANSWER=%s", r->answer_text);
        if (seq_hash) {
                field_add(f, "MOED_AUDIT_SEQ=%" PRIu64, seq);
                field_add(f, "MOED_AUDIT_HASH=%s", seq_hash);
        }
}

/* sd_journal_sendv drops a record silently when journald's socket is
 * missing, so the socket is looked at first. */
static void deliver(struct audit *a, const struct iovec *iov, size_t n)
{
        struct stat st;
        int r;

        if (a->send)
                r = a->send(a->send_user, iov, n);
        else if (stat(a->journal_socket, &st) == 0 && S_ISSOCK(st.st_mode))
                r = sd_journal_sendv(iov, (int)n);
        else
                r = -ENOENT;
        if (r < 0)
                audit_write_line(a->fallback ? a->fallback : stderr, iov, n);
}

/* ---- the file's records ---- */

/* Length of the valid UTF-8 sequence at s (n bytes left), 0 if invalid. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
        uint32_t cp;
        size_t len;

        if (s[0] < 0x80)
                return 1;
        if (s[0] >= 0xc2 && s[0] <= 0xdf)
                len = 2, cp = s[0] & 0x1f;
        else if (s[0] >= 0xe0 && s[0] <= 0xef)
                len = 3, cp = s[0] & 0x0f;
        else if (s[0] >= 0xf0 && s[0] <= 0xf4)
                len = 4, cp = s[0] & 0x07;
        else
                return 0;
        if (len > n)
                return 0;
        for (size_t i = 1; i < len; i++) {
                if ((s[i] & 0xc0) != 0x80)
                        return 0;
                cp = cp << 6 | (s[i] & 0x3f);
        }
        if ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
            (len == 4 && (cp < 0x10000 || cp > 0x10ffff)))
                return 0;
        return len;
}

/* A JSON string of s; bytes that are not UTF-8 (jansson refuses them)
 * become U+FFFD rather than losing the record. */
static json_t *jstr(const char *s)
{
        json_t *j = json_string(s);
        size_t n = strlen(s), o = 0;
        char *t;

        if (j || !(t = malloc(3 * n + 1)))
                return j;
        for (size_t i = 0; i < n;) {
                size_t l = utf8_len((const unsigned char *)s + i, n - i);
                if (l) {
                        memcpy(t + o, s + i, l);
                        o += l, i += l;
                } else {
                        memcpy(t + o, "\xef\xbf\xbd", 3);
                        o += 3, i++;
                }
        }
        j = json_stringn(t, o);
        explicit_bzero(t, o);
        free(t);
        return j;
}

static void jset(json_t *o, const char *key, json_t *v, bool *oom)
{
        if (json_object_set_new(o, key, v) < 0)
                *oom = true;
}

static json_t *request_json(const struct audit_record *r)
{
        json_t *o = json_object();
        bool oom = !o;

        if (oom)
                return NULL;
        jset(o, "event", json_string("request"), &oom);
        if (r->request_id)
                jset(o, "request_id", jstr(r->request_id), &oom);
        if (r->tenant)
                jset(o, "tenant", jstr(r->tenant), &oom);
        if (has_uid(r->uid))
                jset(o, "uid", json_integer(r->uid), &oom);
        if (has_gid(r->gid))
                jset(o, "gid", json_integer(r->gid), &oom);
        if (r->pid > 0)
                jset(o, "pid", json_integer(r->pid), &oom);
        if (r->door)
                jset(o, "door", jstr(r->door), &oom);
        if (r->model)
                jset(o, "model", jstr(r->model), &oom);
        jset(o, "prompt_tokens", json_integer(r->prompt_tokens), &oom);
        jset(o, "completion_tokens", json_integer(r->completion_tokens), &oom);
        if (!r->refusal) {
                jset(o, "queue_usec", json_integer((json_int_t)usec(r->queue_s)), &oom);
                if (usec(r->first_token_s))
                        jset(o, "first_token_usec",
                             json_integer((json_int_t)usec(r->first_token_s)), &oom);
                jset(o, "total_usec", json_integer((json_int_t)usec(r->total_s)), &oom);
        }
        if (r->finish_reason)
                jset(o, "finish", jstr(r->finish_reason), &oom);
        if (r->refusal)
                jset(o, "refusal", jstr(r->refusal), &oom);
        if (r->prompt_text)
                jset(o, "prompt", jstr(r->prompt_text), &oom);
        if (r->answer_text)
                jset(o, "answer", jstr(r->answer_text), &oom);
        if (oom) {
                json_decref(o);
                return NULL;
        }
        return o;
}

static void now_rfc3339(char *buf, size_t cap)
{
        struct timespec ts;
        struct tm tm;
        size_t n;

        clock_gettime(CLOCK_REALTIME, &ts);
        gmtime_r(&ts.tv_sec, &tm);
        n = strftime(buf, cap, "%Y-%m-%dT%H:%M:%S", &tm);
        snprintf(buf + n, cap - n, ".%06ldZ", ts.tv_nsec / 1000);
}

/* The line (with its "\n") of the record seq that follows prev. */
static char *make_line(uint64_t seq, const char *prev, json_t *body, size_t *len)
{
        json_t *o = json_object();
        char stamp[40];
        char *s = NULL;
        bool oom = !o;

        now_rfc3339(stamp, sizeof stamp);
        if (!oom) {
                jset(o, "seq", json_integer((json_int_t)seq), &oom);
                jset(o, "time", json_string(stamp), &oom);
                jset(o, "prev", json_string(prev), &oom);
                if (json_object_update(o, body) < 0)
                        oom = true;
        }
        if (!oom)
                s = json_dumps(o, JSON_COMPACT);
        json_decref(o);
        if (!s)
                return NULL;
        *len = strlen(s);
        s[(*len)++] = '\n';     /* json_dumps' NUL becomes the newline */
        return s;
}

/* One record, whole or not at all: a partial write is cut back off. If
 * even that fails, *torn says so (the file now ends in a partial line). */
static int append(int fd, const char *line, size_t len, uint64_t size_before, bool *torn)
{
        size_t done = 0;

        *torn = false;
        while (done < len) {
                ssize_t w = write(fd, line + done, len - done);
                if (w < 0 && errno == EINTR)
                        continue;
                if (w <= 0) {
                        int r = w < 0 ? -errno : -EIO;
                        if (done && ftruncate(fd, (off_t)size_before) < 0)
                                *torn = true;
                        return r;
                }
                done += (size_t)w;
        }
        return 0;
}

/* Writes body as the next record of the current file. */
static int write_record(struct audit *a, json_t *body)
{
        _cleanup_free_ char *line = NULL;
        size_t len;
        bool torn;
        int r;

        if (!(line = make_line(a->seq + 1, a->last_hash, body, &len)))
                return -ENOMEM;
        if ((r = append(a->fd, line, len, a->size, &torn)) < 0) {
                if (torn) {
                        /* The next record would be glued to the partial
                         * line: reopen, and the tail check sets it aside. */
                        close(a->fd);
                        a->fd = -1;
                }
                explicit_bzero(line, len);
                return r;
        }
        a->seq++;
        audit_line_hash(line, len - 1, a->last_hash);
        a->size += len;
        if (!a->first_seq)
                a->first_seq = a->seq;
        explicit_bzero(line, len);
        /* If the sync fails the line is still in the file (the page cache),
         * if not surely on disk: the chain goes on from it. */
        return fdatasync(a->fd) < 0 ? -errno : 0;
}

/* ---- opening, the tail check, rotation ---- */

/* Reads [off, off+len) of fd. */
static int read_at(int fd, char *buf, size_t len, off_t off)
{
        size_t done = 0;

        while (done < len) {
                ssize_t n = pread(fd, buf + done, len - done, off + (off_t)done);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        return n < 0 ? -errno : -EIO;
                done += (size_t)n;
        }
        return 0;
}

static size_t count_nl(const char *s, size_t n)
{
        size_t k = 0;

        for (size_t i = 0; i < n; i++)
                k += s[i] == '\n';
        return k;
}

/* What start-up learns of an existing file. */
struct tail {
        const char *why;        /* NULL: the tail is sound */
        char whybuf[160];
        bool have_last;         /* a whole record to continue from */
        uint64_t last_seq;
        char last_hash[AUDIT_HASH_HEX + 1];
        uint64_t first_seq;     /* 0: unknown */
};

/* The line at [s, e) of the buffer; sets t->have_last when it parses. */
static bool take_last(struct tail *t, const char *s, const char *e, struct audit_link *l)
{
        const char *why;

        if (audit_link_parse(s, (size_t)(e - s), l, &why) < 0)
                return false;
        t->have_last = true;
        t->last_seq = l->seq;
        audit_line_hash(s, (size_t)(e - s), t->last_hash);
        return true;
}

static int check_tail(int fd, uint64_t size, struct tail *t)
{
        _cleanup_free_ char *buf = NULL;
        size_t len = MO_MIN(size, 65536);
        struct audit_link last, before;
        const char *why, *end, *p, *ls, *bs;
        char h[AUDIT_HASH_HEX + 1];
        bool truncated;
        int r;

        memset(t, 0, sizeof *t);
        /* Enough of the end to hold the last two whole lines. */
        for (;;) {
                char *nb = realloc(buf, len);
                if (!nb)
                        return -ENOMEM;
                buf = nb;
                if ((r = read_at(fd, buf, len, (off_t)(size - len))) < 0)
                        return r;
                if (len == size || count_nl(buf, len) >= 3)
                        break;
                if (len >= TAIL_MAX) {
                        t->why = "its last records are longer than 16 MiB";
                        return 0;
                }
                len = MO_MIN(MO_MIN(size, (uint64_t)2 * len), (uint64_t)TAIL_MAX);
        }
        truncated = buf[len - 1] != '\n';
        end = truncated ? memrchr(buf, '\n', len) : buf + len - 1;
        /* end: the newline of the last whole line, or NULL */
        if (!end) {
                t->why = "the last line is cut short (no newline at the end)";
                return 0;
        }
        p = memrchr(buf, '\n', (size_t)(end - buf));
        ls = p ? p + 1 : buf;   /* start of the last whole line */
        if (!p && len < size) {
                t->why = "its last record is longer than 16 MiB";
                return 0;
        }
        if (!take_last(t, ls, end, &last)) {
                t->why = "its last whole line is not a record";
                /* continue from the one before it, if that parses */
                if (p) {
                        const char *q = memrchr(buf, '\n', (size_t)(p - buf));
                        if (q || len == size)
                                take_last(t, q ? q + 1 : buf, p, &before);
                }
                return 0;
        }
        if (truncated) {
                t->why = "the last line is cut short (no newline at the end)";
                return 0;
        }
        if (!p) {               /* the file's only line */
                if (!(last.seq == 1 && strcmp(last.prev, AUDIT_ZERO_HASH) == 0) && !last.rotate)
                        t->why = "its only record is neither seq 1 nor a rotate record";
                t->first_seq = last.seq;
                return 0;
        }
        bs = memrchr(buf, '\n', (size_t)(p - buf));
        bs = bs ? bs + 1 : buf;
        if (bs == buf && len < size) {
                t->why = "a record before the last is longer than 16 MiB";
                return 0;
        }
        if (audit_link_parse(bs, (size_t)(p - bs), &before, &why) < 0) {
                snprintf(t->whybuf, sizeof t->whybuf, "the record before the last is %s", why);
                t->why = t->whybuf;
                return 0;
        }
        audit_line_hash(bs, (size_t)(p - bs), h);
        if (last.seq != before.seq + 1 || strcmp(last.prev, h) != 0) {
                snprintf(t->whybuf, sizeof t->whybuf,
                         "its last two records (seq %" PRIu64 ", %" PRIu64 ") do not chain",
                         before.seq, last.seq);
                t->why = t->whybuf;
        }
        return 0;
}

/* The seq of the file's first record, 0 when it cannot be read. */
static uint64_t first_seq_of(int fd, uint64_t size)
{
        _cleanup_free_ char *buf = NULL;
        size_t len = MO_MIN(size, 65536);
        struct audit_link l;
        const char *why, *nl;

        for (;;) {
                char *nb = realloc(buf, len);
                if (!nb)
                        return 0;
                buf = nb;
                if (read_at(fd, buf, len, 0) < 0)
                        return 0;
                if ((nl = memchr(buf, '\n', len)) || len == size || len >= TAIL_MAX)
                        break;
                len = MO_MIN(MO_MIN(size, (uint64_t)2 * len), (uint64_t)TAIL_MAX);
        }
        if (!nl || audit_link_parse(buf, (size_t)(nl - buf), &l, &why) < 0)
                return 0;
        return l.seq;
}

/* A free name for the file being set aside: FILE.<first seq>[.broken][.N]
 * (FILE.0 or FILE.broken when its first record cannot be read). */
static char *aside_name(struct audit *a, uint64_t first, bool broken)
{
        char *name = NULL;
        struct stat st;

        for (unsigned k = 0; k < 1000; k++) {
                char seq[32] = "", n[16] = "";
                /* no record has seq 0: it stands for "unknown" */
                if (first || !broken)
                        snprintf(seq, sizeof seq, ".%" PRIu64, first);
                if (k)
                        snprintf(n, sizeof n, ".%u", k);
                free(name);
                if (asprintf(&name, "%s%s%s%s", a->base, seq, broken ? ".broken" : "", n) < 0)
                        return NULL;
                if (fstatat(a->dirfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0 && errno == ENOENT)
                        return name;
        }
        free(name);
        return NULL;
}

static int rename_noreplace(int dirfd, const char *from, const char *to)
{
        struct stat st;

        if (renameat2(dirfd, from, dirfd, to, RENAME_NOREPLACE) == 0)
                return 0;
        if (errno != EINVAL && errno != ENOSYS)
                return -errno;
        /* a filesystem without RENAME_NOREPLACE; we own the directory */
        if (fstatat(dirfd, to, &st, AT_SYMLINK_NOFOLLOW) == 0)
                return -EEXIST;
        return renameat(dirfd, from, dirfd, to) < 0 ? -errno : 0;
}

/* The current file becomes `name` and a new one starts with a rotate
 * record (carrying why, when the old one was damaged). The new file is
 * whole on disk before either rename. */
static int rotate_to(struct audit *a, const char *name, const char *why, struct moerr *e)
{
        _cleanup_free_ char *line = NULL;
        _cleanup_close_ int nfd = -1;
        json_t *body;
        size_t len = 0;
        bool oom = false, torn;
        int r;

        if ((body = json_object())) {
                jset(body, "event", json_string("rotate"), &oom);
                jset(body, "rotated_from", jstr(name), &oom);
                if (why)
                        jset(body, "broken", jstr(why), &oom);
                if (!oom)
                        line = make_line(a->seq + 1, a->last_hash, body, &len);
        }
        json_decref(body);
        if (!line)
                return moerr_set(e, -ENOMEM, "out of memory");
        nfd = openat(a->dirfd, a->rotating,
                     O_RDWR | O_APPEND | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (nfd < 0)
                return moerr_set(e, -errno, "audit file %s.rotating: %m", a->path);
        r = append(nfd, line, len, 0, &torn);
        if (r == 0 && fdatasync(nfd) < 0)
                r = -errno;
        if (r < 0) {
                unlinkat(a->dirfd, a->rotating, 0);
                return moerr_set(e, r, "audit file %s.rotating: %s", a->path, strerror(-r));
        }
        if ((r = rename_noreplace(a->dirfd, a->base, name)) < 0) {
                unlinkat(a->dirfd, a->rotating, 0);
                return moerr_set(e, r, "audit file %s: cannot rename it to %s: %s", a->path,
                                 name, strerror(-r));
        }
        if (renameat(a->dirfd, a->rotating, a->dirfd, a->base) < 0) {
                r = -errno;
                renameat(a->dirfd, name, a->dirfd, a->base);
                unlinkat(a->dirfd, a->rotating, 0);
                return moerr_set(e, r, "audit file %s: cannot start a new one: %s", a->path,
                                 strerror(-r));
        }
        fsync(a->dirfd);
        if (a->fd >= 0)
                close(a->fd);
        a->fd = TAKE_FD(nfd);
        a->seq++;
        audit_line_hash(line, len - 1, a->last_hash);
        a->size = len;
        a->first_seq = a->seq;
        return 0;
}

/* A rotation that a crash cut between its two renames is finished; one
 * cut before them is dropped (FILE is still whole). */
static void finish_rotation(struct audit *a)
{
        struct stat st;

        if (fstatat(a->dirfd, a->rotating, &st, AT_SYMLINK_NOFOLLOW) < 0)
                return;
        if (fstatat(a->dirfd, a->base, &st, AT_SYMLINK_NOFOLLOW) == 0) {
                unlinkat(a->dirfd, a->rotating, 0);
                mo_log(LOG_NOTICE, "audit file %s: dropped an unfinished rotation", a->path);
        } else if (renameat(a->dirfd, a->rotating, a->dirfd, a->base) == 0) {
                mo_log(LOG_NOTICE, "audit file %s: finished an interrupted rotation", a->path);
        }
}

/* Opens the file and continues its chain, or sets it aside. */
static int file_start(struct audit *a, struct moerr *e)
{
        struct stat st;
        struct tail t;
        int r;

        finish_rotation(a);
        a->fd = openat(a->dirfd, a->base,
                       O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY, 0600);
        if (a->fd < 0)
                return moerr_set(e, -errno, "audit file %s: %s", a->path,
                                 errno == ELOOP ? "is a symbolic link" : strerror(errno));
        if (fstat(a->fd, &st) < 0)
                return moerr_set(e, -errno, "audit file %s: %m", a->path);
        if (!S_ISREG(st.st_mode))
                return moerr_set(e, -EINVAL, "audit file %s: not a regular file", a->path);
        if ((st.st_mode & 077) && fchmod(a->fd, 0600) < 0)
                return moerr_set(e, -errno, "audit file %s: cannot make it private: %m", a->path);
        a->size = (uint64_t)st.st_size;
        a->seq = 0;
        a->first_seq = 0;
        memcpy(a->last_hash, AUDIT_ZERO_HASH, sizeof a->last_hash);
        if (a->size == 0)
                return 0;
        if ((r = check_tail(a->fd, a->size, &t)) < 0)
                return moerr_set(e, r, "audit file %s: cannot read it: %s", a->path,
                                 strerror(-r));
        if (t.have_last) {
                a->seq = t.last_seq;
                memcpy(a->last_hash, t.last_hash, sizeof a->last_hash);
        }
        a->first_seq = t.first_seq ? t.first_seq : first_seq_of(a->fd, a->size);
        if (!t.why)
                return 0;

        _cleanup_free_ char *name = aside_name(a, a->first_seq, true);
        if (!name)
                return moerr_set(e, -EEXIST, "audit file %s is damaged (%s) and no name is "
                                 "free to set it aside", a->path, t.why);
        if ((r = rotate_to(a, name, t.why, e)) < 0)
                return moerr_prefix(e, r, "audit file %s is damaged (%s)", a->path, t.why);
        a->recovered = true;
        mo_log(LOG_CRIT, "audit file %s is damaged: %s. It was set aside as %s, and a new chain "
               "starts in %s (seq %" PRIu64 "); check the old file with `moectl audit verify`",
               a->path, t.why, name, a->path, a->seq);
        return 0;
}

int audit_open(const struct audit_config *c, struct audit **out, struct moerr *e)
{
        struct audit *a = calloc(1, sizeof *a);
        const char *slash;
        int r;

        if (!a)
                return moerr_set(e, -ENOMEM, "out of memory");
        a->fd = a->dirfd = -1;
        a->send = c->send;
        a->send_user = c->send_user;
        a->fallback = c->fallback;
        a->rotate_bytes = c->rotate_bytes ? c->rotate_bytes : AUDIT_ROTATE_BYTES;
        memcpy(a->last_hash, AUDIT_ZERO_HASH, sizeof a->last_hash);
        if (!(a->journal_socket = strdup(c->journal_socket ? c->journal_socket :
                                          AUDIT_JOURNAL_SOCKET))) {
                audit_close(a);
                return moerr_set(e, -ENOMEM, "out of memory");
        }
        if (c->file && c->file[0]) {
                slash = strrchr(c->file, '/');
                _cleanup_free_ char *dir = slash ? strndup(c->file, (size_t)(slash - c->file))
                                                 : strdup(".");
                if (!dir || !(a->path = strdup(c->file)) ||
                    !(a->base = strdup(slash ? slash + 1 : c->file)) ||
                    asprintf(&a->rotating, "%s.rotating", a->base) < 0) {
                        a->rotating = NULL;
                        audit_close(a);
                        return moerr_set(e, -ENOMEM, "out of memory");
                }
                if (!a->base[0] || strcmp(a->base, ".") == 0 || strcmp(a->base, "..") == 0) {
                        audit_close(a);
                        return moerr_set(e, -EINVAL, "audit file %s: not a file name", c->file);
                }
                a->dirfd = open(dir[0] ? dir : "/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
                if (a->dirfd < 0) {
                        r = moerr_set(e, -errno, "audit file %s: directory %s: %m", c->file,
                                      dir[0] ? dir : "/");
                        audit_close(a);
                        return r;
                }
                if ((r = file_start(a, e)) < 0) {
                        audit_close(a);
                        return r;
                }
        }
        *out = a;
        return 0;
}

void audit_close(struct audit *a)
{
        if (!a)
                return;
        if (a->fd >= 0)
                close(a->fd);
        if (a->dirfd >= 0)
                close(a->dirfd);
        free(a->path);
        free(a->base);
        free(a->rotating);
        free(a->journal_socket);
        free(a);
}

int audit_rotate(struct audit *a, struct moerr *e)
{
        _cleanup_free_ char *name = NULL;

        if (!a->path)
                return moerr_set(e, -ENOENT, "no audit file (AuditFile=) to rotate");
        if (a->fd < 0) {
                int r = file_start(a, e);
                if (r < 0)
                        return r;
        }
        if (a->size == 0)
                return 0;
        if (!(name = aside_name(a, a->first_seq, false)))
                return moerr_set(e, -EEXIST, "audit file %s: no free name to rotate it to",
                                 a->path);
        return rotate_to(a, name, NULL, e);
}

/* The file's part of audit_log: the record's seq and line hash in *hash
 * when it was written. */
static int log_to_file(struct audit *a, const struct audit_record *r, char *hash)
{
        struct moerr e = { "" };
        uint64_t before;
        json_t *body;
        int ret = 0;

        if (a->fd < 0) {        /* an earlier failure: try again */
                if ((ret = file_start(a, &e)) < 0) {
                        if (a->fd >= 0)
                                close(a->fd);
                        a->fd = -1;
                        mo_log(LOG_ERR, "%s", e.msg);
                        return ret;
                }
        }
        if (a->size >= a->rotate_bytes && audit_rotate(a, &e) < 0)
                mo_log(LOG_ERR, "%s (the record goes to the current file)", e.msg);
        if (!(body = request_json(r)))
                return -ENOMEM;
        before = a->seq;
        ret = write_record(a, body);
        json_decref(body);
        if (ret < 0)
                mo_log(LOG_ERR, "audit file %s: record seq %" PRIu64 ": %s", a->path,
                       before + 1, strerror(-ret));
        if (a->seq > before)    /* written, even if the sync failed */
                memcpy(hash, a->last_hash, AUDIT_HASH_HEX + 1);
        return ret;
}

int audit_log(struct audit *a, const struct audit_record *r)
{
        char hash[AUDIT_HASH_HEX + 1] = "";
        struct fields f = { .n = 0 };
        int ret = 0;

        if (a->path)
                ret = log_to_file(a, r, hash);
        journal_fields(r, hash[0] ? hash : NULL, a->seq, &f);
        deliver(a, f.iov, f.n);
        fields_free(&f);
        if (f.oom && ret == 0)
                ret = -ENOMEM;
        return ret;
}
