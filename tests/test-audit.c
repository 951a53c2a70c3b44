/* test-audit: policy/audit.c and policy/audit-verify.c: the journal record
 * (every field, absent fields, content only when given), the stderr
 * fallback line, the hash-chained file (chain, tampering of every kind
 * found at the right line, rotation, restart, a damaged tail set aside, a
 * torn write cut back) and `moectl audit verify` on the same files. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <jansson.h>

#include "common/cleanup.h"
#include "policy/audit-verify.h"
#include "policy/audit.h"
#include "testutil.h"

/* ---- helpers ---- */

/* The fields a send() was given, as NUL-terminated strings. */
struct capture {
        char *f[64];
        size_t n;
        int calls;
        int ret;                /* what send() returns */
};

static int capture_send(void *user, const struct iovec *iov, size_t n)
{
        struct capture *c = user;

        for (size_t i = 0; i < c->n; i++)
                free(c->f[i]);
        c->n = 0;
        c->calls++;
        assert_true(n <= 64);
        for (size_t i = 0; i < n; i++) {
                c->f[i] = strndup(iov[i].iov_base, iov[i].iov_len);
                assert_non_null(c->f[i]);
        }
        c->n = n;
        return c->ret;
}

static void capture_free(struct capture *c)
{
        for (size_t i = 0; i < c->n; i++)
                free(c->f[i]);
        c->n = 0;
}

/* The value of KEY in the capture, or NULL. */
static const char *field(const struct capture *c, const char *key)
{
        size_t k = strlen(key);

        for (size_t i = 0; i < c->n; i++)
                if (strncmp(c->f[i], key, k) == 0 && c->f[i][k] == '=')
                        return c->f[i] + k + 1;
        return NULL;
}

static const struct audit_record served = {
        .tenant = "research",
        .uid = 1000,
        .gid = 1001,
        .pid = 4242,
        .door = "http",
        .model = "deepseek-v3",
        .request_id = "chatcmpl-0123456789abcdef01234567",
        .prompt_tokens = 12,
        .completion_tokens = 34,
        .queue_s = 0.25,
        .first_token_s = 0.5,
        .total_s = 1.234,
        .finish_reason = "stop",
};

static struct audit *open_audit(const char *file, uint64_t rotate, struct capture *cap)
{
        struct audit_config c = {
                .file = file,
                .rotate_bytes = rotate,
                .send = capture_send,
                .send_user = cap,
        };
        struct audit *a = NULL;
        struct moerr e = { "" };

        if (audit_open(&c, &a, &e) < 0)
                fail_msg("audit_open: %s", e.msg);
        return a;
}

/* Writes n request records to a fresh file. */
static char *chain_file(const char *name, int n)
{
        char *path = tu_path(name);
        struct capture cap = { .n = 0 };
        struct audit *a;

        unlink(path);
        a = open_audit(path, 0, &cap);
        for (int i = 0; i < n; i++) {
                struct audit_record r = served;
                r.completion_tokens = i;
                assert_int_equal(audit_log(a, &r), 0);
        }
        audit_close(a);
        capture_free(&cap);
        return path;
}

static char *slurp(const char *path, size_t *len)
{
        FILE *f = fopen(path, "re");
        char *buf = NULL;
        size_t cap = 0;
        FILE *m;

        assert_non_null(f);
        m = open_memstream(&buf, &cap);
        assert_non_null(m);
        for (int ch; (ch = fgetc(f)) != EOF;)
                fputc(ch, m);
        fclose(f);
        fclose(m);
        if (len)
                *len = cap;
        return buf;
}

static void spill(const char *path, const char *data, size_t len)
{
        FILE *f = fopen(path, "we");

        assert_non_null(f);
        assert_int_equal(fwrite(data, 1, len, f), len);
        assert_int_equal(fclose(f), 0);
}

/* The file's lines (with their newlines), NULL-terminated. */
static char **lines_of(const char *path, size_t *n)
{
        _cleanup_free_ char *all = slurp(path, NULL);
        char **v = calloc(1024, sizeof *v);
        char *p = all, *nl;

        assert_non_null(v);
        *n = 0;
        while (*p) {
                nl = strchr(p, '\n');
                size_t len = nl ? (size_t)(nl - p + 1) : strlen(p);
                assert_true(*n < 1023);
                v[(*n)++] = strndup(p, len);
                p += len;
        }
        return v;
}

static void lines_free(char **v)
{
        for (size_t i = 0; v[i]; i++)
                free(v[i]);
        free(v);
}

static void write_lines(const char *path, char **v, size_t n)
{
        FILE *f = fopen(path, "we");

        assert_non_null(f);
        for (size_t i = 0; i < n; i++)
                fputs(v[i], f);
        assert_int_equal(fclose(f), 0);
}

/* Verifies files and returns the report (malloc'ed). */
static char *verify(const char *const *paths, size_t n, int want_ret,
                    struct audit_verify_result *res)
{
        char *buf = NULL;
        size_t cap = 0;
        FILE *m = open_memstream(&buf, &cap);
        int r;

        assert_non_null(m);
        r = audit_verify_files(paths, n, m, res);
        fclose(m);
        printf("%s", buf);
        assert_int_equal(r, want_ret);
        return buf;
}

/* A broken file: the first problem is of this kind at this line, and the
 * report names it. */
static void expect_break(const char *path, enum audit_problem kind, size_t line)
{
        struct audit_verify_result res;
        char where[64];
        _cleanup_free_ char *rep = verify(&path, 1, -EBADMSG, &res);

        assert_int_equal(res.first, kind);
        assert_int_equal(res.first_line, line);
        assert_string_equal(res.first_path, path);
        snprintf(where, sizeof where, ":%zu: %s: ", line, audit_problem_name(kind));
        assert_non_null(strstr(rep, where));
        assert_non_null(strstr(rep, "BROKEN"));
}

/* ---- the journal record ---- */

