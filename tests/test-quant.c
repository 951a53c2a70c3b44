/* test-quant: kernels/quant.c — the type table, exact half/bf16 conversion,
 * dequantizers against hand-built blocks, quantizer accuracy, and the
 * reference dot products the SIMD kernels are measured against. */
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kernels/quant.h"
#include "testutil.h"

/* ---- the type table ---- */

/* ggml's sizes, written out independently of quant.c (gguf-py
 * GGML_QUANT_SIZES, with ggml's 36-byte Q8_1). */
static const struct { int id; const char *name; int64_t block; size_t bytes; bool comp; } ggml_types[] = {
        { 0, "F32", 1, 4, true },       { 1, "F16", 1, 2, true },
        { 2, "Q4_0", 32, 18, true },    { 3, "Q4_1", 32, 20, false },
        { 6, "Q5_0", 32, 22, true },    { 7, "Q5_1", 32, 24, false },
        { 8, "Q8_0", 32, 34, true },    { 9, "Q8_1", 32, 36, false },
        { 10, "Q2_K", 256, 84, true }, { 11, "Q3_K", 256, 110, true },
        { 12, "Q4_K", 256, 144, true }, { 13, "Q5_K", 256, 176, true },
        { 14, "Q6_K", 256, 210, true }, { 15, "Q8_K", 256, 292, false },
        { 16, "IQ2_XXS", 256, 66, false }, { 17, "IQ2_XS", 256, 74, false },
        { 18, "IQ3_XXS", 256, 98, false }, { 19, "IQ1_S", 256, 50, false },
        { 20, "IQ4_NL", 32, 18, false }, { 21, "IQ3_S", 256, 110, false },
        { 22, "IQ2_S", 256, 82, false }, { 23, "IQ4_XS", 256, 136, false },
        { 24, "I8", 1, 1, false },      { 25, "I16", 1, 2, false },
        { 26, "I32", 1, 4, false },     { 27, "I64", 1, 8, false },
        { 28, "F64", 1, 8, false },     { 29, "IQ1_M", 256, 56, false },
        { 30, "BF16", 1, 2, true },     { 34, "TQ1_0", 256, 54, false },
        { 35, "TQ2_0", 256, 66, false }, { 39, "MXFP4", 32, 17, false },
        { 40, "NVFP4", 64, 36, false }, { 41, "Q1_0", 128, 18, false },
};

static void type_table_matches_ggml_sizes(void **state)
{
        (void)state;
        for (size_t i = 0; i < sizeof ggml_types / sizeof ggml_types[0]; i++) {
                const struct mo_type_info *ti = mo_type_get(ggml_types[i].id);
                assert_non_null(ti);
                assert_string_equal(ti->name, ggml_types[i].name);
                assert_int_equal(ti->block, ggml_types[i].block);
                assert_int_equal(ti->block_bytes, ggml_types[i].bytes);
                assert_int_equal(ti->computable, ggml_types[i].comp);
                assert_string_equal(mo_type_name(ggml_types[i].id), ggml_types[i].name);
        }
}

static void type_table_rejects_removed_and_unknown_ids(void **state)
{
        static const int bad[] = { -1, 4, 5, 31, 32, 33, 36, 37, 38, MO_TYPE_COUNT, 1000, INT32_MIN };

        (void)state;
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
                assert_null(mo_type_get(bad[i]));
                assert_int_equal(mo_row_bytes(bad[i], 256), 0);
        }
        assert_string_equal(mo_type_name(99), "type 99");
        assert_string_equal(mo_type_name(-7), "type -7");
}

static void *name_unknown_many_times(void *arg)
{
        int id = (int)(intptr_t)arg;
        char want[32];

        snprintf(want, sizeof want, "type %d", id);
        for (int i = 0; i < 20000; i++)
                if (strcmp(mo_type_name(id), want) != 0)
                        return (void *)1;
        return NULL;
}

static void type_name_of_unknown_ids_is_per_thread(void **state)
{
        pthread_t a, b;
        void *ra, *rb;

        (void)state;
        assert_int_equal(pthread_create(&a, NULL, name_unknown_many_times, (void *)(intptr_t)100), 0);
        assert_int_equal(pthread_create(&b, NULL, name_unknown_many_times, (void *)(intptr_t)2000), 0);
        pthread_join(a, &ra);
        pthread_join(b, &rb);
        assert_null(ra);
        assert_null(rb);
}

static void row_bytes_counts_whole_blocks_only(void **state)
{
        (void)state;
        assert_int_equal(mo_row_bytes(MO_TYPE_Q4_K, 512), 288);
        assert_int_equal(mo_row_bytes(MO_TYPE_Q6_K, 7168), 28 * 210);
        assert_int_equal(mo_row_bytes(MO_TYPE_Q8_0, 64), 68);
        assert_int_equal(mo_row_bytes(MO_TYPE_F32, 3), 12);
        assert_int_equal(mo_row_bytes(MO_TYPE_BF16, 5), 10);
        assert_int_equal(mo_row_bytes(MO_TYPE_Q4_K, 0), 0);
        assert_int_equal(mo_row_bytes(MO_TYPE_Q4_K, 100), 0);
        assert_int_equal(mo_row_bytes(MO_TYPE_Q8_0, 33), 0);
        assert_int_equal(mo_row_bytes(MO_TYPE_F16, -2), 0);
        /* Unrepresentable sizes fail instead of wrapping. */
        assert_int_equal(mo_row_bytes(28 /* F64 */, INT64_MAX), 0);
}

