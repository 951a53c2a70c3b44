/* residency: model files opened only beneath the configured directories
 * (openat2 RESOLVE_BENEATH) and only from local filesystems (statfs magic),
 * the network namespace read over rtnetlink with libnl and judged, and the
 * process settings that keep prompts and answers in RAM. */
#include "policy/residency.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <linux/capability.h>
#include <linux/openat2.h>
#include <linux/rtnetlink.h>

#include <netlink/addr.h>
#include <netlink/cache.h>
#include <netlink/errno.h>
#include <netlink/netlink.h>
#include <netlink/route/addr.h>
#include <netlink/route/link.h>
#include <netlink/route/nexthop.h>
#include <netlink/route/route.h>
#include <netlink/route/rtnl.h>

#include "common/cleanup.h"

/* ---- filesystems ------------------------------------------------------- */

/* statfs f_type magics (linux/magic.h and the filesystems' own sources).
 * Compared on 32 bits: f_type is a signed long, and CIFS's magic has the
 * top bit set. */
static const struct {
        uint32_t magic;
        const char *name;
} netfs_magics[] = {
        { 0x00006969, "NFS" },
        { 0x0000517b, "SMB" },
        { 0xff534d42, "CIFS" },
        { 0xfe534d42, "SMB2" },
        { 0x01021997, "9p" },
        { 0x65735546, "FUSE" },    /* also GlusterFS, sshfs, s3fs, virtiofs */
        { 0x00c36400, "Ceph" },
        { 0x5346414f, "AFS" },
        { 0x6b414653, "kAFS" },
        { 0x01161970, "GFS2" },
        { 0x7461636f, "OCFS2" },
        { 0x0bd00bd0, "Lustre" },
        { 0x73757245, "Coda" },
        { 0x0000564c, "NCP" },
        { 0x47504653, "GPFS" },
        { 0x20030528, "OrangeFS" },
        { 0xaad7aaea, "PanFS" },
        { 0x19830326, "BeeGFS" },
        { 0x786f4256, "vboxsf" },  /* a host's folder seen from a guest */
};

const char *residency_netfs_name(int64_t f_type)
{
        uint32_t m = (uint32_t)f_type;

        for (size_t i = 0; i < ARRAY_SIZE(netfs_magics); i++)
                if (netfs_magics[i].magic == m)
                        return netfs_magics[i].name;
        return NULL;
}

int residency_check_fs(int fd, bool allow_network_fs, residency_fstatfs_fn fstatfs_fn,
                       struct moerr *e)
{
        struct statfs st;
        const char *name;

        if ((fstatfs_fn ? fstatfs_fn(fd, &st) : fstatfs(fd, &st)) < 0)
                return moerr_set(e, -errno, "statfs: %s", strerror(errno));
        name = residency_netfs_name((int64_t)st.f_type);
        if (!name || allow_network_fs)
                return 0;
        return moerr_set(e, -EREMOTE,
                         "on a network filesystem (%s, statfs magic 0x%" PRIx32 "), refused "
                         "(AllowNetworkFilesystems=yes allows it)",
                         name, (uint32_t)st.f_type);
}

/* ---- walking beneath a directory ---------------------------------------- */

static const char *file_kind(mode_t m)
{
        switch (m & S_IFMT) {
        case S_IFDIR:
                return "a directory";
        case S_IFIFO:
                return "a FIFO";
        case S_IFSOCK:
                return "a socket";
        case S_IFCHR:
                return "a character device";
        case S_IFBLK:
                return "a block device";
        }
        return "not a regular file";
}

/* O_NONBLOCK so that a FIFO planted in the directory cannot hang the
 * daemon in open(); cleared again once we know the file is regular. */
#define OPEN_FLAGS (O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK)

