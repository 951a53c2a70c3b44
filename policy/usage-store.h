/* usage-store: the quota book's usage across restarts, in
 * STATE_DIR/usage.json. Saving writes usage.json.tmp in the same
 * directory, fsyncs it, renames it over usage.json and fsyncs the
 * directory, so a crash at any point leaves either the old file or the
 * new one, whole: the daemon saves every N seconds and at exit, and a
 * crash loses at most the counts since the last save.
 *
 * The file is a JSON object:
 *   { "format": "moed-usage", "version": 1, "saved_at": <Unix seconds>,
 *     "tenants": { "NAME": { "requests": n, "refusals": n, "refused":
 *         { "MaxConcurrent": n, ... }, "prompt_tokens": n,
 *         "completion_tokens": n, "limited": n, "minute_used": n,
 *         "day_used": n }, ... },
 *     "sha256": "<hex>" }
 * where sha256 is the SHA-256 of the object without "sha256" written by
 * jansson with JSON_COMPACT | JSON_SORT_KEYS (its canonical form), so
 * a truncated file, a flipped byte or an edit is detected. Every number is
 * an integer >= 0; minute_used and day_used are the tokens the buckets had
 * yet to refill at saved_at and keep refilling for the time the daemon was
 * down. Tenants are kept whether or not the current set has them. */
#pragma once
#include "common/moerr.h"
#include "policy/quota.h"

#define USAGE_STORE_FILE "usage.json"
#define USAGE_STORE_VERSION 1
/* A larger file is not ours: treated as corrupt. */
#define USAGE_STORE_MAX_BYTES (16u << 20)

/* Writes the book's usage to state_dir/usage.json as above. The directory
 * must exist. Errors (-errno) name the file and the operation; the old
 * usage.json is then untouched. */
int usage_store_save(const char *state_dir, const struct quota_book *b, struct moerr *e);

/* Restores the counters of state_dir/usage.json into b (quota_restore, one
 * call per tenant, only once the whole file has checked out). 0 also when
 * there is no file (or no directory): a first start. A corrupt file (not
 * JSON, wrong format or version, bad checksum, wrong types, negative
 * numbers, bad tenant names, too large) gives -EBADMSG with a message that
 * says what is wrong and where the file went: it is renamed to
 * usage.json.corrupt-<Unix time> (-N added should that exist) and b is left
 * as it was, so the daemon starts counting from zero. Other errors (-EACCES,
 * -ELOOP for a symlink, -EIO, -ENOMEM) leave the file where it is. */
int usage_store_load(const char *state_dir, struct quota_book *b, struct moerr *e);