static void vec_dot_type_pairs_weights_with_activation_formats(void **state)
{
        (void)state;
        assert_int_equal(mo_vec_dot_type(MO_TYPE_F32), MO_TYPE_F32);
        assert_int_equal(mo_vec_dot_type(MO_TYPE_F16), MO_TYPE_F32);
        assert_int_equal(mo_vec_dot_type(MO_TYPE_BF16), MO_TYPE_F32);
        assert_int_equal(mo_vec_dot_type(MO_TYPE_Q4_0), MO_TYPE_Q8_0);
        assert_int_equal(mo_vec_dot_type(MO_TYPE_Q5_0), MO_TYPE_Q8_0);
        assert_int_equal(mo_vec_dot_type(MO_TYPE_Q8_0), MO_TYPE_Q8_0);
        assert_int_equal(mo_vec_dot_type(MO_TYPE_Q2_K), MO_TYPE_Q8_K);
        assert_int_equal(mo_vec_dot_type(MO_TYPE_Q3_K), MO_TYPE_Q8_K);
        assert_int_equal(mo_vec_dot_type(MO_TYPE_Q4_K), MO_TYPE_Q8_K);
        assert_int_equal(mo_vec_dot_type(MO_TYPE_Q5_K), MO_TYPE_Q8_K);
        assert_int_equal(mo_vec_dot_type(MO_TYPE_Q6_K), MO_TYPE_Q8_K);
        /* Every computable type has a pairing, nothing else has one. */
        for (int t = -1; t <= MO_TYPE_COUNT; t++) {
                const struct mo_type_info *ti = mo_type_get(t);
                assert_int_equal(mo_vec_dot_type(t) >= 0, ti && ti->computable);
        }
}

/* ---- half and bfloat16 ---- */

static uint32_t bits_of(float f)
{
        uint32_t u;

        memcpy(&u, &f, 4);
        return u;
}

static float float_of(uint32_t u)
{
        float f;

        memcpy(&f, &u, 4);
        return f;
}

/* binary16 by its definition, in double, for comparison. */
static double half_by_definition(uint16_t h)
{
        int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
        double v = e == 0 ? ldexp(m, -24) : e == 31 ? INFINITY : ldexp(1024 + m, e - 25);

        return s ? -v : v;
}

static void half_to_float_is_exact_for_all_values(void **state)
{
        (void)state;
        for (uint32_t h = 0; h < 65536; h++) {
                float f = mo_half_to_float((mo_half)h);
                bool nan = ((h >> 10) & 31) == 31 && (h & 1023);
                if (nan) {
                        assert_true(isnan(f));
                        assert_int_equal(!!signbit(f), h >> 15);
                } else {
                        assert_true((double)f == half_by_definition((uint16_t)h));
                        assert_int_equal(!!signbit(f), h >> 15); /* -0 stays -0 */
                }
        }
}

static void half_round_trip_is_identity_except_nan_payload(void **state)
{
        (void)state;
        for (uint32_t h = 0; h < 65536; h++) {
                mo_half back = mo_float_to_half(mo_half_to_float((mo_half)h));
                bool nan = ((h >> 10) & 31) == 31 && (h & 1023);
                if (!nan) {
                        assert_int_equal(back, h);
                } else {
                        /* Still a NaN of the same sign; payload kept, made quiet. */
                        assert_int_equal(back & 0xfe00, (h & 0x8000) | 0x7e00);
                        assert_int_equal(back & 0x1ff, h & 0x1ff);
                }
        }
}

/* Every midpoint between adjacent finite halves must round to the even one,
 * and the floats just beside it to the nearer one. */
static void float_to_half_rounds_midpoints_to_even(void **state)
{
        (void)state;
        for (uint32_t h = 0; h < 0x7bff; h++) {
                double lo = half_by_definition((uint16_t)h), hi = half_by_definition((uint16_t)(h + 1));
                float mid = (float)((lo + hi) / 2); /* 12 significant bits: exact */
                uint16_t even = (h & 1) ? (uint16_t)(h + 1) : (uint16_t)h;
                assert_true((double)mid == (lo + hi) / 2);
                assert_int_equal(mo_float_to_half(mid), even);
                assert_int_equal(mo_float_to_half(-mid), even | 0x8000);
                assert_int_equal(mo_float_to_half(nextafterf(mid, 0)), h);
                assert_int_equal(mo_float_to_half(nextafterf(mid, INFINITY)), h + 1);
        }
}

static void float_to_half_handles_hand_values(void **state)
{
        (void)state;
        assert_int_equal(mo_float_to_half(1.0f), 0x3c00);
        assert_int_equal(mo_float_to_half(-2.0f), 0xc000);
        assert_int_equal(mo_float_to_half(0.5f), 0x3800);
        assert_int_equal(mo_float_to_half(0.0f), 0x0000);
        assert_int_equal(mo_float_to_half(-0.0f), 0x8000);
        assert_int_equal(mo_float_to_half(65504.0f), 0x7bff);
        assert_int_equal(mo_float_to_half(65519.996f), 0x7bff);
        assert_int_equal(mo_float_to_half(65520.0f), 0x7c00); /* tie goes up to inf */
        assert_int_equal(mo_float_to_half(1e10f), 0x7c00);
        assert_int_equal(mo_float_to_half(-1e10f), 0xfc00);
        assert_int_equal(mo_float_to_half(INFINITY), 0x7c00);
        assert_int_equal(mo_float_to_half(-INFINITY), 0xfc00);
        assert_int_equal(mo_float_to_half(0x1p-14f), 0x0400);         /* smallest normal */
        assert_int_equal(mo_float_to_half(0x1p-24f), 0x0001);         /* smallest subnormal */
        assert_int_equal(mo_float_to_half(0x1p-25f), 0x0000);         /* tie to even: 0 */
        assert_int_equal(mo_float_to_half(0x1.000002p-25f), 0x0001);  /* just above the tie */
        assert_int_equal(mo_float_to_half(0x3p-25f), 0x0002);         /* 1.5 units: to 2 */
        assert_int_equal(mo_float_to_half(0x7ffp-25f), 0x0400);       /* carry into normal */
        assert_int_equal(mo_float_to_half(1e-30f), 0x0000);
        assert_int_equal(mo_float_to_half(1.0f + 0x1p-11f), 0x3c00);  /* tie, even below */
        assert_int_equal(mo_float_to_half(1.0f + 0x3p-11f), 0x3c02);  /* tie, even above */
        assert_int_equal(mo_float_to_half(1.0f + 0x1p-11f + 0x1p-20f), 0x3c01);
        assert_int_equal(mo_float_to_half(0.1f), 0x2e66);
        assert_int_equal(mo_float_to_half(1.0f / 3.0f), 0x3555);
        uint16_t n = mo_float_to_half(NAN);
        assert_int_equal(n & 0x7c00, 0x7c00);
        assert_true(n & 0x3ff);
        /* A NaN whose payload lies only in the low float bits stays NaN. */
        n = mo_float_to_half(float_of(0x7f800001));
        assert_int_equal(n & 0x7c00, 0x7c00);
        assert_true(n & 0x3ff);
        assert_true(mo_half_to_float(0x7bff) == 65504.0f);
        assert_true(mo_half_to_float(0x0001) == 0x1p-24f);
        assert_true(mo_half_to_float(0x03ff) == 0x3ffp-24f);
        assert_true(mo_half_to_float(0xc000) == -2.0f);
        assert_true(isinf(mo_half_to_float(0xfc00)) && mo_half_to_float(0xfc00) < 0);
}

