/* gguf.c: the GGUF reader. It maps (or borrows) the file, validates at open
 * every byte that any accessor will later touch, and keeps offsets rather
 * than copies, so that opening a multi-gigabyte model costs milliseconds and
 * a hostile file is refused with a message instead of crashing the daemon. */
#include "engine/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/cleanup.h"
#include "common/mapguard.h"
#include "kernels/quant.h"

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
               "GGUF is little-endian and is read in place");

#define GG_HEADER_BYTES 24
#define GG_MAX_NAME 63 /* llama.cpp: GGML_MAX_NAME (64) including the NUL */
/* The spec allows arrays of arrays; nobody writes deep ones, and a limit
 * keeps a hostile file from exhausting the stack. */
#define GG_MAX_NESTING 8
/* Smallest possible encodings: they bound every count by the bytes left in
 * the file before anything is allocated for it. */
#define GG_MIN_KV_BYTES 13     /* u64 key length, u32 type, 1-byte value */
#define GG_MIN_TENSOR_BYTES 32 /* u64 name length, u32 n_dims, 1 ne, u32 type, u64 offset */
#define GG_MIN_ARRAY_BYTES 12  /* u32 element type, u64 count */

struct gguf_kv {
        size_t key_off;         /* into strtab while parsing; key is set after */
        const char *key;        /* NUL-terminated copy */
        size_t key_len;
        enum gguf_vtype type;
        const uint8_t *val;     /* the value in the file, after its type id */
        enum gguf_vtype elem_type; /* arrays */
        uint64_t count;
        const uint8_t *elems;
        uint64_t *str_off;      /* string arrays: element i's offset from elems */
};

/* Tensor names are at most 63 bytes, so they live beside their info. */
struct gg_tensor {
        struct gguf_tensor t;
        char name[GG_MAX_NAME + 1];
};

/* Sorted index entry for lookups by name; sorting also finds duplicates in
 * O(n log n) whatever names a hostile file chooses. */
struct gg_name {
        const char *s;
        size_t len;
        int64_t idx;
};

struct gguf {
        const uint8_t *base;
        size_t size;
        void *map;              /* gguf_open only */
        uint32_t version;
        size_t alignment;
        size_t data_offset;
        int64_t n_kv, n_tensors;
        struct gguf_kv *kv;
        struct gg_tensor *tensors;
        char *strtab;
        size_t strtab_len;
        struct gg_name *kv_index, *tensor_index;
};

struct gg_parse {
        struct gguf *g;
        size_t pos;
        struct moerr *e;
        char what[160];         /* the item being read, for messages */
        int depth;              /* array nesting of the value being read */
        uint64_t elem[GG_MAX_NESTING]; /* element index at each level */
};

static const char *const gg_type_names[GGUF_VTYPE_COUNT] = {
        "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool",
        "string", "array", "u64", "i64", "f64",
};

/* Bytes of a fixed-size value; 0 for string and array. */
static const uint8_t gg_type_size[GGUF_VTYPE_COUNT] = {
        1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8,
};

const char *gguf_vtype_name(enum gguf_vtype t)
{
        return (unsigned)t < GGUF_VTYPE_COUNT ? gg_type_names[t] : "unknown";
}

/* Names in messages are file bytes: keep them short and printable. */
static void gg_printable(char *dst, size_t dst_size, const uint8_t *s, size_t len)
{
        size_t n = MO_MIN(len, dst_size - 1);

        for (size_t i = 0; i < n; i++)
                dst[i] = s[i] >= 0x20 && s[i] < 0x7f ? (char)s[i] : '?';
        dst[n] = '\0';
        if (len > n && n >= 3)
                memcpy(dst + n - 3, "...", 3);
}

/* Sets a message naming the item being read: "key 'x'[3]: ..." */
__attribute__((format(printf, 3, 4)))
static int gg_fail(struct gg_parse *p, int r, const char *fmt, ...)
{
        char msg[384], where[GG_MAX_NESTING * 24] = "";
        size_t n = 0;
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        for (int d = 0; d < p->depth; d++)
                n += (size_t)snprintf(where + n, sizeof where - n, "[%" PRIu64 "]", p->elem[d]);
        return moerr_set(p->e, r, "%s%s: %s", p->what, where, msg);
}

static size_t gg_left(const struct gg_parse *p)
{
        return p->g->size - p->pos;
}

static int gg_need(struct gg_parse *p, size_t n, const char *field)
{
        if (n <= gg_left(p))
                return 0;
        return gg_fail(p, -EINVAL, "%s needs %zu bytes at offset %zu but only %zu are left (file truncated?)",
                       field, n, p->pos, gg_left(p));
}

static int gg_u32(struct gg_parse *p, const char *field, uint32_t *v)
{
        int r = gg_need(p, sizeof *v, field);

        if (r < 0)
                return r;
        memcpy(v, p->g->base + p->pos, sizeof *v);
        p->pos += sizeof *v;
        return 0;
}

