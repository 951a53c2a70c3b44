/* test-usage-store: policy/usage-store.c: usage survives a save and load,
 * a crash before the rename leaves the old file loadable, every kind of
 * corrupt file is detected, reported and set aside while the book starts
 * empty and saving goes on, unknown tenants are kept, bucket debts age
 * with the wall clock, and symlinks and odd files are not followed. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/cleanup.h"
#include "policy/usage-store.h"
#include "testutil.h"

#define WALL 1700000000.0

struct fake_clock {
        double now, wall;
};

static double fake_now(void *ud) { return ((struct fake_clock *)ud)->now; }
static double fake_wall(void *ud) { return ((struct fake_clock *)ud)->wall; }

static struct fake_clock clk = { 1000, WALL };

static struct quota_book *book(void)
{
        struct quota_clock c = { fake_now, fake_wall, &clk };
        struct quota_book *b = quota_book_new(&c);

        assert_non_null(b);
        return b;
}

/* A fresh state directory per test. */
static const char *state_dir(const char *name)
{
        char *d = tu_path(name);

        assert_int_equal(mkdir(d, 0700), 0);
        return d;
}

static char *file_in(const char *dir, const char *name)
{
        char *p;

        assert_true(asprintf(&p, "%s/%s", dir, name) > 0);
        return p;
}

static bool exists(const char *dir, const char *name)
{
        _cleanup_free_ char *p = file_in(dir, name);
        struct stat st;

        return lstat(p, &st) == 0;
}

static void write_bytes(const char *dir, const char *name, const void *data, size_t n)
{
        _cleanup_free_ char *p = file_in(dir, name);
        FILE *f = fopen(p, "w");

        assert_non_null(f);
        assert_int_equal(fwrite(data, 1, n, f), n);
        assert_int_equal(fclose(f), 0);
}

static char *read_text(const char *dir, const char *name, size_t *n)
{
        _cleanup_free_ char *p = file_in(dir, name);
        FILE *f = fopen(p, "r");
        char *buf = calloc(1, 1 << 20);

        assert_non_null(f);
        assert_non_null(buf);
        *n = fread(buf, 1, (1 << 20) - 1, f);
        fclose(f);
        return buf;
}

static struct tenant_set *set_of(const char *name, const char *keys)
{
        struct tenant_set *s = tenant_set_new();
        char text[512];
        struct moerr e = {0};

        assert_non_null(s);
        snprintf(text, sizeof text, "[Tenant]\n%s", keys);
        if (tenant_set_add_text(s, name, text, &e) < 0)
                fail_msg("%s", e.msg);
        return s;
}

/* A book with some use: alice 2 requests, bob refused twice. */
static struct quota_book *used_book(int64_t prompt)
{
        struct quota_book *b = book();
        struct tenant_set *s = set_of("alice", "TokensPerMinute=6000\nTokensPerDay=86400\n");
        struct moerr e = {0};
        struct quota_ticket tk;
        struct quota_refusal why;

        assert_int_equal(tenant_set_add_text(s, "bob", "[Tenant]\nMaxConcurrent=0\n", &e), 0);
        assert_int_equal(quota_book_reload(b, s), 0);
        for (int i = 0; i < 2; i++) {
                assert_int_equal(quota_admit(b, tenant_set_get(s, 0), NULL, prompt, 0, false,
                                             &tk, &why), 0);
                quota_charge_output(b, &tk, 7, &why);
                quota_release(b, &tk, 7);
        }
        for (int i = 0; i < 2; i++)
                assert_int_equal(quota_admit(b, tenant_set_get(s, 1), NULL, 1, 0, false, &tk,
                                             &why), -EACCES);
        tenant_set_free(s);
        return b;
}

static void save_ok(const char *dir, const struct quota_book *b)
{
        struct moerr e = {0};

        if (usage_store_save(dir, b, &e) < 0)
                fail_msg("%s", e.msg);
        assert_false(exists(dir, "usage.json.tmp"));
}

