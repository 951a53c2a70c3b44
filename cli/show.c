/* show.c: the commands that ask moed a question and print the answer:
 * models, status, usage, tokenize, health. Humans get aligned columns
 * (stable: scripts and the integration tests read them too); --json prints
 * moed's answer on one line. */
#include "moectl.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/cleanup.h"

#define TABLE_MAX_COLS 8

/* Rows of strings printed with each column as wide as its widest cell,
 * two spaces apart, the last column unpadded. */
struct table {
        size_t ncol, nrow, cap;
        char **cells;
};

static void table_free(struct table *t)
{
        for (size_t i = 0; i < t->nrow * t->ncol; i++)
                free(t->cells[i]);
        free(t->cells);
}

static int table_add(struct table *t, const char *const *row)
{
        char **p;

        if (t->nrow == t->cap) {
                size_t ncap = t->cap ? 2 * t->cap : 8;

                p = realloc(t->cells, ncap * t->ncol * sizeof *p);
                if (!p)
                        return -ENOMEM;
                t->cells = p;
                t->cap = ncap;
        }
        p = t->cells + t->nrow * t->ncol;
        for (size_t i = 0; i < t->ncol; i++) {
                p[i] = strdup(row[i] ? row[i] : "-");
                if (!p[i]) {
                        while (i--)
                                free(p[i]);
                        return -ENOMEM;
                }
        }
        t->nrow++;
        return 0;
}

static void table_print(const struct table *t)
{
        size_t w[TABLE_MAX_COLS] = { 0 };

        for (size_t r = 0; r < t->nrow; r++)
                for (size_t c = 0; c < t->ncol; c++)
                        w[c] = MO_MAX(w[c], strlen(t->cells[r * t->ncol + c]));
        for (size_t r = 0; r < t->nrow; r++) {
                for (size_t c = 0; c < t->ncol; c++) {
                        const char *s = t->cells[r * t->ncol + c];

                        if (c + 1 < t->ncol)
                                printf("%-*s  ", (int)w[c], s);
                        else
                                printf("%s\n", s);
                }
        }
}

static int print_json(json_t *j)
{
        _cleanup_free_ char *s = json_dumps(j, JSON_COMPACT | JSON_ENCODE_ANY);

        if (!s) {
                moectl_err("out of memory");
                return MOECTL_FAILED;
        }
        puts(s);
        return MOECTL_OK;
}

/* A JSON member as text for a table cell: integers as they are, strings
 * as they are, anything else (or absent) as NULL, shown as "-". */
