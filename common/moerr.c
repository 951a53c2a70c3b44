/* moerr: formatting of error messages into the caller's buffer. */
#include "moerr.h"

#include <stdio.h>
#include <string.h>

int moerr_set(struct moerr *e, int r, const char *fmt, ...)
{
        va_list ap;

        if (!e)
                return r;
        va_start(ap, fmt);
        vsnprintf(e->msg, sizeof e->msg, fmt, ap);
        va_end(ap);
        return r;
}

int moerr_prefix(struct moerr *e, int r, const char *fmt, ...)
{
        char old[sizeof e->msg];
        size_t n;
        va_list ap;

        if (!e)
                return r;
        memcpy(old, e->msg, sizeof old);
        va_start(ap, fmt);
        vsnprintf(e->msg, sizeof e->msg, fmt, ap);
        va_end(ap);
        /* Truncation is fine here: a long message loses its tail, not its head. */
        n = strnlen(e->msg, sizeof e->msg - 1);
        if (n + 2 < sizeof e->msg) {
                memcpy(e->msg + n, ": ", 2);
                n += 2;
                memcpy(e->msg + n, old, strnlen(old, sizeof e->msg - 1 - n));
                e->msg[n + strnlen(old, sizeof e->msg - 1 - n)] = 0;
        }
        return r;
}