static struct quota_book *load_ok(const char *dir)
{
        struct quota_book *b = book();
        struct moerr e = {0};

        if (usage_store_load(dir, b, &e) < 0)
                fail_msg("%s", e.msg);
        return b;
}

static void same_usage(const struct quota_book *a, const struct quota_book *b)
{
        struct quota_usage x, y;

        assert_int_equal(quota_usage_count(a), quota_usage_count(b));
        for (size_t i = 0; i < quota_usage_count(a); i++) {
                assert_int_equal(quota_usage_get(a, i, &x), 0);
                assert_int_equal(quota_usage_find(b, x.name, &y), 0);
                assert_int_equal(x.requests, y.requests);
                assert_int_equal(x.refusals, y.refusals);
                assert_int_equal(x.prompt_tokens, y.prompt_tokens);
                assert_int_equal(x.completion_tokens, y.completion_tokens);
                assert_int_equal(x.limited, y.limited);
                assert_int_equal(x.minute_used, y.minute_used);
                assert_int_equal(x.day_used, y.day_used);
                assert_memory_equal(x.refused, y.refused, sizeof x.refused);
        }
}

/* Writes usage.json from JSON text (no "sha256") with a correct checksum,
 * so that the checks after the checksum can be reached. */
static void write_signed(const char *dir, const char *json)
{
        json_error_t err;
        json_t *o = json_loads(json, 0, &err);
        char *canon, *text, hex[65];
        unsigned char md[32];
        unsigned int len;

        if (!o)
                fail_msg("test JSON: %s", err.text);
        canon = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
        assert_non_null(canon);
        assert_int_equal(EVP_Digest(canon, strlen(canon), md, &len, EVP_sha256(), NULL), 1);
        for (int i = 0; i < 32; i++)
                snprintf(hex + 2 * i, 3, "%02x", md[i]);
        json_object_set_new(o, "sha256", json_string(hex));
        text = json_dumps(o, JSON_INDENT(2));
        write_bytes(dir, "usage.json", text, strlen(text));
        free(canon);
        free(text);
        json_decref(o);
}

/* The file must be refused as corrupt, naming want, and set aside; the
 * book stays empty and the daemon saves and loads again afterwards. */
static void corrupt_detected(const char *dir, const char *want)
{
        struct quota_book *b = book(), *again;
        struct moerr e = {0};
        char aside[64];

        assert_int_equal(usage_store_load(dir, b, &e), -EBADMSG);
        printf("  %s\n", e.msg);
        assert_non_null(strstr(e.msg, want));
        assert_non_null(strstr(e.msg, "moved aside to usage.json.corrupt-1700000000"));
        assert_int_equal(quota_usage_count(b), 0);
        assert_false(exists(dir, "usage.json"));
        snprintf(aside, sizeof aside, "usage.json.corrupt-%.0f", WALL);
        assert_true(exists(dir, aside));
        for (const char *p = e.msg; *p; p++)
                assert_true((unsigned char)*p >= 0x20 && (unsigned char)*p < 0x7f);
        /* The daemon goes on: a missing file now, then its own saves. */
        assert_int_equal(usage_store_load(dir, b, &e), 0);
        quota_count_refusal(b, "carol", QUOTA_OTHER);
        save_ok(dir, b);
        again = load_ok(dir);
        same_usage(b, again);
        quota_book_free(again);
        quota_book_free(b);
        /* Clean up for the next case in the same directory. */
        {
                _cleanup_free_ char *p = file_in(dir, aside);
                _cleanup_free_ char *u = file_in(dir, "usage.json");
                assert_int_equal(unlink(p), 0);
                assert_int_equal(unlink(u), 0);
        }
}