static void audit_record_has_every_field(void **state)
{
        struct capture cap = { .n = 0 };
        struct audit *a = open_audit(NULL, 0, &cap);
        static const char *const want[][2] = {
                { "MESSAGE_ID", AUDIT_MESSAGE_ID },
                { "PRIORITY", "6" },
                { "SYSLOG_IDENTIFIER", "moed" },
                { "MESSAGE", "request chatcmpl-0123456789abcdef01234567 of tenant research "
                             "(uid 1000): 12+34 tokens, stop, 1.2 s" },
                { "MOED_TENANT", "research" },
                { "MOED_UID", "1000" },
                { "MOED_GID", "1001" },
                { "MOED_PID", "4242" },
                { "MOED_DOOR", "http" },
                { "MOED_MODEL", "deepseek-v3" },
                { "MOED_REQUEST_ID", "chatcmpl-0123456789abcdef01234567" },
                { "MOED_PROMPT_TOKENS", "12" },
                { "MOED_COMPLETION_TOKENS", "34" },
                { "MOED_QUEUE_USEC", "250000" },
                { "MOED_FIRST_TOKEN_USEC", "500000" },
                { "MOED_TOTAL_USEC", "1234000" },
                { "MOED_FINISH", "stop" },
        };

        (void)state;
        assert_int_equal(audit_log(a, &served), 0);
        assert_int_equal(cap.calls, 1);
        assert_int_equal(cap.n, ARRAY_SIZE(want));
        for (size_t i = 0; i < ARRAY_SIZE(want); i++) {
                char kv[256];
                snprintf(kv, sizeof kv, "%s=%s", want[i][0], want[i][1]);
                assert_string_equal(cap.f[i], kv);
        }
        /* no content, no refusal, no file fields */
        assert_null(field(&cap, "MOED_PROMPT"));
        assert_null(field(&cap, "MOED_ANSWER"));
        assert_null(field(&cap, "MOED_REFUSAL"));
        assert_null(field(&cap, "MOED_AUDIT_SEQ"));
        assert_int_equal(strlen(AUDIT_MESSAGE_ID), 32);
        audit_close(a);
        capture_free(&cap);
}

static void audit_content_only_when_given(void **state)
{
        char *path = tu_path("content.jsonl");
        struct capture cap = { .n = 0 };
        struct audit *a = open_audit(path, 0, &cap);
        struct audit_record r = served;
        _cleanup_free_ char *all = NULL;

        (void)state;
        assert_int_equal(audit_log(a, &r), 0);
        assert_null(field(&cap, "MOED_PROMPT"));
        r.prompt_text = "what is\nthe \"answer\"?";
        r.answer_text = "42";
        assert_int_equal(audit_log(a, &r), 0);
        assert_string_equal(field(&cap, "MOED_PROMPT"), "what is\nthe \"answer\"?");
        assert_string_equal(field(&cap, "MOED_ANSWER"), "42");
        audit_close(a);
        all = slurp(path, NULL);
        /* the first record has no content, the second has it (escaped) */
        assert_non_null(strstr(all, "\"prompt\":\"what is\\nthe \\\"answer\\\"?\""));
        assert_true(strstr(all, "\"prompt\"") > strchr(all, '\n'));
        assert_non_null(strstr(all, "\"answer\":\"42\""));
        capture_free(&cap);
}

static void audit_refusal_record(void **state)
{
        struct capture cap = { .n = 0 };
        struct audit *a = open_audit(NULL, 0, &cap);
        struct audit_record r = {
                .tenant = "research",
                .uid = 1000,
                .gid = 1000,
                .pid = 7,
                .door = "dbus",
                .model = "deepseek-v3",
                .refusal = "tenant research has 4 requests running, its MaxConcurrent=4",
        };

        (void)state;
        assert_int_equal(audit_log(a, &r), 0);
        assert_string_equal(field(&cap, "MESSAGE"),
                            "request of tenant research (uid 1000) refused: tenant research "
                            "has 4 requests running, its MaxConcurrent=4");
        assert_string_equal(field(&cap, "MOED_REFUSAL"), r.refusal);
        assert_string_equal(field(&cap, "MOED_DOOR"), "dbus");
        assert_string_equal(field(&cap, "MOED_PROMPT_TOKENS"), "0");
        /* nothing ran: no timings, no finish */
        assert_null(field(&cap, "MOED_QUEUE_USEC"));
        assert_null(field(&cap, "MOED_TOTAL_USEC"));
        assert_null(field(&cap, "MOED_FIRST_TOKEN_USEC"));
        assert_null(field(&cap, "MOED_FINISH"));
        assert_null(field(&cap, "MOED_REQUEST_ID"));
        audit_close(a);
        capture_free(&cap);
}

static void audit_absent_fields_are_left_out(void **state)
{
        struct capture cap = { .n = 0 };
        struct audit *a = open_audit(NULL, 0, &cap);
        struct audit_record r = {
                .uid = (uid_t)-1,
                .gid = (gid_t)-1,
                .pid = 0,
                .refusal = "the bearer token matches no tenant",
        };

        (void)state;
        assert_int_equal(audit_log(a, &r), 0);
        assert_string_equal(field(&cap, "MESSAGE"),
                            "request of an unknown caller refused: the bearer token matches no "
                            "tenant");
        for (const char *const *k = (const char *const[]){ "MOED_TENANT", "MOED_UID", "MOED_GID",
                                                           "MOED_PID", "MOED_DOOR", "MOED_MODEL",
                                                           NULL }; *k; k++)
                assert_null(field(&cap, *k));
        r.uid = 1234;
        assert_int_equal(audit_log(a, &r), 0);
        assert_string_equal(field(&cap, "MESSAGE"),
                            "request of uid 1234 (no tenant) refused: the bearer token matches "
                            "no tenant");
        /* a request cancelled before its first token */
        r = served;
        r.first_token_s = 0;
        r.completion_tokens = 0;
        r.finish_reason = "cancelled";
        assert_int_equal(audit_log(a, &r), 0);
        assert_null(field(&cap, "MOED_FIRST_TOKEN_USEC"));
        assert_string_equal(field(&cap, "MOED_TOTAL_USEC"), "1234000");
        assert_string_equal(field(&cap, "MOED_FINISH"), "cancelled");
        audit_close(a);
        capture_free(&cap);
}

