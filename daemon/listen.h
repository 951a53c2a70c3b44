/* listen: the HTTP door's listening socket: the one systemd passes
 * (socket activation, sd_listen_fds) or one moed binds itself. */
#pragma once
#include <stdbool.h>
#include <sys/types.h>

#include "common/moerr.h"

struct listen_sock {
        int fd;
        bool activated;   /* from systemd: not ours to unlink */
        char *path;       /* what we bound, unlinked at exit */
};

/* Takes the activated socket if there is one, else binds path with mode
 * (creating the parent directory with dir_mode). A stale socket file left
 * by a dead moed is replaced; a live one is an error (another moed runs).
 * private_dir: the parent directory must be ours and closed to others
 * (for a default path in a shared place such as /tmp). */
int listen_open(const char *path, mode_t mode, mode_t dir_mode, bool private_dir,
                struct listen_sock *out, struct moerr *e);
void listen_close(struct listen_sock *s);