static int gg_u64(struct gg_parse *p, const char *field, uint64_t *v)
{
        int r = gg_need(p, sizeof *v, field);

        if (r < 0)
                return r;
        memcpy(v, p->g->base + p->pos, sizeof *v);
        p->pos += sizeof *v;
        return 0;
}

/* A length-prefixed string; *s points into the file. */
static int gg_str(struct gg_parse *p, const char *field, const uint8_t **s, uint64_t *len)
{
        int r = gg_u64(p, field, len);

        if (r < 0)
                return r;
        if (*len > gg_left(p))
                return gg_fail(p, -EINVAL, "%s length %" PRIu64 " exceeds the %zu bytes left in the file",
                               field, *len, gg_left(p));
        *s = p->g->base + p->pos;
        p->pos += *len;
        return 0;
}

static size_t gg_min_elem_bytes(enum gguf_vtype t)
{
        if (t == GGUF_STRING)
                return sizeof(uint64_t);
        if (t == GGUF_ARRAY)
                return GG_MIN_ARRAY_BYTES;
        return gg_type_size[t];
}

static int gg_value_type(struct gg_parse *p, const char *field, enum gguf_vtype *t)
{
        uint32_t v;
        int r = gg_u32(p, field, &v);

        if (r < 0)
                return r;
        if (v >= GGUF_VTYPE_COUNT)
                return gg_fail(p, -EINVAL, "unknown %s %" PRIu32 " (known: 0..%d)",
                               field, v, GGUF_VTYPE_COUNT - 1);
        *t = (enum gguf_vtype)v;
        return 0;
}

static int gg_skip_value(struct gg_parse *p, enum gguf_vtype t, int depth);

/* Reads an array header and validates its elements; returns where they start. */
static int gg_skip_array(struct gg_parse *p, int depth, enum gguf_vtype *elem_type,
                         uint64_t *count, size_t *elems)
{
        size_t min;
        int r;

        if (depth >= GG_MAX_NESTING)
                return gg_fail(p, -EINVAL, "arrays nested deeper than %d levels", GG_MAX_NESTING);
        r = gg_value_type(p, "array element type", elem_type);
        if (r < 0)
                return r;
        r = gg_u64(p, "array count", count);
        if (r < 0)
                return r;
        min = gg_min_elem_bytes(*elem_type);
        if (*count > gg_left(p) / min)
                return gg_fail(p, -EINVAL, "array of %" PRIu64 " %s elements cannot fit in the %zu bytes left in the file",
                               *count, gg_type_names[*elem_type], gg_left(p));
        *elems = p->pos;
        if (*elem_type != GGUF_BOOL && gg_type_size[*elem_type]) {
                p->pos += *count * min;
                return 0;
        }
        for (uint64_t i = 0; i < *count; i++) {
                p->depth = depth + 1;
                p->elem[depth] = i;
                r = gg_skip_value(p, *elem_type, depth + 1);
                if (r < 0)
                        return r;
        }
        p->depth = depth;
        return 0;
}

static int gg_skip_value(struct gg_parse *p, enum gguf_vtype t, int depth)
{
        const uint8_t *s;
        uint64_t len, count;
        enum gguf_vtype et;
        size_t elems;
        int r;

        switch (t) {
        case GGUF_STRING:
                return gg_str(p, "string", &s, &len);
        case GGUF_ARRAY:
                return gg_skip_array(p, depth, &et, &count, &elems);
        case GGUF_BOOL:
                r = gg_need(p, 1, "bool value");
                if (r < 0)
                        return r;
                if (p->g->base[p->pos] > 1)
                        return gg_fail(p, -EINVAL, "bool value %u at offset %zu is neither 0 nor 1",
                                       p->g->base[p->pos], p->pos);
                p->pos++;
                return 0;
        default:
                r = gg_need(p, gg_type_size[t], gg_type_names[t]);
                if (r < 0)
                        return r;
                p->pos += gg_type_size[t];
                return 0;
        }
}

/* O(1) element access into string arrays: the file holds them as a chain of
 * length prefixes, so record where each one starts (already validated). */
static int gg_index_strings(struct gguf_kv *kv, struct moerr *e)
{
        uint64_t off = 0, len;

        kv->str_off = malloc(MO_MAX(kv->count, 1) * sizeof *kv->str_off);
        if (!kv->str_off)
                return moerr_set(e, -ENOMEM, "key '%s': no memory for %" PRIu64 " string offsets",
                                 kv->key, kv->count);
        for (uint64_t i = 0; i < kv->count; i++) {
                kv->str_off[i] = off;
                memcpy(&len, kv->elems + off, sizeof len);
                off += sizeof len + len;
        }
        return 0;
}