/* ---- the fallback line ---- */

static char *fallback_of(const struct audit_config *base, const struct audit_record *r)
{
        struct audit_config c = *base;
        struct audit *a = NULL;
        struct moerr e = { "" };
        char *buf = NULL;
        size_t cap = 0;

        c.fallback = open_memstream(&buf, &cap);
        assert_non_null(c.fallback);
        assert_int_equal(audit_open(&c, &a, &e), 0);
        assert_int_equal(audit_log(a, r), 0);
        audit_close(a);
        fclose(c.fallback);
        return buf;
}

static void audit_fallback_line_without_journald(void **state)
{
        struct audit_config c = { .journal_socket = tu_path("no-such-socket") };
        struct audit_record r = served;
        _cleanup_free_ char *line = NULL;

        (void)state;
        r.request_id = "cmpl-1";
        line = fallback_of(&c, &r);
        printf("%s", line);
        assert_string_equal(line,
                            "MESSAGE_ID=" AUDIT_MESSAGE_ID " PRIORITY=6 SYSLOG_IDENTIFIER=moed "
                            "MESSAGE=\"request cmpl-1 of tenant research (uid 1000): 12+34 "
                            "tokens, stop, 1.2 s\" MOED_TENANT=research MOED_UID=1000 "
                            "MOED_GID=1001 MOED_PID=4242 MOED_DOOR=http "
                            "MOED_MODEL=deepseek-v3 MOED_REQUEST_ID=cmpl-1 "
                            "MOED_PROMPT_TOKENS=12 MOED_COMPLETION_TOKENS=34 "
                            "MOED_QUEUE_USEC=250000 MOED_FIRST_TOKEN_USEC=500000 "
                            "MOED_TOTAL_USEC=1234000 MOED_FINISH=stop\n");
}

static void audit_failing_sink_goes_to_fallback(void **state)
{
        struct capture cap = { .ret = -EIO };
        struct audit_config c = { .send = capture_send, .send_user = &cap };
        _cleanup_free_ char *line = fallback_of(&c, &served);

        (void)state;
        assert_int_equal(cap.calls, 1);
        assert_non_null(strstr(line, "MESSAGE_ID=" AUDIT_MESSAGE_ID " "));
        assert_non_null(strstr(line, " MOED_TENANT=research "));
        assert_int_equal(line[strlen(line) - 1], '\n');
        capture_free(&cap);
        /* and a working sink leaves the fallback alone */
        cap.ret = 0;
        free(line);
        line = fallback_of(&c, &served);
        assert_string_equal(line, "");
        capture_free(&cap);
}

/* With the default sink: journald's socket path holds something that is
 * not a socket, so no journald runs (sd_journal_sendv would drop the
 * record without a word): the line goes to the fallback. */
static void audit_journal_socket_must_be_a_socket(void **state)
{
        char *sock = tu_path("journal-socket");
        struct audit_config c = { .journal_socket = sock };
        _cleanup_free_ char *line = NULL;

        (void)state;
        spill(sock, "", 0);
        line = fallback_of(&c, &served);
        assert_non_null(strstr(line, " MOED_TENANT=research "));
}

static void audit_fallback_quoting(void **state)
{
        char *buf = NULL;
        size_t cap = 0;
        FILE *m = open_memstream(&buf, &cap);
#define IOV(s) { (char *)(s), sizeof(s) - 1 }
        struct iovec iov[] = {
                IOV("A=plain"),
                IOV("B="),
                IOV("C=two words"),
                IOV("D=q\"b\\s"),
                IOV("E=l1\nl2\tt\r\x01\x7f"),
                IOV("F=k=v"),
                IOV("G=caf\xc3\xa9"),
        };
#undef IOV

        (void)state;
        assert_non_null(m);
        audit_write_line(m, iov, ARRAY_SIZE(iov));
        fclose(m);
        assert_string_equal(buf, "A=plain B=\"\" C=\"two words\" D=\"q\\\"b\\\\s\" "
                                 "E=\"l1\\nl2\\tt\\r\\x01\\x7f\" F=\"k=v\" G=caf\xc3\xa9\n");
        free(buf);
}

/* ---- the chain ---- */

static void audit_chain_verifies(void **state)
{
        char *path = tu_path("chain.jsonl");
        struct capture cap = { .n = 0 };
        struct audit *a = open_audit(path, 0, &cap);
        struct audit_verify_result res;
        char prev[AUDIT_HASH_HEX + 1] = AUDIT_ZERO_HASH;
        struct stat st;
        size_t n;
        char **v;

        (void)state;
        for (int i = 0; i < 20; i++) {
                struct audit_record r = served;
                r.completion_tokens = i;
                assert_int_equal(audit_log(a, &r), 0);
                assert_int_equal(audit_seq(a), i + 1);
                /* the journal carries the file line's seq and hash */
                assert_int_equal(atoi(field(&cap, "MOED_AUDIT_SEQ")), i + 1);
                assert_int_equal(strlen(field(&cap, "MOED_AUDIT_HASH")), AUDIT_HASH_HEX);
        }
        audit_close(a);
        assert_int_equal(stat(path, &st), 0);
        assert_int_equal(st.st_mode & 0777, 0600);

        v = lines_of(path, &n);
        assert_int_equal(n, 20);
        for (size_t i = 0; i < n; i++) {
                struct audit_link l;
                const char *why = NULL;
                size_t len = strlen(v[i]) - 1;
                json_t *o = json_loadb(v[i], len, 0, NULL);

                assert_non_null(o);
                assert_int_equal(audit_link_parse(v[i], len, &l, &why), 0);
                assert_int_equal(l.seq, i + 1);
                assert_string_equal(l.prev, prev);
                assert_false(l.rotate);
                /* the keys, in order */
                assert_true(strncmp(v[i], "{\"seq\":", 7) == 0);
                assert_non_null(strstr(v[i], ",\"time\":\"20"));
                assert_string_equal(json_string_value(json_object_get(o, "tenant")), "research");
                assert_int_equal(json_integer_value(json_object_get(o, "uid")), 1000);
                assert_int_equal(json_integer_value(json_object_get(o, "completion_tokens")),
                                 (json_int_t)i);
                assert_int_equal(json_integer_value(json_object_get(o, "total_usec")), 1234000);
                assert_null(json_object_get(o, "prompt"));
                json_decref(o);
                audit_line_hash(v[i], len, prev);
        }
        /* the last journal record's hash is the last line's */
        assert_string_equal(field(&cap, "MOED_AUDIT_HASH"), prev);
        lines_free(v);
        free(verify((const char *const[]){ path }, 1, 0, &res));
        assert_int_equal(res.records, 20);
        assert_int_equal(res.first_seq, 1);
        assert_int_equal(res.last_seq, 20);
        assert_int_equal(res.problems, 0);
        assert_int_equal(audit_verify_file(path, NULL), 0);
        capture_free(&cap);
}

