/* moed: the daemon. Startup (mode, config, models, tenants), the main
 * sd-event loop with its doors, systemd notifications and watchdog,
 * reload on SIGHUP and the drain on SIGTERM. */
#include <errno.h>
#include <getopt.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <systemd/sd-daemon.h>
#include <systemd/sd-event.h>

#include "common/cleanup.h"
#include "common/log.h"
#include "daemon/config.h"
#include "daemon/demo.h"
#include "daemon/listen.h"
#include "engine/api.h"
#include "ipc/dbus.h"
#include "ipc/front.h"
#include "ipc/http.h"
#include "policy/audit.h"
#include "policy/residency.h"
#include "policy/usage-store.h"
#include "moed-config.h"

#define SYSTEM_CONFIG "/etc/moed/moed.conf"
#define DRAIN_POLL_USEC (100 * 1000)
#define CANCEL_GRACE_S 5.0
#define RESIDENCY_USEC (30ull * 1000 * 1000)
#define USAGE_SAVE_USEC (60ull * 1000 * 1000)

struct opts {
        const char *config, *model, *socket, *threads, *kv_cache, *max_context;
        bool user, check_config, check_residency, no_bus, verbose;
};

struct moed {
        struct opts o;
        bool user_mode;
        struct moed_config *cfg;
        sd_event *ev;
        struct eng *g;
        struct front *f;
        struct listen_sock ls;
        struct http_door *http;
        struct dbus_door *bus;
        sd_event_source *engine_src, *tick_src, *watchdog_src, *drain_src, *residency_src;
        struct residency_status residency;
        struct audit *audit;
        sd_event_source *usage_src;
        bool usage_loaded;               /* never save over a file not read */
        char *refusal;                   /* the residency finding we refuse with */
        uint64_t watchdog_usec;
        bool stall_logged;
        bool draining, drain_cancelled;
        double drain_deadline;
        char status[160];
};

/* ---- options ---- */

static void usage(FILE *f)
{
        fputs("usage: moed [OPTIONS]\n"
              "Serves DeepSeek-family models to local clients over a Unix socket\n"
              "(OpenAI-compatible HTTP) and D-Bus (org.moed.Engine1).\n\n"
              "  --config FILE        system configuration (default " SYSTEM_CONFIG ")\n"
              "  --check-config       check the configuration and the model files, then exit\n"
              "  --check-residency    report what of the network this process can reach, then exit\n"
              "  --user               per-user mode (the default when not root): the caller is\n"
              "                       the only tenant, the session bus, no config file\n"
              "  --model FILE         model to serve in per-user mode (default: the demo model)\n"
              "  --socket PATH        HTTP socket (default /run/moed/moed.sock, or\n"
              "                       $XDG_RUNTIME_DIR/moed/moed.sock in per-user mode)\n"
              "  --threads N|auto     CPU worker threads\n"
              "  --kv-cache SIZE      KV cache per model, e.g. 2G\n"
              "  --max-context N      cap on every model's context\n"
              "  --no-bus             do not connect to D-Bus\n"
              "  -v, --verbose        debug messages\n"
              "  --version, --help\n",
              f);
}