static int gg_strtab_add(struct gguf *g, const uint8_t *s, size_t len, size_t *off,
                         size_t *cap, struct moerr *e)
{
        if (len + 1 > *cap - g->strtab_len) {
                size_t ncap = MO_MAX(*cap * 2, g->strtab_len + len + 1);
                char *n = realloc(g->strtab, MO_MAX(ncap, 256));

                if (!n)
                        return moerr_set(e, -ENOMEM, "no memory for metadata keys");
                g->strtab = n;
                *cap = MO_MAX(ncap, 256);
        }
        memcpy(g->strtab + g->strtab_len, s, len);
        g->strtab[g->strtab_len + len] = '\0';
        *off = g->strtab_len;
        g->strtab_len += len + 1;
        return 0;
}

/* Grows an array by doubling, never past what the file's count claims: the
 * count has been bounded by the file size, and the array only grows as
 * entries are actually read. */
static int gg_grow(void **arr, size_t elem, int64_t n, int64_t *cap, int64_t max)
{
        int64_t ncap;
        void *a;

        if (n < *cap)
                return 0;
        ncap = MO_MIN(MO_MAX(*cap * 2, 16), max);
        a = realloc(*arr, (size_t)ncap * elem);
        if (!a)
                return -ENOMEM;
        *arr = a;
        *cap = ncap;
        return 0;
}

static int gg_parse_kv(struct gg_parse *p, int64_t i, size_t *strtab_cap)
{
        struct gguf *g = p->g;
        struct gguf_kv *kv = &g->kv[i];
        const uint8_t *key = NULL;
        uint64_t key_len = 0;
        size_t elems;
        int r;

        snprintf(p->what, sizeof p->what, "metadata entry #%" PRId64, i);
        r = gg_str(p, "key", &key, &key_len);
        if (r < 0)
                return r;
        snprintf(p->what, sizeof p->what, "key '");
        gg_printable(p->what + 5, 100, key, key_len);
        strcat(p->what, "'");
        if (memchr(key, 0, key_len))
                return gg_fail(p, -EINVAL, "contains a NUL byte");
        r = gg_strtab_add(g, key, key_len, &kv->key_off, strtab_cap, p->e);
        if (r < 0)
                return r;
        kv->key_len = key_len;
        r = gg_value_type(p, "value type", &kv->type);
        if (r < 0)
                return r;
        kv->val = g->base + p->pos;
        if (kv->type != GGUF_ARRAY)
                return gg_skip_value(p, kv->type, 0);
        r = gg_skip_array(p, 0, &kv->elem_type, &kv->count, &elems);
        if (r < 0)
                return r;
        kv->elems = g->base + elems;
        return 0;
}

static int gg_name_cmp(const void *a, const void *b)
{
        const struct gg_name *x = a, *y = b;
        int c = memcmp(x->s, y->s, MO_MIN(x->len, y->len));

        if (c)
                return c;
        if (x->len != y->len)
                return x->len < y->len ? -1 : 1;
        return x->idx < y->idx ? -1 : x->idx > y->idx;
}

/* Sorts names and rejects duplicates; what names the kind ("key", "tensor"). */
static int gg_build_index(struct gg_name *idx, int64_t n, const char *what, struct moerr *e)
{
        char shown[100];

        qsort(idx, (size_t)n, sizeof *idx, gg_name_cmp);
        for (int64_t i = 1; i < n; i++) {
                if (idx[i].len != idx[i - 1].len || memcmp(idx[i].s, idx[i - 1].s, idx[i].len))
                        continue;
                gg_printable(shown, sizeof shown, (const uint8_t *)idx[i].s, idx[i].len);
                return moerr_set(e, -EINVAL, "duplicate %s '%s' (entries #%" PRId64 " and #%" PRId64 ")",
                                 what, shown, idx[i - 1].idx, idx[i].idx);
        }
        return 0;
}

static int64_t gg_lookup(const struct gg_name *idx, int64_t n, const char *name)
{
        struct gg_name k = { .s = name, .len = strlen(name), .idx = -1 };
        int64_t lo = 0, hi = n;

        while (lo < hi) {
                int64_t mid = lo + (hi - lo) / 2;
                int c = memcmp(idx[mid].s, k.s, MO_MIN(idx[mid].len, k.len));

                if (!c && idx[mid].len == k.len)
                        return idx[mid].idx;
                if (c < 0 || (!c && idx[mid].len < k.len))
                        lo = mid + 1;
                else
                        hi = mid;
        }
        return -1;
}

