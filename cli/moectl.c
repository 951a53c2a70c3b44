/* moectl: the command-line client of moed. This file owns the command
 * line (options, the socket to use, which command runs) and the mapping of
 * failures to messages that say what to do and to exit statuses. moectl
 * speaks only moed's public HTTP API; it shares no code with the daemon. */
#include "moectl.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/audit.h"
#include "common/cleanup.h"
#include "moed-config.h"

#define MOECTL_SYSTEM_SOCKET "/run/moed/moed.sock"
#define MOECTL_TIMEOUT_S 60L    /* for everything but generation */

static const char usage_text[] =
        "Usage: moectl [OPTIONS] COMMAND [ARGS]\n"
        "\n"
        "Talk to moed, the local model server.\n"
        "\n"
        "Commands:\n"
        "  chat [MODEL]          interactive chat (default model: the first served);\n"
        "                        /reset starts over, /exit or Ctrl-D quits,\n"
        "                        Ctrl-C stops the answer being written\n"
        "  run MODEL PROMPT      one answer, streamed to stdout (PROMPT - reads stdin)\n"
        "  models                the models moed serves\n"
        "  status                the daemon's state, models, queue and devices\n"
        "  usage                 tokens and requests of your tenant (all, for admins)\n"
        "  tokenize MODEL TEXT   the token ids of TEXT (TEXT - reads stdin)\n"
        "  health                whether moed is ready to serve (exit status 0)\n"
        "  hash-token [TOKEN]    sha256:<hex> of a bearer token for a tenant's Tokens=\n"
        "                        (reads the token from stdin when omitted)\n"
        "  audit verify FILE...  check the hash chain of moed's audit file (AuditFile=)\n"
        "                        and its rotated files; says where it breaks\n"
        "\n"
        "Options:\n"
        "  -s, --socket PATH     moed's socket (default: $MOED_SOCKET, then\n"
        "                        $XDG_RUNTIME_DIR/moed/moed.sock (or /tmp/moed-UID/moed.sock\n"
        "                        without a runtime directory) if it exists,\n"
        "                        then " MOECTL_SYSTEM_SOCKET ")\n"
        "  -j, --json            print moed's JSON answer (one line) instead of tables\n"
        "      --token TOKEN     send Authorization: Bearer TOKEN (default: $MOED_TOKEN)\n"
        "  -t, --temperature, --temp T   sampling temperature (0: greedy)\n"
        "  -p, --top-p P         nucleus sampling threshold, 0 < P <= 1\n"
        "  -n, --max-tokens N    at most N tokens per answer\n"
        "      --seed N          seed of the sampler, for reproducible answers\n"
        "      --system TEXT     system message (chat, run)\n"
        "      --raw             run: plain completion of PROMPT (/v1/completions)\n"
        "      --chat            run: answer PROMPT as a chat message (the default)\n"
        "  -h, --help            this text\n"
        "  -V, --version         moectl's version\n"
        "\n"
        "Exit status: 0 ok, 1 moed refused or failed, 2 bad usage, 3 moed not running.\n";

void moectl_err(const char *fmt, ...)
{
        va_list ap;

        fflush(stdout);
        fputs("moectl: ", stderr);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputc('\n', stderr);
}

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...)
{
        va_list ap;

        fputs("moectl: ", stderr);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputs("\nTry 'moectl --help'.\n", stderr);
        return MOECTL_USAGE;
}

/* The error object of an OpenAI-shaped answer, or NULL members. */
struct api_error {
        json_t *root;
        const char *message, *type, *code, *param;
};

static void api_error_parse(const struct client_reply *rep, struct api_error *a)
{
        json_t *err;

        *a = (struct api_error){ 0 };
        if (!rep->body)
                return;
        a->root = json_loadb(rep->body, rep->len, 0, NULL);
        err = json_object_get(a->root, "error");
        if (json_is_string(err)) {
                a->message = json_string_value(err);
                return;
        }
        a->message = json_string_value(json_object_get(err, "message"));
        a->type = json_string_value(json_object_get(err, "type"));
        a->code = json_string_value(json_object_get(err, "code"));
        a->param = json_string_value(json_object_get(err, "param"));
}