static void bf16_converts_with_round_to_nearest_even(void **state)
{
        (void)state;
        assert_int_equal(mo_float_to_bf16(1.0f), 0x3f80);
        assert_int_equal(mo_float_to_bf16(-2.0f), 0xc000);
        assert_int_equal(mo_float_to_bf16(1.0f + 0x1p-8f), 0x3f80);  /* tie, even below */
        assert_int_equal(mo_float_to_bf16(1.0f + 0x3p-8f), 0x3f82);  /* tie, even above */
        assert_int_equal(mo_float_to_bf16(1.0f + 0x1p-8f + 0x1p-20f), 0x3f81);
        assert_int_equal(mo_float_to_bf16(INFINITY), 0x7f80);
        assert_int_equal(mo_float_to_bf16(-INFINITY), 0xff80);
        assert_int_equal(mo_float_to_bf16(float_of(0x7f7fffff)), 0x7f80); /* max float rounds to inf */
        assert_int_equal(mo_float_to_bf16(float_of(0x00000001)), 0x0000);
        assert_int_equal(mo_float_to_bf16(float_of(0x00008001)), 0x0001); /* subnormals kept */
        /* NaN with payload only in the dropped bits must not become inf. */
        uint16_t n = mo_float_to_bf16(float_of(0x7f800001));
        assert_true(isnan(mo_bf16_to_float(n)));
        n = mo_float_to_bf16(float_of(0xff800001));
        assert_true(isnan(mo_bf16_to_float(n)) && (n & 0x8000));
        assert_true(mo_bf16_to_float(0x3f80) == 1.0f);
        assert_true(mo_bf16_to_float(0x4049) == 3.140625f);
        assert_int_equal(bits_of(mo_bf16_to_float(0x8000)), 0x80000000u);
}

static void bf16_round_trip_is_identity_except_nan_payload(void **state)
{
        (void)state;
        for (uint32_t b = 0; b < 65536; b++) {
                float f = mo_bf16_to_float((uint16_t)b);
                assert_int_equal(bits_of(f), b << 16);
                uint16_t back = mo_float_to_bf16(f);
                if (isnan(f))
                        assert_true(isnan(mo_bf16_to_float(back)) && (back & 0x8000) == (b & 0x8000));
                else
                        assert_int_equal(back, b);
        }
}

/* ---- dequantizers on hand-made blocks ---- */

static void dequant_f16_bf16_f32_rows(void **state)
{
        uint16_t h[4] = { 0x3c00, 0xc000, 0x3800, 0x7bff };
        uint16_t b[4] = { 0x3f80, 0xc000, 0x3f00, 0x4049 };
        float f[4] = { 1.5f, -0.25f, 3.0f, 1e-3f }, y[4];

        (void)state;
        mo_dequantize_row(MO_TYPE_F16, h, y, 4);
        assert_true(y[0] == 1.0f && y[1] == -2.0f && y[2] == 0.5f && y[3] == 65504.0f);
        mo_dequantize_row(MO_TYPE_BF16, b, y, 4);
        assert_true(y[0] == 1.0f && y[1] == -2.0f && y[2] == 0.5f && y[3] == 3.140625f);
        mo_dequantize_row(MO_TYPE_F32, f, y, 4);
        assert_memory_equal(y, f, sizeof f);
}

static void dequant_q8_0_scales_signed_bytes(void **state)
{
        block_q8_0 blk[2];
        float y[64];

        (void)state;
        blk[0].d = 0x3800; /* 0.5 */
        blk[1].d = 0xbc00; /* -1 */
        for (int j = 0; j < 32; j++) {
                blk[0].qs[j] = (int8_t)(j * 8 - 128); /* -128 .. 120 */
                blk[1].qs[j] = (int8_t)(j - 16);
        }
        mo_dequantize_row(MO_TYPE_Q8_0, blk, y, 64);
        assert_true(y[0] == -64.0f);
        assert_true(y[16] == 0.0f);
        assert_true(y[31] == 60.0f);
        assert_true(y[32] == 16.0f);
        assert_true(y[63] == -15.0f);
        for (int j = 0; j < 32; j++) {
                assert_true(y[j] == 0.5f * (float)(j * 8 - 128));
                assert_true(y[32 + j] == -(float)(j - 16));
        }
}

static void dequant_q4_0_low_nibbles_first_then_high(void **state)
{
        block_q4_0 blk;
        float y[32];

        (void)state;
        blk.d = 0x3800; /* 0.5 */
        for (int j = 0; j < 16; j++)
                blk.qs[j] = (uint8_t)(j | (15 - j) << 4);
        mo_dequantize_row(MO_TYPE_Q4_0, &blk, y, 32);
        assert_true(y[0] == -4.0f);   /* (0 - 8) / 2 */
        assert_true(y[15] == 3.5f);   /* (15 - 8) / 2 */
        assert_true(y[16] == 3.5f);   /* high nibble of byte 0: 15 */
        assert_true(y[31] == -4.0f);  /* high nibble of byte 15: 0 */
        for (int j = 0; j < 16; j++) {
                assert_true(y[j] == 0.5f * (float)(j - 8));
                assert_true(y[j + 16] == 0.5f * (float)(7 - j));
        }
}

