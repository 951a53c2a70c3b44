/* test-residency: policy/residency.c. Model paths against a tree of real
 * files and symlinks in a temporary directory; network filesystems through
 * a fake fstatfs; the network namespace as it is (compared with `ip -o
 * link`) and in namespaces made for the test by forked children
 * (unshare(CLONE_NEWNET), set up with `ip`); memory locking and core dumps
 * in forked children, so the test process itself is left alone. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/cleanup.h"
#include "policy/residency.h"
#include "tests/testutil.h"

/* ---- the tree ----------------------------------------------------------- */

/* models/            a.gguf, sub/b.gguf, fifo, and symlinks:
 *   inner -> sub/b.gguf         (relative, stays inside)
 *   escape -> ../outside/secret.gguf
 *   dirlink -> ../outside
 *   abs -> <models>/a.gguf      (absolute, though it points inside)
 *   loop1 -> loop2 -> loop1
 * models2/           c.gguf
 * outside/           secret.gguf
 * modlink -> models  (a model directory configured through a symlink) */
static const char *models, *models2, *outside, *modlink;

static void write_file(const char *path, const char *text)
{
        FILE *f = fopen(path, "w");

        assert_non_null(f);
        fputs(text, f);
        assert_int_equal(fclose(f), 0);
        assert_int_equal(chmod(path, 0644), 0);
}

static void make_symlink(const char *target, const char *name)
{
        char *p = tu_path(name);

        assert_int_equal(symlink(target, p), 0);
}

static int setup_tree(void **state)
{
        models = tu_path("models");
        models2 = tu_path("models2");
        outside = tu_path("outside");
        modlink = tu_path("modlink");
        if (mkdir(models, 0755) || mkdir(models2, 0755) || mkdir(outside, 0755) ||
            mkdir(tu_path("models/sub"), 0755))
                return -1;
        write_file(tu_path("models/a.gguf"), "model a");
        write_file(tu_path("models/sub/b.gguf"), "model b");
        write_file(tu_path("models2/c.gguf"), "model c");
        write_file(tu_path("outside/secret.gguf"), "secret");
        if (mkfifo(tu_path("models/fifo"), 0644))
                return -1;
        make_symlink("sub/b.gguf", "models/inner");
        make_symlink("../outside/secret.gguf", "models/escape");
        make_symlink("../outside", "models/dirlink");
        make_symlink(tu_path("models/a.gguf"), "models/abs");
        make_symlink("loop2", "models/loop1");
        make_symlink("loop1", "models/loop2");
        make_symlink(models, "modlink");
        return 0;
}

/* Opens path with the one directory `models`; returns the fd or -errno. */
static int check1(const char *path, char **resolved, struct moerr *e)
{
        char *dirs[] = { (char *)models };

        return residency_check_model_path(path, dirs, 1, false, resolved, e);
}

static void assert_contents(int fd, const char *want)
{
        char buf[64] = { 0 };

        assert_true(fd >= 0);
        assert_int_equal(pread(fd, buf, sizeof buf - 1, 0), (ssize_t)strlen(want));
        assert_string_equal(buf, want);
}

/* ---- model paths --------------------------------------------------------- */

static void model_relative_to_a_directory_is_opened(void **state)
{
        struct moerr e = { { 0 } };
        _cleanup_free_ char *resolved = NULL;
        _cleanup_close_ int fd = check1("a.gguf", &resolved, &e);
        char want[64];
        int again;

        assert_true(fd >= 0);
        assert_contents(fd, "model a");
        /* The path to load reopens the very inode checked. */
        snprintf(want, sizeof want, "/proc/self/fd/%d", fd);
        assert_string_equal(resolved, want);
        again = open(resolved, O_RDONLY | O_CLOEXEC);
        assert_contents(again, "model a");
        close(again);
        /* Blocking again: only the open was non-blocking. */
        assert_int_equal(fcntl(fd, F_GETFL) & O_NONBLOCK, 0);
}

static void model_absolute_under_a_directory_is_opened(void **state)
{
        struct moerr e = { { 0 } };
        _cleanup_close_ int fd = check1(tu_path("models/sub/b.gguf"), NULL, &e);

        assert_contents(fd, "model b");
        /* ".." that stays inside is fine. */
        int fd2 = check1(tu_path("models/sub/../a.gguf"), NULL, &e);

        assert_contents(fd2, "model a");
        close(fd2);
        fd2 = check1("sub/../sub/./b.gguf", NULL, &e);
        assert_contents(fd2, "model b");
        close(fd2);
}