static void explain_forbidden(const struct moectl_opts *o)
{
        struct passwd *pw = getpwuid(getuid());

        if (o->token)
                moectl_err("moed did not accept the token given (--token or $MOED_TOKEN), "
                           "and has no tenant for your user %s (uid %u)",
                           pw ? pw->pw_name : "?", (unsigned)getuid());
        else
                moectl_err("moed has no tenant for your user %s (uid %u): ask the administrator "
                           "to add you to a tenant (/etc/moed/tenants.d/), or pass a token "
                           "with --token or $MOED_TOKEN",
                           pw ? pw->pw_name : "?", (unsigned)getuid());
}

static int api_fail(const struct moectl_opts *o, const struct client_reply *rep)
{
        struct api_error a;
        _cleanup_free_ char *first = NULL;
        const char *msg;

        api_error_parse(rep, &a);
        msg = a.message;
        if (!msg) {
                /* Not moed's error object: show the first line of what came. */
                first = strndup(rep->body ? rep->body : "", 200);
                if (first)
                        first[strcspn(first, "\r\n")] = 0;
                msg = first && first[0] ? first : "(no message)";
        }
        switch (rep->status) {
        case 403:
                moectl_err("access denied: %s", msg);
                explain_forbidden(o);
                break;
        case 429:
                if (rep->retry_after >= 0)
                        moectl_err("%s (retry after %ld s)", msg, rep->retry_after);
                else
                        moectl_err("%s (try again later)", msg);
                break;
        case 404:
                if ((a.code && strcmp(a.code, "model_not_found") == 0) ||
                    (a.param && strcmp(a.param, "model") == 0))
                        moectl_err("%s (see `moectl models`)", msg);
                else
                        moectl_err("%s", msg);
                break;
        case 503:
                if (rep->retry_after >= 0)
                        moectl_err("moed is not ready: %s (retry after %ld s)", msg,
                                   rep->retry_after);
                else
                        moectl_err("moed is not ready: %s", msg);
                break;
        default:
                if (a.message)
                        moectl_err("%s", msg);
                else
                        moectl_err("moed answered HTTP %ld: %s", rep->status, msg);
        }
        json_decref(a.root);
        return MOECTL_FAILED;
}

int moectl_fail(const struct moectl_opts *o, int r, const struct moerr *e,
                const struct client_reply *rep)
{
        switch (r) {
        case 0:
                return api_fail(o, rep);
        case -ENOENT:
        case -ECONNREFUSED:
                moectl_err("moed is not running (%s): start it with `systemctl start moed`, "
                           "or `moed --user`", e->msg);
                return MOECTL_DOWN;
        case -EACCES:
                moectl_err("cannot connect to moed: %s: ask the administrator for access, "
                           "or run your own with `moed --user`", e->msg);
                return MOECTL_FAILED;
        default:
                moectl_err("%s", e->msg[0] ? e->msg : strerror(-r));
                return MOECTL_FAILED;
        }
}

int moectl_add_sampling(const struct moectl_opts *o, json_t *req)
{
        int r = 0;

        if (o->has_temperature)
                r |= json_object_set_new(req, "temperature", json_real(o->temperature));
        if (o->has_top_p)
                r |= json_object_set_new(req, "top_p", json_real(o->top_p));
        if (o->max_tokens > 0)
                r |= json_object_set_new(req, "max_tokens", json_integer(o->max_tokens));
        if (o->has_seed)
                r |= json_object_set_new(req, "seed", json_integer(o->seed));
        return r ? -ENOMEM : 0;
}

int moectl_call(struct client *c, const struct moectl_opts *o, const char *path, json_t *body,
                json_t **out, struct client_reply *rep)
{
        _cleanup_free_ char *s = NULL;
        struct moerr e = { "" };
        int r;

        if (body) {
                s = json_dumps(body, JSON_COMPACT);
                if (!s) {
                        moectl_err("out of memory");
                        return MOECTL_FAILED;
                }
        }
        r = client_request(c, path, s, MOECTL_TIMEOUT_S, rep, &e);
        if (r < 0 || rep->status != 200)
                return moectl_fail(o, r, &e, rep);
        *out = json_loadb(rep->body ? rep->body : "", rep->len, 0, NULL);
        if (!*out) {
                moectl_err("moed's answer to %s is not JSON", path);
                return MOECTL_FAILED;
        }
        return MOECTL_OK;
}

