/* moed-doorbench: what moed's front door costs (issue 3, "Measured"). It
 * starts a moed on a temporary socket and measures (1) the latency the HTTP
 * door adds before the first streamed token: the client's time to the first
 * body byte minus the engine's own first_token_s from the final chunk's
 * "moed" object, and (2) the memory that idle keep-alive connections and open
 * streams cost the daemon (VmRSS and RssAnon from /proc). It speaks just
 * enough HTTP/1.1 over AF_UNIX with poll() to drive hundreds of connections
 * at once: a load generator, not a client library. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#define READY_TIMEOUT_S 60.0   /* a model load plus a cold page cache */
#define PHASE_TIMEOUT_S 120.0  /* no phase of a sane run comes near this */
#define STOP_TIMEOUT_S 40.0    /* moed drains for up to 30 s by default */
#define SLOW_BYTES 256         /* a slow reader takes this much ... */
#define SLOW_PERIOD_S 0.1      /* ... this often */
#define SAMPLE_PERIOD_S 0.02

struct opts {
        const char *moed, *model;
        int requests, concurrency, warmup, idle, streams, stream_tokens;
        double hold_s;          /* how long the peak is sampled */
        double temperature, top_p;
        bool json, slow, keep_log;
        char **extra;           /* moed arguments after "--" */
        int n_extra;
};

/* ---- small helpers ---- */

static double now_s(void)
{
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

struct buf {
        char *p;
        size_t len, cap;
};

/* Appends n bytes and keeps the buffer NUL-terminated. */
static int buf_put(struct buf *b, const void *s, size_t n)
{
        if (b->len + n + 1 > b->cap) {
                size_t nc = b->cap ? b->cap : 1024;
                char *p;

                while (nc < b->len + n + 1)
                        nc *= 2;
                if (!(p = realloc(b->p, nc)))
                        return -ENOMEM;
                b->p = p;
                b->cap = nc;
        }
        memcpy(b->p + b->len, s, n);
        b->len += n;
        b->p[b->len] = 0;
        return 0;
}

static void buf_drop(struct buf *b, size_t n)
{
        memmove(b->p, b->p + n, b->len - n);
        b->len -= n;
        b->p[b->len] = 0;
}

static void buf_free(struct buf *b)
{
        free(b->p);
        *b = (struct buf){ 0 };
}

/* ---- samples ---- */

struct samples {
        double *v;
        size_t n, cap;
};

static int samples_add(struct samples *s, double x)
{
        if (s->n == s->cap) {
                size_t nc = s->cap ? s->cap * 2 : 256;
                double *p = realloc(s->v, nc * sizeof *p);

                if (!p)
                        return -ENOMEM;
                s->v = p;
                s->cap = nc;
        }
        s->v[s->n++] = x;
        return 0;
}

static int cmp_double(const void *a, const void *b)
{
        double x = *(const double *)a, y = *(const double *)b;

        return (x > y) - (x < y);
}

struct dist {
        double p50, p90, p99, max, mean;
};

/* Nearest rank: p99 of 1000 sorted samples is the 990th smallest. */
static double rank(const struct samples *s, double q)
{
        return s->v[(size_t)ceil(q * (double)s->n) - 1];
}

static struct dist dist_of(struct samples *s)
{
        double sum = 0;

        if (!s->n)
                return (struct dist){ 0 };
        qsort(s->v, s->n, sizeof *s->v, cmp_double);
        for (size_t i = 0; i < s->n; i++)
                sum += s->v[i];
        return (struct dist){ rank(s, 0.50), rank(s, 0.90), rank(s, 0.99), s->v[s->n - 1],
                              sum / (double)s->n };
}

/* ---- memory of a process ---- */

struct mem {
        long rss_kib, anon_kib, hwm_kib;
};

static int proc_mem(pid_t pid, struct mem *m)
{
        char path[64], line[256];
        FILE *f;

        snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
        if (!(f = fopen(path, "re")))
                return -errno;
        *m = (struct mem){ -1, -1, -1 };
        while (fgets(line, sizeof line, f)) {
                sscanf(line, "VmRSS: %ld", &m->rss_kib);
                sscanf(line, "RssAnon: %ld", &m->anon_kib);
                sscanf(line, "VmHWM: %ld", &m->hwm_kib);
        }
        fclose(f);
        return m->rss_kib < 0 || m->anon_kib < 0 ? -EIO : 0;
}

static double mib(long kib)
{
        return (double)kib / 1024.0;
}

/* Why a stream failed: EPIPE stands for an end of file, EPROTO for an
 * answer that was not a 200 ending in a "moed" object. */
static const char *err_text(int err)
{
        if (err == -EPIPE)
                return "moed closed the connection";
        if (err == -EPROTO)
                return "an answer that was not a 200 ending in a moed object";
        return strerror(-err);
}

/* ---- one HTTP/1.1 connection ---- */

enum conn_state { C_IDLE, C_HEAD, C_BODY, C_DONE, C_DEAD };
enum chunk_state { K_SIZE, K_DATA, K_DATA_END, K_TRAILER };

struct conn {
        int fd;
        enum conn_state st;
        struct buf in, body;
        int status;
        bool chunked;
        size_t left;            /* Content-Length left, or the current chunk's */
        enum chunk_state ks;
        double t_send, t_head;  /* t_head: the read that completed the response head */
        double t_first;         /* the read that brought the first body byte */
        double next_read;       /* slow readers read again at this time */
        bool slow, first_seen;
        bool closed;            /* moed ended the keep-alive between requests */
        int err;                /* why it died: a negative errno */
        double t_end;           /* when the response ended or the connection died */
};

/* A blocking connect waits while the listen backlog is full, where a
 * non-blocking one on AF_UNIX would fail with EAGAIN. */
static int conn_open(struct conn *c, const char *path)
{
        struct sockaddr_un sa = { .sun_family = AF_UNIX };

        *c = (struct conn){ .fd = -1 };
        if (strlen(path) >= sizeof sa.sun_path)
                return -ENAMETOOLONG;
        strcpy(sa.sun_path, path);
        if ((c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0)
                return -errno;
        if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) < 0 ||
            fcntl(c->fd, F_SETFL, O_NONBLOCK) < 0) {
                int r = -errno;

                close(c->fd);
                c->fd = -1;
                return r;
        }
        return 0;
}