static void audit_verify_empty_and_missing(void **state)
{
        char *empty = tu_path("empty.jsonl");
        struct audit_verify_result res;

        (void)state;
        spill(empty, "", 0);
        free(verify((const char *const[]){ empty }, 1, 0, &res));
        assert_int_equal(res.records, 0);
        assert_int_equal(audit_verify_file(tu_path("missing.jsonl"), NULL), -ENOENT);
}

/* Tampering: each kind, found at the line it happened. */
static void audit_detects_removed_record(void **state)
{
        char *path = chain_file("removed.jsonl", 10);
        size_t n;
        char **v = lines_of(path, &n);

        (void)state;
        free(v[4]);             /* line 5, seq 5 */
        memmove(&v[4], &v[5], (n - 5 + 1) * sizeof *v);
        write_lines(path, v, n - 1);
        expect_break(path, AUDIT_REMOVED, 5);
        lines_free(v);
}

static void audit_detects_removed_records_range(void **state)
{
        char *path = chain_file("removed3.jsonl", 10);
        _cleanup_free_ char *rep = NULL;
        size_t n;
        char **v = lines_of(path, &n);

        (void)state;
        for (int i = 3; i < 6; i++)
                free(v[i]);     /* seq 4..6 */
        memmove(&v[3], &v[6], (n - 6 + 1) * sizeof *v);
        write_lines(path, v, n - 3);
        expect_break(path, AUDIT_REMOVED, 4);
        rep = verify((const char *const[]){ path }, 1, -EBADMSG, NULL);
        assert_non_null(strstr(rep, "seq 4..6 (3)"));
        lines_free(v);
}

static void audit_detects_removed_head(void **state)
{
        char *path = chain_file("head.jsonl", 5);
        size_t n;
        char **v = lines_of(path, &n);

        (void)state;
        write_lines(path, v + 1, n - 1);
        expect_break(path, AUDIT_REMOVED, 1);
        lines_free(v);
}

static void audit_detects_altered_record(void **state)
{
        char *path = chain_file("altered.jsonl", 10);
        size_t n;
        char **v = lines_of(path, &n);
        char *p = strstr(v[4], "\"completion_tokens\":4");

        (void)state;
        assert_non_null(p);
        p[strlen("\"completion_tokens\":")] = '9';      /* one byte of line 5 */
        write_lines(path, v, n);
        expect_break(path, AUDIT_ALTERED, 5);
        lines_free(v);
}

static void audit_detects_altered_prev(void **state)
{
        char *path = chain_file("altered-prev.jsonl", 10);
        size_t n;
        char **v = lines_of(path, &n);
        char *p = strstr(v[6], "\"prev\":\"");

        (void)state;
        p += 8;
        *p = *p == 'a' ? 'b' : 'a';     /* line 7's prev */
        write_lines(path, v, n);
        expect_break(path, AUDIT_ALTERED, 7);
        lines_free(v);
}

static void audit_detects_altered_seq(void **state)
{
        char *path = chain_file("altered-seq.jsonl", 10);
        size_t n;
        char **v = lines_of(path, &n);

        (void)state;
        assert_true(strncmp(v[4], "{\"seq\":5,", 9) == 0);
        v[4][7] = '8';          /* seq 5 -> 8 on line 5 */
        write_lines(path, v, n);
        expect_break(path, AUDIT_ALTERED, 5);
        lines_free(v);
}

static void audit_detects_malformed_line(void **state)
{
        char *path = chain_file("malformed.jsonl", 10);
        size_t n;
        char **v = lines_of(path, &n);

        (void)state;
        v[5][0] = '[';          /* line 6 is no longer JSON */
        write_lines(path, v, n);
        expect_break(path, AUDIT_MALFORMED, 6);
        lines_free(v);
}

static void audit_detects_swapped_records(void **state)
{
        char *path = chain_file("swapped.jsonl", 10);
        _cleanup_free_ char *rep = NULL;
        struct audit_verify_result res;
        size_t n;
        char **v = lines_of(path, &n);
        char *t = v[4];

        (void)state;
        v[4] = v[5];
        v[5] = t;               /* lines 5 and 6 */
        write_lines(path, v, n);
        expect_break(path, AUDIT_REORDERED, 5);
        /* one swap is one problem, not three */
        rep = verify((const char *const[]){ path }, 1, -EBADMSG, &res);
        assert_int_equal(res.problems, 1);
        assert_non_null(strstr(rep, "at line 6"));
        lines_free(v);
}

