/* sse.c: Server-Sent Events parsing as the WHATWG spec describes it, fed
 * piecewise: bytes are buffered until a line ends (LF, CRLF or CR), "data:"
 * lines accumulate into the event, a blank line dispatches it. "event:",
 * "id:", "retry:" and comments are read and ignored: moed sends none. */
#include "sse.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

void sse_init(struct sse *s, sse_event_fn event, void *ud)
{
        *s = (struct sse){ .event = event, .ud = ud };
}

void sse_free(struct sse *s)
{
        free(s->line);
        free(s->data);
        s->line = s->data = NULL;
        s->line_len = s->line_cap = s->data_len = s->data_cap = 0;
}

/* Grows *buf to hold need+1 bytes (room for the NUL). */
static int grow(char **buf, size_t *cap, size_t need)
{
        size_t ncap;
        char *p;

        if (need >= SSE_MAX_LINE)
                return -E2BIG;
        if (need + 1 <= *cap)
                return 0;
        ncap = *cap ? *cap : 256;
        while (ncap < need + 1)
                ncap *= 2;
        p = realloc(*buf, ncap);
        if (!p)
                return -ENOMEM;
        *buf = p;
        *cap = ncap;
        return 0;
}

static int dispatch(struct sse *s)
{
        int r = 0;

        if (s->has_data) {
                s->data[s->data_len] = 0;
                r = s->event(s->ud, s->data, s->data_len);
        }
        s->data_len = 0;
        s->has_data = 0;
        return r < 0 ? r : 0;
}

/* One complete line, without its terminator. */
static int handle_line(struct sse *s, const char *l, size_t n)
{
        const char *colon = memchr(l, ':', n);
        size_t name = colon ? (size_t)(colon - l) : n;
        const char *v = colon ? colon + 1 : l + n;
        size_t vn = (size_t)(l + n - v);
        int r;

        if (n == 0)
                return dispatch(s);
        if (name != 4 || memcmp(l, "data", 4) != 0)
                return 0;       /* a comment, or a field moed does not send */
        if (vn && v[0] == ' ') {
                v++;
                vn--;
        }
        r = grow(&s->data, &s->data_cap, s->data_len + vn + 1);
        if (r < 0)
                return r;
        if (s->has_data)
                s->data[s->data_len++] = '\n';
        memcpy(s->data + s->data_len, v, vn);
        s->data_len += vn;
        s->has_data = 1;
        return 0;
}

int sse_feed(struct sse *s, const char *buf, size_t n)
{
        size_t i = 0;
        int r;

        /* The previous piece ended in CR: an LF starting this one is the
         * rest of that CRLF, not an empty line. */
        if (n == 0)
                return 0;
        if (s->pending_cr && buf[0] == '\n')
                i++;
        s->pending_cr = 0;
        while (i < n) {
                size_t j = i, take;

                while (j < n && buf[j] != '\n' && buf[j] != '\r')
                        j++;
                take = j - i;
                r = grow(&s->line, &s->line_cap, s->line_len + take);
                if (r < 0)
                        return r;
                memcpy(s->line + s->line_len, buf + i, take);
                s->line_len += take;
                if (j == n)
                        break;          /* the line goes on in the next piece */
                i = j + 1;
                if (buf[j] == '\r') {
                        if (i < n && buf[i] == '\n')
                                i++;
                        else if (i == n)
                                s->pending_cr = 1;
                }
                s->line[s->line_len] = 0;
                r = handle_line(s, s->line, s->line_len);
                s->line_len = 0;
                if (r < 0)
                        return r;
        }
        return 0;
}

int sse_finish(struct sse *s)
{
        int r = 0;

        if (s->line_len) {
                r = handle_line(s, s->line, s->line_len);
                s->line_len = 0;
        }
        if (r == 0)
                r = dispatch(s);
        return r;
}
