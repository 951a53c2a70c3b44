/* residency: the data-residency checks. Where a model may be loaded from
 * (configured directories only, no symlink out of them, no network
 * filesystem unless allowed), whether the daemon's network namespace can
 * reach anything beyond this machine (read with libnl), and the process
 * settings that keep prompts and answers off the disk (memory locking, no
 * core dumps). Pure policy: answers and reports; the daemon decides what to
 * do with them (strict mode refuses to serve, relaxed mode only logs). */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "common/moerr.h"

struct statfs;

/* ---- model files ------------------------------------------------------- */

/* The network filesystem a statfs f_type magic belongs to ("NFS", "CIFS",
 * "SMB2", "9p", "FUSE", "Ceph", ...), or NULL for a local one. FUSE counts
 * as network: sshfs, GlusterFS, s3fs, virtiofs all look alike from here. */
const char *residency_netfs_name(int64_t f_type);

/* 0 when fd lies on a local filesystem, or on a network one and
 * allow_network_fs; -EREMOTE (naming the filesystem) otherwise; the errno
 * of fstatfs when it fails. fstatfs_fn: NULL for fstatfs(2); tests pass a
 * fake, since a test cannot mount NFS. */
typedef int (*residency_fstatfs_fn)(int fd, struct statfs *st);
int residency_check_fs(int fd, bool allow_network_fs, residency_fstatfs_fn fstatfs_fn,
                       struct moerr *e);

/* How a path is walked beneath a directory. */
enum residency_walk {
        /* openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS), falling back to
         * RESIDENCY_WALK_NOFOLLOW when the kernel (< 5.6) or a seccomp
         * filter refuses openat2 with ENOSYS or EPERM. */
        RESIDENCY_WALK_AUTO,
        /* Component by component with O_NOFOLLOW: every symlink and every
         * ".." is refused, even one that would stay inside. */
        RESIDENCY_WALK_NOFOLLOW,
};

/* Opens rel beneath the directory dirfd for reading, refusing any escape:
 * "..", absolute symlinks, relative symlinks that climb out, /proc magic
 * links (-EXDEV or -ELOOP); with RESIDENCY_WALK_NOFOLLOW every symlink
 * (-ELOOP). Mount points inside the directory are crossed (the filesystem
 * is checked on the file itself). The result must be a regular file
 * (-EISDIR for a directory, -EINVAL for anything else). Returns the fd
 * (O_RDONLY | O_CLOEXEC) or a negative errno. */
int residency_open_beneath(int dirfd, const char *rel, enum residency_walk how,
                           struct moerr *e);

/* The model file at path, checked: path is absolute and under one of dirs,
 * or relative to one of them (tried in order; the first that has it wins).
 * Symlink rule (openat2, Linux >= 5.6): a relative symlink that stays
 * inside the directory is followed; an absolute one, or one that leaves the
 * directory, is refused; on older kernels every symlink is refused. The
 * file must be regular, and on a local filesystem unless allow_network_fs.
 *
 * Returns an fd open for reading (O_CLOEXEC; the caller closes it once the
 * model is loaded, a mapping keeps the file) or a negative errno: -ENOENT
 * (in no directory), -EXDEV (outside every directory, or escaping one),
 * -ELOOP (a symlink refused), -EISDIR / -EINVAL (not a regular file),
 * -EREMOTE (network filesystem), -EACCES, ...; e says which model and why.
 *
 * resolved (may be NULL) receives a malloc'ed path to hand to a loader that
 * takes a path: "/proc/self/fd/N", which reopens exactly the inode checked
 * (no race with a symlink swapped after the check) and stays usable under
 * ProtectProc=invisible, ProcSubset=pid and PR_SET_DUMPABLE 0 (a process
 * always sees its own fds); where /proc is not mounted, the checked path
 * dir/rel instead (subject to that race). Valid only while the fd is open. */
int residency_check_model_path(const char *path, char *const *dirs, size_t n_dirs,
                               bool allow_network_fs, char **resolved, struct moerr *e);

/* ---- the network namespace ---------------------------------------------- */

struct residency_link {
        char *name;
        int ifindex;
        bool up;                  /* IFF_UP (administratively up) */
        bool loopback;            /* IFF_LOOPBACK */
};