static void audit_detects_moved_record(void **state)
{
        char *path = chain_file("moved.jsonl", 10);
        size_t n;
        char **v = lines_of(path, &n);
        char *t = v[1];

        (void)state;
        /* seq 2 moved after seq 8: lines 1,3,4,5,6,7,8,2,9,10 */
        memmove(&v[1], &v[2], 6 * sizeof *v);
        v[7] = t;
        write_lines(path, v, n);
        expect_break(path, AUDIT_REORDERED, 2);
        lines_free(v);
}

static void audit_detects_duplicated_record(void **state)
{
        char *path = chain_file("dup.jsonl", 10);
        struct audit_verify_result res;
        size_t n;
        char **v = lines_of(path, &n);

        (void)state;
        memmove(&v[6], &v[5], (n - 5 + 1) * sizeof *v);
        v[5] = strdup(v[4]);    /* line 5 again as line 6 */
        write_lines(path, v, n + 1);
        expect_break(path, AUDIT_DUPLICATED, 6);
        free(verify((const char *const[]){ path }, 1, -EBADMSG, &res));
        assert_int_equal(res.problems, 1);
        lines_free(v);
}

static void audit_detects_duplicate_far_away(void **state)
{
        char *path = chain_file("dup-far.jsonl", 10);
        size_t n;
        char **v = lines_of(path, &n);

        (void)state;
        memmove(&v[9], &v[8], (n - 8 + 1) * sizeof *v);
        v[8] = strdup(v[2]);    /* line 3 again as line 9 */
        write_lines(path, v, n + 1);
        expect_break(path, AUDIT_DUPLICATED, 9);
        lines_free(v);
}

static void audit_detects_truncated_last_line(void **state)
{
        char *path = chain_file("trunc.jsonl", 10);
        size_t len;
        _cleanup_free_ char *all = slurp(path, &len);

        (void)state;
        spill(path, all, len - 20);
        expect_break(path, AUDIT_TRUNCATED, 10);
        /* only the newline gone: still cut short */
        spill(path, all, len - 1);
        expect_break(path, AUDIT_TRUNCATED, 10);
}

static void audit_verify_reports_every_independent_break(void **state)
{
        char *path = chain_file("two-breaks.jsonl", 20);
        struct audit_verify_result res;
        size_t n;
        char **v = lines_of(path, &n);

        (void)state;
        free(v[3]);             /* seq 4 */
        v[3] = strdup("\n");
        free(v[14]);            /* seq 15 */
        memmove(&v[14], &v[15], (n - 15 + 1) * sizeof *v);
        write_lines(path, v, n - 1);
        free(verify((const char *const[]){ path }, 1, -EBADMSG, &res));
        assert_int_equal(res.problems, 2);
        assert_int_equal(res.first, AUDIT_MALFORMED);
        assert_int_equal(res.first_line, 4);
        lines_free(v);
}

/* The limit the header documents: an altered last record has no
 * successor to give it away, but its journal copy does. */
static void audit_last_record_anchored_by_journal(void **state)
{
        char *path = tu_path("anchor.jsonl");
        struct capture cap = { .n = 0 };
        struct audit *a = open_audit(path, 0, &cap);
        char h[AUDIT_HASH_HEX + 1];
        size_t n;
        char **v;

        (void)state;
        for (int i = 0; i < 3; i++)
                assert_int_equal(audit_log(a, &served), 0);
        audit_close(a);
        v = lines_of(path, &n);
        *strstr(v[2], "research") = 'R';
        write_lines(path, v, n);
        assert_int_equal(audit_verify_file(path, NULL), 0);
        audit_line_hash(v[2], strlen(v[2]) - 1, h);
        assert_string_not_equal(h, field(&cap, "MOED_AUDIT_HASH"));
        lines_free(v);
        capture_free(&cap);
}

static void audit_link_parse_rejects(void **state)
{
        static const char *const bad[] = {
                "",
                "not json",
                "[1,2]",
                "{\"seq\":0,\"time\":\"t\",\"prev\":\"" AUDIT_ZERO_HASH "\",\"event\":\"request\"}",
                "{\"seq\":\"1\",\"time\":\"t\",\"prev\":\"" AUDIT_ZERO_HASH
                "\",\"event\":\"request\"}",
                "{\"seq\":1,\"time\":\"t\",\"prev\":\"00\",\"event\":\"request\"}",
                "{\"seq\":1,\"time\":\"t\",\"prev\":\"" AUDIT_ZERO_HASH "\"}",
                "{\"seq\":1,\"prev\":\"" AUDIT_ZERO_HASH "\",\"event\":\"request\"}",
                "{\"seq\":2,\"time\":\"t\",\"prev\":\"" AUDIT_ZERO_HASH "\",\"event\":\"rotate\"}",
                "{\"seq\":2,\"time\":\"t\",\"prev\":\"" AUDIT_ZERO_HASH "\",\"event\":\"rotate\","
                "\"rotated_from\":\"../x\"}",
                "{\"seq\":1,\"seq\":1,\"time\":\"t\",\"prev\":\"" AUDIT_ZERO_HASH
                "\",\"event\":\"request\"}",
                "{\"seq\":1,\"time\":\"t\",\"prev\":\"" AUDIT_ZERO_HASH
                "\",\"event\":\"request\"} x",
        };
        struct audit_link l;
        const char *why;

        (void)state;
        for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
                why = NULL;
                assert_int_equal(audit_link_parse(bad[i], strlen(bad[i]), &l, &why), -EBADMSG);
                assert_non_null(why);
        }
        static const char good[] = "{\"seq\":7,\"time\":\"t\",\"prev\":\"" AUDIT_ZERO_HASH
                                   "\",\"event\":\"rotate\",\"rotated_from\":\"a.jsonl.1\"}";
        assert_int_equal(audit_link_parse(good, strlen(good), &l, &why), 0);
        assert_int_equal(l.seq, 7);
        assert_true(l.rotate);
        assert_string_equal(l.rotated_from, "a.jsonl.1");
        assert_false(l.broken);
}

