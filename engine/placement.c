/* placement.c: the expert -> device maps of the MoE layers, the expert load
 * counters the forward pass feeds, and the greedy rebalance that turns the
 * observed load into a new map. */
#include "engine/placement.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/cleanup.h"

struct placement {
        int n_layer, n_expert, n_devices;
        int32_t *owner;   /* [n_layer][n_expert] */
        uint64_t *load;   /* [n_layer][n_expert] */
};

static void contiguous(int32_t *owner, int n_expert, int n_devices)
{
        /* floor(x*N/X) cuts [0, X) into N runs of floor or ceil(X/N). */
        for (int x = 0; x < n_expert; x++)
                owner[x] = (int32_t)((int64_t)x * n_devices / n_expert);
}

int placement_new(int n_layer, int n_expert, int n_devices, struct placement **out,
                  struct moerr *e)
{
        _cleanup_free_ struct placement *p = NULL;
        size_t cells;

        if (n_layer < 1 || n_expert < 1)
                return moerr_set(e, -EINVAL, "placement: %d layers of %d experts", n_layer, n_expert);
        if (n_devices < 1 || n_devices > PLACEMENT_MAX_DEVICES)
                return moerr_set(e, -EINVAL, "placement: %d devices (1 to %d)", n_devices,
                                 PLACEMENT_MAX_DEVICES);
        p = calloc(1, sizeof *p);
        cells = (size_t)n_layer * (size_t)n_expert;
        if (!p || !(p->owner = calloc(cells, sizeof *p->owner)) ||
            !(p->load = calloc(cells, sizeof *p->load))) {
                if (p)
                        free(p->owner);
                return moerr_set(e, -ENOMEM, "placement: out of memory");
        }
        p->n_layer = n_layer;
        p->n_expert = n_expert;
        p->n_devices = n_devices;
        for (int l = 0; l < n_layer; l++)
                contiguous(p->owner + (size_t)l * n_expert, n_expert, n_devices);
        *out = TAKE_PTR(p);
        return 0;
}

void placement_free(struct placement *p)
{
        if (!p)
                return;
        free(p->owner);
        free(p->load);
        free(p);
}

int placement_devices(const struct placement *p)
{
        return p->n_devices;
}

int placement_experts(const struct placement *p)
{
        return p->n_expert;
}

const int32_t *placement_map(const struct placement *p, int layer)
{
        return p->owner + (size_t)layer * p->n_expert;
}

int placement_owner(const struct placement *p, int layer, int expert)
{
        return placement_map(p, layer)[expert];
}

int placement_count(const struct placement *p, int layer, int device)
{
        const int32_t *own = placement_map(p, layer);
        int c = 0;

        for (int x = 0; x < p->n_expert; x++)
                c += own[x] == device;
        return c;
}

int placement_set(struct placement *p, int layer, const int32_t *owners, struct moerr *e)
{
        if (layer < 0 || layer >= p->n_layer)
                return moerr_set(e, -EINVAL, "placement: no layer %d", layer);
        for (int x = 0; x < p->n_expert; x++)
                if (owners[x] < 0 || owners[x] >= p->n_devices)
                        return moerr_set(e, -EINVAL, "placement: expert %d on device %d of %d", x,
                                         owners[x], p->n_devices);
        memcpy(p->owner + (size_t)layer * p->n_expert, owners, (size_t)p->n_expert * sizeof *owners);
        return 0;
}

/* ---- load ---- */

int placement_observe(struct placement *p, int layer, const int32_t *ids, int64_t n)
{
        uint64_t *load;

        if (layer < 0 || layer >= p->n_layer || n < 0)
                return -EINVAL;
        for (int64_t i = 0; i < n; i++)
                if (ids[i] < 0 || ids[i] >= p->n_expert)
                        return -EINVAL;
        load = p->load + (size_t)layer * p->n_expert;
        for (int64_t i = 0; i < n; i++)
                load[ids[i]]++;
        return 0;
}

uint64_t placement_load(const struct placement *p, int layer, int expert)
{
        return p->load[(size_t)layer * p->n_expert + expert];
}