static void usage_store_round_trip(void **state)
{
        const char *dir = state_dir("round-trip");
        struct quota_book *b = used_book(100), *c;
        _cleanup_free_ char *path = file_in(dir, "usage.json");
        _cleanup_free_ char *text = NULL;
        struct quota_usage u;
        struct stat st;
        size_t n;

        (void)state;
        save_ok(dir, b);
        assert_int_equal(stat(path, &st), 0);
        assert_int_equal(st.st_mode & 0777, 0600);
        text = read_text(dir, "usage.json", &n);
        assert_non_null(strstr(text, "\"format\": \"moed-usage\""));
        assert_non_null(strstr(text, "\"version\": 1"));
        assert_non_null(strstr(text, "\"saved_at\": 1700000000"));
        assert_non_null(strstr(text, "\"sha256\": \""));
        assert_true(n > 0 && text[n - 1] == '\n');
        c = load_ok(dir);
        same_usage(b, c);
        assert_int_equal(quota_usage_find(c, "alice", &u), 0);
        assert_int_equal(u.requests, 2);
        assert_int_equal(u.prompt_tokens, 200);
        assert_int_equal(u.completion_tokens, 14);
        assert_int_equal(u.minute_used, 214);
        assert_int_equal(u.day_used, 214);
        assert_int_equal(quota_usage_find(c, "bob", &u), 0);
        assert_int_equal(u.refusals, 2);
        assert_int_equal(u.refused[QUOTA_MAX_CONCURRENT], 2);
        /* Saving the same usage twice gives the same bytes. */
        save_ok(dir, c);
        {
                size_t n2;
                _cleanup_free_ char *text2 = read_text(dir, "usage.json", &n2);
                assert_int_equal(n2, n);
                assert_memory_equal(text, text2, n);
        }
        quota_book_free(b);
        quota_book_free(c);
}

static void usage_store_missing_file_or_dir_is_a_first_start(void **state)
{
        const char *dir = state_dir("empty");
        _cleanup_free_ char *nodir = file_in(dir, "no-such-dir");
        struct quota_book *b = book();
        struct moerr e = {0};

        (void)state;
        assert_int_equal(usage_store_load(dir, b, &e), 0);
        assert_int_equal(usage_store_load(nodir, b, &e), 0);
        assert_int_equal(quota_usage_count(b), 0);
        assert_int_equal(usage_store_save(nodir, b, &e), -ENOENT);
        printf("  %s\n", e.msg);
        assert_non_null(strstr(e.msg, "no-such-dir: cannot open the state directory"));
        quota_book_free(b);
}

/* A crash after usage.json.tmp was written (whole or in part) but before
 * the rename: the old file is what loads. */
static void usage_store_crash_before_rename_keeps_the_old_file(void **state)
{
        const char *dir = state_dir("crash"), *newer = state_dir("crash-newer");
        struct quota_book *old = used_book(100), *now = used_book(300), *b;
        _cleanup_free_ char *text = NULL;
        struct quota_usage u;
        size_t n;

        (void)state;
        save_ok(dir, old);
        save_ok(newer, now);
        text = read_text(newer, "usage.json", &n);
        write_bytes(dir, "usage.json.tmp", text, n);
        b = load_ok(dir);
        same_usage(old, b);
        quota_book_free(b);
        write_bytes(dir, "usage.json.tmp", text, n / 3);        /* torn write */
        b = load_ok(dir);
        assert_int_equal(quota_usage_find(b, "alice", &u), 0);
        assert_int_equal(u.prompt_tokens, 200);
        /* The next save replaces the leftover and lands. */
        save_ok(dir, now);
        quota_book_free(b);
        b = load_ok(dir);
        same_usage(now, b);
        quota_book_free(b);
        quota_book_free(old);
        quota_book_free(now);
}

