/* listen: socket activation or our own Unix socket. */
#include "daemon/listen.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <systemd/sd-daemon.h>

#include "common/cleanup.h"

#define BACKLOG 256

static int mkdir_parents(const char *path, mode_t mode)
{
        _cleanup_free_ char *dir = strdup(path);
        char *slash;

        if (!dir)
                return -ENOMEM;
        if (!(slash = strrchr(dir, '/')) || slash == dir)
                return 0;
        *slash = 0;
        for (char *p = dir + 1; *p; p++) {
                if (*p != '/')
                        continue;
                *p = 0;
                if (mkdir(dir, 0755) < 0 && errno != EEXIST)
                        return -errno;
                *p = '/';
        }
        if (mkdir(dir, mode) < 0 && errno != EEXIST)
                return -errno;
        return 0;
}

/* A private socket directory that already existed (say under /tmp) must
 * be ours and closed to others, or someone else could own the socket. */
static int check_private_dir(const char *path, struct moerr *e)
{
        _cleanup_free_ char *dir = strdup(path);
        char *slash = dir ? strrchr(dir, '/') : NULL;
        struct stat st;

        if (!slash)
                return dir ? 0 : moerr_set(e, -ENOMEM, "out of memory");
        *slash = 0;
        if (lstat(dir, &st) < 0)
                return moerr_set(e, -errno, "%s: %s", dir, strerror(errno));
        if (!S_ISDIR(st.st_mode) || st.st_uid != geteuid() || (st.st_mode & 0077))
                return moerr_set(e, -EPERM, "%s must be a directory of uid %u closed to others "
                                 "(mode 0700)", dir, (unsigned)geteuid());
        return 0;
}

/* A socket file nobody listens on is left over from a moed that died. */
static int clear_stale(const char *path, struct sockaddr_un *sa, struct moerr *e)
{
        struct stat st;
        int fd, r;

        if (lstat(path, &st) < 0)
                return errno == ENOENT ? 0 : moerr_set(e, -errno, "%s: %s", path, strerror(errno));
        if (!S_ISSOCK(st.st_mode))
                return moerr_set(e, -EEXIST, "%s exists and is not a socket", path);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return moerr_set(e, -errno, "socket: %s", strerror(errno));
        r = connect(fd, (struct sockaddr *)sa, sizeof *sa);
        close(fd);
        if (r == 0)
                return moerr_set(e, -EADDRINUSE, "another moed is serving on %s", path);
        if (unlink(path) < 0 && errno != ENOENT)
                return moerr_set(e, -errno, "cannot remove the stale %s: %s", path,
                                 strerror(errno));
        return 0;
}

static int take_activated(struct listen_sock *out, struct moerr *e)
{
        int n = sd_listen_fds(1);

        if (n <= 0)
                return n;
        if (n > 1)
                return moerr_set(e, -EINVAL, "systemd passed %d sockets, moed takes one", n);
        if (sd_is_socket_unix(SD_LISTEN_FDS_START, SOCK_STREAM, 1, NULL, 0) <= 0)
                return moerr_set(e, -EINVAL,
                                 "the socket systemd passed is not a listening Unix stream socket");
        out->fd = SD_LISTEN_FDS_START;
        out->activated = true;
        return 1;
}

int listen_open(const char *path, mode_t mode, mode_t dir_mode, bool private_dir,
                struct listen_sock *out, struct moerr *e)
{
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        _cleanup_close_ int fd = -1;
        mode_t old;
        int r;

        memset(out, 0, sizeof *out);
        out->fd = -1;
        if ((r = take_activated(out, e)) != 0)
                return r < 0 ? r : 0;
        if (strlen(path) >= sizeof sa.sun_path)
                return moerr_set(e, -ENAMETOOLONG, "socket path too long: %s", path);
        strcpy(sa.sun_path, path);
        if ((r = mkdir_parents(path, dir_mode)) < 0)
                return moerr_set(e, r, "cannot create the directory of %s: %s", path,
                                 strerror(-r));
        if (private_dir && (r = check_private_dir(path, e)) < 0)
                return r;
        if ((r = clear_stale(path, &sa, e)) < 0)
                return r;
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return moerr_set(e, -errno, "socket: %s", strerror(errno));
        /* Bind under a umask so the file never exists with wider access. */
        old = umask(~mode & 0777);
        r = bind(fd, (struct sockaddr *)&sa, sizeof sa);
        umask(old);
        if (r < 0)
                return moerr_set(e, -errno, "bind %s: %s", path, strerror(errno));
        if (chmod(path, mode) < 0 || listen(fd, BACKLOG) < 0) {
                r = -errno;
                unlink(path);
                return moerr_set(e, r, "listen on %s: %s", path, strerror(-r));
        }
        if (!(out->path = strdup(path))) {
                unlink(path);
                return moerr_set(e, -ENOMEM, "out of memory");
        }
        out->fd = TAKE_FD(fd);
        return 0;
}

void listen_close(struct listen_sock *s)
{
        if (s->path)
                unlink(s->path);
        if (s->fd >= 0 && !s->activated)
                close(s->fd);
        free(s->path);
        s->path = NULL;
        s->fd = -1;
}
