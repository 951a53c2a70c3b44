/* test-tenant: policy/tenant.c: every key with good and bad values, names,
 * duplicate identities, the resolution rule for every overlap, token
 * hashes, the per-user set and loading a directory. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <grp.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/cleanup.h"
#include "policy/tenant.h"
#include "testutil.h"

#define TOKEN_A "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"

static void write_file(const char *path, const char *text)
{
        FILE *f = fopen(path, "w");

        assert_non_null(f);
        assert_int_equal(fwrite(text, 1, strlen(text), f), strlen(text));
        assert_int_equal(fclose(f), 0);
}

/* A set holding the one tenant text, which must load. */
static struct tenant_set *one(const char *name, const char *text)
{
        struct tenant_set *s = tenant_set_new();
        struct moerr e = {0};

        assert_non_null(s);
        if (tenant_set_add_text(s, name, text, &e) < 0)
                fail_msg("%s", e.msg);
        assert_int_equal(tenant_set_count(s), 1);
        return s;
}

/* The text must fail with exactly this message. */
static void refused(struct tenant_set *s, const char *name, const char *text, const char *want)
{
        struct moerr e = {0};
        size_t n = tenant_set_count(s);

        assert_int_equal(tenant_set_add_text(s, name, text, &e), -EINVAL);
        printf("  %s\n", e.msg);
        assert_string_equal(e.msg, want);
        assert_int_equal(tenant_set_count(s), n);
}

static const char *root_user(void)
{
        struct passwd *pw = getpwuid(0);

        assert_non_null(pw);
        return pw->pw_name;
}

static const char *root_group(void)
{
        struct group *gr = getgrgid(0);

        assert_non_null(gr);
        return gr->gr_name;
}

static void tenant_empty_file_gets_the_defaults(void **state)
{
        struct tenant_set *s = one("default", "");
        const struct tenant *t = tenant_set_get(s, 0);

        (void)state;
        assert_string_equal(t->name, "default");
        assert_int_equal(t->id, 0);
        assert_true(t->weight == 1);
        assert_int_equal(t->priority, TENANT_INTERACTIVE);
        assert_true(t->max_concurrent == TENANT_UNLIMITED);
        assert_true(t->max_queued == TENANT_UNLIMITED);
        assert_true(t->tokens_per_minute == TENANT_UNLIMITED);
        assert_true(t->tokens_per_day == TENANT_UNLIMITED);
        assert_true(t->max_context == TENANT_UNLIMITED);
        assert_true(t->max_output == TENANT_UNLIMITED);
        assert_true(t->kv_share == 1);
        assert_null(t->models);
        assert_int_equal(t->n_models, 0);
        assert_false(t->log_content);
        assert_false(t->admin);
        assert_int_equal(t->n_users + t->n_groups + t->n_tokens, 0);
        assert_null(tenant_set_get(s, 1));
        tenant_set_free(s);
        tenant_set_free(NULL);
}