static int gg_parse_header(struct gg_parse *p, uint64_t *n_tensors, uint64_t *n_kv)
{
        struct gguf *g = p->g;
        uint32_t v;
        int r;

        snprintf(p->what, sizeof p->what, "header");
        if (g->size < 4)
                return moerr_set(p->e, -EINVAL, "file too small to be GGUF (%zu bytes)", g->size);
        if (memcmp(g->base, "GGUF", 4))
                return moerr_set(p->e, -EINVAL,
                                 "not a GGUF file: magic is %02x %02x %02x %02x, expected 'GGUF'",
                                 g->base[0], g->base[1], g->base[2], g->base[3]);
        p->pos = 4;
        r = gg_u32(p, "version", &v);
        if (r < 0)
                return r;
        if (v == 0)
                return moerr_set(p->e, -EINVAL, "invalid GGUF version 0");
        if ((v & 0xffff) == 0)
                return moerr_set(p->e, -EINVAL,
                                 "GGUF version 0x%08" PRIx32 " looks byte-swapped: big-endian files are not supported", v);
        if (v == 1)
                return moerr_set(p->e, -EINVAL, "GGUF version 1 is obsolete and not supported (need 2 or 3)");
        if (v > 3)
                return moerr_set(p->e, -EINVAL, "GGUF version %" PRIu32 " is newer than this reader (2 or 3)", v);
        g->version = v;
        r = gg_u64(p, "tensor count", n_tensors);
        if (r < 0)
                return r;
        r = gg_u64(p, "metadata count", n_kv);
        if (r < 0)
                return r;
        if (*n_kv > gg_left(p) / GG_MIN_KV_BYTES)
                return moerr_set(p->e, -EINVAL,
                                 "metadata count %" PRIu64 " cannot fit in the %zu bytes after the header",
                                 *n_kv, gg_left(p));
        if (*n_tensors > gg_left(p) / GG_MIN_TENSOR_BYTES)
                return moerr_set(p->e, -EINVAL,
                                 "tensor count %" PRIu64 " cannot fit in the %zu bytes after the header",
                                 *n_tensors, gg_left(p));
        if (*n_kv * GG_MIN_KV_BYTES + *n_tensors * GG_MIN_TENSOR_BYTES > gg_left(p))
                return moerr_set(p->e, -EINVAL,
                                 "%" PRIu64 " metadata entries and %" PRIu64 " tensors cannot fit in the %zu bytes after the header",
                                 *n_kv, *n_tensors, gg_left(p));
        return 0;
}

static int gg_parse_metadata(struct gg_parse *p, uint64_t n_kv)
{
        struct gguf *g = p->g;
        size_t strtab_cap = 0;
        int64_t cap = 0;
        int r;

        for (g->n_kv = 0; g->n_kv < (int64_t)n_kv; g->n_kv++) {
                if (gg_grow((void **)&g->kv, sizeof *g->kv, g->n_kv, &cap, (int64_t)n_kv) < 0)
                        return moerr_set(p->e, -ENOMEM, "no memory for %" PRIu64 " metadata entries", n_kv);
                memset(&g->kv[g->n_kv], 0, sizeof g->kv[g->n_kv]);
                r = gg_parse_kv(p, g->n_kv, &strtab_cap);
                if (r < 0)
                        return r;
        }
        g->kv_index = malloc(MO_MAX(g->n_kv, 1) * sizeof *g->kv_index);
        if (!g->kv_index)
                return moerr_set(p->e, -ENOMEM, "no memory for the metadata index");
        for (int64_t i = 0; i < g->n_kv; i++) {
                struct gguf_kv *kv = &g->kv[i];

                kv->key = g->strtab + kv->key_off;
                g->kv_index[i] = (struct gg_name){ kv->key, kv->key_len, i };
                if (kv->type == GGUF_ARRAY && kv->elem_type == GGUF_STRING) {
                        r = gg_index_strings(kv, p->e);
                        if (r < 0)
                                return r;
                }
        }
        return gg_build_index(g->kv_index, g->n_kv, "key", p->e);
}

static int gg_parse_alignment(struct gguf *g, struct moerr *e)
{
        int64_t i = gguf_find_key(g, "general.alignment");
        uint32_t a;

        g->alignment = GGUF_DEFAULT_ALIGNMENT;
        if (i < 0)
                return 0;
        if (g->kv[i].type != GGUF_U32)
                return moerr_set(e, -EINVAL, "key 'general.alignment' has type %s, expected u32",
                                 gg_type_names[g->kv[i].type]);
        memcpy(&a, g->kv[i].val, sizeof a);
        if (a == 0 || (a & (a - 1)))
                return moerr_set(e, -EINVAL, "general.alignment %" PRIu32 " is not a power of two", a);
        g->alignment = a;
        return 0;
}

