/* cuda-backend.cu: the CUDA backend's context (device, stream, cuBLAS
 * handle), its memory ops, the staging ring for host index arrays, the
 * weight map (host address -> device copy) with the up-front upload, and
 * device discovery. The compute ops live in cuda-matmul.cu, cuda-ops.cu and
 * cuda-mla.cu. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>

#include "kernels/cuda/cuda-internal.cuh"

#define RING_BYTES (1u << 20)
#define UPLOAD_CHUNK ((size_t)64 << 20)
/* Device memory left free after the weights: cuBLAS workspace, the
 * activations and the KV cache are allocated later and need room. */
#define WEIGHT_RESERVE ((size_t)512 << 20)
#define GIB (1024.0 * 1024.0 * 1024.0)

/* ---- errors ------------------------------------------------------------------ */

void cuda_report(const char *op, const char *why)
{
        static std::atomic<bool> said(false);

        if (!said.exchange(true))
                fprintf(stderr, "moed cuda backend: %s failed: %s (output set to NaN)\n", op, why);
}

bool cuda_check(const char *op, cudaError_t r)
{
        if (r == cudaSuccess)
                return true;
        cudaGetLastError();
        cuda_report(op, cudaGetErrorString(r));
        return false;
}

bool cuda_launched(const char *op)
{
        return cuda_check(op, cudaGetLastError());
}

bool cuda_enter(struct cuda_ctx *c, const char *op)
{
        return cuda_check(op, cudaSetDevice(c->device));
}

static int cuda_err(struct moerr *e, int r, cudaError_t cr, const char *fmt, ...)
        __attribute__((format(printf, 4, 5)));

/* moerr_set with the CUDA error appended: "what: cudaErrorMemoryAllocation". */
static int cuda_err(struct moerr *e, int r, cudaError_t cr, const char *fmt, ...)
{
        char what[256];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(what, sizeof what, fmt, ap);
        va_end(ap);
        cudaGetLastError();
        return moerr_set(e, r, "%s: %s", what, cudaGetErrorString(cr));
}

/* ---- scratch ------------------------------------------------------------------ */

void *cuda_scratch(struct cuda_ctx *c, struct cuda_buf *s, size_t bytes, const char *op)
{
        void *p = NULL;

        if (bytes <= s->size && s->p)
                return s->p;
        bytes = (CUDA_MAX(bytes, (size_t)1) + 4095) / 4096 * 4096;
        /* The old buffer may still be read by queued kernels. */
        if (!cuda_check(op, cudaStreamSynchronize(c->stream)))
                return NULL;
        cuda_buf_release(s);
        if (!cuda_check(op, cudaMalloc(&p, bytes)))
                return NULL;
        s->p = p;
        s->size = bytes;
        return p;
}

void cuda_buf_release(struct cuda_buf *s)
{
        if (s->p)
                cudaFree(s->p);
        s->p = NULL;
        s->size = 0;
}

__global__ void k_fill_nan(float *y, int64_t m, int64_t n, int64_t stride)
{
        for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < m * n;
             i += (int64_t)gridDim.x * blockDim.x)
                y[i / n * stride + i % n] = __int_as_float(0x7fc00000);
}

void cuda_fill_nan(struct cuda_ctx *c, float *y, int64_t m, int64_t n, int64_t stride)
{
        if (m <= 0 || n <= 0 || !y)
                return;
        k_fill_nan<<<cuda_blocks(m * n, 256), 256, 0, c->stream>>>(y, m, n, stride);
        cudaGetLastError();
}

int cuda_kernels_check(struct cuda_ctx *c, struct moerr *e)
{
        struct cudaFuncAttributes attr;
        cudaError_t r = cudaFuncGetAttributes(&attr, k_fill_nan);

        if (r == cudaSuccess)
                return 0;
        cudaGetLastError();
        return moerr_set(e, -ENODEV,
                         "CUDA %d (%s): this build has no kernels it can run (built for sm_80, "
                         "sm_90 and compute_90 PTX): %s",
                         c->device, c->name, cudaGetErrorString(r));
}

/* ---- staging of host index arrays ------------------------------------------------ */

