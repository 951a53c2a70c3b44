/* cuda-matmul.cu: y = W·x on the device with W in its stored type.
 *
 * Few activation rows (decode, and the routed experts' small groups): a
 * matrix-vector kernel streams the weights once per 8 rows, one warp per
 * output row, dequantizing each group of 8 values in registers and
 * multiplying in F32; reading the weights is the cost, so nothing is
 * converted ahead. Many rows (prefill): tensor cores through cuBLAS, F32
 * accumulation. cublasGemmEx needs both operands in one type, so the F32
 * activations are split into two 16-bit halves, x = hi + lo, and the
 * product is W·hi + W·lo: about 16 (BF16) or 22 (F16) significant bits of
 * each activation, close to the F32 reference, for twice the tensor work
 * (cheap next to everything else when m is large). F16 halves are taken
 * of each row scaled by a power of two, so no activation overflows F16's
 * range; the scale is multiplied back exactly. Quantized weights are
 * dequantized a tile of rows at a time into F16 scratch (exact for the
 * quant values, one F16 rounding of the block scale products) for the same
 * GEMM; no dequantized copy outlives the call. F32 weights use cuBLAS in
 * pedantic F32. */
#include <errno.h>

#include "kernels/cuda/cuda-quant.cuh"

#define MV_MAX_M 8   /* activation rows per pass of the matrix-vector kernel */
#define MV_BATCH 16  /* at most this many rows: matrix-vector passes */
#define MV_WARPS 4   /* output rows per block */
#define TILE_BYTES ((size_t)32 << 20)

/* ---- matrix-vector ------------------------------------------------------------ */

template <bool VEC>
__device__ __forceinline__ float dot8(const float *v, const float *xp)
{
        float s = 0.0f;

        if (VEC) {
                float4 a = __ldg((const float4 *)xp), b = __ldg((const float4 *)xp + 1);

                s = v[0] * a.x + v[1] * a.y + v[2] * a.z + v[3] * a.w;
                s += v[4] * b.x + v[5] * b.y + v[6] * b.z + v[7] * b.w;
        } else {
#pragma unroll
                for (int j = 0; j < 8; j++)
                        s += v[j] * __ldg(xp + j);
        }
        return s;
}

/* One warp per weight row; lanes take groups of 8 values in turn, so a
 * warp reads a contiguous stretch of the row per step. */
template <int T, bool VEC>
__global__ void __launch_bounds__(MV_WARPS * 32)
k_matvec(const uint8_t *w, size_t row_bytes, int64_t nrows, int64_t ncols, const float *x,
         int64_t xs, float *y, int64_t ys, int m)
{
        int64_t row = (int64_t)blockIdx.x * MV_WARPS + threadIdx.x / 32;
        int lane = threadIdx.x % 32;
        const uint8_t *wr = w + (size_t)row * row_bytes;
        int64_t groups = ncols / 8;
        float acc[MV_MAX_M];

        if (row >= nrows)
                return;
#pragma unroll
        for (int i = 0; i < MV_MAX_M; i++)
                acc[i] = 0.0f;
        for (int64_t g = lane; g < groups; g += 32) {
                float v[8];

                dq8<T>(wr, g * 8, v);
#pragma unroll
                for (int i = 0; i < MV_MAX_M; i++)
                        if (i < m)
                                acc[i] += dot8<VEC>(v, x + i * xs + g * 8);
        }
        if (q_is_float(T)) {
                for (int64_t k = groups * 8 + lane; k < ncols; k += 32) {
                        float v = q_elem<T>(wr, k);
#pragma unroll
                        for (int i = 0; i < MV_MAX_M; i++)
                                if (i < m)
                                        acc[i] += v * __ldg(x + i * xs + k);
                }
        }
#pragma unroll
        for (int i = 0; i < MV_MAX_M; i++) {
                float s = acc[i];

#pragma unroll
                for (int o = 16; o > 0; o /= 2)
                        s += __shfl_xor_sync(0xffffffffu, s, o);
                if (i < m && lane == 0)
                        y[i * ys + row] = s;
        }
}

static void matvec(struct cuda_ctx *c, const mo_weight *w, const char *wdev, const float *x,
                   int64_t xs, float *y, int64_t ys, int64_t m)
{
        bool vec = ((uintptr_t)x % 16 == 0) && (xs % 4 == 0 || m == 1);
        unsigned grid = (unsigned)((w->nrows + MV_WARPS - 1) / MV_WARPS);

        for (int64_t i0 = 0; i0 < m; i0 += MV_MAX_M) {
                int mi = (int)CUDA_MIN((int64_t)MV_MAX_M, m - i0);
                const float *xi = x + i0 * xs;
                float *yi = y + i0 * ys;

                q_dispatch(w->type, [&]<int T>() {
                        if (vec)
                                k_matvec<T, true><<<grid, MV_WARPS * 32, 0, c->stream>>>(
                                        (const uint8_t *)wdev, w->row_bytes, w->nrows, w->ncols,
                                        xi, xs, yi, ys, mi);
                        else
                                k_matvec<T, false><<<grid, MV_WARPS * 32, 0, c->stream>>>(
                                        (const uint8_t *)wdev, w->row_bytes, w->nrows, w->ncols,
                                        xi, xs, yi, ys, mi);
                });
        }
}