static void conn_close(struct conn *c)
{
        if (c->fd >= 0)
                close(c->fd);
        c->fd = -1;
        c->st = C_DEAD;
        buf_free(&c->in);
        buf_free(&c->body);
}

/* Sends a whole request; requests are small enough for the socket buffer. */
static int conn_send(struct conn *c, const char *req, size_t n)
{
        size_t off = 0;

        c->st = C_HEAD;
        c->status = 0;
        c->chunked = c->first_seen = false;
        c->left = 0;
        c->ks = K_SIZE;
        c->body.len = 0;
        c->t_first = 0;
        c->t_send = now_s();
        while (off < n) {
                ssize_t w = write(c->fd, req + off, n - off);

                if (w < 0 && errno == EINTR)
                        continue;
                if (w < 0) {
                        c->st = C_DEAD;
                        return -errno;
                }
                off += (size_t)w;
        }
        return 0;
}

/* The status line and the two headers that say where the body ends. */
static int parse_head(struct conn *c, double t_read)
{
        char *end = memmem(c->in.p, c->in.len, "\r\n\r\n", 4), *line;

        if (!end)
                return 0;
        *end = 0;
        if (sscanf(c->in.p, "HTTP/1.%*d %d", &c->status) != 1)
                return -EPROTO;
        c->left = SIZE_MAX;
        for (line = strstr(c->in.p, "\r\n"); line; line = strstr(line, "\r\n")) {
                line += 2;
                if (strncasecmp(line, "Content-Length:", 15) == 0)
                        c->left = strtoull(line + 15, NULL, 10);
                else if (strncasecmp(line, "Transfer-Encoding:", 18) == 0)
                        c->chunked = strcasestr(line, "chunked") != NULL;
        }
        if (!c->chunked && c->left == SIZE_MAX)
                return -EPROTO; /* moed always says where a body ends */
        buf_drop(&c->in, (size_t)(end + 4 - c->in.p));
        c->st = C_BODY;
        c->t_head = t_read;
        return 1;
}

static int take_body(struct conn *c, size_t n, double t_read)
{
        if (n && !c->first_seen) {
                c->first_seen = true;
                c->t_first = t_read;
        }
        if (buf_put(&c->body, c->in.p, n) < 0)
                return -ENOMEM;
        buf_drop(&c->in, n);
        c->left -= n;
        return 0;
}

/* One step of the chunked decoder: 1 progress, 0 needs bytes, 2 done. */
static int chunk_step(struct conn *c, double t_read)
{
        char *crlf = memmem(c->in.p, c->in.len, "\r\n", 2);
        size_t n;

        switch (c->ks) {
        case K_SIZE:
                if (!crlf)
                        return 0;
                c->left = strtoull(c->in.p, NULL, 16);
                buf_drop(&c->in, (size_t)(crlf + 2 - c->in.p));
                c->ks = c->left ? K_DATA : K_TRAILER;
                return 1;
        case K_DATA:
                n = c->in.len < c->left ? c->in.len : c->left;
                if (!n)
                        return 0;
                if (take_body(c, n, t_read) < 0)
                        return -ENOMEM;
                if (!c->left)
                        c->ks = K_DATA_END;
                return 1;
        case K_DATA_END:
                if (c->in.len < 2)
                        return 0;
                buf_drop(&c->in, 2);
                c->ks = K_SIZE;
                return 1;
        case K_TRAILER:
                if (!crlf)
                        return 0;
                n = (size_t)(crlf + 2 - c->in.p);
                buf_drop(&c->in, n);
                return n == 2 ? 2 : 1;
        }
        return -EPROTO;
}

/* Consumes what has arrived: 1 when the response is complete. */
static int parse_body(struct conn *c, double t_read)
{
        int r;

        if (!c->chunked) {
                size_t n = c->in.len < c->left ? c->in.len : c->left;

                if (take_body(c, n, t_read) < 0)
                        return -ENOMEM;
                return c->left == 0;
        }
        while ((r = chunk_step(c, t_read)) == 1)
                ;
        return r == 2 ? 1 : r;
}

/* Reads what is there (a slow reader: a little); 1 when a response is done. */
static int conn_read(struct conn *c)
{
        char tmp[65536];
        size_t want = c->slow ? SLOW_BYTES : sizeof tmp;
        ssize_t n = read(c->fd, tmp, want);
        double t = now_s();
        int r;

        if (n < 0)
                return errno == EAGAIN || errno == EINTR ? 0 : -errno;
        if (n == 0)
                return -EPIPE; /* moed closed the connection: see err_text() */
        if (c->slow)
                c->next_read = t + SLOW_PERIOD_S;
        if (c->st == C_DONE || c->st == C_IDLE)
                return -EPROTO; /* bytes nobody asked for */
        if (buf_put(&c->in, tmp, (size_t)n) < 0)
                return -ENOMEM;
        if (c->st == C_HEAD && (r = parse_head(c, t)) <= 0)
                return r;
        if ((r = parse_body(c, t)) == 1) {
                c->st = C_DONE;
                c->t_end = t;
        }
        return r;
}

