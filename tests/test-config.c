/* test-config: daemon/config.c: every key with good and bad values, the
 * value parsers, defaults and empty assignments, messages with their line
 * numbers, drop-in order and checks of the model files. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <grp.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/cleanup.h"
#include "daemon/config.h"
#include "testutil.h"

static void write_file(const char *path, const char *text)
{
        FILE *f = fopen(path, "w");

        assert_non_null(f);
        assert_int_equal(fwrite(text, 1, strlen(text), f), strlen(text));
        assert_int_equal(fclose(f), 0);
}

/* Applies text as "t.conf" over the defaults; the config and the errors
 * are the caller's. */
static struct moed_config *apply(const char *text, int want_r, struct config_errors *errs)
{
        struct moed_config *c = config_new_default();

        assert_non_null(c);
        assert_int_equal(config_apply_text(c, "t.conf", text, errs), want_r);
        return c;
}

static void assert_errors(const struct config_errors *e, const char *const *want, size_t n)
{
        for (size_t i = 0; i < e->n; i++)
                printf("  error %zu: %s\n", i, e->msgs[i]);
        assert_int_equal(e->n, n);
        for (size_t i = 0; i < n; i++)
                assert_string_equal(e->msgs[i], want[i]);
}

static void config_defaults_match_the_header(void **state)
{
        struct moed_config *c = config_new_default();

        (void)state;
        assert_non_null(c);
        assert_string_equal(c->socket, "/run/moed/moed.sock");
        assert_int_equal(c->threads, 0);
        assert_string_equal(c->devices, "all");
        assert_int_equal(c->kv_cache_bytes, 0);
        assert_int_equal(c->max_connections, 512);
        assert_int_equal(c->max_request_bytes, 1 << 20);
        assert_int_equal(c->max_queued, 1024);
        assert_int_equal(c->max_running, 64);
        assert_int_equal(c->step_tokens, 256);
        assert_true(c->idle_timeout_s == 30);
        assert_true(c->drain_timeout_s == 30);
        assert_true(c->watchdog_stall_s == 60);
        assert_string_equal(c->tenants_dir, "/etc/moed/tenants.d");
        assert_string_equal(c->state_dir, "/var/lib/moed");
        assert_int_equal(c->n_model_dirs, 1);
        assert_string_equal(c->model_dirs[0], "/var/lib/moed/models");
        assert_false(c->allow_network_fs);
        assert_int_equal(c->residency, RESIDENCY_STRICT);
        assert_null(c->audit_file);
        assert_int_equal(c->n_models, 0);
        assert_null(c->models);
        config_free(c);
        config_free(NULL);
}

static void config_daemon_keys_take_good_values(void **state)
{
        struct config_errors e = {0};
        struct moed_config *c;

        (void)state;
        c = apply("[Daemon]\n"
                  "Socket=/tmp/moed test/m.sock\n"
                  "Threads=12\n"
                  "Devices=0,1,3\n"
                  "KVCacheSize=1.5G\n"
                  "MaxConnections=1000000\n"
                  "MaxRequestSize=64KiB\n"
                  "MaxQueuedRequests=0\n"
                  "MaxRunning=65536\n"
                  "StepTokens=1\n"
                  "IdleTimeoutSec=500ms\n"
                  "DrainTimeoutSec=5min\n"
                  "EngineStallSec=1h\n"
                  "TenantsDirectory=/srv/t\n"
                  "StateDirectory=/srv/state\n"
                  "ModelDirectories=/a  /b/c\t/d\n"
                  "AllowNetworkFilesystems=Yes\n"
                  "Residency=relaxed\n"
                  "AuditFile=/var/log/moed/audit.jsonl\n",
                  0, &e);
        assert_int_equal(e.n, 0);
        assert_string_equal(c->socket, "/tmp/moed test/m.sock");
        assert_int_equal(c->threads, 12);
        assert_string_equal(c->devices, "0,1,3");
        assert_int_equal(c->kv_cache_bytes, 3ull << 29);
        assert_int_equal(c->max_connections, 1000000);
        assert_int_equal(c->max_request_bytes, 64 << 10);
        assert_int_equal(c->max_queued, 0);
        assert_int_equal(c->max_running, 65536);
        assert_int_equal(c->step_tokens, 1);
        assert_true(fabs(c->idle_timeout_s - 0.5) < 1e-12);
        assert_true(c->drain_timeout_s == 300);
        assert_true(c->watchdog_stall_s == 3600);
        assert_string_equal(c->tenants_dir, "/srv/t");
        assert_string_equal(c->state_dir, "/srv/state");
        assert_int_equal(c->n_model_dirs, 3);
        assert_string_equal(c->model_dirs[0], "/a");
        assert_string_equal(c->model_dirs[1], "/b/c");
        assert_string_equal(c->model_dirs[2], "/d");
        assert_true(c->allow_network_fs);
        assert_int_equal(c->residency, RESIDENCY_RELAXED);
        assert_string_equal(c->audit_file, "/var/log/moed/audit.jsonl");
        config_free(c);

        /* The other spellings of the same kinds. */
        c = apply("[Daemon]\nThreads=auto\nDevices=cpu\nKVCacheSize=8G\n"
                  "AllowNetworkFilesystems=off\nResidency=strict\nThreads=1024\n"
                  "DrainTimeoutSec=0\nIdleTimeoutSec=1min 30s\n",
                  0, &e);
        assert_int_equal(c->threads, 1024);
        assert_string_equal(c->devices, "cpu");
        assert_int_equal(c->kv_cache_bytes, 8ull << 30);
        assert_false(c->allow_network_fs);
        assert_true(c->drain_timeout_s == 0);
        assert_true(c->idle_timeout_s == 90);
        config_free(c);
        c = apply("[Daemon]\nKVCacheSize=4G\nKVCacheSize=auto\nDevices=all\n", 0, &e);
        assert_int_equal(c->kv_cache_bytes, 0);
        assert_string_equal(c->devices, "all");
        config_free(c);
        assert_int_equal(e.n, 0);
}