static void usage_store_corrupt_files_are_set_aside(void **state)
{
        const char *dir = state_dir("corrupt"), *good = state_dir("corrupt-good");
        struct quota_book *b = used_book(100);
        _cleanup_free_ char *text = NULL;
        char *p, *q;
        size_t n;

        (void)state;
        save_ok(good, b);
        text = read_text(good, "usage.json", &n);

        write_bytes(dir, "usage.json", text, n / 2);
        corrupt_detected(dir, "not JSON");
        write_bytes(dir, "usage.json", "", 0);
        corrupt_detected(dir, "not JSON");
        write_bytes(dir, "usage.json", "hello, world\n", 13);
        corrupt_detected(dir, "not JSON");
        write_bytes(dir, "usage.json", "[1, 2]", 6);
        corrupt_detected(dir, "not a moed usage file");
        write_bytes(dir, "usage.json", "\x01\xff\x7f{\"a\":", 8);
        corrupt_detected(dir, "not JSON");

        /* A flipped byte in a number: still JSON, the checksum catches it. */
        p = strstr(text, "\"prompt_tokens\": 200");
        assert_non_null(p);
        p[strlen("\"prompt_tokens\": 2")] ^= 0x01;              /* 200 -> 210 */
        write_bytes(dir, "usage.json", text, n);
        corrupt_detected(dir, "the SHA-256 checksum does not match the content");
        p[strlen("\"prompt_tokens\": 2")] ^= 0x01;
        /* A flipped byte in the checksum itself. */
        q = strstr(text, "\"sha256\": \"") + strlen("\"sha256\": \"");
        q[5] ^= 0x01;
        write_bytes(dir, "usage.json", text, n);
        corrupt_detected(dir, "the SHA-256 checksum does not match");
        q[5] ^= 0x01;
        /* A flipped bit in the structure. */
        p = strchr(text, '{');
        *p ^= 0x04;
        write_bytes(dir, "usage.json", text, n);
        corrupt_detected(dir, "not JSON");
        *p ^= 0x04;
        /* The original still loads: the edits above were all undone. */
        write_bytes(dir, "usage.json", text, n);
        {
                struct quota_book *c = load_ok(dir);
                same_usage(b, c);
                quota_book_free(c);
        }
        quota_book_free(b);
}

static void usage_store_checks_everything_behind_the_checksum(void **state)
{
        const char *dir = state_dir("schema");
        const char *t_ok = "\"requests\": 1, \"refusals\": 0, \"refused\": {}, \"prompt_tokens\": "
                           "1, \"completion_tokens\": 1, \"limited\": 0, \"minute_used\": 0, "
                           "\"day_used\": 0";
        static const struct {
                const char *json, *want;
        } cases[] = {
                { "{\"format\": \"moed-usage\", \"version\": 2, \"saved_at\": 1, \"tenants\": {}}",
                  "version other than ours, this moed reads version 1" },
                { "{\"format\": \"moed-usage\", \"version\": \"1\", \"saved_at\": 1, "
                  "\"tenants\": {}}", "version missing or not a number" },
                { "{\"format\": \"other\", \"version\": 1, \"saved_at\": 1, \"tenants\": {}}",
                  "not a moed usage file" },
                { "{\"format\": \"moed-usage\", \"version\": 1, \"saved_at\": -1, \"tenants\": {}}",
                  "\"saved_at\" is not an integer >= 0" },
                { "{\"format\": \"moed-usage\", \"version\": 1, \"saved_at\": 1, \"tenants\": []}",
                  "\"tenants\" is not an object" },
                { "{\"format\": \"moed-usage\", \"version\": 1, \"saved_at\": 1, \"tenants\": {}, "
                  "\"extra\": 1}", "unknown keys at the top level" },
                { "{\"format\": \"moed-usage\", \"version\": 1, \"saved_at\": 1, \"tenants\": "
                  "{\"a\": 5}}", "tenant a is not an object" },
                { "{\"format\": \"moed-usage\", \"version\": 1, \"saved_at\": 1, \"tenants\": "
                  "{\"a\": {}}}", "tenant a: \"requests\" is missing" },
        };
        char json[1024];

        (void)state;
        for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
                write_signed(dir, cases[i].json);
                corrupt_detected(dir, cases[i].want);
        }
        /* The checksum must be there. */
        snprintf(json, sizeof json, "{\"format\": \"moed-usage\", \"version\": 1, \"saved_at\": "
                 "1, \"tenants\": {}}");
        write_bytes(dir, "usage.json", json, strlen(json));
        corrupt_detected(dir, "the SHA-256 checksum is missing");