static int gg_parse_shape(struct gg_parse *p, struct gguf_tensor *t)
{
        const struct mo_type_info *ti;
        uint64_t ne, off;
        uint32_t n_dims, type;
        int64_t n_el = 1;
        size_t row, nbytes;
        int r;

        r = gg_u32(p, "n_dims", &n_dims);
        if (r < 0)
                return r;
        if (n_dims < 1 || n_dims > GGUF_MAX_DIMS)
                return gg_fail(p, -EINVAL, "n_dims %" PRIu32 " is not in 1..%d", n_dims, GGUF_MAX_DIMS);
        t->n_dims = (int)n_dims;
        for (int d = 0; d < GGUF_MAX_DIMS; d++) {
                t->ne[d] = 1;
                if (d >= t->n_dims)
                        continue;
                r = gg_u64(p, "dimension", &ne);
                if (r < 0)
                        return r;
                if ((int64_t)ne < 1)
                        return gg_fail(p, -EINVAL, "ne[%d] is %" PRId64 ", must be at least 1",
                                       d, (int64_t)ne);
                t->ne[d] = (int64_t)ne;
                if (__builtin_mul_overflow(n_el, t->ne[d], &n_el))
                        return gg_fail(p, -EINVAL, "element count overflows at ne[%d] = %" PRId64,
                                       d, t->ne[d]);
        }
        r = gg_u32(p, "type", &type);
        if (r < 0)
                return r;
        ti = type < MO_TYPE_COUNT ? mo_type_get((int)type) : NULL;
        if (!ti)
                return gg_fail(p, -EINVAL, "unknown tensor type id %" PRIu32, type);
        t->type = (int)type;
        if (t->ne[0] % ti->block)
                return gg_fail(p, -EINVAL, "ne[0] = %" PRId64 " is not a multiple of the %s block size %" PRId64,
                               t->ne[0], ti->name, ti->block);
        if (__builtin_mul_overflow((size_t)(t->ne[0] / ti->block), ti->block_bytes, &row) ||
            __builtin_mul_overflow(row, (size_t)(n_el / t->ne[0]), &nbytes))
                return gg_fail(p, -EINVAL, "byte size overflows");
        t->nbytes = nbytes;
        r = gg_u64(p, "offset", &off);
        if (r < 0)
                return r;
        if (off % p->g->alignment)
                return gg_fail(p, -EINVAL, "offset %" PRIu64 " is not a multiple of the alignment %zu",
                               off, p->g->alignment);
        t->offset = off;
        return 0;
}

static int gg_parse_tensor(struct gg_parse *p, int64_t i)
{
        struct gg_tensor *gt = &p->g->tensors[i];
        const uint8_t *name = NULL;
        uint64_t len = 0;
        int r;

        snprintf(p->what, sizeof p->what, "tensor #%" PRId64, i);
        r = gg_str(p, "name", &name, &len);
        if (r < 0)
                return r;
        if (len > GG_MAX_NAME) {
                char shown[GG_MAX_NAME + 1];

                gg_printable(shown, sizeof shown, name, len);
                return moerr_set(p->e, -EINVAL, "tensor #%" PRId64 " '%s': name is %" PRIu64 " bytes, longer than %d",
                                 i, shown, len, GG_MAX_NAME);
        }
        if (memchr(name, 0, len))
                return moerr_set(p->e, -EINVAL, "tensor #%" PRId64 ": name contains a NUL byte", i);
        memcpy(gt->name, name, len);
        gt->name[len] = '\0';
        snprintf(p->what, sizeof p->what, "tensor '");
        gg_printable(p->what + 8, GG_MAX_NAME + 1, name, len);
        strcat(p->what, "'");
        return gg_parse_shape(p, &gt->t);
}

static int gg_off_cmp(const void *a, const void *b)
{
        const struct gguf_tensor *x = *(const struct gguf_tensor *const *)a;
        const struct gguf_tensor *y = *(const struct gguf_tensor *const *)b;

        return x->offset < y->offset ? -1 : x->offset > y->offset;
}

/* Every tensor inside the file's data section, none overlapping another. */
static int gg_check_placement(struct gguf *g, struct moerr *e)
{
        _cleanup_free_ const struct gguf_tensor **by_off = NULL;
        size_t room = g->size > g->data_offset ? g->size - g->data_offset : 0;

        for (int64_t i = 0; i < g->n_tensors; i++) {
                struct gguf_tensor *t = &g->tensors[i].t;

                if (t->offset > room || t->nbytes > room - t->offset)
                        return moerr_set(e, -EINVAL,
                                         "tensor '%s': %zu bytes at offset %" PRIu64 " of the data section extend past the end of the file (the data section at %zu holds %zu bytes)",
                                         t->name, t->nbytes, t->offset, g->data_offset, room);
                t->data = g->base + g->data_offset + t->offset;
        }
        by_off = malloc(MO_MAX(g->n_tensors, 1) * sizeof *by_off);
        if (!by_off)
                return moerr_set(e, -ENOMEM, "no memory to sort %" PRId64 " tensors", g->n_tensors);
        for (int64_t i = 0; i < g->n_tensors; i++)
                by_off[i] = &g->tensors[i].t;
        qsort(by_off, (size_t)g->n_tensors, sizeof *by_off, gg_off_cmp);
        for (int64_t i = 1; i < g->n_tensors; i++) {
                const struct gguf_tensor *a = by_off[i - 1], *b = by_off[i];

                if (a->offset + a->nbytes > b->offset)
                        return moerr_set(e, -EINVAL,
                                         "tensors '%s' (offset %" PRIu64 ", %zu bytes) and '%s' (offset %" PRIu64 ") overlap",
                                         a->name, a->offset, a->nbytes, b->name, b->offset);
        }
        return 0;
}