static int parse_opts(int argc, char **argv, struct opts *o)
{
        enum { O_CONFIG = 256, O_CHECK, O_CHECK_RES, O_USER, O_MODEL, O_SOCKET, O_THREADS, O_KV, O_CTX,
               O_NOBUS, O_VERSION, O_HELP };
        static const struct option longopts[] = {
                { "config", required_argument, NULL, O_CONFIG },
                { "check-config", no_argument, NULL, O_CHECK },
                { "check-residency", no_argument, NULL, O_CHECK_RES },
                { "user", no_argument, NULL, O_USER },
                { "model", required_argument, NULL, O_MODEL },
                { "socket", required_argument, NULL, O_SOCKET },
                { "threads", required_argument, NULL, O_THREADS },
                { "kv-cache", required_argument, NULL, O_KV },
                { "max-context", required_argument, NULL, O_CTX },
                { "no-bus", no_argument, NULL, O_NOBUS },
                { "verbose", no_argument, NULL, 'v' },
                { "version", no_argument, NULL, O_VERSION },
                { "help", no_argument, NULL, O_HELP },
                { 0 },
        };
        int c;

        while ((c = getopt_long(argc, argv, "v", longopts, NULL)) != -1) {
                switch (c) {
                case O_CONFIG: o->config = optarg; break;
                case O_CHECK: o->check_config = true; break;
                case O_CHECK_RES: o->check_residency = true; break;
                case O_USER: o->user = true; break;
                case O_MODEL: o->model = optarg; break;
                case O_SOCKET: o->socket = optarg; break;
                case O_THREADS: o->threads = optarg; break;
                case O_KV: o->kv_cache = optarg; break;
                case O_CTX: o->max_context = optarg; break;
                case O_NOBUS: o->no_bus = true; break;
                case 'v': o->verbose = true; break;
                case O_VERSION: printf("moed %s\n", MOED_VERSION); exit(0);
                case O_HELP: usage(stdout); exit(0);
                default: usage(stderr); return -EINVAL;
                }
        }
        if (optind < argc) {
                fprintf(stderr, "moed: unexpected argument '%s'\n", argv[optind]);
                return -EINVAL;
        }
        return 0;
}

/* ---- configuration ---- */

static void print_errors(const struct config_errors *errs)
{
        for (size_t i = 0; i < errs->n; i++)
                mo_log(LOG_ERR, "%s", errs->msgs[i]);
}

static int load_system_config(const char *path, bool check_files, struct moed_config **out)
{
        struct config_errors errs = { 0 };
        int r = config_load(path, NULL, check_files, out, &errs);

        print_errors(&errs);
        config_errors_clear(&errs);
        return r;
}

/* Command-line values replace the config's. */
static int apply_overrides(struct moed *d)
{
        struct moed_config *c = d->cfg;
        uint64_t v;

        if (d->o.socket) {
                free(c->socket);
                if (!(c->socket = strdup(d->o.socket)))
                        return -ENOMEM;
        }
        if (d->o.threads && config_parse_threads(d->o.threads, &c->threads) < 0) {
                mo_log(LOG_ERR, "--threads: '%s' is not auto or a count", d->o.threads);
                return -EINVAL;
        }
        if (d->o.kv_cache && config_parse_size(d->o.kv_cache, &c->kv_cache_bytes) < 0) {
                mo_log(LOG_ERR, "--kv-cache: '%s' is not a size", d->o.kv_cache);
                return -EINVAL;
        }
        if (d->o.max_context) {
                if (config_parse_size(d->o.max_context, &v) < 0 || v == 0 || v > INT32_MAX) {
                        mo_log(LOG_ERR, "--max-context: '%s' is not a token count",
                               d->o.max_context);
                        return -EINVAL;
                }
                for (size_t i = 0; i < c->n_models; i++)
                        c->models[i].max_context = (int64_t)v;
        }
        return 0;
}

/* Per-user mode: no config file; one model (given or the demo), the
 * socket in the user's runtime directory. */
static int user_config(struct moed *d)
{
        const char *rt = getenv("XDG_RUNTIME_DIR");
        _cleanup_free_ char *model = NULL, *sock = NULL;
        struct moerr e = { { 0 } };
        struct config_model *m;
        const char *base, *dot;

        if (!(d->cfg = config_new_default()))
                return -ENOMEM;
        if (d->o.model) {
                model = strdup(d->o.model);
        } else if (demo_model_path(&model, &e) < 0) {
                mo_log(LOG_ERR, "demo model: %s", e.msg);
                return -ENOENT;
        }
        if (!model)
                return -ENOMEM;
        if ((rt && *rt) ? asprintf(&sock, "%s/moed/moed.sock", rt) < 0 :
                          asprintf(&sock, "/tmp/moed-%u/moed.sock", (unsigned)getuid()) < 0)
                sock = NULL;
        if (!sock || !(m = calloc(1, sizeof *m)))
                return -ENOMEM;
        free(d->cfg->socket);
        d->cfg->socket = TAKE_PTR(sock);
        base = strrchr(model, '/') ? strrchr(model, '/') + 1 : model;
        dot = strstr(base, ".gguf");
        m->id = strndup(base, dot && dot > base ? (size_t)(dot - base) : strlen(base));
        m->path = TAKE_PTR(model);
        d->cfg->models = m;
        d->cfg->n_models = 1;
        return m->id ? 0 : -ENOMEM;
}