static int walk_openat2(int dirfd, const char *rel, struct moerr *e)
{
        struct open_how how = {
                .flags = OPEN_FLAGS,
                .resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
        };
        long fd = -1;

        /* EAGAIN: a concurrent rename made the kernel give up on ".."
         * resolution; it asks to be retried. */
        for (int i = 0; i < 8; i++) {
                fd = syscall(SYS_openat2, dirfd, rel, &how, sizeof how);
                if (fd >= 0 || errno != EAGAIN)
                        break;
        }
        if (fd >= 0)
                return (int)fd;
        switch (errno) {
        case ENOSYS:
        case EPERM:
                return -errno; /* the caller falls back */
        case EXDEV:
                return moerr_set(e, -EXDEV, "leaves the directory (through '..', an absolute "
                                 "symlink or a symlink pointing out of it)");
        case ELOOP:
                return moerr_set(e, -ELOOP, "too many symlinks, or a /proc magic link");
        default:
                return moerr_set(e, -errno, "%s", strerror(errno));
        }
}

/* The next path component other than "" and "."; NULL at the end. */
static char *next_component(char **rest)
{
        char *p;

        while ((p = strsep(rest, "/")))
                if (*p && strcmp(p, ".") != 0)
                        return p;
        return NULL;
}

/* The pre-5.6 walk: no symlink and no ".." at all, so nothing can leave. */
static int walk_nofollow(int dirfd, const char *rel, struct moerr *e)
{
        _cleanup_free_ char *copy = strdup(rel);
        _cleanup_close_ int cur = -1;
        char *rest = copy, *p, *next;
        int at = dirfd, fd;

        if (!copy)
                return moerr_set(e, -ENOMEM, "out of memory");
        p = next_component(&rest);
        if (!p)
                p = (char *)".";
        for (;; p = next) {
                struct stat st;

                if (strcmp(p, "..") == 0)
                        return moerr_set(e, -EXDEV, "'..' refused (this kernel has no openat2)");
                if (fstatat(at, p, &st, AT_SYMLINK_NOFOLLOW) < 0)
                        return moerr_set(e, -errno, "%s: %s", p, strerror(errno));
                if (S_ISLNK(st.st_mode))
                        return moerr_set(e, -ELOOP, "%s is a symlink, refused (this kernel "
                                         "has no openat2 to check where it leads)", p);
                next = next_component(&rest);
                if (!next)
                        break;
                /* O_NOFOLLOW: a symlink swapped in since the fstatat fails
                 * with ENOTDIR rather than being followed. */
                fd = openat(at, p, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
                if (fd < 0)
                        return moerr_set(e, -errno, "%s: %s", p, strerror(errno));
                if (cur >= 0)
                        close(cur);
                at = cur = fd;
        }
        fd = openat(at, p, OPEN_FLAGS | O_NOFOLLOW);
        if (fd < 0)
                return moerr_set(e, -errno, "%s: %s", p, strerror(errno));
        return fd;
}

int residency_open_beneath(int dirfd, const char *rel, enum residency_walk how,
                           struct moerr *e)
{
        _cleanup_close_ int fd = -1;
        struct stat st;
        int flags;

        if (!rel || !*rel)
                rel = ".";
        if (how == RESIDENCY_WALK_AUTO) {
                fd = walk_openat2(dirfd, rel, e);
                if (fd == -ENOSYS || fd == -EPERM)
                        how = RESIDENCY_WALK_NOFOLLOW;
        }
        if (how == RESIDENCY_WALK_NOFOLLOW)
                fd = walk_nofollow(dirfd, rel, e);
        if (fd < 0)
                return fd;
        if (fstat(fd, &st) < 0)
                return moerr_set(e, -errno, "fstat: %s", strerror(errno));
        if (!S_ISREG(st.st_mode))
                return moerr_set(e, S_ISDIR(st.st_mode) ? -EISDIR : -EINVAL,
                                 "%s, not a regular file", file_kind(st.st_mode));
        flags = fcntl(fd, F_GETFL);
        if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) < 0)
                return moerr_set(e, -errno, "fcntl: %s", strerror(errno));
        return TAKE_FD(fd);
}

/* ---- model paths --------------------------------------------------------- */

/* The part of the absolute path below dir ("" for dir itself), or NULL
 * when path is not under dir. Lexical: ".." in the rest is left for the
 * kernel to refuse. */
