/* cuda-mla.cu: the absorbed MLA attention over the paged latent cache, in
 * the manner of FlashMLA: one thread block per (query, group of heads)
 * walks the sequence's cache rows once, a tile of rows at a time, looking
 * each row up through the block table in the kernel; every head of the
 * group uses each row while it is in shared memory (the heads share the
 * latent rows, so the cache is read once per group, not once per head).
 * Softmax is online (running max and sum, rescaled per tile). When there
 * are too few (query, group) blocks to fill the device, as in decode, the
 * rows are also split across blocks and the partial results merged by a
 * second kernel (flash-decoding). Arithmetic is F32 on the CUDA cores;
 * tensor cores are the next step for speed. */
#include <errno.h>
#include <math.h>

#include "kernels/cuda/cuda-internal.cuh"

#define MLA_THREADS 256
#define MLA_TILE 32   /* cache rows per step: one per lane */
#define MLA_GMAX 16   /* heads per block at most (registers: MLA_GMAX * R) */
#define MLA_MAX_SPLITS 64
#define MLA_MIN_SPLIT 128 /* cache rows per split at least */

struct mla_params {
        const float *q_lat, *q_pe;
        float *out;  /* [n_q][n_head][kl] when n_splits == 1 */
        float *part; /* [n_q][n_head][n_splits][kl + 2] otherwise: acc, max, sum */
        const float *kv;
        const int32_t *bt;
        int64_t n_head, kl, rope, width, wp, bs, pos0, split_tokens;
        int g_per_block, n_groups, n_splits;
        float scale;
};

__device__ __forceinline__ float warp_max(float v)
{
#pragma unroll
        for (int o = 16; o > 0; o /= 2)
                v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
        return v;
}

__device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
        for (int o = 16; o > 0; o /= 2)
                v += __shfl_xor_sync(0xffffffffu, v, o);
        return v;
}

/* Thread tid owns latent columns tid + k*MLA_THREADS (k < R) of every head
 * of the group; shared memory holds the group's queries, one tile of cache
 * rows (rows padded to an odd width so that the 32 rows a warp reads at one
 * column fall in 32 banks) and the tile's scores. */