static void tenant_keys_take_good_values(void **state)
{
        char text[1024];
        struct tenant_set *s;
        const struct tenant *t;

        (void)state;
        snprintf(text, sizeof text,
                 "# research\n"
                 "[Tenant]\n"
                 "Users=%s 1234\n"
                 "Groups=%s 4321\n"
                 "Tokens=" TOKEN_A "\n"
                 "Tokens=sha256:00000000000000000000000000000000000000000000000000000000000000FF\n"
                 "Weight=2.5\n"
                 "Priority=batch\n"
                 "MaxConcurrent=4\n"
                 "MaxQueued=0\n"
                 "TokensPerMinute=20000\n"
                 "TokensPerDay=2000000\n"
                 "MaxContext=32768\n"
                 "MaxOutputTokens=infinity\n"
                 "KVShare=50%%\n"
                 "Models=deepseek-v3 lite:q4\n"
                 "LogContent=yes\n"
                 "Admin=true\n",
                 root_user(), root_group());
        s = one("research", text);
        t = tenant_set_get(s, 0);
        assert_int_equal(t->n_users, 2);
        assert_int_equal(t->users[0], 0);
        assert_int_equal(t->users[1], 1234);
        assert_int_equal(t->n_groups, 2);
        assert_int_equal(t->groups[0], 0);
        assert_int_equal(t->groups[1], 4321);
        assert_int_equal(t->n_tokens, 2);
        assert_int_equal(t->tokens[0][0], 0xba);
        assert_int_equal(t->tokens[0][31], 0xad);
        assert_int_equal(t->tokens[1][31], 0xff);
        assert_true(t->weight == 2.5);
        assert_int_equal(t->priority, TENANT_BATCH);
        assert_int_equal(t->max_concurrent, 4);
        assert_int_equal(t->max_queued, 0);
        assert_int_equal(t->tokens_per_minute, 20000);
        assert_int_equal(t->tokens_per_day, 2000000);
        assert_int_equal(t->max_context, 32768);
        assert_true(t->max_output == TENANT_UNLIMITED);
        assert_true(t->kv_share == 0.5);
        assert_int_equal(t->n_models, 2);
        assert_string_equal(t->models[0], "deepseek-v3");
        assert_string_equal(t->models[1], "lite:q4");
        assert_true(t->log_content);
        assert_true(t->admin);
        tenant_set_free(s);

        /* Other spellings. */
        s = one("x", "[Tenant]\nWeight=1000\nKVShare=0.25\nKVShare=12.5%\nPriority=interactive\n"
                     "LogContent=off\nAdmin=0\nMaxConcurrent=9223372036854775806\n");
        t = tenant_set_get(s, 0);
        assert_true(t->weight == 1000);
        assert_true(t->kv_share == 0.125);
        assert_int_equal(t->priority, TENANT_INTERACTIVE);
        assert_false(t->log_content);
        assert_false(t->admin);
        assert_true(t->max_concurrent == INT64_MAX - 1);
        tenant_set_free(s);
        s = one("y", "[Tenant]\nKVShare=100%\nWeight=0.001\n");
        assert_true(tenant_set_get(s, 0)->kv_share == 1);
        assert_true(tenant_set_get(s, 0)->weight == 0.001);
        tenant_set_free(s);
}

static void tenant_keys_reject_bad_values(void **state)
{
        static const struct {
                const char *key, *value, *expect;
        } bad[] = {
                { "Weight", "0", "a number in (0, 1000]" },
                { "Weight", "1000.5", "a number in (0, 1000]" },
                { "Weight", "-1", "a number in (0, 1000]" },
                { "Weight", "1e2", "a number in (0, 1000]" },
                { "Weight", "nan", "a number in (0, 1000]" },
                { "Weight", "1,5", "a number in (0, 1000]" },
                { "Priority", "high", "interactive or batch" },
                { "Priority", "Batch", "interactive or batch" },
                { "MaxConcurrent", "-1", "an integer >= 0 or infinity" },
                { "MaxQueued", "1.5", "an integer >= 0 or infinity" },
                { "TokensPerMinute", "20k", "an integer >= 0 or infinity" },
                { "TokensPerDay", "9223372036854775807", "an integer >= 0 or infinity" },
                { "MaxContext", "unlimited", "an integer >= 0 or infinity" },
                { "MaxOutputTokens", "Infinity", "an integer >= 0 or infinity" },
                { "KVShare", "0%", "a share in (0, 1] such as 50% or 0.5" },
                { "KVShare", "150%", "a share in (0, 1] such as 50% or 0.5" },
                { "KVShare", "1.5", "a share in (0, 1] such as 50% or 0.5" },
                { "KVShare", "%", "a share in (0, 1] such as 50% or 0.5" },
                { "KVShare", "50 %", "a share in (0, 1] such as 50% or 0.5" },
                { "Models", "bad/model", "model ids" },
                { "LogContent", "sometimes", "yes or no" },
                { "Admin", "2", "yes or no" },
                { "Tokens", "sha256:ba7816bf", "sha256: and 64 hex digits (moectl hash-token)" },
                { "Tokens", "SHA256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
                  "sha256: and 64 hex digits (moectl hash-token)" },
                { "Tokens", "md5:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
                  "sha256: and 64 hex digits (moectl hash-token)" },
                { "Tokens", "sha256:ga7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
                  "sha256: and 64 hex digits (moectl hash-token)" },
                { "Tokens", "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad0",
                  "sha256: and 64 hex digits (moectl hash-token)" },
        };
        struct tenant_set *s = tenant_set_new();

        (void)state;
        for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
                char text[512], want[512];

                snprintf(text, sizeof text, "[Tenant]\n\n%s=%s\n", bad[i].key, bad[i].value);
                snprintf(want, sizeof want,
                         "t.conf:3: [Tenant] %s: invalid value '%.48s%s' (expected %s)", bad[i].key,
                         bad[i].value, strlen(bad[i].value) > 48 ? "..." : "", bad[i].expect);
                refused(s, "t", text, want);
        }
        assert_int_equal(tenant_set_count(s), 0);
        tenant_set_free(s);
}