#define TENANT(name, body) \
        snprintf(json, sizeof json, "{\"format\": \"moed-usage\", \"version\": 1, " \
                 "\"saved_at\": 1, \"tenants\": {\"%s\": {%s}}}", name, body)
        TENANT("a", t_ok);
        write_signed(dir, json);
        quota_book_free(load_ok(dir));

        TENANT("../etc", t_ok);
        write_signed(dir, json);
        corrupt_detected(dir, "a tenant name is not valid");
        TENANT(".hidden", t_ok);
        write_signed(dir, json);
        corrupt_detected(dir, "a tenant name is not valid");
        TENANT("a", "\"requests\": -1, \"refusals\": 0, \"refused\": {}, \"prompt_tokens\": 1, "
                    "\"completion_tokens\": 1, \"limited\": 0, \"minute_used\": 0, \"day_used\": 0");
        write_signed(dir, json);
        corrupt_detected(dir, "tenant a: \"requests\" is not an integer >= 0");
        TENANT("a", "\"requests\": 1, \"refusals\": 0, \"refused\": {}, \"prompt_tokens\": 1.5, "
                    "\"completion_tokens\": 1, \"limited\": 0, \"minute_used\": 0, \"day_used\": 0");
        write_signed(dir, json);
        corrupt_detected(dir, "tenant a: \"prompt_tokens\" is not an integer >= 0");
        TENANT("a", "\"requests\": 1, \"refusals\": 0, \"refused\": {}, \"prompt_tokens\": 1, "
                    "\"completion_tokens\": \"1\", \"limited\": 0, \"minute_used\": 0, "
                    "\"day_used\": 0");
        write_signed(dir, json);
        corrupt_detected(dir, "\"completion_tokens\" is not an integer >= 0");
        TENANT("a", "\"requests\": 1, \"refusals\": 0, \"refused\": [], \"prompt_tokens\": 1, "
                    "\"completion_tokens\": 1, \"limited\": 0, \"minute_used\": 0, \"day_used\": 0");
        write_signed(dir, json);
        corrupt_detected(dir, "\"refused\" is not an object");
        TENANT("a", "\"requests\": 1, \"refusals\": 0, \"refused\": {\"Bogus\": 1}, "
                    "\"prompt_tokens\": 1, \"completion_tokens\": 1, \"limited\": 0, "
                    "\"minute_used\": 0, \"day_used\": 0");
        write_signed(dir, json);
        corrupt_detected(dir, "an unknown reason");
        TENANT("a", "\"requests\": 1, \"refusals\": 0, \"refused\": {\"Models\": -3}, "
                    "\"prompt_tokens\": 1, \"completion_tokens\": 1, \"limited\": 0, "
                    "\"minute_used\": 0, \"day_used\": 0");
        write_signed(dir, json);
        corrupt_detected(dir, "refusals by reason: not an integer >= 0");
        TENANT("a", "\"requests\": 1, \"refusals\": 0, \"refused\": {}, \"prompt_tokens\": 1, "
                    "\"completion_tokens\": 1, \"limited\": 0, \"minute_used\": 0, "
                    "\"day_used\": 0, \"x\": 1");
        write_signed(dir, json);
        corrupt_detected(dir, "tenant a has unknown keys");
#undef TENANT
        /* Duplicate keys are not JSON we wrote. */
        write_bytes(dir, "usage.json", "{\"format\": 1, \"format\": 2}", 26);
        corrupt_detected(dir, "not JSON");
}

