/* wsm_engine: the native plane's I/O thread.
 *
 * One engine per process, one thread, one epoll set. The event-loop thread talks to it only
 * through two queues, each guarded by `lock` and announced by an eventfd: commands (register a
 * socket, send, fan out, close, ack, stop) go in, events (message, disconnect, flow control)
 * come out. Connections, wslay contexts, out-queues and timers belong to the I/O thread alone;
 * the only state both threads touch is under `lock` (the queues and the handle allocator) or
 * atomic (the counters of stats()). A handle is (generation << 32 | slot), so a late command
 * for a reused slot is recognised and dropped. */
#ifndef WSM_ENGINE_H
#define WSM_ENGINE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "conn.h"
#include "frame.h"
#include "timer.h"

/* The options of an engine: its connections' own, and its event queue's bound. */
typedef struct wsm_engine_opts {
    wsm_conn_opts conn;
    size_t event_queue_limit; /* charged bytes of events not yet drained by the loop, all
                               * connections together, before the I/O thread stops reading */
} wsm_engine_opts;

enum wsm_cmd_kind {
    WSM_CMD_REGISTER = 1,
    WSM_CMD_SEND,
    WSM_CMD_FANOUT,
    WSM_CMD_CLOSE,
    WSM_CMD_ACK,
    WSM_CMD_STOP,
};

typedef struct wsm_cmd {
    uint8_t kind;
    uint8_t why;       /* CLOSE: enum wsm_reason */
    uint8_t z_bits;    /* REGISTER: permessage-deflate negotiated, the peer's window (| WSM_Z_TAKEOVER); 0 if not */
    uint16_t code;     /* CLOSE: status code */
    int fd;            /* REGISTER: the engine's own duplicate */
    uint64_t handle;
    wsm_frame *frame;  /* SEND/FANOUT: the frame; REGISTER: bytes to write first (the 101) */
    uint64_t *handles; /* FANOUT: receivers (malloc'ed copy) */
    size_t n;          /* FANOUT: receivers; ACK: bytes consumed */
    uint8_t *data;     /* REGISTER: bytes read past the handshake; CLOSE: reason */
    size_t len;
} wsm_cmd;

typedef struct wsm_event {
    uint8_t kind;
    uint8_t why;      /* DISCONNECT: enum wsm_reason */
    uint16_t code;    /* DISCONNECT: close code */
    uint64_t handle;
    uint8_t *data;    /* message payload or close reason (malloc'ed), may be NULL */
    size_t len;
} wsm_event;

enum wsm_slot_state { WSM_SLOT_FREE = 0, WSM_SLOT_LIVE, WSM_SLOT_CLOSING };

typedef struct wsm_slot {
    uint32_t gen;
    uint8_t state;
    uint32_t next_free;
} wsm_slot;

struct wsm_nconn;

typedef struct wsm_engine {
    /* What its connections get from it: options, counters, the clock, the read buffer, and the
     * callbacks below (wsm_engine_new sets them). Read and written by the I/O thread; the
     * counters are atomics that stats() reads from any thread. */
    wsm_conn_host host;
    size_t evq_limit;
    pthread_t thread;
    int started, joined;
    int epfd, cmd_efd, evt_efd;

    /* Shared, under lock. */
    pthread_mutex_t lock;
    wsm_cmd *cmds;
    size_t ncmds, capcmds;
    wsm_event *evs;
    size_t nevs, capevs;
    wsm_slot *slots;
    uint32_t nslots, capslots, free_head;
    int stop_requested;
    _Atomic int evq_wake; /* the I/O thread waits for a drain: the loop thread wakes it */

    /* I/O thread only. */
    struct wsm_nconn **conns; /* indexed by slot */
    uint32_t capconns;
    wsm_timer_heap timers;
    struct wsm_nconn *dirty;  /* connections with bytes to flush this iteration */
    struct wsm_nconn *dead;   /* connections freed at the end of this iteration */
    wsm_cmd *cmds_io;         /* the command buffer being run (swapped with cmds) */
    size_t capcmds_io;
    wsm_event *lev;           /* events of this iteration, published at its end */
    size_t nlev, caplev;
    struct wsm_nconn *deferred;  /* connections waiting for the event queue to drain */
} wsm_engine;

/* Loop-thread API. */
wsm_engine *wsm_engine_new(const wsm_engine_opts *o);
int wsm_engine_start(wsm_engine *e);
/* Closes every connection with 1012, stops and joins the thread. Idempotent. */
void wsm_engine_stop(wsm_engine *e);
void wsm_engine_free(wsm_engine *e);
/* Takes ownership of fd, out (may be NULL) and in (may be NULL) even on failure. z_bits: 0, or
 * permessage-deflate was negotiated with that server_max_window_bits (8-15; 15 when the offer
 * had none), | WSM_Z_TAKEOVER (deflate.h) when the peer keeps its window. Returns the handle,
 * or 0 when out of memory. */
uint64_t wsm_engine_register(wsm_engine *e, int fd, wsm_frame *out, uint8_t *in, size_t inlen,
                             unsigned z_bits);
/* Takes ownership of f. Returns 1 when queued for a live connection. */
int wsm_engine_send(wsm_engine *e, uint64_t h, wsm_frame *f);
/* One frame to every receiver (its handles are copied): takes ownership of f. Returns the
 * number of receivers alive when queued, or -1 when out of memory. Safe without the GIL. */
long wsm_engine_fanout(wsm_engine *e, const uint64_t *handles, size_t n, wsm_frame *f);
int wsm_engine_close(wsm_engine *e, uint64_t h, int code, const char *reason, size_t len, int why);
void wsm_engine_ack(wsm_engine *e, uint64_t h, size_t nbytes);
/* One turn of the I/O thread's loop (epoll_wait for at most timeout_ms, -1 = until the next
 * timer; commands, I/O, timers, flushes, events published); 1 when a STOP command ran. The
 * thread calls it until then; tests and the fuzzer call it themselves on an engine that was
 * never started, as its I/O thread. */
int wsm_engine_iterate(wsm_engine *e, int timeout_ms);
/* Moves the pending events to *out (caller frees each data and the array). */
size_t wsm_engine_take_events(wsm_engine *e, wsm_event **out);
void wsm_engine_event_free(wsm_event *ev, size_t n);

/* I/O thread: the connection behind a handle, NULL once it is gone. */
struct wsm_nconn *wsm_engine_lookup(wsm_engine *e, uint64_t h);
/* What an event costs the event queue. */
size_t wsm_event_charge(const wsm_event *ev);

#endif
