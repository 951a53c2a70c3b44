/* config: moed.conf and its drop-ins (moed.conf.d/ *.conf, applied in name
 * order after the main file), INI style, parsed with inih. Every key is
 * checked; errors name file, line, section and key. The key names are part
 * of the contract (README lists them). */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum residency { RESIDENCY_STRICT, RESIDENCY_RELAXED };

struct config_model {
        char *id;                 /* the section name after "Model " */
        char *path;               /* Path= (required) */
        int64_t max_context;      /* MaxContext=, 0: the model's */
        char *origin;             /* "FILE:LINE" of Path=, else of the section:
                                   * for messages about this model */
};

struct moed_config {
        /* [Daemon] */
        char *socket;             /* Socket=, default /run/moed/moed.sock */
        int threads;              /* Threads=auto|N, 0: auto */
        char *devices;            /* Devices=all|cpu|0,1,... (kept verbatim) */
        uint64_t kv_cache_bytes;  /* KVCacheSize=8G (K/M/G/T, 1024-based), 0: auto */
        int64_t max_connections;  /* MaxConnections=, default 512 */
        uint64_t max_request_bytes; /* MaxRequestSize=, default 1M */
        int64_t max_queued;       /* MaxQueuedRequests=, default 1024 */
        int64_t max_running;      /* MaxRunning= sequences in a step, default 64 */
        int64_t step_tokens;      /* StepTokens= per step, default 256 */
        double idle_timeout_s;    /* IdleTimeoutSec=, default 30 */
        double drain_timeout_s;   /* DrainTimeoutSec=, default 30 */
        double watchdog_stall_s;  /* EngineStallSec=, default 60 */
        char *tenants_dir;        /* TenantsDirectory=, default /etc/moed/tenants.d */
        char *state_dir;          /* StateDirectory=, default /var/lib/moed */
        char **model_dirs;        /* ModelDirectories=, default /var/lib/moed/models */
        size_t n_model_dirs;
        bool allow_network_fs;    /* AllowNetworkFilesystems=, default no */
        enum residency residency; /* Residency=strict|relaxed, default strict */
        char *audit_file;         /* AuditFile=, default none */
        /* [Model ID] sections, in order of appearance */
        struct config_model *models;
        size_t n_models;
};

/* Defaults for every key, no models. NULL when out of memory. */
struct moed_config *config_new_default(void);
void config_free(struct moed_config *c);

/* Every problem found, in order. */
struct config_errors {
        char **msgs;
        size_t n;
};
void config_errors_clear(struct config_errors *e);

/* Reads path, then every *.conf in dropin_dir (NULL: path + ".d") over it,
 * in name order (strcmp), skipping hidden files; a later file wins, key by
 * key. An empty value resets a key to its default.
 * Returns 0, or -EINVAL with every problem appended to errs, each as
 * "FILE:LINE: [Section] Key: problem" (unknown section or key,
 * bad value, model without Path, a missing main file); *out is set only on
 * success. A model file that does not exist is an error only when
 * check_files. */
int config_load(const char *path, const char *dropin_dir, bool check_files,
                struct moed_config **out, struct config_errors *errs);
/* Parses INI text as if it were a file named name (tests, fuzzer), applied
 * over c like a drop-in: a model already in c gets its keys overridden, a
 * model twice in the same text is an error. Problems are appended to errs;
 * returns 0, -EINVAL (c may then be partly updated) or -ENOMEM. */
int config_apply_text(struct moed_config *c, const char *name, const char *text,
                      struct config_errors *errs);
/* Checks the whole of c once every file is applied (config_load does it):
 * every model has a Path, and with check_files each Path is a readable
 * regular file. Appends problems to errs; 0 or -EINVAL. */
int config_check(const struct moed_config *c, bool check_files, struct config_errors *errs);

/* Value parsers shared with the command line: "8G", "1.5G", "512MiB",
 * "1024" -> bytes (K/M/G/T are 1024-based); "auto"|1..1024 -> threads (0
 * auto); "30", "30s", "500ms", "5min", "1h 30min" -> seconds. 0 or -EINVAL
 * (also for a value out of range). */
int config_parse_size(const char *s, uint64_t *out);
int config_parse_threads(const char *s, int *out);
int config_parse_seconds(const char *s, double *out);