static void dequant_q5_0_takes_fifth_bit_from_qh(void **state)
{
        block_q5_0 blk;
        float y[32];

        (void)state;
        blk.d = 0x3400; /* 0.25 */
        /* qh little-endian 0x0003fffe: bits 1..17 set, so element 0 and
         * elements 18..31 lack the fifth bit, element 16 and 17 have it. */
        blk.qh[0] = 0xfe;
        blk.qh[1] = 0xff;
        blk.qh[2] = 0x03;
        blk.qh[3] = 0x00;
        for (int j = 0; j < 16; j++)
                blk.qs[j] = (uint8_t)(j | (15 - j) << 4);
        mo_dequantize_row(MO_TYPE_Q5_0, &blk, y, 32);
        assert_true(y[0] == -4.0f);         /* (0 + 0 - 16) / 4 */
        assert_true(y[1] == 0.25f);         /* (1 + 16 - 16) / 4 */
        assert_true(y[15] == 3.75f);        /* (15 + 16 - 16) / 4 */
        assert_true(y[16] == 3.75f);        /* (15 + 16 - 16) / 4: bit 16 set */
        assert_true(y[17] == 3.5f);         /* (14 + 16 - 16) / 4: bit 17 set */
        assert_true(y[18] == -0.75f);       /* (13 - 16) / 4 */
        assert_true(y[31] == -4.0f);        /* (0 - 16) / 4 */
}

/* Sub-block scales {1,2,3,4,17,33,48,63} and mins {0,5,10,15,20,40,50,63}
 * packed by hand in ggml's 12-byte layout: bytes 0-3 hold the low 6 bits
 * of scales 0-3 plus the top 2 bits of scales 4-7; bytes 4-7 the same for
 * the mins; bytes 8-11 the low nibbles of scale (low half) and min (high
 * half) 4-7. */
static const int k4_sc[8] = { 1, 2, 3, 4, 17, 33, 48, 63 };
static const int k4_m[8] = { 0, 5, 10, 15, 20, 40, 50, 63 };
static const uint8_t k4_scales[12] = { 0x41, 0x82, 0xc3, 0xc4, 0x40, 0x85, 0xca, 0xcf,
                                       0x41, 0x81, 0x20, 0xff };

static void dequant_q4_k_unpacks_six_bit_scales_and_mins(void **state)
{
        block_q4_k blk;
        float y[QK_K];

        (void)state;
        blk.d = 0x3800;    /* 0.5 */
        blk.dmin = 0x3400; /* 0.25 */
        memcpy(blk.scales, k4_scales, 12);
        for (int i = 0; i < 128; i++)
                blk.qs[i] = (uint8_t)((i % 16) | (15 - i % 16) << 4);
        mo_dequantize_row(MO_TYPE_Q4_K, &blk, y, QK_K);
        /* Chunk c of 64 values: bytes 32c..32c+31, low nibbles are sub-block
         * 2c, high nibbles sub-block 2c+1. */
        assert_true(y[0] == 0.0f);                    /* 0.5*1*0 - 0.25*0 */
        assert_true(y[1] == 0.5f);                    /* 0.5*1*1 */
        assert_true(y[32] == 0.5f * 2 * 15 - 1.25f);  /* sub-block 1, q = 15 */
        assert_true(y[64 + 3] == 0.5f * 3 * 3 - 2.5f);
        assert_true(y[128] == 0.0f - 5.0f);           /* sub-block 4: min 20 */
        assert_true(y[128 + 32 + 1] == 0.5f * 33 * 14 - 10.0f);
        assert_true(y[255] == 0.5f * 63 * 0 - 15.75f);
        for (int c = 0; c < 4; c++) {
                for (int l = 0; l < 32; l++) {
                        int lo = l % 16, hi = 15 - l % 16;
                        assert_true(y[64 * c + l] == 0.5f * k4_sc[2 * c] * lo - 0.25f * k4_m[2 * c]);
                        assert_true(y[64 * c + 32 + l] ==
                                    0.5f * k4_sc[2 * c + 1] * hi - 0.25f * k4_m[2 * c + 1]);
                }
        }
}

static void dequant_q5_k_adds_sixteen_from_qh_bits(void **state)
{
        block_q5_k blk;
        float y[QK_K];

        (void)state;
        blk.d = 0x3800;    /* 0.5 */
        blk.dmin = 0x3400; /* 0.25 */
        memcpy(blk.scales, k4_scales, 12);
        for (int i = 0; i < 128; i++)
                blk.qs[i] = (uint8_t)((i % 16) | (15 - i % 16) << 4);
        /* qh[l] bit 2c: fifth bit of value 64c+l; bit 2c+1: of 64c+32+l. */
        for (int l = 0; l < 32; l++)
                blk.qh[l] = (uint8_t)(l % 2 ? 0xaa : 0x55);
        mo_dequantize_row(MO_TYPE_Q5_K, &blk, y, QK_K);
        assert_true(y[0] == 0.5f * 1 * 16 - 0.0f);    /* even l: low-nibble bits */
        assert_true(y[1] == 0.5f * 1 * 1);            /* odd l: no bit for low */
        assert_true(y[33] == 0.5f * 2 * (14 + 16) - 1.25f);
        assert_true(y[32] == 0.5f * 2 * 15 - 1.25f);
        assert_true(y[255] == 0.5f * 63 * (0 + 16) - 15.75f);
        for (int c = 0; c < 4; c++) {
                for (int l = 0; l < 32; l++) {
                        int lo = l % 16 + (l % 2 ? 0 : 16), hi = 15 - l % 16 + (l % 2 ? 16 : 0);
                        assert_true(y[64 * c + l] == 0.5f * k4_sc[2 * c] * lo - 0.25f * k4_m[2 * c]);
                        assert_true(y[64 * c + 32 + l] ==
                                    0.5f * k4_sc[2 * c + 1] * hi - 0.25f * k4_m[2 * c + 1]);
                }
        }
}

