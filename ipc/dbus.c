/* dbus.c: the D-Bus door. org.moed.Engine1 and its request objects on
 * sd-bus, attached to the main loop: bus calls become front_submit calls,
 * the front's output becomes unicast signals (Chat) or a late reply
 * (Complete). Identity comes from the bus; admin calls ask polkit. */
#include "dbus.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cleanup.h"
#include "moed-config.h"

#define DBUS_NAME "org.moed.Engine1"
#define DBUS_PATH "/org/moed/Engine1"
#define DBUS_IFACE "org.moed.Engine1"
#define DBUS_REQ_IFACE "org.moed.Request1"
#define DBUS_REQ_PREFIX DBUS_PATH "/request/"
#define POLKIT_ACTION "org.moed.manage"

/* A bus client with requests running: one NameOwnerChanged match per
 * client rather than per request, because the bus limits match rules per
 * connection (512 on the system bus). */
struct dbus_peer {
        struct dbus_door *d;
        struct dbus_peer *prev, *next;
        char *name;               /* unique name, ":1.42" */
        unsigned refs;            /* requests of this peer */
        sd_bus_slot *match;       /* NameOwnerChanged arg0=name */
        sd_bus_slot *probe;       /* GetNameOwner after the match is placed */
};

/* One Chat or Complete in flight. */
struct dbus_req {
        struct dbus_door *d;
        struct dbus_req *prev, *next;
        struct dbus_peer *peer;   /* the caller */
        struct front_req *q;
        char path[64];            /* Chat: the request object */
        sd_bus_slot *object;      /* Chat: its vtable */
        char *model, *id;
        sd_bus_message *call;     /* Complete: the call to answer when done */
        char *text;               /* Complete: the answer so far */
        size_t len, cap;
};

/* An admin call waiting for polkit. */
struct dbus_auth {
        struct dbus_door *d;
        struct dbus_auth *prev, *next;
        sd_bus_message *call;
        sd_bus_slot *slot;
        int (*then)(struct dbus_door *d, sd_bus_message *call);
};

struct dbus_door {
        sd_bus *bus;
        struct front *f;
        struct dbus_door_config cfg;
        struct dbus_admin_ops ops;
        void *ops_ud;
        sd_bus_slot *engine;      /* the main object's vtable */
        uint64_t next_req;
        struct dbus_req *reqs;
        struct dbus_peer *peers;
        struct dbus_auth *auths;
};

#define LIST_PUSH(head, x) do {                 \
        (x)->prev = NULL;                       \
        (x)->next = (head);                     \
        if (head)                               \
                (head)->prev = (x);             \
        (head) = (x);                           \
} while (0)
#define LIST_DROP(head, x) do {                 \
        if ((x)->prev)                          \
                (x)->prev->next = (x)->next;    \
        else                                    \
                (head) = (x)->next;             \
        if ((x)->next)                          \
                (x)->next->prev = (x)->prev;    \
        (x)->prev = (x)->next = NULL;           \
} while (0)

/* ---- replies and text ---- */

static int reply_front_error(sd_bus_error *ret, const struct front_error *fe)
{
        const char *name = fe->dbus_name ? fe->dbus_name : FRONT_ERR_FAILED;
        const char *msg = fe->oai.message[0] ? fe->oai.message : "request refused";

        /* D-Bus has no Retry-After header: the hint goes in the message. */
        if (fe->retry_after_s > 0)
                return sd_bus_error_setf(ret, name, "%s (retry in %d s)", msg,
                                         fe->retry_after_s);
        return sd_bus_error_setf(ret, name, "%s", msg);
}

__attribute__((format(printf, 2, 3)))
static int reply_invalid(sd_bus_error *ret, const char *fmt, ...)
{
        va_list ap;
        int r;

        va_start(ap, fmt);
        r = sd_bus_error_setfv(ret, FRONT_ERR_INVALID, fmt, ap);
        va_end(ap);
        return r;
}

/* The length of the well-formed UTF-8 sequence at s (n bytes left), or 0;
 * *ok tells whether sd-bus accepts it in a string: no NUL, no surrogate,
 * nothing past U+10FFFF, none of the noncharacters systemd refuses. */
static size_t utf8_seq(const unsigned char *s, size_t n, bool *ok)
{
        static const uint32_t min_cp[5] = { 0, 0, 0x80, 0x800, 0x10000 };
        uint32_t cp;
        size_t len;

        if (s[0] < 0x80) {
                *ok = s[0] != 0;
                return 1;
        }
        if ((s[0] & 0xe0) == 0xc0) {
                len = 2;
                cp = s[0] & 0x1f;
        } else if ((s[0] & 0xf0) == 0xe0) {
                len = 3;
                cp = s[0] & 0x0f;
        } else if ((s[0] & 0xf8) == 0xf0) {
                len = 4;
                cp = s[0] & 0x07;
        } else {
                return 0;
        }
        if (len > n)
                return 0;
        for (size_t i = 1; i < len; i++) {
                if ((s[i] & 0xc0) != 0x80)
                        return 0;
                cp = cp << 6 | (s[i] & 0x3f);
        }
        if (cp < min_cp[len]) /* overlong */
                return 0;
        *ok = cp <= 0x10ffff && !(cp >= 0xd800 && cp <= 0xdfff) &&
              !(cp >= 0xfdd0 && cp <= 0xfdef) && (cp & 0xfffe) != 0xfffe;
        return len;
}

/* A NUL-terminated copy of the text that is a valid D-Bus string: the
 * engine hands out whole characters, but a model may still produce what
 * the bus refuses (NUL, noncharacters, stray bytes); each such character
 * or byte becomes U+FFFD. */