/* ---- driving many connections ---- */

struct pump {
        struct conn **c;
        size_t n;
        struct pollfd *pf;
        void (*done)(struct pump *p, struct conn *c);
        void *ud;
        size_t n_dead;
};

static int pump_init(struct pump *p, size_t cap)
{
        *p = (struct pump){ .c = calloc(cap, sizeof *p->c), .pf = calloc(cap, sizeof *p->pf) };
        return p->c && p->pf ? 0 : -ENOMEM;
}

static void pump_free(struct pump *p)
{
        free(p->c);
        free(p->pf);
}

/* A slow reader between its reads is not watched at all: it stands for a
 * client that leaves the bytes in the socket. */
static bool watched(const struct conn *c, double t)
{
        return c->st != C_DEAD && !c->closed && !(c->slow && c->st == C_BODY && t < c->next_read);
}

static void pump_event(struct pump *p, struct conn *c)
{
        bool between = c->st == C_DONE || c->st == C_IDLE;
        int r = conn_read(c);

        /* An idle keep-alive that moed closes (IdleTimeoutSec) has lost
         * nothing: the last answer was complete. */
        if (r == -EPIPE && between) {
                c->closed = true;
                return;
        }
        if (r < 0) {
                c->st = C_DEAD;
                c->err = r;
                c->t_end = now_s();
                p->n_dead++;
        } else if (r == 1 && p->done) {
                p->done(p, c);
        }
}

/* One poll round over every live connection. Idle ones are watched too, so
 * that a server closing them is noticed. */
static int pump_once(struct pump *p, int timeout_ms)
{
        double t = now_s();
        int r;

        for (size_t i = 0; i < p->n; i++)
                p->pf[i] = (struct pollfd){ .fd = watched(p->c[i], t) ? p->c[i]->fd : -1,
                                            .events = POLLIN | POLLRDHUP };
        r = poll(p->pf, p->n, timeout_ms);
        if (r < 0)
                return errno == EINTR ? 0 : -errno;
        for (size_t i = 0; i < p->n && r > 0; i++) {
                if (p->pf[i].revents) {
                        r--;
                        pump_event(p, p->c[i]);
                }
        }
        return 0;
}

/* Nothing is waiting for an answer: every connection idle, done or dead. */
static bool none_busy(struct pump *p)
{
        for (size_t i = 0; i < p->n; i++)
                if (p->c[i]->st == C_HEAD || p->c[i]->st == C_BODY)
                        return false;
        return true;
}

/* Pumps until `until` says so, or fails after PHASE_TIMEOUT_S. */
static int pump_until(struct pump *p, bool (*until)(struct pump *p), int timeout_ms)
{
        double deadline = now_s() + PHASE_TIMEOUT_S;
        int r;

        while (!until(p)) {
                if (now_s() > deadline)
                        return -ETIMEDOUT;
                if ((r = pump_once(p, timeout_ms)) < 0)
                        return r;
        }
        return 0;
}

/* ---- requests ---- */

static char *http_get(const char *path)
{
        char *s;

        return asprintf(&s, "GET %s HTTP/1.1\r\nHost: moed\r\n\r\n", path) < 0 ? NULL : s;
}

/* A streamed completion; top_p only when asked for, as it changes what the
 * engine allocates per request. */
static char *http_post_completion(const char *model, int max_tokens, const struct opts *o)
{
        json_t *j = json_pack("{s:s, s:s, s:i, s:f, s:b}", "model", model, "prompt", "Hello",
                              "max_tokens", max_tokens, "temperature", o->temperature,
                              "stream", true);
        char *body, *s = NULL;

        if (j && o->top_p > 0)
                json_object_set_new(j, "top_p", json_real(o->top_p));
        body = j ? json_dumps(j, JSON_COMPACT) : NULL;

        json_decref(j);
        if (body && asprintf(&s, "POST /v1/completions HTTP/1.1\r\nHost: moed\r\n"
                             "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
                             strlen(body), body) < 0)
                s = NULL;
        free(body);
        return s;
}

struct moed_times {
        double queue_s, first_token_s, total_s;
};

/* The SSE event that carries the "moed" object (the one with finish_reason). */
static int sse_moed_times(const char *body, struct moed_times *t)
{
        size_t len;

        for (const char *l = body; *l; l += len + (l[len] == '\n')) {
                json_t *j;
                int r;

                len = strcspn(l, "\n");
                if (strncmp(l, "data: {", 7) != 0)
                        continue;
                if (!(j = json_loadb(l + 6, len - 6, 0, NULL)))
                        return -EPROTO;
                r = json_unpack(j, "{s:{s:F, s:F, s:F}}", "moed", "queue_s", &t->queue_s,
                                "first_token_s", &t->first_token_s, "total_s", &t->total_s);
                json_decref(j);
                if (r == 0)
                        return 0;
        }
        return -ENOENT;
}

/* ---- the daemon ---- */

struct daemon {
        pid_t pid;
        char dir[64], sock[128], log[128];
        char *model_id;
};