static int gg_parse_tensors(struct gg_parse *p, uint64_t n_tensors)
{
        struct gguf *g = p->g;
        int64_t cap = 0;
        int r;

        for (g->n_tensors = 0; g->n_tensors < (int64_t)n_tensors; g->n_tensors++) {
                if (gg_grow((void **)&g->tensors, sizeof *g->tensors, g->n_tensors, &cap,
                            (int64_t)n_tensors) < 0)
                        return moerr_set(p->e, -ENOMEM, "no memory for %" PRIu64 " tensors", n_tensors);
                r = gg_parse_tensor(p, g->n_tensors);
                if (r < 0)
                        return r;
        }
        g->tensor_index = malloc(MO_MAX(g->n_tensors, 1) * sizeof *g->tensor_index);
        if (!g->tensor_index)
                return moerr_set(p->e, -ENOMEM, "no memory for the tensor index");
        /* The array no longer moves: names and data can now be pointed at. */
        g->data_offset = p->pos + (g->alignment - p->pos % g->alignment) % g->alignment;
        for (int64_t i = 0; i < g->n_tensors; i++) {
                struct gg_tensor *gt = &g->tensors[i];

                gt->t.name = gt->name;
                g->tensor_index[i] = (struct gg_name){ gt->name, strlen(gt->name), i };
        }
        r = gg_build_index(g->tensor_index, g->n_tensors, "tensor", p->e);
        if (r < 0)
                return r;
        return gg_check_placement(g, p->e);
}

static int gg_parse(struct gguf *g, struct moerr *e)
{
        struct gg_parse p = { .g = g, .e = e };
        uint64_t n_tensors = 0, n_kv = 0;
        int r;

        r = gg_parse_header(&p, &n_tensors, &n_kv);
        if (r < 0)
                return r;
        r = gg_parse_metadata(&p, n_kv);
        if (r < 0)
                return r;
        r = gg_parse_alignment(g, e);
        if (r < 0)
                return r;
        return gg_parse_tensors(&p, n_tensors);
}

int gguf_open_buffer(const void *data, size_t size, struct gguf **out, struct moerr *e)
{
        struct gguf *g;
        int r;

        *out = NULL;
        if (!data && size)
                return moerr_set(e, -EINVAL, "no buffer");
        g = calloc(1, sizeof *g);
        if (!g)
                return moerr_set(e, -ENOMEM, "no memory");
        g->base = data;
        g->size = size;
        r = gg_parse(g, e);
        if (r < 0) {
                gguf_close(g);
                return r;
        }
        *out = g;
        return 0;
}

int gguf_open(const char *path, struct gguf **out, struct moerr *e)
{
        _cleanup_close_ int fd = -1;
        struct stat st;
        void *map;
        int r;

        *out = NULL;
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return moerr_set(e, -errno, "%s: cannot open: %s", path, strerror(errno));
        if (fstat(fd, &st) < 0)
                return moerr_set(e, -errno, "%s: cannot stat: %s", path, strerror(errno));
        if (!S_ISREG(st.st_mode))
                return moerr_set(e, -EINVAL, "%s: not a regular file", path);
        if (st.st_size < GG_HEADER_BYTES)
                return moerr_set(e, -EINVAL, "%s: file too small to be GGUF (%jd bytes)",
                                 path, (intmax_t)st.st_size);
        if ((uintmax_t)st.st_size > SIZE_MAX)
                return moerr_set(e, -EFBIG, "%s: file too large to map", path);
        map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED)
                return moerr_set(e, -errno, "%s: cannot map: %s", path, strerror(errno));
        /* From here on a file cut short under us reads as zeros, not
         * SIGBUS; gguf_damaged() tells. Unguarded, it still works. */
        mo_mapguard_add(map, (size_t)st.st_size);
        r = gguf_open_buffer(map, (size_t)st.st_size, out, e);
        if (r < 0) {
                mo_mapguard_remove(map);
                munmap(map, (size_t)st.st_size);
                return moerr_prefix(e, r, "%s", path);
        }
        (*out)->map = map;
        return 0;
}

void gguf_close(struct gguf *g)
{
        if (!g)
                return;
        for (int64_t i = 0; i < g->n_kv; i++)
                free(g->kv[i].str_off);
        free(g->kv);
        free(g->tensors);
        free(g->strtab);
        free(g->kv_index);
        free(g->tensor_index);
        if (g->map) {
                mo_mapguard_remove(g->map);
                munmap(g->map, g->size);
        }
        free(g);
}

