/* cleanup: scope-bound release of resources, in the manner of systemd's
 * _cleanup_ helpers, so that early returns leak nothing. */
#pragma once
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define _cleanup_(f) __attribute__((cleanup(f)))

static inline void freep(void *p) { free(*(void **)p); }
static inline void closep(int *fd) { if (*fd >= 0) close(*fd); }
static inline void fclosep(FILE **f) { if (*f) fclose(*f); }

#define _cleanup_free_ _cleanup_(freep)
#define _cleanup_close_ _cleanup_(closep)
#define _cleanup_fclose_ _cleanup_(fclosep)

/* Hands ownership out of a cleanup-scoped variable. */
#define TAKE_PTR(p) ({ __typeof__(p) _p = (p); (p) = NULL; _p; })
#define TAKE_FD(fd) ({ int _fd = (fd); (fd) = -1; _fd; })

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define MO_MIN(a, b) ((a) < (b) ? (a) : (b))
#define MO_MAX(a, b) ((a) > (b) ? (a) : (b))
