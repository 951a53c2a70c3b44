/* audit-verify.c: checks the audit file's hash chain and says where it
 * breaks. A file is read once into a small table (seq, prev, own hash per
 * line); the diagnosis then looks back and ahead in that table, which is
 * what telling "removed" from "reordered" from "altered" needs. */
#include "audit-verify.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <openssl/evp.h>

#include "common/cleanup.h"

/* More than this many breaks in one file are counted, not described. */
#define MAX_REPORTED 50

void audit_line_hash(const void *line, size_t len, char out[AUDIT_HASH_HEX + 1])
{
        static const char hex[] = "0123456789abcdef";
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned int n = 0;

        if (EVP_Digest(line, len, md, &n, EVP_sha256(), NULL) != 1 || n != 32) {
                /* Only on a broken libcrypto; a hash that matches nothing. */
                memset(out, 'x', AUDIT_HASH_HEX);
                out[AUDIT_HASH_HEX] = 0;
                return;
        }
        for (unsigned int i = 0; i < 32; i++) {
                out[2 * i] = hex[md[i] >> 4];
                out[2 * i + 1] = hex[md[i] & 15];
        }
        out[AUDIT_HASH_HEX] = 0;
}

static bool is_hash_hex(const char *s)
{
        size_t i;

        for (i = 0; s[i]; i++)
                if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
                        return false;
        return i == AUDIT_HASH_HEX;
}

static bool is_file_name(const char *s)
{
        size_t n = strlen(s);

        return n > 0 && n <= AUDIT_NAME_MAX && !strchr(s, '/') && strcmp(s, ".") != 0 &&
               strcmp(s, "..") != 0;
}

int audit_link_parse(const char *line, size_t len, struct audit_link *out, const char **why)
{
        json_t *o = json_loadb(line, len, JSON_REJECT_DUPLICATES, NULL);
        json_t *seq, *prev, *time, *event, *from;
        int r = -EBADMSG;

        memset(out, 0, sizeof *out);
        if (!o) {
                *why = len == 0 ? "an empty line" : "not JSON";
                return r;
        }
        seq = json_object_get(o, "seq");
        prev = json_object_get(o, "prev");
        time = json_object_get(o, "time");
        event = json_object_get(o, "event");
        from = json_object_get(o, "rotated_from");
        if (!json_is_object(o))
                *why = "not a JSON object";
        else if (!json_is_integer(seq) || json_integer_value(seq) < 1)
                *why = "no \"seq\" (an integer from 1)";
        else if (!json_is_string(prev) || !is_hash_hex(json_string_value(prev)))
                *why = "no \"prev\" (64 lowercase hex digits)";
        else if (!json_is_string(time))
                *why = "no \"time\"";
        else if (!json_is_string(event))
                *why = "no \"event\"";
        else if (from && (!json_is_string(from) || !is_file_name(json_string_value(from))))
                *why = "\"rotated_from\" is not a file name";
        else if (strcmp(json_string_value(event), "rotate") == 0 && !from)
                *why = "a rotate record without \"rotated_from\"";
        else
                r = 0;
        if (r == 0) {
                out->seq = (uint64_t)json_integer_value(seq);
                memcpy(out->prev, json_string_value(prev), AUDIT_HASH_HEX + 1);
                out->rotate = strcmp(json_string_value(event), "rotate") == 0;
                if (from)
                        snprintf(out->rotated_from, sizeof out->rotated_from, "%s",
                                 json_string_value(from));
                out->broken = json_object_get(o, "broken") != NULL;
        }
        json_decref(o);
        return r;
}

const char *audit_problem_name(enum audit_problem p)
{
        static const char *const names[] = {
                [AUDIT_INTACT] = "intact",         [AUDIT_REMOVED] = "removed",
                [AUDIT_ALTERED] = "altered",       [AUDIT_REORDERED] = "reordered",
                [AUDIT_DUPLICATED] = "duplicated", [AUDIT_TRUNCATED] = "truncated",
                [AUDIT_MALFORMED] = "malformed",   [AUDIT_BROKEN_LINK] = "broken link",
        };

        return (size_t)p < ARRAY_SIZE(names) ? names[p] : "?";
}

/* One line of a file, as the diagnosis needs it. */
enum { L_PARSED = 1, L_NL = 2, L_ROTATE = 4, L_BROKEN = 8 };
struct vline {
        uint64_t seq;
        char prev[AUDIT_HASH_HEX + 1];
        char hash[AUDIT_HASH_HEX + 1];
        uint8_t flags;
        const char *why;        /* when not parsed */
};

struct vfile {
        const char *path;
        size_t given;           /* position on the command line */
        struct vline *lines;
        size_t n;
        char rotated_from[AUDIT_NAME_MAX + 1]; /* of the first line */
        size_t problems;
};