bool gguf_damaged(const struct gguf *g)
{
        return g && g->map && mo_mapguard_faulted(g->map);
}

uint32_t gguf_version(const struct gguf *g) { return g->version; }
size_t gguf_alignment(const struct gguf *g) { return g->alignment; }
const void *gguf_file_data(const struct gguf *g) { return g->base; }
size_t gguf_file_size(const struct gguf *g) { return g->size; }
size_t gguf_data_offset(const struct gguf *g) { return g->data_offset; }
int64_t gguf_n_kv(const struct gguf *g) { return g->n_kv; }
int64_t gguf_n_tensors(const struct gguf *g) { return g->n_tensors; }

int64_t gguf_find_key(const struct gguf *g, const char *key)
{
        return gg_lookup(g->kv_index, g->n_kv, key);
}

const char *gguf_key(const struct gguf *g, int64_t i)
{
        return i >= 0 && i < g->n_kv ? g->kv[i].key : NULL;
}

enum gguf_vtype gguf_kv_type(const struct gguf *g, int64_t i)
{
        return i >= 0 && i < g->n_kv ? g->kv[i].type : GGUF_VTYPE_COUNT;
}

const struct gguf_tensor *gguf_tensor_at(const struct gguf *g, int64_t i)
{
        return i >= 0 && i < g->n_tensors ? &g->tensors[i].t : NULL;
}

const struct gguf_tensor *gguf_find_tensor(const struct gguf *g, const char *name)
{
        int64_t i = gg_lookup(g->tensor_index, g->n_tensors, name);

        return i < 0 ? NULL : &g->tensors[i].t;
}

/* --- typed getters --- */

struct gg_int {
        bool neg;       /* then s holds the value */
        int64_t s;
        uint64_t u;     /* the value when !neg */
};

static bool gg_read_int(enum gguf_vtype t, const uint8_t *p, struct gg_int *v)
{
        int64_t s;

        switch (t) {
        case GGUF_U8:  { uint8_t x;  memcpy(&x, p, sizeof x); v->u = x; v->neg = false; return true; }
        case GGUF_U16: { uint16_t x; memcpy(&x, p, sizeof x); v->u = x; v->neg = false; return true; }
        case GGUF_U32: { uint32_t x; memcpy(&x, p, sizeof x); v->u = x; v->neg = false; return true; }
        case GGUF_U64: { uint64_t x; memcpy(&x, p, sizeof x); v->u = x; v->neg = false; return true; }
        case GGUF_I8:  { int8_t x;   memcpy(&x, p, sizeof x); s = x; break; }
        case GGUF_I16: { int16_t x;  memcpy(&x, p, sizeof x); s = x; break; }
        case GGUF_I32: { int32_t x;  memcpy(&x, p, sizeof x); s = x; break; }
        case GGUF_I64: { int64_t x;  memcpy(&x, p, sizeof x); s = x; break; }
        default:
                return false;
        }
        v->s = s;
        v->neg = s < 0;
        v->u = s < 0 ? 0 : (uint64_t)s;
        return true;
}

static const struct gguf_kv *gg_get(const struct gguf *g, const char *key, struct moerr *e)
{
        int64_t i = gguf_find_key(g, key);

        if (i < 0) {
                moerr_set(e, -ENOENT, "key '%s' not found", key);
                return NULL;
        }
        return &g->kv[i];
}

static int gg_type_err(const struct gguf_kv *kv, const char *expected, struct moerr *e)
{
        return moerr_set(e, -EINVAL, "key '%s' has type %s, expected %s",
                         kv->key, gg_type_names[kv->type], expected);
}

static int gg_get_int(const struct gguf *g, const char *key, struct gg_int *v, struct moerr *e)
{
        const struct gguf_kv *kv = gg_get(g, key, e);

        if (!kv)
                return -ENOENT;
        if (!gg_read_int(kv->type, kv->val, v))
                return gg_type_err(kv, "an integer", e);
        return 0;
}

static int gg_range_err(const char *key, const struct gg_int *v, const char *type, struct moerr *e)
{
        if (v->neg)
                return moerr_set(e, -EINVAL, "key '%s': value %" PRId64 " does not fit in %s", key, v->s, type);
        return moerr_set(e, -EINVAL, "key '%s': value %" PRIu64 " does not fit in %s", key, v->u, type);
}

int gguf_get_u32(const struct gguf *g, const char *key, uint32_t *out, struct moerr *e)
{
        struct gg_int v = { 0 };
        int r = gg_get_int(g, key, &v, e);

        if (r < 0)
                return r;
        if (v.neg || v.u > UINT32_MAX)
                return gg_range_err(key, &v, "u32", e);
        *out = (uint32_t)v.u;
        return 0;
}

