/* client.c: one libcurl easy handle per moectl process, pointed at moed's
 * Unix socket (CURLOPT_UNIX_SOCKET_PATH), kept across requests so a chat
 * reuses its keep-alive connection. Streamed answers go through sse.c from
 * inside the write callback, so text is shown as it arrives. */
#include "client.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <curl/curl.h>

#include "cli/sse.h"
#include "common/cleanup.h"
#include "moed-config.h"

/* moed's own bodies are small; anything larger is not moed talking. */
#define CLIENT_MAX_BODY (64u << 20)
#define CLIENT_CONNECT_TIMEOUT_S 10L

struct client {
        CURL *curl;
        char *socket;
        char *auth;             /* "Authorization: Bearer ..." or NULL */
        char errbuf[CURL_ERROR_SIZE];
};

/* What one transfer collects; the write callback decides per response
 * whether the bytes are events or a body. */
struct xfer {
        struct client *c;
        struct client_reply *r;
        size_t cap;
        bool decided, streaming;
        struct sse sse;
        int cb_error;           /* the event callback's negative return */
        int body_error;         /* -E2BIG / -ENOMEM while collecting a body */
        const volatile sig_atomic_t *cancel;
};

void client_reply_free(struct client_reply *r)
{
        free(r->body);
        *r = (struct client_reply){ .retry_after = -1 };
}

const char *client_socket(const struct client *c)
{
        return c->socket;
}

int client_new(const char *socket, const char *token, struct client **out, struct moerr *e)
{
        _cleanup_free_ struct client *c = calloc(1, sizeof *c);

        if (!c)
                return moerr_set(e, -ENOMEM, "out of memory");
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
                return moerr_set(e, -EIO, "libcurl failed to initialise");
        c->socket = strdup(socket);
        if (token && asprintf(&c->auth, "Authorization: Bearer %s", token) < 0)
                c->auth = NULL;
        c->curl = curl_easy_init();
        if (!c->socket || (token && !c->auth) || !c->curl) {
                curl_easy_cleanup(c->curl);
                free(c->socket);
                free(c->auth);
                curl_global_cleanup();
                return moerr_set(e, -ENOMEM, "out of memory");
        }
        *out = TAKE_PTR(c);
        return 0;
}

void client_free(struct client *c)
{
        if (!c)
                return;
        curl_easy_cleanup(c->curl);
        if (c->auth) {
                /* The bearer token is a secret: do not leave it in freed memory. */
                explicit_bzero(c->auth, strlen(c->auth));
                free(c->auth);
        }
        free(c->socket);
        free(c);
        curl_global_cleanup();
}

static int body_append(struct xfer *x, const char *p, size_t n)
{
        struct client_reply *r = x->r;
        size_t ncap;
        char *b;

        if (r->len + n + 1 > CLIENT_MAX_BODY)
                return -E2BIG;
        if (r->len + n + 1 > x->cap) {
                ncap = x->cap ? x->cap : 4096;
                while (ncap < r->len + n + 1)
                        ncap *= 2;
                b = realloc(r->body, ncap);
                if (!b)
                        return -ENOMEM;
                r->body = b;
                x->cap = ncap;
        }
        memcpy(r->body + r->len, p, n);
        r->len += n;
        r->body[r->len] = 0;
        return 0;
}

/* Only a successful text/event-stream answer is parsed as events; an
 * error status carries a JSON body even when a stream was asked for. */
static void decide(struct xfer *x)
{
        long status = 0;
        char *ctype = NULL;

        curl_easy_getinfo(x->c->curl, CURLINFO_RESPONSE_CODE, &status);
        curl_easy_getinfo(x->c->curl, CURLINFO_CONTENT_TYPE, &ctype);
        x->streaming = x->sse.event && status == 200 && ctype &&
                       strncasecmp(ctype, "text/event-stream", 17) == 0;
        x->decided = true;
}