static const char *below(const char *path, const char *dir)
{
        size_t n = strlen(dir);

        while (n > 1 && dir[n - 1] == '/')
                n--;
        if (n == 1 && dir[0] == '/')
                n = 0;
        if (strncmp(path, dir, n) != 0 || (path[n] != '/' && path[n] != 0))
                return NULL;
        path += n;
        while (*path == '/')
                path++;
        return path;
}

/* Where the file can be opened again by path: its /proc/self/fd link when
 * /proc shows this very inode there, else the path as checked. */
static char *path_to_load(int fd, const char *dir, const char *rel)
{
        char proc[64];
        struct stat a, b;
        char *out = NULL;
        size_t n = strlen(dir);

        snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
        if (fstat(fd, &a) == 0 && stat(proc, &b) == 0 && a.st_dev == b.st_dev &&
            a.st_ino == b.st_ino)
                return strdup(proc);
        while (n > 1 && dir[n - 1] == '/')
                n--;
        if (asprintf(&out, "%.*s/%s", (int)n, dir, rel) < 0)
                return NULL;
        return out;
}

static int open_in_dir(const char *path, const char *dir, const char *rel, bool allow_network_fs,
                       char **resolved, struct moerr *e)
{
        _cleanup_close_ int dfd = -1, fd = -1;
        int r;

        dfd = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0)
                return moerr_set(e, -errno, "model %s: model directory %s: %s", path, dir,
                                 strerror(errno));
        fd = residency_open_beneath(dfd, rel, RESIDENCY_WALK_AUTO, e);
        if (fd < 0)
                return moerr_prefix(e, fd, "model %s in %s", path, dir);
        r = residency_check_fs(fd, allow_network_fs, NULL, e);
        if (r < 0)
                return moerr_prefix(e, r, "model %s in %s", path, dir);
        if (resolved) {
                *resolved = path_to_load(fd, dir, rel);
                if (!*resolved)
                        return moerr_set(e, -ENOMEM, "out of memory");
        }
        return TAKE_FD(fd);
}

static void list_dirs(char *buf, size_t cap, char *const *dirs, size_t n_dirs)
{
        size_t used = 0;

        buf[0] = 0;
        for (size_t i = 0; i < n_dirs && used < cap; i++) {
                int w = snprintf(buf + used, cap - used, "%s%s", i ? ", " : "", dirs[i]);

                if (w < 0)
                        break;
                used += (size_t)w;
        }
}

int residency_check_model_path(const char *path, char *const *dirs, size_t n_dirs,
                               bool allow_network_fs, char **resolved, struct moerr *e)
{
        struct moerr kept = { { 0 } }, one;
        int kept_r = 0;
        bool matched = false;
        char names[256];

        if (resolved)
                *resolved = NULL;
        if (!path || !*path)
                return moerr_set(e, -EINVAL, "model path is empty");
        list_dirs(names, sizeof names, dirs, n_dirs);
        if (n_dirs == 0)
                return moerr_set(e, -EXDEV, "model %s: no model directory is configured "
                                 "(ModelDirectories=)", path);
        for (size_t i = 0; i < n_dirs; i++) {
                _cleanup_free_ char *real = NULL;
                const char *rel = path;
                int r;

                if (!dirs[i] || !dirs[i][0])
                        continue;
                if (path[0] == '/') {
                        rel = below(path, dirs[i]);
                        /* A directory configured through a symlink
                         * (/var/lib/moed/models -> /srv/models) also
                         * owns the paths under its target. */
                        if (!rel && (real = realpath(dirs[i], NULL)))
                                rel = below(path, real);
                        if (!rel)
                                continue;
                }
                matched = true;
                one.msg[0] = 0;
                r = open_in_dir(path, dirs[i], rel, allow_network_fs, resolved, &one);
                if (r >= 0)
                        return r;
                /* The first refusal says more than "not found here". */
                if (kept_r == 0 || (kept_r == -ENOENT && r != -ENOENT)) {
                        kept_r = r;
                        kept = one;
                }
        }
        if (!matched)
                return moerr_set(e, -EXDEV, "model %s is not under any model directory (%s)",
                                 path, names);
        if (kept_r == -ENOENT && n_dirs > 1)
                return moerr_set(e, -ENOENT, "model %s: not found in any model directory (%s)",
                                 path, names);
        if (e)
                *e = kept;
        return kept_r;
}

