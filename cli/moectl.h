/* moectl.h: what moectl's command files share: the parsed command line,
 * the exit statuses, and the one place that turns a failure into the
 * message that tells the user what to do. */
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>

#include "cli/client.h"

/* Exit statuses are part of moectl's interface for scripts. */
enum {
        MOECTL_OK = 0,
        MOECTL_FAILED = 1,      /* moed refused or failed the request */
        MOECTL_USAGE = 2,       /* bad command line */
        MOECTL_DOWN = 3,        /* moed is not running (or unreachable) */
};

struct moectl_opts {
        const char *socket;     /* resolved: never NULL once main has run */
        const char *token;      /* --token or $MOED_TOKEN */
        bool json;
        bool raw;               /* run: /v1/completions instead of chat */
        const char *system;     /* --system */
        bool has_temperature, has_top_p, has_seed;
        double temperature, top_p;
        int64_t max_tokens;     /* 0: the server's default */
        int64_t seed;
};

/* Prints why a call failed and returns the exit status: r < 0 from the
 * client (transport), or r == 0 with an HTTP error in rep. */
int moectl_fail(const struct moectl_opts *o, int r, const struct moerr *e,
                const struct client_reply *rep);
/* Prints "moectl: ..." to stderr. */
__attribute__((format(printf, 1, 2)))
void moectl_err(const char *fmt, ...);

/* Adds the sampling options to a request body. */
int moectl_add_sampling(const struct moectl_opts *o, json_t *req);
/* GETs or POSTs and parses the JSON answer; on failure prints why and
 * returns the exit status (> 0); 0 with *out set otherwise. */
int moectl_call(struct client *c, const struct moectl_opts *o, const char *path, json_t *body,
                json_t **out, struct client_reply *rep);

/* All of stdin, NUL-terminated (for the "-" arguments); NULL on failure. */
char *moectl_read_stdin(void);

/* The commands: each returns an exit status. */
int cmd_models(struct client *c, const struct moectl_opts *o);
int cmd_status(struct client *c, const struct moectl_opts *o);
int cmd_usage(struct client *c, const struct moectl_opts *o);
int cmd_tokenize(struct client *c, const struct moectl_opts *o, const char *model, const char *text);
int cmd_health(struct client *c, const struct moectl_opts *o);
int cmd_run(struct client *c, const struct moectl_opts *o, const char *model, const char *prompt);
int cmd_chat(struct client *c, const struct moectl_opts *o, const char *model);
int cmd_hash_token(const char *token);