struct vctx {
        FILE *report;
        struct audit_verify_result *res;
};

static void problem(struct vctx *c, struct vfile *f, size_t line, enum audit_problem kind,
                    const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static void problem(struct vctx *c, struct vfile *f, size_t line, enum audit_problem kind,
                    const char *fmt, ...)
{
        va_list ap;

        if (c->res->problems++ == 0) {
                c->res->first = kind;
                c->res->first_path = f->path;
                c->res->first_line = line;
        }
        if (f->problems++ >= MAX_REPORTED || !c->report)
                return;
        fprintf(c->report, "%s:%zu: %s: ", f->path, line, audit_problem_name(kind));
        va_start(ap, fmt);
        vfprintf(c->report, fmt, ap);
        va_end(ap);
        fputc('\n', c->report);
}

static void note(struct vctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void note(struct vctx *c, const char *fmt, ...)
{
        va_list ap;

        if (!c->report)
                return;
        va_start(ap, fmt);
        vfprintf(c->report, fmt, ap);
        va_end(ap);
        fputc('\n', c->report);
}

static int read_file(struct vctx *c, struct vfile *f)
{
        _cleanup_fclose_ FILE *in = fopen(f->path, "re");
        _cleanup_free_ char *buf = NULL;
        size_t cap = 0, lcap = 0;
        ssize_t len;

        if (!in) {
                int r = -errno;
                note(c, "%s: cannot open: %s", f->path, strerror(-r));
                return r;
        }
        while ((len = getline(&buf, &cap, in)) >= 0) {
                struct audit_link l;
                struct vline *v;

                if (f->n == lcap) {
                        size_t ncap = lcap ? 2 * lcap : 256;
                        void *p = realloc(f->lines, ncap * sizeof *f->lines);
                        if (!p)
                                return -ENOMEM;
                        f->lines = p;
                        lcap = ncap;
                }
                v = &f->lines[f->n++];
                memset(v, 0, sizeof *v);
                if (len > 0 && buf[len - 1] == '\n') {
                        v->flags |= L_NL;
                        len--;
                }
                audit_line_hash(buf, (size_t)len, v->hash);
                if (audit_link_parse(buf, (size_t)len, &l, &v->why) < 0)
                        continue;
                v->flags |= L_PARSED | (l.rotate ? L_ROTATE : 0) | (l.broken ? L_BROKEN : 0);
                v->seq = l.seq;
                memcpy(v->prev, l.prev, sizeof v->prev);
                if (f->n == 1)
                        memcpy(f->rotated_from, l.rotated_from, sizeof f->rotated_from);
        }
        if (ferror(in)) {
                note(c, "%s: read error", f->path);
                return -EIO;
        }
        return 0;
}

static bool parsed(const struct vfile *f, size_t i)
{
        return i < f->n && (f->lines[i].flags & L_PARSED);
}

/* A link line i-1 -> line i that does not hold: what happened, and which
 * line to name. */
static void diagnose(struct vctx *c, struct vfile *f, size_t i, size_t end)
{
        const struct vline *a = &f->lines[i - 1], *b = &f->lines[i];
        size_t ln = i + 1;      /* 1-based number of line i */

        if (strcmp(b->prev, a->hash) == 0) {
                /* linked by hash: the records are in place, the number lies */
                problem(c, f, ln, AUDIT_ALTERED,
                        "line %zu was altered: its seq is %llu, but it follows line %zu (seq "
                        "%llu) by hash", ln, (unsigned long long)b->seq, ln - 1,
                        (unsigned long long)a->seq);
                return;
        }
        if (b->seq <= a->seq) {
                for (size_t k = 0; k < i; k++)
                        if (parsed(f, k) && f->lines[k].seq == b->seq) {
                                if (strcmp(f->lines[k].hash, b->hash) == 0)
                                        problem(c, f, ln, AUDIT_DUPLICATED,
                                                "line %zu repeats line %zu (seq %llu)", ln,
                                                k + 1, (unsigned long long)b->seq);
                                else
                                        problem(c, f, ln, AUDIT_ALTERED,
                                                "line %zu is a second record with seq %llu "
                                                "(line %zu has it): a record was inserted or "
                                                "altered", ln, (unsigned long long)b->seq, k + 1);
                                return;
                        }
                problem(c, f, ln, AUDIT_REORDERED,
                        "line %zu (seq %llu) is out of order: it comes after line %zu (seq %llu)",
                        ln, (unsigned long long)b->seq, ln - 1, (unsigned long long)a->seq);
                return;
        }
        if (b->seq > a->seq + 1) {
                for (size_t j = i + 1; j < end; j++)
                        if (parsed(f, j) && f->lines[j].seq > a->seq &&
                            f->lines[j].seq < b->seq) {
                                problem(c, f, ln, AUDIT_REORDERED,
                                        "line %zu (seq %llu) is out of order: seq %llu comes "
                                        "after it, at line %zu", ln,
                                        (unsigned long long)b->seq,
                                        (unsigned long long)f->lines[j].seq, j + 1);
                                return;
                        }
                if (b->seq == a->seq + 2)
                        problem(c, f, ln, AUDIT_REMOVED,
                                "record seq %llu was removed before line %zu (seq %llu follows "
                                "seq %llu, and its prev does not match line %zu)",
                                (unsigned long long)a->seq + 1, ln, (unsigned long long)b->seq,
                                (unsigned long long)a->seq, ln - 1);
                else
                        problem(c, f, ln, AUDIT_REMOVED,
                                "records seq %llu..%llu (%llu) were removed before line %zu "
                                "(its prev does not match line %zu)",
                                (unsigned long long)a->seq + 1, (unsigned long long)b->seq - 1,
                                (unsigned long long)(b->seq - a->seq - 1), ln, ln - 1);
                return;
        }
        /* seq continues but the hash does not: one of the two was altered.
         * If the next line still links to line i, line i is as written and
         * line i-1 changed. */
        if (i + 1 < end && parsed(f, i + 1) && strcmp(f->lines[i + 1].prev, b->hash) == 0)
                problem(c, f, ln - 1, AUDIT_ALTERED,
                        "line %zu (seq %llu) was altered: its hash no longer matches the prev of "
                        "line %zu", ln - 1, (unsigned long long)a->seq, ln);
        else if (i + 1 < end)
                problem(c, f, ln, AUDIT_ALTERED,
                        "line %zu (seq %llu) was altered: its prev does not match line %zu, and "
                        "line %zu does not match it", ln, (unsigned long long)b->seq, ln - 1,
                        ln + 1);
        else
                problem(c, f, ln - 1, AUDIT_ALTERED,
                        "line %zu or line %zu was altered: the prev of line %zu (seq %llu) does "
                        "not match line %zu", ln - 1, ln, ln, (unsigned long long)b->seq, ln - 1);
}

static void check_file(struct vctx *c, struct vfile *f)
{
        size_t end = f->n;
        size_t last = 0;        /* 1 + index of the last break seen, 0: none */

        if (end > 0 && !(f->lines[end - 1].flags & L_NL))
                end--;          /* reported last, in line order */
        for (size_t i = 0; i < end; i++) {
                const struct vline *b = &f->lines[i];

                if (!(b->flags & L_PARSED)) {
                        problem(c, f, i + 1, AUDIT_MALFORMED, "line %zu is not a record: %s",
                                i + 1, b->why);
                        last = i + 1;
                        continue;
                }
                if (i == 0) {
                        if (b->seq == 1 && strcmp(b->prev, AUDIT_ZERO_HASH) != 0) {
                                problem(c, f, 1, AUDIT_ALTERED,
                                        "line 1 (seq 1) starts the chain, but its prev is not "
                                        "zero: it was altered");
                                last = 1;
                        } else if (b->seq > 1 && !(b->flags & L_ROTATE)) {
                                problem(c, f, 1, AUDIT_REMOVED,
                                        "line 1 holds seq %llu, but a file starts with seq 1 or "
                                        "a rotate record: the records before it were removed",
                                        (unsigned long long)b->seq);
                                last = 1;
                        }
                        continue;
                }
                if (!parsed(f, i - 1))
                        continue;       /* already reported */
                if (b->seq == f->lines[i - 1].seq + 1 &&
                    strcmp(b->prev, f->lines[i - 1].hash) == 0)
                        continue;
                /* A removed, moved or altered record breaks up to three
                 * links; only the first says what happened. */
                if (last && i + 1 <= last + 2)
                        continue;
                diagnose(c, f, i, end);
                last = i + 1;
        }
        if (end < f->n)
                problem(c, f, f->n, AUDIT_TRUNCATED,
                        "line %zu is cut short (the file ends without a newline): an "
                        "interrupted write or a truncated file", f->n);
}

static const char *base_name(const char *path)
{
        const char *s = strrchr(path, '/');

        return s ? s + 1 : path;
}

/* The last whole record of a file: the one a successor's prev names. */
static const struct vline *last_record(const struct vfile *f)
{
        for (size_t i = f->n; i > 0; i--)
                if ((f->lines[i - 1].flags & (L_PARSED | L_NL)) == (L_PARSED | L_NL))
                        return &f->lines[i - 1];
        return NULL;
}

/* Does g continue p (the file before it by seq)? p may be NULL. */
static void check_link(struct vctx *c, struct vfile *p, struct vfile *g)
{
        const struct vline *first = g->n ? &g->lines[0] : NULL, *pl;

        if (!first || !(first->flags & L_PARSED))
                return;
        if (first->seq == 1) {
                if (p && p->n)
                        problem(c, g, 1, AUDIT_BROKEN_LINK,
                                "a second chain starts here (seq 1): this file does not "
                                "continue %s", p->path);
                return;
        }
        if (!(first->flags & L_ROTATE))
                return;         /* reported by check_file */
        if (!p) {
                note(c, "%s:1: continues '%s' (not given: that link is not checked)", g->path,
                     g->rotated_from);
                return;
        }
        if (!(pl = last_record(p)))
                return;         /* p is broken through; said there */
        if (first->flags & L_BROKEN)
                note(c, "%s:1: the daemon found '%s' damaged and set it aside", g->path,
                     g->rotated_from);
        if (first->seq == pl->seq + 1 && strcmp(first->prev, pl->hash) == 0) {
                if (strcmp(g->rotated_from, base_name(p->path)) != 0)
                        note(c, "%s:1: continues '%s', given as %s", g->path, g->rotated_from,
                             p->path);
        } else if (first->seq > pl->seq + 1) {
                problem(c, g, 1, AUDIT_REMOVED,
                        "records seq %llu..%llu are missing between %s (ends at seq %llu) and "
                        "this file: a file or the end of %s was removed",
                        (unsigned long long)pl->seq + 1, (unsigned long long)first->seq - 1,
                        p->path, (unsigned long long)pl->seq, p->path);
        } else {
                problem(c, g, 1, AUDIT_BROKEN_LINK,
                        "this file does not continue %s: its first record (seq %llu) does not "
                        "match the last record there (seq %llu): the end of %s was altered or "
                        "the files are mixed up", p->path, (unsigned long long)first->seq,
                        (unsigned long long)pl->seq, p->path);
        }
}

static uint64_t first_seq(const struct vfile *f)
{
        return parsed(f, 0) ? f->lines[0].seq : UINT64_MAX;
}

static int by_seq(const void *x, const void *y)
{
        const struct vfile *a = x, *b = y;
        uint64_t sa = first_seq(a), sb = first_seq(b);

        if (sa != sb)
                return sa < sb ? -1 : 1;
        return a->given < b->given ? -1 : a->given > b->given;
}

static void summary(struct vctx *c, const struct vfile *f)
{
        size_t records = 0;
        uint64_t lo = UINT64_MAX, hi = 0;

        for (size_t i = 0; i < f->n; i++)
                if (parsed(f, i)) {
                        records++;
                        lo = MO_MIN(lo, f->lines[i].seq);
                        hi = MO_MAX(hi, f->lines[i].seq);
                }
        c->res->records += records;
        if (records) {
                if (c->res->first_seq == 0 || lo < c->res->first_seq)
                        c->res->first_seq = lo;
                c->res->last_seq = MO_MAX(c->res->last_seq, hi);
        }
        if (f->problems > MAX_REPORTED)
                note(c, "%s: %zu more breaks not shown", f->path, f->problems - MAX_REPORTED);
        if (records)
                note(c, "%s: %zu record%s, seq %llu..%llu: %s", f->path, records,
                     records == 1 ? "" : "s", (unsigned long long)lo, (unsigned long long)hi,
                     f->problems ? "BROKEN" : "intact");
        else
                note(c, "%s: no records%s", f->path, f->problems ? ": BROKEN" : "");
}

int audit_verify_files(const char *const *paths, size_t n, FILE *report,
                       struct audit_verify_result *res)
{
        struct audit_verify_result dummy;
        struct vctx c = { report, res ? res : &dummy };
        struct vfile *files = calloc(n ? n : 1, sizeof *files);
        int r = 0;

        memset(c.res, 0, sizeof *c.res);
        if (!files)
                return -ENOMEM;
        for (size_t i = 0; i < n && r == 0; i++) {
                files[i].path = paths[i];
                files[i].given = i;
                r = read_file(&c, &files[i]);
        }
        if (r == 0) {
                qsort(files, n, sizeof *files, by_seq);
                for (size_t i = 0; i < n; i++) {
                        check_link(&c, i ? &files[i - 1] : NULL, &files[i]);
                        check_file(&c, &files[i]);
                }
                for (size_t i = 0; i < n; i++)
                        summary(&c, &files[i]);
                c.res->files = n;
                if (n > 1)
                        note(&c, "%zu files, seq %llu..%llu: chain %s", n,
                             (unsigned long long)c.res->first_seq,
                             (unsigned long long)c.res->last_seq,
                             c.res->problems ? "BROKEN" : "intact");
                r = c.res->problems ? -EBADMSG : 0;
        }
        for (size_t i = 0; i < n; i++)
                free(files[i].lines);
        free(files);
        return r;
}

int audit_verify_file(const char *path, FILE *report)
{
        return audit_verify_files(&path, 1, report, NULL);
}