static void dequant_q6_k_reads_d_last_and_signed_scales(void **state)
{
        block_q6_k blk;
        float y[QK_K];

        (void)state;
        memset(&blk, 0, sizeof blk);
        blk.d = 0x3800; /* 0.5 */
        for (int s = 0; s < 16; s++)
                blk.scales[s] = (int8_t)(s % 2 ? -(s + 1) : s + 1);
        blk.scales[15] = -128;
        /* Half 0: ql[l] = 0x21 (value l: 1, value 64+l: 2), ql[32+l] = 0x43
         * (value 32+l: 3, value 96+l: 4); qh[l] = 0b11100100: top bits 0,1,2,3
         * for values l, 32+l, 64+l, 96+l. Half 1: all zero (q = -32). */
        for (int l = 0; l < 32; l++) {
                blk.ql[l] = 0x21;
                blk.ql[32 + l] = 0x43;
                blk.qh[l] = 0xe4;
        }
        mo_dequantize_row(MO_TYPE_Q6_K, &blk, y, QK_K);
        assert_true(y[0] == 0.5f * 1 * (1 - 32));          /* scale 0: 1 */
        assert_true(y[16] == 0.5f * -2 * (1 - 32));        /* scale 1: -2 */
        assert_true(y[32] == 0.5f * 3 * (3 + 16 - 32));    /* scale 2: 3 */
        assert_true(y[64] == 0.5f * 5 * (2 + 32 - 32));    /* scale 4: 5 */
        assert_true(y[96] == 0.5f * 7 * (4 + 48 - 32));    /* scale 6: 7 */
        assert_true(y[127] == 0.5f * -8 * (4 + 48 - 32));  /* scale 7: -8 */
        assert_true(y[128] == 0.5f * 9 * -32);             /* scale 8: 9, q = 0 */
        assert_true(y[255] == 0.5f * -128 * -32);          /* scale 15: -128 */
        for (int i = 0; i < 128; i++) {
                int k = i / 32, q = (k == 0 ? 1 : k == 1 ? 3 : k == 2 ? 2 : 4) + 16 * k - 32;
                assert_true(y[i] == 0.5f * (float)blk.scales[i / 16] * (float)q);
                assert_true(y[128 + i] == 0.5f * (float)blk.scales[8 + i / 16] * -32.0f);
        }
}

static void dequant_q2_k_uses_nibble_scales_and_mins(void **state)
{
        block_q2_k blk;
        float y[QK_K];

        (void)state;
        blk.d = 0x3800;    /* 0.5 */
        blk.dmin = 0x3400; /* 0.25 */
        for (int s = 0; s < 16; s++)
                blk.scales[s] = (uint8_t)(s | (s / 2) << 4); /* scale s, min s/2 */
        /* Byte k holds value 32j + k%32 of half k/32 at bits 2j: 0xe4 gives
         * quants 0,1,2,3 for quarters j = 0..3, 0x1b gives 3,2,1,0. */
        for (int k = 0; k < 64; k++)
                blk.qs[k] = k % 2 ? 0x1b : 0xe4;
        mo_dequantize_row(MO_TYPE_Q2_K, &blk, y, QK_K);
        assert_true(y[0] == 0.0f);                   /* scale 0, min 0 */
        assert_true(y[1] == 0.0f);
        assert_true(y[40] == 0.5f * 2 * 1 - 0.25f);  /* sub-block 2, quarter 1, even */
        assert_true(y[41] == 0.5f * 2 * 2 - 0.25f);  /* odd byte: quant 2 */
        assert_true(y[254] == 0.5f * 15 * 3 - 1.75f);
        assert_true(y[255] == 0.5f * 15 * 0 - 1.75f);
        for (int i = 0; i < QK_K; i++) {
                int s = i / 16, j = (i % 128) / 32, q = i % 2 ? 3 - j : j;
                assert_true(y[i] == 0.5f * (float)s * (float)q - 0.25f * (float)(s / 2));
        }
}

/* Q3_K scales k*4 - 32 (k = 0..15), stored +32 = 0, 4, ..., 60, packed by
 * hand: low nibbles of 0-7 and 8-15 share bytes 0-7, the top two bits of
 * scale k sit in byte 8 + k%4 at bit 2(k/4). */
static const uint8_t q3k_scale_bytes[12] = { 0x00, 0x44, 0x88, 0xcc, 0x00, 0x44, 0x88, 0xcc,
                                             0xe4, 0xe4, 0xe4, 0xe4 };

static void dequant_q3_k_subtracts_four_where_hmask_is_clear(void **state)
{
        block_q3_k blk;
        float y[QK_K];

        (void)state;
        blk.d = 0x3800; /* 0.5 */
        memcpy(blk.scales, q3k_scale_bytes, 12);
        for (int k = 0; k < 64; k++)
                blk.qs[k] = 0xe4; /* low bits = quarter j */
        /* hmask[l] bit 4n + j: even l have it in half 0, odd l in half 1. */
        for (int l = 0; l < 32; l++)
                blk.hmask[l] = l % 2 ? 0xf0 : 0x0f;
        mo_dequantize_row(MO_TYPE_Q3_K, &blk, y, QK_K);
        assert_true(y[0] == 0.0f);                /* scale -32, quant 0 */
        assert_true(y[1] == 64.0f);               /* 0.5 * -32 * (0 - 4) */
        assert_true(y[32] == -12.0f);             /* 0.5 * -24 * 1 */
        assert_true(y[128] == 0.0f);              /* scale 0 */
        assert_true(y[193] == 16.0f);             /* 0.5 * 16 * 2 */
        assert_true(y[192] == 0.5f * 16 * -2);    /* even l, half 1: 2 - 4 */
        assert_true(y[255] == 42.0f);             /* 0.5 * 28 * 3 */
        for (int i = 0; i < QK_K; i++) {
                int n = i / 128, j = (i % 128) / 32, l = i % 32;
                bool hbit = (l % 2) == n;
                int q = j - (hbit ? 0 : 4);
                assert_true(y[i] == 0.5f * (float)(4 * (i / 16) - 32) * (float)q);
        }
}

static void dequant_of_non_computable_type_writes_nan(void **state)
{
        uint8_t junk[64] = { 0 };
        float y[32];

        (void)state;
        mo_dequantize_row(MO_TYPE_Q4_1, junk, y, 32);
        for (int i = 0; i < 32; i++)
                assert_true(isnan(y[i]));
        mo_dequantize_row(MO_TYPE_Q8_0, junk, y, 31); /* partial block */
        for (int i = 0; i < 31; i++)
                assert_true(isnan(y[i]));
        assert_true(isnan(mo_vec_dot_ref(99, 32, junk, junk)));
        assert_true(isnan(mo_vec_dot_ref(MO_TYPE_Q4_K, 32, junk, junk)));
}

/* ---- quantizers ---- */