static void tenant_unknown_users_and_groups_name_file_and_line(void **state)
{
        struct tenant_set *s = tenant_set_new();
        char text[256], want[512];

        (void)state;
        refused(s, "lab", "[Tenant]\nUsers=no-such-user-moed\n",
                "lab.conf:2: [Tenant] Users: unknown user 'no-such-user-moed'");
        refused(s, "lab", "[Tenant]\nGroups=0\nGroups=no-such-group-moed\n",
                "lab.conf:3: [Tenant] Groups: unknown group 'no-such-group-moed'");
        /* (uid_t)-1 is no user, and numbers stop at 32 bits. */
        refused(s, "lab", "[Tenant]\nUsers=4294967295\n",
                "lab.conf:2: [Tenant] Users: unknown user '4294967295'");
        refused(s, "lab", "[Tenant]\nGroups=99999999999\n",
                "lab.conf:2: [Tenant] Groups: unknown group '99999999999'");
        /* One line, several problems: each named. */
        snprintf(text, sizeof text, "[Tenant]\nUsers=%s nobody-moed-1 nobody-moed-2\n", root_user());
        snprintf(want, sizeof want,
                 "lab.conf:2: [Tenant] Users: unknown user 'nobody-moed-1'\n"
                 "lab.conf:2: [Tenant] Users: unknown user 'nobody-moed-2'");
        refused(s, "lab", text, want);
        tenant_set_free(s);
}

static void tenant_lists_add_up_and_empty_resets(void **state)
{
        struct tenant_set *s;
        const struct tenant *t;

        (void)state;
        s = one("l", "[Tenant]\nUsers=1 2\nUsers=3 2\nGroups=5\nGroups=\nGroups=6\n"
                     "Models=a\nModels=b a\nTokens=" TOKEN_A "\nTokens=" TOKEN_A "\n");
        t = tenant_set_get(s, 0);
        assert_int_equal(t->n_users, 3);
        assert_int_equal(t->users[2], 3);
        assert_int_equal(t->n_groups, 1);
        assert_int_equal(t->groups[0], 6);
        assert_int_equal(t->n_models, 2);
        assert_int_equal(t->n_tokens, 1);
        tenant_set_free(s);

        /* Models= alone gives every model back; other keys their default. */
        s = one("m", "[Tenant]\nModels=a\nModels=\nWeight=5\nWeight=\nPriority=batch\nPriority=\n"
                     "MaxQueued=3\nMaxQueued=\nKVShare=10%\nKVShare=\nAdmin=yes\nAdmin=\n"
                     "Users=7\nUsers=\nTokens=" TOKEN_A "\nTokens=\n");
        t = tenant_set_get(s, 0);
        assert_null(t->models);
        assert_true(tenant_allows_model(t, "anything"));
        assert_true(t->weight == 1);
        assert_int_equal(t->priority, TENANT_INTERACTIVE);
        assert_true(t->max_queued == TENANT_UNLIMITED);
        assert_true(t->kv_share == 1);
        assert_false(t->admin);
        assert_int_equal(t->n_users, 0);
        assert_int_equal(t->n_tokens, 0);
        tenant_set_free(s);
}