static void model_outside_every_directory_is_refused(void **state)
{
        struct moerr e = { { 0 } };
        /* A sibling whose name starts like the directory's is outside. */
        char *sibling = tu_path("models-evil.gguf");

        write_file(sibling, "evil");
        assert_int_equal(check1(tu_path("outside/secret.gguf"), NULL, &e), -EXDEV);
        assert_non_null(strstr(e.msg, "not under any model directory"));
        assert_non_null(strstr(e.msg, models));
        assert_int_equal(check1(sibling, NULL, &e), -EXDEV);
        assert_int_equal(check1("/etc/passwd", NULL, &e), -EXDEV);
}

static void dotdot_out_of_the_directory_is_refused(void **state)
{
        struct moerr e = { { 0 } };

        assert_int_equal(check1("../outside/secret.gguf", NULL, &e), -EXDEV);
        assert_non_null(strstr(e.msg, "leaves the directory"));
        assert_non_null(strstr(e.msg, "../outside/secret.gguf"));
        assert_int_equal(check1(tu_path("models/../outside/secret.gguf"), NULL, &e), -EXDEV);
        assert_int_equal(check1("sub/../../outside/secret.gguf", NULL, &e), -EXDEV);
}

static void symlink_leaving_the_directory_is_refused(void **state)
{
        struct moerr e = { { 0 } };

        assert_int_equal(check1("escape", NULL, &e), -EXDEV);
        assert_non_null(strstr(e.msg, "symlink"));
        assert_int_equal(check1("dirlink/secret.gguf", NULL, &e), -EXDEV);
        assert_int_equal(check1(tu_path("models/escape"), NULL, &e), -EXDEV);
        /* Absolute symlinks are refused even when they point inside. */
        assert_int_equal(check1("abs", NULL, &e), -EXDEV);
        assert_int_equal(check1("loop1", NULL, &e), -ELOOP);
}

static void symlink_staying_inside_is_followed(void **state)
{
        struct moerr e = { { 0 } };
        _cleanup_close_ int fd = check1("inner", NULL, &e);
        struct stat a, b;

        assert_contents(fd, "model b");
        assert_int_equal(fstat(fd, &a), 0);
        assert_int_equal(stat(tu_path("models/sub/b.gguf"), &b), 0);
        assert_true(a.st_ino == b.st_ino && a.st_dev == b.st_dev);
}

static void directory_and_fifo_are_not_model_files(void **state)
{
        struct moerr e = { { 0 } };

        assert_int_equal(check1("sub", NULL, &e), -EISDIR);
        assert_non_null(strstr(e.msg, "a directory"));
        assert_int_equal(check1(models, NULL, &e), -EISDIR);
        assert_int_equal(check1(tu_path("models/"), NULL, &e), -EISDIR);
        /* A FIFO must not hang the daemon in open(). */
        assert_int_equal(check1("fifo", NULL, &e), -EINVAL);
        assert_non_null(strstr(e.msg, "FIFO"));
}

static void missing_model_and_bad_arguments(void **state)
{
        struct moerr e = { { 0 } };
        char *dirs[] = { (char *)models, (char *)models2 };
        char *missing[] = { tu_path("no-such-dir"), (char *)models2 };
        char *resolved = (char *)"untouched";

        assert_int_equal(check1("nope.gguf", &resolved, &e), -ENOENT);
        assert_null(resolved);
        assert_non_null(strstr(e.msg, "nope.gguf"));
        assert_int_equal(residency_check_model_path("nope.gguf", dirs, 2, false, NULL, &e),
                         -ENOENT);
        assert_non_null(strstr(e.msg, "not found in any model directory"));
        assert_int_equal(residency_check_model_path("a.gguf", dirs, 0, false, NULL, &e), -EXDEV);
        assert_non_null(strstr(e.msg, "ModelDirectories="));
        assert_int_equal(residency_check_model_path("", dirs, 2, false, NULL, &e), -EINVAL);
        assert_int_equal(residency_check_model_path(NULL, dirs, 2, false, NULL, NULL), -EINVAL);
        /* A configured directory that does not exist is skipped over. */
        int fd = residency_check_model_path("c.gguf", missing, 2, false, NULL, &e);

        assert_contents(fd, "model c");
        close(fd);
}

static void later_directories_are_searched_and_a_refusal_wins(void **state)
{
        struct moerr e = { { 0 } };
        char *dirs[] = { (char *)models, (char *)models2 };
        char *c_abs = tu_path("models2/c.gguf");
        int fd;

        fd = residency_check_model_path("c.gguf", dirs, 2, false, NULL, &e);
        assert_contents(fd, "model c");
        close(fd);
        fd = residency_check_model_path(c_abs, dirs, 2, false, NULL, &e);
        assert_contents(fd, "model c");
        close(fd);
        /* Refused in the first directory, absent from the second: the
         * refusal is what the message says. */
        assert_int_equal(residency_check_model_path("escape", dirs, 2, false, NULL, &e), -EXDEV);
        assert_non_null(strstr(e.msg, "leaves the directory"));
}