static int load_tenants(struct moed *d, struct tenant_set **out)
{
        struct moerr e = { { 0 } };
        int r;

        if (d->user_mode)
                r = tenant_set_single_user(getuid(), out, &e);
        else
                r = tenant_set_load_dir(d->cfg->tenants_dir, out, &e);
        if (r < 0)
                mo_log(LOG_ERR, "tenants: %s", e.msg);
        else if (!d->user_mode)
                mo_log(LOG_INFO, "%zu tenant%s from %s", tenant_set_count(*out),
                       tenant_set_count(*out) == 1 ? "" : "s", d->cfg->tenants_dir);
        return r;
}

/* ---- systemd ---- */

static void notify_status(struct moed *d)
{
        char line[160];

        front_status_line(d->f, line, sizeof line);
        if (strcmp(line, d->status) == 0)
                return;
        snprintf(d->status, sizeof d->status, "%s", line);
        sd_notifyf(0, "STATUS=%s", line);
}

static void on_progress(const char *model, double fraction, void *ud)
{
        /* Loading a large file can outlast TimeoutStartSec and WatchdogSec:
         * progress is proof of life. */
        sd_notifyf(0, "STATUS=loading model %s %d%%\nEXTEND_TIMEOUT_USEC=%llu\nWATCHDOG=1", model,
                   (int)(fraction * 100), 60ull * 1000 * 1000);
}

static int on_watchdog(sd_event_source *s, uint64_t usec, void *ud)
{
        struct moed *d = ud;
        double silent = eng_now() - eng_heartbeat(d->g);

        /* A wedged engine stops the pings, so systemd restarts us. */
        if (silent < d->cfg->watchdog_stall_s) {
                sd_notify(0, "WATCHDOG=1");
                d->stall_logged = false;
        } else if (!d->stall_logged) {
                mo_log(LOG_CRIT, "the engine has not made progress for %.0f s; "
                       "withholding watchdog pings", silent);
                d->stall_logged = true;
        }
        sd_event_source_set_time_relative(s, d->watchdog_usec / 2);
        return 0;
}

static int on_tick(sd_event_source *s, uint64_t usec, void *ud)
{
        struct moed *d = ud;

        front_tick(d->f);
        notify_status(d);
        sd_event_source_set_time_relative(s, 1000 * 1000);
        return 0;
}

static int on_engine(sd_event_source *s, int fd, uint32_t revents, void *ud)
{
        struct moed *d = ud;

        front_dispatch(d->f);
        return 0;
}

/* ---- usage and audit ---- */

/* Usage survives restarts in system mode (StateDirectory=); a crash loses
 * at most one interval. Per-user mode keeps it for the session only. */
static void usage_save(struct moed *d)
{
        struct moerr e = { { 0 } };

        if (d->usage_loaded && usage_store_save(d->cfg->state_dir, front_quota(d->f), &e) < 0)
                mo_log(LOG_ERR, "usage: %s", e.msg);
}

static int on_usage_save(sd_event_source *s, uint64_t usec, void *ud)
{
        usage_save(ud);
        sd_event_source_set_time_relative(s, USAGE_SAVE_USEC);
        return 0;
}

