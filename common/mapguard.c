/* mapguard.c: the SIGBUS handler behind mapguard.h. The slots are read
 * from a signal handler, so they are a fixed array of atomics: a slot is
 * filled before its base is published and emptied by clearing its base. */
#include "common/mapguard.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

struct guard {
        _Atomic uintptr_t base; /* 0: free */
        _Atomic size_t len;
        _Atomic bool faulted;
        _Atomic bool taken;     /* claimed by an adder, base maybe not yet set */
};

static struct guard guards[MO_MAPGUARD_MAX];
static struct sigaction previous;
static _Atomic uintptr_t page_size;

/* Hands the signal to whoever had it before, as if we had never been
 * here. With no handler before, the default action: the faulting read
 * runs again on return and kills; a SIGBUS sent by kill() is raised again. */
static void pass_on(int sig, siginfo_t *si, void *uc)
{
        if (previous.sa_flags & SA_SIGINFO) {
                previous.sa_sigaction(sig, si, uc);
                return;
        }
        if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
                previous.sa_handler(sig);
                return;
        }
        signal(sig, SIG_DFL);
        if (si->si_code <= 0)
                raise(sig);
}

/* Zeros from the faulting page to the end of the guarded mapping: the file
 * lost its tail, so every page after a missing one is missing too, and one
 * call spares a signal per page. mmap is not on POSIX's list of
 * async-signal-safe functions, but on Linux it is the bare system call,
 * which touches no state the interrupted code could hold. */
static bool patch(struct guard *g, uintptr_t base, uintptr_t addr)
{
        uintptr_t page = addr & ~(page_size - 1);
        uintptr_t end = (base + atomic_load(&g->len) + page_size - 1) & ~(page_size - 1);

        if (mmap((void *)page, end - page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) ==
            MAP_FAILED)
                return false;
        atomic_store(&g->faulted, true);
        return true;
}

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
        int saved_errno = errno;
        uintptr_t addr = (uintptr_t)si->si_addr;

        /* BUS_ADRERR: a mapped page with no file behind it. */
        if (si->si_code == BUS_ADRERR)
                for (int i = 0; i < MO_MAPGUARD_MAX; i++) {
                        uintptr_t base = atomic_load_explicit(&guards[i].base, memory_order_acquire);

                        if (base && addr - base < atomic_load(&guards[i].len) && patch(&guards[i], base, addr)) {
                                errno = saved_errno;
                                return;
                        }
                }
        errno = saved_errno;
        pass_on(sig, si, uc);
}

/* Puts the handler in place unless it is there already: whoever changed
 * SIGBUS since (a test harness, a library) becomes the one passed on to. */
static int install(void)
{
        static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
        struct sigaction sa = { .sa_sigaction = on_sigbus, .sa_flags = SA_SIGINFO }, now;
        long ps = sysconf(_SC_PAGESIZE);
        int r = 0;

        pthread_mutex_lock(&lock);
        page_size = ps > 0 ? (uintptr_t)ps : 4096;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGBUS, NULL, &now) < 0)
                r = -errno;
        else if (!((now.sa_flags & SA_SIGINFO) && now.sa_sigaction == on_sigbus) &&
                 sigaction(SIGBUS, &sa, &previous) < 0)
                r = -errno;
        pthread_mutex_unlock(&lock);
        return r;
}

int mo_mapguard_add(const void *base, size_t len)
{
        int r;

        if (!base || !len)
                return -EINVAL;
        if ((r = install()) < 0)
                return r;
        for (int i = 0; i < MO_MAPGUARD_MAX; i++) {
                bool free_slot = false;

                if (!atomic_compare_exchange_strong(&guards[i].taken, &free_slot, true))
                        continue;
                atomic_store(&guards[i].len, len);
                atomic_store(&guards[i].faulted, false);
                atomic_store_explicit(&guards[i].base, (uintptr_t)base, memory_order_release);
                return 0;
        }
        return -ENOSPC;
}

static struct guard *find(const void *base)
{
        for (int i = 0; base && i < MO_MAPGUARD_MAX; i++)
                if (atomic_load_explicit(&guards[i].base, memory_order_acquire) == (uintptr_t)base)
                        return &guards[i];
        return NULL;
}

void mo_mapguard_remove(const void *base)
{
        struct guard *g = find(base);

        if (!g)
                return;
        atomic_store_explicit(&g->base, 0, memory_order_release);
        atomic_store(&g->taken, false);
}

bool mo_mapguard_faulted(const void *base)
{
        struct guard *g = find(base);

        return g && atomic_load(&g->faulted);
}
