/* log: priority-prefixed lines on stderr, for journald or a terminal. */
#include "common/log.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

static int max_priority = LOG_INFO;

void mo_log_set_max(int priority)
{
        max_priority = priority;
}

void mo_log(int priority, const char *fmt, ...)
{
        static int journal = -1;
        char line[1024];
        va_list ap;

        if (priority > max_priority)
                return;
        if (journal < 0)
                journal = getenv("JOURNAL_STREAM") != NULL;
        va_start(ap, fmt);
        vsnprintf(line, sizeof line, fmt, ap);
        va_end(ap);
        if (journal)
                fprintf(stderr, "<%d>%s\n", priority, line);
        else
                fprintf(stderr, "moed: %s\n", line);
}