template <int R>
__global__ void __launch_bounds__(MLA_THREADS) k_mla(struct mla_params p)
{
        extern __shared__ float sm[];
        const int G = p.g_per_block;
        float *qs = sm;                       /* [G][wp] */
        float *tile = qs + G * p.wp;          /* [MLA_TILE][wp] */
        float *ps = tile + MLA_TILE * p.wp;   /* [G][MLA_TILE] */
        float *alpha = ps + G * MLA_TILE, *mrun = alpha + G, *lrun = mrun + G;
        int64_t i = blockIdx.x / p.n_groups, h0 = (int64_t)(blockIdx.x % p.n_groups) * G;
        int gn = (int)min((int64_t)G, p.n_head - h0);
        int64_t n_ctx = p.pos0 + i + 1;
        int64_t t_begin = (int64_t)blockIdx.y * p.split_tokens;
        int64_t t_end = min(n_ctx, t_begin + p.split_tokens);
        int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
        float acc[MLA_GMAX][R];

        for (int64_t idx = tid; idx < gn * p.width; idx += MLA_THREADS) {
                int g = (int)(idx / p.width);
                int64_t k = idx % p.width, qi = i * p.n_head + h0 + g;

                qs[g * p.wp + k] = k < p.kl ? p.q_lat[qi * p.kl + k] : p.q_pe[qi * p.rope + k - p.kl];
        }
        if (tid < gn) {
                mrun[tid] = -INFINITY;
                lrun[tid] = 0.0f;
        }
#pragma unroll
        for (int g = 0; g < MLA_GMAX; g++)
#pragma unroll
                for (int r = 0; r < R; r++)
                        acc[g][r] = 0.0f;

        for (int64_t t0 = t_begin; t0 < t_end; t0 += MLA_TILE) {
                int nt = (int)min((int64_t)MLA_TILE, t_end - t0);

                __syncthreads(); /* the last tile's readers are done */
                for (int t = warp; t < nt; t += MLA_THREADS / 32) {
                        int64_t j = t0 + t;
                        const float *row = p.kv + ((int64_t)p.bt[j / p.bs] * p.bs + j % p.bs) * p.width;

                        for (int64_t k = lane; k < p.width; k += 32)
                                tile[t * p.wp + k] = __ldg(row + k);
                }
                __syncthreads();
                /* Scores: a warp takes one head against the tile's 32 rows. */
                for (int idx = tid; idx < gn * MLA_TILE; idx += MLA_THREADS) {
                        int g = idx / MLA_TILE, t = idx % MLA_TILE;
                        float s = -INFINITY;

                        if (t < nt) {
                                const float *q = qs + g * p.wp, *r = tile + t * p.wp;
                                float d = 0.0f;

                                for (int64_t k = 0; k < p.width; k++)
                                        d += q[k] * r[k];
                                s = d * p.scale;
                        }
                        ps[idx] = s;
                }
                __syncthreads();
                /* Online softmax: rows beyond nt have score -inf and weight 0. */
                for (int g = warp; g < gn; g += MLA_THREADS / 32) {
                        float s = ps[g * MLA_TILE + lane];
                        float m_old = mrun[g], m_new = fmaxf(m_old, warp_max(s));
                        float a = m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
                        float e = s == -INFINITY ? 0.0f : expf(s - m_new);
                        float sum = warp_sum(e);

                        ps[g * MLA_TILE + lane] = e;
                        if (lane == 0) {
                                alpha[g] = a;
                                mrun[g] = m_new;
                                lrun[g] = lrun[g] * a + sum;
                        }
                }
                __syncthreads();
#pragma unroll
                for (int g = 0; g < MLA_GMAX; g++) {
                        if (g < gn) {
                                float a = alpha[g];
#pragma unroll
                                for (int r = 0; r < R; r++)
                                        acc[g][r] *= a;
                        }
                }
                for (int t = 0; t < nt; t++) {
                        float tv[R];

#pragma unroll
                        for (int r = 0; r < R; r++) {
                                int64_t k = tid + r * MLA_THREADS;
                                tv[r] = k < p.kl ? tile[t * p.wp + k] : 0.0f;
                        }
#pragma unroll
                        for (int g = 0; g < MLA_GMAX; g++) {
                                if (g < gn) {
                                        float pg = ps[g * MLA_TILE + t];
#pragma unroll
                                        for (int r = 0; r < R; r++)
                                                acc[g][r] += pg * tv[r];
                                }
                        }
                }
        }
        __syncthreads();

#pragma unroll
        for (int g = 0; g < MLA_GMAX; g++) {
                if (g >= gn)
                        continue;
                int64_t qi = i * p.n_head + h0 + g;

                if (p.n_splits == 1) {
                        float inv = 1.0f / lrun[g];
#pragma unroll
                        for (int r = 0; r < R; r++) {
                                int64_t k = tid + r * MLA_THREADS;
                                if (k < p.kl)
                                        p.out[qi * p.kl + k] = acc[g][r] * inv;
                        }
                } else {
                        float *dst = p.part + (qi * p.n_splits + blockIdx.y) * (p.kl + 2);
#pragma unroll
                        for (int r = 0; r < R; r++) {
                                int64_t k = tid + r * MLA_THREADS;
                                if (k < p.kl)
                                        dst[k] = acc[g][r];
                        }
                        if (tid == 0) {
                                dst[p.kl] = mrun[g];
                                dst[p.kl + 1] = lrun[g];
                        }
                }
        }
}

/* One block per (query, head): merges the splits' partial sums, each
 * weighted by exp(its max - the overall max). A split past the query's
 * last token has max -inf and weight 0. */
__global__ void __launch_bounds__(256)
k_mla_combine(const float *part, int64_t kl, int n_splits, float *out)
{
        __shared__ float ws[MLA_MAX_SPLITS];
        const float *pp = part + (int64_t)blockIdx.x * n_splits * (kl + 2);
        float mx = -INFINITY, l = 0.0f;

        for (int s = 0; s < n_splits; s++)
                mx = fmaxf(mx, pp[s * (kl + 2) + kl]);
        for (int s = 0; s < n_splits; s++) {
                float m = pp[s * (kl + 2) + kl];
                float w = m == -INFINITY ? 0.0f : expf(m - mx);

                l += pp[s * (kl + 2) + kl + 1] * w;
                if (threadIdx.x == 0)
                        ws[s] = w;
        }
        __syncthreads();
        for (int64_t k = threadIdx.x; k < kl; k += blockDim.x) {
                float v = 0.0f;

                for (int s = 0; s < n_splits; s++)
                        v += pp[s * (kl + 2) + k] * ws[s];
                out[(int64_t)blockIdx.x * kl + k] = v / l;
        }
}

static size_t mla_smem(int64_t g, int64_t wp)
{
        return (size_t)((g + MLA_TILE) * wp + g * MLA_TILE + 3 * g) * sizeof(float);
}

int cuda_mla_init(struct cuda_ctx *c, struct moerr *e)
{
        cudaError_t r = cudaFuncSetAttribute(k_mla<1>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             (int)c->smem_optin);

        if (r == cudaSuccess)
                r = cudaFuncSetAttribute(k_mla<2>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)c->smem_optin);
        if (r == cudaSuccess)
                r = cudaFuncSetAttribute(k_mla<4>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)c->smem_optin);
        if (r != cudaSuccess) {
                cudaGetLastError();
                return moerr_set(e, -EIO, "CUDA %d (%s): attention kernels: %s", c->device, c->name,
                                 cudaGetErrorString(r));
        }
        return 0;
}