/* ---- rotation and restart ---- */

static void audit_rotation_keeps_the_chain(void **state)
{
        char *path = tu_path("rot/audit.jsonl");
        char *dir = tu_path("rot");
        struct capture cap = { .n = 0 };
        struct audit *a;
        struct audit_verify_result res;
        char *files[16];
        size_t nf = 0;
        struct moerr e = { "" };

        (void)state;
        assert_int_equal(mkdir(dir, 0700), 0);
        a = open_audit(path, 1500, &cap);
        for (int i = 0; i < 30; i++)
                assert_int_equal(audit_log(a, &served), 0);
        /* and once by hand */
        assert_int_equal(audit_rotate(a, &e), 0);
        assert_int_equal(audit_log(a, &served), 0);
        audit_close(a);
        capture_free(&cap);

        /* every file that is not the live one was rotated to FILE.<seq> */
        _cleanup_free_ char *first = slurp(tu_path("rot/audit.jsonl.1"), NULL);
        assert_true(strncmp(first, "{\"seq\":1,", 9) == 0);
        for (uint64_t s = 1; s < 40 && nf < 15; s++) {
                char name[64];
                snprintf(name, sizeof name, "rot/audit.jsonl.%llu", (unsigned long long)s);
                if (access(tu_path(name), F_OK) == 0)
                        files[nf++] = tu_path(name);
        }
        assert_true(nf >= 3);
        files[nf++] = path;
        /* the live file starts with a rotate record naming its predecessor */
        _cleanup_free_ char *live = slurp(path, NULL);
        assert_non_null(strstr(live, "\"event\":\"rotate\",\"rotated_from\":\"audit.jsonl."));
        assert_int_equal(access(tu_path("rot/audit.jsonl.rotating"), F_OK), -1);

        /* given in any order */
        for (size_t i = 0; i < nf / 2; i++) {
                char *t = files[i];
                files[i] = files[nf - 1 - i];
                files[nf - 1 - i] = t;
        }
        free(verify((const char *const *)files, nf, 0, &res));
        assert_int_equal(res.files, nf);
        assert_int_equal(res.first_seq, 1);
        assert_int_equal(res.last_seq, 31 + nf - 1);    /* 31 requests, a rotate per file */
        assert_int_equal(res.records, res.last_seq);

        /* the live file alone: its predecessor is named, not checked */
        _cleanup_free_ char *rep = verify((const char *const[]){ path }, 1, 0, NULL);
        assert_non_null(strstr(rep, "not given"));

        /* a middle file missing */
        files[nf / 2] = files[nf - 1];
        free(verify((const char *const *)files, nf - 1, -EBADMSG, &res));
        assert_int_equal(res.first, AUDIT_REMOVED);
        assert_int_equal(res.first_line, 1);
}

static void audit_rotation_link_tampered(void **state)
{
        char *dir = tu_path("rot2");
        char *path = tu_path("rot2/a.jsonl");
        char *old = tu_path("rot2/a.jsonl.1");
        struct capture cap = { .n = 0 };
        struct audit_verify_result res;
        struct moerr e = { "" };
        struct audit *a;
        size_t n;
        char **v;

        (void)state;
        assert_int_equal(mkdir(dir, 0700), 0);
        a = open_audit(path, 0, &cap);
        for (int i = 0; i < 5; i++)
                assert_int_equal(audit_log(a, &served), 0);
        assert_int_equal(audit_rotate(a, &e), 0);
        assert_int_equal(audit_log(a, &served), 0);
        audit_close(a);
        capture_free(&cap);
        assert_int_equal(audit_verify_files((const char *const[]){ old, path }, 2, NULL, NULL), 0);

        /* the old file's last record altered: the new file's link shows it */
        v = lines_of(old, &n);
        *strstr(v[4], "research") = 'R';
        write_lines(old, v, n);
        lines_free(v);
        free(verify((const char *const[]){ old, path }, 2, -EBADMSG, &res));
        assert_int_equal(res.first, AUDIT_BROKEN_LINK);
        assert_string_equal(res.first_path, path);
        assert_int_equal(res.first_line, 1);
}

static void audit_restart_continues_the_chain(void **state)
{
        char *path = tu_path("restart.jsonl");
        struct capture cap = { .n = 0 };
        struct audit_verify_result res;
        struct audit *a;

        (void)state;
        for (int round = 0; round < 3; round++) {
                a = open_audit(path, 0, &cap);
                assert_false(audit_recovered(a));
                assert_int_equal(audit_seq(a), 4 * round);
                for (int i = 0; i < 4; i++)
                        assert_int_equal(audit_log(a, &served), 0);
                audit_close(a);
        }
        free(verify((const char *const[]){ path }, 1, 0, &res));
        assert_int_equal(res.records, 12);
        assert_int_equal(res.last_seq, 12);
        capture_free(&cap);
}

