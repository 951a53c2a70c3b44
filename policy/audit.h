/* audit: one record per finished or refused request, to journald (or,
 * without journald, to stderr as one key=value line), and optionally
 * (AuditFile=) to an append-only JSON-lines file whose records are chained
 * by SHA-256, so that a removed, altered or reordered record shows. The
 * file's format and what the chain can and cannot prove are described in
 * policy/audit-verify.h, which also checks it.
 *
 * Journal fields (MESSAGE_ID=AUDIT_MESSAGE_ID, PRIORITY=6,
 * SYSLOG_IDENTIFIER=moed, a readable MESSAGE=):
 *   MOED_TENANT= MOED_UID= MOED_GID= MOED_PID= MOED_DOOR= MOED_MODEL=
 *   MOED_REQUEST_ID= MOED_PROMPT_TOKENS= MOED_COMPLETION_TOKENS=
 *   MOED_QUEUE_USEC= MOED_FIRST_TOKEN_USEC= MOED_TOTAL_USEC= MOED_FINISH=
 *   MOED_REFUSAL= MOED_PROMPT= MOED_ANSWER= MOED_AUDIT_SEQ= MOED_AUDIT_HASH=
 * A field whose value is absent is left out: no tenant (refused before one
 * was found), uid/gid (uid_t)-1, pid <= 0, NULL strings; timings only for
 * served requests (refusal == NULL), the first-token time only when a token
 * came; content only when given (the caller gives it only for a tenant with
 * LogContent=yes); MOED_AUDIT_SEQ/HASH (the file line's seq and SHA-256)
 * only when the record went to the audit file.
 *
 * The fallback line (stderr, or the stream the config names): the same
 * fields in the same order, "KEY=value" separated by single spaces; a
 * value is written bare when it is non-empty and holds only printable
 * characters other than space, '"', '\\' and '=', else in double quotes
 * with \" \\ \n \r \t and \xNN escapes (bytes >= 0x80 pass as they are).
 *
 * File records: the chain keys of audit-verify.h, then "event":"request"
 * and request_id, tenant, uid, gid, pid, door, model, prompt_tokens,
 * completion_tokens, queue_usec, first_token_usec, total_usec, finish,
 * refusal, prompt, answer under the same rules of absence. The file is
 * opened O_APPEND|O_CLOEXEC|O_NOFOLLOW, mode 0600, each record is one
 * write() followed by fdatasync(): an acknowledged record survives a crash
 * (a request takes seconds; a sync costs milliseconds). A short write is
 * cut back off the file so the chain stays whole.
 *
 * Start: the existing file's last two records are checked (a whole last
 * line that parses, linked to the one before). A file that fails is set
 * aside, never appended to: renamed to FILE.<first seq>.broken (or
 * FILE.broken) and a new FILE starts with a rotate record that carries
 * "broken" and continues from the last whole record found; the daemon's
 * log says so at LOG_CRIT.
 *
 * Rotation (audit_rotate, and before a record once the file holds
 * rotate_bytes or more): the file is renamed FILE.<seq of its first
 * record> (".N" added should that exist) and the new FILE starts with a
 * rotate record naming it. The new file is written first as FILE.rotating
 * and renamed into place, so a crash leaves either the old FILE or both
 * files; the next start finishes or drops the half-done rotation. Nothing
 * deletes rotated files: retention is the administrator's.
 *
 * Main-loop thread only. */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "common/moerr.h"

/* Made once with `systemd-id128 new`; the catalog entry is
 * policy/moed.catalog. */
#define AUDIT_MESSAGE_ID "740c0de242704d41b9c8eaab7f3f9bf7"
#define AUDIT_ROTATE_BYTES (64ull << 20)
#define AUDIT_JOURNAL_SOCKET "/run/systemd/journal/socket"

struct audit_record {
        const char *tenant;             /* NULL: no tenant was found */
        uid_t uid;                      /* (uid_t)-1: unknown */
        gid_t gid;                      /* (gid_t)-1: unknown */
        pid_t pid;                      /* <= 0: unknown (some bus peers) */
        const char *door;               /* "http" or "dbus" */
        const char *model;              /* NULL when refused before one was found */
        const char *request_id;         /* "chatcmpl-…", NULL when none was made */
        int64_t prompt_tokens;
        int64_t completion_tokens;
        double queue_s;                 /* submit to first scheduled */
        double first_token_s;           /* submit to first token; <= 0: none came */
        double total_s;                 /* submit to finish */
        const char *finish_reason;      /* "stop", "length", "cancelled", "error" */
        const char *refusal;            /* why it was refused; NULL when served */
        /* Content: only for a tenant with LogContent=yes, else NULL. */
        const char *prompt_text;
        const char *answer_text;
};

struct audit_config {
        const char *file;               /* AuditFile=; NULL or "": none */
        uint64_t rotate_bytes;          /* 0: AUDIT_ROTATE_BYTES */
        /* Where journal records go instead of journald (tests): the fields
         * as "KEY=value" iovecs. A negative return sends the record to the
         * fallback stream. NULL: sd_journal_sendv when journal_socket is
         * a socket, else the fallback stream (sd_journal_sendv itself
         * drops records silently when journald is absent). */
        int (*send)(void *user, const struct iovec *iov, size_t n);
        void *send_user;
        FILE *fallback;                 /* NULL: stderr */
        /* The socket whose presence means journald runs (records always go
         * to journald's own socket); NULL: AUDIT_JOURNAL_SOCKET. */
        const char *journal_socket;
};

struct audit;

/* Opens the audit file (when configured), continuing its chain or setting
 * a damaged one aside. Errors (the directory is missing or not writable,
 * the path is a symlink or not a regular file) name the path. */
int audit_open(const struct audit_config *c, struct audit **out, struct moerr *e);
void audit_close(struct audit *a);

/* Records one finished or refused request. The journal (or fallback)
 * record is always sent; the return value is 0 or the negative errno of
 * the audit file's write (said in the daemon's log too). */
int audit_log(struct audit *a, const struct audit_record *r);

/* Starts a new audit file now (see above). 0 also when there is nothing to
 * rotate (an empty file); -ENOENT without AuditFile=. */
int audit_rotate(struct audit *a, struct moerr *e);

/* The chain's state: the last seq written (0: none) and the file's size. */
uint64_t audit_seq(const struct audit *a);
uint64_t audit_file_size(const struct audit *a);
/* Whether audit_open found the file damaged and set it aside. */
bool audit_recovered(const struct audit *a);

/* Writes fields as one fallback line (the format above) and a newline. */
void audit_write_line(FILE *out, const struct iovec *iov, size_t n);
