/* gguf-write: writes GGUF files (version 3 by default). Used by the fixture
 * writer, which makes every model the tests and benchmarks use, and by tests
 * that need malformed files. Tensor data comes from a callback at write time
 * so that multi-gigabyte fixtures never sit in memory whole. */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/moerr.h"
#include "engine/gguf.h"

struct gguf_writer;

/* Fills dst (nbytes, as mo_row_bytes(type, ne0) * ne1 * ne2 * ne3) with the
 * tensor's data. Returns 0 or a negative errno. */
typedef int (*gguf_fill_fn)(void *ctx, const char *name, int type, const int64_t ne[4],
                            void *dst, size_t nbytes);

struct gguf_writer *gguf_writer_new(void);
void gguf_writer_free(struct gguf_writer *w);
void gguf_writer_set_version(struct gguf_writer *w, uint32_t version);     /* 2 or 3 */
void gguf_writer_set_alignment(struct gguf_writer *w, uint32_t alignment); /* also writes general.alignment */

/* Metadata, in insertion order; a key set twice keeps the last value. */
void gguf_w_u32(struct gguf_writer *w, const char *key, uint32_t v);
void gguf_w_i32(struct gguf_writer *w, const char *key, int32_t v);
void gguf_w_u64(struct gguf_writer *w, const char *key, uint64_t v);
void gguf_w_f32(struct gguf_writer *w, const char *key, float v);
void gguf_w_bool(struct gguf_writer *w, const char *key, bool v);
void gguf_w_str(struct gguf_writer *w, const char *key, const char *v);
/* Any fixed-size scalar type (u8 .. f64, bool): v points to one value of it. */
void gguf_w_scalar(struct gguf_writer *w, const char *key, enum gguf_vtype type, const void *v);
/* The value type id and the value's encoded bytes, written verbatim: for
 * nested arrays and for tests that need malformed values. */
void gguf_w_raw(struct gguf_writer *w, const char *key, uint32_t type, const void *bytes, size_t n);
/* Numeric arrays: data holds count elements of elem_type (copied). */
void gguf_w_arr(struct gguf_writer *w, const char *key, enum gguf_vtype elem_type,
                const void *data, uint64_t count);
/* String array: strs[i] of lens[i] bytes (lens NULL: NUL-terminated). Copied. */
void gguf_w_arr_str(struct gguf_writer *w, const char *key, const char *const *strs,
                    const size_t *lens, uint64_t count);

/* Tensors are written in the order added. data (copied) or fill (called
 * during gguf_writer_write) supplies the bytes. n_dims 1..4. */
int gguf_w_tensor(struct gguf_writer *w, const char *name, int type, int n_dims,
                  const int64_t *ne, const void *data);
int gguf_w_tensor_fill(struct gguf_writer *w, const char *name, int type, int n_dims,
                       const int64_t *ne, gguf_fill_fn fill, void *ctx);

/* A failed setter (bad argument: unknown type, name too long, duplicate
 * tensor, alignment not a power of two; or no memory) is remembered, and the
 * write functions then fail with the first such error and its message; the
 * tensor setters also return it. */

/* Writes the file atomically (temporary file, then rename). */
int gguf_writer_write(struct gguf_writer *w, const char *path, struct moerr *e);
/* Writes into a malloc'ed buffer (for tests and fuzz seeds). */
int gguf_writer_write_mem(struct gguf_writer *w, void **buf, size_t *size, struct moerr *e);