static void config_daemon_keys_reject_bad_values(void **state)
{
        static const struct {
                const char *key, *value, *expect;
        } bad[] = {
                { "Socket", "run/moed.sock", "an absolute path shorter than 108 bytes" },
                { "Socket", "/tmp/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
                            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                  "an absolute path shorter than 108 bytes" },
                { "Threads", "0", "auto or 1..1024" },
                { "Threads", "1025", "auto or 1..1024" },
                { "Threads", "-1", "auto or 1..1024" },
                { "Threads", "four", "auto or 1..1024" },
                { "Threads", "2.5", "auto or 1..1024" },
                { "Devices", "gpu", "all, cpu or device numbers like 0,1" },
                { "Devices", "0,,1", "all, cpu or device numbers like 0,1" },
                { "Devices", "0,1,", "all, cpu or device numbers like 0,1" },
                { "Devices", "1024", "all, cpu or device numbers like 0,1" },
                { "KVCacheSize", "8X", "auto or a size like 8G" },
                { "KVCacheSize", "-8G", "auto or a size like 8G" },
                { "KVCacheSize", "99999999999T", "auto or a size like 8G" },
                { "MaxConnections", "0", "an integer in 1..1000000" },
                { "MaxConnections", "1000001", "an integer in 1..1000000" },
                { "MaxConnections", "12k", "an integer in 1..1000000" },
                { "MaxRequestSize", "1023", "a size in 1K..1G" },
                { "MaxRequestSize", "2G", "a size in 1K..1G" },
                { "MaxQueuedRequests", "-1", "an integer in 0..1000000" },
                { "MaxRunning", "0", "an integer in 1..65536" },
                { "MaxRunning", "65537", "an integer in 1..65536" },
                { "StepTokens", "1048577", "an integer in 1..1048576" },
                { "StepTokens", "0x10", "an integer in 1..1048576" },
                { "IdleTimeoutSec", "0", "a duration like 30s, 500ms or 5min, at least 1ms" },
                { "IdleTimeoutSec", "5 parsecs", "a duration like 30s, 500ms or 5min, at least 1ms" },
                { "DrainTimeoutSec", "forever", "a duration like 30s, 500ms or 5min" },
                { "DrainTimeoutSec", "1e3", "a duration like 30s, 500ms or 5min" },
                { "EngineStallSec", "-5s", "a duration like 60s or 2min, at least 1ms" },
                { "EngineStallSec", "200d", "a duration like 60s or 2min, at least 1ms" },
                { "TenantsDirectory", "etc/moed", "an absolute path" },
                { "StateDirectory", "~/state", "an absolute path" },
                { "ModelDirectories", "/ok relative/dir", "absolute paths separated by spaces" },
                { "AllowNetworkFilesystems", "maybe", "yes or no" },
                { "AllowNetworkFilesystems", "2", "yes or no" },
                { "Residency", "Strict", "strict or relaxed" },
                { "Residency", "none", "strict or relaxed" },
                { "AuditFile", "audit.jsonl", "an absolute path" },
        };

        (void)state;
        for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
                struct config_errors e = {0};
                struct moed_config *c, *def = config_new_default();
                char text[512], want[512];

                snprintf(text, sizeof text, "# bad %s\n[Daemon]\n%s=%s\n", bad[i].key, bad[i].key,
                         bad[i].value);
                /* Messages show at most 48 characters of a value. */
                snprintf(want, sizeof want,
                         "t.conf:3: [Daemon] %s: invalid value '%.48s%s' (expected %s)", bad[i].key,
                         bad[i].value, strlen(bad[i].value) > 48 ? "..." : "", bad[i].expect);
                printf("%s=%s\n", bad[i].key, bad[i].value);
                c = apply(text, -EINVAL, &e);
                assert_errors(&e, (const char *const[]){ want }, 1);
                /* A bad value leaves the key as it was. */
                assert_string_equal(c->socket, def->socket);
                assert_int_equal(c->threads, 0);
                assert_string_equal(c->devices, "all");
                assert_int_equal(c->kv_cache_bytes, 0);
                assert_int_equal(c->max_running, 64);
                assert_int_equal(c->n_model_dirs, 1);
                assert_string_equal(c->model_dirs[0], "/var/lib/moed/models");
                assert_int_equal(c->residency, RESIDENCY_STRICT);
                assert_null(c->audit_file);
                config_errors_clear(&e);
                assert_int_equal(e.n, 0);
                config_free(c);
                config_free(def);
        }
}

