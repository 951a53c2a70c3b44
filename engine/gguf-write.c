/* gguf-write.c: the GGUF writer. Metadata is encoded as it is set; tensor
 * data is streamed out one tensor at a time at write time (copied bytes or a
 * fill callback), so a multi-gigabyte fixture never sits in memory whole. */
#include "engine/gguf-write.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/cleanup.h"
#include "kernels/quant.h"

#define GW_MAX_NAME 63

struct gw_kv {
        char *key;
        uint32_t type;
        uint8_t *val;           /* the encoded value, after its type id */
        size_t len;
};

struct gw_tensor {
        char name[GW_MAX_NAME + 1];
        int type;
        int n_dims;
        int64_t ne[GGUF_MAX_DIMS];
        size_t nbytes;
        void *data;             /* copied data, or NULL and fill */
        gguf_fill_fn fill;
        void *ctx;
};

struct gguf_writer {
        uint32_t version;
        uint32_t alignment;
        struct gw_kv *kv;
        size_t n_kv, cap_kv;
        struct gw_tensor *t;
        size_t n_t, cap_t;
        int err;                /* first failure of a setter, reported by write */
        struct moerr err_msg;
};

static const uint8_t gw_type_size[GGUF_VTYPE_COUNT] = {
        1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8,
};

__attribute__((format(printf, 3, 4)))
static int gw_fail(struct gguf_writer *w, int r, const char *fmt, ...)
{
        va_list ap;

        if (w->err)
                return r;
        w->err = r;
        va_start(ap, fmt);
        vsnprintf(w->err_msg.msg, sizeof w->err_msg.msg, fmt, ap);
        va_end(ap);
        return r;
}

struct gguf_writer *gguf_writer_new(void)
{
        struct gguf_writer *w = calloc(1, sizeof *w);

        if (!w)
                return NULL;
        w->version = 3;
        w->alignment = GGUF_DEFAULT_ALIGNMENT;
        return w;
}

void gguf_writer_free(struct gguf_writer *w)
{
        if (!w)
                return;
        for (size_t i = 0; i < w->n_kv; i++) {
                free(w->kv[i].key);
                free(w->kv[i].val);
        }
        for (size_t i = 0; i < w->n_t; i++)
                free(w->t[i].data);
        free(w->kv);
        free(w->t);
        free(w);
}

void gguf_writer_set_version(struct gguf_writer *w, uint32_t version)
{
        if (version != 2 && version != 3) {
                gw_fail(w, -EINVAL, "GGUF version %" PRIu32 " cannot be written (2 or 3)", version);
                return;
        }
        w->version = version;
}

void gguf_writer_set_alignment(struct gguf_writer *w, uint32_t alignment)
{
        if (alignment == 0 || (alignment & (alignment - 1))) {
                gw_fail(w, -EINVAL, "alignment %" PRIu32 " is not a power of two", alignment);
                return;
        }
        w->alignment = alignment;
        gguf_w_u32(w, "general.alignment", alignment);
}

/* Takes ownership of val. */
static void gw_set(struct gguf_writer *w, const char *key, uint32_t type, uint8_t *val, size_t len)
{
        struct gw_kv *kv = NULL;

        if (!val && len) {
                gw_fail(w, -ENOMEM, "key '%s': no memory", key);
                return;
        }
        for (size_t i = 0; i < w->n_kv && !kv; i++)
                if (!strcmp(w->kv[i].key, key))
                        kv = &w->kv[i];
        if (!kv) {
                if (w->n_kv == w->cap_kv) {
                        size_t cap = MO_MAX(w->cap_kv * 2, 16);
                        struct gw_kv *n = realloc(w->kv, cap * sizeof *n);

                        if (!n)
                                goto oom;
                        w->kv = n;
                        w->cap_kv = cap;
                }
                kv = &w->kv[w->n_kv];
                kv->key = strdup(key);
                if (!kv->key)
                        goto oom;
                kv->val = NULL;
                w->n_kv++;
        }
        free(kv->val);
        kv->type = type;
        kv->val = val;
        kv->len = len;
        return;
oom:
        free(val);
        gw_fail(w, -ENOMEM, "key '%s': no memory", key);
}

static uint8_t *gw_dup(const void *p, size_t n)
{
        uint8_t *d = malloc(MO_MAX(n, 1));

        if (d && n)
                memcpy(d, p, n);
        return d;
}

void gguf_w_scalar(struct gguf_writer *w, const char *key, enum gguf_vtype type, const void *v)
{
        if ((unsigned)type >= GGUF_VTYPE_COUNT || !gw_type_size[type]) {
                gw_fail(w, -EINVAL, "key '%s': %s is not a fixed-size scalar type", key,
                        gguf_vtype_name(type));
                return;
        }
        gw_set(w, key, type, gw_dup(v, gw_type_size[type]), gw_type_size[type]);
}