static int usage_restore(struct moed *d)
{
        struct moerr e = { { 0 } };
        int r;

        if (d->user_mode)
                return 0;
        if ((r = usage_store_load(d->cfg->state_dir, front_quota(d->f), &e)) < 0)
                /* A corrupt file is set aside by the store and counting
                 * starts over; any other failure leaves the file alone. */
                mo_log(r == -EBADMSG ? LOG_CRIT : LOG_ERR, "usage: %s", e.msg);
        d->usage_loaded = r == 0 || r == -EBADMSG;
        return sd_event_add_time_relative(d->ev, &d->usage_src, CLOCK_MONOTONIC, USAGE_SAVE_USEC,
                                          0, on_usage_save, d) < 0 ? -ENOMEM :
               sd_event_source_set_enabled(d->usage_src, SD_EVENT_ON);
}

static int open_audit(struct moed *d, const char *file, struct audit **out)
{
        struct audit_config ac = { .file = file };
        struct moerr e = { { 0 } };
        int r;

        if ((r = audit_open(&ac, out, &e)) < 0)
                mo_log(LOG_ERR, "audit: %s", e.msg);
        return r;
}

/* ---- residency ---- */

/* Reads the network namespace; in strict mode a finding stops service
 * until it is gone, in relaxed mode it is only reported. */
static void residency_refresh(struct moed *d)
{
        struct residency_report rep = { 0 };
        _cleanup_free_ char *line = NULL;
        bool was_ok = d->residency.ok;

        residency_check_netns(&rep);
        residency_status_set_report(&d->residency, &rep);
        line = residency_report_line(&rep);
        residency_report_clear(&rep);
        front_set_status_extra(d->f, "residency", residency_status_json(&d->residency));
        if (d->residency.ok) {
                if (!was_ok && d->refusal)
                        mo_log(LOG_NOTICE, "residency: the network is gone again; serving");
                free(d->refusal);
                d->refusal = NULL;
                front_set_refusal(d->f, NULL);
                return;
        }
        if (d->refusal && line && strcmp(d->refusal, line) == 0)
                return;
        if (d->residency.strict) {
                mo_log(LOG_ERR, "residency (strict): %s; refusing to serve", line ? line : "?");
                front_set_refusal(d->f, line ? line : "the network check failed");
        } else if (was_ok || !d->refusal) {
                mo_log(LOG_WARNING, "residency (relaxed): %s", line ? line : "?");
        }
        free(d->refusal);
        d->refusal = TAKE_PTR(line);
}

static int on_residency(sd_event_source *s, uint64_t usec, void *ud)
{
        residency_refresh(ud);
        sd_event_source_set_time_relative(s, RESIDENCY_USEC);
        return 0;
}

static int check_residency(void)
{
        struct residency_report rep = { 0 };
        _cleanup_free_ char *text = NULL;
        bool ok;

        residency_check_netns(&rep);
        ok = rep.ok;
        text = residency_report_text(&rep);
        residency_report_clear(&rep);
        fputs(text ? text : "out of memory\n", stdout);
        return ok ? 0 : 1;
}

/* A model may load only from ModelDirectories= (system mode): the file is
 * opened beneath one of them and loaded through that very descriptor. */
static int open_model_checked(struct moed *d, const struct config_model *m, char **load_path,
                              int *fd)
{
        struct moerr e = { { 0 } };

        *fd = -1;
        if (d->user_mode)
                return (*load_path = strdup(m->path)) ? 0 : -ENOMEM;
        *fd = residency_check_model_path(m->path, d->cfg->model_dirs, d->cfg->n_model_dirs,
                                         d->cfg->allow_network_fs, load_path, &e);
        if (*fd < 0) {
                mo_log(LOG_ERR, "model %s: %s", m->id, e.msg);
                return *fd;
        }
        return 0;
}

/* ---- reload and drain ---- */

/* Tenants and limits change for new requests; models, socket and threads
 * need a restart (said in the log). */