struct residency_report {
        bool ok;                  /* read, and nothing found */
        int error;                /* 0, or the negative errno that stopped the reading */
        char *error_text;         /* what failed then ("cannot read the network
                                   * namespace: links: ..."), else NULL */
        /* What leads off the machine, one line each: interfaces first
         * ("interface eth0 is up with 10.0.2.15/24, fe80::1/64"), then
         * routes ("default route via 10.0.2.2 dev eth0"). */
        char **findings;
        size_t n_findings;
        /* What was read (loopback included). */
        struct residency_link *links;
        size_t n_links;
        size_t n_addrs;
        size_t n_routes;
};

/* Reads the links, addresses and routes (IPv4 and IPv6, every table) of the
 * calling thread's network namespace over rtnetlink and fills r (cleared
 * first). The check passes when no interface other than loopback is up and
 * no route leads off the machine. A route is harmless when it drops
 * (blackhole, unreachable, prohibit, throw), delivers locally (local), or
 * every nexthop goes out a loopback interface; the broadcast, multicast and
 * anycast routes the kernel adds to the local table for each address are
 * not listed (they carry nothing unless their interface is up, and an up
 * interface is a finding of its own). Anything else is a finding: a route
 * through a non-loopback interface (up or down), through a gateway, or
 * whose nexthop libnl cannot show. Returns 0 when the namespace could be
 * read (r->ok says the verdict), else a negative errno with r->ok false and
 * r->error_text set. Reentrant: each call opens its own netlink socket.
 * r: zero-initialised or a report filled before (it is cleared first). */
int residency_check_netns(struct residency_report *r);
void residency_report_clear(struct residency_report *r);

/* What `moed --check-residency` prints: a verdict line, the findings (one
 * per line, indented), and what was read. malloc'ed; NULL when out of
 * memory. */
char *residency_report_text(const struct residency_report *r);
/* The findings (or the error) on one line, joined by "; ", for logs,
 * STATUS= and the status report; "" when ok. malloc'ed; NULL when out of
 * memory. */
char *residency_report_line(const struct residency_report *r);

/* ---- the process --------------------------------------------------------- */

/* Locks the process's memory so that prompts and answers cannot reach swap:
 * mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT), attempted only when
 * RLIMIT_MEMLOCK is infinite (LimitMEMLOCK=infinity; a soft limit under an
 * infinite hard one is raised) or the process has CAP_IPC_LOCK: under a
 * finite limit, MCL_FUTURE would make later allocations (the KV cache,
 * request buffers) fail instead.
 * MCL_ONFAULT keeps huge reservations (CUDA's, malloc's arenas) unpopulated.
 * Call it before the models are mapped, then residency_unlock_file_mappings
 * once they are. Returns 0 when locked, else a negative errno with a
 * warning in e (-EPERM: the limit is finite; mlockall's errno); the daemon
 * carries on either way. */
int residency_lock_memory(struct moerr *e);

/* munlock()s every file-backed mapping of the process (per
 * /proc/self/maps): model weights are mapped files whose pages are clean
 * page cache, never written to swap, and locking them would pin the whole
 * model in RAM. What holds prompts and answers is anonymous memory (heap,
 * KV cache, stacks), which stays locked. Returns the number of mappings
 * unlocked or a negative errno. */
int residency_unlock_file_mappings(struct moerr *e);

/* RLIMIT_CORE 0 (hard and soft) and PR_SET_DUMPABLE 0 (no core file, no
 * ptrace attach or /proc/PID/mem from the same user). 0 or a negative errno
 * with e. */
int residency_disable_core_dumps(struct moerr *e);

/* The residency state for GET /v1/moed/status and the D-Bus status. */
struct residency_status {
        bool strict;              /* Residency=strict */
        bool ok;                  /* the last namespace check passed */
        char detail[512];         /* its findings on one line, "" when ok */
        bool memory_locked;
        bool core_dumps_off;
};

/* Fills ok and detail from a report (the rest is left alone). */
void residency_status_set_report(struct residency_status *s, const struct residency_report *r);
/* {"mode": "strict"|"relaxed", "ok": bool, "detail": "...",
 *  "memory_locked": bool, "core_dumps_off": bool}; NULL when out of memory. */
json_t *residency_status_json(const struct residency_status *s);