static const char *cell(json_t *obj, const char *key, char *buf, size_t n)
{
        json_t *v = json_object_get(obj, key);

        if (json_is_string(v))
                return json_string_value(v);
        if (json_is_integer(v)) {
                snprintf(buf, n, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
                return buf;
        }
        if (json_is_real(v)) {
                snprintf(buf, n, "%g", json_real_value(v));
                return buf;
        }
        if (json_is_boolean(v))
                return json_is_true(v) ? "yes" : "no";
        return NULL;
}

static void format_bytes(json_t *v, char *buf, size_t n)
{
        static const char *const unit[] = { "B", "KiB", "MiB", "GiB", "TiB" };
        double b;
        size_t u = 0;

        if (!json_is_integer(v)) {
                snprintf(buf, n, "-");
                return;
        }
        b = (double)json_integer_value(v);
        while (b >= 1024 && u + 1 < ARRAY_SIZE(unit)) {
                b /= 1024;
                u++;
        }
        if (u == 0)
                snprintf(buf, n, "%.0f B", b);
        else
                snprintf(buf, n, "%.1f %s", b, unit[u]);
}

static void format_uptime(json_t *v, char *buf, size_t n)
{
        long long s;

        if (!json_is_number(v)) {
                snprintf(buf, n, "-");
                return;
        }
        s = (long long)json_number_value(v);
        if (s >= 86400)
                snprintf(buf, n, "%lldd %lldh %lldm", s / 86400, s % 86400 / 3600,
                         s % 3600 / 60);
        else if (s >= 3600)
                snprintf(buf, n, "%lldh %lldm %llds", s / 3600, s % 3600 / 60, s % 60);
        else if (s >= 60)
                snprintf(buf, n, "%lldm %llds", s / 60, s % 60);
        else
                snprintf(buf, n, "%llds", s);
}

int cmd_models(struct client *c, const struct moectl_opts *o)
{
        struct client_reply rep = { .retry_after = -1 };
        struct table t = { .ncol = 3 };
        json_t *j = NULL, *m;
        size_t i;
        int r;

        r = moectl_call(c, o, "/v1/models", NULL, &j, &rep);
        client_reply_free(&rep);
        if (r)
                return r;
        if (o->json) {
                r = print_json(j);
                json_decref(j);
                return r;
        }
        r = table_add(&t, (const char *const[]){ "MODEL", "CREATED", "OWNED BY" });
        json_array_foreach(json_object_get(j, "data"), i, m) {
                json_t *cr = json_object_get(m, "created");
                char when[32] = "-";
                struct tm tm;
                time_t tt;

                if (json_is_integer(cr)) {
                        tt = (time_t)json_integer_value(cr);
                        if (gmtime_r(&tt, &tm))
                                strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
                }
                r |= table_add(&t, (const char *const[]){
                        json_string_value(json_object_get(m, "id")), when,
                        json_string_value(json_object_get(m, "owned_by")) });
        }
        if (r == 0)
                table_print(&t);
        table_free(&t);
        json_decref(j);
        if (r) {
                moectl_err("out of memory");
                return MOECTL_FAILED;
        }
        return MOECTL_OK;
}

/* "cpu (16 threads)", or for other kinds the kind and its fields. */
static void print_devices(json_t *devs)
{
        size_t i;
        json_t *d;

        printf("devices:    ");
        if (!json_array_size(devs))
                printf("-");
        json_array_foreach(devs, i, d) {
                const char *key, *sep = " (";
                json_t *v;
                char buf[64];

                printf("%s%s", i ? ", " : "", json_string_value(json_object_get(d, "kind")) ?: "?");
                json_object_foreach(d, key, v) {
                        const char *s = cell(d, key, buf, sizeof buf);

                        if (strcmp(key, "kind") == 0 || !s)
                                continue;
                        if (strcmp(key, "threads") == 0)
                                printf("%s%s threads", sep, s);
                        else
                                printf("%s%s %s", sep, key, s);
                        sep = ", ";
                }
                if (strcmp(sep, ", ") == 0)
                        printf(")");
        }
        printf("\n");
}

static int print_status(json_t *j)
{
        json_t *q = json_object_get(j, "queue");
        json_t *res = json_object_get(j, "residency");
        struct table t = { .ncol = 6 };
        char b1[32], b2[32], b3[32];
        size_t i;
        json_t *m;
        int r;

        format_uptime(json_object_get(j, "uptime_s"), b1, sizeof b1);
        printf("version:    %s\n", json_string_value(json_object_get(j, "version")) ?: "-");
        printf("state:      %s\n", json_string_value(json_object_get(j, "state")) ?: "-");
        printf("uptime:     %s\n", b1);
        printf("queue:      %s waiting, %s running, %s active requests\n",
               cell(q, "waiting", b1, sizeof b1) ?: "-", cell(q, "running", b2, sizeof b2) ?: "-",
               cell(q, "active_requests", b3, sizeof b3) ?: "-");
        if (res) {
                const char *detail = json_string_value(json_object_get(res, "detail"));

                printf("residency:  %s, %s%s%s\n",
                       json_string_value(json_object_get(res, "mode")) ?: "-",
                       json_is_false(json_object_get(res, "ok")) ? "NOT OK" : "ok",
                       detail && detail[0] ? ": " : "", detail ? detail : "");
        }
        print_devices(json_object_get(j, "devices"));
        printf("\n");

        r = table_add(&t, (const char *const[]){ "MODEL", "NAME", "CONTEXT", "WEIGHTS",
                                                 "KV BLOCKS", "PATH" });
        json_array_foreach(json_object_get(j, "models"), i, m) {
                char ctx[32], w[32], kv[64], u[32], tot[32];

                format_bytes(json_object_get(m, "weight_bytes"), w, sizeof w);
                snprintf(kv, sizeof kv, "%s/%s", cell(m, "kv_blocks_used", u, sizeof u) ?: "-",
                         cell(m, "kv_blocks_total", tot, sizeof tot) ?: "-");
                r |= table_add(&t, (const char *const[]){
                        json_string_value(json_object_get(m, "id")),
                        json_string_value(json_object_get(m, "name")),
                        cell(m, "context", ctx, sizeof ctx), w, kv,
                        json_string_value(json_object_get(m, "path")) });
        }
        if (r == 0)
                table_print(&t);
        table_free(&t);
        return r ? -ENOMEM : 0;
}

int cmd_status(struct client *c, const struct moectl_opts *o)
{
        struct client_reply rep = { .retry_after = -1 };
        json_t *j = NULL;
        int r;

        r = moectl_call(c, o, "/v1/moed/status", NULL, &j, &rep);
        client_reply_free(&rep);
        if (r)
                return r;
        if (o->json)
                r = print_json(j);
        else if (print_status(j) < 0) {
                moectl_err("out of memory");
                r = MOECTL_FAILED;
        }
        json_decref(j);
        return r;
}

int cmd_usage(struct client *c, const struct moectl_opts *o)
{
        static const char *const keys[] = { "requests", "refusals", "prompt_tokens",
                                            "completion_tokens", "active", "queued" };
        struct client_reply rep = { .retry_after = -1 };
        struct table t = { .ncol = 7 };
        json_t *j = NULL, *tn;
        size_t i;
        int r;

        r = moectl_call(c, o, "/v1/moed/usage", NULL, &j, &rep);
        client_reply_free(&rep);
        if (r)
                return r;
        if (o->json) {
                r = print_json(j);
                json_decref(j);
                return r;
        }
        printf("tenant: %s\n", json_string_value(json_object_get(j, "tenant")) ?: "-");
        r = table_add(&t, (const char *const[]){ "TENANT", "REQUESTS", "REFUSALS",
                                                 "PROMPT TOKENS", "COMPLETION TOKENS", "ACTIVE",
                                                 "QUEUED" });
        json_array_foreach(json_object_get(j, "tenants"), i, tn) {
                char b[ARRAY_SIZE(keys)][32];
                const char *row[7] = { json_string_value(json_object_get(tn, "name")) };

                for (size_t k = 0; k < ARRAY_SIZE(keys); k++)
                        row[k + 1] = cell(tn, keys[k], b[k], sizeof b[k]);
                r |= table_add(&t, row);
        }
        if (r == 0)
                table_print(&t);
        table_free(&t);
        json_decref(j);
        if (r) {
                moectl_err("out of memory");
                return MOECTL_FAILED;
        }
        return MOECTL_OK;
}

/* Reads all of stdin (for the "-" arguments). NULL when it cannot. */
char *moectl_read_stdin(void)
{
        char *buf = NULL;
        size_t len = 0;
        FILE *m = open_memstream(&buf, &len);
        char chunk[65536];
        size_t n;

        if (!m)
                return NULL;
        while ((n = fread(chunk, 1, sizeof chunk, stdin)) > 0)
                if (fwrite(chunk, 1, n, m) != n)
                        break;
        if (fclose(m) != 0 || ferror(stdin)) {
                free(buf);
                return NULL;
        }
        return buf;
}

int cmd_tokenize(struct client *c, const struct moectl_opts *o, const char *model,
                 const char *text)
{
        struct client_reply rep = { .retry_after = -1 };
        _cleanup_free_ char *in = NULL;
        json_t *req, *j = NULL, *ids, *id;
        size_t i;
        int r;

        if (strcmp(text, "-") == 0) {
                in = moectl_read_stdin();
                if (!in) {
                        moectl_err("reading stdin failed");
                        return MOECTL_FAILED;
                }
                text = in;
        }
        req = json_pack("{s:s, s:s, s:b}", "model", model, "prompt", text, "add_special", 1);
        if (!req) {
                moectl_err("the text is not valid UTF-8");
                return MOECTL_USAGE;
        }
        r = moectl_call(c, o, "/v1/moed/tokenize", req, &j, &rep);
        json_decref(req);
        client_reply_free(&rep);
        if (r)
                return r;
        if (o->json) {
                r = print_json(j);
                json_decref(j);
                return r;
        }
        ids = json_object_get(j, "tokens");
        json_array_foreach(ids, i, id)
                printf("%s%" JSON_INTEGER_FORMAT, i ? " " : "", json_integer_value(id));
        printf("\n%zu tokens\n", json_array_size(ids));
        json_decref(j);
        return MOECTL_OK;
}

/* /health answers 503 with a body when moed is up but not serving, which
 * is an answer rather than an API error. */
int cmd_health(struct client *c, const struct moectl_opts *o)
{
        struct client_reply rep = { .retry_after = -1 };
        struct moerr e = { "" };
        json_t *j = NULL;
        const char *st;
        int r;

        r = client_request(c, "/health", NULL, 10, &rep, &e);
        if (r < 0 || (rep.status != 200 && rep.status != 503)) {
                r = moectl_fail(o, r, &e, &rep);
                client_reply_free(&rep);
                return r;
        }
        j = json_loadb(rep.body ? rep.body : "", rep.len, 0, NULL);
        st = json_string_value(json_object_get(j, "status"));
        if (o->json && j)
                print_json(j);
        else if (rep.status == 200)
                printf("%s\n", st ? st : "ok");
        if (rep.status != 200 && !o->json) {
                const char *msg = json_string_value(json_object_get(json_object_get(j, "error"),
                                                                    "message"));

                moectl_err("moed is not ready: %s", msg ? msg : st ? st : "HTTP 503");
        }
        r = rep.status == 200 ? MOECTL_OK : MOECTL_FAILED;
        json_decref(j);
        client_reply_free(&rep);
        return r;
}