static void daemon_exec(const struct daemon *d, const struct opts *o)
{
        char **argv = calloc((size_t)o->n_extra + 10, sizeof *argv);
        int n = 0, fd = open(d->log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);

        if (!argv || fd < 0 || dup2(fd, STDOUT_FILENO) < 0 || dup2(fd, STDERR_FILENO) < 0)
                _exit(127);
        argv[n++] = (char *)o->moed;
        argv[n++] = "--user";
        argv[n++] = "--no-bus";
        argv[n++] = "--model";
        argv[n++] = (char *)o->model;
        argv[n++] = "--socket";
        argv[n++] = (char *)d->sock;
        for (int i = 0; i < o->n_extra; i++)
                argv[n++] = o->extra[i];
        execv(o->moed, argv); /* the environment, MOED_* included, passes through */
        fprintf(stderr, "moed-doorbench: cannot run %s: %s\n", o->moed, strerror(errno));
        _exit(127);
}

static int daemon_wait_socket(struct daemon *d)
{
        double deadline = now_s() + READY_TIMEOUT_S;
        struct conn c;
        int status;

        while (now_s() < deadline) {
                if (waitpid(d->pid, &status, WNOHANG) == d->pid) {
                        d->pid = 0;
                        fprintf(stderr, "moed-doorbench: moed exited while starting; see %s\n",
                                d->log);
                        return -ECHILD;
                }
                if (conn_open(&c, d->sock) == 0) {
                        conn_close(&c);
                        return 0;
                }
                usleep(20 * 1000);
        }
        fprintf(stderr, "moed-doorbench: moed did not listen on %s within %.0f s; see %s\n",
                d->sock, READY_TIMEOUT_S, d->log);
        return -ETIMEDOUT;
}

static int daemon_start(struct daemon *d, const struct opts *o)
{
        snprintf(d->dir, sizeof d->dir, "/tmp/moed-doorbench.XXXXXX");
        if (!mkdtemp(d->dir))
                return -errno;
        snprintf(d->sock, sizeof d->sock, "%s/moed.sock", d->dir);
        snprintf(d->log, sizeof d->log, "%s/moed.log", d->dir);
        d->pid = fork();
        if (d->pid < 0)
                return -errno;
        if (d->pid == 0)
                daemon_exec(d, o);
        return daemon_wait_socket(d);
}