/* --socket, $MOED_SOCKET, the per-user socket when there is one, the
 * system socket: the same order moed's own documentation gives. */
static char *resolve_socket(const char *opt)
{
        const char *env = getenv("MOED_SOCKET");
        const char *xdg = getenv("XDG_RUNTIME_DIR");
        char *p = NULL;
        struct stat st;

        if (opt)
                return strdup(opt);
        if (env && env[0])
                return strdup(env);
        if (xdg && xdg[0] && asprintf(&p, "%s/moed/moed.sock", xdg) >= 0) {
                if (stat(p, &st) == 0)
                        return p;
                free(p);
        }
        /* moed --user without a runtime directory (su, containers). */
        if ((!xdg || !xdg[0]) && asprintf(&p, "/tmp/moed-%u/moed.sock", (unsigned)getuid()) >= 0) {
                if (stat(p, &st) == 0)
                        return p;
                free(p);
        }
        return strdup(MOECTL_SYSTEM_SOCKET);
}

static int parse_double(const char *name, const char *s, double lo, double hi, bool lo_open,
                        double *out)
{
        char *end;
        double v;

        errno = 0;
        v = strtod(s, &end);
        if (errno || end == s || *end || !isfinite(v) || v < lo || v > hi ||
            (lo_open && v == lo))
                return usage_error("%s: bad value '%s' (expected a number in %s%g, %g])", name,
                                   s, lo_open ? "(" : "[", lo, hi);
        *out = v;
        return 0;
}

static int parse_int(const char *name, const char *s, int64_t lo, int64_t *out)
{
        char *end;
        long long v;

        errno = 0;
        v = strtoll(s, &end, 10);
        if (errno || end == s || *end || v < lo)
                return usage_error("%s: bad value '%s' (expected an integer >= %lld)", name, s,
                                   (long long)lo);
        *out = v;
        return 0;
}

enum {
        OPT_TOKEN = 0x100,
        OPT_SEED,
        OPT_SYSTEM,
        OPT_RAW,
        OPT_CHAT,
};

static const struct option long_opts[] = {
        { "socket", required_argument, NULL, 's' },
        { "json", no_argument, NULL, 'j' },
        { "temperature", required_argument, NULL, 't' },
        { "temp", required_argument, NULL, 't' },
        { "top-p", required_argument, NULL, 'p' },
        { "max-tokens", required_argument, NULL, 'n' },
        { "seed", required_argument, NULL, OPT_SEED },
        { "token", required_argument, NULL, OPT_TOKEN },
        { "system", required_argument, NULL, OPT_SYSTEM },
        { "raw", no_argument, NULL, OPT_RAW },
        { "chat", no_argument, NULL, OPT_CHAT },
        { "help", no_argument, NULL, 'h' },
        { "version", no_argument, NULL, 'V' },
        {},
};

/* Returns -1 to go on, else the exit status. */
static int parse_options(int argc, char **argv, struct moectl_opts *o)
{
        int c, r;

        opterr = 0;
        while ((c = getopt_long(argc, argv, ":s:jt:p:n:hV", long_opts, NULL)) != -1) {
                r = 0;
                switch (c) {
                case 's':
                        o->socket = optarg;
                        break;
                case 'j':
                        o->json = true;
                        break;
                case 't':
                        o->has_temperature = true;
                        r = parse_double("--temperature", optarg, 0, 2, false, &o->temperature);
                        break;
                case 'p':
                        o->has_top_p = true;
                        r = parse_double("--top-p", optarg, 0, 1, true, &o->top_p);
                        break;
                case 'n':
                        r = parse_int("--max-tokens", optarg, 1, &o->max_tokens);
                        break;
                case OPT_SEED:
                        o->has_seed = true;
                        r = parse_int("--seed", optarg, 0, &o->seed);
                        break;
                case OPT_TOKEN:
                        o->token = optarg;
                        break;
                case OPT_SYSTEM:
                        o->system = optarg;
                        break;
                case OPT_RAW:
                        o->raw = true;
                        break;
                case OPT_CHAT:
                        o->raw = false;
                        break;
                case 'h':
                        fputs(usage_text, stdout);
                        return MOECTL_OK;
                case 'V':
                        printf("moectl %s\n", MOED_VERSION);
                        return MOECTL_OK;
                case ':':
                        return usage_error("option '%s' needs a value", argv[optind - 1]);
                default:
                        return usage_error("unknown option '%s'", argv[optind - 1]);
                }
                if (r)
                        return r;
        }
        return -1;
}

