/* cuda-backend: the CUDA implementation of struct mo_backend_ops (one
 * device and one stream per backend), device discovery, weights kept on the
 * device in their stored type, and the run-time choice between CUDA and the
 * CPU. Usable from C; the implementation is in the .cu files next to it.
 *
 * Every function here exists in every build: without CUDA (MOED_HAVE_CUDA
 * 0) the device count is 0, mo_backend_cuda_new fails with -ENODEV, and the
 * automatic choice takes the CPU. */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/moerr.h"
#include "kernels/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Usable CUDA devices. 0, never an abort, when moed was built without CUDA,
 * no driver is installed, or the driver sees no device; why (if non-NULL)
 * then says which ("driver: not installed", "driver 13.0: no CUDA-capable
 * device is detected"). */
int mo_cuda_probe(char *why, size_t cap);
int mo_cuda_device_count(void);

struct mo_cuda_device_info {
        char name[256];         /* "NVIDIA H100 80GB HBM3" */
        int cc_major, cc_minor; /* compute capability */
        int sm_count;
        uint64_t total_bytes;
};

/* What the driver says about a device, without creating a context on it
 * (a context holds device memory, so moed makes none on devices it does not
 * use). -ENODEV if the device does not exist. */
int mo_cuda_device_info(int device, struct mo_cuda_device_info *info, struct moerr *e);

/* A backend on one device. Fails with -ENODEV (no such device, or a
 * compute capability below 8.0, the oldest moed's kernels are built for).
 * Like the CPU backend, one caller at a time.
 *
 * Weights: matmul and get_rows take mo_weight views whose data points into
 * host memory (the mapped model file), and rmsnorm's gains likewise. The
 * backend copies each weight to the device once, in its stored type, and
 * finds it again by its host address (a map host -> device): that memory
 * must not change while the backend holds a copy of it; call
 * mo_cuda_release_weights before unmapping or reusing it. */
int mo_backend_cuda_new(int device, mo_backend **out, struct moerr *e);
bool mo_backend_is_cuda(const mo_backend *b);
/* The device of a CUDA backend, -1 for any other backend. */
int mo_cuda_backend_device(const mo_backend *b);

/* Host memory to keep on the device: a whole tensor, one expert's slice of
 * one, or the mapped file's whole tensor data. Views anywhere inside an
 * uploaded region are found without further copies. */
struct mo_cuda_region {
        const void *host;
        size_t bytes;
};

/* Called after each piece has been copied (about every 64 MiB). */
typedef void (*mo_cuda_progress_fn)(void *userdata, uint64_t done_bytes, uint64_t total_bytes);

/* Copies the regions to the device ahead of use, so that no op has to do it
 * on first touch. Regions already on the device are skipped. -ENOMEM with
 * a message naming the device and the bytes needed and free when they do
 * not fit (checked before anything is allocated). */
int mo_cuda_upload_weights(mo_backend *b, const struct mo_cuda_region *regions, size_t n,
                           mo_cuda_progress_fn progress, void *userdata, struct moerr *e);
/* Free and total memory of a CUDA backend's device now; -EINVAL for any
 * other backend. */
int mo_cuda_mem_info(mo_backend *b, uint64_t *free_bytes, uint64_t *total_bytes,
                     struct moerr *e);
/* Device bytes held for weights. */
uint64_t mo_cuda_weight_bytes(const mo_backend *b);
/* Frees every weight copy (waits for queued work first). */
void mo_cuda_release_weights(mo_backend *b);

/* The backend(s) a Devices= setting asks for:
 *   NULL, "" or "all": every CUDA device if there is one, else the CPU;
 *   "cpu": the CPU even when devices exist;
 *   "0", "0,2", "1 3": those CUDA devices (an error if one is missing).
 * threads: CPU worker threads when the CPU is used (0 = one per CPU).
 * Creates up to max_out backends (one per device used) into out and sets
 * *n_out. log_line receives one line for the log:
 *   "devices: CUDA 0 (NVIDIA H100 80GB HBM3, 79.1 GiB), CUDA 1 (...); using CUDA 0, CUDA 1"
 *   "devices: no CUDA device found (driver: not installed); using the CPU with 16 threads"
 * -EINVAL for a malformed setting, -ENODEV for a listed device that does
 * not exist, with the reason in e. */
int mo_backends_auto_new(const char *devices, int threads, mo_backend **out, int max_out,
                         int *n_out, char *log_line, size_t cap, struct moerr *e);
/* The same for one backend: the first device chosen, or the CPU. */
int mo_backend_auto_new(const char *devices, int threads, mo_backend **out, char *log_line,
                        size_t cap, struct moerr *e);

#ifdef __cplusplus
}
#endif
