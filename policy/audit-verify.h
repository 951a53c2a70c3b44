/* audit-verify: the hash chain of moed's audit file (AuditFile=): hashing a
 * line, reading a record's chain fields, and checking one file or a series
 * of rotated files. Shared by the daemon (policy/audit.c writes the file)
 * and moectl (`moectl audit verify`), so it depends only on jansson and
 * libcrypto and knows nothing of the daemon.
 *
 * The file: JSON lines (UTF-8, one record per line, each ending in "\n").
 * Every record starts with these keys, in this order:
 *   "seq"   1, 2, 3, ...: one counter for the whole chain, across rotations;
 *   "time"  when it was written, RFC 3339 UTC with microseconds;
 *   "prev"  SHA-256, 64 lowercase hex, of the exact bytes of the previous
 *           record's line without its "\n"; 64 zeros for the first record
 *           of a chain (seq 1);
 *   "event" "request" (a finished or refused request, fields as in
 *           policy/audit.h) or "rotate" (the first record of a file that
 *           continues another: "rotated_from" names that file, relative to
 *           the same directory, and "prev" is the hash of its last line;
 *           "broken" says why, when the daemon found that file damaged and
 *           set it aside instead of appending to it).
 * So a removed record shows as a seq gap and a prev that does not match, an
 * altered one as a hash that no longer matches its successor's prev,
 * reordered records as seq going backwards. A file's first line is either
 * seq 1 or a rotate record; anything else means its head was cut.
 *
 * Limits of a chain without an outside anchor: the last record is
 * protected only once a successor exists, and whoever can rewrite the file
 * can recompute every later hash. The daemon therefore also puts each
 * line's hash and seq in its journal record (MOED_AUDIT_HASH=,
 * MOED_AUDIT_SEQ=), a second copy to compare against. */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define AUDIT_HASH_HEX 64
#define AUDIT_ZERO_HASH "0000000000000000000000000000000000000000000000000000000000000000"
/* Longest "rotated_from" name kept (a file name, not a path). */
#define AUDIT_NAME_MAX 255

/* SHA-256 of line[0..len) as 64 lowercase hex digits and a NUL. */
void audit_line_hash(const void *line, size_t len, char out[AUDIT_HASH_HEX + 1]);

/* The chain fields of one record. */
struct audit_link {
        uint64_t seq;
        char prev[AUDIT_HASH_HEX + 1];
        bool rotate;                            /* "event":"rotate" */
        char rotated_from[AUDIT_NAME_MAX + 1];  /* "" when none */
        bool broken;                            /* "broken" present */
};

/* Parses one line (without its "\n"). 0, or -EBADMSG with *why set to a
 * static phrase ("not JSON", "no seq", ...). */
int audit_link_parse(const char *line, size_t len, struct audit_link *out, const char **why);

enum audit_problem {
        AUDIT_INTACT,
        AUDIT_REMOVED,          /* records missing: a seq gap, a cut head */
        AUDIT_ALTERED,          /* a record's bytes changed */
        AUDIT_REORDERED,        /* seq out of order */
        AUDIT_DUPLICATED,       /* the same record twice */
        AUDIT_TRUNCATED,        /* the last line ends without "\n" */
        AUDIT_MALFORMED,        /* a line that is not a record */
        AUDIT_BROKEN_LINK,      /* a file does not continue the one before it */
};
const char *audit_problem_name(enum audit_problem p); /* "removed", ... */

struct audit_verify_result {
        size_t files;
        size_t records;         /* lines that are records (parse) */
        uint64_t first_seq, last_seq;
        size_t problems;        /* breaks reported (consequences not counted) */
        /* The first problem (in checking order): its kind, the file (as
         * given) and the 1-based line it names. */
        enum audit_problem first;
        const char *first_path;
        size_t first_line;
};

/* Checks the files as one chain. They may be given in any order: they are
 * checked in the order of their first records' seq (ties: as given), each
 * file's lines in order, and each file against the one before it. Every
 * break goes to report (when non-NULL) as "PATH:LINE: what", with the line
 * that was removed, altered, reordered, duplicated or cut; breaks that
 * follow within two lines of one already reported are its consequences and
 * are not reported again. Then one summary line per file.
 * Returns 0 when the chain is intact, -EBADMSG when it is not, or another
 * negative errno when a file cannot be read (said in report). res may be
 * NULL. */
int audit_verify_files(const char *const *paths, size_t n, FILE *report,
                       struct audit_verify_result *res);
/* The same for one file. */
int audit_verify_file(const char *path, FILE *report);