int gguf_get_u64(const struct gguf *g, const char *key, uint64_t *out, struct moerr *e)
{
        struct gg_int v = { 0 };
        int r = gg_get_int(g, key, &v, e);

        if (r < 0)
                return r;
        if (v.neg)
                return gg_range_err(key, &v, "u64", e);
        *out = v.u;
        return 0;
}

int gguf_get_i32(const struct gguf *g, const char *key, int32_t *out, struct moerr *e)
{
        struct gg_int v = { 0 };
        int r = gg_get_int(g, key, &v, e);

        if (r < 0)
                return r;
        if (v.neg ? v.s < INT32_MIN : v.u > INT32_MAX)
                return gg_range_err(key, &v, "i32", e);
        *out = v.neg ? (int32_t)v.s : (int32_t)v.u;
        return 0;
}

int gguf_get_f32(const struct gguf *g, const char *key, float *out, struct moerr *e)
{
        const struct gguf_kv *kv = gg_get(g, key, e);
        double d;
        float f;

        if (!kv)
                return -ENOENT;
        if (kv->type == GGUF_F32) {
                memcpy(&f, kv->val, sizeof f);
                *out = f;
                return 0;
        }
        if (kv->type != GGUF_F64)
                return gg_type_err(kv, "a float", e);
        memcpy(&d, kv->val, sizeof d);
        if (isfinite(d) && fabs(d) > FLT_MAX)
                return moerr_set(e, -EINVAL, "key '%s': value %g does not fit in f32", key, d);
        *out = (float)d;
        return 0;
}

int gguf_get_bool(const struct gguf *g, const char *key, bool *out, struct moerr *e)
{
        const struct gguf_kv *kv = gg_get(g, key, e);

        if (!kv)
                return -ENOENT;
        if (kv->type != GGUF_BOOL)
                return gg_type_err(kv, "bool", e);
        *out = kv->val[0] != 0;
        return 0;
}

int gguf_get_str(const struct gguf *g, const char *key, const char **s, size_t *len, struct moerr *e)
{
        const struct gguf_kv *kv = gg_get(g, key, e);
        uint64_t n;

        if (!kv)
                return -ENOENT;
        if (kv->type != GGUF_STRING)
                return gg_type_err(kv, "string", e);
        memcpy(&n, kv->val, sizeof n);
        *s = (const char *)kv->val + sizeof n;
        *len = (size_t)n;
        return 0;
}

int gguf_get_arr(const struct gguf *g, const char *key, enum gguf_vtype *elem_type,
                 uint64_t *count, struct moerr *e)
{
        const struct gguf_kv *kv = gg_get(g, key, e);

        if (!kv)
                return -ENOENT;
        if (kv->type != GGUF_ARRAY)
                return gg_type_err(kv, "array", e);
        *elem_type = kv->elem_type;
        *count = kv->count;
        return 0;
}

static const struct gguf_kv *gg_arr_at(const struct gguf *g, int64_t key_index, uint64_t i)
{
        const struct gguf_kv *kv;

        if (key_index < 0 || key_index >= g->n_kv)
                return NULL;
        kv = &g->kv[key_index];
        if (kv->type != GGUF_ARRAY || i >= kv->count)
                return NULL;
        return kv;
}

const char *gguf_arr_str(const struct gguf *g, int64_t key_index, uint64_t i, size_t *len)
{
        const struct gguf_kv *kv = gg_arr_at(g, key_index, i);
        const uint8_t *p;
        uint64_t n;

        if (!kv || kv->elem_type != GGUF_STRING)
                return NULL;
        p = kv->elems + kv->str_off[i];
        memcpy(&n, p, sizeof n);
        if (len)
                *len = (size_t)n;
        return (const char *)p + sizeof n;
}

int64_t gguf_arr_int(const struct gguf *g, int64_t key_index, uint64_t i)
{
        const struct gguf_kv *kv = gg_arr_at(g, key_index, i);
        struct gg_int v;

        if (!kv)
                return 0;
        if (kv->elem_type == GGUF_BOOL)
                return kv->elems[i];
        if (!gg_read_int(kv->elem_type, kv->elems + i * gg_type_size[kv->elem_type], &v))
                return 0;
        return v.neg ? v.s : (int64_t)v.u;
}

double gguf_arr_float(const struct gguf *g, int64_t key_index, uint64_t i)
{
        const struct gguf_kv *kv = gg_arr_at(g, key_index, i);
        double d;
        float f;

        if (!kv)
                return NAN;
        if (kv->elem_type == GGUF_F32) {
                memcpy(&f, kv->elems + i * sizeof f, sizeof f);
                return f;
        }
        if (kv->elem_type == GGUF_F64) {
                memcpy(&d, kv->elems + i * sizeof d, sizeof d);
                return d;
        }
        return NAN;
}