static void directory_configured_through_a_symlink(void **state)
{
        struct moerr e = { { 0 } };
        char *dirs[] = { (char *)modlink };
        int fd;

        fd = residency_check_model_path(tu_path("models/a.gguf"), dirs, 1, false, NULL, &e);
        assert_contents(fd, "model a");
        close(fd);
        fd = residency_check_model_path(tu_path("modlink/sub/b.gguf"), dirs, 1, false, NULL, &e);
        assert_contents(fd, "model b");
        close(fd);
        assert_int_equal(residency_check_model_path(tu_path("outside/secret.gguf"), dirs, 1,
                                                    false, NULL, &e), -EXDEV);
}

/* The pre-openat2 walk, forced: no symlink at all, no "..". */
static void nofollow_walk_refuses_every_symlink(void **state)
{
        struct moerr e = { { 0 } };
        _cleanup_close_ int dfd = open(models, O_PATH | O_DIRECTORY | O_CLOEXEC);
        int fd;

        assert_true(dfd >= 0);
        fd = residency_open_beneath(dfd, "sub//./b.gguf", RESIDENCY_WALK_NOFOLLOW, &e);
        assert_contents(fd, "model b");
        close(fd);
        assert_int_equal(residency_open_beneath(dfd, "inner", RESIDENCY_WALK_NOFOLLOW, &e),
                         -ELOOP);
        assert_non_null(strstr(e.msg, "symlink"));
        assert_int_equal(residency_open_beneath(dfd, "escape", RESIDENCY_WALK_NOFOLLOW, &e),
                         -ELOOP);
        assert_int_equal(residency_open_beneath(dfd, "dirlink/secret.gguf",
                                                RESIDENCY_WALK_NOFOLLOW, &e), -ELOOP);
        assert_int_equal(residency_open_beneath(dfd, "sub/../a.gguf", RESIDENCY_WALK_NOFOLLOW, &e),
                         -EXDEV);
        assert_int_equal(residency_open_beneath(dfd, "..", RESIDENCY_WALK_NOFOLLOW, &e), -EXDEV);
        assert_int_equal(residency_open_beneath(dfd, "", RESIDENCY_WALK_NOFOLLOW, &e), -EISDIR);
        assert_int_equal(residency_open_beneath(dfd, "sub/", RESIDENCY_WALK_NOFOLLOW, &e), -EISDIR);
        assert_int_equal(residency_open_beneath(dfd, "fifo", RESIDENCY_WALK_NOFOLLOW, &e), -EINVAL);
        assert_int_equal(residency_open_beneath(dfd, "nope", RESIDENCY_WALK_NOFOLLOW, &e), -ENOENT);
        assert_int_equal(residency_open_beneath(dfd, "a.gguf/x", RESIDENCY_WALK_NOFOLLOW, &e),
                         -ENOTDIR);
}

/* ---- filesystems ------------------------------------------------------------ */

static void netfs_magic_table(void **state)
{
        static const struct {
                int64_t magic;
                const char *name;
        } cases[] = {
                { 0x6969, "NFS" },        { 0xff534d42, "CIFS" },    { 0xfe534d42, "SMB2" },
                { 0x517b, "SMB" },        { 0x01021997, "9p" },      { 0x65735546, "FUSE" },
                { 0x00c36400, "Ceph" },   { 0x5346414f, "AFS" },     { 0x6b414653, "kAFS" },
                { 0x01161970, "GFS2" },   { 0x7461636f, "OCFS2" },   { 0x0bd00bd0, "Lustre" },
                { 0x73757245, "Coda" },   { 0x564c, "NCP" },
                /* CIFS's magic as a sign-extended 32-bit long */
                { (int64_t)(int32_t)0xff534d42u, "CIFS" },
        };

        for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
                const char *n = residency_netfs_name(cases[i].magic);

                assert_non_null(n);
                assert_string_equal(n, cases[i].name);
        }
        assert_null(residency_netfs_name(0xef53));     /* ext4 */
        assert_null(residency_netfs_name(0x01021994)); /* tmpfs */
        assert_null(residency_netfs_name(0x58465342)); /* xfs */
        assert_null(residency_netfs_name(0x9123683e)); /* btrfs */
        assert_null(residency_netfs_name(0x794c7630)); /* overlayfs */
        assert_null(residency_netfs_name(0));
}

static int64_t fake_magic;
static int fake_errno;

static int fake_fstatfs(int fd, struct statfs *st)
{
        if (fake_errno) {
                errno = fake_errno;
                return -1;
        }
        memset(st, 0, sizeof *st);
        st->f_type = (__fsword_t)fake_magic;
        return 0;
}