static void tenant_names_are_checked(void **state)
{
        static const char *const good[] = { "a", "research", "Team_1.prod-2", "0" };
        static const char *const bad[] = {
                "", ".", "..", ".hidden", "a b", "a/b", "\xc3\xa9quipe", "x\n",
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", /* 65 */
        };
        struct tenant_set *s = tenant_set_new();
        struct moerr e = {0};
        char name64[65];

        (void)state;
        for (size_t i = 0; i < ARRAY_SIZE(good); i++)
                assert_int_equal(tenant_set_add_text(s, good[i], "", &e), 0);
        memset(name64, 'n', 64);
        name64[64] = '\0';
        assert_int_equal(tenant_set_add_text(s, name64, "", &e), 0);
        assert_int_equal(tenant_set_count(s), ARRAY_SIZE(good) + 1);
        for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
                assert_int_equal(tenant_set_add_text(s, bad[i], "", &e), -EINVAL);
                printf("  %s\n", e.msg);
                assert_non_null(strstr(e.msg, "invalid tenant name"));
        }
        /* The same name twice. */
        refused(s, "research", "", "research.conf: tenant 'research' already exists");
        assert_int_equal(tenant_set_add_text(s, NULL, "", &e), -EINVAL);
        assert_int_equal(tenant_set_add_text(s, "z", NULL, &e), -EINVAL);
        tenant_set_free(s);
}

static void tenant_messages_name_section_key_and_line(void **state)
{
        struct tenant_set *s = tenant_set_new();

        (void)state;
        refused(s, "t",
                "Users=1\n"             /* 1 */
                "[Tenant]\n"            /* 2 */
                "User=alice\n"          /* 3 */
                "Weight=3\n"            /* 4 */
                "[Tennant]\n"           /* 5 */
                "Weight=x\n"            /* 6: under an unknown section: silent */
                "[Tenant]\n"            /* 7 */
                "garbage\n"             /* 8 */
                "[Tenant\n"             /* 9 */
                "Weight=0\n",           /* 10 */
                "t.conf:1: Users: outside of any section ([Tenant])\n"
                "t.conf:3: [Tenant] User: unknown key\n"
                "t.conf:5: [Tennant]: unknown section\n"
                "t.conf:8: expected Key=Value, [Section] or a comment\n"
                "t.conf:9: section header without ']'\n"
                "t.conf:10: [Tenant] Weight: invalid value '0' (expected a number in (0, 1000])");
        tenant_set_free(s);
}

static void tenant_too_many_errors_are_counted(void **state)
{
        struct tenant_set *s = tenant_set_new();
        struct moerr e = {0};
        char text[4096] = "[Tenant]\n";

        (void)state;
        for (int i = 0; i < 100; i++)
                strcat(text, "Bogus=1\n");
        assert_int_equal(tenant_set_add_text(s, "t", text, &e), -EINVAL);
        printf("%s\n", e.msg);
        assert_true(strncmp(e.msg, "t.conf:2: [Tenant] Bogus: unknown key\nt.conf:3: ", 48) == 0);
        assert_non_null(strstr(e.msg, " more)"));
        assert_true(strlen(e.msg) < sizeof e.msg);
        tenant_set_free(s);
}

static void tenant_duplicate_identities_across_tenants(void **state)
{
        struct tenant_set *s = tenant_set_new();
        struct moerr e = {0};
        char text[256], want[256];

        (void)state;
        snprintf(text, sizeof text, "[Tenant]\nUsers=%s 1000\nGroups=100\nTokens=" TOKEN_A "\n",
                 root_user());
        assert_int_equal(tenant_set_add_text(s, "alpha", text, &e), 0);

        snprintf(text, sizeof text, "[Tenant]\nUsers=2000\nUsers=%s\n", root_user());
        snprintf(want, sizeof want,
                 "beta.conf:3: [Tenant] Users: user '%s' (uid 0) is already in tenant 'alpha'",
                 root_user());
        refused(s, "beta", text, want);
        refused(s, "beta", "[Tenant]\nUsers=1000\n",
                "beta.conf:2: [Tenant] Users: user '1000' (uid 1000) is already in tenant 'alpha'");
        /* Same token in other letter case is the same token. */
        refused(s, "beta",
                "[Tenant]\nTokens=sha256:BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD\n",
                "beta.conf:2: [Tenant] Tokens: token sha256:BA7816BF... is already in tenant "
                "'alpha'");
        /* A group may be in several tenants; a user twice in one is one. */
        assert_int_equal(tenant_set_add_text(s, "beta", "[Tenant]\nGroups=100\nUsers=5 5\n", &e), 0);
        assert_int_equal(tenant_set_count(s), 2);
        assert_int_equal(tenant_set_get(s, 1)->n_users, 1);
        assert_int_equal(tenant_set_get(s, 1)->id, 1);
        tenant_set_free(s);
}