static void config_model_keys_good_and_bad(void **state)
{
        struct config_errors e = {0};
        struct moed_config *c;

        (void)state;
        c = apply("[Model deepseek-v3]\nPath=/m/v3.gguf\nMaxContext=32768\n"
                  "[Model lite]\nPath = /m/lite.gguf\n",
                  0, &e);
        assert_int_equal(c->n_models, 2);
        assert_string_equal(c->models[0].id, "deepseek-v3");
        assert_string_equal(c->models[0].path, "/m/v3.gguf");
        assert_int_equal(c->models[0].max_context, 32768);
        assert_string_equal(c->models[0].origin, "t.conf:2");
        assert_string_equal(c->models[1].id, "lite");
        assert_string_equal(c->models[1].path, "/m/lite.gguf");
        assert_int_equal(c->models[1].max_context, 0);
        assert_int_equal(config_check(c, false, &e), 0);
        config_free(c);

        c = apply("[Model m]\nPath=m.gguf\nMaxContext=-1\nMaxContext=16777217\nMaxContext=1k\n"
                  "Threads=4\n",
                  -EINVAL, &e);
        assert_errors(&e, (const char *const[]){
                "t.conf:2: [Model m] Path: invalid value 'm.gguf' (expected an absolute path)",
                "t.conf:3: [Model m] MaxContext: invalid value '-1' (expected an integer in "
                "0..16777216 (0: the model's own))",
                "t.conf:4: [Model m] MaxContext: invalid value '16777217' (expected an integer in "
                "0..16777216 (0: the model's own))",
                "t.conf:5: [Model m] MaxContext: invalid value '1k' (expected an integer in "
                "0..16777216 (0: the model's own))",
                "t.conf:6: [Model m] Threads: unknown key",
        }, 5);
        config_errors_clear(&e);
        /* The model exists, without a Path: config_check names it. */
        assert_int_equal(c->n_models, 1);
        assert_int_equal(config_check(c, false, &e), -EINVAL);
        assert_errors(&e, (const char *const[]){
                "t.conf:1: [Model m] Path: missing (every model needs one)" }, 1);
        config_errors_clear(&e);
        config_free(c);
}

static void config_model_ids_are_checked(void **state)
{
        char id64[65], id65[66], text[256];
        struct config_errors e = {0};
        struct moed_config *c;

        (void)state;
        memset(id64, 'x', 64);
        id64[64] = '\0';
        memset(id65, 'y', 65);
        id65[65] = '\0';
        /* 64 characters: longer than inih's own 50-byte section names. */
        snprintf(text, sizeof text, "[Model %s]\nPath=/m\n[Model a.b-c_d:q4_K]\nPath=/n\n", id64);
        c = apply(text, 0, &e);
        assert_int_equal(c->n_models, 2);
        assert_string_equal(c->models[0].id, id64);
        assert_string_equal(c->models[1].id, "a.b-c_d:q4_K");
        config_free(c);

        snprintf(text, sizeof text,
                 "[Model %s]\nPath=/m\n[Model a/b]\n[Model ]\n[Model]\n[model x]\n[Model x y]\n",
                 id65);
        c = apply(text, -EINVAL, &e);
        assert_int_equal(e.n, 6);
        assert_non_null(strstr(e.msgs[0], "t.conf:1: [Model yyyy"));
        assert_non_null(strstr(e.msgs[0], "]: invalid model id (1..64 letters, digits"));
        assert_string_equal(e.msgs[1], "t.conf:3: [Model a/b]: invalid model id (1..64 letters, "
                                       "digits, '.', '-', '_', ':')");
        assert_non_null(strstr(e.msgs[2], "t.conf:4: [Model ]: invalid model id"));
        assert_string_equal(e.msgs[3], "t.conf:5: [Model]: a model section needs an id: [Model ID]");
        assert_string_equal(e.msgs[4], "t.conf:6: [model x]: unknown section");
        assert_non_null(strstr(e.msgs[5], "t.conf:7: [Model x y]: invalid model id"));
        /* Keys of a rejected section are not reported again nor applied. */
        assert_int_equal(c->n_models, 0);
        config_errors_clear(&e);
        config_free(c);
}

static void config_duplicate_model_in_one_file_is_an_error(void **state)
{
        struct config_errors e = {0};
        struct moed_config *c;

        (void)state;
        c = apply("[Model a]\nPath=/a\n[Daemon]\nThreads=2\n\n[Model a]\nPath=/b\n", -EINVAL, &e);
        assert_errors(&e, (const char *const[]){
                "t.conf:6: [Model a]: duplicate section (first at line 1)" }, 1);
        assert_int_equal(c->n_models, 1);
        assert_string_equal(c->models[0].path, "/a");
        config_errors_clear(&e);

        /* A later file (a drop-in) overrides keys of the model. */
        assert_int_equal(config_apply_text(c, "d.conf", "[Model a]\nMaxContext=4096\n", &e), 0);
        assert_int_equal(config_apply_text(c, "e.conf", "\n[Model a]\nPath=/c\n[Model b]\nPath=/d\n",
                                           &e), 0);
        assert_int_equal(e.n, 0);
        assert_int_equal(c->n_models, 2);
        assert_string_equal(c->models[0].path, "/c");
        assert_int_equal(c->models[0].max_context, 4096);
        assert_string_equal(c->models[0].origin, "e.conf:3");
        assert_string_equal(c->models[1].id, "b");
        config_free(c);
}