void gguf_w_u32(struct gguf_writer *w, const char *key, uint32_t v) { gguf_w_scalar(w, key, GGUF_U32, &v); }
void gguf_w_i32(struct gguf_writer *w, const char *key, int32_t v) { gguf_w_scalar(w, key, GGUF_I32, &v); }
void gguf_w_u64(struct gguf_writer *w, const char *key, uint64_t v) { gguf_w_scalar(w, key, GGUF_U64, &v); }
void gguf_w_f32(struct gguf_writer *w, const char *key, float v) { gguf_w_scalar(w, key, GGUF_F32, &v); }

void gguf_w_bool(struct gguf_writer *w, const char *key, bool v)
{
        uint8_t b = v;

        gguf_w_scalar(w, key, GGUF_BOOL, &b);
}

/* u64 length + bytes at dst; returns the bytes written. */
static size_t gw_put_str(uint8_t *dst, const char *s, size_t len)
{
        uint64_t n = len;

        memcpy(dst, &n, sizeof n);
        memcpy(dst + sizeof n, s, len);
        return sizeof n + len;
}

void gguf_w_str(struct gguf_writer *w, const char *key, const char *v)
{
        size_t len = strlen(v);
        uint8_t *val = malloc(sizeof(uint64_t) + len);

        if (val)
                gw_put_str(val, v, len);
        gw_set(w, key, GGUF_STRING, val, sizeof(uint64_t) + len);
}

void gguf_w_raw(struct gguf_writer *w, const char *key, uint32_t type, const void *bytes, size_t n)
{
        gw_set(w, key, type, gw_dup(bytes, n), n);
}

/* The array header: element type and count. */
static uint8_t *gw_arr_header(enum gguf_vtype elem_type, uint64_t count, size_t body)
{
        uint8_t *val = malloc(sizeof(uint32_t) + sizeof(uint64_t) + body);
        uint32_t t = elem_type;

        if (!val)
                return NULL;
        memcpy(val, &t, sizeof t);
        memcpy(val + sizeof t, &count, sizeof count);
        return val;
}

void gguf_w_arr(struct gguf_writer *w, const char *key, enum gguf_vtype elem_type,
                const void *data, uint64_t count)
{
        size_t body;
        uint8_t *val;

        if ((unsigned)elem_type >= GGUF_VTYPE_COUNT || !gw_type_size[elem_type]) {
                gw_fail(w, -EINVAL, "key '%s': use gguf_w_arr_str or gguf_w_raw for arrays of %s",
                        key, gguf_vtype_name(elem_type));
                return;
        }
        if (__builtin_mul_overflow(count, (uint64_t)gw_type_size[elem_type], &body) ||
            body > SIZE_MAX - 12) {
                gw_fail(w, -E2BIG, "key '%s': array of %" PRIu64 " elements is too large", key, count);
                return;
        }
        val = gw_arr_header(elem_type, count, body);
        if (val && body)
                memcpy(val + 12, data, body);
        gw_set(w, key, GGUF_ARRAY, val, 12 + body);
}

void gguf_w_arr_str(struct gguf_writer *w, const char *key, const char *const *strs,
                    const size_t *lens, uint64_t count)
{
        size_t body = 0, off = 12;
        uint8_t *val;

        for (uint64_t i = 0; i < count; i++)
                body += sizeof(uint64_t) + (lens ? lens[i] : strlen(strs[i]));
        val = gw_arr_header(GGUF_STRING, count, body);
        if (val)
                for (uint64_t i = 0; i < count; i++)
                        off += gw_put_str(val + off, strs[i], lens ? lens[i] : strlen(strs[i]));
        gw_set(w, key, GGUF_ARRAY, val, 12 + body);
}