static const int weight_types[] = { MO_TYPE_F32, MO_TYPE_F16, MO_TYPE_BF16, MO_TYPE_Q4_0,
                                    MO_TYPE_Q5_0, MO_TYPE_Q8_0, MO_TYPE_Q2_K, MO_TYPE_Q3_K,
                                    MO_TYPE_Q4_K, MO_TYPE_Q5_K, MO_TYPE_Q6_K };

/* Relative L2 error bounds of quantize→dequantize on uniform [-1, 1) data,
 * each 1.3-1.6x the worst error measured (in comments) over 16 rows of 4096. */
static double round_trip_bound(int type)
{
        switch (type) {
        case MO_TYPE_F32: return 0.0;
        case MO_TYPE_F16: return 3e-4;   /* measured 1.9e-4 */
        case MO_TYPE_BF16: return 2.5e-3; /* measured 1.5e-3 */
        case MO_TYPE_Q8_0: return 0.006; /* measured 0.0038 */
        case MO_TYPE_Q6_K: return 0.020; /* measured 0.0151 */
        case MO_TYPE_Q5_0: return 0.045; /* measured 0.0316 */
        case MO_TYPE_Q5_K: return 0.040; /* measured 0.0271 */
        case MO_TYPE_Q4_0: return 0.090; /* measured 0.0665 */
        case MO_TYPE_Q4_K: return 0.080; /* measured 0.0561 */
        case MO_TYPE_Q3_K: return 0.180; /* measured 0.137 */
        case MO_TYPE_Q2_K: return 0.300; /* measured 0.235 */
        default: return 0.0;
        }
}

static void quantize_round_trip_error_is_within_bounds(void **state)
{
        enum { N = 4096, ROWS = 16 };
        float *x = malloc(N * sizeof *x), *y = malloc(N * sizeof *y);
        uint8_t *q = malloc(N * 4);

        (void)state;
        for (size_t t = 0; t < sizeof weight_types / sizeof weight_types[0]; t++) {
                int type = weight_types[t];
                double worst = 0;
                for (int r = 0; r < ROWS; r++) {
                        tu_randf(x, N, 1000 + (uint64_t)r);
                        mo_quantize_row(type, x, q, N);
                        mo_dequantize_row(type, q, y, N);
                        worst = fmax(worst, tu_rel_err(y, x, N));
                }
                print_message("round trip %-5s rel err %.5f (bound %.5f)\n", mo_type_name(type),
                              worst, round_trip_bound(type));
                assert_true(worst <= round_trip_bound(type));
        }
        free(x);
        free(y);
        free(q);
}

/* Rows with wildly different magnitudes per sub-block and a constant block
 * still reconstruct well: the K-quant scale search must not fall apart when
 * one sub-block dominates the super-block scale. */
static void quantize_k_types_handle_uneven_sub_blocks(void **state)
{
        float x[QK_K], y[QK_K];
        uint8_t q[256];
        static const int types[] = { MO_TYPE_Q4_K, MO_TYPE_Q5_K, MO_TYPE_Q6_K };
        static const double bound[] = { 0.10, 0.05, 0.03 };

        (void)state;
        tu_randf(x, QK_K, 7);
        for (int i = 0; i < QK_K; i++)
                x[i] *= (float)(1 << (i / 32)) * 0.01f; /* 0.01 .. 1.28 */
        for (int t = 0; t < 3; t++) {
                mo_quantize_row(types[t], x, q, QK_K);
                mo_dequantize_row(types[t], q, y, QK_K);
                double err = tu_rel_err(y, x, QK_K);
                print_message("uneven %s rel err %.4f\n", mo_type_name(types[t]), err);
                assert_true(err < bound[t]);
        }
        for (int i = 0; i < QK_K; i++)
                x[i] = 0.75f;
        for (int t = 0; t < 3; t++) {
                mo_quantize_row(types[t], x, q, QK_K);
                mo_dequantize_row(types[t], q, y, QK_K);
                assert_true(tu_max_abs(y, x, QK_K) < 0.75 * 0.02);
        }
}

static void quantize_zero_row_gives_zeros(void **state)
{
        float x[512] = { 0 }, y[512];
        uint8_t q[2048];

        (void)state;
        for (size_t t = 0; t < sizeof weight_types / sizeof weight_types[0]; t++) {
                memset(q, 0x5a, sizeof q);
                mo_quantize_row(weight_types[t], x, q, 512);
                mo_dequantize_row(weight_types[t], q, y, 512);
                for (int i = 0; i < 512; i++)
                        assert_true(y[i] == 0.0f);
        }
}

/* Subnormal inputs make 1/d overflow inside the quantizers; the blocks
 * must still decode to finite values no farther off than the inputs' size. */
static void quantize_tiny_values_stay_finite(void **state)
{
        float x[512], y[512];
        uint8_t q[2048];

        (void)state;
        tu_randf(x, 512, 11);
        for (int i = 0; i < 512; i++)
                x[i] *= 1e-40f;
        for (size_t t = 0; t < sizeof weight_types / sizeof weight_types[0]; t++) {
                mo_quantize_row(weight_types[t], x, q, 512);
                mo_dequantize_row(weight_types[t], q, y, 512);
                for (int i = 0; i < 512; i++)
                        assert_true(isfinite(y[i]));
                assert_true(tu_max_abs(y, x, 512) <= 2e-40);
        }
}

static void quantize_q4_0_maps_largest_magnitude_to_minus_eight(void **state)
{
        float x[32], y[32];
        block_q4_0 b;

        (void)state;
        for (int j = 0; j < 32; j++)
                x[j] = (float)(j % 8) * 0.25f; /* 0 .. 1.75 */
        x[5] = -2.0f;                          /* largest magnitude, negative */
        mo_quantize_row(MO_TYPE_Q4_0, x, &b, 32);
        assert_true(mo_half_to_float(b.d) == 0.25f); /* -2 / -8 */
        assert_int_equal(b.qs[5] & 0x0f, 0);       /* -2 -> nibble 0 (-8) */
        mo_dequantize_row(MO_TYPE_Q4_0, &b, y, 32);
        /* Positive values beyond 7 steps clip at +7 steps (1.75 exactly). */
        for (int j = 0; j < 32; j++)
                assert_true(y[j] == x[j]);
}

