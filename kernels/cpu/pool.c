/* pool.c: worker threads for the CPU backend and a dynamic parallel-for.
 * A job is published by bumping a generation counter; workers spin on it
 * for a while (decode issues ops back to back) and then sleep on a futex,
 * so an idle daemon costs no CPU. The caller works too, then waits for the
 * pending count to reach zero in the same spin-then-futex way. */
#include "kernels/cpu/pool.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common/cleanup.h"

/* About 100 us of spinning: longer than the gap between two ops of a
 * decode step, far shorter than the gap between steps. */
#define SPIN_ROUNDS 200000

struct worker {
        struct mo_pool *pool;
        pthread_t thread;
        int tid;
        bool started;
};

struct mo_pool {
        int n_threads;
        struct worker *workers; /* n_threads - 1 of them */
        pthread_mutex_t lock;

        /* The current job, written before gen is bumped. */
        mo_pool_fn fn;
        void *arg;
        int64_t n, grain, n_chunks;
        _Alignas(64) _Atomic int64_t next_chunk;

        _Alignas(64) _Atomic uint32_t gen;  /* futex: job generation */
        _Atomic int sleepers;               /* workers asleep on gen */
        _Atomic bool stop;
        _Alignas(64) _Atomic uint32_t pending; /* futex: workers not done */
        _Atomic bool caller_asleep;
};

/* No pause instruction: under a hypervisor with pause-loop exiting, a vCPU
 * that executes many pauses is descheduled, and waking it again cost about
 * 60 us per job on a 2-vCPU VM, more than most decode ops take. A plain
 * reload of the (shared, read-mostly) line spins just as politely on the
 * memory system. */
static void cpu_relax(void)
{
        __asm__ __volatile__("" ::: "memory");
}

static void futex_wait(_Atomic uint32_t *addr, uint32_t val)
{
        syscall(SYS_futex, addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
}

static void futex_wake(_Atomic uint32_t *addr, int n)
{
        syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, n, NULL, NULL, 0);
}

static void run_chunks(struct mo_pool *p, int tid)
{
        for (;;) {
                int64_t c = atomic_fetch_add_explicit(&p->next_chunk, 1, memory_order_relaxed);
                int64_t begin = c * p->grain;

                if (c >= p->n_chunks)
                        return;
                p->fn(p->arg, begin, MO_MIN(p->n, begin + p->grain), tid);
        }
}

static uint32_t wait_new_job(struct mo_pool *p, uint32_t seen)
{
        uint32_t g;

        for (int i = 0; i < SPIN_ROUNDS; i++) {
                g = atomic_load_explicit(&p->gen, memory_order_acquire);
                if (g != seen)
                        return g;
                cpu_relax();
        }
        /* seq_cst pairs with the publisher's bump-then-check of sleepers. */
        atomic_fetch_add(&p->sleepers, 1);
        while ((g = atomic_load(&p->gen)) == seen)
                futex_wait(&p->gen, seen);
        atomic_fetch_sub(&p->sleepers, 1);
        return g;
}

static void *worker_main(void *v)
{
        struct worker *w = v;
        struct mo_pool *p = w->pool;
        uint32_t seen = 0;

        for (;;) {
                seen = wait_new_job(p, seen);
                if (atomic_load(&p->stop))
                        return NULL;
                run_chunks(p, w->tid);
                if (atomic_fetch_sub(&p->pending, 1) == 1 && atomic_load(&p->caller_asleep))
                        futex_wake(&p->pending, 1);
        }
}

static void wait_workers(struct mo_pool *p)
{
        uint32_t v;

        for (int i = 0; i < SPIN_ROUNDS; i++) {
                if (atomic_load_explicit(&p->pending, memory_order_acquire) == 0)
                        return;
                cpu_relax();
        }
        atomic_store(&p->caller_asleep, true);
        while ((v = atomic_load(&p->pending)) != 0)
                futex_wait(&p->pending, v);
        atomic_store(&p->caller_asleep, false);
}