static size_t on_write(char *p, size_t size, size_t nmemb, void *ud)
{
        struct xfer *x = ud;
        size_t n = size * nmemb;
        int r;

        if (!x->decided)
                decide(x);
        if (x->streaming) {
                r = sse_feed(&x->sse, p, n);
                if (r < 0) {
                        x->cb_error = r;
                        return 0;       /* CURLE_WRITE_ERROR ends the transfer */
                }
                return n;
        }
        r = body_append(x, p, n);
        if (r < 0) {
                x->body_error = r;
                return 0;
        }
        return n;
}

/* Retry-After comes with 429 and 503; a date form is not sent by moed and
 * is treated as absent. */
static size_t on_header(char *p, size_t size, size_t nmemb, void *ud)
{
        struct xfer *x = ud;
        size_t n = size * nmemb;
        static const char name[] = "retry-after:";
        char val[32];
        size_t vn;
        char *end;
        long v;

        if (n >= 5 && memcmp(p, "HTTP/", 5) == 0) {
                x->r->retry_after = -1;         /* a new response (after 100 Continue) */
                return n;
        }
        if (n <= sizeof name - 1 || strncasecmp(p, name, sizeof name - 1) != 0)
                return n;
        vn = MO_MIN(n - (sizeof name - 1), sizeof val - 1);
        memcpy(val, p + sizeof name - 1, vn);
        val[vn] = 0;
        errno = 0;
        v = strtol(val, &end, 10);
        while (*end == ' ' || *end == '\r' || *end == '\n' || *end == '\t')
                end++;
        if (errno == 0 && end != val && *end == 0 && v >= 0)
                x->r->retry_after = v;
        return n;
}

static int on_progress(void *ud, curl_off_t dt, curl_off_t dn, curl_off_t ut, curl_off_t un)
{
        struct xfer *x = ud;

        return x->cancel && *x->cancel ? 1 : 0;
}

/* Maps a failed connect to what the user must do about it: the errno of
 * connect() tells a missing socket from a dead daemon from a permission. */
static int connect_error(struct client *c, struct moerr *e)
{
        long oserr = 0;

        curl_easy_getinfo(c->curl, CURLINFO_OS_ERRNO, &oserr);
        switch (oserr) {
        case ENOENT:
        case ENOTDIR:
                return moerr_set(e, -ENOENT, "no socket at %s", c->socket);
        case EACCES:
        case EPERM:
                return moerr_set(e, -EACCES, "permission denied on %s", c->socket);
        case ECONNREFUSED:
                return moerr_set(e, -ECONNREFUSED, "nothing listening at %s", c->socket);
        default:
                return moerr_set(e, -ECONNREFUSED, "cannot connect to %s: %s", c->socket,
                                 c->errbuf[0] ? c->errbuf : "connection failed");
        }
}

static int perform(struct client *c, const char *path, const char *body, long timeout_s,
                   struct xfer *x, struct moerr *e)
{
        _cleanup_free_ char *url = NULL;
        struct curl_slist *h = NULL, *t;
        CURLcode cc;
        int r = 0;

        if (asprintf(&url, "http://localhost%s", path) < 0)
                return moerr_set(e, -ENOMEM, "out of memory");
        /* An empty "Expect:" stops libcurl from waiting for 100 Continue. */
        t = curl_slist_append(h, "Expect:");
        h = t ? t : h;
        if (body) {
                t = curl_slist_append(h, "Content-Type: application/json");
                h = t ? t : h;
        }
        t = curl_slist_append(h, x->sse.event ? "Accept: text/event-stream"
                                              : "Accept: application/json");
        h = t ? t : h;
        if (c->auth) {
                t = curl_slist_append(h, c->auth);
                if (!t) {
                        curl_slist_free_all(h);
                        return moerr_set(e, -ENOMEM, "out of memory");
                }
                h = t;
        }

