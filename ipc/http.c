/* http: libmicrohttpd on the main loop. A request's life: its body is
 * gathered (bounded), parsed by openai.c, handed to front/; a stream's
 * connection is parked (suspended) while the engine works and resumed as
 * text arrives; a plain answer is parked until the request finishes. */
#include "ipc/http.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>

#include <microhttpd.h>

#include "common/cleanup.h"
#include "common/log.h"
#include "ipc/peer.h"

#define PEER_CHECK_USEC (200 * 1000)
/* A stream whose client stops reading is ended past this much unsent
 * output, rather than buffered without bound. */
#define MAX_UNSENT (1u << 20)

enum route {
        R_NONE, R_CHAT, R_COMPLETION, R_TOKENIZE, R_MODELS, R_STATUS, R_USAGE, R_HEALTH,
        R_METRICS,
};

static const struct {
        const char *path, *method;
        enum route route;
} routes[] = {
        { "/v1/chat/completions", "POST", R_CHAT },
        { "/v1/completions", "POST", R_COMPLETION },
        { "/v1/moed/tokenize", "POST", R_TOKENIZE },
        { "/v1/models", "GET", R_MODELS },
        { "/v1/moed/status", "GET", R_STATUS },
        { "/v1/moed/usage", "GET", R_USAGE },
        { "/health", "GET", R_HEALTH },
        { "/metrics", "GET", R_METRICS },
};

struct http_conn {
        struct ipc_peer peer;
        int peer_err;
        int fd;
        /* A connection must bring a whole request header within the idle
         * timeout of connecting or of its last answer; a client trickling a
         * byte at a time would otherwise hold its slot for ever. */
        bool in_request, cut;
        uint64_t header_deadline;
        struct http_conn *prev, *next;
};

enum phase {
        P_BODY,     /* gathering the body */
        P_WAIT,     /* parked until a plain answer is complete */
        P_READY,    /* resp/status ready to queue */
        P_STREAM,   /* streaming response queued */
        P_GONE,     /* the client left while parked */
        P_SENT,     /* a whole answer is queued */
};

struct http_req {
        struct http_door *h;
        struct MHD_Connection *mc;
        struct http_conn *conn;
        enum route route;
        enum phase phase;
        char *body;
        size_t body_len, body_cap;
        bool too_large;
        struct oai_request *req;
        struct front_req *fq;
        bool suspended, finished, role_sent;
        char id[40];
        int64_t created;
        const char *model;   /* the engine's id string, lives as long as moed */
        char *out;           /* stream bytes to send, or the plain answer's text */
        size_t out_len, out_off, out_cap;
        int status;
        char *resp;
        struct http_req *prev, *next;
};

struct http_door {
        sd_event *ev;
        struct front *f;
        struct http_door_config c;
        struct MHD_Daemon *mhd;
        sd_event_source *io, *timer, *defer, *peer_timer;
        struct http_req *reqs;
        struct http_conn *conns;
        bool quiesced;
};

/* ---- buffers ---- */

static int buf_append(char **b, size_t *len, size_t *cap, const char *s, size_t n)
{
        if (*len + n + 1 > *cap) {
                /* Not realloc: the old block holds a prompt or an answer and
                 * is wiped before it goes back to the heap. */
                size_t nc = MO_MAX(*cap * 2, *len + n + 1024);
                char *p = malloc(nc);
                if (!p)
                        return -ENOMEM;
                if (*b) {
                        memcpy(p, *b, *len);
                        memset(*b, 0, *cap);
                        free(*b);
                }
                *b = p;
                *cap = nc;
        }
        memcpy(*b + *len, s, n);
        *len += n;
        (*b)[*len] = 0;
        return 0;
}

static void wipe_free(char *p, size_t n)
{
        if (p)
                memset(p, 0, n);
        free(p);
}

/* ---- scheduling MHD on the loop ---- */

static uint64_t now_usec(struct http_door *h)
{
        uint64_t now = 0;

        sd_event_now(h->ev, CLOCK_MONOTONIC, &now);
        return now;
}


static void update_timer(struct http_door *h)
{
        MHD_UNSIGNED_LONG_LONG ms;
        uint64_t now;

        if (MHD_get_timeout(h->mhd, &ms) != MHD_YES) {
                sd_event_source_set_enabled(h->timer, SD_EVENT_OFF);
                return;
        }
        sd_event_now(h->ev, CLOCK_MONOTONIC, &now);
        sd_event_source_set_time(h->timer, now + (uint64_t)ms * 1000);
        sd_event_source_set_enabled(h->timer, SD_EVENT_ONESHOT);
}