static void config_empty_value_resets_the_default(void **state)
{
        struct config_errors e = {0};
        struct moed_config *c;

        (void)state;
        c = apply("[Daemon]\nSocket=/x.sock\nThreads=8\nDevices=1\nKVCacheSize=1G\n"
                  "MaxConnections=5\nMaxRequestSize=4K\nMaxQueuedRequests=3\nMaxRunning=2\n"
                  "StepTokens=9\nIdleTimeoutSec=1\nDrainTimeoutSec=2\nEngineStallSec=3\n"
                  "TenantsDirectory=/t\nStateDirectory=/s\nModelDirectories=/m1 /m2\n"
                  "AllowNetworkFilesystems=yes\nResidency=relaxed\nAuditFile=/a\n"
                  "[Model m]\nPath=/p\nMaxContext=10\n",
                  0, &e);
        assert_int_equal(c->threads, 8);
        assert_int_equal(config_apply_text(c, "d.conf",
                                           "[Daemon]\nSocket=\nThreads=\nDevices=\nKVCacheSize=\n"
                                           "MaxConnections=\nMaxRequestSize=\nMaxQueuedRequests=\n"
                                           "MaxRunning=\nStepTokens=\nIdleTimeoutSec=\n"
                                           "DrainTimeoutSec=\nEngineStallSec=\nTenantsDirectory=\n"
                                           "StateDirectory=\nModelDirectories=\n"
                                           "AllowNetworkFilesystems=\nResidency=\nAuditFile=\n"
                                           "[Model m]\nMaxContext=\nPath=\n",
                                           &e), 0);
        assert_int_equal(e.n, 0);
        assert_string_equal(c->socket, "/run/moed/moed.sock");
        assert_int_equal(c->threads, 0);
        assert_string_equal(c->devices, "all");
        assert_int_equal(c->kv_cache_bytes, 0);
        assert_int_equal(c->max_connections, 512);
        assert_int_equal(c->max_request_bytes, 1 << 20);
        assert_int_equal(c->max_queued, 1024);
        assert_int_equal(c->max_running, 64);
        assert_int_equal(c->step_tokens, 256);
        assert_true(c->idle_timeout_s == 30 && c->drain_timeout_s == 30);
        assert_true(c->watchdog_stall_s == 60);
        assert_string_equal(c->tenants_dir, "/etc/moed/tenants.d");
        assert_string_equal(c->state_dir, "/var/lib/moed");
        assert_int_equal(c->n_model_dirs, 1);
        assert_string_equal(c->model_dirs[0], "/var/lib/moed/models");
        assert_false(c->allow_network_fs);
        assert_int_equal(c->residency, RESIDENCY_STRICT);
        assert_null(c->audit_file);
        assert_int_equal(c->models[0].max_context, 0);
        /* Path has no default: emptied, the model is incomplete. */
        assert_null(c->models[0].path);
        assert_int_equal(config_check(c, false, &e), -EINVAL);
        assert_errors(&e, (const char *const[]){
                "d.conf:22: [Model m] Path: missing (every model needs one)" }, 1);
        config_errors_clear(&e);
        config_free(c);
}

static void config_parse_size_values(void **state)
{
        static const struct {
                const char *s;
                uint64_t v;
        } good[] = {
                { "0", 0 },
                { "1024", 1024 },
                { "1024B", 1024 },
                { "1K", 1024 },
                { "512M", 512ull << 20 },
                { "8G", 8ull << 30 },
                { "8GB", 8ull << 30 },
                { "8GiB", 8ull << 30 },
                { "1.5G", 3ull << 29 },
                { "0.5K", 512 },
                { "2T", 2ull << 40 },
                { "16777215T", 16777215ull << 40 },
                { "18446744073709551615", UINT64_MAX },
        };
        static const char *const bad[] = {
                "", "G", "8 G", " 8G", "8G ", "8g", "8Gb", "8iB", "8KK", "-1", "+1", "1e9",
                "0x10", "8P", "16777216T", "18446744073709551616", "1..5G", "nan", "inf",
        };
        uint64_t v;

        (void)state;
        for (size_t i = 0; i < ARRAY_SIZE(good); i++) {
                v = 7;
                assert_int_equal(config_parse_size(good[i].s, &v), 0);
                assert_int_equal(v, good[i].v);
        }
        for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
                v = 7;
                printf("size '%s'\n", bad[i]);
                assert_int_equal(config_parse_size(bad[i], &v), -EINVAL);
                assert_int_equal(v, 7);
        }
        assert_int_equal(config_parse_size(NULL, &v), -EINVAL);
}