static void ring_release(struct cuda_ctx *c)
{
        if (c->pin)
                cudaFreeHost(c->pin);
        if (c->dring)
                cudaFree(c->dring);
        c->pin = c->dring = NULL;
        c->ring_size = 0;
}

static bool ring_alloc(struct cuda_ctx *c, size_t bytes, const char *op)
{
        void *pin = NULL, *dev = NULL;

        if (!cuda_check(op, cudaMallocHost(&pin, bytes)))
                return false;
        if (!cuda_check(op, cudaMalloc(&dev, bytes))) {
                cudaFreeHost(pin);
                return false;
        }
        c->pin = (char *)pin;
        c->dring = (char *)dev;
        c->ring_size = bytes;
        c->ring_head = 0;
        c->ring_half = 0;
        return true;
}

const void *cuda_stage(struct cuda_ctx *c, const void *host, size_t bytes, const char *op)
{
        size_t need = (CUDA_MAX(bytes, (size_t)1) + 255) / 256 * 256, half;
        char *dst;

        if (need > c->ring_size / 2) {
                size_t size = c->ring_size;

                while (need > size / 2)
                        size *= 2;
                if (!cuda_check(op, cudaStreamSynchronize(c->stream)))
                        return NULL;
                ring_release(c);
                if (!ring_alloc(c, size, op))
                        return NULL;
        }
        half = c->ring_size / 2;
        if (c->ring_head + need > (size_t)(c->ring_half + 1) * half) {
                /* Move to the other half once the copies queued out of it
                 * (when we last left it) have run; they were queued long
                 * ago, so this rarely waits. */
                if (!cuda_check(op, cudaEventRecord(c->fence[c->ring_half], c->stream)))
                        return NULL;
                c->ring_half ^= 1;
                if (!cuda_check(op, cudaEventSynchronize(c->fence[c->ring_half])))
                        return NULL;
                c->ring_head = (size_t)c->ring_half * half;
        }
        dst = c->pin + c->ring_head;
        if (bytes)
                memcpy(dst, host, bytes);
        if (bytes && !cuda_check(op, cudaMemcpyAsync(c->dring + c->ring_head, dst, bytes,
                                                     cudaMemcpyHostToDevice, c->stream)))
                return NULL;
        dst = c->dring + c->ring_head;
        c->ring_head += need;
        return dst;
}

/* ---- memory ops ------------------------------------------------------------------ */

static void *cuda_alloc(mo_backend *b, size_t bytes)
{
        struct cuda_ctx *c = cuda_ctx_of(b);
        void *p = NULL;

        if (!cuda_enter(c, "alloc"))
                return NULL;
        bytes = CUDA_MAX(bytes, (size_t)1);
        if (cudaMalloc(&p, bytes) != cudaSuccess) {
                cudaGetLastError(); /* out of memory is the caller's to report */
                return NULL;
        }
        if (!cuda_check("alloc", cudaMemsetAsync(p, 0, bytes, c->stream))) {
                cudaFree(p);
                return NULL;
        }
        return p;
}

static void cuda_free(mo_backend *b, void *p)
{
        struct cuda_ctx *c = cuda_ctx_of(b);

        if (!p || !cuda_enter(c, "free"))
                return;
        /* Queued kernels may still use it. */
        cuda_check("free", cudaStreamSynchronize(c->stream));
        cuda_check("free", cudaFree(p));
}

static void cuda_upload(mo_backend *b, void *dst, const void *src, size_t bytes)
{
        struct cuda_ctx *c = cuda_ctx_of(b);
        const void *staged;

        if (!bytes || !cuda_enter(c, "upload"))
                return;
        /* Small copies go through the pinned ring and stay asynchronous; a
         * large one waits, so src may be reused when this returns either way. */
        if (bytes <= RING_BYTES / 4) {
                staged = cuda_stage(c, src, bytes, "upload");
                if (staged)
                        cuda_check("upload", cudaMemcpyAsync(dst, staged, bytes,
                                                             cudaMemcpyDeviceToDevice, c->stream));
                return;
        }
        if (cuda_check("upload", cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice,
                                                 c->stream)))
                cuda_check("upload", cudaStreamSynchronize(c->stream));
}