static void run_mhd(struct http_door *h)
{
        MHD_run(h->mhd);
        update_timer(h);
}

static int on_io(sd_event_source *s, int fd, uint32_t revents, void *ud)
{
        run_mhd(ud);
        return 0;
}

static int on_timer(sd_event_source *s, uint64_t usec, void *ud)
{
        run_mhd(ud);
        return 0;
}

static int on_defer(sd_event_source *s, void *ud)
{
        run_mhd(ud);
        return 0;
}

/* A resumed connection is processed on the next MHD_run. */
static void resume(struct http_req *r)
{
        if (!r->suspended)
                return;
        r->suspended = false;
        MHD_resume_connection(r->mc);
        sd_event_source_set_enabled(r->h->defer, SD_EVENT_ONESHOT);
}

static void suspend(struct http_req *r)
{
        if (r->suspended)
                return;
        r->suspended = true;
        MHD_suspend_connection(r->mc);
}

/* ---- replies ---- */

static enum MHD_Result queue(struct http_req *r, int status, const char *type, char *body,
                             int retry_after)
{
        struct MHD_Response *resp;
        enum MHD_Result ret;
        char ra[24];

        if (!body)
                return MHD_NO;
        resp = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
        if (!resp) {
                free(body);
                return MHD_NO;
        }
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, type);
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
        if (retry_after > 0) {
                snprintf(ra, sizeof ra, "%d", retry_after);
                MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, ra);
        }
        ret = MHD_queue_response(r->mc, (unsigned)status, resp);
        MHD_destroy_response(resp);
        return ret;
}

static enum MHD_Result queue_json(struct http_req *r, int status, json_t *j)
{
        char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;

        json_decref(j);
        return queue(r, status, "application/json", s, 0);
}

static enum MHD_Result queue_error(struct http_req *r, const struct front_error *fe)
{
        return queue(r, fe->oai.status, "application/json", oai_error_json(&fe->oai),
                     fe->retry_after_s);
}

static enum MHD_Result queue_simple_error(struct http_req *r, int status, const char *code,
                                          const char *msg)
{
        struct front_error fe = { 0 };

        oai_error_set(&fe.oai, status, "invalid_request_error", NULL, code, "%s", msg);
        return queue_error(r, &fe);
}

/* ---- the caller ---- */

static void caller_of(struct http_req *r, struct front_caller *c)
{
        const char *auth = MHD_lookup_connection_value(r->mc, MHD_HEADER_KIND,
                                                       MHD_HTTP_HEADER_AUTHORIZATION);

        *c = (struct front_caller){
                .door = FRONT_HTTP,
                .uid = r->conn->peer.uid,
                .gid = r->conn->peer.gid,
                .pid = r->conn->peer.pid,
                .groups = r->conn->peer.groups,
                .n_groups = r->conn->peer.n_groups,
        };
        if (auth && strncasecmp(auth, "Bearer ", 7) == 0) {
                auth += 7;
                while (*auth == ' ')
                        auth++;
                c->bearer = auth;
        }
}

/* ---- output from the engine ---- */

static void stream_event(struct http_req *r, char *sse)
{
        if (!sse || buf_append(&r->out, &r->out_len, &r->out_cap, sse, strlen(sse)) < 0) {
                /* Out of memory: end the stream rather than send a gap. */
                if (r->fq)
                        front_cancel(r->fq, "out of memory");
        } else if (r->out_len - r->out_off > MAX_UNSENT && r->fq) {
                front_cancel(r->fq, "the client is not reading its stream");
        }
        wipe_free(sse, sse ? strlen(sse) : 0);
}

static void sink_text(void *ud, const char *s, size_t n)
{
        struct http_req *r = ud;
        enum oai_kind k = r->route == R_CHAT ? OAI_CHAT : OAI_COMPLETION;

        if (r->phase != P_STREAM) {
                if (buf_append(&r->out, &r->out_len, &r->out_cap, s, n) < 0)
                        front_cancel(r->fq, "out of memory");
                return;
        }
        if (k == OAI_CHAT && !r->role_sent) {
                stream_event(r, oai_chunk_sse(k, r->id, r->created, r->model, true, NULL, 0,
                                              NULL, NULL));
                r->role_sent = true;
        }
        stream_event(r, oai_chunk_sse(k, r->id, r->created, r->model, false, s, n, NULL, NULL));
        resume(r);
}