/* ---- the network namespace ------------------------------------------------ */

void residency_report_clear(struct residency_report *r)
{
        for (size_t i = 0; i < r->n_findings; i++)
                free(r->findings[i]);
        free(r->findings);
        for (size_t i = 0; i < r->n_links; i++)
                free(r->links[i].name);
        free(r->links);
        free(r->error_text);
        memset(r, 0, sizeof *r);
}

static int add_finding(struct residency_report *r, char *line)
{
        char **v;

        if (!line)
                return -ENOMEM;
        v = realloc(r->findings, (r->n_findings + 1) * sizeof *v);
        if (!v) {
                free(line);
                return -ENOMEM;
        }
        r->findings = v;
        r->findings[r->n_findings++] = line;
        return 0;
}

static const struct residency_link *link_of(const struct residency_report *r, int ifindex)
{
        for (size_t i = 0; i < r->n_links; i++)
                if (r->links[i].ifindex == ifindex)
                        return &r->links[i];
        return NULL;
}

static int nl_to_errno(int nlerr)
{
        switch (nlerr < 0 ? -nlerr : nlerr) {
        case NLE_NOMEM:
                return -ENOMEM;
        case NLE_PERM:
                return -EPERM;
        case NLE_NOACCESS:
                return -EACCES;
        case NLE_AF_NOSUPPORT:
        case NLE_OPNOTSUPP:
                return -EOPNOTSUPP;
        }
        return -EIO;
}

static int read_links(struct residency_report *r, struct nl_cache *links)
{
        for (struct nl_object *o = nl_cache_get_first(links); o; o = nl_cache_get_next(o)) {
                struct rtnl_link *l = (struct rtnl_link *)o;
                struct residency_link *v;
                const char *name = rtnl_link_get_name(l);
                unsigned flags = rtnl_link_get_flags(l);

                v = realloc(r->links, (r->n_links + 1) * sizeof *v);
                if (!v)
                        return -ENOMEM;
                r->links = v;
                v = &r->links[r->n_links];
                *v = (struct residency_link){
                        .name = strdup(name ? name : "?"),
                        .ifindex = rtnl_link_get_ifindex(l),
                        .up = flags & IFF_UP,
                        .loopback = flags & IFF_LOOPBACK,
                };
                if (!v->name)
                        return -ENOMEM;
                r->n_links++;
        }
        return 0;
}

/* "interface eth0 (veth) is up with 10.0.2.15/24, fe80::1/64" */
static int find_up_links(struct residency_report *r, struct nl_cache *links,
                         struct nl_cache *addrs)
{
        for (struct nl_object *o = nl_cache_get_first(links); o; o = nl_cache_get_next(o)) {
                struct rtnl_link *l = (struct rtnl_link *)o;
                const struct residency_link *rl = link_of(r, rtnl_link_get_ifindex(l));
                const char *kind = rtnl_link_get_type(l);
                char *line = NULL;
                size_t len = 0, n = 0;
                FILE *f;

                if (!rl || !rl->up || rl->loopback)
                        continue;
                f = open_memstream(&line, &len);
                if (!f)
                        return -ENOMEM;
                fprintf(f, "interface %s", rl->name);
                if (kind)
                        fprintf(f, " (%s)", kind);
                fprintf(f, " is up");
                for (struct nl_object *ao = nl_cache_get_first(addrs); ao;
                     ao = nl_cache_get_next(ao)) {
                        struct rtnl_addr *a = (struct rtnl_addr *)ao;
                        struct nl_addr *local = rtnl_addr_get_local(a);
                        char buf[INET6_ADDRSTRLEN + 8];

                        if (rtnl_addr_get_ifindex(a) != rl->ifindex || !local)
                                continue;
                        fprintf(f, "%s%s", n++ ? ", " : " with ",
                                nl_addr2str(local, buf, sizeof buf));
                }
                if (n == 0)
                        fprintf(f, " (no address)");
                if (fclose(f) != 0) {
                        free(line);
                        return -ENOMEM;
                }
                if (add_finding(r, line) < 0)
                        return -ENOMEM;
        }
        return 0;
}