void placement_clear_loads(struct placement *p)
{
        memset(p->load, 0, (size_t)p->n_layer * p->n_expert * sizeof *p->load);
}

/* ---- rebalance ---- */

struct by_load {
        uint64_t load;
        int expert;
};

static int heavier_first(const void *a, const void *b)
{
        const struct by_load *x = a, *y = b;

        if (x->load != y->load)
                return x->load > y->load ? -1 : 1;
        return (x->expert > y->expert) - (x->expert < y->expert);
}

/* The device with room that has the least load, then the fewest experts,
 * then the lowest id; there is always one (cap * N >= X). */
static int lightest(const uint64_t *dev_load, const int *dev_count, int n, int cap)
{
        int best = -1;

        for (int d = 0; d < n; d++) {
                if (dev_count[d] >= cap)
                        continue;
                if (best < 0 || dev_load[d] < dev_load[best] ||
                    (dev_load[d] == dev_load[best] && dev_count[d] < dev_count[best]))
                        best = d;
        }
        return best;
}

/* Greedy longest-processing-time assignment of one layer (the classic 4/3
 * bound on the heaviest device, here under an expert-count cap). */
static void rebalance_layer(struct placement *p, int layer, int cap, struct by_load *order,
                            uint64_t *dev_load, int *dev_count)
{
        const uint64_t *load = p->load + (size_t)layer * p->n_expert;
        int32_t *own = p->owner + (size_t)layer * p->n_expert;
        uint64_t total = 0;

        for (int x = 0; x < p->n_expert; x++) {
                order[x] = (struct by_load){ load[x], x };
                total += load[x];
        }
        if (total == 0)
                return; /* nothing observed: no reason to move anything */
        qsort(order, (size_t)p->n_expert, sizeof *order, heavier_first);
        memset(dev_load, 0, (size_t)p->n_devices * sizeof *dev_load);
        memset(dev_count, 0, (size_t)p->n_devices * sizeof *dev_count);
        for (int i = 0; i < p->n_expert; i++) {
                int d = lightest(dev_load, dev_count, p->n_devices, cap);
                own[order[i].expert] = d;
                dev_load[d] += order[i].load;
                dev_count[d]++;
        }
}

int placement_rebalance(struct placement *p, int max_per_device, struct moerr *e)
{
        int balanced = (p->n_expert + p->n_devices - 1) / p->n_devices;
        int cap = max_per_device == 0 ? balanced : max_per_device;
        _cleanup_free_ struct by_load *order = NULL;
        _cleanup_free_ uint64_t *dev_load = NULL;
        _cleanup_free_ int *dev_count = NULL;

        if (cap < balanced)
                return moerr_set(e, -EINVAL, "placement: %d devices of %d experts cannot hold %d experts",
                                 p->n_devices, max_per_device, p->n_expert);
        order = malloc((size_t)p->n_expert * sizeof *order);
        dev_load = malloc((size_t)p->n_devices * sizeof *dev_load);
        dev_count = malloc((size_t)p->n_devices * sizeof *dev_count);
        if (!order || !dev_load || !dev_count)
                return moerr_set(e, -ENOMEM, "placement: out of memory");
        for (int l = 0; l < p->n_layer; l++)
                rebalance_layer(p, l, cap, order, dev_load, dev_count);
        return 0;
}

/* ---- expected shares ---- */

double placement_share(const struct placement *p, int layer, int device)
{
        const int32_t *own = placement_map(p, layer);
        const uint64_t *load = p->load + (size_t)layer * p->n_expert;
        uint64_t total = 0, mine = 0;

        for (int x = 0; x < p->n_expert; x++) {
                total += load[x];
                mine += own[x] == device ? load[x] : 0;
        }
        if (total == 0)
                return (double)placement_count(p, layer, device) / p->n_expert;
        return (double)mine / (double)total;
}

double placement_imbalance(const struct placement *p, int layer)
{
        double worst = 0;

        for (int d = 0; d < p->n_devices; d++) {
                double s = placement_share(p, layer, d);
                worst = s > worst ? s : worst;
        }
        return worst * p->n_devices;
}