static void cuda_download(mo_backend *b, void *dst, const void *src, size_t bytes)
{
        struct cuda_ctx *c = cuda_ctx_of(b);

        if (!bytes || !cuda_enter(c, "download"))
                return;
        if (!cuda_check("download", cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost,
                                                    c->stream)) ||
            !cuda_check("download", cudaStreamSynchronize(c->stream)))
                memset(dst, 0xff, bytes); /* all-ones floats are NaN */
}

static void cuda_zero(mo_backend *b, void *dst, size_t bytes)
{
        struct cuda_ctx *c = cuda_ctx_of(b);

        if (bytes && cuda_enter(c, "zero"))
                cuda_check("zero", cudaMemsetAsync(dst, 0, bytes, c->stream));
}

/* memmove semantics, as the CPU backend: an overlapping copy goes through
 * scratch. */
static void cuda_copy(mo_backend *b, void *dst, const void *src, size_t bytes)
{
        struct cuda_ctx *c = cuda_ctx_of(b);
        uintptr_t d = (uintptr_t)dst, s = (uintptr_t)src;
        void *tmp;

        if (!bytes || dst == src || !cuda_enter(c, "copy"))
                return;
        if (d < s + bytes && s < d + bytes) {
                tmp = cuda_scratch(c, &c->tmp, bytes, "copy");
                if (!tmp)
                        return;
                cuda_check("copy", cudaMemcpyAsync(tmp, src, bytes, cudaMemcpyDeviceToDevice,
                                                   c->stream));
                src = tmp;
        }
        cuda_check("copy", cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, c->stream));
}

static void cuda_sync(mo_backend *b)
{
        struct cuda_ctx *c = cuda_ctx_of(b);

        if (cuda_enter(c, "sync"))
                cuda_check("sync", cudaStreamSynchronize(c->stream));
}

/* ---- the weight map ------------------------------------------------------------------ */

static size_t slot_hash(uintptr_t key, size_t cap)
{
        return (size_t)(((uint64_t)key >> 4) * 0x9e3779b97f4a7c15ull >> 20) & (cap - 1);
}

static struct cuda_slot *slot_find(struct cuda_ctx *c, uintptr_t key)
{
        if (!c->cap_slots)
                return NULL;
        for (size_t i = slot_hash(key, c->cap_slots);; i = (i + 1) & (c->cap_slots - 1)) {
                struct cuda_slot *s = &c->slots[i];

                if (s->key == key)
                        return s;
                if (!s->key)
                        return NULL;
        }
}

static bool slot_put(struct cuda_ctx *c, uintptr_t key, char *dev, size_t avail)
{
        struct cuda_slot *s;

        if ((c->n_slots + 1) * 2 > c->cap_slots) {
                size_t cap = c->cap_slots ? c->cap_slots * 2 : 1024;
                struct cuda_slot *old = c->slots;
                size_t old_cap = c->cap_slots;
                struct cuda_slot *fresh = (struct cuda_slot *)calloc(cap, sizeof *fresh);

                if (!fresh)
                        return false;
                c->slots = fresh;
                c->cap_slots = cap;
                c->n_slots = 0;
                for (size_t i = 0; i < old_cap; i++)
                        if (old[i].key)
                                slot_put(c, old[i].key, old[i].dev, old[i].avail);
                free(old);
        }
        s = slot_find(c, key);
        if (!s) {
                size_t i = slot_hash(key, c->cap_slots);

                while (c->slots[i].key)
                        i = (i + 1) & (c->cap_slots - 1);
                s = &c->slots[i];
                s->key = key;
                c->n_slots++;
        }
        s->dev = dev;
        s->avail = avail;
        return true;
}

/* The uploaded range containing [p, p + bytes), or NULL. Ranges are
 * sorted by host address and do not contain one another (uploads skip
 * what is already there). */
static const struct cuda_range *range_find(const struct cuda_ctx *c, uintptr_t p, size_t bytes)
{
        size_t lo = 0, hi = c->n_ranges;

        while (lo < hi) { /* first range starting after p */
                size_t mid = (lo + hi) / 2;

                if (c->ranges[mid].host <= p)
                        lo = mid + 1;
                else
                        hi = mid;
        }
        for (size_t i = lo; i-- > 0;) {
                const struct cuda_range *r = &c->ranges[i];

                if (p - r->host <= r->bytes && bytes <= r->bytes - (p - r->host))
                        return r;
                if (lo - i >= 4) /* partial overlaps are rare; stop early */
                        break;
        }
        return NULL;
}