/* Whether a route can carry a packet off the machine (see the header). */
static bool route_leaves(const struct residency_report *r, struct rtnl_route *rt)
{
        int type = rtnl_route_get_type(rt), n = rtnl_route_get_nnexthops(rt);

        switch (type) {
        case RTN_LOCAL:
        case RTN_BLACKHOLE:
        case RTN_UNREACHABLE:
        case RTN_PROHIBIT:
        case RTN_THROW:
                return false;
        case RTN_BROADCAST:
        case RTN_MULTICAST:
        case RTN_ANYCAST:
                if (rtnl_route_get_table(rt) == RT_TABLE_LOCAL)
                        return false;
                break;
        }
        if (n <= 0)
                return true; /* a nexthop we cannot see (a nexthop object) */
        for (int i = 0; i < n; i++) {
                struct rtnl_nexthop *nh = rtnl_route_nexthop_n(rt, i);
                const struct residency_link *l = nh ? link_of(r, rtnl_route_nh_get_ifindex(nh)) : NULL;

                if (!l || !l->loopback)
                        return true;
        }
        return false;
}

/* "default route via 10.0.2.2 dev eth0", "multicast route ff00::/8 dev d0
 * (table 7)" */
static int describe_route(const struct residency_report *r, struct rtnl_route *rt, char **out)
{
        struct nl_addr *dst = rtnl_route_get_dst(rt);
        int type = rtnl_route_get_type(rt), n = rtnl_route_get_nnexthops(rt);
        uint32_t table = rtnl_route_get_table(rt);
        char buf[INET6_ADDRSTRLEN + 8];
        size_t len = 0;
        FILE *f;

        *out = NULL;
        f = open_memstream(out, &len);
        if (!f)
                return -ENOMEM;
        if (type != RTN_UNICAST)
                fprintf(f, "%s ", nl_rtntype2str(type, buf, sizeof buf));
        if (!dst || nl_addr_get_prefixlen(dst) == 0)
                fprintf(f, "default route");
        else
                fprintf(f, "route %s", nl_addr2str(dst, buf, sizeof buf));
        for (int i = 0; i < n; i++) {
                struct rtnl_nexthop *nh = rtnl_route_nexthop_n(rt, i);
                struct nl_addr *gw = nh ? rtnl_route_nh_get_gateway(nh) : NULL;
                const struct residency_link *l = nh ? link_of(r, rtnl_route_nh_get_ifindex(nh)) : NULL;

                if (i)
                        fprintf(f, ",");
                if (gw)
                        fprintf(f, " via %s", nl_addr2str(gw, buf, sizeof buf));
                if (l)
                        fprintf(f, " dev %s", l->name);
                else if (nh && rtnl_route_nh_get_ifindex(nh) > 0)
                        fprintf(f, " dev #%d", rtnl_route_nh_get_ifindex(nh));
        }
        if (n <= 0)
                fprintf(f, " (nexthop not shown)");
        if (table == RT_TABLE_LOCAL)
                fprintf(f, " (table local)");
        else if (table != RT_TABLE_MAIN)
                fprintf(f, " (table %" PRIu32 ")", table);
        if (fclose(f) != 0) {
                free(*out);
                *out = NULL;
                return -ENOMEM;
        }
        return 0;
}

static int find_routes(struct residency_report *r, struct nl_cache *routes)
{
        for (struct nl_object *o = nl_cache_get_first(routes); o; o = nl_cache_get_next(o)) {
                struct rtnl_route *rt = (struct rtnl_route *)o;
                char *line;

                r->n_routes++;
                if (!route_leaves(r, rt))
                        continue;
                if (describe_route(r, rt, &line) < 0 || add_finding(r, line) < 0)
                        return -ENOMEM;
        }
        return 0;
}

static int netns_fail(struct residency_report *r, int err, const char *what, const char *why)
{
        r->ok = false;
        r->error = err;
        if (asprintf(&r->error_text, "cannot read the network namespace: %s: %s", what, why) < 0)
                r->error_text = NULL;
        return err;
}