struct command {
        const char *name;
        int min_args, max_args;
        const char *args;       /* for the usage message */
};

static const struct command commands[] = {
        { "chat", 0, 1, "[MODEL]" },
        { "run", 2, 2, "MODEL PROMPT" },
        { "models", 0, 0, "" },
        { "status", 0, 0, "" },
        { "usage", 0, 0, "" },
        { "tokenize", 2, 2, "MODEL TEXT" },
        { "health", 0, 0, "" },
        { "hash-token", 0, 1, "[TOKEN]" },
};

static int dispatch(const struct command *cmd, struct client *c, const struct moectl_opts *o,
                    char **args)
{
        const char *n = cmd->name;

        if (strcmp(n, "chat") == 0)
                return cmd_chat(c, o, args[0]);
        if (strcmp(n, "run") == 0)
                return cmd_run(c, o, args[0], args[1]);
        if (strcmp(n, "models") == 0)
                return cmd_models(c, o);
        if (strcmp(n, "status") == 0)
                return cmd_status(c, o);
        if (strcmp(n, "usage") == 0)
                return cmd_usage(c, o);
        if (strcmp(n, "tokenize") == 0)
                return cmd_tokenize(c, o, args[0], args[1]);
        return cmd_health(c, o);
}

/* Options may come before or after the command and its arguments
 * (getopt_long permutes them); "--" ends the options, for a PROMPT that
 * starts with "-". */
int main(int argc, char **argv)
{
        struct moectl_opts o = { 0 };
        _cleanup_free_ char *socket = NULL;
        const struct command *cmd = NULL;
        char *args[2] = { NULL, NULL };
        int nargs, r;
        struct client *c = NULL;
        struct moerr e = { "" };

        r = parse_options(argc, argv, &o);
        if (r >= 0)
                return r;
        if (optind >= argc)
                return usage_error("no command given");
        if (strcmp(argv[optind], "audit") == 0)         /* FILE..., no daemon */
                return cmd_audit(argc - optind - 1, argv + optind + 1);
        for (size_t i = 0; i < ARRAY_SIZE(commands); i++)
                if (strcmp(argv[optind], commands[i].name) == 0)
                        cmd = &commands[i];
        if (!cmd)
                return usage_error("unknown command '%s'", argv[optind]);
        nargs = argc - optind - 1;
        if (nargs < cmd->min_args || nargs > cmd->max_args)
                return usage_error("%s: %s arguments (usage: moectl %s %s)", cmd->name,
                                   nargs < cmd->min_args ? "missing" : "too many", cmd->name,
                                   cmd->args);
        for (int i = 0; i < nargs; i++)
                args[i] = argv[optind + 1 + i];
        if (o.raw && o.system)
                return usage_error("--system needs a chat: it cannot go with --raw");

        if (strcmp(cmd->name, "hash-token") == 0)
                return cmd_hash_token(args[0]);

        if (!o.token) {
                const char *t = getenv("MOED_TOKEN");

                o.token = t && t[0] ? t : NULL;
        }
        socket = resolve_socket(o.socket);
        if (!socket) {
                moectl_err("out of memory");
                return MOECTL_FAILED;
        }
        o.socket = socket;
        r = client_new(o.socket, o.token, &c, &e);
        if (r < 0) {
                moectl_err("%s", e.msg);
                return MOECTL_FAILED;
        }
        r = dispatch(cmd, c, &o, args);
        client_free(c);
        if (fflush(stdout) != 0 && r == MOECTL_OK) {
                moectl_err("writing the output failed");
                r = MOECTL_FAILED;
        }
        return r;
}
