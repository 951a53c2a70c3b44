/* ini-lines: the line layer under inih shared by moed.conf (daemon/config.c)
 * and the tenant files (policy/tenant.c). inih splits "Key = Value", strips
 * whitespace and comments; this layer hands it one line at a time through
 * ini_parse_stream so that every message can name its line.
 *
 * Why not ini_parse_file alone (inih 55 as Debian builds it):
 * - it numbers only the first bad line and calls the handler without one;
 * - INI_ALLOW_MULTILINE is on: an indented "  Key=Value" would silently
 *   become part of the previous key's value. Leading whitespace is stripped
 *   here, so an indented line is an ordinary line (as in systemd's files);
 * - its line buffer is INI_MAX_LINE (200) bytes and a longer line is split,
 *   the tail parsed as a line of its own (a value could smuggle in a key).
 *   A line too long for inih's buffer is refused here, with its number;
 * - section names are truncated to 50 bytes and sections without keys are
 *   invisible. Section headers are taken here, whole, and never reach inih.
 * Header-only: config.c and tenant.c live in different libraries. */
#pragma once
#include <ctype.h>
#include <errno.h>
#include <ini.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

struct inil_ops {
        /* "[name]" at line: name is the text between the brackets, as is. */
        void (*section)(void *user, const char *name, int line);
        /* "Key=Value" at line, both stripped by inih; value may be "". */
        void (*key)(void *user, const char *key, const char *value, int line);
        /* A line that is none of those nor a comment. */
        void (*error)(void *user, int line, const char *problem);
};

struct inil {
        const struct inil_ops *ops;
        void *user;
        FILE *f;                /* the source: a stream ... */
        const char *text;       /* ... or a NUL-terminated string */
        char *buf;              /* the current line */
        size_t cap;
        int line;
        bool pending;           /* the line handed to inih ... */
        bool handled;           /* ... reached the handler */
        int err;                /* -ENOMEM or -EIO from reading */
};

/* Reads the next physical line into p->buf; returns its length or -1. */
static inline ssize_t inil_next(struct inil *p)
{
        ssize_t n;

        if (p->f) {
                n = getline(&p->buf, &p->cap, p->f);
                if (n < 0) {
                        if (ferror(p->f))
                                p->err = errno == ENOMEM ? -ENOMEM : -EIO;
                        return -1;
                }
        } else {
                const char *end;

                if (!*p->text)
                        return -1;
                end = strchrnul(p->text, '\n');
                n = end - p->text + (*end == '\n');
                if ((size_t)n + 1 > p->cap) {
                        char *nb = realloc(p->buf, n + 1);

                        if (!nb) {
                                p->err = -ENOMEM;
                                return -1;
                        }
                        p->buf = nb;
                        p->cap = n + 1;
                }
                memcpy(p->buf, p->text, n);
                p->buf[n] = '\0';
                p->text += n;
        }
        p->line++;
        return n;
}

/* The line before was given to inih: did it come back as Key=Value? */
static inline void inil_settle(struct inil *p)
{
        if (p->pending && !p->handled)
                p->ops->error(p->user, p->line, "expected Key=Value, [Section] or a comment");
        p->pending = false;
}

static inline void inil_section(struct inil *p, char *s, size_t len)
{
        char *close = memchr(s, ']', len);

        if (!close) {
                p->ops->error(p->user, p->line, "section header without ']'");
                return;
        }
        if (close != s + len - 1) {
                p->ops->error(p->user, p->line, "unexpected text after ']'");
                return;
        }
        *close = '\0';
        p->ops->section(p->user, s + 1, p->line);
}

/* inih's reader: feeds it the next Key=Value candidate, takes the rest. */
static inline char *inil_read(char *str, int num, void *stream)
{
        struct inil *p = stream;
        ssize_t n;

        inil_settle(p);
        while ((n = inil_next(p)) >= 0) {
                char *s = p->buf;
                size_t len = n;

                if (memchr(s, '\0', len)) {
                        p->ops->error(p->user, p->line, "line contains a NUL byte");
                        continue;
                }
                if (p->line == 1 && len >= 3 && !memcmp(s, "\xEF\xBB\xBF", 3)) {
                        s += 3;
                        len -= 3;
                }
                while (len && isspace((unsigned char)*s)) {
                        s++;
                        len--;
                }
                while (len && isspace((unsigned char)s[len - 1]))
                        len--;
                s[len] = '\0';
                if (!len || strchr(INI_START_COMMENT_PREFIXES, *s))
                        continue;
                if (*s == '[') {
                        inil_section(p, s, len);
                        continue;
                }
                /* Room for the newline and the NUL: a line that fills inih's
                 * buffer without its newline would be read on as more. */
                if (num < 2 || len > (size_t)num - 2) {
                        char msg[64];

                        snprintf(msg, sizeof msg, "line too long (more than %d characters)",
                                 num - 2);
                        p->ops->error(p->user, p->line, msg);
                        continue;
                }
                memcpy(str, s, len);
                str[len] = '\n';
                str[len + 1] = '\0';
                p->pending = true;
                p->handled = false;
                return str;
        }
        return NULL;
}

static inline int inil_handler(void *user, const char *section, const char *name,
                               const char *value)
{
        struct inil *p = user;

        (void)section;
        /* A build with INI_ALLOW_NO_VALUE passes a bare name with NULL:
         * left unhandled, it is reported as a bad line. */
        if (!value || p->handled)
                return 1;
        p->handled = true;
        p->ops->key(p->user, name, value, p->line);
        return 1;
}

/* Parses f or text (exactly one non-NULL). Problems go to ops; returns 0, or
 * -ENOMEM / -EIO when the source could not be read. */
static inline int inil_parse(FILE *f, const char *text, const struct inil_ops *ops, void *user)
{
        struct inil p = { .ops = ops, .user = user, .f = f, .text = text };
        int r;

        r = ini_parse_stream(inil_read, &p, inil_handler, &p);
        inil_settle(&p);
        free(p.buf);
        if (p.err)
                return p.err;
        return r == -2 ? -ENOMEM : 0;
}

/* s quoted for a message in dst[n] (n >= 16): non-printable bytes as \xHH
 * so that a hostile file cannot garble a terminal or the log, and at most
 * n - 16 characters before a "...". */
static inline void inil_quote(char *dst, size_t n, const char *s)
{
        size_t o = 0;

        for (; *s && o + 8 < n; s++) {
                unsigned char ch = *s;

                if (o >= n - 16) {
                        memcpy(dst + o, "...", 3);
                        o += 3;
                        break;
                }
                if (ch < 0x20 || ch >= 0x7f || ch == '\\')
                        o += snprintf(dst + o, n - o, "\\x%02x", ch);
                else
                        dst[o++] = ch;
        }
        dst[o] = '\0';
}