/* ---- activations split into two 16-bit halves ---------------------------------------- */

__global__ void k_split_bf16(const float *x, int64_t xs, int64_t m, int64_t n,
                             __nv_bfloat16 *hi, __nv_bfloat16 *lo)
{
        for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < m * n;
             idx += (int64_t)gridDim.x * blockDim.x) {
                float v = x[idx / n * xs + idx % n];
                __nv_bfloat16 h = __float2bfloat16_rn(v);

                hi[idx] = h;
                lo[idx] = __float2bfloat16_rn(v - __bfloat162float(h));
        }
}

/* One block per row: the row's scale is the power of two just above its
 * largest magnitude (1 for a row of zeros, or one holding Inf/NaN, which
 * then propagate as on the CPU). */
__global__ void __launch_bounds__(256)
k_split_f16(const float *x, int64_t xs, int64_t n, __half *hi, __half *lo, float *scale)
{
        __shared__ float red[32];
        const float *xr = x + blockIdx.x * xs;
        __half *hr = hi + blockIdx.x * n, *lr = lo + blockIdx.x * n;
        float amax = 0.0f, s, inv;
        int bad = 0, e;

        for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
                float v = fabsf(xr[k]);

                bad |= !isfinite(v);
                amax = fmaxf(amax, v);
        }
        bad = __syncthreads_or(bad);
#pragma unroll
        for (int o = 16; o > 0; o /= 2)
                amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        if (threadIdx.x % 32 == 0)
                red[threadIdx.x / 32] = amax;
        __syncthreads();
        amax = 0.0f;
        for (int i = 0; i < (int)blockDim.x / 32; i++)
                amax = fmaxf(amax, red[i]);
        if (bad || amax == 0.0f) {
                s = 1.0f;
                inv = 1.0f;
        } else {
                frexpf(amax, &e);
                s = ldexpf(1.0f, e);
                inv = ldexpf(1.0f, -e);
        }
        for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
                float v = xr[k] * inv; /* exact: a power of two */
                __half h = __float2half_rn(v);

                hr[k] = h;
                lr[k] = __float2half_rn(v - __half2float(h));
        }
        if (threadIdx.x == 0)
                scale[blockIdx.x] = s;
}

__global__ void k_scale_rows(float *y, int64_t ys, int64_t m, int64_t n, const float *scale)
{
        for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < m * n;
             idx += (int64_t)gridDim.x * blockDim.x) {
                int64_t i = idx / n;

                y[i * ys + idx % n] *= scale[i];
        }
}

/* Rows [0, rows) of a quantized weight as dense F16, ncols apart. */
template <int T>
__global__ void k_dequant_f16(const uint8_t *w, size_t row_bytes, int64_t rows, int64_t ncols,
                              __half *tile)
{
        int64_t groups = ncols / 8;

        for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < rows * groups;
             idx += (int64_t)gridDim.x * blockDim.x) {
                int64_t r = idx / groups, g = idx % groups;
                float v[8];
                __align__(16) __half h[8];

                dq8<T>(w + (size_t)r * row_bytes, g * 8, v);
#pragma unroll
                for (int j = 0; j < 8; j++)
                        h[j] = __float2half_rn(v[j]);
                *(uint4 *)(tile + r * ncols + g * 8) = *(const uint4 *)h;
        }
}

/* ---- cuBLAS ------------------------------------------------------------------ */

/* C[m][rows] (ldc apart, row-major) = beta*C + A[rows][n] (lda apart) ·
 * B[m][n]^T (ldb apart): column-major, that is C^T = op_T(A^T) · B^T. */
static bool gemm(struct cuda_ctx *c, int64_t rows, int64_t m, int64_t n, const void *a,
                 cudaDataType at, int64_t lda, const void *b, cudaDataType bt, int64_t ldb,
                 float beta, float *y, int64_t ldc, cublasComputeType_t ct)
{
        float alpha = 1.0f;
        cublasStatus_t s = cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)rows, (int)m,
                                        (int)n, &alpha, a, at, (int)lda, b, bt, (int)ldb, &beta, y,
                                        CUDA_R_32F, (int)ldc, ct, CUBLAS_GEMM_DEFAULT);

        if (s != CUBLAS_STATUS_SUCCESS) {
                cuda_report("matmul", cublasGetStatusString(s));
                return false;
        }
        return true;
}

static bool gemm_split(struct cuda_ctx *c, int64_t rows, int64_t m, int64_t n, const void *a,
                       cudaDataType t, int64_t lda, const void *hi, const void *lo, float *y,
                       int64_t ldc)
{
        return gemm(c, rows, m, n, a, t, lda, hi, t, n, 0.0f, y, ldc, CUBLAS_COMPUTE_32F) &&
               gemm(c, rows, m, n, a, t, lda, lo, t, n, 1.0f, y, ldc, CUBLAS_COMPUTE_32F);
}

