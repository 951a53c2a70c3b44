/* dbus: the D-Bus door, org.moed.Engine1 at /org/moed/Engine1 (interface
 * described by ipc/org.moed.Engine1.xml, which is installed and checked
 * against the live object by the tests). Built on sd-bus attached to the
 * main sd-event loop; the caller's identity comes from the bus
 * (sd_bus_query_sender_creds); admin methods ask polkit over D-Bus
 * (org.freedesktop.PolicyKit1.Authority.CheckAuthorization) for
 * org.moed.manage, except for uid 0 and, in per-user mode, the user
 * itself.
 *
 * Chat returns a request object /org/moed/Engine1/request/N
 * (org.moed.Request1) whose Token and Finished signals are sent to the
 * caller alone (unicast), so no other bus client sees the answer. Only the
 * caller that started a request may cancel it; a request whose caller
 * leaves the bus is cancelled. */
#pragma once
#include <stdbool.h>

#include <systemd/sd-bus.h>
#include <systemd/sd-event.h>

#include "common/moerr.h"
#include "ipc/front.h"

struct dbus_door;

/* What the admin methods do, provided by the daemon. Each returns 0 or a
 * negative errno with a message in e. */
struct dbus_admin_ops {
        int (*reload)(void *ud, struct moerr *e);
};

struct dbus_door_config {
        bool user_bus;            /* session bus (per-user mode) else system bus */
        const char *address;      /* explicit bus address (tests), or NULL */
        uid_t owner_uid;          /* per-user mode: this uid is an admin */
};

/* Connects, registers the objects and requests the well-known name
 * org.moed.Engine1. */
int dbus_door_new(sd_event *ev, struct front *f, const struct dbus_door_config *c,
                  const struct dbus_admin_ops *ops, void *ops_ud, struct dbus_door **out,
                  struct moerr *e);
/* Emits PropertiesChanged for State and the counters (after reload, on
 * drain). */
void dbus_door_state_changed(struct dbus_door *d);
/* Releases the name and closes the connection (running requests are
 * abandoned). */
void dbus_door_free(struct dbus_door *d);