static void config_parse_threads_values(void **state)
{
        static const char *const bad[] = { "", "0", "1025", "-1", "Auto", "1.0", " 4", "4 ",
                                           "99999999999999999999" };
        int t = 7;

        (void)state;
        assert_int_equal(config_parse_threads("auto", &t), 0);
        assert_int_equal(t, 0);
        assert_int_equal(config_parse_threads("1", &t), 0);
        assert_int_equal(t, 1);
        assert_int_equal(config_parse_threads("1024", &t), 0);
        assert_int_equal(t, 1024);
        for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
                t = 7;
                assert_int_equal(config_parse_threads(bad[i], &t), -EINVAL);
                assert_int_equal(t, 7);
        }
        assert_int_equal(config_parse_threads(NULL, &t), -EINVAL);
}

static void config_parse_seconds_values(void **state)
{
        static const struct {
                const char *s;
                double v;
        } good[] = {
                { "30", 30 },     { "30s", 30 },          { "30sec", 30 },   { "500ms", 0.5 },
                { "250us", 250e-6 }, { "5min", 300 },     { "5m", 300 },     { "1h", 3600 },
                { "2d", 172800 }, { "1.5h", 5400 },       { "1h 30min", 5400 }, { "1h30min", 5400 },
                { "5 min", 300 }, { "0", 0 },             { "2.5", 2.5 },    { "1min 1s 1ms", 61.001 },
        };
        static const char *const bad[] = { "", " ", "s", "-1", "1e3", "5 parsecs", "1h 30",
                                           "30 1h", "inf", "nan", "0x10", "1..2s", "5mins",
                                           "99999999999999999999999d" };
        double v;

        (void)state;
        for (size_t i = 0; i < ARRAY_SIZE(good); i++) {
                v = -1;
                printf("seconds '%s'\n", good[i].s);
                assert_int_equal(config_parse_seconds(good[i].s, &v), 0);
                assert_true(fabs(v - good[i].v) < 1e-9);
        }
        for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
                v = -1;
                printf("seconds '%s'\n", bad[i]);
                assert_int_equal(config_parse_seconds(bad[i], &v), -EINVAL);
                assert_true(v == -1);
        }
        assert_int_equal(config_parse_seconds(NULL, &v), -EINVAL);
}

static void config_booleans(void **state)
{
        static const char *const yes[] = { "yes", "true", "on", "1", "YES", "True" };
        static const char *const no[] = { "no", "false", "off", "0", "No", "OFF" };
        struct config_errors e = {0};

        (void)state;
        for (size_t i = 0; i < ARRAY_SIZE(yes); i++) {
                char text[128];
                struct moed_config *c;

                snprintf(text, sizeof text, "[Daemon]\nAllowNetworkFilesystems=%s\n", yes[i]);
                c = apply(text, 0, &e);
                assert_true(c->allow_network_fs);
                snprintf(text, sizeof text, "[Daemon]\nAllowNetworkFilesystems=%s\n", no[i]);
                assert_int_equal(config_apply_text(c, "u.conf", text, &e), 0);
                assert_false(c->allow_network_fs);
                config_free(c);
        }
        assert_int_equal(e.n, 0);
}

static void config_unknown_key_and_section_name_their_line(void **state)
{
        struct config_errors e = {0};
        struct moed_config *c;

        (void)state;
        c = apply("# moed\n"
                  "[Daemon]\n"
                  "Thread=4\n"
                  "\n"
                  "[Deamon]\n"
                  "Threads=4\n"
                  "Socket=/x\n"
                  "[Model m]\n"
                  "Path=/m\n"
                  "Size=1G\n",
                  -EINVAL, &e);
        assert_errors(&e, (const char *const[]){
                "t.conf:3: [Daemon] Thread: unknown key",
                "t.conf:5: [Deamon]: unknown section",
                "t.conf:10: [Model m] Size: unknown key",
        }, 3);
        /* Keys under an unknown section are not applied elsewhere. */
        assert_int_equal(c->threads, 0);
        assert_string_equal(c->socket, "/run/moed/moed.sock");
        config_errors_clear(&e);
        config_free(c);

        /* Keys are case-sensitive, like systemd's. */
        c = apply("[Daemon]\nthreads=4\n", -EINVAL, &e);
        assert_errors(&e, (const char *const[]){ "t.conf:2: [Daemon] threads: unknown key" }, 1);
        config_errors_clear(&e);
        config_free(c);
}