static void sink_finished(void *ud, const char *reason, const char *why,
                          const struct oai_usage *u)
{
        struct http_req *r = ud;
        enum oai_kind k = r->route == R_CHAT ? OAI_CHAT : OAI_COMPLETION;

        r->fq = NULL; /* front frees it when this returns */
        r->finished = true;
        if (r->phase != P_STREAM) {
                r->resp = oai_response_json(k, r->id, r->created, r->model, r->out ? r->out : "",
                                            r->out_len, reason, u);
                r->status = 200;
                r->phase = P_READY;
                resume(r);
                return;
        }
        if (k == OAI_CHAT && !r->role_sent)
                stream_event(r, oai_chunk_sse(k, r->id, r->created, r->model, true, NULL, 0,
                                              NULL, NULL));
        stream_event(r, oai_finish_sse(k, r->id, r->created, r->model, reason, u));
        if (r->req->include_usage)
                stream_event(r, oai_chunk_sse(k, r->id, r->created, r->model, false, NULL, 0,
                                              NULL, u));
        stream_event(r, strdup(OAI_SSE_DONE));
        resume(r);
}

static const struct front_sink http_sink = {
        .text = sink_text,
        .finished = sink_finished,
};

static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max)
{
        struct http_req *r = cls;
        size_t n;

        if (r->out_off < r->out_len) {
                n = MO_MIN(max, r->out_len - r->out_off);
                memcpy(buf, r->out + r->out_off, n);
                r->out_off += n;
                if (r->out_off == r->out_len) {
                        memset(r->out, 0, r->out_len);
                        r->out_off = r->out_len = 0;
                }
                return (ssize_t)n;
        }
        if (r->finished)
                return MHD_CONTENT_READER_END_OF_STREAM;
        if (r->phase == P_GONE)
                return MHD_CONTENT_READER_END_WITH_ERROR;
        /* Nothing yet: park the connection until the engine speaks. */
        suspend(r);
        return 0;
}

/* ---- handlers ---- */

static enum MHD_Result start_generation(struct http_req *r)
{
        struct front_caller c;
        struct front_error fe;
        struct MHD_Response *resp;
        enum MHD_Result ret;

        caller_of(r, &c);
        if (front_submit(r->h->f, &c, r->req, &http_sink, r, &r->fq, &fe) < 0)
                return queue_error(r, &fe);
        /* While its request waits or streams, a connection is not idle:
         * a parked one would otherwise be closed as timed out when it is
         * resumed. Dead clients are found by the peer check instead. */
        MHD_set_connection_option(r->mc, MHD_CONNECTION_OPTION_TIMEOUT, 0u);
        snprintf(r->id, sizeof r->id, "%s", front_req_id(r->fq));
        r->created = front_req_created(r->fq);
        r->model = front_req_model(r->fq);
        if (!r->req->stream) {
                r->phase = P_WAIT;
                suspend(r);
                return MHD_YES;
        }
        r->phase = P_STREAM;
        resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, stream_read, r, NULL);
        if (!resp)
                return MHD_NO;
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        ret = MHD_queue_response(r->mc, MHD_HTTP_OK, resp);
        MHD_destroy_response(resp);
        return ret;
}

static enum MHD_Result handle_tokenize(struct http_req *r)
{
        _cleanup_free_ int32_t *ids = NULL;
        struct front_caller c;
        struct front_error fe;
        size_t n = 0;

        caller_of(r, &c);
        if (front_tokenize(r->h->f, &c, r->req, &ids, &n, &fe) < 0)
                return queue_error(r, &fe);
        return queue(r, 200, "application/json", oai_tokens_json(r->req->model, ids, n), 0);
}

static enum MHD_Result handle_post(struct http_req *r)
{
        static const enum oai_kind kinds[] = {
                [R_CHAT] = OAI_CHAT, [R_COMPLETION] = OAI_COMPLETION, [R_TOKENIZE] = OAI_TOKENIZE,
        };
        struct oai_error oe;
        struct front_error fe;

