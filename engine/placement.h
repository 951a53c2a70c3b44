/* placement: which device holds each routed expert of each MoE layer (the
 * expert -> device map the sharded forward pass dispatches by), and the
 * expert load observed at run time from which the map is recomputed.
 *
 * A new map is contiguous and balanced: device d holds experts
 * [d*X/N, (d+1)*X/N), so device expert counts differ by at most one.
 * placement_rebalance() replaces it, layer by layer, with a greedy
 * assignment by observed load. Host memory, no locking: the engine thread
 * owns it. */
#pragma once
#include <stdint.h>

#include "common/moerr.h"

/* Devices are bit sets of this width in the dispatch (kernels/collective.h). */
#define PLACEMENT_MAX_DEVICES 64

struct placement;

/* Maps for layers 0 .. n_layer-1 (dense layers have one too, unused). */
int placement_new(int n_layer, int n_expert, int n_devices, struct placement **out,
                  struct moerr *e);
void placement_free(struct placement *p);

int placement_devices(const struct placement *p);
int placement_experts(const struct placement *p);

/* The device holding expert x of layer l. */
int placement_owner(const struct placement *p, int layer, int expert);
/* The whole map of a layer: n_expert owners (valid until the next rebalance
 * or placement_set). */
const int32_t *placement_map(const struct placement *p, int layer);
/* Experts device d holds in layer l. */
int placement_count(const struct placement *p, int layer, int device);
/* Replaces a layer's map (a pinned placement, or a test's); every owner
 * must be a device, no bound on how many a device holds. */
int placement_set(struct placement *p, int layer, const int32_t *owners, struct moerr *e);

/* Counts one routed (token, expert) pair per entry of ids (n entries, the
 * router's choices for a batch of one layer). -EINVAL, counting nothing, if
 * an id is not an expert. */
int placement_observe(struct placement *p, int layer, const int32_t *ids, int64_t n);
/* Pairs routed to expert x of layer l since the last clear. */
uint64_t placement_load(const struct placement *p, int layer, int expert);
void placement_clear_loads(struct placement *p);

/* Recomputes every layer's map from its observed loads: experts heaviest
 * first (equal loads: lower id first), each onto the device with the least
 * load so far among those holding fewer than max_per_device experts (equal
 * loads: the one holding fewer experts, then the lower id). max_per_device
 * 0 means ceil(X/N), the memory of a balanced placement; -EINVAL when N
 * devices of that bound cannot hold X experts. A layer without observed
 * load keeps its map. Deterministic; loads are kept (clear them to start a
 * new window). */
int placement_rebalance(struct placement *p, int max_per_device, struct moerr *e);

/* The share of layer l's routed pairs device d is expected to compute under
 * the current map: its experts' observed load over the layer's total, or
 * its expert count over X when nothing was observed. Shares sum to 1. */
double placement_share(const struct placement *p, int layer, int device);
/* N times the largest share: 1 is perfect balance, N is all on one device. */
double placement_imbalance(const struct placement *p, int layer);