/* SIGTERM, then the drain; SIGKILL only if it overstays. */
static int daemon_stop(struct daemon *d)
{
        double deadline = now_s() + STOP_TIMEOUT_S;
        int status = 0;
        pid_t w;

        if (d->pid <= 0)
                return -ECHILD;
        kill(d->pid, SIGTERM);
        while ((w = waitpid(d->pid, &status, WNOHANG)) == 0) {
                if (now_s() > deadline) {
                        kill(d->pid, SIGKILL);
                        w = waitpid(d->pid, &status, 0);
                        break;
                }
                usleep(10 * 1000);
        }
        d->pid = 0;
        if (w < 0)
                return -ECHILD;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static void daemon_cleanup(struct daemon *d, bool keep_log)
{
        unlink(d->sock);
        if (!keep_log) {
                unlink(d->log);
                rmdir(d->dir);
        }
        free(d->model_id);
}

/* One request on a fresh connection, the answer's JSON body. */
static json_t *get_json(const struct daemon *d, const char *path)
{
        char *req = http_get(path);
        struct conn c, *cp = &c;
        struct pump p = { .c = &cp, .n = 1 };
        struct pollfd pf;
        json_t *j = NULL;

        p.pf = &pf;
        if (req && conn_open(&c, d->sock) == 0) {
                if (conn_send(&c, req, strlen(req)) == 0 && pump_until(&p, none_busy, 100) == 0 &&
                    c.st == C_DONE && c.status == 200)
                        j = json_loadb(c.body.p, c.body.len, 0, NULL);
                conn_close(&c);
        }
        free(req);
        return j;
}

static int learn_model_id(struct daemon *d)
{
        json_t *j = get_json(d, "/v1/models");
        const char *id = NULL;

        if (j)
                json_unpack(j, "{s:[{s:s}]}", "data", "id", &id);
        if (id)
                d->model_id = strdup(id);
        json_decref(j);
        return d->model_id ? 0 : -EPROTO;
}

/* ---- latency: the door's share of the time to the first token ---- */

struct lat {
        const char *req;
        size_t req_len;
        int total, issued, skip;   /* skip: warm-up answers not recorded */
        int errors;
        struct samples overhead, ttfb, engine, head;
        struct dist d_overhead, d_ttfb, d_engine, d_head;
};

static void lat_summarize(struct lat *l)
{
        l->d_overhead = dist_of(&l->overhead);
        l->d_ttfb = dist_of(&l->ttfb);
        l->d_engine = dist_of(&l->engine);
        l->d_head = dist_of(&l->head);
}

static void lat_free(struct lat *l)
{
        free(l->overhead.v);
        free(l->ttfb.v);
        free(l->engine.v);
        free(l->head.v);
}

static void lat_record(struct lat *l, struct conn *c)
{
        struct moed_times t;

        if (c->status != 200 || !c->first_seen || sse_moed_times(c->body.p, &t) < 0) {
                l->errors++;
                return;
        }
        if (l->skip > 0) {
                l->skip--;
                return;
        }
        samples_add(&l->overhead, (c->t_first - c->t_send) - t.first_token_s);
        samples_add(&l->ttfb, c->t_first - c->t_send);
        samples_add(&l->engine, t.first_token_s);
        samples_add(&l->head, c->t_head - c->t_send);
}

static void lat_done(struct pump *p, struct conn *c)
{
        struct lat *l = p->ud;

        lat_record(l, c);
        if (l->issued < l->total) {
                l->issued++;
                if (conn_send(c, l->req, l->req_len) < 0)
                        p->n_dead++;
        } else {
                c->st = C_IDLE;
        }
}

/* `total` requests over `conc` keep-alive connections, each one at a time. */
static int run_latency(const struct daemon *d, int conc, int total, int warmup, struct lat *l)
{
        struct conn *cs = calloc((size_t)conc, sizeof *cs);
        struct pump p;
        int r = pump_init(&p, (size_t)conc);

        l->total = total + warmup;
        l->skip = warmup;
        p.done = lat_done;
        p.ud = l;
        for (int i = 0; r == 0 && cs && i < conc && l->issued < l->total; i++) {
                if ((r = conn_open(&cs[i], d->sock)) < 0)
                        break;
                p.c[p.n++] = &cs[i];
                l->issued++;
                r = conn_send(&cs[i], l->req, l->req_len);
        }
        if (!cs)
                r = -ENOMEM;
        if (r == 0)
                r = pump_until(&p, none_busy, 1000);
        /* A connection that died took its share of the requests with it. */
        l->errors += (int)p.n_dead + (l->total - l->issued);
        for (size_t i = 0; i < p.n; i++)
                conn_close(p.c[i]);
        pump_free(&p);
        free(cs);
        return r;
}

/* ---- memory: idle keep-alive connections and open streams ---- */

/* One round: the idle connections, then the streams on top, then all closed. */
struct memround {
        struct mem idle, peak, after;
        int idle_ok, idle_lost, streams_ok, streams_failed, streams_open_at_peak;
        double t_streams_first;   /* seconds until every stream had spoken */
        double end_lag_max;       /* worst client end minus the engine's total_s */
        int first_err;            /* the first failed stream's negative errno */
        double first_err_after;   /* and how long after its request */
};

/* Round 1 against the baseline is the number; round 2 against the
 * end of round 1 is the marginal cost once the engine's batch buffers exist. */
struct memrun {
        struct mem base;
        struct memround r[2];
};

/* Every stream has had its first token (or has ended). */
static bool streams_started(struct pump *p)
{
        for (size_t i = 0; i < p->n; i++)
                if (p->c[i]->st == C_HEAD || (p->c[i]->st == C_BODY && !p->c[i]->first_seen))
                        return false;
        return true;
}

static int open_and_send(struct conn *c, const char *sock, const char *req, bool slow)
{
        int r = conn_open(c, sock);

        if (r < 0)
                return r;
        c->slow = slow;
        return conn_send(c, req, strlen(req));
}

static void idle_done(struct pump *p, struct conn *c)
{
        c->st = C_IDLE; /* kept open, asking nothing more */
}

static int open_idle(const struct daemon *d, struct pump *p, struct conn *cs, int n)
{
        char *req = http_get("/health");
        int r = req ? 0 : -ENOMEM;

        for (int i = 0; r == 0 && i < n; i++) {
                p->c[p->n++] = &cs[i];
                r = open_and_send(&cs[i], d->sock, req, false);
        }
        free(req);
        p->done = idle_done;
        return r ? r : pump_until(p, none_busy, 1000);
}

/* Samples the daemon's memory while the streams run, for hold_s at most;
 * VmHWM catches what falls between two samples. */
static int hold_peak(const struct daemon *d, struct pump *p, struct memround *m, size_t first,
                     double hold_s)
{
        double end = now_s() + hold_s;
        struct mem s;
        int r;

        do {
                if ((r = proc_mem(d->pid, &s)) < 0)
                        return r;
                if (s.rss_kib > m->peak.rss_kib) {
                        m->peak = s;
                        m->streams_open_at_peak = 0;
                        for (size_t i = first; i < p->n; i++)
                                m->streams_open_at_peak += p->c[i]->st == C_BODY;
                }
                m->peak.anon_kib = s.anon_kib > m->peak.anon_kib ? s.anon_kib : m->peak.anon_kib;
                if ((r = pump_once(p, (int)(SAMPLE_PERIOD_S * 1000))) < 0)
                        return r;
        } while (now_s() < end && !none_busy(p));
        return 0;
}

/* A stream's lag: how long after the engine ended it the client saw the
 * end of the response. */
static void count_stream(const struct conn *c, struct memround *m)
{
        struct moed_times t;

        if (c->st == C_DONE && c->status == 200 && sse_moed_times(c->body.p, &t) == 0) {
                m->streams_ok++;
                m->end_lag_max = fmax(m->end_lag_max, c->t_end - c->t_send - t.total_s);
                return;
        }
        if (!m->streams_failed++) {
                m->first_err = c->st == C_DEAD ? c->err : -EPROTO;
                m->first_err_after = c->t_end - c->t_send;
        }
}

static void count_round(struct pump *p, size_t n_idle, struct memround *m)
{
        for (size_t i = 0; i < n_idle; i++) {
                if (p->c[i]->st == C_IDLE && !p->c[i]->closed)
                        m->idle_ok++;
                else
                        m->idle_lost++;
        }
        for (size_t i = n_idle; i < p->n; i++)
                count_stream(p->c[i], m);
}

static int open_streams(const struct daemon *d, const struct opts *o, struct pump *p,
                        struct conn *cs, struct memround *m)
{
        char *req = http_post_completion(d->model_id, o->stream_tokens, o);
        double t0 = now_s();
        int r = req ? 0 : -ENOMEM;

        p->done = NULL;
        for (int i = 0; r == 0 && i < o->streams; i++) {
                p->c[p->n++] = &cs[i];
                r = open_and_send(&cs[i], d->sock, req, false);
        }
        free(req);
        if (r == 0)
                r = pump_until(p, streams_started, 10);
        m->t_streams_first = now_s() - t0;
        for (size_t i = 0; i < p->n; i++)
                p->c[i]->slow = o->slow && p->c[i]->st == C_BODY;
        return r;
}

/* After the peak: every stream read to its end at full speed. */
static int drain_streams(struct pump *p)
{
        for (size_t i = 0; i < p->n; i++)
                p->c[i]->slow = false;
        return pump_until(p, none_busy, 100);
}

static int run_round(const struct daemon *d, const struct opts *o, struct memround *m)
{
        size_t n = (size_t)o->idle + (size_t)o->streams;
        struct conn *cs = calloc(n, sizeof *cs);
        struct pump p;
        int r = pump_init(&p, n);

        if (!cs)
                r = -ENOMEM;
        if (r == 0 && (r = open_idle(d, &p, cs, o->idle)) == 0)
                r = proc_mem(d->pid, &m->idle);
        if (r == 0)
                r = open_streams(d, o, &p, cs + o->idle, m);
        if (r == 0) {
                m->peak = (struct mem){ -1, -1, -1 };
                r = hold_peak(d, &p, m, (size_t)o->idle, o->hold_s);
        }
        if (r == 0)
                r = drain_streams(&p);
        pump_once(&p, 50); /* a server that dropped idle ones has said so by now */
        count_round(&p, (size_t)o->idle, m);
        for (size_t i = 0; i < p.n; i++)
                conn_close(p.c[i]);
        usleep(200 * 1000); /* let moed see the hang-ups */
        if (r == 0)
                r = proc_mem(d->pid, &m->after);
        pump_free(&p);
        free(cs);
        return r;
}

/* ---- the report ---- */

struct results {
        struct opts o;
        struct daemon *d;
        int ncpu;
        double load0[3], load1[3];
        struct lat seq, conc;
        struct memrun m;
        int moed_exit;
};

static json_t *dist_json(const struct dist *d)
{
        return json_pack("{s:f, s:f, s:f, s:f, s:f}", "p50", d->p50 * 1e3, "p90", d->p90 * 1e3,
                         "p99", d->p99 * 1e3, "max", d->max * 1e3, "mean", d->mean * 1e3);
}

static json_t *lat_json(const struct lat *l, int conc)
{
        return json_pack("{s:i, s:i, s:i, s:o, s:o, s:o, s:o}", "concurrency", conc, "requests",
                         (int)l->overhead.n, "errors", l->errors, "overhead_ms",
                         dist_json(&l->d_overhead), "ttfb_ms", dist_json(&l->d_ttfb),
                         "engine_first_token_ms", dist_json(&l->d_engine), "head_ms",
                         dist_json(&l->d_head));
}

static json_t *mem_json(const struct mem *m)
{
        return json_pack("{s:I, s:I, s:I}", "vmrss_kib", (json_int_t)m->rss_kib, "rssanon_kib",
                         (json_int_t)m->anon_kib, "vmhwm_kib", (json_int_t)m->hwm_kib);
}

static json_t *mem_delta_json(const struct mem *m, const struct mem *base)
{
        return json_pack("{s:f, s:f}", "vmrss_mib", mib(m->rss_kib - base->rss_kib),
                         "rssanon_mib", mib(m->anon_kib - base->anon_kib));
}

static json_t *round_json(const struct memround *m, const struct mem *base)
{
        return json_pack("{s:i, s:i, s:i, s:i, s:s?, s:f, s:f, s:i, s:f, s:o, s:o, s:o, s:o}",
                         "idle_kept", m->idle_ok, "idle_lost", m->idle_lost, "streams_complete",
                         m->streams_ok, "streams_failed", m->streams_failed, "first_failure",
                         m->streams_failed ? err_text(m->first_err) : NULL,
                         "first_failure_after_s", m->first_err_after, "stream_end_lag_max_s",
                         m->end_lag_max, "streams_open_at_peak", m->streams_open_at_peak,
                         "streams_started_s", m->t_streams_first, "with_idle", mem_json(&m->idle),
                         "peak", mem_json(&m->peak), "after", mem_json(&m->after), "peak_delta",
                         mem_delta_json(&m->peak, base));
}

static json_t *memrun_json(const struct results *res)
{
        const struct memrun *m = &res->m;

        return json_pack("{s:i, s:i, s:i, s:b, s:o, s:o, s:o}", "idle", res->o.idle, "streams",
                         res->o.streams, "stream_max_tokens", res->o.stream_tokens,
                         "slow_readers", res->o.slow, "baseline", mem_json(&m->base), "round1",
                         round_json(&m->r[0], &m->base), "round2",
                         round_json(&m->r[1], &m->r[0].after));
}

static bool memory_target_met(const struct memrun *m)
{
        return m->r[0].peak.rss_kib - m->base.rss_kib < 64 * 1024;
}

static void print_json(const struct results *r)
{
        json_t *j = json_pack(
                "{s:s, s:s, s:i, s:[f,f,f], s:[f,f,f], s:o, s:o, s:o, s:i, s:{s:b, s:b}}",
                "model", r->o.model, "model_id", r->d->model_id, "cpus", r->ncpu, "loadavg_start",
                r->load0[0], r->load0[1], r->load0[2], "loadavg_end", r->load1[0], r->load1[1],
                r->load1[2], "sequential",
                lat_json(&r->seq, 1), "concurrent", lat_json(&r->conc, r->o.concurrency),
                "memory", memrun_json(r), "moed_exit", r->moed_exit, "targets",
                "overhead_p99_under_1ms", r->seq.d_overhead.p99 < 1e-3, "memory_under_64mib",
                memory_target_met(&r->m));
        char *s = j ? json_dumps(j, JSON_INDENT(2)) : NULL;

        if (s)
                printf("%s\n", s);
        free(s);
        json_decref(j);
}

static void print_dist(const char *what, const struct dist *d)
{
        printf("    %-26s %8.3f %8.3f %8.3f %8.3f %8.3f\n", what, d->p50 * 1e3, d->p90 * 1e3,
               d->p99 * 1e3, d->max * 1e3, d->mean * 1e3);
}

static void print_lat(const char *title, const struct lat *l)
{
        printf("  %s: %zu requests, %d errors\n", title, l->overhead.n, l->errors);
        printf("    %-26s %8s %8s %8s %8s %8s\n", "(ms)", "p50", "p90", "p99", "max", "mean");
        print_dist("door overhead", &l->d_overhead);
        print_dist("client time to 1st byte", &l->d_ttfb);
        print_dist("engine first_token_s", &l->d_engine);
        print_dist("client time to head", &l->d_head);
}

static void print_mem(const char *what, const struct mem *m, const struct mem *base)
{
        printf("    %-26s VmRSS %6.1f MiB (%+6.1f)  RssAnon %6.1f MiB (%+6.1f)  VmHWM %6.1f MiB\n",
               what, mib(m->rss_kib), mib(m->rss_kib - base->rss_kib), mib(m->anon_kib),
               mib(m->anon_kib - base->anon_kib), mib(m->hwm_kib));
}

static void print_round(int n, const struct memround *m, const struct mem *base)
{
        printf("  round %d, against the %s:\n", n, n == 1 ? "baseline" : "end of round 1");
        print_mem("idle connections open", &m->idle, base);
        print_mem("peak with the streams too", &m->peak, base);
        print_mem("all closed again", &m->after, base);
        printf("    streams open at the peak %d, all had spoken after %.2f s; "
               "idle kept %d, lost %d\n",
               m->streams_open_at_peak, m->t_streams_first, m->idle_ok, m->idle_lost);
        printf("    streams complete %d, worst end lag %.3f s (client end - engine total_s)\n",
               m->streams_ok, m->end_lag_max);
        if (m->streams_failed)
                printf("    streams FAILED %d, the first: %s after %.1f s\n", m->streams_failed,
                       err_text(m->first_err), m->first_err_after);
}

static void print_human(const struct results *r)
{
        const struct memrun *m = &r->m;

        printf("moed-doorbench: model %s (%s), %d CPUs, load %.2f %.2f %.2f -> %.2f %.2f %.2f\n",
               r->d->model_id, r->o.model, r->ncpu, r->load0[0], r->load0[1], r->load0[2],
               r->load1[0], r->load1[1], r->load1[2]);
        printf("front door: streamed POST /v1/completions, max_tokens 1; overhead = client "
               "time to first body byte - engine first_token_s\n");
        print_lat("one at a time, one keep-alive connection", &r->seq);
        printf("  target p99 < 1 ms: %s\n", r->seq.d_overhead.p99 < 1e-3 ? "met" : "NOT met");
        print_lat("concurrent keep-alive connections", &r->conc);
        printf("    (%d connections, each one request at a time)\n", r->o.concurrency);
        printf("memory: %d idle keep-alive connections + %d streams (max_tokens %d, %s readers)\n",
               r->o.idle, r->o.streams, r->o.stream_tokens, r->o.slow ? "slow" : "normal");
        print_mem("baseline", &m->base, &m->base);
        print_round(1, &m->r[0], &m->base);
        print_round(2, &m->r[1], &m->r[0].after);
        printf("  target < 64 MiB beyond the model (round 1 peak VmRSS): %s\n",
               memory_target_met(m) ? "met" : "NOT met");
        printf("moed exit status %d\n", r->moed_exit);
}

/* ---- main ---- */

static void usage(FILE *f)
{
        fprintf(f, "usage: moed-doorbench --moed PATH --model FILE.gguf [OPTIONS] [-- MOED-ARGS]\n"
                "Starts moed on a temporary socket and measures its HTTP door.\n\n"
                "  --moed PATH          the moed binary\n"
                "  --model FILE         the model moed serves\n"
                "  --requests N         measured requests per latency run (default 1000)\n"
                "  --concurrency N      connections of the concurrent run (default 8)\n"
                "  --warmup N           unrecorded requests before each run (default 20)\n"
                "  --idle N             idle keep-alive connections (default 256)\n"
                "  --streams N          concurrent streams (default 64)\n"
                "  --stream-tokens N    max_tokens of each stream (default 120)\n"
                "  --slow               streams read %d bytes every %.0f ms\n"
                "  --hold SECONDS       how long the memory peak is sampled (default 1.5)\n"
                "  --temperature T      every request's temperature (default 0: greedy)\n"
                "  --top-p P            every request's top_p (default: not sent)\n"
                "  --keep-log           keep moed's log (its path goes to stderr)\n"
                "  --json               one JSON object instead of the report\n",
                SLOW_BYTES, SLOW_PERIOD_S * 1e3);
}

static int parse_opts(int argc, char **argv, struct opts *o)
{
        enum { O_MOED = 256, O_MODEL, O_REQ, O_CONC, O_WARM, O_IDLE, O_STREAMS, O_TOK, O_SLOW,
               O_HOLD, O_TEMP, O_TOPP, O_KEEP, O_JSON, O_HELP };
        static const struct option lo[] = {
                { "moed", required_argument, NULL, O_MOED },
                { "model", required_argument, NULL, O_MODEL },
                { "requests", required_argument, NULL, O_REQ },
                { "concurrency", required_argument, NULL, O_CONC },
                { "warmup", required_argument, NULL, O_WARM },
                { "idle", required_argument, NULL, O_IDLE },
                { "streams", required_argument, NULL, O_STREAMS },
                { "stream-tokens", required_argument, NULL, O_TOK },
                { "slow", no_argument, NULL, O_SLOW },
                { "hold", required_argument, NULL, O_HOLD },
                { "temperature", required_argument, NULL, O_TEMP },
                { "top-p", required_argument, NULL, O_TOPP },
                { "keep-log", no_argument, NULL, O_KEEP },
                { "json", no_argument, NULL, O_JSON },
                { "help", no_argument, NULL, O_HELP },
                { 0 },
        };
        int c;

        *o = (struct opts){ .requests = 1000, .concurrency = 8, .warmup = 20, .idle = 256,
                            .streams = 64, .stream_tokens = 120, .hold_s = 1.5 };
        while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
                switch (c) {
                case O_MOED: o->moed = optarg; break;
                case O_MODEL: o->model = optarg; break;
                case O_REQ: o->requests = atoi(optarg); break;
                case O_CONC: o->concurrency = atoi(optarg); break;
                case O_WARM: o->warmup = atoi(optarg); break;
                case O_IDLE: o->idle = atoi(optarg); break;
                case O_STREAMS: o->streams = atoi(optarg); break;
                case O_TOK: o->stream_tokens = atoi(optarg); break;
                case O_SLOW: o->slow = true; break;
                case O_HOLD: o->hold_s = atof(optarg); break;
                case O_TEMP: o->temperature = atof(optarg); break;
                case O_TOPP: o->top_p = atof(optarg); break;
                case O_KEEP: o->keep_log = true; break;
                case O_JSON: o->json = true; break;
                case O_HELP: usage(stdout); exit(0);
                default: return -EINVAL;
                }
        }
        o->extra = argv + optind;
        o->n_extra = argc - optind;
        if (!o->moed || !o->model || o->requests < 1 || o->concurrency < 1 || o->warmup < 0 ||
            o->idle < 0 || o->streams < 1 || o->stream_tokens < 1 ||
            !(o->hold_s >= 0 && o->hold_s < PHASE_TIMEOUT_S) || !(o->temperature >= 0) ||
            !(o->top_p >= 0 && o->top_p <= 1))
                return -EINVAL;
        return 0;
}