        if (r->too_large) {
                oai_error_set(&fe.oai, 413, "invalid_request_error", NULL, "body_too_large",
                              "the request body is over %zu bytes", r->h->c.limits.max_body);
                fe.retry_after_s = 0;
                return queue_error(r, &fe);
        }
        if (oai_parse(kinds[r->route], r->body ? r->body : "", r->body_len, &r->h->c.limits,
                      &r->req, &oe) < 0) {
                front_error_from_oai(&fe, &oe);
                return queue_error(r, &fe);
        }
        wipe_free(r->body, r->body_cap);
        r->body = NULL;
        r->body_len = r->body_cap = 0;
        return r->route == R_TOKENIZE ? handle_tokenize(r) : start_generation(r);
}

static enum MHD_Result handle_get(struct http_req *r)
{
        struct front *f = r->h->f;
        struct front_caller c;
        struct front_error fe;
        const struct tenant *t;
        json_t *j;

        if (r->route == R_HEALTH)
                return front_serving(f) ?
                       queue(r, 200, "application/json", strdup("{\"status\":\"ok\"}"), 0) :
                       queue(r, 503, "application/json",
                             strdup(front_draining(f) ? "{\"status\":\"draining\"}" :
                                                        "{\"status\":\"refusing\"}"), 0);
        caller_of(r, &c);
        if (!(t = front_identify(f, &c, &fe)))
                return queue_error(r, &fe);
        switch (r->route) {
        case R_MODELS: {
                size_t n = json_array_size(j = front_models(f));
                _cleanup_free_ const char **ids = calloc(n + 1, sizeof *ids);
                for (size_t i = 0; ids && i < n; i++)
                        ids[i] = json_string_value(json_object_get(json_array_get(j, i), "id"));
                char *body = ids ? oai_models_json(ids, n, (int64_t)time(NULL)) : NULL;
                json_decref(j);
                return queue(r, 200, "application/json", body, 0);
        }
        case R_STATUS:
                return queue_json(r, 200, front_status(f));
        case R_USAGE:
                if (!(j = front_usage(f, &c, &fe)))
                        return queue_error(r, &fe);
                return queue_json(r, 200, j);
        case R_METRICS:
                if (c.uid != 0 && !t->admin)
                        return queue_simple_error(r, 403, "not_admin",
                                                  "/metrics shows every tenant: it is for root "
                                                  "and tenants with Admin=yes");
                return queue(r, 200, "text/plain; version=0.0.4", front_metrics(f), 0);
        default:
                return queue_simple_error(r, 404, "not_found", "no such endpoint");
        }
}

static enum route route_of(const char *method, const char *url, bool *wrong_method)
{
        size_t ulen = strcspn(url, "?");

        *wrong_method = false;
        for (size_t i = 0; i < ARRAY_SIZE(routes); i++) {
                if (strlen(routes[i].path) != ulen || strncmp(routes[i].path, url, ulen) != 0)
                        continue;
                if (strcmp(routes[i].method, method) == 0)
                        return routes[i].route;
                *wrong_method = true;
        }
        return R_NONE;
}

static struct http_req *req_new(struct http_door *h, struct MHD_Connection *mc)
{
        struct http_req *r = calloc(1, sizeof *r);
        const union MHD_ConnectionInfo *ci;

        if (!r)
                return NULL;
        r->h = h;
        r->mc = mc;
        ci = MHD_get_connection_info(mc, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
        r->conn = ci ? ci->socket_context : NULL;
        r->next = h->reqs;
        if (h->reqs)
                h->reqs->prev = r;
        h->reqs = r;
        return r;
}

static enum MHD_Result first_call(struct http_req *r, const char *method, const char *url)
{
        const char *len;
        bool wrong;

