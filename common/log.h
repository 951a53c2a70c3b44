/* log: one line per event on stderr. Under systemd (JOURNAL_STREAM set)
 * each line starts with its syslog priority "<N>" so journald files it at
 * the right level; on a terminal it reads "moed: ...". */
#pragma once
#include <syslog.h>

__attribute__((format(printf, 2, 3)))
void mo_log(int priority, const char *fmt, ...);
/* Lines above this priority are dropped (default LOG_INFO). */
void mo_log_set_max(int priority);