static int gw_add_tensor(struct gguf_writer *w, const char *name, int type, int n_dims,
                         const int64_t *ne, struct gw_tensor **out)
{
        const struct mo_type_info *ti = mo_type_get(type);
        struct gw_tensor *t;
        size_t rows = 1, row;

        if (strlen(name) > GW_MAX_NAME)
                return gw_fail(w, -EINVAL, "tensor '%s': name longer than %d bytes", name, GW_MAX_NAME);
        for (size_t i = 0; i < w->n_t; i++)
                if (!strcmp(w->t[i].name, name))
                        return gw_fail(w, -EEXIST, "tensor '%s' added twice", name);
        if (!ti)
                return gw_fail(w, -EINVAL, "tensor '%s': unknown type %d", name, type);
        if (n_dims < 1 || n_dims > GGUF_MAX_DIMS)
                return gw_fail(w, -EINVAL, "tensor '%s': n_dims %d is not in 1..%d", name, n_dims,
                               GGUF_MAX_DIMS);
        for (int d = 0; d < n_dims; d++)
                if (ne[d] < 1 || (d > 0 && __builtin_mul_overflow(rows, (size_t)ne[d], &rows)))
                        return gw_fail(w, -EINVAL, "tensor '%s': bad ne[%d] = %" PRId64, name, d, ne[d]);
        row = mo_row_bytes(type, ne[0]);
        if (!row)
                return gw_fail(w, -EINVAL, "tensor '%s': ne[0] = %" PRId64 " is not a multiple of the %s block",
                               name, ne[0], ti->name);
        if (w->n_t == w->cap_t) {
                size_t cap = MO_MAX(w->cap_t * 2, 16);
                struct gw_tensor *n = realloc(w->t, cap * sizeof *n);

                if (!n)
                        return gw_fail(w, -ENOMEM, "tensor '%s': no memory", name);
                w->t = n;
                w->cap_t = cap;
        }
        t = &w->t[w->n_t];
        memset(t, 0, sizeof *t);
        strcpy(t->name, name);
        t->type = type;
        t->n_dims = n_dims;
        for (int d = 0; d < GGUF_MAX_DIMS; d++)
                t->ne[d] = d < n_dims ? ne[d] : 1;
        if (__builtin_mul_overflow(row, rows, &t->nbytes))
                return gw_fail(w, -EINVAL, "tensor '%s': byte size overflows", name);
        *out = t;
        return 0;
}

int gguf_w_tensor(struct gguf_writer *w, const char *name, int type, int n_dims,
                  const int64_t *ne, const void *data)
{
        struct gw_tensor *t;
        int r = gw_add_tensor(w, name, type, n_dims, ne, &t);

        if (r < 0)
                return r;
        t->data = gw_dup(data, t->nbytes);
        if (!t->data)
                return gw_fail(w, -ENOMEM, "tensor '%s': no memory for %zu bytes", name, t->nbytes);
        w->n_t++;
        return 0;
}

int gguf_w_tensor_fill(struct gguf_writer *w, const char *name, int type, int n_dims,
                       const int64_t *ne, gguf_fill_fn fill, void *ctx)
{
        struct gw_tensor *t;
        int r = gw_add_tensor(w, name, type, n_dims, ne, &t);

        if (r < 0)
                return r;
        t->fill = fill;
        t->ctx = ctx;
        w->n_t++;
        return 0;
}

/* --- serialisation --- */

static size_t gw_pad(uint64_t n, uint32_t alignment)
{
        return (size_t)((alignment - n % alignment) % alignment);
}

static int gw_zeros(FILE *f, size_t n)
{
        static const uint8_t zeros[64];

        while (n) {
                size_t k = MO_MIN(n, sizeof zeros);

                if (fwrite(zeros, 1, k, f) != k)
                        return -EIO;
                n -= k;
        }
        return 0;
}

static int gw_bytes(FILE *f, const void *p, size_t n)
{
        return fwrite(p, 1, n, f) == n ? 0 : -EIO;
}

static int gw_u32(FILE *f, uint32_t v) { return gw_bytes(f, &v, sizeof v); }
static int gw_u64(FILE *f, uint64_t v) { return gw_bytes(f, &v, sizeof v); }

static int gw_name(FILE *f, const char *s)
{
        size_t len = strlen(s);

        return gw_u64(f, len) < 0 || gw_bytes(f, s, len) < 0 ? -EIO : 0;
}

static int gw_head(struct gguf_writer *w, FILE *f, uint64_t *pos)
{
        uint64_t off = 0;
        int r = 0;

        r |= gw_bytes(f, "GGUF", 4);
        r |= gw_u32(f, w->version);
        r |= gw_u64(f, w->n_t);
        r |= gw_u64(f, w->n_kv);
        *pos = 24;
        for (size_t i = 0; i < w->n_kv; i++) {
                r |= gw_name(f, w->kv[i].key);
                r |= gw_u32(f, w->kv[i].type);
                r |= gw_bytes(f, w->kv[i].val, w->kv[i].len);
                *pos += 8 + strlen(w->kv[i].key) + 4 + w->kv[i].len;
        }
        for (size_t i = 0; i < w->n_t; i++) {
                const struct gw_tensor *t = &w->t[i];

                r |= gw_name(f, t->name);
                r |= gw_u32(f, (uint32_t)t->n_dims);
                for (int d = 0; d < t->n_dims; d++)
                        r |= gw_u64(f, (uint64_t)t->ne[d]);
                r |= gw_u32(f, (uint32_t)t->type);
                r |= gw_u64(f, off);
                *pos += 8 + strlen(t->name) + 4 + 8 * (size_t)t->n_dims + 4 + 8;
                off += t->nbytes + gw_pad(t->nbytes, w->alignment);
        }
        r |= gw_zeros(f, gw_pad(*pos, w->alignment));
        return r ? -EIO : 0;
}