static char *bus_string(const char *s, size_t n)
{
        char *out = malloc(n * 3 + 1);
        size_t o = 0, l;
        bool ok;

        if (!out)
                return NULL;
        for (size_t i = 0; i < n; i += l) {
                ok = false;
                l = utf8_seq((const unsigned char *)s + i, n - i, &ok);
                if (l == 0)
                        l = 1;
                if (ok) {
                        memcpy(out + o, s + i, l);
                        o += l;
                } else {
                        memcpy(out + o, "\xef\xbf\xbd", 3);
                        o += 3;
                }
        }
        out[o] = 0;
        return out;
}

/* ---- identity ---- */

struct dbus_caller {
        sd_bus_creds *creds;
        struct front_caller c;
};

static void caller_done(struct dbus_caller *c)
{
        sd_bus_creds_unref(c->creds);
        c->creds = NULL;
}

/* The sender's uid, gid, pid and groups. The euid comes from the bus
 * itself. dbus-daemon does not report groups, so sd-bus reads them from
 * /proc/PID; they are used only when that process's real uid is the
 * caller's, so a recycled pid cannot lend a stranger its groups. */
static int caller_get(sd_bus_message *m, struct dbus_caller *out, sd_bus_error *ret)
{
        const uint64_t mask = SD_BUS_CREDS_EUID | SD_BUS_CREDS_UID | SD_BUS_CREDS_EGID |
                              SD_BUS_CREDS_PID | SD_BUS_CREDS_SUPPLEMENTARY_GIDS;
        const gid_t *groups = NULL;
        uid_t euid, ruid;
        gid_t gid;
        pid_t pid;
        int r;

        *out = (struct dbus_caller){ .c = { .door = FRONT_DBUS, .gid = (gid_t)-1 } };
        r = sd_bus_query_sender_creds(m, mask | SD_BUS_CREDS_AUGMENT, &out->creds);
        if (r < 0)
                return sd_bus_error_setf(ret, FRONT_ERR_ACCESS,
                                         "cannot read the caller's credentials: %s",
                                         strerror(-r));
        if ((sd_bus_creds_get_augmented_mask(out->creds) & SD_BUS_CREDS_EUID) ||
            sd_bus_creds_get_euid(out->creds, &euid) < 0) {
                caller_done(out);
                return sd_bus_error_setf(ret, FRONT_ERR_ACCESS,
                                         "the bus did not say who the caller is");
        }
        out->c.uid = euid;
        if (sd_bus_creds_get_pid(out->creds, &pid) >= 0)
                out->c.pid = pid;
        if (sd_bus_creds_get_uid(out->creds, &ruid) < 0 || ruid != euid)
                return 0;
        if (sd_bus_creds_get_egid(out->creds, &gid) >= 0)
                out->c.gid = gid;
        r = sd_bus_creds_get_supplementary_gids(out->creds, &groups);
        if (r > 0) {
                out->c.groups = groups;
                out->c.n_groups = (size_t)r;
        }
        return 0;
}

/* caller_get, then the tenant check every non-admin method makes. */
static int caller_identify(struct dbus_door *d, sd_bus_message *m, struct dbus_caller *out,
                           sd_bus_error *ret)
{
        struct front_error fe = { 0 };
        int r = caller_get(m, out, ret);

        if (r < 0)
                return r;
        if (!front_identify(d->f, &out->c, &fe)) {
                caller_done(out);
                return reply_front_error(ret, &fe);
        }
        return 0;
}

/* ---- peers: noticing a caller that leaves the bus ---- */

static void req_abandon(struct dbus_req *q);

static void peer_gone(struct dbus_door *d, const char *name)
{
        struct dbus_req *q = d->reqs, *next;

        /* name must not be the peer's own string: abandoning its last
         * request frees the peer. */
        while (q) {
                next = q->next;
                if (strcmp(q->peer->name, name) == 0)
                        req_abandon(q); /* frees q alone, so next stays valid */
                q = next;
        }
}

static int on_name_owner_changed(sd_bus_message *m, void *ud, sd_bus_error *ret)
{
        struct dbus_peer *p = ud;
        const char *name, *old_owner, *new_owner;
        _cleanup_free_ char *copy = NULL;

        if (sd_bus_message_read(m, "sss", &name, &old_owner, &new_owner) < 0)
                return 0;
        if (strcmp(name, p->name) != 0 || new_owner[0])
                return 0;
        copy = strdup(name);
        if (copy)
                peer_gone(p->d, copy);
        return 0;
}

/* The match is placed before this call reaches the bus (the bus handles
 * our messages in order), so a peer that left before the match existed is
 * seen here and one that leaves later is seen by the match. */
static int on_name_probe(sd_bus_message *m, void *ud, sd_bus_error *ret)
{
        struct dbus_peer *p = ud;
        _cleanup_free_ char *copy = NULL;

        p->probe = sd_bus_slot_unref(p->probe);
        if (!sd_bus_message_is_method_error(m, NULL))
                return 0;
        copy = strdup(p->name);
        if (copy)
                peer_gone(p->d, copy);
        return 0;
}

static void peer_unref(struct dbus_peer *p)
{
        if (!p || --p->refs > 0)
                return;
        LIST_DROP(p->d->peers, p);
        sd_bus_slot_unref(p->match);
        sd_bus_slot_unref(p->probe);
        free(p->name);
        free(p);
}

