/* pool: the CPU backend's worker threads and its parallel-for.
 * Workers are created once and wait by spinning briefly, then on a futex,
 * so that the hundreds of small ops of a decode step each cost a few
 * hundred nanoseconds of dispatch, not a thread creation. */
#pragma once
#include <stdint.h>

#include "common/moerr.h"

struct mo_pool;

/* Work on items [begin, end); tid < mo_pool_threads() names the thread
 * (0 is the caller), for per-thread scratch. */
typedef void (*mo_pool_fn)(void *arg, int64_t begin, int64_t end, int tid);

/* n_threads counts the calling thread; 0 means one per online CPU. */
int mo_pool_new(int n_threads, struct mo_pool **out, struct moerr *e);
void mo_pool_free(struct mo_pool *p);
int mo_pool_threads(const struct mo_pool *p);

/* Calls fn over [0, n) in chunks of `grain` items (the last may be
 * shorter), spread over the workers and the caller; returns when all are
 * done. Chunks are claimed dynamically, so fn must make each item's result
 * independent of which thread runs it. Small n runs on the caller alone.
 * Not reentrant: one caller at a time (serialised by a mutex). */
void mo_pool_for(struct mo_pool *p, int64_t n, int64_t grain, mo_pool_fn fn, void *arg);