int residency_check_netns(struct residency_report *r)
{
        struct nl_sock *sk;
        struct nl_cache *links = NULL, *addrs = NULL, *routes = NULL;
        const char *what = NULL;
        int err, ret = 0;

        residency_report_clear(r);
        sk = nl_socket_alloc();
        if (!sk)
                return netns_fail(r, -ENOMEM, "netlink", "out of memory");
        if ((err = nl_connect(sk, NETLINK_ROUTE)) < 0)
                what = "netlink socket";
        else if ((err = rtnl_link_alloc_cache(sk, AF_UNSPEC, &links)) < 0)
                what = "links";
        else if ((err = rtnl_addr_alloc_cache(sk, &addrs)) < 0)
                what = "addresses";
        else if ((err = rtnl_route_alloc_cache(sk, AF_UNSPEC, 0, &routes)) < 0)
                what = "routes";
        if (what) {
                ret = netns_fail(r, nl_to_errno(err), what, nl_geterror(err));
                goto out;
        }
        for (struct nl_object *o = nl_cache_get_first(addrs); o; o = nl_cache_get_next(o))
                r->n_addrs++;
        if (read_links(r, links) < 0 || find_up_links(r, links, addrs) < 0 ||
            find_routes(r, routes) < 0) {
                ret = netns_fail(r, -ENOMEM, "netlink", "out of memory");
                goto out;
        }
        r->ok = r->n_findings == 0;
out:
        if (routes)
                nl_cache_free(routes);
        if (addrs)
                nl_cache_free(addrs);
        if (links)
                nl_cache_free(links);
        nl_socket_free(sk);
        return ret;
}

char *residency_report_text(const struct residency_report *r)
{
        char *text = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&text, &len);

        if (!f)
                return NULL;
        if (r->error)
                fprintf(f, "residency: NOT OK: %s\n",
                        r->error_text ? r->error_text : "cannot read the network namespace");
        else if (r->ok)
                fprintf(f, "residency: ok: no interface but loopback is up and no route "
                        "leaves this machine\n");
        else
                fprintf(f, "residency: NOT OK: this network namespace reaches beyond the "
                        "machine:\n");
        for (size_t i = 0; i < r->n_findings; i++)
                fprintf(f, "  %s\n", r->findings[i]);
        if (!r->error) {
                fprintf(f, "  read %zu interface%s:", r->n_links, r->n_links == 1 ? "" : "s");
                for (size_t i = 0; i < r->n_links; i++)
                        fprintf(f, "%s %s (%s%s)", i ? "," : "", r->links[i].name,
                                r->links[i].loopback ? "loopback, " : "",
                                r->links[i].up ? "up" : "down");
                fprintf(f, "; %zu address%s; %zu route%s\n", r->n_addrs,
                        r->n_addrs == 1 ? "" : "es", r->n_routes, r->n_routes == 1 ? "" : "s");
        }
        if (fclose(f) != 0) {
                free(text);
                return NULL;
        }
        return text;
}

char *residency_report_line(const struct residency_report *r)
{
        char *line = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&line, &len);

        if (!f)
                return NULL;
        if (r->error)
                fprintf(f, "%s", r->error_text ? r->error_text : "cannot read the network namespace");
        for (size_t i = 0; i < r->n_findings; i++)
                fprintf(f, "%s%s", i || r->error ? "; " : "", r->findings[i]);
        if (fclose(f) != 0) {
                free(line);
                return NULL;
        }
        return line;
}

/* ---- the process ------------------------------------------------------------ */

/* CAP_IPC_LOCK in the effective set: mlock then ignores RLIMIT_MEMLOCK. */
static bool can_ipc_lock(void)
{
        struct __user_cap_header_struct h = { .version = _LINUX_CAPABILITY_VERSION_3 };
        struct __user_cap_data_struct d[2] = { { 0 } };

        if (syscall(SYS_capget, &h, d) < 0)
                return false;
        return d[CAP_IPC_LOCK / 32].effective & (1u << (CAP_IPC_LOCK % 32));
}