static int peer_ref(struct dbus_door *d, const char *name, struct dbus_peer **out)
{
        _cleanup_free_ char *match = NULL;
        struct dbus_peer *p;
        int r;

        for (p = d->peers; p; p = p->next) {
                if (strcmp(p->name, name) == 0) {
                        p->refs++;
                        *out = p;
                        return 0;
                }
        }
        p = calloc(1, sizeof(*p));
        if (!p || !(p->name = strdup(name)))
                goto oom;
        p->d = d;
        p->refs = 1;
        if (asprintf(&match, "type='signal',sender='org.freedesktop.DBus',"
                     "path='/org/freedesktop/DBus',interface='org.freedesktop.DBus',"
                     "member='NameOwnerChanged',arg0='%s'", name) < 0) {
                match = NULL;
                goto oom;
        }
        r = sd_bus_add_match_async(d->bus, &p->match, match, on_name_owner_changed, NULL, p);
        if (r >= 0)
                r = sd_bus_call_method_async(d->bus, &p->probe, "org.freedesktop.DBus",
                                             "/org/freedesktop/DBus", "org.freedesktop.DBus",
                                             "GetNameOwner", on_name_probe, p, "s", name);
        if (r < 0) {
                sd_bus_slot_unref(p->match);
                sd_bus_slot_unref(p->probe);
                free(p->name);
                free(p);
                return r;
        }
        LIST_PUSH(d->peers, p);
        *out = p;
        return 0;
oom:
        if (p)
                free(p->name);
        free(p);
        return -ENOMEM;
}

/* ---- requests ---- */

static void req_free(struct dbus_req *q)
{
        struct dbus_door *d = q->d;

        LIST_DROP(d->reqs, q);
        sd_bus_slot_unref(q->object);
        sd_bus_message_unref(q->call);
        peer_unref(q->peer);
        free(q->model);
        free(q->id);
        free(q->text);
        free(q);
}

static void req_abandon(struct dbus_req *q)
{
        if (q->q)
                front_abandon(q->q);
        q->q = NULL;
        req_free(q);
}

static int req_signal(struct dbus_req *q, const char *member, const char *types, ...)
{
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *s = NULL;
        va_list ap;
        int r;

        r = sd_bus_message_new_signal(q->d->bus, &s, q->path, DBUS_REQ_IFACE, member);
        if (r < 0)
                return r;
        /* Unicast: only the caller that started the request sees it. */
        r = sd_bus_message_set_destination(s, q->peer->name);
        if (r < 0)
                return r;
        va_start(ap, types);
        r = sd_bus_message_appendv(s, types, ap);
        va_end(ap);
        if (r < 0)
                return r;
        return sd_bus_send(q->d->bus, s, NULL);
}

static void sink_text(void *ud, const char *s, size_t n)
{
        struct dbus_req *q = ud;

        if (n == 0)
                return;
        if (q->call) {
                if (q->len + n + 1 > q->cap) {
                        size_t cap = MO_MAX(q->cap * 2, q->len + n + 1);
                        char *t = realloc(q->text, MO_MAX(cap, (size_t)256));
                        if (!t) {
                                front_cancel(q->q, "out of memory");
                                return;
                        }
                        q->text = t;
                        q->cap = MO_MAX(cap, (size_t)256);
                }
                memcpy(q->text + q->len, s, n);
                q->len += n;
                q->text[q->len] = 0;
                return;
        }
        _cleanup_free_ char *t = bus_string(s, n);
        if (!t || req_signal(q, "Token", "s", t) < 0)
                front_cancel(q->q, "cannot send to the bus");
}

static void sink_finished(void *ud, const char *reason, const char *why,
                          const struct oai_usage *u)
{
        struct dbus_req *q = ud;
        uint64_t pt = u && u->prompt_tokens > 0 ? (uint64_t)u->prompt_tokens : 0;
        uint64_t ct = u && u->completion_tokens > 0 ? (uint64_t)u->completion_tokens : 0;
        _cleanup_free_ char *detail = why ? bus_string(why, strlen(why)) : NULL;

        q->q = NULL; /* the front frees it when we return */
        if (q->call) {
                _cleanup_free_ char *text = bus_string(q->text ? q->text : "", q->len);
                if (strcmp(reason, "error") == 0 || !text)
                        sd_bus_reply_method_errorf(q->call, FRONT_ERR_FAILED, "%s",
                                                   detail ? detail : "the engine failed");
                else
                        sd_bus_reply_method_return(q->call, "sstt", text, reason, pt, ct);
        } else {
                req_signal(q, "Finished", "stts", reason, pt, ct, detail ? detail : "");
        }
        req_free(q);
}

static const struct front_sink dbus_sink = {
        .text = sink_text,
        .finished = sink_finished,
};

static int req_cancel(sd_bus_message *m, void *ud, sd_bus_error *ret)
{
        struct dbus_req *q = ud;
        const char *sender = sd_bus_message_get_sender(m);

        if (!sender || strcmp(sender, q->peer->name) != 0)
                return sd_bus_error_setf(ret, FRONT_ERR_ACCESS,
                                         "only the caller that started %s may cancel it",
                                         q->path);
        if (q->q)
                front_cancel(q->q, "cancelled by the caller");
        return sd_bus_reply_method_return(m, NULL);
}

static int req_get_string(sd_bus *bus, const char *path, const char *iface, const char *prop,
                          sd_bus_message *reply, void *ud, sd_bus_error *ret)
{
        struct dbus_req *q = ud;

        return sd_bus_message_append(reply, "s", strcmp(prop, "Model") == 0 ? q->model : q->id);
}