static int range_cmp(const void *a, const void *b)
{
        uintptr_t x = ((const struct cuda_range *)a)->host, y = ((const struct cuda_range *)b)->host;

        return x < y ? -1 : x > y;
}

static bool push_alloc(struct cuda_ctx *c, void *p)
{
        if (c->n_allocs == c->cap_allocs) {
                size_t cap = c->cap_allocs ? c->cap_allocs * 2 : 16;
                void **a = (void **)realloc(c->allocs, cap * sizeof *a);

                if (!a)
                        return false;
                c->allocs = a;
                c->cap_allocs = cap;
        }
        c->allocs[c->n_allocs++] = p;
        return true;
}

static bool push_ranges(struct cuda_ctx *c, size_t n)
{
        if (c->n_ranges + n > c->cap_ranges) {
                size_t cap = CUDA_MAX(c->cap_ranges * 2, c->n_ranges + n + 64);
                struct cuda_range *r = (struct cuda_range *)realloc(c->ranges, cap * sizeof *r);

                if (!r)
                        return false;
                c->ranges = r;
                c->cap_ranges = cap;
        }
        return true;
}

/* Copies host memory to the device through two pinned buffers, so the
 * reads of the mapped file (page faults, disk) overlap the transfers. */
struct uploader {
        struct cuda_ctx *c;
        char *pin[2];
        cudaEvent_t ev[2];
        int next;
        uint64_t done, total;
        mo_cuda_progress_fn progress;
        void *userdata;
};

static int uploader_copy(struct uploader *u, char *dev, const char *host, size_t bytes,
                         struct moerr *e)
{
        cudaError_t r;

        for (size_t off = 0; off < bytes; off += UPLOAD_CHUNK) {
                size_t n = CUDA_MIN(UPLOAD_CHUNK, bytes - off);
                int k = u->next;

                u->next ^= 1;
                r = cudaEventSynchronize(u->ev[k]);
                if (r != cudaSuccess)
                        return cuda_err(e, -EIO, r, "CUDA %d: copying weights", u->c->device);
                memcpy(u->pin[k], host + off, n);
                r = cudaMemcpyAsync(dev + off, u->pin[k], n, cudaMemcpyHostToDevice, u->c->stream);
                if (r == cudaSuccess)
                        r = cudaEventRecord(u->ev[k], u->c->stream);
                if (r != cudaSuccess)
                        return cuda_err(e, -EIO, r, "CUDA %d: copying weights", u->c->device);
                u->done += n;
                if (u->progress)
                        u->progress(u->userdata, u->done, u->total);
        }
        return 0;
}

