/* cuda-ops.cu: the CUDA backend's embedding lookup, RMSNorm, RoPE,
 * SwiGLU, add and row movement. Each computes its floats with the CPU
 * backend's operations in the same order, rounded the same (explicit
 * round-to-nearest intrinsics where nvcc would fuse a multiply-add), so
 * the results equal the CPU's or differ only by the device's expf/sinf/
 * cosf (within 2 ulp) and summation order. */
#include <errno.h>

#include "kernels/cuda/cuda-quant.cuh"

/* ---- embedding rows ---------------------------------------------------------- */

/* One block per requested row; an id outside the table gives a NaN row, as
 * on the CPU. */
template <int T>
__global__ void k_get_rows(const uint8_t *w, size_t row_bytes, int64_t nrows, int64_t ncols,
                           const int32_t *ids, float *y)
{
        int32_t id = ids[blockIdx.x];
        float *dst = y + blockIdx.x * ncols;
        const uint8_t *row = w + (size_t)id * row_bytes;
        int64_t groups = ncols / 8;

        if (id < 0 || id >= nrows) {
                for (int64_t k = threadIdx.x; k < ncols; k += blockDim.x)
                        dst[k] = __int_as_float(0x7fc00000);
                return;
        }
        for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
                float v[8];

                dq8<T>(row, g * 8, v);
#pragma unroll
                for (int j = 0; j < 8; j++)
                        dst[g * 8 + j] = v[j];
        }
        if (q_is_float(T))
                for (int64_t k = groups * 8 + threadIdx.x; k < ncols; k += blockDim.x)
                        dst[k] = q_elem<T>(row, k);
}

void cuda_op_get_rows(mo_backend *b, const mo_weight *w, const int32_t *ids, int64_t n, float *y)
{
        struct cuda_ctx *c = cuda_ctx_of(b);
        const struct mo_type_info *t = mo_type_get(w->type);
        size_t dense = t && t->computable ? mo_row_bytes(w->type, w->ncols) : 0;
        size_t align = w->type == MO_TYPE_F32 ? 4 : 2;
        const int32_t *dids;
        const char *wdev;

        if (n <= 0 || !cuda_enter(c, "get_rows"))
                return;
        if (dense == 0 || w->nrows <= 0 || w->row_bytes < dense || (uintptr_t)w->data % align ||
            w->row_bytes % align || n > INT32_MAX) {
                cuda_report("get_rows", "weight type, shape or alignment has no kernel");
                cuda_fill_nan(c, y, n, w->ncols, w->ncols);
                return;
        }
        wdev = cuda_weight(c, w->data, (size_t)(w->nrows - 1) * w->row_bytes + dense, "get_rows");
        dids = (const int32_t *)cuda_stage(c, ids, (size_t)n * sizeof *ids, "get_rows");
        if (!wdev || !dids) {
                cuda_fill_nan(c, y, n, w->ncols, w->ncols);
                return;
        }
        q_dispatch(w->type, [&]<int T>() {
                k_get_rows<T><<<(unsigned)n, 128, 0, c->stream>>>(
                        (const uint8_t *)wdev, w->row_bytes, w->nrows, w->ncols, dids, y);
        });
        cuda_launched("get_rows");
}

/* ---- RMSNorm ------------------------------------------------------------------ */

__device__ __forceinline__ double block_sum(double v, double *red)
{
#pragma unroll
        for (int o = 16; o > 0; o /= 2)
                v += __shfl_xor_sync(0xffffffffu, v, o);
        if (threadIdx.x % 32 == 0)
                red[threadIdx.x / 32] = v;
        __syncthreads();
        v = 0;
        for (int i = 0; i < (int)blockDim.x / 32; i++)
                v += red[i];
        return v;
}

/* As the CPU (and ggml): squares in float, summed in double; y = (x *
 * scale) * g. One block per row; each thread reads and writes only its own
 * elements after the sum, so y may be x. */