static void config_collects_every_error(void **state)
{
        struct config_errors e = {0};
        struct moed_config *c;

        (void)state;
        c = apply("Threads=4\n"                        /* 1: before any section */
                  "[Daemon]\n"                         /* 2 */
                  "Threads=lots\n"                     /* 3 */
                  "this line is not an assignment\n"   /* 4 */
                  "MaxRunning=8\n"                     /* 5: fine */
                  "[Daemon\n"                          /* 6 */
                  "Residency=lax\n"                    /* 7: still [Daemon] */
                  "[Daemon] Threads=4\n"               /* 8 */
                  "[Nope]\n"                           /* 9 */
                  "Whatever=1\n"                       /* 10: silent, [Nope] was reported */
                  "[Model x]\n"                        /* 11 */
                  "Path=relative\n"                    /* 12 */
                  "Bogus\n"                            /* 13 */
                  "=value\n",                          /* 14 */
                  -EINVAL, &e);
        assert_errors(&e, (const char *const[]){
                "t.conf:1: Threads: outside of any section ([Daemon] or [Model ID])",
                "t.conf:3: [Daemon] Threads: invalid value 'lots' (expected auto or 1..1024)",
                "t.conf:4: expected Key=Value, [Section] or a comment",
                "t.conf:6: section header without ']'",
                "t.conf:7: [Daemon] Residency: invalid value 'lax' (expected strict or relaxed)",
                "t.conf:8: unexpected text after ']'",
                "t.conf:9: [Nope]: unknown section",
                "t.conf:12: [Model x] Path: invalid value 'relative' (expected an absolute path)",
                "t.conf:13: expected Key=Value, [Section] or a comment",
                "t.conf:14: [Model x]: missing key name before '='",
        }, 10);
        assert_int_equal(c->max_running, 8);
        config_errors_clear(&e);
        config_free(c);
}

/* What inih (as built by Debian: multi-line values and inline comments on,
 * 200-byte lines) would do differently without the line layer. */
static void config_lines_are_read_as_systemd_would(void **state)
{
        char text[1024], path[300];
        struct config_errors e = {0};
        struct moed_config *c;

        (void)state;
        /* Indented: its own key, not a continuation of Threads. */
        c = apply("[Daemon]\nThreads=4\n    MaxRunning=8\n\t[Model m]\n  Path=/m\n", 0, &e);
        assert_int_equal(c->threads, 4);
        assert_int_equal(c->max_running, 8);
        assert_int_equal(c->n_models, 1);
        config_free(c);

        /* CRLF, a BOM, both comment characters, spaces around '='. */
        c = apply("\xEF\xBB\xBF[Daemon]\r\n; comment\r\n# comment\r\nThreads = 6 \r\n"
                  "Socket=/a b.sock\r\n",
                  0, &e);
        assert_int_equal(c->threads, 6);
        assert_string_equal(c->socket, "/a b.sock");
        config_free(c);

        /* inih cuts a value at " ;" (an inline comment); '#' is kept. */
        c = apply("[Daemon]\nThreads=3 ; three\nAuditFile=/var/log/a#1\n", 0, &e);
        assert_int_equal(c->threads, 3);
        assert_string_equal(c->audit_file, "/var/log/a#1");
        config_free(c);
        assert_int_equal(e.n, 0);

        /* A line longer than inih's buffer is refused, not split in two
         * (its tail would have been read as "Threads=1"). */
        memset(path, 'p', sizeof path);
        path[0] = '/';
        memcpy(path + 200, " Threads=1", 10);
        path[sizeof path - 1] = '\0';
        snprintf(text, sizeof text, "[Daemon]\nAuditFile=%s\nMaxRunning=3\n", path);
        c = apply(text, -EINVAL, &e);
        assert_errors(&e, (const char *const[]){
                "t.conf:2: line too long (more than 198 characters)" }, 1);
        assert_int_equal(c->threads, 0);
        assert_null(c->audit_file);
        assert_int_equal(c->max_running, 3);
        config_errors_clear(&e);
        config_free(c);

        /* 198 characters is still fine. */
        memset(path, 'q', sizeof path);
        path[0] = '/';
        path[198 - strlen("AuditFile=")] = '\0';
        snprintf(text, sizeof text, "[Daemon]\nAuditFile=%s\n", path);
        c = apply(text, 0, &e);
        assert_string_equal(c->audit_file, path);
        config_free(c);

        /* Control characters are quoted in messages. */
        c = apply("[Daemon]\nThreads=\x1b[31mred\n", -EINVAL, &e);
        assert_errors(&e, (const char *const[]){
                "t.conf:2: [Daemon] Threads: invalid value '\\x1b[31mred' (expected auto or "
                "1..1024)" }, 1);
        config_errors_clear(&e);
        config_free(c);
}