static int upload_regions(struct cuda_ctx *c, const struct mo_cuda_region *reg, size_t n,
                          mo_cuda_progress_fn progress, void *userdata, struct moerr *e)
{
        struct uploader u = { c, { NULL, NULL }, { NULL, NULL }, 0, 0, 0, progress, userdata };
        size_t total = 0, free_b = 0, total_b = 0, off = 0, first = c->n_ranges;
        bool *skip = (bool *)calloc(CUDA_MAX(n, (size_t)1), sizeof *skip);
        char *base = NULL;
        cudaError_t r;
        int ret = 0;

        if (!skip)
                return moerr_set(e, -ENOMEM, "out of memory");
        for (size_t i = 0; i < n; i++) {
                skip[i] = !reg[i].bytes || range_find(c, (uintptr_t)reg[i].host, reg[i].bytes);
                if (!skip[i]) {
                        total += reg[i].bytes + 256; /* alignment kept from the host */
                        u.total += reg[i].bytes;
                }
        }
        if (!total)
                goto out;
        r = cudaMemGetInfo(&free_b, &total_b);
        if (r != cudaSuccess) {
                ret = cuda_err(e, -EIO, r, "CUDA %d (%s): reading free memory", c->device, c->name);
                goto out;
        }
        if (total + WEIGHT_RESERVE > free_b) {
                ret = moerr_set(e, -ENOMEM,
                                "weights need %.2f GiB on CUDA %d (%s) plus %.1f GiB of working "
                                "room, but only %.2f GiB of its %.2f GiB is free",
                                (double)u.total / GIB, c->device, c->name,
                                (double)WEIGHT_RESERVE / GIB, (double)free_b / GIB,
                                (double)total_b / GIB);
                goto out;
        }
        r = cudaMalloc((void **)&base, total);
        if (r != cudaSuccess) {
                ret = cuda_err(e, -ENOMEM, r, "CUDA %d (%s): allocating %.2f GiB for weights",
                               c->device, c->name, (double)total / GIB);
                goto out;
        }
        if (!push_alloc(c, base) || !push_ranges(c, n)) {
                if (c->n_allocs == 0 || c->allocs[c->n_allocs - 1] != base)
                        cudaFree(base);
                ret = moerr_set(e, -ENOMEM, "out of memory");
                goto out;
        }
        c->weight_bytes += total;
        for (int k = 0; k < 2; k++) {
                size_t chunk = CUDA_MIN(UPLOAD_CHUNK, u.total);

                r = cudaMallocHost((void **)&u.pin[k], chunk);
                if (r == cudaSuccess)
                        r = cudaEventCreateWithFlags(&u.ev[k], cudaEventDisableTiming);
                if (r != cudaSuccess) {
                        ret = cuda_err(e, -ENOMEM, r, "CUDA %d: staging buffers", c->device);
                        goto out;
                }
        }
        for (size_t i = 0; i < n && ret == 0; i++) {
                uintptr_t h = (uintptr_t)reg[i].host;
                char *dev;

                if (skip[i])
                        continue;
                /* The copy keeps the host address's offset within 256
                 * bytes, so a view is as aligned on the device as on the
                 * host. */
                off += ((h & 255) - ((uintptr_t)(base + off) & 255)) & 255;
                dev = base + off;
                c->ranges[c->n_ranges++] = (struct cuda_range){ h, reg[i].bytes, dev };
                ret = uploader_copy(&u, dev, (const char *)reg[i].host, reg[i].bytes, e);
                off += reg[i].bytes;
        }
        if (ret == 0) {
                r = cudaStreamSynchronize(c->stream);
                if (r != cudaSuccess)
                        ret = cuda_err(e, -EIO, r, "CUDA %d: copying weights", c->device);
        }
        if (ret < 0)
                c->n_ranges = first; /* the allocation stays until release */
        qsort(c->ranges, c->n_ranges, sizeof *c->ranges, range_cmp);
out:
        for (int k = 0; k < 2; k++) {
                if (u.ev[k]) {
                        cudaEventSynchronize(u.ev[k]);
                        cudaEventDestroy(u.ev[k]);
                }
                if (u.pin[k])
                        cudaFreeHost(u.pin[k]);
        }
        free(skip);
        return ret;
}

const char *cuda_weight(struct cuda_ctx *c, const void *host, size_t bytes, const char *op)
{
        uintptr_t key = (uintptr_t)host;
        struct cuda_slot *s = slot_find(c, key);
        const struct cuda_range *r;
        struct cudaPointerAttributes attr;
        struct mo_cuda_region reg = { host, bytes };
        struct moerr e = { { 0 } };

        if (s && bytes <= s->avail)
                return s->dev;
        r = range_find(c, key, bytes);
        if (!r) {
                if (cudaPointerGetAttributes(&attr, host) == cudaSuccess &&
                    (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged)) {
                        slot_put(c, key, (char *)host, bytes);
                        return (const char *)host;
                }
                cudaGetLastError();
                if (upload_regions(c, &reg, 1, NULL, NULL, &e) < 0) {
                        cuda_report(op, e.msg);
                        return NULL;
                }
                r = range_find(c, key, bytes);
                if (!r) {
                        cuda_report(op, "weight upload lost its range");
                        return NULL;
                }
        }
        slot_put(c, key, r->dev + (key - r->host), r->bytes - (key - r->host));
        return r->dev + (key - r->host);
}