static void audit_damaged_tail_is_set_aside(void **state)
{
        char *dir = tu_path("dmg");
        char *path = tu_path("dmg/audit.jsonl");
        char *aside = tu_path("dmg/audit.jsonl.1.broken");
        struct capture cap = { .n = 0 };
        struct audit_verify_result res;
        struct audit *a;
        size_t len;
        char *all;

        (void)state;
        assert_int_equal(mkdir(dir, 0700), 0);
        a = open_audit(path, 0, &cap);
        for (int i = 0; i < 5; i++)
                assert_int_equal(audit_log(a, &served), 0);
        audit_close(a);
        all = slurp(path, &len);
        spill(path, all, len - 30);     /* a crash in the middle of record 5 */
        free(all);

        a = open_audit(path, 0, &cap);
        assert_true(audit_recovered(a));
        /* continues from the last whole record (4): the rotate record is 5 */
        assert_int_equal(audit_seq(a), 5);
        assert_int_equal(audit_log(a, &served), 0);
        audit_close(a);
        all = slurp(path, NULL);
        assert_non_null(strstr(all, "\"event\":\"rotate\",\"rotated_from\":"
                                    "\"audit.jsonl.1.broken\",\"broken\":\"the last line is cut"));
        free(all);
        /* the new file is sound; with the old one the cut shows */
        assert_int_equal(audit_verify_file(path, NULL), 0);
        free(verify((const char *const[]){ path, aside }, 2, -EBADMSG, &res));
        assert_int_equal(res.problems, 1);
        assert_int_equal(res.first, AUDIT_TRUNCATED);
        assert_string_equal(res.first_path, aside);
        assert_int_equal(res.first_line, 5);

        /* last two records that do not chain: set aside again */
        size_t n;
        char **v = lines_of(path, &n);
        *strstr(v[0], "audit") = 'A';   /* the rotate record, before the last */
        write_lines(path, v, n);
        lines_free(v);
        a = open_audit(path, 0, &cap);
        assert_true(audit_recovered(a));
        audit_close(a);
        assert_int_equal(access(tu_path("dmg/audit.jsonl.5.broken"), F_OK), 0);

        /* a file that is not ours at all */
        spill(path, "hello\n", 6);
        a = open_audit(path, 0, &cap);
        assert_true(audit_recovered(a));
        assert_int_equal(audit_seq(a), 1);     /* nothing to continue: a new chain */
        audit_close(a);
        assert_int_equal(access(tu_path("dmg/audit.jsonl.broken"), F_OK), 0);
        assert_int_equal(audit_verify_file(path, NULL), 0);
        capture_free(&cap);
}

static void audit_interrupted_rotation(void **state)
{
        char *dir = tu_path("intr");
        char *path = tu_path("intr/a.jsonl");
        char *rot = tu_path("intr/a.jsonl.rotating");
        struct capture cap = { .n = 0 };
        struct moerr e = { "" };
        struct audit *a;

        (void)state;
        assert_int_equal(mkdir(dir, 0700), 0);
        a = open_audit(path, 0, &cap);
        for (int i = 0; i < 3; i++)
                assert_int_equal(audit_log(a, &served), 0);
        audit_close(a);

        /* cut before the renames: the half-made file is dropped */
        spill(rot, "junk\n", 5);
        a = open_audit(path, 0, &cap);
        assert_int_equal(access(rot, F_OK), -1);
        assert_int_equal(audit_seq(a), 3);
        assert_false(audit_recovered(a));
        /* cut between them: FILE is gone, FILE.rotating becomes it */
        assert_int_equal(audit_rotate(a, &e), 0);
        audit_close(a);
        assert_int_equal(rename(path, rot), 0);
        a = open_audit(path, 0, &cap);
        assert_false(audit_recovered(a));
        assert_int_equal(audit_seq(a), 4);
        assert_int_equal(audit_log(a, &served), 0);
        audit_close(a);
        assert_int_equal(audit_verify_files((const char *const[]){ tu_path("intr/a.jsonl.1"),
                                                                   path }, 2, NULL, NULL), 0);
        capture_free(&cap);
}

/* A write that fails halfway (the file size limit) is cut back off. */
static void audit_torn_write_is_cut_back(void **state)
{
        char *path = tu_path("torn.jsonl");
        struct capture cap = { .n = 0 };
        struct audit *a = open_audit(path, 0, &cap);
        struct rlimit old, lim;
        uint64_t size;

        (void)state;
        assert_int_equal(audit_log(a, &served), 0);
        size = audit_file_size(a);
        assert_int_equal(getrlimit(RLIMIT_FSIZE, &old), 0);
        signal(SIGXFSZ, SIG_IGN);
        lim = old;
        lim.rlim_cur = size + 40;
        assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
        assert_int_equal(audit_log(a, &served), -EFBIG);
        assert_int_equal(setrlimit(RLIMIT_FSIZE, &old), 0);
        signal(SIGXFSZ, SIG_DFL);
        /* the journal record still went out, without a file line */
        assert_int_equal(cap.calls, 2);
        assert_null(field(&cap, "MOED_AUDIT_SEQ"));
        assert_int_equal(audit_file_size(a), size);
        assert_int_equal(audit_log(a, &served), 0);
        assert_int_equal(audit_seq(a), 2);
        audit_close(a);
        assert_int_equal(audit_verify_file(path, NULL), 0);
        capture_free(&cap);
}

static void audit_open_errors(void **state)
{
        struct capture cap = { .n = 0 };
        struct audit_config c = { .send = capture_send, .send_user = &cap };
        char *link = tu_path("link.jsonl");
        struct audit *a = NULL;
        struct moerr e = { "" };

        (void)state;
        c.file = tu_path("no-dir/audit.jsonl");
        assert_int_equal(audit_open(&c, &a, &e), -ENOENT);
        assert_non_null(strstr(e.msg, "no-dir"));
        printf("  %s\n", e.msg);

        c.file = tu_path("");   /* the directory itself: "dir/" */
        assert_int_equal(audit_open(&c, &a, &e), -EINVAL);
        printf("  %s\n", e.msg);

        assert_int_equal(mkdir(tu_path("adir"), 0700), 0);
        c.file = tu_path("adir");
        assert_true(audit_open(&c, &a, &e) < 0);
        printf("  %s\n", e.msg);

        assert_int_equal(symlink(tu_path("target.jsonl"), link), 0);
        c.file = link;
        assert_int_equal(audit_open(&c, &a, &e), -ELOOP);
        assert_non_null(strstr(e.msg, "symbolic link"));
        printf("  %s\n", e.msg);

        /* no file: rotation has nothing to do */
        c.file = NULL;
        assert_int_equal(audit_open(&c, &a, &e), 0);
        assert_int_equal(audit_rotate(a, &e), -ENOENT);
        audit_close(a);
}