__global__ void __launch_bounds__(256)
k_rmsnorm(const float *x, int64_t xs, const float *g, int64_t n, float eps, float *y, int64_t ys)
{
        __shared__ double red[32];
        const float *xr = x + blockIdx.x * xs;
        float *yr = y + blockIdx.x * ys;
        double sum = 0;
        float mean, scale;

        for (int64_t k = threadIdx.x; k < n; k += blockDim.x)
                sum += (double)__fmul_rn(xr[k], xr[k]);
        sum = block_sum(sum, red);
        mean = (float)(sum / (double)n);
        scale = 1.0f / sqrtf(mean + eps);
        for (int64_t k = threadIdx.x; k < n; k += blockDim.x)
                yr[k] = __fmul_rn(__fmul_rn(xr[k], scale), g[k]);
}

void cuda_op_rmsnorm(mo_backend *b, const float *x, int64_t x_stride, const float *g, int64_t n,
                     int64_t m, float eps, float *y, int64_t y_stride)
{
        struct cuda_ctx *c = cuda_ctx_of(b);
        const float *dg;

        if (n <= 0 || m <= 0 || !cuda_enter(c, "rmsnorm"))
                return;
        /* The gains are weights: host memory of the model, kept on the
         * device like the others (or already device memory). */
        dg = (const float *)cuda_weight(c, g, (size_t)n * sizeof *g, "rmsnorm");
        if (!dg || m > INT32_MAX) {
                cuda_fill_nan(c, y, m, n, y_stride);
                return;
        }
        k_rmsnorm<<<(unsigned)m, 256, 0, c->stream>>>(x, x_stride, dg, n, eps, y, y_stride);
        cuda_launched("rmsnorm");
}

/* ---- RoPE -------------------------------------------------------------------- */

/* One thread per (token, head, pair): theta and its cosine and sine as the
 * CPU forms them (theta = (float)pos * freq, both scaled by mscale), then
 * the rotation with each product rounded before the sum. */
__global__ void k_rope(float *x, int64_t m, int64_t n_head, int64_t row_stride,
                       int64_t head_stride, int64_t half, const int32_t *pos, const float *freq,
                       float mscale)
{
        for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
             idx < m * n_head * half; idx += (int64_t)gridDim.x * blockDim.x) {
                int64_t p = idx % half, h = idx / half % n_head, i = idx / half / n_head;
                float theta = __fmul_rn((float)pos[i], freq[p]);
                float sn, cs;
                float *v = x + i * row_stride + h * head_stride + 2 * p;

                sincosf(theta, &sn, &cs);
                cs = __fmul_rn(cs, mscale);
                sn = __fmul_rn(sn, mscale);
                float x0 = v[0], x1 = v[1];
                v[0] = __fsub_rn(__fmul_rn(x0, cs), __fmul_rn(x1, sn));
                v[1] = __fadd_rn(__fmul_rn(x0, sn), __fmul_rn(x1, cs));
        }
}

void cuda_op_rope(mo_backend *b, float *x, int64_t m, int64_t n_head, int64_t row_stride,
                  int64_t head_stride, const int32_t *pos, const mo_rope *r)
{
        struct cuda_ctx *c = cuda_ctx_of(b);
        int64_t half = r->n_dims / 2;
        const int32_t *dpos;
        const float *dfreq;

        if (m <= 0 || n_head <= 0 || half <= 0 || !cuda_enter(c, "rope"))
                return;
        dpos = (const int32_t *)cuda_stage(c, pos, (size_t)m * sizeof *pos, "rope");
        dfreq = (const float *)cuda_stage(c, r->freq, (size_t)half * sizeof *r->freq, "rope");
        if (!dpos || !dfreq) {
                for (int64_t i = 0; i < m; i++)
                        cuda_fill_nan(c, x + i * row_stride, n_head, r->n_dims, head_stride);
                return;
        }
        k_rope<<<cuda_blocks(m * n_head * half, 256), 256, 0, c->stream>>>(
                x, m, n_head, row_stride, head_stride, half, dpos, dfreq, r->mscale);
        cuda_launched("rope");
}