static void release_weights(struct cuda_ctx *c)
{
        cudaSetDevice(c->device);
        cudaStreamSynchronize(c->stream);
        for (size_t i = 0; i < c->n_allocs; i++)
                cudaFree(c->allocs[i]);
        free(c->allocs);
        free(c->ranges);
        free(c->slots);
        c->allocs = NULL;
        c->ranges = NULL;
        c->slots = NULL;
        c->n_allocs = c->cap_allocs = c->n_ranges = c->cap_ranges = 0;
        c->n_slots = c->cap_slots = 0;
        c->weight_bytes = 0;
}

/* ---- construction ------------------------------------------------------------------ */

static void cuda_destroy(mo_backend *b)
{
        struct cuda_ctx *c = cuda_ctx_of(b);
        struct cuda_buf *bufs[] = { &c->act_hi, &c->act_lo, &c->act_scale, &c->tile,
                                    &c->mla_part, &c->tmp };

        release_weights(c);
        for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
                cuda_buf_release(bufs[i]);
        ring_release(c);
        for (int k = 0; k < 2; k++)
                if (c->fence[k])
                        cudaEventDestroy(c->fence[k]);
        if (c->blas)
                cublasDestroy(c->blas);
        if (c->stream)
                cudaStreamDestroy(c->stream);
        cudaGetLastError();
        free(c);
}

static const struct mo_backend_ops cuda_ops = {
        .name = "cuda",
        .destroy = cuda_destroy,
        .alloc = cuda_alloc,
        .free = cuda_free,
        .upload = cuda_upload,
        .download = cuda_download,
        .zero = cuda_zero,
        .copy = cuda_copy,
        .matmul = cuda_op_matmul,
        /* The engine calls matmul per job; grouped expert GEMMs would go
         * here (issue 5). */
        .matmul_many = nullptr,
        .get_rows = cuda_op_get_rows,
        .rmsnorm = cuda_op_rmsnorm,
        .rope = cuda_op_rope,
        .swiglu = cuda_op_swiglu,
        .add = cuda_op_add,
        .gather_rows = cuda_op_gather_rows,
        .scatter_add_rows = cuda_op_scatter_add_rows,
        .mla_attn = cuda_op_mla_attn,
        /* One launch per sequence for now; a batched launch would go here. */
        .mla_attn_many = nullptr,
        .sync = cuda_sync,
        .host_memory = false,
};

extern "C" int mo_cuda_probe(char *why, size_t cap)
{
        int n = 0, drv = 0;
        cudaError_t r = cudaGetDeviceCount(&n);
        char buf[256];

        if (r == cudaSuccess && n > 0)
                return n;
        cudaGetLastError();
        if (cudaDriverGetVersion(&drv) != cudaSuccess || drv == 0)
                snprintf(buf, sizeof buf, "driver: not installed");
        else
                snprintf(buf, sizeof buf, "driver %d.%d: %s", drv / 1000, drv % 1000 / 10,
                         r == cudaSuccess ? "no CUDA-capable device is detected"
                                          : cudaGetErrorString(r));
        cudaGetLastError();
        if (why && cap)
                snprintf(why, cap, "%s", buf);
        return 0;
}

extern "C" int mo_cuda_device_info(int device, struct mo_cuda_device_info *info, struct moerr *e)
{
        char why[256];
        int n = mo_cuda_probe(why, sizeof why);
        struct cudaDeviceProp prop;
        cudaError_t r;

        if (device < 0 || device >= n)
                return moerr_set(e, -ENODEV, "CUDA device %d: not present (%d found%s%s)", device,
                                 n, n ? "" : "; ", n ? "" : why);
        r = cudaGetDeviceProperties(&prop, device);
        if (r != cudaSuccess)
                return cuda_err(e, -EIO, r, "CUDA device %d: reading its properties", device);
        memset(info, 0, sizeof *info);
        snprintf(info->name, sizeof info->name, "%s", prop.name);
        info->cc_major = prop.major;
        info->cc_minor = prop.minor;
        info->sm_count = prop.multiProcessorCount;
        info->total_bytes = prop.totalGlobalMem;
        return 0;
}

extern "C" int mo_cuda_mem_info(mo_backend *b, uint64_t *free_bytes, uint64_t *total_bytes,
                                struct moerr *e)
{
        size_t f = 0, t = 0;
        cudaError_t r;