static void network_filesystem_is_refused_unless_allowed(void **state)
{
        struct moerr e = { { 0 } };
        _cleanup_close_ int fd = open(tu_path("models/a.gguf"), O_RDONLY | O_CLOEXEC);

        assert_true(fd >= 0);
        fake_errno = 0;
        fake_magic = 0x6969;
        assert_int_equal(residency_check_fs(fd, false, fake_fstatfs, &e), -EREMOTE);
        assert_non_null(strstr(e.msg, "NFS"));
        assert_non_null(strstr(e.msg, "AllowNetworkFilesystems=yes"));
        assert_int_equal(residency_check_fs(fd, true, fake_fstatfs, &e), 0);
        fake_magic = 0x65735546;
        assert_int_equal(residency_check_fs(fd, false, fake_fstatfs, &e), -EREMOTE);
        assert_non_null(strstr(e.msg, "FUSE"));
        fake_magic = 0xef53;
        assert_int_equal(residency_check_fs(fd, false, fake_fstatfs, &e), 0);
        fake_errno = EIO;
        assert_int_equal(residency_check_fs(fd, true, fake_fstatfs, &e), -EIO);
        assert_non_null(strstr(e.msg, "statfs"));
        /* The real one: the test's directory is local (unless it is not,
         * which the table then names). */
        struct statfs st;

        assert_int_equal(fstatfs(fd, &st), 0);
        assert_int_equal(residency_check_fs(fd, false, NULL, &e),
                         residency_netfs_name((int64_t)st.f_type) ? -EREMOTE : 0);
}

/* ---- forked children --------------------------------------------------------- */

#define CHILD_SKIP 77

/* Runs fn in a child; what it prints to its pipe comes back in out. The
 * child leaves with _exit, so the test directory's atexit cleanup runs only
 * in the parent. Returns the child's exit status. */
static int in_child(int (*fn)(FILE *out, void *arg), void *arg, char *out, size_t cap)
{
        int pfd[2], status;
        size_t n = 0;
        ssize_t k;
        pid_t pid;

        assert_int_equal(pipe2(pfd, O_CLOEXEC), 0);
        fflush(stdout);
        fflush(stderr);
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                FILE *f;
                int rc;

                close(pfd[0]);
                f = fdopen(pfd[1], "w");
                rc = f ? fn(f, arg) : 99;
                if (f)
                        fclose(f);
                _exit(rc);
        }
        close(pfd[1]);
        while (n + 1 < cap && (k = read(pfd[0], out + n, cap - 1 - n)) > 0)
                n += (size_t)k;
        out[n] = 0;
        close(pfd[0]);
        assert_int_equal(waitpid(pid, &status, 0), pid);
        assert_true(WIFEXITED(status));
        return WEXITSTATUS(status);
}

static void child_result(int rc, const char *out)
{
        if (rc == CHILD_SKIP) {
                printf("SKIP: %s\n", out);
                skip();
        }
        if (rc != 0)
                fail_msg("child failed (%d): %s", rc, out);
}

/* ---- the network namespace ------------------------------------------------------ */

static bool has_finding(const struct residency_report *r, const char *a, const char *b)
{
        for (size_t i = 0; i < r->n_findings; i++)
                if (strstr(r->findings[i], a) && (!b || strstr(r->findings[i], b)))
                        return true;
        return false;
}

static void netns_report_matches_ip_link(void **state)
{
        struct residency_report r = { 0 };
        _cleanup_free_ char *text = NULL, *line = NULL, *buf = NULL;
        size_t cap = 0, n_ip = 0, n_up = 0;
        FILE *p;

        assert_int_equal(residency_check_netns(&r), 0);
        assert_int_equal(r.error, 0);
        p = popen("ip -o link show", "r");
        assert_non_null(p);
        while (getline(&buf, &cap, p) > 0) {
                /* "4: eth0@if5: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu ..." */
                char name[64], flags[256];
                char *at;

                assert_int_equal(sscanf(buf, "%*d: %63[^:]: <%255[^>]>", name, flags), 2);
                if ((at = strchr(name, '@')))
                        *at = 0;
                n_ip++;
                bool found = false;

                for (size_t i = 0; i < r.n_links; i++) {
                        if (strcmp(r.links[i].name, name) != 0)
                                continue;
                        found = true;
                        bool up = strstr(flags, "UP,") || strstr(flags, ",UP") ||
                                  strcmp(flags, "UP") == 0;

                        assert_int_equal(r.links[i].up, up);
                        assert_int_equal(r.links[i].loopback, strstr(flags, "LOOPBACK") != NULL);
                        if (up && !r.links[i].loopback) {
                                char want[80];

                                n_up++;
                                snprintf(want, sizeof want, "interface %s ", name);
                                assert_true(has_finding(&r, want, " is up"));
                        }
                }
                assert_true(found);
        }
        assert_int_equal(pclose(p), 0);
        assert_true(n_ip > 0);
        assert_int_equal(r.n_links, n_ip);
        if (n_up)
                assert_false(r.ok);
        assert_int_equal(r.ok, r.n_findings == 0);
        text = residency_report_text(&r);
        line = residency_report_line(&r);
        assert_non_null(text);
        assert_non_null(line);
        assert_non_null(strstr(text, r.ok ? "residency: ok" : "residency: NOT OK"));
        for (size_t i = 0; i < r.n_findings; i++)
                assert_non_null(strstr(line, r.findings[i]));
        printf("%s", text);
        residency_report_clear(&r);
        assert_null(r.links);
        assert_int_equal(r.n_findings, 0);
}