static void config_load_applies_dropins_in_name_order(void **state)
{
        struct config_errors e = {0};
        struct moed_config *c = NULL;
        char *main_conf = tu_path("order.conf"), *dir = tu_path("order.conf.d");
        char *model = tu_path("order-model.gguf");

        (void)state;
        write_file(model, "GGUF");
        write_file(main_conf, "[Daemon]\nThreads=1\nMaxRunning=1\nStepTokens=1\n"
                              "[Model a]\nPath=/nope/a.gguf\nMaxContext=100\n");
        assert_int_equal(mkdir(dir, 0700), 0);
        write_file(tu_path("order.conf.d/20-b.conf"), "[Daemon]\nThreads=3\n");
        write_file(tu_path("order.conf.d/10-a.conf"), "[Daemon]\nThreads=2\nMaxRunning=2\n");
        write_file(tu_path("order.conf.d/30-model.conf"), "[Model a]\nMaxContext=200\n");
        /* Ignored: not .conf, hidden. */
        write_file(tu_path("order.conf.d/99-z.conf.bak"), "[Daemon]\nThreads=99\n");
        write_file(tu_path("order.conf.d/.99-hidden.conf"), "[Daemon]\nThreads=98\n");
        write_file(tu_path("order.conf.d/README"), "not ini at all");

        assert_int_equal(config_load(main_conf, NULL, false, &c, &e), 0);
        assert_int_equal(e.n, 0);
        assert_non_null(c);
        assert_int_equal(c->threads, 3);
        assert_int_equal(c->max_running, 2);
        assert_int_equal(c->step_tokens, 1);
        assert_int_equal(c->n_models, 1);
        assert_string_equal(c->models[0].path, "/nope/a.gguf");
        assert_int_equal(c->models[0].max_context, 200);
        config_free(c);

        /* A drop-in adds a model and another replaces its Path. With
         * check_files the final Path is the one checked. */
        write_file(tu_path("order.conf.d/40-new.conf"), "[Model b]\nPath=/nope/b.gguf\n");
        {
                char text[512];

                snprintf(text, sizeof text, "[Model b]\nPath=%s\n[Model a]\nPath=%s\n", model,
                         model);
                write_file(tu_path("order.conf.d/50-fix.conf"), text);
        }
        c = NULL;
        assert_int_equal(config_load(main_conf, NULL, true, &c, &e), 0);
        assert_int_equal(e.n, 0);
        assert_int_equal(c->n_models, 2);
        assert_string_equal(c->models[1].id, "b");
        assert_string_equal(c->models[1].path, model);
        config_free(c);

        /* An explicit drop-in directory replaces path.d. */
        {
                char *other = tu_path("other.d");

                assert_int_equal(mkdir(other, 0700), 0);
                write_file(tu_path("other.d/x.conf"), "[Daemon]\nThreads=7\n");
                c = NULL;
                assert_int_equal(config_load(main_conf, other, false, &c, &e), 0);
                assert_int_equal(c->threads, 7);
                assert_int_equal(c->max_running, 1);
                config_free(c);
        }
}

static void config_load_errors_name_every_file(void **state)
{
        struct config_errors e = {0};
        struct moed_config *c = NULL;
        char *main_conf = tu_path("errs.conf"), *dir = tu_path("errs.conf.d");
        char *want0, *want1, *want2, *want3;

        (void)state;
        write_file(main_conf, "[Daemon]\nThreads=x\n");
        assert_int_equal(mkdir(dir, 0700), 0);
        write_file(tu_path("errs.conf.d/a.conf"), "\n\n[Daemon]\nFoo=1\n");
        assert_int_equal(mkdir(tu_path("errs.conf.d/b.conf"), 0700), 0);
        write_file(tu_path("errs.conf.d/c.conf"), "[Model m]\n");
        assert_int_equal(config_load(main_conf, NULL, false, &c, &e), -EINVAL);
        assert_null(c);
        assert_true(asprintf(&want0, "%s:2: [Daemon] Threads: invalid value 'x' (expected auto or "
                                     "1..1024)", main_conf) > 0);
        assert_true(asprintf(&want1, "%s/a.conf:4: [Daemon] Foo: unknown key", dir) > 0);
        assert_true(asprintf(&want2, "%s/b.conf: is a directory", dir) > 0);
        assert_true(asprintf(&want3, "%s/c.conf:1: [Model m] Path: missing (every model needs one)",
                             dir) > 0);
        assert_errors(&e, (const char *const[]){ want0, want1, want2, want3 }, 4);
        free(want0);
        free(want1);
        free(want2);
        free(want3);
        config_errors_clear(&e);
}

static void config_load_missing_main_file_is_an_error(void **state)
{
        struct config_errors e = {0};
        struct moed_config *c = NULL;
        char *path = tu_path("absent.conf"), *want;

        (void)state;
        assert_int_equal(config_load(path, NULL, false, &c, &e), -EINVAL);
        assert_null(c);
        assert_true(asprintf(&want, "%s: cannot open: No such file or directory", path) > 0);
        assert_errors(&e, (const char *const[]){ want }, 1);
        free(want);
        config_errors_clear(&e);

        /* A missing drop-in directory is no error: most systems have none. */
        path = tu_path("plain.conf");
        write_file(path, "");
        assert_int_equal(config_load(path, NULL, true, &c, &e), 0);
        assert_int_equal(e.n, 0);
        assert_int_equal(c->n_models, 0);
        config_free(c);
        c = NULL;
        assert_int_equal(config_load(path, tu_path("no-such.d"), true, &c, &e), 0);
        config_free(c);

        /* Bad arguments. */
        assert_int_equal(config_load(NULL, NULL, false, &c, &e), -EINVAL);
        assert_int_equal(config_apply_text(NULL, "x", "", &e), -EINVAL);
}

/* config_check on path, which this process may not read. */
static bool unreadable_is_reported(const char *path)
{
        struct config_errors e = {0};
        struct moed_config *d = config_new_default();
        char text[256];
        bool ok;

        snprintf(text, sizeof text, "[Model locked]\nPath=%s\n", path);
        ok = d && config_apply_text(d, "l.conf", text, &e) == 0 &&
             config_check(d, true, &e) == -EINVAL && e.n == 1 &&
             strstr(e.msgs[0], "l.conf:2: [Model locked] Path: ") &&
             strstr(e.msgs[0], ": Permission denied");
        for (size_t i = 0; i < e.n; i++)
                printf("  %s\n", e.msgs[i]);
        fflush(stdout); /* a forked child leaves through _exit */
        config_errors_clear(&e);
        config_free(d);
        return ok;
}

