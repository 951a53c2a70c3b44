/* gguf: read-only access to a GGUF file (versions 2 and 3).
 *
 * The file is mapped, never copied. Everything is validated at open: every
 * count, length, offset and shape is checked against the file's size before
 * use, so a truncated or hostile file yields a clear error, never a crash.
 * After a successful open, every accessor below is safe to call. */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/moerr.h"

enum gguf_vtype {
        GGUF_U8 = 0, GGUF_I8 = 1, GGUF_U16 = 2, GGUF_I16 = 3,
        GGUF_U32 = 4, GGUF_I32 = 5, GGUF_F32 = 6, GGUF_BOOL = 7,
        GGUF_STRING = 8, GGUF_ARRAY = 9, GGUF_U64 = 10, GGUF_I64 = 11,
        GGUF_F64 = 12,
        GGUF_VTYPE_COUNT
};

#define GGUF_MAX_DIMS 4
#define GGUF_DEFAULT_ALIGNMENT 32

struct gguf_tensor {
        const char *name;       /* NUL-terminated copy */
        int type;               /* enum mo_type; known to mo_type_get() */
        int n_dims;             /* 1..4 */
        int64_t ne[GGUF_MAX_DIMS]; /* unused dims are 1 */
        uint64_t offset;        /* from the start of the data section */
        size_t nbytes;
        const void *data;       /* inside the mapping */
};

struct gguf;

/* "u32", "string", ...; "unknown" for ids outside the enum. */
const char *gguf_vtype_name(enum gguf_vtype t);

/* Maps path read-only and validates it. */
int gguf_open(const char *path, struct gguf **out, struct moerr *e);
/* Validates a buffer in memory (not copied: it must outlive the gguf). */
int gguf_open_buffer(const void *data, size_t size, struct gguf **out, struct moerr *e);
void gguf_close(struct gguf *g);
/* Whether the mapped file lost pages under us (truncated or rewritten in
 * place while open): reads of them gave zeros (common/mapguard.h), so
 * whatever was computed from the file since may be wrong. Always false for
 * gguf_open_buffer. */
bool gguf_damaged(const struct gguf *g);

uint32_t gguf_version(const struct gguf *g);
size_t gguf_alignment(const struct gguf *g);
const void *gguf_file_data(const struct gguf *g);
size_t gguf_file_size(const struct gguf *g);
size_t gguf_data_offset(const struct gguf *g); /* start of tensor data */

/* Metadata. Keys are looked up by exact name; -1 when absent. */
int64_t gguf_n_kv(const struct gguf *g);
int64_t gguf_find_key(const struct gguf *g, const char *key);
const char *gguf_key(const struct gguf *g, int64_t i);
enum gguf_vtype gguf_kv_type(const struct gguf *g, int64_t i); /* GGUF_VTYPE_COUNT if i is out of range */

/* Typed getters by key. Return 0, -ENOENT when the key is absent (message
 * set), or -EINVAL when it holds another type or a value out of range. The
 * integer getters accept any integer type whose value fits (files written
 * by different converters disagree on u32 vs i32). */
int gguf_get_u32(const struct gguf *g, const char *key, uint32_t *v, struct moerr *e);
int gguf_get_u64(const struct gguf *g, const char *key, uint64_t *v, struct moerr *e);
int gguf_get_i32(const struct gguf *g, const char *key, int32_t *v, struct moerr *e);
int gguf_get_f32(const struct gguf *g, const char *key, float *v, struct moerr *e); /* f32 or f64 */
int gguf_get_bool(const struct gguf *g, const char *key, bool *v, struct moerr *e);
/* The string is not NUL-terminated in the file: use len. */
int gguf_get_str(const struct gguf *g, const char *key, const char **s, size_t *len, struct moerr *e);

/* Arrays: element type and count; then element access by index. */
int gguf_get_arr(const struct gguf *g, const char *key, enum gguf_vtype *elem_type,
                 uint64_t *count, struct moerr *e);
/* Element i of a string array (bounds-checked; NULL on misuse). */
const char *gguf_arr_str(const struct gguf *g, int64_t key_index, uint64_t i, size_t *len);
/* Element i of an integer or bool array as int64 (u64 values above INT64_MAX
 * wrap; 0 on misuse); of an f32 or f64 array as double (NaN on misuse). */
int64_t gguf_arr_int(const struct gguf *g, int64_t key_index, uint64_t i);
double gguf_arr_float(const struct gguf *g, int64_t key_index, uint64_t i);

/* Tensors, in file order. */
int64_t gguf_n_tensors(const struct gguf *g);
const struct gguf_tensor *gguf_tensor_at(const struct gguf *g, int64_t i);
const struct gguf_tensor *gguf_find_tensor(const struct gguf *g, const char *name);
