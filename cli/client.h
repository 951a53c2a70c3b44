/* client: moectl's HTTP transport to moed's Unix socket (libcurl): plain
 * requests whose whole body is returned, and streamed requests whose
 * Server-Sent Events are handed over as they arrive. Knows nothing of the
 * API's JSON beyond what a transport must. */
#pragma once
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>

#include "common/moerr.h"

struct client;

struct client_reply {
        long status;            /* HTTP status; 0 when no answer came */
        char *body;             /* NUL-terminated; for a stream, only when it was refused */
        size_t len;
        long retry_after;       /* Retry-After in seconds, -1 when absent */
};
void client_reply_free(struct client_reply *r);

/* token: sent as "Authorization: Bearer TOKEN" when non-NULL. */
int client_new(const char *socket, const char *token, struct client **out, struct moerr *e);
void client_free(struct client *c);
const char *client_socket(const struct client *c);

/* GET when body is NULL, else POST with a JSON body. timeout_s 0: none.
 * 0 when moed answered (whatever the status: look at r->status);
 * -ENOENT no socket, -ECONNREFUSED nobody listening, -EACCES not allowed
 * to connect, -ETIMEDOUT, -EIO other transport failures (e says which). */
int client_request(struct client *c, const char *path, const char *body, long timeout_s,
                   struct client_reply *r, struct moerr *e);

/* Called with each event's data as it arrives; a negative return ends
 * the transfer and is returned by client_stream. */
typedef int (*client_event_fn)(void *ud, const char *data, size_t len);

/* POSTs body and feeds a text/event-stream answer to fn. An answer that is
 * not an event stream (an error) lands in r->body. cancel: when it becomes
 * non-zero the transfer is aborted (-ECANCELED), which closes the
 * connection, which makes moed cancel the request. */
int client_stream(struct client *c, const char *path, const char *body, client_event_fn fn,
                  void *ud, const volatile sig_atomic_t *cancel, struct client_reply *r,
                  struct moerr *e);
