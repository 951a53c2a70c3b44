/* fuzz-usage-store: libFuzzer target for usage_store_load
 * (policy/usage-store.c). The bytes become STATE/usage.json of a private
 * directory and are loaded into a fresh book. A load either succeeds or
 * says the file is corrupt, with a printable message, the file set aside
 * and the book untouched; what loads must save and load again to the same
 * counters. A random file never carries a right checksum, so bytes that
 * parse as a JSON object are tried a second time with their checksum made
 * right: that reaches the checks behind it. Nothing may crash or leak. */
#include <assert.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>
#include <openssl/evp.h>

#include "policy/usage-store.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char dir[] = "/tmp/fuzz-usage-store-XXXXXX";

static double fixed_now(void *ud) { (void)ud; return 100; }
static double fixed_wall(void *ud) { (void)ud; return 1700000000; }

/* Empties the directory (usage.json, its .tmp and corrupt-* files). */
static void clear_dir(void)
{
        DIR *d = opendir(dir);
        struct dirent *de;

        if (!d)
                abort();
        while ((de = readdir(d)))
                if (de->d_name[0] != '.')
                        unlinkat(dirfd(d), de->d_name, 0);
        closedir(d);
}

static void remove_dir(void)
{
        clear_dir();
        rmdir(dir);
}

static struct quota_book *book(void)
{
        struct quota_clock c = { fixed_now, fixed_wall, NULL };

        return quota_book_new(&c);
}

static void same(const struct quota_book *a, const struct quota_book *b)
{
        struct quota_usage x, y;

        assert(quota_usage_count(a) == quota_usage_count(b));
        for (size_t i = 0; i < quota_usage_count(a); i++) {
                assert(quota_usage_get(a, i, &x) == 0);
                assert(quota_usage_find(b, x.name, &y) == 0);
                assert(x.requests == y.requests && x.refusals == y.refusals);
                assert(x.prompt_tokens == y.prompt_tokens);
                assert(x.completion_tokens == y.completion_tokens && x.limited == y.limited);
                assert(x.minute_used == y.minute_used && x.day_used == y.day_used);
                assert(!memcmp(x.refused, y.refused, sizeof x.refused));
        }
}

/* One load of bytes as usage.json, and what must hold after it. */
static void load_once(const void *data, size_t size)
{
        struct quota_book *b, *c;
        struct moerr e = {{0}};
        char path[64];
        int fd, r;

        snprintf(path, sizeof path, "%s/usage.json", dir);
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0 || (size && write(fd, data, size) != (ssize_t)size))
                abort();
        close(fd);
        if (!(b = book()))
                return;
        r = usage_store_load(dir, b, &e);
        assert(r == 0 || r == -EBADMSG || r == -ENOMEM);
        if (r == -EBADMSG) {
                assert(e.msg[0] && strstr(e.msg, "is corrupt"));
                for (const char *p = e.msg; *p; p++)
                        assert((unsigned char)*p >= 0x20 && (unsigned char)*p < 0x7f);
                assert(quota_usage_count(b) == 0);
                assert(access(path, F_OK) < 0 && errno == ENOENT);
        } else if (r == 0) {
                r = usage_store_save(dir, b, &e);
                assert(r == 0 || r == -ENOMEM);
                if (r == 0 && (c = book())) {
                        r = usage_store_load(dir, c, &e);
                        assert(r == 0 || r == -ENOMEM);
                        if (r == 0)
                                same(b, c);
                        quota_book_free(c);
                }
        }
        quota_book_free(b);
        clear_dir();
}

/* The bytes as a JSON object with the right "sha256", or NULL. */
static char *signed_copy(const uint8_t *data, size_t size)
{
        json_t *o = json_loadb((const char *)data, size, JSON_REJECT_DUPLICATES, NULL);
        unsigned char md[32];
        unsigned int len = 0;
        char hex[65], *canon = NULL, *text = NULL;

        if (!json_is_object(o))
                goto out;
        json_object_del(o, "sha256");
        canon = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
        if (!canon || !EVP_Digest(canon, strlen(canon), md, &len, EVP_sha256(), NULL))
                goto out;
        for (unsigned int i = 0; i < len && i < 32; i++)
                snprintf(hex + 2 * i, 3, "%02x", md[i]);
        if (json_object_set_new(o, "sha256", json_string(hex)) == 0)
                text = json_dumps(o, JSON_INDENT(1));
out:
        free(canon);
        json_decref(o);
        return text;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        static int ready;
        char *text;

        if (!ready) {
                if (!mkdtemp(dir))
                        abort();
                atexit(remove_dir);
                ready = 1;
        }
        if (size > 1 << 20)
                return 0;
        load_once(data, size);
        if ((text = signed_copy(data, size))) {
                load_once(text, strlen(text));
                free(text);
        }
        return 0;
}
