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
        char prefix[256], old[sizeof e->msg];
        va_list ap;

        if (!e)
                return r;
        va_start(ap, fmt);
        vsnprintf(prefix, sizeof prefix, fmt, ap);
        va_end(ap);
        memcpy(old, e->msg, sizeof old);
        snprintf(e->msg, sizeof e->msg, "%s: %s", prefix, old);
        return r;
}