static int reload(void *ud, struct moerr *e)
{
        struct moed *d = ud;
        struct moed_config *nc = NULL;
        struct tenant_set *t = NULL;
        int r;

        sd_notify(0, "RELOADING=1\nSTATUS=reloading");
        mo_log(LOG_INFO, "reloading");
        if (!d->user_mode) {
                if ((r = load_system_config(d->o.config ? d->o.config : SYSTEM_CONFIG, false,
                                            &nc)) < 0) {
                        moerr_set(e, r, "the new configuration has errors; keeping the old one");
                        goto done;
                }
                if (strcmp(nc->socket, d->cfg->socket) != 0 || nc->n_models != d->cfg->n_models ||
                    nc->threads != d->cfg->threads || nc->kv_cache_bytes != d->cfg->kv_cache_bytes)
                        mo_log(LOG_WARNING, "socket, models, threads and KV cache size take "
                               "effect at the next restart");
                if (strcmp(nc->audit_file ? nc->audit_file : "",
                           d->cfg->audit_file ? d->cfg->audit_file : "") != 0) {
                        struct audit *a = NULL;
                        if ((r = open_audit(d, nc->audit_file, &a)) < 0) {
                                moerr_set(e, r, "the new AuditFile= cannot be opened; keeping "
                                          "the old configuration");
                                goto done;
                        }
                        front_set_audit(d->f, a);
                        audit_close(d->audit);
                        d->audit = a;
                        free(d->cfg->audit_file);
                        d->cfg->audit_file = TAKE_PTR(nc->audit_file);
                }
                free(d->cfg->tenants_dir);
                d->cfg->tenants_dir = TAKE_PTR(nc->tenants_dir);
                d->cfg->max_queued = nc->max_queued;
                d->cfg->drain_timeout_s = nc->drain_timeout_s;
                d->cfg->watchdog_stall_s = nc->watchdog_stall_s;
        }
        if ((r = load_tenants(d, &t)) < 0) {
                moerr_set(e, r, "the tenants have errors; keeping the old ones");
                goto done;
        }
        front_set_tenants(d->f, t);
        front_set_limits(d->f, &(struct front_limits){ .max_queued = d->cfg->max_queued });
        r = 0;
done:
        config_free(nc);
        if (r < 0)
                mo_log(LOG_ERR, "reload: %s", e->msg);
        sd_notify(0, "READY=1");
        d->status[0] = 0;
        notify_status(d);
        if (d->bus)
                dbus_door_state_changed(d->bus);
        return r;
}

static int on_sighup(sd_event_source *s, const struct signalfd_siginfo *si, void *ud)
{
        struct moerr e = { { 0 } };

        reload(ud, &e);
        return 0;
}

static int on_drain_poll(sd_event_source *s, uint64_t usec, void *ud)
{
        struct moed *d = ud;
        double now = eng_now();

        if (front_active(d->f) == 0 && (!d->http || http_door_busy(d->http) == 0)) {
                mo_log(LOG_INFO, "drained; exiting");
                return sd_event_exit(d->ev, 0);
        }
        if (!d->drain_cancelled && now >= d->drain_deadline) {
                mo_log(LOG_WARNING, "drain deadline passed: cancelling %zu request%s",
                       front_active(d->f), front_active(d->f) == 1 ? "" : "s");
                front_cancel_all(d->f, "the daemon is stopping and the drain deadline passed");
                d->drain_cancelled = true;
                d->drain_deadline = now + CANCEL_GRACE_S;
        } else if (d->drain_cancelled && now >= d->drain_deadline) {
                mo_log(LOG_ERR, "requests did not end after cancellation; exiting anyway");
                return sd_event_exit(d->ev, 0);
        }
        sd_event_source_set_time_relative(s, DRAIN_POLL_USEC);
        return 0;
}

