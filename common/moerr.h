/* moerr: the error buffer that travels with a failing call.
 * Functions return 0 or a negative errno; the human-readable reason goes
 * into a caller-provided struct moerr (which may be NULL). */
#pragma once
#include <stdarg.h>
#include <stddef.h>

struct moerr {
        char msg[512];
};

/* Formats the message into e (if non-NULL) and returns r, so that a failure
 * is one line: return moerr_set(e, -EINVAL, "tensor %s: bad shape", name); */
__attribute__((format(printf, 3, 4)))
int moerr_set(struct moerr *e, int r, const char *fmt, ...);

/* Prepends "prefix: " to the message already in e; returns r. */
__attribute__((format(printf, 3, 4)))
int moerr_prefix(struct moerr *e, int r, const char *fmt, ...);