static const sd_bus_vtable request_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_METHOD_WITH_ARGS("Cancel", SD_BUS_NO_ARGS, SD_BUS_NO_RESULT, req_cancel,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_SIGNAL_WITH_ARGS("Token", SD_BUS_ARGS("s", text), 0),
        SD_BUS_SIGNAL_WITH_ARGS("Finished",
                                SD_BUS_ARGS("s", reason, "t", prompt_tokens,
                                            "t", completion_tokens, "s", detail), 0),
        SD_BUS_PROPERTY("Model", "s", req_get_string, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Id", "s", req_get_string, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_VTABLE_END,
};

/* ---- reading Chat and Complete arguments ---- */

struct chat_args {
        struct oai_request r;
        struct oai_message *msgs;
        const char **stops;
};

static void chat_args_done(struct chat_args *a)
{
        free(a->msgs);
        free(a->stops);
}

static int read_messages(sd_bus_message *m, const struct oai_limits *lim, struct chat_args *a,
                         sd_bus_error *ret)
{
        const char *role, *content;
        size_t cap = 0;
        int r;

        r = sd_bus_message_enter_container(m, 'a', "(ss)");
        if (r < 0)
                return r;
        while ((r = sd_bus_message_read(m, "(ss)", &role, &content)) > 0) {
                if (strcmp(role, "system") != 0 && strcmp(role, "user") != 0 &&
                    strcmp(role, "assistant") != 0)
                        return sd_bus_error_setf(ret, FRONT_ERR_INVALID,
                                                 "messages[%zu].role: '%s' is not one of "
                                                 "system, user, assistant",
                                                 a->r.n_messages, role);
                if (a->r.n_messages >= lim->max_messages)
                        return sd_bus_error_setf(ret, FRONT_ERR_INVALID,
                                                 "messages: more than %zu", lim->max_messages);
                if (a->r.n_messages == cap) {
                        cap = cap ? cap * 2 : 8;
                        struct oai_message *n = realloc(a->msgs, cap * sizeof(*n));
                        if (!n)
                                return -ENOMEM;
                        a->msgs = n;
                }
                /* The strings live in m, which outlives front_submit. */
                a->msgs[a->r.n_messages++] = (struct oai_message){
                        .role = (char *)role,
                        .content = (char *)content,
                };
        }
        if (r < 0)
                return r;
        if (a->r.n_messages == 0)
                return reply_invalid(ret, "%s: at least one message is needed", "messages");
        a->r.messages = a->msgs;
        return sd_bus_message_exit_container(m);
}

/* An integer option of any of the listed D-Bus integer types. */
static int read_int(sd_bus_message *m, char type, const char *key, int64_t *v, bool *neg_ok,
                    sd_bus_error *ret)
{
        int32_t i;
        uint32_t u;
        int64_t x;
        uint64_t t;
        int r;

        switch (type) {
        case 'i':
                r = sd_bus_message_read_basic(m, 'i', &i);
                *v = i;
                break;
        case 'u':
                r = sd_bus_message_read_basic(m, 'u', &u);
                *v = u;
                break;
        case 'x':
                r = sd_bus_message_read_basic(m, 'x', &x);
                *v = x;
                break;
        case 't':
                r = sd_bus_message_read_basic(m, 't', &t);
                if (r >= 0 && t > INT64_MAX)
                        return reply_invalid(ret, "%s: value out of range", key);
                *v = (int64_t)t;
                break;
        default:
                return reply_invalid(ret, "%s: wrong type", key);
        }
        if (r < 0)
                return r;
        if (*v < 0 && !*neg_ok)
                return reply_invalid(ret, "%s: must not be negative", key);
        return 0;
}

/* A double option within lo..hi (OpenAI's bounds where it has any; the
 * sampler checks the rest). */
static int read_double(sd_bus_message *m, char type, const char *key, double lo, double hi,
                       float *out, sd_bus_error *ret)
{
        double v;
        int r;

        if (type != 'd')
                return reply_invalid(ret, "%s: wrong type, expected a double (d)", key);
        r = sd_bus_message_read_basic(m, 'd', &v);
        if (r < 0)
                return r;
        if (!(v >= lo && v <= hi)) /* NaN too */
                return reply_invalid(ret, "%s must be in [%g, %g], got %g", key, lo, hi, v);
        *out = (float)v;
        return 0;
}

static int read_stops(sd_bus_message *m, const char *contents, const struct oai_limits *lim,
                      struct chat_args *a, sd_bus_error *ret)
{
        const char *s;
        int r;

        if (strcmp(contents, "as") != 0)
                return reply_invalid(ret, "%s: wrong type, expected strings (as)", "stop");
        r = sd_bus_message_enter_container(m, 'a', "s");
        if (r < 0)
                return r;
        free(a->stops);
        a->stops = calloc(lim->max_stops ? lim->max_stops : 1, sizeof(*a->stops));
        if (!a->stops)
                return -ENOMEM;
        a->r.n_stop = 0;
        while ((r = sd_bus_message_read_basic(m, 's', &s)) > 0) {
                if (a->r.n_stop >= lim->max_stops)
                        return sd_bus_error_setf(ret, FRONT_ERR_INVALID,
                                                 "stop: more than %zu strings", lim->max_stops);
                if (strlen(s) > lim->max_stop_len)
                        return sd_bus_error_setf(ret, FRONT_ERR_INVALID,
                                                 "stop[%zu]: longer than %zu bytes",
                                                 a->r.n_stop, lim->max_stop_len);
                a->stops[a->r.n_stop++] = s;
        }
        if (r < 0)
                return r;
        a->r.stop = (char **)a->stops;
        return sd_bus_message_exit_container(m);
}

/* One entry of the options dictionary; the variant is entered. */
static int read_option(sd_bus_message *m, const char *key, const char *contents,
                       const struct oai_limits *lim, struct chat_args *a, sd_bus_error *ret)
{
        struct sampler_params *p = &a->r.sampling;
        char type = strlen(contents) == 1 ? contents[0] : 0;
        bool neg_ok = false;
        int64_t v;
        int r;

        if (strcmp(key, "max_tokens") == 0) {
                r = read_int(m, type, key, &v, &neg_ok, ret);
                if (r < 0)
                        return r;
                if (v < 1 || v > lim->max_tokens_cap)
                        return sd_bus_error_setf(ret, FRONT_ERR_INVALID,
                                                 "max_tokens: must be 1 to %" PRId64,
                                                 lim->max_tokens_cap);
                a->r.max_tokens = v;
        } else if (strcmp(key, "temperature") == 0) {
                return read_double(m, type, key, 0, 2, &p->temperature, ret);
        } else if (strcmp(key, "top_p") == 0) {
                return read_double(m, type, key, -1e6, 1e6, &p->top_p, ret);
        } else if (strcmp(key, "min_p") == 0) {
                return read_double(m, type, key, -1e6, 1e6, &p->min_p, ret);
        } else if (strcmp(key, "presence_penalty") == 0) {
                return read_double(m, type, key, -1e6, 1e6, &p->presence_penalty, ret);
        } else if (strcmp(key, "frequency_penalty") == 0) {
                return read_double(m, type, key, -1e6, 1e6, &p->frequency_penalty, ret);
        } else if (strcmp(key, "repetition_penalty") == 0) {
                return read_double(m, type, key, -1e6, 1e6, &p->repeat_penalty, ret);
        } else if (strcmp(key, "top_k") == 0) {
                /* -1 is vLLM's "off", as on the HTTP door */
                neg_ok = true;
                if (type != 'i' && type != 'u')
                        return reply_invalid(ret, "%s: wrong type, expected i or u", key);
                r = read_int(m, type, key, &v, &neg_ok, ret);
                if (r < 0)
                        return r;
                if (v < -1 || v > INT32_MAX)
                        return reply_invalid(ret, "top_k must be -1 (off) or more, got %" PRId64,
                                             v);
                p->top_k = (int32_t)v;
        } else if (strcmp(key, "seed") == 0) {
                neg_ok = true;
                if (type == 't') {
                        r = sd_bus_message_read_basic(m, 't', &p->seed);
                        if (r < 0)
                                return r;
                } else {
                        r = read_int(m, type, key, &v, &neg_ok, ret);
                        if (r < 0)
                                return r;
                        p->seed = (uint64_t)v;
                }
                a->r.has_seed = true;
        } else if (strcmp(key, "stop") == 0) {
                return read_stops(m, contents, lim, a, ret);
        } else {
                return reply_invalid(ret, "unknown option '%s'", key);
        }
        return 0;
}

static int read_options(sd_bus_message *m, const struct oai_limits *lim, struct chat_args *a,
                        sd_bus_error *ret)
{
        const char *key, *contents;
        char type;
        int r;

        r = sd_bus_message_enter_container(m, 'a', "{sv}");
        if (r < 0)
                return r;
        while ((r = sd_bus_message_enter_container(m, 'e', "sv")) > 0) {
                r = sd_bus_message_read_basic(m, 's', &key);
                if (r < 0)
                        return r;
                r = sd_bus_message_peek_type(m, &type, &contents);
                if (r < 0)
                        return r;
                r = sd_bus_message_enter_container(m, 'v', contents);
                if (r < 0)
                        return r;
                r = read_option(m, key, contents, lim, a, ret);
                if (r < 0)
                        return r;
                r = sd_bus_message_exit_container(m);
                if (r < 0)
                        return r;
                r = sd_bus_message_exit_container(m);
                if (r < 0)
                        return r;
        }
        if (r < 0)
                return r;
        return sd_bus_message_exit_container(m);
}

/* (s model, a(ss) messages, a{sv} options) into an oai_request with
 * OpenAI's defaults, as the HTTP door makes one. Strings point into m. */
static int read_chat_args(sd_bus_message *m, struct chat_args *a, sd_bus_error *ret)
{
        struct oai_limits lim;
        struct moerr e = { { 0 } };
        const char *model;
        int r;

        oai_limits_default(&lim);
        *a = (struct chat_args){ .r = { .kind = OAI_CHAT, .max_tokens = -1 } };
        sampler_params_default(&a->r.sampling);
        a->r.sampling.temperature = 1.0f;
        a->r.sampling.top_p = 1.0f;

        r = sd_bus_message_read_basic(m, 's', &model);
        if (r < 0)
                return r;
        if (!model[0])
                return reply_invalid(ret, "%s: must not be empty", "model");
        a->r.model = (char *)model;
        r = read_messages(m, &lim, a, ret);
        if (r < 0)
                return r;
        r = read_options(m, &lim, a, ret);
        if (r < 0)
                return r;
        if (sampler_params_check(&a->r.sampling, &e) < 0)
                return sd_bus_error_setf(ret, FRONT_ERR_INVALID, "%s", e.msg);
        return 0;
}

/* Reads the arguments, starts the request and tracks its caller. For
 * Chat (complete false) the request object is registered too. */
static int start_request(struct dbus_door *d, sd_bus_message *m, bool complete,
                         struct dbus_req **out, sd_bus_error *ret)
{
        _cleanup_(chat_args_done) struct chat_args a = { 0 };
        struct dbus_caller who = { 0 };
        struct front_error fe = { 0 };
        struct dbus_req *q;
        int r;

        if (!sd_bus_message_get_sender(m))
                return sd_bus_error_setf(ret, FRONT_ERR_ACCESS, "the caller has no bus name");
        r = read_chat_args(m, &a, ret);
        if (r < 0)
                return r;
        r = caller_get(m, &who, ret);
        if (r < 0)
                return r;
        q = calloc(1, sizeof(*q));
        if (!q) {
                caller_done(&who);
                return -ENOMEM;
        }
        q->d = d;
        LIST_PUSH(d->reqs, q);
        snprintf(q->path, sizeof(q->path), DBUS_REQ_PREFIX "%" PRIu64, ++d->next_req);
        if (complete)
                q->call = sd_bus_message_ref(m);
        r = peer_ref(d, sd_bus_message_get_sender(m), &q->peer);
        if (r < 0)
                goto fail;
        r = front_submit(d->f, &who.c, &a.r, &dbus_sink, q, &q->q, &fe);
        caller_done(&who);
        if (r < 0) {
                req_free(q);
                return reply_front_error(ret, &fe);
        }
        q->model = strdup(front_req_model(q->q));
        q->id = strdup(front_req_id(q->q));
        if (!q->model || !q->id) {
                r = -ENOMEM;
                goto fail;
        }
        if (!complete) {
                r = sd_bus_add_object_vtable(d->bus, &q->object, q->path, DBUS_REQ_IFACE,
                                             request_vtable, q);
                if (r < 0)
                        goto fail;
        }
        *out = q;
        return 0;
fail:
        caller_done(&who);
        req_abandon(q);
        return r;
}

/* ---- org.moed.Engine1 methods ---- */

static int m_chat(sd_bus_message *m, void *ud, sd_bus_error *ret)
{
        struct dbus_door *d = ud;
        struct dbus_req *q;
        int r;

        r = start_request(d, m, false, &q, ret);
        if (r < 0)
                return r;
        r = sd_bus_reply_method_return(m, "o", q->path);
        if (r < 0)
                req_abandon(q);
        return r;
}

static int m_complete(sd_bus_message *m, void *ud, sd_bus_error *ret)
{
        struct dbus_req *q;
        int r;

        /* Answered from sink_finished; returning 1 tells sd-bus a reply
         * will come later. */
        r = start_request(ud, m, true, &q, ret);
        return r < 0 ? r : 1;
}

static uint64_t json_u64(json_t *o, const char *key)
{
        json_int_t v = json_integer_value(json_object_get(o, key));
        return v > 0 ? (uint64_t)v : 0;
}

static const char *json_str(json_t *o, const char *key)
{
        const char *s = json_string_value(json_object_get(o, key));
        return s ? s : "";
}

static int m_list_models(sd_bus_message *m, void *ud, sd_bus_error *ret)
{
        struct dbus_door *d = ud;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        _cleanup_(json_decrefp) json_t *j = NULL;
        struct dbus_caller who;
        size_t i;
        json_t *e;
        int r;

        r = caller_identify(d, m, &who, ret);
        if (r < 0)
                return r;
        caller_done(&who);
        /* [{"id", "name", "context", "weight_bytes"}], as /v1/moed/status
         * lists them */
        j = front_models(d->f);
        if (!json_is_array(j))
                return sd_bus_error_setf(ret, FRONT_ERR_FAILED, "cannot list the models");
        r = sd_bus_message_new_method_return(m, &reply);
        if (r < 0)
                return r;
        r = sd_bus_message_open_container(reply, 'a', "(sstt)");
        if (r < 0)
                return r;
        json_array_foreach(j, i, e) {
                r = sd_bus_message_append(reply, "(sstt)", json_str(e, "id"),
                                          json_str(e, "name"), json_u64(e, "context"),
                                          json_u64(e, "weight_bytes"));
                if (r < 0)
                        return r;
        }
        r = sd_bus_message_close_container(reply);
        if (r < 0)
                return r;
        return sd_bus_send(NULL, reply, NULL);
}

static int reply_json(sd_bus_message *m, json_t *j, sd_bus_error *ret)
{
        _cleanup_free_ char *s = json_dumps(j, JSON_COMPACT);

        if (!s)
                return sd_bus_error_setf(ret, FRONT_ERR_FAILED, "cannot write the report");
        return sd_bus_reply_method_return(m, "s", s);
}

static int m_get_status(sd_bus_message *m, void *ud, sd_bus_error *ret)
{
        struct dbus_door *d = ud;
        _cleanup_(json_decrefp) json_t *j = NULL;
        struct dbus_caller who;
        int r;

        r = caller_identify(d, m, &who, ret);
        if (r < 0)
                return r;
        caller_done(&who);
        j = front_status(d->f);
        return reply_json(m, j, ret);
}

static int m_get_usage(sd_bus_message *m, void *ud, sd_bus_error *ret)
{
        struct dbus_door *d = ud;
        _cleanup_(json_decrefp) json_t *j = NULL;
        struct front_error fe = { 0 };
        struct dbus_caller who;
        int r;

        r = caller_get(m, &who, ret);
        if (r < 0)
                return r;
        j = front_usage(d->f, &who.c, &fe);
        caller_done(&who);
        if (!j)
                return reply_front_error(ret, &fe);
        return reply_json(m, j, ret);
}

/* ---- admin: polkit ---- */

static void auth_free(struct dbus_auth *a)
{
        LIST_DROP(a->d->auths, a);
        sd_bus_slot_unref(a->slot);
        sd_bus_message_unref(a->call);
        free(a);
}

static int on_polkit_reply(sd_bus_message *reply, void *ud, sd_bus_error *unused)
{
        struct dbus_auth *a = ud;
        const sd_bus_error *err = sd_bus_message_get_error(reply);
        int authorized = 0, challenge = 0;

        if (err) {
                sd_bus_reply_method_errorf(a->call, FRONT_ERR_ACCESS,
                                           "cannot ask polkit for %s: %s", POLKIT_ACTION,
                                           err->message ? err->message : err->name);
        } else if (sd_bus_message_enter_container(reply, 'r', "bba{ss}") < 0 ||
                   sd_bus_message_read(reply, "bb", &authorized, &challenge) < 0) {
                sd_bus_reply_method_errorf(a->call, FRONT_ERR_ACCESS,
                                           "polkit sent an unreadable answer");
        } else if (!authorized) {
                sd_bus_reply_method_errorf(a->call, FRONT_ERR_ACCESS,
                                           "not authorized for %s%s", POLKIT_ACTION,
                                           challenge ? " (authentication needed)" : "");
        } else {
                a->then(a->d, a->call);
        }
        auth_free(a);
        return 0;
}

/* Runs then(d, m) now for uid 0 and the per-user owner, else after polkit
 * says yes (then replies to m itself). Returns 1 when the reply is left
 * for later, or a negative errno with ret set. */
static int admin_check(struct dbus_door *d, sd_bus_message *m,
                       int (*then)(struct dbus_door *d, sd_bus_message *call),
                       sd_bus_error *ret)
{
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *q = NULL;
        /* AllowUserInteraction only when the caller allows it, as the
         * D-Bus header flag is meant to be used (busctl sets it). */
        uint32_t flags = sd_bus_message_get_allow_interactive_authorization(m) > 0 ? 1 : 0;
        struct dbus_caller who;
        struct dbus_auth *a;
        uid_t uid;
        int r;

        r = caller_get(m, &who, ret);
        if (r < 0)
                return r;
        uid = who.c.uid;
        caller_done(&who);
        if (uid == 0 || (d->cfg.user_bus && uid == d->cfg.owner_uid))
                return then(d, m);

        r = sd_bus_message_new_method_call(d->bus, &q, "org.freedesktop.PolicyKit1",
                                           "/org/freedesktop/PolicyKit1/Authority",
                                           "org.freedesktop.PolicyKit1.Authority",
                                           "CheckAuthorization");
        if (r < 0)
                return r;
        /* Subject: the caller's bus name, so polkit checks the very
         * connection; no details; no cancellation id. */
        r = sd_bus_message_append(q, "(sa{sv})sa{ss}us", "system-bus-name", 1, "name", "s",
                                  sd_bus_message_get_sender(m), POLKIT_ACTION, 0, flags, "");
        if (r < 0)
                return r;
        a = calloc(1, sizeof(*a));
        if (!a)
                return -ENOMEM;
        a->d = d;
        a->then = then;
        a->call = sd_bus_message_ref(m);
        LIST_PUSH(d->auths, a);
        r = sd_bus_call_async(d->bus, &a->slot, q, on_polkit_reply, a, 0);
        if (r < 0) {
                auth_free(a);
                return sd_bus_error_setf(ret, FRONT_ERR_ACCESS, "cannot ask polkit: %s",
                                         strerror(-r));
        }
        return 1;
}

static int do_reload(struct dbus_door *d, sd_bus_message *call)
{
        struct moerr e = { { 0 } };
        int r;

        if (!d->ops.reload)
                return sd_bus_reply_method_errorf(call, FRONT_ERR_FAILED,
                                                  "reload is not available");
        r = d->ops.reload(d->ops_ud, &e);
        if (r < 0)
                return sd_bus_reply_method_errorf(call, FRONT_ERR_FAILED, "reload failed: %s",
                                                  e.msg[0] ? e.msg : strerror(-r));
        return sd_bus_reply_method_return(call, NULL);
}

static int m_reload(sd_bus_message *m, void *ud, sd_bus_error *ret)
{
        return admin_check(ud, m, do_reload, ret);
}

/* ---- properties ---- */

static int p_version(sd_bus *bus, const char *path, const char *iface, const char *prop,
                     sd_bus_message *reply, void *ud, sd_bus_error *ret)
{
        return sd_bus_message_append(reply, "s", MOED_VERSION);
}

static int p_state(sd_bus *bus, const char *path, const char *iface, const char *prop,
                   sd_bus_message *reply, void *ud, sd_bus_error *ret)
{
        struct dbus_door *d = ud;
        _cleanup_(json_decrefp) json_t *j = front_status(d->f);
        const char *s = json_string_value(json_object_get(j, "state"));

        return sd_bus_message_append(reply, "s", s ? s : "serving");
}

static int p_models(sd_bus *bus, const char *path, const char *iface, const char *prop,
                    sd_bus_message *reply, void *ud, sd_bus_error *ret)
{
        struct dbus_door *d = ud;
        _cleanup_(json_decrefp) json_t *j = front_models(d->f);
        json_t *e;
        size_t i;
        int r;

        r = sd_bus_message_open_container(reply, 'a', "s");
        if (r < 0)
                return r;
        json_array_foreach(j, i, e) {
                r = sd_bus_message_append_basic(reply, 's', json_str(e, "id"));
                if (r < 0)
                        return r;
        }
        return sd_bus_message_close_container(reply);
}

static int p_active(sd_bus *bus, const char *path, const char *iface, const char *prop,
                    sd_bus_message *reply, void *ud, sd_bus_error *ret)
{
        struct dbus_door *d = ud;
        size_t n = front_active(d->f);

        return sd_bus_message_append(reply, "u", (uint32_t)MO_MIN(n, (size_t)UINT32_MAX));
}

static const sd_bus_vtable engine_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_METHOD_WITH_ARGS("ListModels", SD_BUS_NO_ARGS,
                                SD_BUS_RESULT("a(sstt)", models),
                                m_list_models, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Chat",
                                SD_BUS_ARGS("s", model, "a(ss)", messages, "a{sv}", options),
                                SD_BUS_RESULT("o", request),
                                m_chat, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Complete",
                                SD_BUS_ARGS("s", model, "a(ss)", messages, "a{sv}", options),
                                SD_BUS_RESULT("s", text, "s", finish_reason,
                                              "t", prompt_tokens, "t", completion_tokens),
                                m_complete, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("GetUsage", SD_BUS_NO_ARGS, SD_BUS_RESULT("s", json),
                                m_get_usage, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("GetStatus", SD_BUS_NO_ARGS, SD_BUS_RESULT("s", json),
                                m_get_status, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Reload", SD_BUS_NO_ARGS, SD_BUS_NO_RESULT,
                                m_reload, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_PROPERTY("Version", "s", p_version, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("State", "s", p_state, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Models", "as", p_models, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("ActiveRequests", "u", p_active, 0, 0),
        SD_BUS_VTABLE_END,
};

/* ---- the connection ---- */

static int bus_connect(const struct dbus_door_config *c, sd_bus **out)
{
        sd_bus *bus = NULL;
        int r;

        if (!c->address)
                return c->user_bus ? sd_bus_open_user(out) : sd_bus_open_system(out);
        r = sd_bus_new(&bus);
        if (r < 0)
                return r;
        r = sd_bus_set_address(bus, c->address);
        if (r >= 0)
                r = sd_bus_set_bus_client(bus, 1);
        if (r >= 0)
                r = sd_bus_start(bus);
        if (r < 0) {
                sd_bus_unref(bus);
                return r;
        }
        *out = bus;
        return 0;
}

int dbus_door_new(sd_event *ev, struct front *f, const struct dbus_door_config *c,
                  const struct dbus_admin_ops *ops, void *ops_ud, struct dbus_door **out,
                  struct moerr *e)
{
        const char *which = c->address ? c->address : c->user_bus ? "the session bus"
                                                                  : "the system bus";
        struct dbus_door *d;
        int r;

        d = calloc(1, sizeof(*d));
        if (!d)
                return moerr_set(e, -ENOMEM, "out of memory");
        d->f = f;
        d->cfg = *c;
        d->cfg.address = NULL; /* not kept: the caller's string */
        if (ops)
                d->ops = *ops;
        d->ops_ud = ops_ud;

        r = bus_connect(c, &d->bus);
        if (r < 0) {
                moerr_set(e, r, "cannot connect to %s: %s", which, strerror(-r));
                goto fail;
        }
        (void)sd_bus_set_description(d->bus, "moed");
        r = sd_bus_attach_event(d->bus, ev, SD_EVENT_PRIORITY_NORMAL);
        if (r < 0) {
                moerr_set(e, r, "cannot attach the bus to the event loop: %s", strerror(-r));
                goto fail;
        }
        r = sd_bus_add_object_vtable(d->bus, &d->engine, DBUS_PATH, DBUS_IFACE, engine_vtable, d);
        if (r < 0) {
                moerr_set(e, r, "cannot register %s: %s", DBUS_PATH, strerror(-r));
                goto fail;
        }
        /* Synchronous, once at start: a clear error beats a daemon that
         * runs without its name. */
        r = sd_bus_request_name(d->bus, DBUS_NAME, 0);
        if (r < 0) {
                if (r == -EEXIST)
                        moerr_set(e, r, "cannot own %s on %s: another process has it "
                                  "(is moed already running?)", DBUS_NAME, which);
                else if (r == -EACCES || r == -EPERM)
                        moerr_set(e, r, "cannot own %s on %s: the bus policy forbids it "
                                  "(is org.moed.Engine1.conf installed in "
                                  "/usr/share/dbus-1/system.d?)", DBUS_NAME, which);
                else
                        moerr_set(e, r, "cannot own %s on %s: %s", DBUS_NAME, which,
                                  strerror(-r));
                goto fail;
        }
        *out = d;
        return 0;
fail:
        dbus_door_free(d);
        return r;
}

void dbus_door_state_changed(struct dbus_door *d)
{
        if (!d || !d->bus)
                return;
        (void)sd_bus_emit_properties_changed(d->bus, DBUS_PATH, DBUS_IFACE, "State", "Models",
                                             NULL);
}

void dbus_door_free(struct dbus_door *d)
{
        if (!d)
                return;
        /* The daemon drains before this, so these are stragglers: tell
         * their callers rather than leave them waiting. */
        while (d->reqs) {
                struct dbus_req *q = d->reqs;
                if (q->call)
                        sd_bus_reply_method_errorf(q->call, FRONT_ERR_UNAVAILABLE,
                                                   "moed is shutting down");
                else if (q->object && q->q)
                        req_signal(q, "Finished", "stts", "cancelled",
                                   (uint64_t)MO_MAX(front_req_prompt_tokens(q->q), 0),
                                   (uint64_t)0, "moed is shutting down");
                req_abandon(q);
        }
        while (d->auths) {
                sd_bus_reply_method_errorf(d->auths->call, FRONT_ERR_UNAVAILABLE,
                                           "moed is shutting down");
                auth_free(d->auths);
        }
        sd_bus_slot_unref(d->engine);
        if (d->bus) {
                sd_bus_detach_event(d->bus);
                sd_bus_flush_close_unref(d->bus);
        }
        free(d);
}