        if (r->conn)
                r->conn->in_request = true;
        if (!r->conn || r->conn->peer_err)
                return queue_simple_error(r, 403, "no_credentials",
                                          "the peer's credentials could not be read");
        r->route = route_of(method, url, &wrong);
        if (r->route == R_NONE)
                return wrong ? queue_simple_error(r, 405, "method_not_allowed",
                                                  "this endpoint does not take that method") :
                               queue_simple_error(r, 404, "not_found", "no such endpoint");
        len = MHD_lookup_connection_value(r->mc, MHD_HEADER_KIND,
                                          MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (len && strtoull(len, NULL, 10) > r->h->c.limits.max_body) {
                r->too_large = true;
                return handle_post(r);
        }
        return MHD_YES;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *mc, const char *url,
                                  const char *method, const char *version,
                                  const char *upload, size_t *upload_size, void **con_cls)
{
        struct http_door *h = cls;
        struct http_req *r = *con_cls;

        if (!r) {
                if (!(r = req_new(h, mc)))
                        return MHD_NO;
                *con_cls = r;
                return first_call(r, method, url);
        }
        if (*upload_size) {
                if (!r->too_large && r->body_len + *upload_size > h->c.limits.max_body)
                        r->too_large = true;
                if (!r->too_large &&
                    buf_append(&r->body, &r->body_len, &r->body_cap, upload, *upload_size) < 0)
                        return MHD_NO;
                *upload_size = 0;
                return MHD_YES;
        }
        switch (r->phase) {
        case P_BODY:
                return strcmp(method, "POST") == 0 ? handle_post(r) : handle_get(r);
        case P_READY:
                r->phase = P_SENT;
                return queue(r, r->status, "application/json", TAKE_PTR(r->resp), 0);
        case P_WAIT:
                suspend(r);
                return MHD_YES;
        default:
                return MHD_NO;
        }
}

static void on_completed(void *cls, struct MHD_Connection *mc, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
        struct http_door *h = cls;
        struct http_req *r = *con_cls;

        if (!r)
                return;
        *con_cls = NULL;
        if (r->fq || r->id[0])
                MHD_set_connection_option(mc, MHD_CONNECTION_OPTION_TIMEOUT,
                                          h->c.idle_timeout_s);
        if (r->conn) {
                r->conn->in_request = false;
                r->conn->header_deadline = now_usec(h) + h->c.idle_timeout_s * 1000000ull;
        }
        if (r->fq)
                front_abandon(r->fq);
        if (r->prev)
                r->prev->next = r->next;
        else
                h->reqs = r->next;
        if (r->next)
                r->next->prev = r->prev;
        oai_request_free(r->req);
        wipe_free(r->body, r->body_cap);
        wipe_free(r->out, r->out_cap);
        wipe_free(r->resp, r->resp ? strlen(r->resp) : 0);
        free(r);
}

static void on_connection(void *cls, struct MHD_Connection *mc, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe)
{
        struct http_door *h = cls;
        struct http_conn *c = *socket_context;
        const union MHD_ConnectionInfo *ci;

        if (toe == MHD_CONNECTION_NOTIFY_CLOSED) {
                if (!c)
                        return;
                if (c->prev)
                        c->prev->next = c->next;
                else
                        h->conns = c->next;
                if (c->next)
                        c->next->prev = c->prev;
                peer_clear(&c->peer);
                free(c);
                *socket_context = NULL;
                return;
        }
        if (!(c = calloc(1, sizeof *c)))
                return;
        ci = MHD_get_connection_info(mc, MHD_CONNECTION_INFO_CONNECTION_FD);
        c->fd = ci ? ci->connect_fd : -1;
        c->peer_err = ci ? peer_from_fd(ci->connect_fd, &c->peer) : -EBADF;
        c->header_deadline = now_usec(h) + h->c.idle_timeout_s * 1000000ull;
        c->next = h->conns;
        if (h->conns)
                h->conns->prev = c;
        h->conns = c;
        *socket_context = c;
}

/* Ends connections whose request header is overdue; libmicrohttpd sees
 * the shutdown as the client leaving and closes them. */
static void cut_slow_headers(struct http_door *h)
{
        uint64_t now = now_usec(h);

        for (struct http_conn *c = h->conns; c; c = c->next) {
                if (c->in_request || c->cut || c->fd < 0 || now < c->header_deadline)
                        continue;
                shutdown(c->fd, SHUT_RDWR);
                c->cut = true;
                sd_event_source_set_enabled(h->defer, SD_EVENT_ONESHOT);
        }
}

/* A parked connection whose client hung up: cancel its request now rather
 * than when the next byte fails to go out. */
static bool peer_gone(struct http_req *r)
{
        const union MHD_ConnectionInfo *ci =
                MHD_get_connection_info(r->mc, MHD_CONNECTION_INFO_CONNECTION_FD);
        struct pollfd p;

        if (!ci)
                return true;
        p = (struct pollfd){ .fd = ci->connect_fd, .events = POLLRDHUP };
        return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR));
}

static int on_peer_timer(sd_event_source *s, uint64_t usec, void *ud)
{
        struct http_door *h = ud;

        for (struct http_req *r = h->reqs; r; r = r->next) {
                if (!r->suspended || !r->fq || !peer_gone(r))
                        continue;
                front_abandon(r->fq);
                r->fq = NULL;
                r->phase = P_GONE;
                resume(r);
        }
        cut_slow_headers(h);
        sd_event_source_set_time_relative(s, PEER_CHECK_USEC);
        return 0;
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
        char msg[512];

        vsnprintf(msg, sizeof msg, fmt, ap);
        msg[strcspn(msg, "\n")] = 0;
        mo_log(LOG_DEBUG, "http: %s", msg);
}

