/* tenant: who is who. Tenants are named groups of local identities (users,
 * groups, bearer tokens stored only as SHA-256 hashes) with a weight, a
 * priority class and limits, read from a directory of INI files
 * (tenants.d/NAME.conf, section [Tenant]). Knows nothing of sockets or
 * engines: it answers "which tenant is this caller?".
 *
 * Resolution rule (most specific wins): a bearer token's tenant, then the
 * tenant naming the uid, then the first tenant (by file name) naming one of
 * the caller's groups (primary or supplementary), then "default" if it
 * exists. The same token or user in two tenants is a configuration error;
 * a group may appear in several (file-name order decides). */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "common/moerr.h"

enum tenant_priority { TENANT_INTERACTIVE, TENANT_BATCH };

enum tenant_match {
        TENANT_MATCH_NONE,
        TENANT_MATCH_TOKEN,
        TENANT_MATCH_USER,
        TENANT_MATCH_GROUP,
        TENANT_MATCH_DEFAULT,
};
const char *tenant_match_name(enum tenant_match m); /* "token", "user", ... */

#define TENANT_UNLIMITED INT64_MAX

struct tenant {
        char *name;               /* file name without .conf */
        uint32_t id;              /* index in the set: the engine's fair-share key */
        double weight;            /* Weight=, default 1, (0, 1000] */
        enum tenant_priority priority; /* Priority=interactive|batch, default interactive */
        int64_t max_concurrent;   /* MaxConcurrent=, default unlimited */
        int64_t max_queued;       /* MaxQueued= */
        int64_t tokens_per_minute;/* TokensPerMinute= */
        int64_t tokens_per_day;   /* TokensPerDay= */
        int64_t max_context;      /* MaxContext= */
        int64_t max_output;       /* MaxOutputTokens= */
        double kv_share;          /* KVShare=N% as a fraction (0, 1], default 1 */
        char **models;            /* Models=, NULL: every model */
        size_t n_models;
        bool log_content;         /* LogContent=, default no */
        bool admin;               /* Admin=yes: sees every tenant's usage */
        uid_t *users;             /* Users= (names resolved at load, or numbers) */
        size_t n_users;
        gid_t *groups;            /* Groups= */
        size_t n_groups;
        uint8_t (*tokens)[32];    /* Tokens=sha256:HEX ... */
        size_t n_tokens;
};

struct tenant_set;

/* Reads every *.conf of dir in name order (strcmp; hidden files and other
 * names are skipped). Errors name the file, line and key: unknown key or
 * section, bad value, unknown user or group, duplicate identity; every
 * problem of every file is reported, one per line of e->msg (as many as
 * fit), and then nothing is loaded. An empty or missing directory gives an
 * empty set. List keys (Users, Groups, Tokens, Models) add up over repeated
 * lines; an empty value empties the list (Models: every model again); an
 * empty value of any other key puts its default back. */
int tenant_set_load_dir(const char *dir, struct tenant_set **out, struct moerr *e);
/* The same, and each problem also goes whole to report (when non-NULL), one
 * call per problem, in order: for moed --check-config, where a moerr's 512
 * bytes would cut the list short. */
int tenant_set_load_dir_report(const char *dir, struct tenant_set **out,
                               void (*report)(void *user, const char *msg), void *user,
                               struct moerr *e);
/* Parses one tenant from INI text (for tests and the fuzzer); name is the
 * tenant's name ([A-Za-z0-9_.-]{1,64}, not starting with '.'), messages call
 * the text "NAME.conf". On error s is unchanged. */
int tenant_set_add_text(struct tenant_set *s, const char *name, const char *text,
                        struct moerr *e);
struct tenant_set *tenant_set_new(void);
/* Per-user mode: one tenant named after the user, holding only uid, admin
 * of itself, no limits. */
int tenant_set_single_user(uid_t uid, struct tenant_set **out, struct moerr *e);
void tenant_set_free(struct tenant_set *s);

size_t tenant_set_count(const struct tenant_set *s);
const struct tenant *tenant_set_get(const struct tenant_set *s, size_t i);
const struct tenant *tenant_find(const struct tenant_set *s, const char *name);

/* The caller's tenant, or NULL (no tenant: 403). bearer is the raw token
 * from "Authorization: Bearer ..." or NULL; a token that matches no tenant
 * gives NULL with *how = TENANT_MATCH_TOKEN (401, not a fall-through to
 * the uid). Hashes are compared in constant time. */
const struct tenant *tenant_lookup(const struct tenant_set *s, uid_t uid, gid_t gid,
                                   const gid_t *groups, size_t n_groups, const char *bearer,
                                   enum tenant_match *how);
bool tenant_allows_model(const struct tenant *t, const char *model);

/* "sha256:<64 hex>" of a token, for the Tokens= key (moectl hash-token). */
int tenant_hash_token(const char *token, char out[72]);
