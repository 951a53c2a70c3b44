/* http: the HTTP/1.1 door on the Unix socket, OpenAI-compatible, served by
 * libmicrohttpd driven from the main sd-event loop (its epoll fd and
 * timeout are event sources; nothing here runs on another thread).
 *
 * Routes: POST /v1/chat/completions, POST /v1/completions (stream or not),
 * GET /v1/models, GET /v1/moed/status, GET /v1/moed/usage,
 * POST /v1/moed/tokenize, GET /health, GET /metrics. Every connection's
 * peer is read with SO_PEERCRED/SO_PEERGROUPS and mapped to a tenant by
 * front/. Limits: connections, header size, body size, JSON depth, idle
 * time; a client that leaves mid-request cancels it. */
#pragma once
#include <stddef.h>

#include <systemd/sd-event.h>

#include "common/moerr.h"
#include "ipc/front.h"
#include "ipc/openai.h"

struct http_door;

struct http_door_config {
        int listen_fd;            /* bound and listening (ours or systemd's) */
        unsigned max_connections;
        unsigned idle_timeout_s;  /* a connection silent this long is closed */
        size_t max_header_bytes;  /* request line + headers */
        struct oai_limits limits; /* body size, JSON depth, ... */
};

int http_door_new(sd_event *ev, struct front *f, const struct http_door_config *c,
                  struct http_door **out, struct moerr *e);
/* Stops accepting (drain); connections already open are served. The
 * listening socket stays open (it belongs to systemd when activated). */
void http_door_stop_accepting(struct http_door *h);
unsigned http_door_connections(struct http_door *h);
/* Requests in progress (a body being read, an answer not fully sent). */
size_t http_door_busy(struct http_door *h);
/* Closes every connection and frees the door. */
void http_door_free(struct http_door *h);