__attribute__((format(printf, 2, 3)))
static bool write_proc(const char *path, const char *fmt, ...)
{
        FILE *f = fopen(path, "we");
        va_list ap;
        bool ok;

        if (!f)
                return false;
        va_start(ap, fmt);
        ok = vfprintf(f, fmt, ap) > 0;
        va_end(ap);
        return fclose(f) == 0 && ok;
}

/* A network namespace of our own: directly as root, else inside a user
 * namespace of our own where we are root (unprivileged runners). */
static int enter_netns(FILE *out)
{
        uid_t uid = getuid();
        gid_t gid = getgid();
        int err;

        if (unshare(CLONE_NEWNET) == 0)
                return 0;
        err = errno;
        if (unshare(CLONE_NEWUSER | CLONE_NEWNET) < 0) {
                fprintf(out, "cannot create a network namespace for the test: "
                        "unshare(CLONE_NEWNET): %s; with a user namespace: %s",
                        strerror(err), strerror(errno));
                return -1;
        }
        /* Root inside, so that the ip we run keeps its capabilities. */
        if (!write_proc("/proc/self/setgroups", "deny") ||
            !write_proc("/proc/self/uid_map", "0 %u 1", (unsigned)uid) ||
            !write_proc("/proc/self/gid_map", "0 %u 1", (unsigned)gid)) {
                fprintf(out, "cannot map our uid in a new user namespace: %s", strerror(errno));
                return -1;
        }
        return 0;
}

/* In a child: a fresh network namespace, set up by the shell commands in
 * arg (NULL: none), then checked; the report goes back as text, with a
 * first line "ok" or "fail". */
static int netns_child(FILE *out, void *arg)
{
        const char *setup = arg;
        struct residency_report r = { 0 };
        char *text;
        int rc;

        if (enter_netns(out) < 0)
                return CHILD_SKIP;
        if (setup) {
                rc = system(setup);
                if (rc == -1 || !WIFEXITED(rc) || WEXITSTATUS(rc) == 127) {
                        fprintf(out, "cannot run ip (iproute2) to set up the namespace");
                        return CHILD_SKIP;
                }
                if (WEXITSTATUS(rc) != 0) {
                        fprintf(out, "setup failed (%d): %s", WEXITSTATUS(rc), setup);
                        return 2;
                }
        }
        rc = residency_check_netns(&r);
        text = residency_report_text(&r);
        fprintf(out, "%s\n%s", r.ok ? "ok" : "fail", text ? text : "(no text)");
        free(text);
        residency_report_clear(&r);
        return rc < 0 ? 3 : 0;
}

static bool netns_run(const char *setup, char *out, size_t cap)
{
        int rc = in_child(netns_child, (void *)setup, out, cap);

        child_result(rc, out);
        printf("%s", out);
        return strncmp(out, "ok\n", 3) == 0;
}

static void fresh_namespace_with_only_loopback_passes(void **state)
{
        char out[4096];

        assert_true(netns_run(NULL, out, sizeof out));
        assert_non_null(strstr(out, "read 1 interface: lo (loopback, down);"));
        assert_true(netns_run("ip link set lo up", out, sizeof out));
        assert_non_null(strstr(out, "lo (loopback, up)"));
        assert_null(strstr(out, "0 routes"));
        /* Routes that drop, or go out loopback, lead nowhere. */
        assert_true(netns_run("ip link set lo up && ip route add blackhole default && "
                              "ip -6 route add unreachable default && "
                              "ip route add 10.1.0.0/16 dev lo", out, sizeof out));
}

/* The brief names a dummy interface; where the kernel has no dummy module,
 * a veth pair (its peer left down) stands in. */
#define ADD_D0 "{ ip link add d0 type dummy 2>/dev/null || " \
               "ip link add d0 type veth peer name d0p; }"

static void interface_up_with_a_default_route_fails(void **state)
{
        char out[4096];

        assert_false(netns_run(ADD_D0 " && ip addr add 10.9.9.9/24 dev d0 && "
                               "ip link set d0 up && ip route add default via 10.9.9.1",
                               out, sizeof out));
        assert_non_null(strstr(out, "NOT OK"));
        assert_non_null(strstr(out, "interface d0 "));
        assert_non_null(strstr(out, "is up with 10.9.9.9/24"));
        assert_non_null(strstr(out, "default route via 10.9.9.1 dev d0"));
        assert_non_null(strstr(out, "route 10.9.9.0/24 dev d0"));
}