static void tenant_lookup_most_specific_wins(void **state)
{
        struct tenant_set *s = tenant_set_new();
        const struct tenant *t;
        enum tenant_match how;
        struct moerr e = {0};
        gid_t sup[] = { 300, 200 };

        (void)state;
        /* uid 1000 is in "user" and in group 200 ("group") and its token
         * is "token"'s; "default" catches the rest. */
        assert_int_equal(tenant_set_add_text(s, "default", "", &e), 0);
        assert_int_equal(tenant_set_add_text(s, "group", "[Tenant]\nGroups=200\n", &e), 0);
        assert_int_equal(tenant_set_add_text(s, "token", "[Tenant]\nTokens=" TOKEN_A "\n", &e), 0);
        assert_int_equal(tenant_set_add_text(s, "user", "[Tenant]\nUsers=1000\n", &e), 0);

        /* Token beats user beats group beats default. */
        t = tenant_lookup(s, 1000, 200, sup, 2, "abc", &how);
        assert_string_equal(t->name, "token");
        assert_int_equal(how, TENANT_MATCH_TOKEN);
        t = tenant_lookup(s, 1000, 200, sup, 2, NULL, &how);
        assert_string_equal(t->name, "user");
        assert_int_equal(how, TENANT_MATCH_USER);
        t = tenant_lookup(s, 1001, 200, NULL, 0, NULL, &how);
        assert_string_equal(t->name, "group");
        assert_int_equal(how, TENANT_MATCH_GROUP);
        /* A supplementary group counts like the primary one. */
        t = tenant_lookup(s, 1001, 999, sup, 2, NULL, &how);
        assert_string_equal(t->name, "group");
        assert_int_equal(how, TENANT_MATCH_GROUP);
        t = tenant_lookup(s, 1001, 999, sup, 1, NULL, &how);
        assert_string_equal(t->name, "default");
        assert_int_equal(how, TENANT_MATCH_DEFAULT);
        /* The token wins even for a uid that names no tenant. */
        t = tenant_lookup(s, 4242, 4242, NULL, 0, "abc", &how);
        assert_string_equal(t->name, "token");
        /* An unknown token is refused, not a fall-through to the uid. */
        how = TENANT_MATCH_NONE;
        assert_null(tenant_lookup(s, 1000, 200, sup, 2, "abd", &how));
        assert_int_equal(how, TENANT_MATCH_TOKEN);
        how = TENANT_MATCH_NONE;
        assert_null(tenant_lookup(s, 1000, 200, sup, 2, "", &how));
        assert_int_equal(how, TENANT_MATCH_TOKEN);
        /* how may be NULL. */
        assert_non_null(tenant_lookup(s, 1000, 200, NULL, 0, NULL, NULL));
        tenant_set_free(s);

        /* Without a default, nobody else gets in. */
        s = tenant_set_new();
        assert_int_equal(tenant_set_add_text(s, "user", "[Tenant]\nUsers=1000\n", &e), 0);
        how = TENANT_MATCH_USER;
        assert_null(tenant_lookup(s, 1001, 1001, NULL, 0, NULL, &how));
        assert_int_equal(how, TENANT_MATCH_NONE);
        tenant_set_free(s);
        how = TENANT_MATCH_USER;
        assert_null(tenant_lookup(NULL, 0, 0, NULL, 0, NULL, &how));
        assert_int_equal(how, TENANT_MATCH_NONE);
}

