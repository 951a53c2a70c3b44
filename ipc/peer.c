/* peer: credentials of a connected Unix socket's peer. */
#include "ipc/peer.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

int peer_from_fd(int fd, struct ipc_peer *p)
{
        struct ucred uc;
        socklen_t len = sizeof uc;
        gid_t *g = NULL;

        memset(p, 0, sizeof *p);
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &uc, &len) < 0)
                return -errno;
        p->uid = uc.uid;
        p->gid = uc.gid;
        p->pid = uc.pid;
        /* The group list's size is not known ahead: the kernel says how
         * much it needs with ERANGE. */
        len = 64 * sizeof(gid_t);
        for (int tries = 0; tries < 3; tries++) {
                gid_t *ng = realloc(g, len ? len : sizeof(gid_t));
                if (!ng) {
                        free(g);
                        return -ENOMEM;
                }
                g = ng;
                if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, g, &len) == 0) {
                        p->n_groups = len / sizeof(gid_t);
                        if (p->n_groups)
                                p->groups = g;
                        else
                                free(g);
                        return 0;
                }
                if (errno != ERANGE) {
                        free(g);
                        return -errno;
                }
        }
        free(g);
        return -ERANGE;
}

void peer_clear(struct ipc_peer *p)
{
        free(p->groups);
        memset(p, 0, sizeof *p);
}
