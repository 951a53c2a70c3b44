/* fuzz-config: libFuzzer target for daemon/config.c and policy/tenant.c
 * (and the line layer under inih they share). The bytes are read as
 * moed.conf, then again as a drop-in over it, and as two tenant files.
 * Nothing may crash or leak; a success has no message and sane values, a
 * failure has messages, each naming the file and free of control bytes. */
#include <assert.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/config.h"
#include "policy/tenant.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_messages(const struct config_errors *e, size_t from)
{
        for (size_t i = from; i < e->n; i++) {
                assert(!strncmp(e->msgs[i], "fuzz.conf:", 10) || !strncmp(e->msgs[i], "d.conf:", 7));
                for (const char *p = e->msgs[i]; *p; p++)
                        assert((unsigned char)*p >= 0x20 && *p != 0x7f);
        }
}

static void fuzz_config(const char *text)
{
        struct moed_config *c = config_new_default();
        struct config_errors e = {0};
        int r;

        if (!c)
                return;
        r = config_apply_text(c, "fuzz.conf", text, &e);
        assert(r == -ENOMEM || (r == 0) == (e.n == 0));
        check_messages(&e, 0);
        if (r == 0) {
                assert(c->socket && c->socket[0] == '/' && c->devices && c->n_model_dirs >= 1);
                assert(c->threads >= 0 && c->threads <= 1024);
                assert(c->max_running >= 1 && c->step_tokens >= 1 && c->max_connections >= 1);
                assert(c->idle_timeout_s > 0 && c->drain_timeout_s >= 0);
                for (size_t i = 0; i < c->n_models; i++)
                        assert(c->models[i].id && c->models[i].origin &&
                               (!c->models[i].path || c->models[i].path[0] == '/'));
        }
        /* Again, as a drop-in: every model section now overrides. */
        r = config_apply_text(c, "d.conf", text, &e);
        (void)r;
        config_check(c, false, &e);
        check_messages(&e, 0);
        config_errors_clear(&e);
        config_free(c);
}

static void fuzz_tenants(const char *text)
{
        struct tenant_set *s = tenant_set_new();
        const struct tenant *t;
        enum tenant_match how;
        struct moerr e = {{0}};
        gid_t groups[] = { 0, 100 };
        int r;

        if (!s)
                return;
        r = tenant_set_add_text(s, "fuzz", text, &e);
        assert(r == -ENOMEM || (r == 0) == (tenant_set_count(s) == 1));
        if (r == 0) {
                t = tenant_set_get(s, 0);
                assert(t->weight > 0 && t->weight <= 1000);
                assert(t->kv_share > 0 && t->kv_share <= 1);
                assert(t->max_concurrent >= 0 && t->tokens_per_day >= 0);
        } else {
                assert(e.msg[0]);
        }
        /* The same identities again: users and tokens must clash. */
        tenant_set_add_text(s, "fuzz2", text, &e);
        t = tenant_lookup(s, 0, 0, groups, 2, NULL, &how);
        assert(!t || how == TENANT_MATCH_USER || how == TENANT_MATCH_GROUP);
        t = tenant_lookup(s, 1000, 100, NULL, 0, "abc", &how);
        assert(how == TENANT_MATCH_TOKEN);
        (void)t;
        tenant_set_free(s);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        char *text;

        if (size > 1 << 16)
                return 0;
        text = malloc(size + 1);
        if (!text)
                return 0;
        memcpy(text, data, size);
        text[size] = '\0';
        fuzz_config(text);
        fuzz_tenants(text);
        free(text);
        return 0;
}