static void interface_down_with_an_address_passes(void **state)
{
        char out[4096];

        /* Its only route is the local one for its own address. */
        assert_true(netns_run(ADD_D0 " && ip addr add 10.9.9.9/24 dev d0 && ip link set lo up",
                              out, sizeof out));
        assert_non_null(strstr(out, "d0 (down)"));
}

static void interface_up_without_address_fails(void **state)
{
        char out[4096];

        assert_false(netns_run(ADD_D0 " && echo 1 >/proc/sys/net/ipv6/conf/d0/disable_ipv6 && "
                               "ip link set d0 up", out, sizeof out));
        assert_non_null(strstr(out, "is up (no address)"));
}

static void routes_are_described(void **state)
{
        char out[4096];

        /* Through a gateway on loopback: harmless. Other tables: named. */
        assert_false(netns_run("ip link set lo up && "
                               "ip route add 10.2.0.0/16 via 127.0.0.2 dev lo && "
                               ADD_D0 " && ip link set d0 up && "
                               "ip addr add 10.9.9.9/24 dev d0 && "
                               "ip route add 10.7.0.0/16 via 10.9.9.1 table 7 && "
                               "ip -6 route add 2001:db8::/64 dev d0 metric 5",
                               out, sizeof out));
        assert_non_null(strstr(out, "route 10.7.0.0/16 via 10.9.9.1 dev d0 (table 7)"));
        assert_non_null(strstr(out, "route 2001:db8::/64 dev d0\n"));
        assert_null(strstr(out, "10.2.0.0"));
        assert_null(strstr(out, "broadcast"));
        assert_null(strstr(out, "ff00::"));
}

static void report_text_and_line_of_a_made_up_report(void **state)
{
        struct residency_report r = { 0 };
        struct residency_status s = { .strict = true, .memory_locked = true };
        char *findings[] = { strdup("interface eth0 is up with 10.0.2.15/24"),
                             strdup("default route via 10.0.2.2 dev eth0") };
        _cleanup_free_ char *text = NULL, *line = NULL, *dump = NULL;
        json_t *j;

        r.findings = malloc(sizeof findings);
        assert_non_null(r.findings);
        memcpy(r.findings, findings, sizeof findings);
        r.n_findings = 2;
        text = residency_report_text(&r);
        line = residency_report_line(&r);
        assert_non_null(strstr(text, "NOT OK"));
        assert_non_null(strstr(text, "\n  interface eth0 is up with 10.0.2.15/24\n"
                               "  default route via 10.0.2.2 dev eth0\n"));
        assert_string_equal(line, "interface eth0 is up with 10.0.2.15/24; "
                            "default route via 10.0.2.2 dev eth0");

        residency_status_set_report(&s, &r);
        assert_false(s.ok);
        assert_string_equal(s.detail, line);
        j = residency_status_json(&s);
        assert_non_null(j);
        assert_string_equal(json_string_value(json_object_get(j, "mode")), "strict");
        assert_true(json_is_false(json_object_get(j, "ok")));
        assert_string_equal(json_string_value(json_object_get(j, "detail")), line);
        assert_true(json_is_true(json_object_get(j, "memory_locked")));
        assert_true(json_is_false(json_object_get(j, "core_dumps_off")));
        json_decref(j);

        /* A reading that failed says so, and is not ok. */
        residency_report_clear(&r);
        r.error = -EPERM;
        r.error_text = strdup("cannot read the network namespace: links: Operation not permitted");
        free(text);
        text = residency_report_text(&r);
        assert_non_null(strstr(text, "NOT OK: cannot read the network namespace"));
        free(line);
        line = residency_report_line(&r);
        assert_string_equal(line, r.error_text);

        /* An empty report is ok, and so is the status made of it. */
        residency_report_clear(&r);
        r.ok = true;
        residency_status_set_report(&s, &r);
        s.strict = false;
        assert_true(s.ok);
        assert_string_equal(s.detail, "");
        j = residency_status_json(&s);
        dump = json_dumps(j, JSON_SORT_KEYS | JSON_COMPACT);
        assert_string_equal(dump, "{\"core_dumps_off\":false,\"detail\":\"\","
                            "\"memory_locked\":true,\"mode\":\"relaxed\",\"ok\":true}");
        json_decref(j);
}

/* ---- the process ------------------------------------------------------------------- */