static void publish(struct mo_pool *p)
{
        atomic_fetch_add(&p->gen, 1);
        if (atomic_load(&p->sleepers) > 0)
                futex_wake(&p->gen, INT_MAX);
}

void mo_pool_for(struct mo_pool *p, int64_t n, int64_t grain, mo_pool_fn fn, void *arg)
{
        int64_t n_chunks;

        if (n <= 0)
                return;
        if (grain < 1)
                grain = 1;
        n_chunks = (n + grain - 1) / grain;
        if (p->n_threads == 1 || n_chunks == 1) {
                fn(arg, 0, n, 0);
                return;
        }
        pthread_mutex_lock(&p->lock);
        p->fn = fn;
        p->arg = arg;
        p->n = n;
        p->grain = grain;
        p->n_chunks = n_chunks;
        atomic_store_explicit(&p->next_chunk, 0, memory_order_relaxed);
        atomic_store_explicit(&p->pending, (uint32_t)(p->n_threads - 1), memory_order_relaxed);
        publish(p);
        run_chunks(p, 0);
        wait_workers(p);
        pthread_mutex_unlock(&p->lock);
}

int mo_pool_threads(const struct mo_pool *p)
{
        return p->n_threads;
}

void mo_pool_free(struct mo_pool *p)
{
        if (!p)
                return;
        atomic_store(&p->stop, true);
        publish(p);
        for (int i = 0; i < p->n_threads - 1; i++)
                if (p->workers[i].started)
                        pthread_join(p->workers[i].thread, NULL);
        pthread_mutex_destroy(&p->lock);
        free(p->workers);
        free(p);
}

/* Workers block every signal but the faults: the daemon handles signals
 * on its main loop (signalfd), which requires them blocked in all threads.
 * A fault is raised in the thread that made it, and blocked there it kills
 * the process without running a handler; a worker reading a model file cut
 * short must reach common/mapguard.c's. */
static int start_workers(struct mo_pool *p, struct moerr *e)
{
        static const int faults[] = { SIGBUS, SIGSEGV, SIGFPE, SIGILL };
        sigset_t all, old;
        int r = 0;

        sigfillset(&all);
        for (size_t i = 0; i < sizeof faults / sizeof faults[0]; i++)
                sigdelset(&all, faults[i]);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        for (int i = 0; i < p->n_threads - 1 && r == 0; i++) {
                struct worker *w = &p->workers[i];
                char name[16];

                w->pool = p;
                w->tid = i + 1;
                r = -pthread_create(&w->thread, NULL, worker_main, w);
                if (r < 0) {
                        moerr_set(e, r, "cpu pool: cannot start worker %d of %d: %s",
                                  i + 1, p->n_threads - 1, strerror(-r));
                        break;
                }
                w->started = true;
                snprintf(name, sizeof name, "moed-cpu-%d", w->tid);
                pthread_setname_np(w->thread, name);
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        return r;
}

int mo_pool_new(int n_threads, struct mo_pool **out, struct moerr *e)
{
        struct mo_pool *p;
        int r;

        if (n_threads < 0 || n_threads > 1024)
                return moerr_set(e, -EINVAL, "cpu pool: %d threads is not a sensible count",
                                 n_threads);
        if (n_threads == 0) {
                long c = sysconf(_SC_NPROCESSORS_ONLN);

                n_threads = c > 0 ? (int)MO_MIN(c, 1024) : 1;
        }
        p = aligned_alloc(64, (sizeof *p + 63) / 64 * 64);
        if (!p)
                return moerr_set(e, -ENOMEM, "cpu pool: out of memory");
        memset(p, 0, sizeof *p);
        p->n_threads = n_threads;
        pthread_mutex_init(&p->lock, NULL);
        p->workers = calloc((size_t)n_threads, sizeof *p->workers);
        if (!p->workers) {
                pthread_mutex_destroy(&p->lock);
                free(p);
                return moerr_set(e, -ENOMEM, "cpu pool: out of memory");
        }
        r = start_workers(p, e);
        if (r < 0) {
                mo_pool_free(p);
                return r;
        }
        *out = p;
        return 0;
}