static void audit_file_made_private(void **state)
{
        char *path = tu_path("wide.jsonl");
        struct capture cap = { .n = 0 };
        struct audit *a;
        struct stat st;

        (void)state;
        spill(path, "", 0);
        assert_int_equal(chmod(path, 0644), 0);
        a = open_audit(path, 0, &cap);
        audit_close(a);
        assert_int_equal(stat(path, &st), 0);
        assert_int_equal(st.st_mode & 0777, 0600);
}

static void audit_bad_utf8_still_recorded(void **state)
{
        char *path = tu_path("utf8.jsonl");
        struct capture cap = { .n = 0 };
        struct audit *a = open_audit(path, 0, &cap);
        struct audit_record r = served;
        _cleanup_free_ char *all = NULL;

        (void)state;
        r.refusal = "model 'x\xff\xc3' does not exist";
        r.answer_text = "\xed\xa0\x80 surrogate";
        assert_int_equal(audit_log(a, &r), 0);
        audit_close(a);
        all = slurp(path, NULL);
        assert_non_null(strstr(all, "\"refusal\":\"model 'x\xef\xbf\xbd\xef\xbf\xbd' does"));
        assert_non_null(strstr(all, "\"answer\":\"\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd surr"));
        assert_int_equal(audit_verify_file(path, NULL), 0);
        capture_free(&cap);
}

/* ---- moectl audit verify ---- */

static int run_moectl(char *const argv[], char **out)
{
        int pfd[2], status;
        pid_t pid;
        FILE *m;
        size_t cap = 0;
        char buf[4096];
        ssize_t n;

        assert_int_equal(pipe(pfd), 0);
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                dup2(pfd[1], 1);
                dup2(pfd[1], 2);
                close(pfd[0]);
                execv(argv[0], argv);
                _exit(127);
        }
        close(pfd[1]);
        m = open_memstream(out, &cap);
        while ((n = read(pfd[0], buf, sizeof buf)) > 0)
                fwrite(buf, 1, (size_t)n, m);
        fclose(m);
        close(pfd[0]);
        assert_int_equal(waitpid(pid, &status, 0), pid);
        assert_true(WIFEXITED(status));
        return WEXITSTATUS(status);
}

static void audit_moectl_verify(void **state)
{
        const char *root = getenv("MOED_BUILD_ROOT");
        char moectl[4096];
        char *path = chain_file("cli.jsonl", 8);
        char *out = NULL;
        size_t n;
        char **v;

        (void)state;
        assert_non_null(root);
        snprintf(moectl, sizeof moectl, "%s/cli/moectl", root);
        if (access(moectl, X_OK) != 0)
                fail_msg("%s is not built (ninja cli/moectl)", moectl);
        assert_int_equal(run_moectl((char *const[]){ moectl, "audit", "verify", path, NULL },
                                    &out), 0);
        printf("%s", out);
        assert_non_null(strstr(out, "8 records, seq 1..8: intact"));
        free(out);

        v = lines_of(path, &n);
        free(v[2]);
        memmove(&v[2], &v[3], (n - 3 + 1) * sizeof *v);
        write_lines(path, v, n - 1);
        lines_free(v);
        assert_int_equal(run_moectl((char *const[]){ moectl, "audit", "verify", path, NULL },
                                    &out), 1);
        printf("%s", out);
        assert_non_null(strstr(out, "cli.jsonl:3: removed: record seq 3 was removed"));
        free(out);

        assert_int_equal(run_moectl((char *const[]){ moectl, "audit", "verify", NULL }, &out),
                         2);
        free(out);
        assert_int_equal(run_moectl((char *const[]){ moectl, "audit", "frobnicate", path, NULL },
                                    &out), 2);
        free(out);
        assert_int_equal(run_moectl((char *const[]){ moectl, "audit", "verify",
                                                     tu_path("nope.jsonl"), NULL }, &out), 1);
        assert_non_null(strstr(out, "cannot open"));
        free(out);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(audit_record_has_every_field),
                cmocka_unit_test(audit_content_only_when_given),
                cmocka_unit_test(audit_refusal_record),
                cmocka_unit_test(audit_absent_fields_are_left_out),
                cmocka_unit_test(audit_fallback_line_without_journald),
                cmocka_unit_test(audit_failing_sink_goes_to_fallback),
                cmocka_unit_test(audit_journal_socket_must_be_a_socket),
                cmocka_unit_test(audit_fallback_quoting),
                cmocka_unit_test(audit_chain_verifies),
                cmocka_unit_test(audit_verify_empty_and_missing),
                cmocka_unit_test(audit_detects_removed_record),
                cmocka_unit_test(audit_detects_removed_records_range),
                cmocka_unit_test(audit_detects_removed_head),
                cmocka_unit_test(audit_detects_altered_record),
                cmocka_unit_test(audit_detects_altered_prev),
                cmocka_unit_test(audit_detects_altered_seq),
                cmocka_unit_test(audit_detects_malformed_line),
                cmocka_unit_test(audit_detects_swapped_records),
                cmocka_unit_test(audit_detects_moved_record),
                cmocka_unit_test(audit_detects_duplicated_record),
                cmocka_unit_test(audit_detects_duplicate_far_away),
                cmocka_unit_test(audit_detects_truncated_last_line),
                cmocka_unit_test(audit_verify_reports_every_independent_break),
                cmocka_unit_test(audit_last_record_anchored_by_journal),
                cmocka_unit_test(audit_link_parse_rejects),
                cmocka_unit_test(audit_rotation_keeps_the_chain),
                cmocka_unit_test(audit_rotation_link_tampered),
                cmocka_unit_test(audit_restart_continues_the_chain),
                cmocka_unit_test(audit_damaged_tail_is_set_aside),
                cmocka_unit_test(audit_interrupted_rotation),
                cmocka_unit_test(audit_torn_write_is_cut_back),
                cmocka_unit_test(audit_open_errors),
                cmocka_unit_test(audit_file_made_private),
                cmocka_unit_test(audit_bad_utf8_still_recorded),
                cmocka_unit_test(audit_moectl_verify),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