static int core_child(FILE *out, void *arg)
{
        struct moerr e = { { 0 } };
        struct rlimit rl;
        char *resolved = NULL;
        int fd, again;

        /* Check a model as root, then become nobody: the daemon's order. */
        fd = check1("a.gguf", &resolved, &e);
        if (fd < 0) {
                fprintf(out, "check: %s", e.msg);
                return 2;
        }
        if (getuid() == 0 && (setresgid(65534, 65534, 65534) < 0 ||
                              setresuid(65534, 65534, 65534) < 0)) {
                fprintf(out, "cannot become nobody to test: %s", strerror(errno));
                return CHILD_SKIP;
        }
        if (residency_disable_core_dumps(&e) < 0) {
                fprintf(out, "disable: %s", e.msg);
                return 3;
        }
        if (getrlimit(RLIMIT_CORE, &rl) < 0 || rl.rlim_cur != 0 || rl.rlim_max != 0) {
                fprintf(out, "RLIMIT_CORE not 0");
                return 4;
        }
        if (prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0) {
                fprintf(out, "still dumpable");
                return 5;
        }
        /* Again, with the limit already 0 (LimitCORE=0 in the unit). */
        if (residency_disable_core_dumps(&e) < 0) {
                fprintf(out, "disable again: %s", e.msg);
                return 7;
        }
        /* Not dumpable and unprivileged, the process still reopens its
         * own fd through /proc/self/fd. */
        again = open(resolved, O_RDONLY | O_CLOEXEC);
        if (again < 0) {
                fprintf(out, "reopen %s: %s", resolved, strerror(errno));
                return 6;
        }
        close(again);
        close(fd);
        free(resolved);
        return 0;
}

static void core_dumps_are_turned_off(void **state)
{
        char out[1024];

        child_result(in_child(core_child, NULL, out, sizeof out), out);
}

static int memlock_limited_child(FILE *out, void *arg)
{
        struct moerr e = { { 0 } };
        struct rlimit rl = { 64 << 10, 64 << 10 };
        int r;

        if (setrlimit(RLIMIT_MEMLOCK, &rl) < 0) {
                fprintf(out, "setrlimit: %s", strerror(errno));
                return 2;
        }
        /* Without CAP_IPC_LOCK, as the daemon's user is. */
        if (getuid() == 0 && (setresgid(65534, 65534, 65534) < 0 ||
                              setresuid(65534, 65534, 65534) < 0)) {
                fprintf(out, "cannot become nobody to test: %s", strerror(errno));
                return CHILD_SKIP;
        }
        r = residency_lock_memory(&e);
        fprintf(out, "%d %s", r, e.msg);
        return r == -EPERM && strstr(e.msg, "RLIMIT_MEMLOCK is 64 KiB") &&
               strstr(e.msg, "swap") ? 0 : 3;
}

static void memory_lock_warns_under_a_finite_limit(void **state)
{
        char out[1024];

        child_result(in_child(memlock_limited_child, NULL, out, sizeof out), out);
}

/* "VmFlags:" of the mapping at addr in /proc/self/smaps contains " lo"? */
static int mapping_locked(void *addr)
{
        FILE *f = fopen("/proc/self/smaps", "re");
        char line[512];
        bool in = false;
        int locked = -1;

        if (!f)
                return -1;
        while (fgets(line, sizeof line, f)) {
                uintptr_t lo, hi;

                if (sscanf(line, "%" SCNxPTR "-%" SCNxPTR " ", &lo, &hi) == 2)
                        in = (uintptr_t)addr >= lo && (uintptr_t)addr < hi;
                else if (in && strncmp(line, "VmFlags:", 8) == 0) {
                        locked = strstr(line, " lo") != NULL;
                        break;
                }
        }
        fclose(f);
        return locked;
}

enum memlock_case {
        MEMLOCK_INFINITE,          /* LimitMEMLOCK=infinity */
        MEMLOCK_SOFT_LOW,          /* soft 64K, hard infinity: raised */
        MEMLOCK_CAP,               /* 64K, and CAP_IPC_LOCK */
};

static bool have_cap_ipc_lock(void)
{
        char line[256];
        unsigned long long eff = 0;
        FILE *f = fopen("/proc/self/status", "re");

        while (f && fgets(line, sizeof line, f))
                if (sscanf(line, "CapEff: %llx", &eff) == 1)
                        break;
        if (f)
                fclose(f);
        return eff & (1ull << 14); /* CAP_IPC_LOCK */
}