static int fail(const char *what, int r)
{
        fprintf(stderr, "moed-doorbench: %s: %s\n", what, strerror(-r));
        return r;
}

/* Warm-up and baseline, memory first (its baseline must not carry the
 * latency runs' heap), then the two latency runs. */
static int measure(struct daemon *d, struct results *res)
{
        struct lat warm = { 0 };
        char *req;
        int r;

        if ((r = learn_model_id(d)) < 0)
                return fail("GET /v1/models", r);
        if (!(req = http_post_completion(d->model_id, 1, &res->o)))
                return fail("building the request", -ENOMEM);
        res->seq.req = res->conc.req = req;
        res->seq.req_len = res->conc.req_len = warm.req_len = strlen(req);
        warm.req = req;
        r = run_latency(d, 1, 1, 0, &warm);
        lat_free(&warm);
        if (r < 0 || warm.errors || (r = proc_mem(d->pid, &res->m.base)) < 0)
                return fail("warm-up", r < 0 ? r : -EPROTO);
        for (int i = 0; i < 2; i++)
                if ((r = run_round(d, &res->o, &res->m.r[i])) < 0)
                        return fail("memory run", r);
        if ((r = run_latency(d, 1, res->o.requests, res->o.warmup, &res->seq)) < 0)
                return fail("sequential latency run", r);
        if ((r = run_latency(d, res->o.concurrency, res->o.requests, res->o.warmup,
                             &res->conc)) < 0)
                return fail("concurrent latency run", r);
        lat_summarize(&res->seq);
        lat_summarize(&res->conc);
        return 0;
}

