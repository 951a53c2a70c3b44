/* mapguard: keeps a read-only file mapping readable when its file shrinks.
 *
 * moed maps model files and reads the weights in place. If the file is
 * truncated or rewritten in place while mapped (cp over it, rather than a
 * rename), its pages past the new end are gone, and the next read of one
 * raises SIGBUS: the whole daemon, and everyone's requests, would die of
 * one administrator's copy. Within a guarded mapping that read gets zeros
 * instead, and the mapping is marked faulted; its owner checks the mark
 * after each piece of work, throws the results away and reports the file
 * as changed. A SIGBUS anywhere else goes on to the handler that was
 * installed before (by default, the process dies as it would have). */
#pragma once
#include <stdbool.h>
#include <stddef.h>

/* How many mappings can be guarded at once. */
#define MO_MAPGUARD_MAX 64

/* Guards [base, base + len). -ENOSPC when MO_MAPGUARD_MAX mappings are
 * guarded already, -errno when the handler cannot be installed; the
 * mapping then works as before, unguarded. */
int mo_mapguard_add(const void *base, size_t len);
/* Stops guarding the mapping at base; call it before unmapping. */
void mo_mapguard_remove(const void *base);
/* Whether a read of the guarded mapping at base found its page gone. */
bool mo_mapguard_faulted(const void *base);