static void quantize_q8_0_is_exact_on_its_grid(void **state)
{
        float x[64], y[64];
        block_q8_0 b[2];

        (void)state;
        for (int j = 0; j < 64; j++)
                x[j] = (float)((j * 37) % 255 - 127) * 0.5f; /* ±63.5 in 0.5 steps */
        x[3] = 63.5f;
        x[40] = -63.5f;
        mo_quantize_row(MO_TYPE_Q8_0, x, b, 64);
        assert_true(mo_half_to_float(b[0].d) == 0.5f);
        mo_dequantize_row(MO_TYPE_Q8_0, b, y, 64);
        assert_memory_equal(x, y, sizeof x);
}

static void quantize_q5_0_and_k_types_reproduce_grid_values(void **state)
{
        float x[QK_K], y[QK_K];
        uint8_t q[256];

        (void)state;
        /* Q5_0: values k/16 * 2 with k in -16..15 lie on its grid (d = 2/16). */
        for (int j = 0; j < 32; j++)
                x[j] = (float)(j - 16) * 0.125f;
        mo_quantize_row(MO_TYPE_Q5_0, x, q, 32);
        mo_dequantize_row(MO_TYPE_Q5_0, q, y, 32);
        assert_memory_equal(x, y, 32 * sizeof(float));
        /* Q6_K: integer steps -32..31 of one scale reproduce exactly when
         * every sub-block of 16 reaches -32 steps (its scale is then 1/16). */
        for (int i = 0; i < QK_K; i++)
                x[i] = i % 16 ? (float)((i * 7) % 64 - 32) * 0.0625f : -2.0f;
        mo_quantize_row(MO_TYPE_Q6_K, x, q, QK_K);
        mo_dequantize_row(MO_TYPE_Q6_K, q, y, QK_K);
        assert_true(tu_max_abs(y, x, QK_K) < 1e-6);
}

/* ---- activations ---- */

static void quantize_q8_k_follows_ggml_sign_convention_and_bsums(void **state)
{
        float x[2 * QK_K];
        block_q8_k b[2];

        (void)state;
        tu_randf(x, 2 * QK_K, 3);
        x[10] = 2.0f;        /* block 0: positive extreme */
        x[QK_K + 3] = -4.0f; /* block 1: negative extreme */
        mo_quantize_row_q8_k(x, b, 2 * QK_K);
        /* The extreme always lands on -127; d carries the sign. */
        assert_true(b[0].d == 2.0f / -127.0f);
        assert_true(b[1].d == -4.0f / -127.0f);
        assert_int_equal(b[0].qs[10], -127);
        assert_int_equal(b[1].qs[3], -127);
        for (int k = 0; k < 2; k++) {
                for (int s = 0; s < 16; s++) {
                        int sum = 0;
                        for (int j = 0; j < 16; j++)
                                sum += b[k].qs[16 * s + j];
                        assert_int_equal(b[k].bsums[s], sum);
                }
                for (int j = 0; j < QK_K; j++) {
                        float want = x[k * QK_K + j] / b[k].d;
                        assert_true(fabsf((float)b[k].qs[j] - want) <= 0.5f + 1e-4f);
                }
        }
        /* An all-zero block is zeros throughout, d included. */
        memset(x, 0, sizeof x);
        mo_quantize_row_q8_k(x, b, QK_K);
        assert_true(b[0].d == 0.0f);
        for (int s = 0; s < 16; s++)
                assert_int_equal(b[0].bsums[s], 0);
}

static void quantize_q8_0_activations_use_amax_over_127(void **state)
{
        float x[32];
        block_q8_0 b;

        (void)state;
        tu_randf(x, 32, 4);
        x[7] = -1.27f;
        mo_quantize_row_q8_0(x, &b, 32);
        assert_int_equal(b.d, mo_float_to_half(1.27f / 127.0f));
        assert_int_equal(b.qs[7], -127);
        float d = mo_half_to_float(b.d);
        for (int j = 0; j < 32; j++)
                assert_true(fabsf((float)b.qs[j] - x[j] / (1.27f / 127.0f)) <= 0.5f + 1e-3f ||
                            fabsf((float)b.qs[j] * d - x[j]) <= d);
}

/* ---- reference dot products ---- */

static int act_bytes(int type, int64_t n)
{
        switch (mo_vec_dot_type(type)) {
        case MO_TYPE_Q8_0: return (int)(n / 32 * sizeof(block_q8_0));
        case MO_TYPE_Q8_K: return (int)(n / QK_K * sizeof(block_q8_k));
        default: return (int)(n * sizeof(float));
        }
}

static void quantize_act(int type, const float *x, void *act, int64_t n)
{
        switch (mo_vec_dot_type(type)) {
        case MO_TYPE_Q8_0: mo_quantize_row_q8_0(x, act, n); break;
        case MO_TYPE_Q8_K: mo_quantize_row_q8_k(x, act, n); break;
        default: memcpy(act, x, (size_t)n * sizeof(float)); break;
        }
}

static void dequant_act(int type, const void *act, float *y, int64_t n)
{
        if (mo_vec_dot_type(type) == MO_TYPE_Q8_K) {
                const block_q8_k *b = act;
                for (int64_t i = 0; i < n; i++)
                        y[i] = b[i / QK_K].d * (float)b[i / QK_K].qs[i % QK_K];
        } else {
                mo_dequantize_row(mo_vec_dot_type(type), act, y, n);
        }
}

static double dot_d(const float *a, const float *b, int64_t n)
{
        double s = 0;

        for (int64_t i = 0; i < n; i++)
                s += (double)a[i] * b[i];
        return s;
}

/* The integer form must equal the dot of the two dequantized rows: this
 * pins the scale/min/bsums arithmetic, independent of quantization error. */