/* A mode-0 file: stat works, open does not. Root reads anything, so then
 * the check runs in a child that has become nobody, on a file in /tmp (the
 * test's own directory is closed to others). */
static void check_unreadable_file(void)
{
        char locked[] = "/tmp/moed-test-locked-XXXXXX";
        bool as_root = geteuid() == 0;
        int fd = mkstemp(locked), status;
        pid_t pid;

        assert_true(fd >= 0);
        close(fd);
        assert_int_equal(chmod(locked, 0), 0);
        if (!as_root) {
                bool ok = unreadable_is_reported(locked);

                unlink(locked);
                assert_true(ok);
                return;
        }
        fflush(NULL);
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                if (setgroups(0, NULL) < 0 || setresgid(65534, 65534, 65534) < 0 ||
                    setresuid(65534, 65534, 65534) < 0)
                        _exit(3);
                _exit(unreadable_is_reported(locked) ? 0 : 1);
        }
        assert_int_equal(waitpid(pid, &status, 0), pid);
        unlink(locked);
        assert_true(WIFEXITED(status));
        assert_int_equal(WEXITSTATUS(status), 0);
}

static void config_check_files_names_the_model(void **state)
{
        struct config_errors e = {0};
        struct moed_config *c = NULL;
        char *path = tu_path("files.conf"), *good = tu_path("files-good.gguf");
        char *dirpath = tu_path("files-dir.gguf"), *missing = tu_path("files-missing.gguf");
        char text[2048], *want1, *want2;

        (void)state;
        write_file(good, "GGUF");
        assert_int_equal(mkdir(dirpath, 0700), 0);
        snprintf(text, sizeof text,
                 "[Model good]\nPath=%s\n\n[Model gone]\nPath=%s\n[Model dir]\nPath=%s\n", good,
                 missing, dirpath);
        write_file(path, text);

        /* Without check_files only the syntax matters. */
        assert_int_equal(config_load(path, NULL, false, &c, &e), 0);
        assert_int_equal(c->n_models, 3);
        config_free(c);
        c = NULL;

        assert_int_equal(config_load(path, NULL, true, &c, &e), -EINVAL);
        assert_null(c);
        assert_true(asprintf(&want1, "%s:5: [Model gone] Path: '%s': No such file or directory",
                             path, missing) > 0);
        assert_true(asprintf(&want2, "%s:7: [Model dir] Path: '%s': not a regular file", path,
                             dirpath) > 0);
        assert_errors(&e, (const char *const[]){ want1, want2 }, 2);
        free(want1);
        free(want2);
        config_errors_clear(&e);

        /* Unreadable: stat works, open does not. Root reads anything, so
         * then the check runs in a child that has become nobody, on a file
         * in /tmp (the test's own directory is closed to others). */
        check_unreadable_file();
}

static void config_nul_byte_in_a_file_is_an_error(void **state)
{
        struct config_errors e = {0};
        struct moed_config *c = NULL;
        char *path = tu_path("nul.conf"), *want;
        FILE *f = fopen(path, "w");

        (void)state;
        assert_non_null(f);
        assert_int_equal(fwrite("[Daemon]\nThreads=4\0Threads=5\nMaxRunning=9\n", 1, 42, f), 42);
        assert_int_equal(fclose(f), 0);
        assert_int_equal(config_load(path, NULL, false, &c, &e), -EINVAL);
        assert_true(asprintf(&want, "%s:2: line contains a NUL byte", path) > 0);
        assert_errors(&e, (const char *const[]){ want }, 1);
        free(want);
        config_errors_clear(&e);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(config_defaults_match_the_header),
                cmocka_unit_test(config_daemon_keys_take_good_values),
                cmocka_unit_test(config_daemon_keys_reject_bad_values),
                cmocka_unit_test(config_model_keys_good_and_bad),
                cmocka_unit_test(config_model_ids_are_checked),
                cmocka_unit_test(config_duplicate_model_in_one_file_is_an_error),
                cmocka_unit_test(config_empty_value_resets_the_default),
                cmocka_unit_test(config_parse_size_values),
                cmocka_unit_test(config_parse_threads_values),
                cmocka_unit_test(config_parse_seconds_values),
                cmocka_unit_test(config_booleans),
                cmocka_unit_test(config_unknown_key_and_section_name_their_line),
                cmocka_unit_test(config_collects_every_error),
                cmocka_unit_test(config_lines_are_read_as_systemd_would),
                cmocka_unit_test(config_load_applies_dropins_in_name_order),
                cmocka_unit_test(config_load_errors_name_every_file),
                cmocka_unit_test(config_load_missing_main_file_is_an_error),
                cmocka_unit_test(config_check_files_names_the_model),
                cmocka_unit_test(config_nul_byte_in_a_file_is_an_error),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