void cuda_op_mla_attn(mo_backend *b, const mo_mla_args *a)
{
        struct cuda_ctx *c = cuda_ctx_of(b);
        struct mla_params p;
        int64_t n_ctx_max = a->pos0 + a->n_q, base_blocks, n_tables, g;
        size_t smem;

        if (a->n_q <= 0 || a->n_head <= 0 || !cuda_enter(c, "mla_attn"))
                return;
        p.q_lat = a->q_lat;
        p.q_pe = a->q_pe;
        p.out = a->out_lat;
        p.kv = a->kv;
        p.n_head = a->n_head;
        p.kl = a->kv_lora;
        p.rope = a->rope;
        p.width = a->kv_lora + a->rope;
        p.wp = p.width | 1;
        p.bs = a->block_tokens;
        p.pos0 = a->pos0;
        p.scale = a->scale;
        g = CUDA_MIN((int64_t)MLA_GMAX, a->n_head);
        while (g > 1 && mla_smem(g, p.wp) > c->smem_optin)
                g--;
        smem = mla_smem(g, p.wp);
        if (p.kl <= 0 || p.kl > 4 * MLA_THREADS || p.rope < 0 || p.bs <= 0 || a->pos0 < 0 ||
            smem > c->smem_optin) {
                cuda_report("mla_attn", "shape has no kernel (kv_lora above 1024, or rows too wide)");
                cuda_fill_nan(c, a->out_lat, a->n_q * a->n_head, a->kv_lora, a->kv_lora);
                return;
        }
        /* Even groups: 20 heads run as 10 + 10, not 16 + 4. */
        p.n_groups = (int)((a->n_head + g - 1) / g);
        p.g_per_block = (int)((a->n_head + p.n_groups - 1) / p.n_groups);
        smem = mla_smem(p.g_per_block, p.wp);
        n_tables = (n_ctx_max + p.bs - 1) / p.bs;
        p.bt = (const int32_t *)cuda_stage(c, a->block_table, (size_t)n_tables * sizeof(int32_t),
                                           "mla_attn");
        if (!p.bt) {
                cuda_fill_nan(c, a->out_lat, a->n_q * a->n_head, a->kv_lora, a->kv_lora);
                return;
        }
        base_blocks = a->n_q * p.n_groups;
        p.n_splits = 1;
        if (base_blocks < 2 * (int64_t)c->sm_count) {
                int64_t want = (2 * (int64_t)c->sm_count + base_blocks - 1) / base_blocks;
                int64_t most = CUDA_MAX((int64_t)1, n_ctx_max / MLA_MIN_SPLIT);

                p.n_splits = (int)CUDA_MIN(CUDA_MIN(want, most), (int64_t)MLA_MAX_SPLITS);
        }
        p.split_tokens = (n_ctx_max + p.n_splits - 1) / p.n_splits;
        p.split_tokens = (p.split_tokens + MLA_TILE - 1) / MLA_TILE * MLA_TILE;
        p.n_splits = (int)((n_ctx_max + p.split_tokens - 1) / p.split_tokens);
        p.part = NULL;
        if (p.n_splits > 1) {
                p.part = (float *)cuda_scratch(c, &c->mla_part,
                                               (size_t)(a->n_q * a->n_head * p.n_splits) *
                                                       (size_t)(p.kl + 2) * sizeof(float),
                                               "mla_attn");
                if (!p.part) {
                        cuda_fill_nan(c, a->out_lat, a->n_q * a->n_head, a->kv_lora, a->kv_lora);
                        return;
                }
        }
        if (base_blocks > INT32_MAX) {
                cuda_report("mla_attn", "too many queries for one launch");
                cuda_fill_nan(c, a->out_lat, a->n_q * a->n_head, a->kv_lora, a->kv_lora);
                return;
        }
        dim3 grid((unsigned)base_blocks, (unsigned)p.n_splits);
        if (p.kl <= MLA_THREADS)
                k_mla<1><<<grid, MLA_THREADS, smem, c->stream>>>(p);
        else if (p.kl <= 2 * MLA_THREADS)
                k_mla<2><<<grid, MLA_THREADS, smem, c->stream>>>(p);
        else
                k_mla<4><<<grid, MLA_THREADS, smem, c->stream>>>(p);
        if (!cuda_launched("mla_attn")) {
                cuda_fill_nan(c, a->out_lat, a->n_q * a->n_head, a->kv_lora, a->kv_lora);
                return;
        }
        if (p.n_splits > 1) {
                k_mla_combine<<<(unsigned)(a->n_q * a->n_head), 256, 0, c->stream>>>(
                        p.part, p.kl, p.n_splits, a->out_lat);
                cuda_launched("mla_attn");
        }
}