static void vec_dot_ref_equals_dot_of_dequantized_rows(void **state)
{
        enum { N = 2048 };
        float *x = malloc(N * sizeof *x), *a = malloc(N * sizeof *a);
        float *wd = malloc(N * sizeof *wd), *ad = malloc(N * sizeof *ad);
        uint8_t *w = malloc(N * 4), *act = malloc(N * 4 + 64);

        (void)state;
        for (size_t t = 0; t < sizeof weight_types / sizeof weight_types[0]; t++) {
                int type = weight_types[t];
                for (int r = 0; r < 4; r++) {
                        tu_randf(x, N, 50 + (uint64_t)r);
                        tu_randf(a, N, 90 + (uint64_t)r);
                        mo_quantize_row(type, x, w, N);
                        quantize_act(type, a, act, N);
                        mo_dequantize_row(type, w, wd, N);
                        dequant_act(type, act, ad, N);
                        double want = dot_d(wd, ad, N), got = mo_vec_dot_ref(type, N, w, act);
                        double scale = sqrt(dot_d(wd, wd, N) * dot_d(ad, ad, N));
                        assert_true(fabs(got - want) <= 1e-6 * scale);
                }
        }
        free(x); free(a); free(wd); free(ad); free(w); free(act);
}

/* Against the float dot of the dequantized weights with the original float
 * activations: the difference is the activation rounding alone, measured
 * relative to |w|·|a|. Bounds are over 3x the worst measured over 32 rows. */
static double dot_bound(int type)
{
        switch (mo_vec_dot_type(type)) {
        case MO_TYPE_F32: return 1e-6;  /* measured 1.3e-9 */
        case MO_TYPE_Q8_0: return 4e-4; /* measured 1.2e-4 */
        default: return 4e-4;           /* Q8_K: measured 1.1e-4 */
        }
}

static void vec_dot_ref_matches_float_dot_within_activation_rounding(void **state)
{
        enum { N = 4096, ROWS = 32 };
        float *x = malloc(N * sizeof *x), *a = malloc(N * sizeof *a), *wd = malloc(N * sizeof *wd);
        uint8_t *w = malloc(N * 4), *act = malloc(N * 4 + 64);

        (void)state;
        for (size_t t = 0; t < sizeof weight_types / sizeof weight_types[0]; t++) {
                int type = weight_types[t];
                double worst = 0;
                for (int r = 0; r < ROWS; r++) {
                        tu_randf(x, N, 500 + (uint64_t)r);
                        tu_randf(a, N, 900 + (uint64_t)r);
                        mo_quantize_row(type, x, w, N);
                        assert_int_equal(act_bytes(type, N) <= N * 4 + 64, 1);
                        quantize_act(type, a, act, N);
                        mo_dequantize_row(type, w, wd, N);
                        double want = dot_d(wd, a, N), got = mo_vec_dot_ref(type, N, w, act);
                        double scale = sqrt(dot_d(wd, wd, N) * dot_d(a, a, N));
                        worst = fmax(worst, fabs(got - want) / scale);
                }
                print_message("dot %-5s err/(|w||a|) %.2e (bound %.1e)\n", mo_type_name(type), worst,
                              dot_bound(type));
                assert_true(worst <= dot_bound(type));
        }
        free(x); free(a); free(wd); free(w); free(act);
}

static void vec_dot_ref_q4_0_hand_block(void **state)
{
        block_q4_0 w;
        block_q8_0 a;

        (void)state;
        w.d = 0x3800; /* 0.5 */
        a.d = 0x4000; /* 2 */
        for (int j = 0; j < 16; j++)
                w.qs[j] = 0x9a; /* low nibble 10 (+2), high nibble 9 (+1) */
        for (int j = 0; j < 32; j++)
                a.qs[j] = (int8_t)(j < 16 ? 3 : -5);
        /* 16 * (2*3) + 16 * (1*-5) = 16; times 0.5 * 2 */
        assert_true(mo_vec_dot_ref(MO_TYPE_Q4_0, 32, &w, &a) == 16.0f);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(type_table_matches_ggml_sizes),
                cmocka_unit_test(type_table_rejects_removed_and_unknown_ids),
                cmocka_unit_test(type_name_of_unknown_ids_is_per_thread),
                cmocka_unit_test(row_bytes_counts_whole_blocks_only),
                cmocka_unit_test(vec_dot_type_pairs_weights_with_activation_formats),
                cmocka_unit_test(half_to_float_is_exact_for_all_values),
                cmocka_unit_test(half_round_trip_is_identity_except_nan_payload),
                cmocka_unit_test(float_to_half_rounds_midpoints_to_even),
                cmocka_unit_test(float_to_half_handles_hand_values),
                cmocka_unit_test(bf16_converts_with_round_to_nearest_even),
                cmocka_unit_test(bf16_round_trip_is_identity_except_nan_payload),
                cmocka_unit_test(dequant_f16_bf16_f32_rows),
                cmocka_unit_test(dequant_q8_0_scales_signed_bytes),
                cmocka_unit_test(dequant_q4_0_low_nibbles_first_then_high),
                cmocka_unit_test(dequant_q5_0_takes_fifth_bit_from_qh),
                cmocka_unit_test(dequant_q4_k_unpacks_six_bit_scales_and_mins),
                cmocka_unit_test(dequant_q5_k_adds_sixteen_from_qh_bits),
                cmocka_unit_test(dequant_q6_k_reads_d_last_and_signed_scales),
                cmocka_unit_test(dequant_q2_k_uses_nibble_scales_and_mins),
                cmocka_unit_test(dequant_q3_k_subtracts_four_where_hmask_is_clear),
                cmocka_unit_test(dequant_of_non_computable_type_writes_nan),
                cmocka_unit_test(quantize_round_trip_error_is_within_bounds),
                cmocka_unit_test(quantize_k_types_handle_uneven_sub_blocks),
                cmocka_unit_test(quantize_zero_row_gives_zeros),
                cmocka_unit_test(quantize_tiny_values_stay_finite),
                cmocka_unit_test(quantize_q4_0_maps_largest_magnitude_to_minus_eight),
                cmocka_unit_test(quantize_q8_0_is_exact_on_its_grid),
                cmocka_unit_test(quantize_q5_0_and_k_types_reproduce_grid_values),
                cmocka_unit_test(quantize_q8_k_follows_ggml_sign_convention_and_bsums),
                cmocka_unit_test(quantize_q8_0_activations_use_amax_over_127),
                cmocka_unit_test(vec_dot_ref_equals_dot_of_dequantized_rows),
                cmocka_unit_test(vec_dot_ref_matches_float_dot_within_activation_rounding),
                cmocka_unit_test(vec_dot_ref_q4_0_hand_block),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