static bool matmul_gemm(struct cuda_ctx *c, const mo_weight *w, const char *wdev,
                        const float *x, int64_t xs, float *y, int64_t ys, int64_t m)
{
        int64_t n = w->ncols, R = w->nrows;
        size_t half_bytes = (size_t)(m * n) * 2;
        void *hi, *lo;
        float *scale;

        if (w->type == MO_TYPE_F32)
                return gemm(c, R, m, n, wdev, CUDA_R_32F, (int64_t)(w->row_bytes / 4), x,
                            CUDA_R_32F, xs, 0.0f, y, ys, CUBLAS_COMPUTE_32F_PEDANTIC);
        hi = cuda_scratch(c, &c->act_hi, half_bytes, "matmul");
        lo = cuda_scratch(c, &c->act_lo, half_bytes, "matmul");
        if (!hi || !lo)
                return false;
        if (w->type == MO_TYPE_BF16) {
                k_split_bf16<<<cuda_blocks(m * n, 256), 256, 0, c->stream>>>(
                        x, xs, m, n, (__nv_bfloat16 *)hi, (__nv_bfloat16 *)lo);
                return cuda_launched("matmul") &&
                       gemm_split(c, R, m, n, wdev, CUDA_R_16BF, (int64_t)(w->row_bytes / 2), hi,
                                  lo, y, ys);
        }
        scale = (float *)cuda_scratch(c, &c->act_scale, (size_t)m * sizeof(float), "matmul");
        if (!scale)
                return false;
        k_split_f16<<<(unsigned)m, 256, 0, c->stream>>>(x, xs, n, (__half *)hi, (__half *)lo,
                                                         scale);
        if (!cuda_launched("matmul"))
                return false;
        if (w->type == MO_TYPE_F16) {
                if (!gemm_split(c, R, m, n, wdev, CUDA_R_16F, (int64_t)(w->row_bytes / 2), hi, lo,
                                y, ys))
                        return false;
        } else {
                int64_t rc = CUDA_MAX((int64_t)64, (int64_t)(TILE_BYTES / ((size_t)n * 2)));
                __half *tile;
                bool ok = true;

                rc = CUDA_MIN(rc, R);
                tile = (__half *)cuda_scratch(c, &c->tile, (size_t)(rc * n) * 2, "matmul");
                if (!tile)
                        return false;
                for (int64_t r0 = 0; r0 < R && ok; r0 += rc) {
                        int64_t rows = CUDA_MIN(rc, R - r0);
                        const uint8_t *wr = (const uint8_t *)wdev + (size_t)r0 * w->row_bytes;

                        q_dispatch(w->type, [&]<int T>() {
                                if constexpr (!q_is_float(T))
                                        k_dequant_f16<T><<<cuda_blocks(rows * n / 8, 256), 256, 0,
                                                           c->stream>>>(wr, w->row_bytes, rows, n,
                                                                        tile);
                        });
                        ok = cuda_launched("matmul") &&
                             gemm_split(c, rows, m, n, tile, CUDA_R_16F, n, hi, lo, y + r0, ys);
                }
                if (!ok)
                        return false;
        }
        k_scale_rows<<<cuda_blocks(m * R, 256), 256, 0, c->stream>>>(y, ys, m, R, scale);
        return cuda_launched("matmul");
}

/* ---- the op ------------------------------------------------------------------------ */

void cuda_op_matmul(mo_backend *b, const mo_weight *w, const float *x, int64_t x_stride,
                    float *y, int64_t y_stride, int64_t m)
{
        struct cuda_ctx *c = cuda_ctx_of(b);
        const struct mo_type_info *ti = mo_type_get(w->type);
        size_t dense = ti && ti->computable ? mo_row_bytes(w->type, w->ncols) : 0;
        size_t align = w->type == MO_TYPE_F32 ? 4 : 2;
        const char *wdev;
        bool ok;

        if (m <= 0 || w->nrows <= 0 || !cuda_enter(c, "matmul"))
                return;
        if (dense == 0 || w->row_bytes < dense || (uintptr_t)w->data % align ||
            w->row_bytes % align || w->ncols > INT32_MAX || w->nrows > INT32_MAX) {
                cuda_report("matmul", "weight type, shape or alignment has no kernel");
                cuda_fill_nan(c, y, m, w->nrows, y_stride);
                return;
        }
        wdev = cuda_weight(c, w->data, (size_t)(w->nrows - 1) * w->row_bytes + dense, "matmul");
        if (!wdev) {
                cuda_fill_nan(c, y, m, w->nrows, y_stride);
                return;
        }
        /* cuBLAS needs rows of y (and of x for F32) that do not overlap. */
        if (m <= MV_BATCH || y_stride < w->nrows ||
            (w->type == MO_TYPE_F32 && x_stride < w->ncols) || m > INT32_MAX) {
                matvec(c, w, wdev, x, x_stride, y, y_stride, m);
                ok = cuda_launched("matmul");
        } else {
                ok = matmul_gemm(c, w, wdev, x, x_stride, y, y_stride, m);
        }
        if (!ok)
                cuda_fill_nan(c, y, m, w->nrows, y_stride);
}