static int memlock_child(FILE *out, void *arg)
{
        enum memlock_case c = (enum memlock_case)(uintptr_t)arg;
        struct moerr e = { { 0 } };
        struct rlimit rl = { RLIM_INFINITY, RLIM_INFINITY };
        char *vmlck = NULL, line[256];
        volatile char sink;
        FILE *st;
        char *map, *anon;
        int fd, n;

        if (c == MEMLOCK_SOFT_LOW)
                rl.rlim_cur = 64 << 10;
        if (c == MEMLOCK_CAP)
                rl.rlim_cur = rl.rlim_max = 64 << 10;
        if (setrlimit(RLIMIT_MEMLOCK, &rl) < 0) {
                fprintf(out, "cannot raise RLIMIT_MEMLOCK to infinity (no CAP_SYS_RESOURCE) "
                        "to test locking under it: %s", strerror(errno));
                return CHILD_SKIP;
        }
        if (c == MEMLOCK_CAP && !have_cap_ipc_lock()) {
                fprintf(out, "no CAP_IPC_LOCK to test locking with it");
                return CHILD_SKIP;
        }
        if (residency_lock_memory(&e) < 0) {
                fprintf(out, "lock: %s", e.msg);
                return 2;
        }
        if (getrlimit(RLIMIT_MEMLOCK, &rl) < 0 ||
            (rl.rlim_cur == RLIM_INFINITY) != (c != MEMLOCK_CAP)) {
                fprintf(out, "soft limit not raised, or raised past its hard limit");
                return 3;
        }
        /* A model-like read-only file mapping, and anonymous memory. */
        fd = open(tu_path("models/a.gguf"), O_RDONLY | O_CLOEXEC);
        map = fd >= 0 ? mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, 0) : MAP_FAILED;
        anon = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (map == MAP_FAILED || anon == MAP_FAILED) {
                fprintf(out, "mmap: %s", strerror(errno));
                return 4;
        }
        sink = map[0];
        anon[0] = sink;
        if (mapping_locked(map) != 1 || mapping_locked(anon) != 1) {
                fprintf(out, "not locked after mlockall: file %d anon %d", mapping_locked(map),
                        mapping_locked(anon));
                return 5;
        }
        n = residency_unlock_file_mappings(&e);
        if (n < 1 || mapping_locked(map) != 0 || mapping_locked(anon) != 1) {
                fprintf(out, "unlock: %d (%s): file %d anon %d", n, e.msg, mapping_locked(map),
                        mapping_locked(anon));
                return 6;
        }
        st = fopen("/proc/self/status", "re");
        while (st && fgets(line, sizeof line, st))
                if (strncmp(line, "VmLck:", 6) == 0)
                        vmlck = strdup(line);
        if (st)
                fclose(st);
        if (!vmlck || atol(vmlck + 6) <= 0) {
                fprintf(out, "VmLck: %s", vmlck ? vmlck : "missing");
                return 7;
        }
        fprintf(out, "%s", vmlck);
        free(vmlck);
        return 0;
}

static void memory_is_locked_when_the_limit_allows(void **state)
{
        static const char *names[] = {
                "infinite limit",
                "low soft limit under an infinite hard one",
                "finite limit with CAP_IPC_LOCK",
        };
        char out[1024];
        int ran = 0;

        for (int c = MEMLOCK_INFINITE; c <= MEMLOCK_CAP; c++) {
                int rc = in_child(memlock_child, (void *)(uintptr_t)c, out, sizeof out);

                if (rc == CHILD_SKIP) {
                        printf("SKIP (%s): %s\n", names[c], out);
                        continue;
                }
                if (rc != 0)
                        fail_msg("%s: child failed (%d): %s", names[c], rc, out);
                printf("%s: locked, %s", names[c], out);
                ran++;
        }
        if (ran == 0) {
                printf("SKIP: no way to lock memory here (see above)\n");
                skip();
        }
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(model_relative_to_a_directory_is_opened),
                cmocka_unit_test(model_absolute_under_a_directory_is_opened),
                cmocka_unit_test(model_outside_every_directory_is_refused),
                cmocka_unit_test(dotdot_out_of_the_directory_is_refused),
                cmocka_unit_test(symlink_leaving_the_directory_is_refused),
                cmocka_unit_test(symlink_staying_inside_is_followed),
                cmocka_unit_test(directory_and_fifo_are_not_model_files),
                cmocka_unit_test(missing_model_and_bad_arguments),
                cmocka_unit_test(later_directories_are_searched_and_a_refusal_wins),
                cmocka_unit_test(directory_configured_through_a_symlink),
                cmocka_unit_test(nofollow_walk_refuses_every_symlink),
                cmocka_unit_test(netfs_magic_table),
                cmocka_unit_test(network_filesystem_is_refused_unless_allowed),
                cmocka_unit_test(netns_report_matches_ip_link),
                cmocka_unit_test(fresh_namespace_with_only_loopback_passes),
                cmocka_unit_test(interface_up_with_a_default_route_fails),
                cmocka_unit_test(interface_down_with_an_address_passes),
                cmocka_unit_test(interface_up_without_address_fails),
                cmocka_unit_test(routes_are_described),
                cmocka_unit_test(report_text_and_line_of_a_made_up_report),
                cmocka_unit_test(core_dumps_are_turned_off),
                cmocka_unit_test(memory_lock_warns_under_a_finite_limit),
                cmocka_unit_test(memory_is_locked_when_the_limit_allows),
        };

        return cmocka_run_group_tests(tests, setup_tree, NULL);
}
