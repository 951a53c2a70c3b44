/* peer: who is on the other end of a Unix socket, as the kernel says
 * (SO_PEERCRED, SO_PEERGROUPS): never what the client claims. */
#pragma once
#include <stddef.h>
#include <sys/types.h>

struct ipc_peer {
        uid_t uid;
        gid_t gid;
        pid_t pid;
        gid_t *groups;   /* supplementary groups, malloc'ed (NULL when none) */
        size_t n_groups;
};

/* 0, or a negative errno (not a Unix socket, out of memory). */
int peer_from_fd(int fd, struct ipc_peer *p);
void peer_clear(struct ipc_peer *p);
