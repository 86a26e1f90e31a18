/* wsm_registry: the connection registry shared by both data planes.
 *
 * One struct of state guarded by one mutex. A connection lives in a slot; a handle names it as
 * (generation << 32 | slot), so a handle kept past the connection's removal is recognised as
 * stale once the slot is reused. Indexes: connection id -> slot, user -> connections (intrusive
 * doubly linked list through the slots), channel -> connections (dense member arrays with
 * back-pointers, so join/leave are O(1)).  Every function here expects the caller to hold
 * r->lock, except new/free; the Python glue takes it with the GIL released. */
#ifndef WSM_REGISTRY_H
#define WSM_REGISTRY_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "reasons.h"

#include "strmap.h"
#include "sweep.h"

#define WSM_NONE UINT32_MAX

typedef uint64_t wsm_handle;
#define WSM_HANDLE(slot, gen) (((uint64_t)(gen) << 32) | (uint64_t)(slot))
#define WSM_SLOT(h) ((uint32_t)((h) & 0xffffffffu))
#define WSM_GEN(h) ((uint32_t)((h) >> 32))

enum wsm_state {
    WSM_FREE = 0,
    WSM_CONNECTING = 1,
    WSM_OPEN = 2,
    WSM_DISCONNECTING = 3,
    WSM_CLOSED = 4,
};

enum wsm_err {
    WSM_OK = 0,
    WSM_ENOMEM = -1,
    WSM_EDUP = -2,
    WSM_ELIMIT_USER = -3,
    WSM_ELIMIT_TOTAL = -4,
    WSM_ENOTFOUND = -5,
};

typedef struct wsm_conn {
    uint32_t gen;        /* odd while the slot is in use */
    uint8_t state;       /* enum wsm_state */
    uint8_t in_heap;     /* has an entry in the sweep heap */
    uint8_t forced;      /* reported by the next sweep whatever its deadline */
    uint8_t pad_;
    uint16_t nchans;
    uint16_t capchans;
    uint32_t user;       /* index into users[], or WSM_NONE */
    uint32_t user_prev;  /* neighbours in the user's list */
    uint32_t user_next;
    uint32_t mark;       /* exclude-set epoch (see wsm_registry_resolve_*) */
    uint32_t heap_seq;   /* sequence of this connection's latest sweep-heap entry */
    uint32_t *chans;     /* channel indexes, capchans long */
    uint32_t *chanpos;   /* this slot's position in each channel's member array */
    const char *cid;     /* owned by the id map */
    uint32_t cid_len;
    uint32_t next_free;  /* free-list link while the slot is free */
    int64_t connected_at; /* CLOCK_MONOTONIC ns */
    int64_t last_seen;
    int64_t last_ping;
    uint64_t msgs_in, msgs_out, bytes_in, bytes_out;
    uint64_t native;     /* native engine handle, 0 on the portable plane */
} wsm_conn;

typedef struct wsm_user {
    const char *name;    /* owned by the user map */
    uint32_t len;
    uint32_t count;      /* live connections */
    uint32_t head;       /* first slot, or WSM_NONE */
    uint32_t next_free;
} wsm_user;

typedef struct wsm_channel {
    const char *name;    /* owned by the channel map */
    uint32_t len;
    uint32_t count;
    uint32_t cap;
    uint32_t *members;   /* slots */
    uint32_t next_free;
} wsm_channel;

/* The receivers of one delivery, split by plane. Portable receivers are registry handles (the
 * Python side owns their ASGI send); native receivers are engine handles, paired with their
 * registry handles for accounting. */
typedef struct wsm_targets {
    wsm_handle *portable;
    size_t nportable;
    uint64_t *native;
    wsm_handle *native_reg;
    size_t nnative;
} wsm_targets;

typedef struct wsm_registry {
    pthread_mutex_t lock;
    wsm_conn *conns;
    uint32_t nslots;      /* slots ever handed out (high-water mark) */
    uint32_t capslots;
    uint32_t free_head;   /* free-list of slots, WSM_NONE when empty */
    uint32_t live;        /* connections in any state but FREE */
    uint32_t open;        /* connections in state OPEN */
    uint32_t native_live; /* connections owned by the native engine */
    uint32_t epoch;       /* exclude marks */
    wsm_strmap ids;
    wsm_strmap user_map;
    wsm_user *users;
    uint32_t nusers, capusers, users_free, live_users;
    uint64_t users_version; /* moves whenever a user's connection count does */
    wsm_strmap chan_map;
    wsm_channel *chans;
    uint32_t nchans_, capchans_, chans_free, live_chans;
    wsm_sweep sweep;
    int64_t stale_after;  /* ns of silence before a connection is stale; 0 disables */
    /* Totals over the registry's life, removed connections included. */
    uint64_t total_connects, msgs_in, msgs_out, bytes_in, bytes_out, send_failures;
    uint64_t disconnects[WSM_R_COUNT];
} wsm_registry;

wsm_registry *wsm_registry_new(uint32_t initial_slots);
void wsm_registry_free(wsm_registry *r);

/* Registers a connection in state CONNECTING, checking the limits atomically with the insert
 * (0 = no limit). */
int wsm_registry_add(wsm_registry *r, const char *cid, size_t cid_len, const char *user,
                     size_t user_len, int has_user, uint32_t max_per_user, uint32_t max_total,
                     int64_t now, wsm_handle *out);
int wsm_registry_remove(wsm_registry *r, wsm_handle h);
wsm_conn *wsm_registry_get(wsm_registry *r, wsm_handle h);
int wsm_registry_find(wsm_registry *r, const char *cid, size_t len, wsm_handle *out);
int wsm_registry_set_state(wsm_registry *r, wsm_handle h, int state);
/* Any sign of life: refreshes last_seen and keeps the connection in the sweep heap. */
void wsm_registry_touch(wsm_registry *r, wsm_conn *c, int64_t now);
/* Makes the next sweep report the connection (the peer is known to be gone). */
int wsm_registry_expire(wsm_registry *r, wsm_handle h);

int wsm_registry_join(wsm_registry *r, wsm_handle h, const char *chan, size_t len);
int wsm_registry_leave(wsm_registry *r, wsm_handle h, const char *chan, size_t len);

/* Target resolution: OPEN connections only, minus the excluded handles. Arrays in *t are
 * malloc'ed here and released with wsm_targets_clear(). */
int wsm_registry_resolve_all(wsm_registry *r, const wsm_handle *excl, size_t nexcl, wsm_targets *t);
int wsm_registry_resolve_user(wsm_registry *r, const char *user, size_t len,
                              const wsm_handle *excl, size_t nexcl, wsm_targets *t);
int wsm_registry_resolve_channel(wsm_registry *r, const char *chan, size_t len,
                                 const wsm_handle *excl, size_t nexcl, wsm_targets *t);
void wsm_targets_clear(wsm_targets *t);

/* Pops every connection whose deadline has passed (O(expired + rescheduled)). Returns the
 * number written to out (at most max), or -1 when out of memory. */
long wsm_registry_sweep(wsm_registry *r, int64_t now, wsm_handle *out, size_t max);
void wsm_registry_set_stale_after(wsm_registry *r, int64_t ns);

#endif