int http_door_new(sd_event *ev, struct front *f, const struct http_door_config *c,
                  struct http_door **out, struct moerr *e)
{
        struct http_door *h = calloc(1, sizeof *h);
        const union MHD_DaemonInfo *di;
        int ret;

        if (!h)
                return moerr_set(e, -ENOMEM, "out of memory");
        h->ev = sd_event_ref(ev);
        h->f = f;
        h->c = *c;
        h->mhd = MHD_start_daemon(
                MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG, 0, NULL, NULL,
                on_request, h,
                MHD_OPTION_EXTERNAL_LOGGER, mhd_log, h,
                MHD_OPTION_LISTEN_SOCKET, c->listen_fd,
                MHD_OPTION_CONNECTION_LIMIT, c->max_connections,
                MHD_OPTION_CONNECTION_TIMEOUT, c->idle_timeout_s,
                MHD_OPTION_CONNECTION_MEMORY_LIMIT, MO_MAX(c->max_header_bytes, (size_t)16384),
                MHD_OPTION_NOTIFY_COMPLETED, on_completed, h,
                MHD_OPTION_NOTIFY_CONNECTION, on_connection, h,
                MHD_OPTION_END);
        if (!h->mhd) {
                http_door_free(h);
                return moerr_set(e, -EIO, "libmicrohttpd would not start on the socket");
        }
        di = MHD_get_daemon_info(h->mhd, MHD_DAEMON_INFO_EPOLL_FD);
        if (!di || (ret = sd_event_add_io(ev, &h->io, di->epoll_fd, EPOLLIN, on_io, h)) < 0 ||
            /* Accuracy 1 us: libmicrohttpd often asks to run again at once
             * (a body arriving in pieces); sd-event's default slack of 250 ms
             * would make every such piece wait. */
            (ret = sd_event_add_time(ev, &h->timer, CLOCK_MONOTONIC, UINT64_MAX, 1, on_timer,
                                     h)) < 0 ||
            (ret = sd_event_add_defer(ev, &h->defer, on_defer, h)) < 0 ||
            (ret = sd_event_add_time_relative(ev, &h->peer_timer, CLOCK_MONOTONIC,
                                              PEER_CHECK_USEC, 0, on_peer_timer, h)) < 0) {
                http_door_free(h);
                return moerr_set(e, -EIO, "cannot attach the HTTP door to the event loop");
        }
        sd_event_source_set_enabled(h->defer, SD_EVENT_OFF);
        sd_event_source_set_enabled(h->peer_timer, SD_EVENT_ON);
        update_timer(h);
        *out = h;
        return 0;
}

void http_door_stop_accepting(struct http_door *h)
{
        if (h->quiesced)
                return;
        /* The listening fd stays with the daemon (or systemd). */
        MHD_quiesce_daemon(h->mhd);
        h->quiesced = true;
}

unsigned http_door_connections(struct http_door *h)
{
        const union MHD_DaemonInfo *di =
                MHD_get_daemon_info(h->mhd, MHD_DAEMON_INFO_CURRENT_CONNECTIONS);

        return di ? di->num_connections : 0;
}

size_t http_door_busy(struct http_door *h)
{
        size_t n = 0;

        for (struct http_req *r = h->reqs; r; r = r->next)
                n++;
        return n;
}

void http_door_free(struct http_door *h)
{
        if (!h)
                return;
        if (h->mhd) {
                http_door_stop_accepting(h);
                /* MHD may not stop with parked connections. */
                for (struct http_req *r = h->reqs; r; r = r->next) {
                        if (r->fq) {
                                front_abandon(r->fq);
                                r->fq = NULL;
                        }
                        r->phase = P_GONE;
                        if (r->suspended) {
                                r->suspended = false;
                                MHD_resume_connection(r->mc);
                        }
                }
                MHD_run(h->mhd);
                MHD_stop_daemon(h->mhd);
        }
        sd_event_source_disable_unref(h->io);
        sd_event_source_disable_unref(h->timer);
        sd_event_source_disable_unref(h->defer);
        sd_event_source_disable_unref(h->peer_timer);
        sd_event_unref(h->ev);
        free(h);
}