int main(int argc, char **argv)
{
        struct daemon d = { 0 };
        struct results res = { 0 };
        int r;

        if (parse_opts(argc, argv, &res.o) < 0) {
                usage(stderr);
                return 2;
        }
        signal(SIGPIPE, SIG_IGN);
        res.d = &d;
        res.ncpu = (int)sysconf(_SC_NPROCESSORS_ONLN);
        getloadavg(res.load0, 3);
        if ((r = daemon_start(&d, &res.o)) < 0) {
                if (d.pid > 0)
                        daemon_stop(&d);
                daemon_cleanup(&d, true);
                return 1;
        }
        r = measure(&d, &res);
        res.moed_exit = daemon_stop(&d);
        getloadavg(res.load1, 3);
        if (r == 0)
                res.o.json ? print_json(&res) : print_human(&res);
        if (r < 0 || res.o.keep_log)
                fprintf(stderr, "moed-doorbench: moed's log is in %s\n", d.log);
        free((char *)res.seq.req);
        lat_free(&res.seq);
        lat_free(&res.conc);
        daemon_cleanup(&d, r < 0 || res.o.keep_log);
        return r < 0 || res.seq.errors || res.conc.errors || res.m.r[0].streams_failed ||
               res.m.r[1].streams_failed || res.moed_exit != 0;
}