        if (!mo_backend_is_cuda(b))
                return moerr_set(e, -EINVAL, "memory info: not a CUDA backend");
        r = cudaSetDevice(cuda_ctx_of(b)->device);
        if (r == cudaSuccess)
                r = cudaMemGetInfo(&f, &t);
        if (r != cudaSuccess)
                return cuda_err(e, -EIO, r, "CUDA %d: reading free memory", cuda_ctx_of(b)->device);
        *free_bytes = f;
        *total_bytes = t;
        return 0;
}

extern "C" int mo_backend_cuda_new(int device, mo_backend **out, struct moerr *e)
{
        struct mo_cuda_device_info info;
        struct cuda_ctx *c;
        struct cudaDeviceProp prop;
        cudaError_t r;
        int ret;

        ret = mo_cuda_device_info(device, &info, e);
        if (ret < 0)
                return ret;
        if (info.cc_major < 8)
                return moerr_set(e, -ENODEV,
                                 "CUDA %d (%s): compute capability %d.%d is below 8.0, the oldest "
                                 "moed's kernels are built for",
                                 device, info.name, info.cc_major, info.cc_minor);
        c = (struct cuda_ctx *)calloc(1, sizeof *c);
        if (!c)
                return moerr_set(e, -ENOMEM, "cuda backend: out of memory");
        c->device = device;
        snprintf(c->name, sizeof c->name, "%s", info.name);
        c->sm_count = info.sm_count;
        c->b.ops = &cuda_ops;
        c->b.ctx = c;
        r = cudaSetDevice(device);
        if (r == cudaSuccess)
                r = cudaGetDeviceProperties(&prop, device);
        if (r == cudaSuccess) {
                c->smem_optin = prop.sharedMemPerBlockOptin;
                r = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking);
        }
        for (int k = 0; k < 2 && r == cudaSuccess; k++)
                r = cudaEventCreateWithFlags(&c->fence[k], cudaEventDisableTiming);
        if (r != cudaSuccess) {
                cuda_destroy(&c->b);
                return cuda_err(e, -EIO, r, "CUDA %d (%s): creating its stream", device, info.name);
        }
        if (cublasCreate(&c->blas) != CUBLAS_STATUS_SUCCESS ||
            cublasSetStream(c->blas, c->stream) != CUBLAS_STATUS_SUCCESS ||
            cublasSetMathMode(c->blas, CUBLAS_DEFAULT_MATH) != CUBLAS_STATUS_SUCCESS) {
                cuda_destroy(&c->b);
                return moerr_set(e, -EIO, "CUDA %d (%s): cuBLAS does not start", device, info.name);
        }
        if (!ring_alloc(c, RING_BYTES, "backend setup")) {
                cuda_destroy(&c->b);
                return moerr_set(e, -ENOMEM, "CUDA %d (%s): no memory for staging buffers",
                                 device, info.name);
        }
        ret = cuda_kernels_check(c, e);
        if (ret == 0)
                ret = cuda_mla_init(c, e);
        if (ret < 0) {
                cuda_destroy(&c->b);
                return ret;
        }
        *out = &c->b;
        return 0;
}

extern "C" int mo_cuda_backend_device(const mo_backend *b)
{
        return mo_backend_is_cuda(b) ? ((const struct cuda_ctx *)b->ctx)->device : -1;
}

extern "C" int mo_cuda_upload_weights(mo_backend *b, const struct mo_cuda_region *regions,
                                      size_t n, mo_cuda_progress_fn progress, void *userdata,
                                      struct moerr *e)
{
        struct cuda_ctx *c;
        cudaError_t r;

        if (!mo_backend_is_cuda(b))
                return moerr_set(e, -EINVAL, "weights upload: not a CUDA backend");
        c = cuda_ctx_of(b);
        r = cudaSetDevice(c->device);
        if (r != cudaSuccess)
                return cuda_err(e, -EIO, r, "CUDA %d", c->device);
        return upload_regions(c, regions, n, progress, userdata, e);
}

extern "C" uint64_t mo_cuda_weight_bytes(const mo_backend *b)
{
        return mo_backend_is_cuda(b) ? ((const struct cuda_ctx *)b->ctx)->weight_bytes : 0;
}

extern "C" void mo_cuda_release_weights(mo_backend *b)
{
        if (mo_backend_is_cuda(b))
                release_weights(cuda_ctx_of(b));
}
