/* collective.c: the local all-to-all over virtual devices that share this
 * process: every block of rows is one memcpy from the sender's buffer into
 * the receiver's, in the layout collective.h fixes for every transport. */
#include "kernels/collective.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

struct local_coll {
        struct mo_coll c;
        mo_backend *devs[];
};

static void local_destroy(struct mo_coll *c)
{
        free(c->ctx);
}

static int local_all_to_all(struct mo_coll *c, const float *const *send, const int64_t *counts,
                            float *const *recv, int64_t dim)
{
        struct local_coll *l = c->ctx;
        int n = c->n_devices;

        if (dim < 0)
                return -EINVAL;
        for (int i = 0; i < n * n; i++)
                if (counts[i] < 0)
                        return -EINVAL;
        /* The rows must be final before they move: the backends' queues
         * drain first (a no-op for the CPU backend, whose ops are done on
         * return, but the contract is the same as for a device's stream). */
        for (int d = 0; d < n; d++)
                if (d == 0 || l->devs[d] != l->devs[d - 1])
                        l->devs[d]->ops->sync(l->devs[d]);
        for (int s = 0; s < n; s++) {
                int64_t soff = 0;
                for (int p = 0; p < n; p++) {
                        int64_t roff = 0, rows = counts[s * n + p];
                        for (int q = 0; q < s; q++)
                                roff += counts[q * n + p];
                        if (rows > 0)
                                memcpy(recv[p] + roff * dim, send[s] + soff * dim,
                                       (size_t)(rows * dim) * sizeof(float));
                        soff += rows;
                }
        }
        return 0;
}

static const struct mo_coll_ops local_ops = {
        .name = "local",
        .destroy = local_destroy,
        .all_to_all = local_all_to_all,
};

int mo_coll_local_new(int n_devices, mo_backend *const *devs, struct mo_coll **out,
                      struct moerr *e)
{
        struct local_coll *l;

        if (n_devices < 1 || n_devices > MO_COLL_MAX_DEVICES)
                return moerr_set(e, -EINVAL, "collective: %d devices (1 to %d)", n_devices,
                                 MO_COLL_MAX_DEVICES);
        for (int d = 0; d < n_devices; d++)
                if (!devs[d])
                        return moerr_set(e, -EINVAL, "collective: device %d has no backend", d);
        l = calloc(1, sizeof *l + (size_t)n_devices * sizeof l->devs[0]);
        if (!l)
                return moerr_set(e, -ENOMEM, "collective: out of memory");
        memcpy(l->devs, devs, (size_t)n_devices * sizeof l->devs[0]);
        l->c = (struct mo_coll){ .ops = &local_ops, .n_devices = n_devices, .ctx = l };
        *out = &l->c;
        return 0;
}