/* A corrupt file is kept: the second in the same second gets its own name. */
static void usage_store_set_aside_never_overwrites(void **state)
{
        const char *dir = state_dir("aside");
        struct quota_book *b = book();
        struct moerr e = {0};

        (void)state;
        write_bytes(dir, "usage.json", "first", 5);
        assert_int_equal(usage_store_load(dir, b, &e), -EBADMSG);
        write_bytes(dir, "usage.json", "second", 6);
        assert_int_equal(usage_store_load(dir, b, &e), -EBADMSG);
        printf("  %s\n", e.msg);
        assert_non_null(strstr(e.msg, "usage.json.corrupt-1700000000-2"));
        assert_true(exists(dir, "usage.json.corrupt-1700000000"));
        assert_true(exists(dir, "usage.json.corrupt-1700000000-2"));
        {
                size_t n;
                _cleanup_free_ char *t1 = read_text(dir, "usage.json.corrupt-1700000000", &n);
                assert_string_equal(t1, "first");
        }
        quota_book_free(b);
}

static void usage_store_keeps_unknown_tenants(void **state)
{
        const char *dir = state_dir("unknown");
        struct quota_book *b = used_book(10), *c;
        struct tenant_set *s = set_of("alice", "");
        struct quota_usage u;

        (void)state;
        save_ok(dir, b);
        c = load_ok(dir);
        /* bob is not in the current set: still counted, still saved. */
        assert_int_equal(quota_book_reload(c, s), 0);
        assert_int_equal(quota_usage_find(c, "bob", &u), 0);
        assert_int_equal(u.refusals, 2);
        save_ok(dir, c);
        quota_book_free(c);
        c = load_ok(dir);
        assert_int_equal(quota_usage_find(c, "bob", &u), 0);
        assert_int_equal(u.refused[QUOTA_MAX_CONCURRENT], 2);
        tenant_set_free(s);
        quota_book_free(b);
        quota_book_free(c);
}

/* The buckets go on refilling while the daemon is down. */
static void usage_store_buckets_age_with_the_wall_clock(void **state)
{
        const char *dir = state_dir("age");
        struct quota_book *b = used_book(2000), *c;   /* alice: 4014 of 6000/min */
        struct tenant_set *s = set_of("alice", "TokensPerMinute=6000\nTokensPerDay=86400\n");
        struct quota_usage u;

        (void)state;
        save_ok(dir, b);
        clk.wall += 20;                 /* 20 s later, after a reboot */
        clk.now = 5;
        c = load_ok(dir);
        assert_int_equal(quota_book_reload(c, s), 0);
        assert_int_equal(quota_usage_find(c, "alice", &u), 0);
        assert_int_equal(u.minute_used, 4014 - 2000);           /* 100 tokens/s */
        assert_int_equal(u.day_used, 4014 - 20);                /* 1 token/s */
        /* A wall clock that went backwards ages nothing. */
        quota_book_free(c);
        clk.wall -= 100;
        c = load_ok(dir);
        assert_int_equal(quota_book_reload(c, s), 0);
        assert_int_equal(quota_usage_find(c, "alice", &u), 0);
        assert_int_equal(u.minute_used, 4014);
        clk.wall = WALL;
        clk.now = 1000;
        tenant_set_free(s);
        quota_book_free(b);
        quota_book_free(c);
}