static void tenant_lookup_groups_go_by_file_name(void **state)
{
        struct tenant_set *s = tenant_set_new();
        const struct tenant *t;
        enum tenant_match how;
        struct moerr e = {0};
        gid_t sup[] = { 10, 20 };

        (void)state;
        /* Added out of order: "by file name" still means "alpha" first. */
        assert_int_equal(tenant_set_add_text(s, "zeta", "[Tenant]\nGroups=10 20\n", &e), 0);
        assert_int_equal(tenant_set_add_text(s, "beta", "[Tenant]\nGroups=20\n", &e), 0);
        assert_int_equal(tenant_set_add_text(s, "alpha", "[Tenant]\nGroups=20\n", &e), 0);
        t = tenant_lookup(s, 1, 10, NULL, 0, NULL, &how);
        assert_string_equal(t->name, "zeta");
        t = tenant_lookup(s, 1, 1, sup, 2, NULL, &how);
        assert_string_equal(t->name, "alpha");
        assert_int_equal(how, TENANT_MATCH_GROUP);
        t = tenant_lookup(s, 1, 20, NULL, 0, NULL, &how);
        assert_string_equal(t->name, "alpha");
        tenant_set_free(s);
}

static void tenant_hash_token_known_vector(void **state)
{
        char h[72];
        struct tenant_set *s;
        enum tenant_match how;
        char text[128];

        (void)state;
        assert_int_equal(tenant_hash_token("abc", h), 0);
        assert_string_equal(h, TOKEN_A);
        assert_int_equal(tenant_hash_token("", h), 0);
        assert_string_equal(h, "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_int_equal(tenant_hash_token(NULL, h), -EINVAL);

        /* What moectl hash-token prints is what Tokens= takes. */
        assert_int_equal(tenant_hash_token("s3cret-token-for-ci", h), 0);
        snprintf(text, sizeof text, "[Tenant]\nTokens=%s\n", h);
        s = one("ci", text);
        assert_string_equal(tenant_lookup(s, 0, 0, NULL, 0, "s3cret-token-for-ci", &how)->name, "ci");
        assert_null(tenant_lookup(s, 0, 0, NULL, 0, "s3cret-token-for-cj", &how));
        tenant_set_free(s);
}

static void tenant_single_user_set(void **state)
{
        struct tenant_set *s = NULL;
        const struct tenant *t;
        enum tenant_match how;
        struct moerr e = {0};

        (void)state;
        assert_int_equal(tenant_set_single_user(0, &s, &e), 0);
        assert_int_equal(tenant_set_count(s), 1);
        t = tenant_set_get(s, 0);
        assert_string_equal(t->name, root_user());
        assert_int_equal(t->id, 0);
        assert_int_equal(t->n_users, 1);
        assert_int_equal(t->users[0], 0);
        assert_int_equal(t->n_groups + t->n_tokens, 0);
        assert_true(t->admin);
        assert_false(t->log_content);
        assert_true(t->max_concurrent == TENANT_UNLIMITED && t->tokens_per_day == TENANT_UNLIMITED);
        assert_true(t->weight == 1);
        assert_null(t->models);
        assert_ptr_equal(tenant_lookup(s, 0, 0, NULL, 0, NULL, &how), t);
        assert_int_equal(how, TENANT_MATCH_USER);
        assert_null(tenant_lookup(s, 1, 0, NULL, 0, NULL, &how));
        tenant_set_free(s);

        /* A uid with no passwd entry is named after its number. */
        s = NULL;
        assert_int_equal(tenant_set_single_user(3999999, &s, &e), 0);
        assert_string_equal(tenant_set_get(s, 0)->name, "uid3999999");
        tenant_set_free(s);
}

static void tenant_load_dir_reads_every_conf_in_name_order(void **state)
{
        char *dir = tu_path("tenants.d");
        struct tenant_set *s = NULL;
        const struct tenant *t;
        struct moerr e = {0};

        (void)state;
        assert_int_equal(mkdir(dir, 0700), 0);
        write_file(tu_path("tenants.d/research.conf"), "[Tenant]\nUsers=1000\nWeight=3\n");
        write_file(tu_path("tenants.d/default.conf"), "[Tenant]\nPriority=batch\n");
        write_file(tu_path("tenants.d/ci.conf"), "[Tenant]\nTokens=" TOKEN_A "\n");
        /* Skipped: other names, hidden files, a backup. */
        write_file(tu_path("tenants.d/notes.txt"), "not a tenant");
        write_file(tu_path("tenants.d/.secret.conf"), "[Tenant]\nUsers=1000\n");
        write_file(tu_path("tenants.d/research.conf~"), "[Tenant]\nUsers=1000\n");
        assert_int_equal(mkdir(tu_path("tenants.d/sub"), 0700), 0);

        assert_int_equal(tenant_set_load_dir(dir, &s, &e), 0);
        assert_int_equal(tenant_set_count(s), 3);
        assert_string_equal(tenant_set_get(s, 0)->name, "ci");
        assert_string_equal(tenant_set_get(s, 1)->name, "default");
        assert_string_equal(tenant_set_get(s, 2)->name, "research");
        for (uint32_t i = 0; i < 3; i++)
                assert_int_equal(tenant_set_get(s, i)->id, i);
        t = tenant_find(s, "research");
        assert_non_null(t);
        assert_true(t->weight == 3);
        assert_null(tenant_find(s, "nope"));
        assert_null(tenant_find(s, ".secret"));
        assert_int_equal(tenant_find(s, "default")->priority, TENANT_BATCH);
        tenant_set_free(s);
}

struct reported {
        char *msgs[16];
        int n;
};

static void report(void *user, const char *msg)
{
        struct reported *r = user;

        assert_true(r->n < 16);
        r->msgs[r->n] = strdup(msg);
        assert_non_null(r->msgs[r->n++]);
}

static void tenant_load_dir_errors_keep_nothing(void **state)
{
        char *dir = tu_path("bad-tenants.d");
        struct tenant_set *s = NULL;
        struct reported r = {0};
        struct moerr e = {0};
        char *want[5];

        (void)state;
        assert_int_equal(mkdir(dir, 0700), 0);
        write_file(tu_path("bad-tenants.d/a.conf"), "[Tenant]\nUsers=1000\n");
        write_file(tu_path("bad-tenants.d/b.conf"), "[Tenant]\n# dup\nUsers=1000\n");
        write_file(tu_path("bad-tenants.d/bad name.conf"), "");
        assert_int_equal(mkdir(tu_path("bad-tenants.d/d.conf"), 0700), 0);
        write_file(tu_path("bad-tenants.d/e.conf"), "[Tenant]\nWeight=heavy\n");
        write_file(tu_path("bad-tenants.d/f\033[2J.conf"), "");
        assert_int_equal(tenant_set_load_dir_report(dir, &s, report, &r, &e), -EINVAL);
        assert_null(s);
        assert_true(asprintf(&want[0], "%s/b.conf:3: [Tenant] Users: user '1000' (uid 1000) is "
                                       "already in tenant 'a'", dir) > 0);
        assert_true(asprintf(&want[1], "%s/bad name.conf: invalid tenant name 'bad name' (1..64 "
                                       "of A-Z a-z 0-9 _ . -, not starting with '.')", dir) > 0);
        assert_true(asprintf(&want[2], "%s/d.conf: not a regular file", dir) > 0);
        assert_true(asprintf(&want[3], "%s/e.conf:2: [Tenant] Weight: invalid value 'heavy' "
                                       "(expected a number in (0, 1000])", dir) > 0);
        /* Names from the directory are quoted: no escape reaches a terminal. */
        assert_true(asprintf(&want[4], "%s/f\\x1b[2J.conf: invalid tenant name 'f\\x1b[2J' "
                                       "(1..64 of A-Z a-z 0-9 _ . -, not starting with '.')", dir) > 0);
        assert_int_equal(r.n, 5);
        for (int i = 0; i < 5; i++) {
                printf("  %s\n", r.msgs[i]);
                assert_string_equal(r.msgs[i], want[i]);
                free(want[i]);
                free(r.msgs[i]);
        }
        /* The moerr holds the first ones, then a count of the rest. */
        printf("%s\n", e.msg);
        assert_true(strncmp(e.msg, dir, strlen(dir)) == 0);
        assert_non_null(strstr(e.msg, "/b.conf:3: [Tenant] Users: user '1000'"));
        assert_non_null(strstr(e.msg, " more)"));

        /* Without a report the same load fails the same way. */
        assert_int_equal(tenant_set_load_dir(dir, &s, &e), -EINVAL);
        assert_null(s);
}

static void tenant_load_dir_missing_or_empty_is_an_empty_set(void **state)
{
        struct tenant_set *s = NULL;
        struct moerr e = {0};
        char *empty = tu_path("empty-tenants.d"), *file = tu_path("a-file");

        (void)state;
        assert_int_equal(tenant_set_load_dir(tu_path("no-such-tenants.d"), &s, &e), 0);
        assert_non_null(s);
        assert_int_equal(tenant_set_count(s), 0);
        assert_null(tenant_lookup(s, 0, 0, NULL, 0, NULL, NULL));
        tenant_set_free(s);

        assert_int_equal(mkdir(empty, 0700), 0);
        s = NULL;
        assert_int_equal(tenant_set_load_dir(empty, &s, &e), 0);
        assert_int_equal(tenant_set_count(s), 0);
        tenant_set_free(s);

        /* Not a directory at all is an error, not an empty set. */
        write_file(file, "");
        s = NULL;
        assert_int_equal(tenant_set_load_dir(file, &s, &e), -ENOTDIR);
        assert_null(s);
        assert_non_null(strstr(e.msg, "cannot read directory"));
}

static void tenant_models_and_match_names(void **state)
{
        struct tenant_set *s = one("m", "[Tenant]\nModels=deepseek-v3 lite\n");
        const struct tenant *t = tenant_set_get(s, 0);

        (void)state;
        assert_true(tenant_allows_model(t, "deepseek-v3"));
        assert_true(tenant_allows_model(t, "lite"));
        assert_false(tenant_allows_model(t, "deepseek-v3 "));
        assert_false(tenant_allows_model(t, "other"));
        assert_false(tenant_allows_model(t, NULL));
        assert_false(tenant_allows_model(NULL, "lite"));
        tenant_set_free(s);
        assert_string_equal(tenant_match_name(TENANT_MATCH_NONE), "none");
        assert_string_equal(tenant_match_name(TENANT_MATCH_TOKEN), "token");
        assert_string_equal(tenant_match_name(TENANT_MATCH_USER), "user");
        assert_string_equal(tenant_match_name(TENANT_MATCH_GROUP), "group");
        assert_string_equal(tenant_match_name(TENANT_MATCH_DEFAULT), "default");
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(tenant_empty_file_gets_the_defaults),
                cmocka_unit_test(tenant_keys_take_good_values),
                cmocka_unit_test(tenant_keys_reject_bad_values),
                cmocka_unit_test(tenant_unknown_users_and_groups_name_file_and_line),
                cmocka_unit_test(tenant_lists_add_up_and_empty_resets),
                cmocka_unit_test(tenant_names_are_checked),
                cmocka_unit_test(tenant_messages_name_section_key_and_line),
                cmocka_unit_test(tenant_too_many_errors_are_counted),
                cmocka_unit_test(tenant_duplicate_identities_across_tenants),
                cmocka_unit_test(tenant_lookup_most_specific_wins),
                cmocka_unit_test(tenant_lookup_groups_go_by_file_name),
                cmocka_unit_test(tenant_hash_token_known_vector),
                cmocka_unit_test(tenant_single_user_set),
                cmocka_unit_test(tenant_load_dir_reads_every_conf_in_name_order),
                cmocka_unit_test(tenant_load_dir_errors_keep_nothing),
                cmocka_unit_test(tenant_load_dir_missing_or_empty_is_an_empty_set),
                cmocka_unit_test(tenant_models_and_match_names),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
