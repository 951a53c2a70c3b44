/* collective: the all-to-all that moves rows between devices when the
 * routed experts are sharded (engine/forward.c dispatches token rows to the
 * owners of their experts and brings the expert outputs back with it).
 *
 * One table of operations per transport, like kernels/backend.h. The local
 * implementation here serves N virtual devices that share this process
 * (memcpy between their buffers), so the sharded engine runs and is tested
 * on a CPU. An NCCL implementation fits the same contract unchanged:
 *
 *   one process drives all of a node's GPUs, one communicator per device
 *   (ncclCommInitAll, or ncclCommInitRank per device in a group); then
 *   all_to_all is
 *
 *     ncclGroupStart();
 *     for each device d, for each peer p:
 *             if (counts[d][p]) ncclSend(send[d] + soff(d, p) * dim,
 *                     counts[d][p] * dim, ncclFloat32, p, comm[d], stream[d]);
 *             if (counts[p][d]) ncclRecv(recv[d] + roff(d, p) * dim,
 *                     counts[p][d] * dim, ncclFloat32, p, comm[d], stream[d]);
 *     ncclGroupEnd();
 *
 *   where stream[d] is the stream device d's backend queues its operations
 *   on. A send to oneself (p == d) is legal inside an NCCL group. With one
 *   rank per process (several nodes), a rank knows only its own row of
 *   counts: the implementation first gathers the columns (an ncclAllGather
 *   of N counts per rank) and then runs the same group; callers do not see
 *   the difference. */
#pragma once
#include <stdint.h>

#include "common/moerr.h"
#include "kernels/backend.h"

/* Virtual devices are bit sets of this width in the engine's dispatch. */
#define MO_COLL_MAX_DEVICES 64

struct mo_coll;

struct mo_coll_ops {
        const char *name;
        void (*destroy)(struct mo_coll *c);
        /* The all-to-all of rows of dim floats among the n_devices devices.
         *
         * counts (host memory, n_devices x n_devices, row-major):
         * counts[s * n + p] rows go from device s to device p; s == p is
         * allowed (rows a device keeps), zero counts are allowed.
         * send[s] (memory of device s): its rows for device 0 first, then
         * for device 1, ... (counts[s * n + p] rows each, contiguous).
         * recv[p] (memory of device p): the rows from device 0 first, then
         * from device 1, ...; within a block the sender's order is kept.
         * recv[p] holds mo_coll_recv_rows(n, counts, p) * dim floats; send and
         * recv buffers do not overlap. A device with nothing to send or
         * receive may pass NULL.
         *
         * Ordering is that of each device's queue (its backend's stream):
         * the rows are read after every operation queued on device s before
         * the call, and operations queued on device p after the call see the
         * received rows. The local implementation is synchronous; NCCL's is
         * not, and the host must not read recv before the device's sync.
         * Returns 0 or a negative errno (-EINVAL for a negative count, -EIO
         * for a transport failure). */
        int (*all_to_all)(struct mo_coll *c, const float *const *send, const int64_t *counts,
                          float *const *recv, int64_t dim);
};

struct mo_coll {
        const struct mo_coll_ops *ops;
        int n_devices;
        void *ctx;
};

/* N virtual devices in this process; devs[d] is device d's backend, whose
 * memory must be host memory (CPU backends: the copies are memcpy). The
 * same backend may serve several virtual devices. devs is copied. */
int mo_coll_local_new(int n_devices, mo_backend *const *devs, struct mo_coll **out,
                      struct moerr *e);

static inline void mo_coll_free(struct mo_coll *c)
{
        if (c)
                c->ops->destroy(c);
}

/* Rows device d sends in all (row d of counts). */
static inline int64_t mo_coll_send_rows(int n, const int64_t *counts, int d)
{
        int64_t r = 0;

        for (int p = 0; p < n; p++)
                r += counts[d * n + p];
        return r;
}

/* Rows device d receives in all (column d of counts). */
static inline int64_t mo_coll_recv_rows(int n, const int64_t *counts, int d)
{
        int64_t r = 0;

        for (int s = 0; s < n; s++)
                r += counts[s * n + d];
        return r;
}