static void usage_store_does_not_follow_links_or_odd_files(void **state)
{
        const char *dir = state_dir("links"), *other = state_dir("links-target");
        _cleanup_free_ char *link = file_in(dir, "usage.json");
        _cleanup_free_ char *target = file_in(other, "usage.json");
        _cleanup_free_ char *tmp = file_in(dir, "usage.json.tmp");
        struct quota_book *b = used_book(10), *c = book();
        struct moerr e = {0};

        (void)state;
        save_ok(other, b);
        assert_int_equal(symlink(target, link), 0);
        assert_int_equal(usage_store_load(dir, c, &e), -ELOOP);
        printf("  %s\n", e.msg);
        assert_non_null(strstr(e.msg, "is a symbolic link"));
        assert_int_equal(quota_usage_count(c), 0);
        /* Saving replaces the link itself, not its target. */
        quota_count_refusal(c, "zed", QUOTA_OTHER);
        save_ok(dir, c);
        quota_book_free(c);
        c = load_ok(other);
        same_usage(b, c);
        quota_book_free(c);
        c = load_ok(dir);
        assert_int_equal(quota_usage_count(c), 1);
        quota_book_free(c);
        /* A directory where the file should be. */
        assert_int_equal(unlink(link), 0);
        assert_int_equal(mkdir(link, 0700), 0);
        c = book();
        assert_int_equal(usage_store_load(dir, c, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "is not a regular file"));
        assert_int_equal(rmdir(link), 0);
        /* A save that cannot write its temporary file leaves usage.json. */
        save_ok(dir, b);
        assert_int_equal(mkdir(tmp, 0700), 0);
        assert_true(usage_store_save(dir, c, &e) < 0);
        printf("  %s\n", e.msg);
        assert_non_null(strstr(e.msg, "usage.json.tmp: cannot create"));
        assert_int_equal(rmdir(tmp), 0);
        quota_book_free(c);
        c = load_ok(dir);
        same_usage(b, c);
        quota_book_free(c);
        quota_book_free(b);
}

static void usage_store_too_large_is_corrupt(void **state)
{
        const char *dir = state_dir("large");
        size_t n = USAGE_STORE_MAX_BYTES + 10;
        char *big = malloc(n);

        (void)state;
        assert_non_null(big);
        memset(big, ' ', n);
        big[0] = '{';
        big[n - 1] = '}';
        write_bytes(dir, "usage.json", big, n);
        free(big);
        corrupt_detected(dir, "larger than 16777216 bytes");
}

/* The seed file of the fuzzer was written by Python (json, hashlib): an
 * independent writer of the same canonical form and checksum. */
static void usage_store_loads_a_file_written_by_another_tool(void **state)
{
        const char *root = getenv("MOED_SOURCE_ROOT");
        const char *dir = state_dir("python");
        _cleanup_free_ char *seeds = NULL;
        _cleanup_free_ char *text = NULL;
        struct quota_book *b;
        struct quota_usage u;
        size_t n;

        (void)state;
        if (!root)
                fail_msg("MOED_SOURCE_ROOT is not set (run through meson test)");
        assert_true(asprintf(&seeds, "%s/tests/fuzz/seeds-usage-store", root) > 0);
        text = read_text(seeds, "valid.json", &n);
        write_bytes(dir, "usage.json", text, n);
        b = load_ok(dir);
        assert_int_equal(quota_usage_count(b), 2);
        assert_int_equal(quota_usage_find(b, "alice", &u), 0);
        assert_int_equal(u.prompt_tokens, 200);
        assert_int_equal(u.completion_tokens, 14);
        assert_int_equal(quota_usage_find(b, "bob", &u), 0);
        assert_int_equal(u.refused[QUOTA_MAX_CONCURRENT], 2);
        quota_book_free(b);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(usage_store_round_trip),
                cmocka_unit_test(usage_store_missing_file_or_dir_is_a_first_start),
                cmocka_unit_test(usage_store_crash_before_rename_keeps_the_old_file),
                cmocka_unit_test(usage_store_corrupt_files_are_set_aside),
                cmocka_unit_test(usage_store_checks_everything_behind_the_checksum),
                cmocka_unit_test(usage_store_set_aside_never_overwrites),
                cmocka_unit_test(usage_store_keeps_unknown_tenants),
                cmocka_unit_test(usage_store_buckets_age_with_the_wall_clock),
                cmocka_unit_test(usage_store_does_not_follow_links_or_odd_files),
                cmocka_unit_test(usage_store_too_large_is_corrupt),
                cmocka_unit_test(usage_store_loads_a_file_written_by_another_tool),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