static int gw_data(struct gguf_writer *w, FILE *f, struct moerr *e)
{
        _cleanup_free_ void *buf = NULL;
        size_t max = 0;
        int r;

        for (size_t i = 0; i < w->n_t; i++)
                if (w->t[i].fill)
                        max = MO_MAX(max, w->t[i].nbytes);
        if (max && !(buf = malloc(max)))
                return moerr_set(e, -ENOMEM, "no memory for a %zu-byte tensor buffer", max);
        for (size_t i = 0; i < w->n_t; i++) {
                const struct gw_tensor *t = &w->t[i];
                const void *src = t->data;

                if (t->fill) {
                        r = t->fill(t->ctx, t->name, t->type, t->ne, buf, t->nbytes);
                        if (r < 0)
                                return moerr_set(e, r, "tensor '%s': filling its data failed: %s",
                                                 t->name, strerror(-r));
                        src = buf;
                }
                if (gw_bytes(f, src, t->nbytes) < 0 || gw_zeros(f, gw_pad(t->nbytes, w->alignment)) < 0)
                        return moerr_set(e, -EIO, "tensor '%s': write failed", t->name);
        }
        return 0;
}

/* Readers align to general.alignment whoever set it, so the layout follows
 * a valid u32 key even when it was written with gguf_w_u32 directly. Other
 * values are left alone: tests write them on purpose to make bad files. */
static void gw_alignment(struct gguf_writer *w)
{
        uint32_t a;

        for (size_t i = 0; i < w->n_kv; i++) {
                if (strcmp(w->kv[i].key, "general.alignment") || w->kv[i].type != GGUF_U32)
                        continue;
                memcpy(&a, w->kv[i].val, sizeof a);
                if (a && !(a & (a - 1)))
                        w->alignment = a;
        }
}

static int gw_stream(struct gguf_writer *w, FILE *f, struct moerr *e)
{
        uint64_t pos;
        int r;

        if (w->err) {
                if (e)
                        *e = w->err_msg;
                return w->err;
        }
        gw_alignment(w);
        if (gw_head(w, f, &pos) < 0)
                return moerr_set(e, -EIO, "writing the header failed");
        r = gw_data(w, f, e);
        if (r < 0)
                return r;
        if (fflush(f) != 0 || ferror(f))
                return moerr_set(e, -errno ? -errno : -EIO, "write failed: %s", strerror(errno));
        return 0;
}

int gguf_writer_write_mem(struct gguf_writer *w, void **buf, size_t *size, struct moerr *e)
{
        char *p = NULL;
        size_t n = 0;
        FILE *f = open_memstream(&p, &n);
        int r;

        *buf = NULL;
        *size = 0;
        if (!f)
                return moerr_set(e, -errno, "open_memstream: %s", strerror(errno));
        r = gw_stream(w, f, e);
        if (fclose(f) != 0 && r >= 0)
                r = moerr_set(e, -ENOMEM, "no memory for the file image");
        if (r < 0) {
                free(p);
                return r;
        }
        *buf = p;
        *size = n;
        return 0;
}

/* The rename is only durable once the directory entry is on disk too. */
static void gw_sync_dir(const char *path)
{
        _cleanup_free_ char *copy = strdup(path);
        _cleanup_close_ int fd = -1;

        if (!copy)
                return;
        fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd >= 0)
                (void)fsync(fd);
}

int gguf_writer_write(struct gguf_writer *w, const char *path, struct moerr *e)
{
        _cleanup_free_ char *tmp = NULL;
        FILE *f;
        int fd, r;

        if (asprintf(&tmp, "%s.tmp-XXXXXX", path) < 0) {
                tmp = NULL;
                return moerr_set(e, -ENOMEM, "no memory");
        }
        fd = mkostemp(tmp, O_CLOEXEC);
        if (fd < 0)
                return moerr_set(e, -errno, "%s: cannot create: %s", tmp, strerror(errno));
        (void)fchmod(fd, 0644);
        f = fdopen(fd, "wb");
        if (!f) {
                r = moerr_set(e, -errno, "%s: %s", tmp, strerror(errno));
                close(fd);
                unlink(tmp);
                return r;
        }
        r = gw_stream(w, f, e);
        if (r >= 0 && fsync(fd) < 0)
                r = moerr_set(e, -errno, "fsync: %s", strerror(errno));
        if (fclose(f) != 0 && r >= 0)
                r = moerr_set(e, -errno, "close: %s", strerror(errno));
        if (r >= 0 && rename(tmp, path) < 0)
                r = moerr_set(e, -errno, "rename to %s: %s", path, strerror(errno));
        if (r < 0) {
                unlink(tmp);
                return moerr_prefix(e, r, "%s", path);
        }
        gw_sync_dir(path);
        return 0;
}