/* ---- element-wise -------------------------------------------------------------- */

__global__ void k_swiglu(const float *gate, const float *up, float *out, int64_t n)
{
        for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n;
             k += (int64_t)gridDim.x * blockDim.x) {
                float g = gate[k];

                out[k] = __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), up[k]);
        }
}

void cuda_op_swiglu(mo_backend *b, const float *gate, const float *up, float *out, int64_t n)
{
        struct cuda_ctx *c = cuda_ctx_of(b);

        if (n <= 0 || !cuda_enter(c, "swiglu"))
                return;
        k_swiglu<<<cuda_blocks(n, 256), 256, 0, c->stream>>>(gate, up, out, n);
        cuda_launched("swiglu");
}

__global__ void k_add(float *y, const float *x, int64_t n)
{
        for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n;
             k += (int64_t)gridDim.x * blockDim.x)
                y[k] = __fadd_rn(y[k], x[k]);
}

void cuda_op_add(mo_backend *b, float *y, const float *x, int64_t n)
{
        struct cuda_ctx *c = cuda_ctx_of(b);

        if (n <= 0 || !cuda_enter(c, "add"))
                return;
        k_add<<<cuda_blocks(n, 256), 256, 0, c->stream>>>(y, x, n);
        cuda_launched("add");
}

/* ---- row movement ---------------------------------------------------------------- */

__global__ void k_gather(const float *src, int64_t dim, const int32_t *rows, float *dst)
{
        const float *s = src + (int64_t)rows[blockIdx.x] * dim;
        float *d = dst + blockIdx.x * dim;

        for (int64_t k = threadIdx.x; k < dim; k += blockDim.x)
                d[k] = s[k];
}

void cuda_op_gather_rows(mo_backend *b, const float *src, int64_t dim, const int32_t *rows,
                         int64_t n, float *dst)
{
        struct cuda_ctx *c = cuda_ctx_of(b);
        const int32_t *drows;

        if (n <= 0 || dim <= 0 || !cuda_enter(c, "gather_rows"))
                return;
        drows = (const int32_t *)cuda_stage(c, rows, (size_t)n * sizeof *rows, "gather_rows");
        if (!drows || n > INT32_MAX) {
                cuda_fill_nan(c, dst, n, dim, dim);
                return;
        }
        k_gather<<<(unsigned)n, 256, 0, c->stream>>>(src, dim, drows, dst);
        cuda_launched("gather_rows");
}

/* One thread per column, adding the rows' terms in index order: a
 * destination row may repeat, and every column then sums exactly as the
 * CPU's does. */
__global__ void k_scatter_add(const float *src, int64_t dim, const int32_t *rows, const float *w,
                              int64_t n, float *dst)
{
        int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;

        if (k >= dim)
                return;
        for (int64_t i = 0; i < n; i++) {
                float *d = dst + (int64_t)rows[i] * dim + k;

                *d = __fadd_rn(*d, __fmul_rn(w[i], src[i * dim + k]));
        }
}

void cuda_op_scatter_add_rows(mo_backend *b, const float *src, int64_t dim, const int32_t *rows,
                              const float *w, int64_t n, float *dst)
{
        struct cuda_ctx *c = cuda_ctx_of(b);
        const int32_t *drows;
        const float *dw;

        if (n <= 0 || dim <= 0 || !cuda_enter(c, "scatter_add_rows"))
                return;
        drows = (const int32_t *)cuda_stage(c, rows, (size_t)n * sizeof *rows, "scatter_add_rows");
        dw = (const float *)cuda_stage(c, w, (size_t)n * sizeof *w, "scatter_add_rows");
        if (!drows || !dw)
                return; /* reported; dst keeps what it had */
        k_scatter_add<<<cuda_blocks(dim, 128), 128, 0, c->stream>>>(src, dim, drows, dw, n, dst);
        cuda_launched("scatter_add_rows");
}
