/* quant: the weight types of GGUF files (ggml's type ids), their block
 * layouts, and scalar conversion to and from F32.
 *
 * The scalar functions here are the reference every SIMD kernel is tested
 * against. Layouts follow ggml-common.h exactly: files written by llama.cpp
 * must mean the same numbers here. */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum mo_type {
        MO_TYPE_F32 = 0,
        MO_TYPE_F16 = 1,
        MO_TYPE_Q4_0 = 2,
        MO_TYPE_Q4_1 = 3,
        MO_TYPE_Q5_0 = 6,
        MO_TYPE_Q5_1 = 7,
        MO_TYPE_Q8_0 = 8,
        MO_TYPE_Q8_1 = 9,
        MO_TYPE_Q2_K = 10,
        MO_TYPE_Q3_K = 11,
        MO_TYPE_Q4_K = 12,
        MO_TYPE_Q5_K = 13,
        MO_TYPE_Q6_K = 14,
        MO_TYPE_Q8_K = 15,
        MO_TYPE_BF16 = 30,
        MO_TYPE_COUNT = 42, /* one past the largest id ggml has used */
};

#define QK4_0 32
#define QK8_0 32
#define QK5_0 32
#define QK_K 256
#define K_SCALE_SIZE 12

typedef uint16_t mo_half; /* IEEE binary16 bits */

typedef struct { mo_half d; uint8_t qs[QK4_0 / 2]; } block_q4_0;            /* 18 B */
typedef struct { mo_half d; uint8_t qh[4]; uint8_t qs[QK5_0 / 2]; } block_q5_0; /* 22 B */
typedef struct { mo_half d; int8_t qs[QK8_0]; } block_q8_0;                 /* 34 B */
/* Q2_K: 16 sub-blocks of 16, each a 4-bit scale (low nibble) and 4-bit
 * min (high nibble) against d/dmin; 2-bit quants. */
typedef struct {
        uint8_t scales[QK_K / 16];
        uint8_t qs[QK_K / 4];
        mo_half d, dmin;
} block_q2_k; /* 84 B */
/* Q3_K: 16 sub-blocks of 16 with 6-bit signed scales (packed in 12 bytes);
 * 2 low bits in qs, the third in hmask (set = no -4 offset). */
typedef struct {
        uint8_t hmask[QK_K / 8];
        uint8_t qs[QK_K / 4];
        uint8_t scales[K_SCALE_SIZE];
        mo_half d;
} block_q3_k; /* 110 B */
typedef struct {
        mo_half d, dmin;
        uint8_t scales[K_SCALE_SIZE];
        uint8_t qs[QK_K / 2];
} block_q4_k; /* 144 B */
typedef struct {
        mo_half d, dmin;
        uint8_t scales[K_SCALE_SIZE];
        uint8_t qh[QK_K / 8];
        uint8_t qs[QK_K / 2];
} block_q5_k; /* 176 B */
typedef struct {
        uint8_t ql[QK_K / 2];
        uint8_t qh[QK_K / 4];
        int8_t scales[QK_K / 16];
        mo_half d;
} block_q6_k; /* 210 B */
/* Activations quantized for dot products with K-quant weights (never stored
 * in files): float scale, 256 int8, and sums of each 16 for the mins. */
typedef struct {
        float d;
        int8_t qs[QK_K];
        int16_t bsums[QK_K / 16];
} block_q8_k; /* 292 B */

_Static_assert(sizeof(block_q4_0) == 18, "q4_0 layout");
_Static_assert(sizeof(block_q5_0) == 22, "q5_0 layout");
_Static_assert(sizeof(block_q8_0) == 34, "q8_0 layout");
_Static_assert(sizeof(block_q2_k) == 84, "q2_k layout");
_Static_assert(sizeof(block_q3_k) == 110, "q3_k layout");
_Static_assert(sizeof(block_q4_k) == 144, "q4_k layout");
_Static_assert(sizeof(block_q5_k) == 176, "q5_k layout");
_Static_assert(sizeof(block_q6_k) == 210, "q6_k layout");
_Static_assert(sizeof(block_q8_k) == 292, "q8_k layout");

struct mo_type_info {
        const char *name;   /* "Q4_K" */
        int64_t block;      /* elements per block */
        size_t block_bytes; /* bytes per block */
        bool computable;    /* moed has kernels for it (weights may use it) */
};

/* NULL for an id ggml never had or removed; otherwise its traits, including
 * types moed reads but cannot compute with (computable = false). */
const struct mo_type_info *mo_type_get(int type);
const char *mo_type_name(int type); /* "type 99" style text for unknown ids */

/* Bytes of one row of n elements, or 0 if the type is unknown or n is not a
 * multiple of its block. */
size_t mo_row_bytes(int type, int64_t n);

float mo_half_to_float(mo_half h);
mo_half mo_float_to_half(float f); /* round to nearest even */
float mo_bf16_to_float(uint16_t b);
uint16_t mo_float_to_bf16(float f); /* round to nearest even, NaN kept NaN */

/* Scalar reference conversions for every computable type (F32, F16, BF16,
 * Q4_0, Q5_0, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K). n must be a multiple of
 * the block size. Dequantization reproduces ggml's floats bit for bit; a
 * type that is not computable, or a partial block, fills dst with NaN. */
void mo_dequantize_row(int type, const void *src, float *dst, int64_t n);
/* Writes mo_row_bytes(type, n) bytes (nothing on misuse as above). Used by
 * the fixture writer and for activations; Q4_0/Q5_0/Q8_0 follow ggml's
 * reference quantizers; the K-quants use a simple range fit plus a small
 * search of the quantized sub-block scales (not ggml's search), producing
 * valid, reasonably accurate blocks. */
void mo_quantize_row(int type, const float *src, void *dst, int64_t n);

/* Activations for the integer dot products: Q8_0 (for Q4_0/Q5_0/Q8_0
 * weights) and Q8_K (for K-quants), exactly as ggml quantizes them. Q8_K's
 * d has the opposite sign of the block's largest-magnitude value, which
 * becomes -127. Only whole blocks of n are written. */
void mo_quantize_row_q8_0(const float *x, block_q8_0 *y, int64_t n);
void mo_quantize_row_q8_k(const float *x, block_q8_k *y, int64_t n);

/* Which activation format a weight type is dotted against: MO_TYPE_Q8_0,
 * MO_TYPE_Q8_K, or MO_TYPE_F32 (F32/F16/BF16 weights dot F32 activations);
 * -EINVAL for a type that is not computable. */
int mo_vec_dot_type(int weight_type);

/* Scalar reference dot product of one weight row (type) with one activation
 * row already converted to mo_vec_dot_type(type). n elements. Per block the
 * quant products are summed as exact integers and scaled once by the float
 * product of the two block scales (minus the dmin·bsums term for Q2_K/Q4_K/
 * Q5_K), as the SIMD kernels do; blocks are summed in double, so a SIMD
 * result differs from this only by its float accumulation. NaN on misuse. */
float mo_vec_dot_ref(int type, int64_t n, const void *w, const void *act);