        curl_easy_reset(c->curl);
        curl_easy_setopt(c->curl, CURLOPT_UNIX_SOCKET_PATH, c->socket);
        curl_easy_setopt(c->curl, CURLOPT_URL, url);
        curl_easy_setopt(c->curl, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(c->curl, CURLOPT_USERAGENT, "moectl/" MOED_VERSION);
        curl_easy_setopt(c->curl, CURLOPT_HTTPHEADER, h);
        curl_easy_setopt(c->curl, CURLOPT_ERRORBUFFER, c->errbuf);
        curl_easy_setopt(c->curl, CURLOPT_CONNECTTIMEOUT, CLIENT_CONNECT_TIMEOUT_S);
        curl_easy_setopt(c->curl, CURLOPT_TIMEOUT, timeout_s);
        curl_easy_setopt(c->curl, CURLOPT_WRITEFUNCTION, on_write);
        curl_easy_setopt(c->curl, CURLOPT_WRITEDATA, x);
        curl_easy_setopt(c->curl, CURLOPT_HEADERFUNCTION, on_header);
        curl_easy_setopt(c->curl, CURLOPT_HEADERDATA, x);
        if (body) {
                curl_easy_setopt(c->curl, CURLOPT_POSTFIELDS, body);
                curl_easy_setopt(c->curl, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)strlen(body));
        }
        if (x->cancel) {
                curl_easy_setopt(c->curl, CURLOPT_NOPROGRESS, 0L);
                curl_easy_setopt(c->curl, CURLOPT_XFERINFOFUNCTION, on_progress);
                curl_easy_setopt(c->curl, CURLOPT_XFERINFODATA, x);
        }
        c->errbuf[0] = 0;
        x->r->retry_after = -1;

        cc = curl_easy_perform(c->curl);
        curl_easy_getinfo(c->curl, CURLINFO_RESPONSE_CODE, &x->r->status);
        curl_slist_free_all(h);

        if (cc == CURLE_OK && x->streaming)
                r = sse_finish(&x->sse);
        if (cc == CURLE_OK)
                return r < 0 ? r : 0;
        if (cc == CURLE_ABORTED_BY_CALLBACK)
                return moerr_set(e, -ECANCELED, "cancelled");
        if (cc == CURLE_WRITE_ERROR && x->cb_error == -E2BIG)
                return moerr_set(e, -E2BIG, "an event from moed is too large");
        if (cc == CURLE_WRITE_ERROR && x->cb_error == -ENOMEM)
                return moerr_set(e, -ENOMEM, "out of memory");
        if (cc == CURLE_WRITE_ERROR && x->cb_error < 0)
                return x->cb_error;
        if (cc == CURLE_WRITE_ERROR && x->body_error < 0)
                return moerr_set(e, x->body_error, "the answer from moed is too large");
        if (cc == CURLE_COULDNT_CONNECT)
                return connect_error(c, e);
        if (cc == CURLE_OPERATION_TIMEDOUT)
                return moerr_set(e, -ETIMEDOUT, "moed did not answer in time (%s)",
                                 c->errbuf[0] ? c->errbuf : curl_easy_strerror(cc));
        return moerr_set(e, -EIO, "talking to moed at %s: %s", c->socket,
                         c->errbuf[0] ? c->errbuf : curl_easy_strerror(cc));
}

int client_request(struct client *c, const char *path, const char *body, long timeout_s,
                   struct client_reply *r, struct moerr *e)
{
        struct xfer x = { .c = c, .r = r };

        client_reply_free(r);
        return perform(c, path, body, timeout_s, &x, e);
}

int client_stream(struct client *c, const char *path, const char *body, client_event_fn fn,
                  void *ud, const volatile sig_atomic_t *cancel, struct client_reply *r,
                  struct moerr *e)
{
        struct xfer x = { .c = c, .r = r, .cancel = cancel };
        int ret;

        client_reply_free(r);
        sse_init(&x.sse, fn, ud);
        ret = perform(c, path, body, 0, &x, e);
        sse_free(&x.sse);
        return ret;
}