static int on_sigterm(sd_event_source *s, const struct signalfd_siginfo *si, void *ud)
{
        struct moed *d = ud;

        if (d->draining) {
                /* A second signal: stop waiting. */
                d->drain_deadline = 0;
                return 0;
        }
        d->draining = true;
        d->drain_deadline = eng_now() + d->cfg->drain_timeout_s;
        sd_notify(0, "STOPPING=1\nSTATUS=draining");
        mo_log(LOG_INFO, "draining %zu request%s (deadline %.0f s)", front_active(d->f),
               front_active(d->f) == 1 ? "" : "s", d->cfg->drain_timeout_s);
        front_set_draining(d->f, true);
        if (d->http)
                http_door_stop_accepting(d->http);
        /* Our own socket goes now, so new clients are refused at once
         * rather than left in the backlog; an activated one stays with
         * systemd, which queues clients for the next start. */
        if (!d->ls.activated)
                listen_close(&d->ls);
        if (d->bus)
                dbus_door_state_changed(d->bus);
        if (sd_event_add_time_relative(d->ev, &d->drain_src, CLOCK_MONOTONIC, 0, 0,
                                       on_drain_poll, d) < 0)
                return sd_event_exit(d->ev, 0);
        return sd_event_source_set_enabled(d->drain_src, SD_EVENT_ON);
}

/* ---- start-up ---- */

/* Prompts and answers live in this process's memory: no core dumps, no
 * ptrace by other processes of our uid, and no swap where memory can be
 * locked (the model's file pages are unlocked again after loading: they
 * are clean page cache and never reach swap). */
static void harden(struct moed *d)
{
        struct moerr e = { { 0 } };

        signal(SIGPIPE, SIG_IGN);
        d->residency.strict = !d->user_mode && d->cfg->residency == RESIDENCY_STRICT;
        d->residency.core_dumps_off = residency_disable_core_dumps(&e) == 0;
        if (!d->residency.core_dumps_off)
                mo_log(LOG_WARNING, "%s", e.msg);
        d->residency.memory_locked = residency_lock_memory(&e) == 0;
        if (!d->residency.memory_locked)
                mo_log(d->user_mode ? LOG_INFO : LOG_WARNING, "%s", e.msg);
}

static int load_models(struct moed *d)
{
        struct moerr e = { { 0 } };
        int r;

        for (size_t i = 0; i < d->cfg->n_models; i++) {
                const struct config_model *m = &d->cfg->models[i];
                double t0 = eng_now();
                _cleanup_free_ char *load_path = NULL;
                _cleanup_close_ int fd = -1;
                mo_log(LOG_INFO, "loading model %s from %s", m->id, m->path);
                if ((r = open_model_checked(d, m, &load_path, &fd)) < 0)
                        return r;
                if ((r = eng_add_model_as(d->g, m->id, load_path, m->path, on_progress, d,
                                          &e)) < 0) {
                        mo_log(LOG_ERR, "%s", e.msg);
                        return r;
                }
                mo_log(LOG_INFO, "model %s ready in %.1f s", m->id, eng_now() - t0);
        }
        return 0;
}

static int start_engine(struct moed *d)
{
        struct eng_config ec = {
                .threads = d->cfg->threads,
                .kv_bytes = d->cfg->kv_cache_bytes,
                .step_tokens = d->cfg->step_tokens,
                .max_running = d->cfg->max_running,
        };
        struct tenant_set *t = NULL;
        struct moerr e = { { 0 } };
        int r;

        for (size_t i = 0; i < d->cfg->n_models; i++)
                if (d->cfg->models[i].max_context > 0 &&
                    (!ec.max_context || d->cfg->models[i].max_context < ec.max_context))
                        ec.max_context = d->cfg->models[i].max_context;
        /* The CUDA backend comes with its own issue; until then say plainly
         * where the work runs. */
        if (d->cfg->devices && strcmp(d->cfg->devices, "all") != 0 &&
            strcmp(d->cfg->devices, "cpu") != 0)
                mo_log(LOG_WARNING, "Devices=%s: this build has no GPU backend; using the CPU",
                       d->cfg->devices);
        mo_log(LOG_INFO, "devices: cpu (%d threads)", ec.threads > 0 ? ec.threads :
               (int)sysconf(_SC_NPROCESSORS_ONLN));
        if ((r = eng_new(&ec, &d->g, &e)) < 0) {
                mo_log(LOG_ERR, "%s", e.msg);
                return r;
        }
        if ((r = load_models(d)) < 0 || (r = load_tenants(d, &t)) < 0)
                return r;
        if (d->residency.memory_locked && residency_unlock_file_mappings(&e) < 0)
                mo_log(LOG_WARNING, "%s", e.msg);
        if ((r = front_new(d->g, t, &(struct front_limits){ .max_queued = d->cfg->max_queued },
                           &d->f, &e)) < 0 ||
            (r = eng_start(d->g, &e)) < 0) {
                tenant_set_free(d->f ? NULL : t);
                mo_log(LOG_ERR, "%s", e.msg);
                return r;
        }
        front_set_status_extra(d->f, "devices",
                               json_pack("[{s:s, s:i}]", "kind", "cpu", "threads",
                                         d->cfg->threads > 0 ? d->cfg->threads :
                                                               (int)sysconf(_SC_NPROCESSORS_ONLN)));
        front_set_status_extra(d->f, "mode", json_string(d->user_mode ? "user" : "system"));
        if ((r = open_audit(d, d->cfg->audit_file, &d->audit)) < 0)
                return r;
        front_set_audit(d->f, d->audit);
        return 0;
}