int residency_lock_memory(struct moerr *e)
{
        struct rlimit rl;

        if (getrlimit(RLIMIT_MEMLOCK, &rl) < 0)
                return moerr_set(e, -errno, "memory not locked: getrlimit: %s", strerror(errno));
        /* A soft limit below an infinite hard one is ours to raise. */
        if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_max == RLIM_INFINITY) {
                rl.rlim_cur = RLIM_INFINITY;
                if (setrlimit(RLIMIT_MEMLOCK, &rl) < 0)
                        rl.rlim_cur = 0;
        }
        if (rl.rlim_cur != RLIM_INFINITY && !can_ipc_lock())
                return moerr_set(e, -EPERM,
                                 "memory not locked: RLIMIT_MEMLOCK is %" PRIu64 " KiB, not "
                                 "infinity, and no CAP_IPC_LOCK (LimitMEMLOCK=infinity allows "
                                 "it); prompts and answers could be written to swap",
                                 (uint64_t)rl.rlim_cur / 1024);
        /* The system call itself: sanitizer runtimes replace mlockall()
         * with a no-op that reports success. */
        if (syscall(SYS_mlockall, MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) < 0)
                return moerr_set(e, -errno, "memory not locked: mlockall: %s; prompts and "
                                 "answers could be written to swap", strerror(errno));
        return 0;
}

int residency_unlock_file_mappings(struct moerr *e)
{
        _cleanup_fclose_ FILE *f = fopen("/proc/self/maps", "re");
        _cleanup_free_ char *line = NULL;
        size_t cap = 0;
        int n = 0;

        if (!f)
                return moerr_set(e, -errno, "/proc/self/maps: %s", strerror(errno));
        while (getline(&line, &cap, f) > 0) {
                uintptr_t lo, hi;
                char perms[8];
                unsigned long long inode;

                if (sscanf(line, "%" SCNxPTR "-%" SCNxPTR " %7s %*s %*s %llu", &lo, &hi, perms,
                           &inode) != 4)
                        continue;
                /* Writable file mappings (a program's .data) may hold
                 * what it wrote; only read-only files are unlocked. */
                if (inode == 0 || perms[1] == 'w' || hi <= lo)
                        continue;
                if (syscall(SYS_munlock, lo, hi - lo) == 0)
                        n++;
                else if (errno != ENOMEM) /* ENOMEM: unmapped meanwhile */
                        return moerr_set(e, -errno, "munlock: %s", strerror(errno));
        }
        return n;
}

int residency_disable_core_dumps(struct moerr *e)
{
        struct rlimit zero = { 0, 0 }, rl;

        /* LimitCORE=0 may have done it already, and a system-call filter
         * without @resources would refuse setrlimit. */
        if ((getrlimit(RLIMIT_CORE, &rl) < 0 || rl.rlim_cur != 0 || rl.rlim_max != 0) &&
            setrlimit(RLIMIT_CORE, &zero) < 0)
                return moerr_set(e, -errno, "setrlimit(RLIMIT_CORE): %s", strerror(errno));
        /* Not dumpable: the kernel writes no core even to a core_pattern
         * pipe (which ignores RLIMIT_CORE), and the same user cannot ptrace
         * us or read /proc/PID/mem. Reset by execve and by credential
         * changes: call it after dropping privileges. */
        if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
                return moerr_set(e, -errno, "prctl(PR_SET_DUMPABLE): %s", strerror(errno));
        return 0;
}

void residency_status_set_report(struct residency_status *s, const struct residency_report *r)
{
        _cleanup_free_ char *line = residency_report_line(r);

        s->ok = r->ok;
        snprintf(s->detail, sizeof s->detail, "%s", line ? line : "out of memory");
}

json_t *residency_status_json(const struct residency_status *s)
{
        return json_pack("{s:s, s:b, s:s, s:b, s:b}",
                         "mode", s->strict ? "strict" : "relaxed",
                         "ok", s->ok,
                         "detail", s->detail,
                         "memory_locked", s->memory_locked,
                         "core_dumps_off", s->core_dumps_off);
}