static int open_doors(struct moed *d)
{
        struct http_door_config hc = {
                .max_connections = (unsigned)d->cfg->max_connections,
                .idle_timeout_s = (unsigned)(d->cfg->idle_timeout_s + 0.5),
                .max_header_bytes = 16384,
        };
        struct dbus_door_config bc = { .user_bus = d->user_mode, .owner_uid = getuid() };
        static const struct dbus_admin_ops admin = { .reload = reload };
        struct moerr e = { { 0 } };
        int r;

        if ((r = listen_open(d->cfg->socket, d->user_mode ? 0600 : 0666,
                             d->user_mode ? 0700 : 0755, d->user_mode && !d->o.socket, &d->ls,
                             &e)) < 0) {
                mo_log(LOG_ERR, "%s", e.msg);
                return r;
        }
        hc.listen_fd = d->ls.fd;
        oai_limits_default(&hc.limits);
        hc.limits.max_body = d->cfg->max_request_bytes;
        if ((r = http_door_new(d->ev, d->f, &hc, &d->http, &e)) < 0) {
                mo_log(LOG_ERR, "%s", e.msg);
                return r;
        }
        mo_log(LOG_INFO, "HTTP on %s%s", d->ls.activated ? "the socket systemd passed" :
               d->cfg->socket, d->ls.activated ? "" : "");
        if (d->o.no_bus)
                return 0;
        if (dbus_door_new(d->ev, d->f, &bc, &admin, d, &d->bus, &e) < 0) {
                /* Serving HTTP without the bus is still useful (containers,
                 * sessions without a bus). */
                mo_log(LOG_WARNING, "D-Bus: %s; serving HTTP only", e.msg);
                d->bus = NULL;
        }
        return 0;
}

static int attach_loop(struct moed *d)
{
        sigset_t ss;
        int r;

        sigemptyset(&ss);
        sigaddset(&ss, SIGTERM);
        sigaddset(&ss, SIGINT);
        sigaddset(&ss, SIGHUP);
        sigprocmask(SIG_BLOCK, &ss, NULL);
        if ((r = sd_event_default(&d->ev)) < 0 ||
            (r = sd_event_add_signal(d->ev, NULL, SIGTERM, on_sigterm, d)) < 0 ||
            (r = sd_event_add_signal(d->ev, NULL, SIGINT, on_sigterm, d)) < 0 ||
            (r = sd_event_add_signal(d->ev, NULL, SIGHUP, on_sighup, d)) < 0)
                return r;
        return 0;
}

static int attach_engine(struct moed *d)
{
        int r;

        if ((r = sd_event_add_io(d->ev, &d->engine_src, front_event_fd(d->f), EPOLLIN, on_engine,
                                 d)) < 0 ||
            (r = sd_event_add_time_relative(d->ev, &d->tick_src, CLOCK_MONOTONIC, 1000 * 1000,
                                            0, on_tick, d)) < 0)
                return r;
        sd_event_source_set_enabled(d->tick_src, SD_EVENT_ON);
        if ((r = usage_restore(d)) < 0)
                return r;
        residency_refresh(d);
        if ((r = sd_event_add_time_relative(d->ev, &d->residency_src, CLOCK_MONOTONIC,
                                            RESIDENCY_USEC, 0, on_residency, d)) < 0)
                return r;
        sd_event_source_set_enabled(d->residency_src, SD_EVENT_ON);
        if (sd_watchdog_enabled(0, &d->watchdog_usec) > 0) {
                if ((r = sd_event_add_time_relative(d->ev, &d->watchdog_src, CLOCK_MONOTONIC,
                                                    d->watchdog_usec / 2, 0, on_watchdog, d)) < 0)
                        return r;
                sd_event_source_set_enabled(d->watchdog_src, SD_EVENT_ON);
        }
        return 0;
}

static void shut_down(struct moed *d)
{
        dbus_door_free(d->bus);
        http_door_free(d->http);
        if (d->g)
                eng_stop(d->g);
        if (d->f)
                front_dispatch(d->f);
        usage_save(d);
        front_free(d->f);
        audit_close(d->audit);
        eng_free(d->g);
        listen_close(&d->ls);
        sd_event_source_disable_unref(d->engine_src);
        sd_event_source_disable_unref(d->tick_src);
        sd_event_source_disable_unref(d->watchdog_src);
        sd_event_source_disable_unref(d->drain_src);
        sd_event_source_disable_unref(d->residency_src);
        sd_event_source_disable_unref(d->usage_src);
        free(d->refusal);
        sd_event_unref(d->ev);
        config_free(d->cfg);
}

static int check_config(struct moed *d)
{
        struct moed_config *c = NULL;
        const char *path = d->o.config ? d->o.config : SYSTEM_CONFIG;
        int r = load_system_config(path, true, &c);

        if (r == 0)
                printf("%s: OK, %zu model%s\n", path, c->n_models, c->n_models == 1 ? "" : "s");
        config_free(c);
        return r < 0 ? 1 : 0;
}

int main(int argc, char **argv)
{
        struct moed d = { .ls = { .fd = -1 } };
        int r;

        if (parse_opts(argc, argv, &d.o) < 0)
                return 2;
        if (d.o.verbose)
                mo_log_set_max(LOG_DEBUG);
        if (d.o.check_config)
                return check_config(&d);
        if (d.o.check_residency)
                return check_residency();
        d.user_mode = d.o.user || (getuid() != 0 && !d.o.config);
        if (!d.user_mode && d.o.model) {
                mo_log(LOG_ERR, "--model is for per-user mode; system models come from %s",
                       SYSTEM_CONFIG);
                return 2;
        }
        r = d.user_mode ? user_config(&d) :
                          load_system_config(d.o.config ? d.o.config : SYSTEM_CONFIG, true, &d.cfg);
        if (r < 0 || (r = apply_overrides(&d)) < 0) {
                config_free(d.cfg);
                return 1;
        }
        harden(&d);
        if (d.cfg->n_models == 0) {
                mo_log(LOG_ERR, "no model configured: add a [Model ID] section with Path=");
                config_free(d.cfg);
                return 1;
        }
        if ((r = attach_loop(&d)) < 0 || (r = start_engine(&d)) < 0 ||
            (r = attach_engine(&d)) < 0 || (r = open_doors(&d)) < 0) {
                sd_notifyf(0, "STATUS=failed to start: %s\nERRNO=%d", strerror(-r), -r);
                shut_down(&d);
                return 1;
        }
        front_set_state(d.f, "serving");
        sd_notify(0, "READY=1");
        notify_status(&d);
        mo_log(LOG_INFO, "ready: %s", d.status);
        r = sd_event_loop(d.ev);
        shut_down(&d);
        return r < 0 ? 1 : 0;
}
