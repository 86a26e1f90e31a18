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

#include "frame.h"
#include "timer.h"

/* Why a connection ended; same order as the registry's enum wsm_reason and _core.REASONS. */
enum wsm_engine_reason {
    WSM_ER_NORMAL = 0,
    WSM_ER_ABRUPT,
    WSM_ER_STALE,
    WSM_ER_LIMIT,
    WSM_ER_SLOW_CONSUMER,
    WSM_ER_PROTOCOL_ERROR,
    WSM_ER_SHUTDOWN,
    WSM_ER_COUNT
};

typedef struct wsm_engine_opts {
    int64_t ping_interval;    /* ns; 0 disables pings and the stale check */
    int64_t ping_timeout;     /* ns of extra silence tolerated after ping_interval */
    int64_t send_timeout;     /* ns over max_queue_bytes before a slow-consumer close */
    int64_t close_timeout;    /* ns to wait for the peer's close frame */
    size_t max_message_size; /* inbound message limit (1009 above it) */
    size_t high_water;       /* queued bytes above which ASGI sends wait */
    size_t max_queue_bytes;  /* queued bytes tolerated for send_timeout */
    size_t read_limit;       /* charged, unacknowledged inbound bytes before reading stops */
    size_t event_queue_limit; /* charged bytes of events not yet drained by the loop, all
                               * connections together, before the I/O thread stops reading */
} wsm_engine_opts;

/* What one inbound message costs beyond its payload: the event, the Python message dict and
 * its inbox slot (measured at ~250 bytes with tracemalloc). Charged to the connection's budget
 * and to the event queue, and acknowledged by Python with the payload. */
#define WSM_MSG_CHARGE 256

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
    uint8_t why;       /* CLOSE: enum wsm_engine_reason */
    uint16_t code;     /* CLOSE: status code */
    int fd;            /* REGISTER: the engine's own duplicate */
    uint64_t handle;
    wsm_frame *frame;  /* SEND/FANOUT: the frame; REGISTER: bytes to write first (the 101) */
    uint64_t *handles; /* FANOUT: receivers (malloc'ed copy) */
    size_t n;          /* FANOUT: receivers; ACK: bytes consumed */
    uint8_t *data;     /* REGISTER: bytes read past the handshake; CLOSE: reason */
    size_t len;
} wsm_cmd;

enum wsm_event_kind {
    WSM_EV_TEXT = 1,
    WSM_EV_BINARY,
    WSM_EV_DISCONNECT,
    WSM_EV_WRITE_PAUSED,
    WSM_EV_WRITE_RESUMED,
    WSM_EV_READ_PAUSED,
};

typedef struct wsm_event {
    uint8_t kind;
    uint8_t why;      /* DISCONNECT: enum wsm_engine_reason */
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

/* Counters written by the I/O thread, read by stats() from any thread (relaxed atomics). */
typedef struct wsm_engine_counters {
    _Atomic uint64_t connections, total_connections;
    _Atomic uint64_t bytes_in, bytes_out, messages_in, messages_out, frames_dropped;
    _Atomic uint64_t queued_bytes, pings_sent, write_syscalls;
    _Atomic uint64_t inbound_bytes;      /* charged to every connection's inbound budget now */
    _Atomic uint64_t read_pauses;        /* connections whose reading paused at read_limit */
    _Atomic uint64_t event_queue_bytes;  /* charged events not yet drained (both threads) */
    _Atomic uint64_t event_queue_pauses; /* times the I/O thread stopped reading for them */
    _Atomic uint64_t disconnects[WSM_ER_COUNT];
} wsm_engine_counters;

/* The I/O thread is the only writer, so an add is a relaxed load and store: no locked
 * read-modify-write (several per delivery), and readers still never see a torn value. */
static inline void wsm_counter_add(_Atomic uint64_t *ctr, uint64_t delta)
{
    atomic_store_explicit(ctr, atomic_load_explicit(ctr, memory_order_relaxed) + delta,
                          memory_order_relaxed);
}

struct wsm_nconn;

typedef struct wsm_engine {
    wsm_engine_opts o;
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
    uint8_t *rbuf;
    size_t rbuf_size;
    int evq_over;                /* event queue above its limit: nobody is read */
    struct wsm_nconn *deferred;  /* connections waiting for it to drain */
    int64_t now;

    wsm_engine_counters st;
} wsm_engine;

/* Loop-thread API. */
wsm_engine *wsm_engine_new(const wsm_engine_opts *o);
int wsm_engine_start(wsm_engine *e);
/* Closes every connection with 1012, stops and joins the thread. Idempotent. */
void wsm_engine_stop(wsm_engine *e);
void wsm_engine_free(wsm_engine *e);
/* Takes ownership of fd, out (may be NULL) and in (may be NULL) even on failure. Returns the
 * handle, or 0 when out of memory. */
uint64_t wsm_engine_register(wsm_engine *e, int fd, wsm_frame *out, uint8_t *in, size_t inlen);
/* Takes ownership of f. Returns 1 when queued for a live connection. */
int wsm_engine_send(wsm_engine *e, uint64_t h, wsm_frame *f);
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

/* Shared helpers for conn.c / fanout.c (I/O thread unless said otherwise). */
int wsm_engine_push_cmd(wsm_engine *e, const wsm_cmd *c);  /* any thread */
/* With lock held: appends; returns 1 when the I/O thread must be woken (wsm_engine_wake). */
int wsm_engine_push_locked(wsm_engine *e, const wsm_cmd *c);
void wsm_engine_wake(wsm_engine *e);
void wsm_engine_cmd_release(wsm_cmd *c);
int wsm_engine_slot_live(const wsm_engine *e, uint64_t h); /* caller holds lock */
struct wsm_nconn *wsm_engine_lookup(wsm_engine *e, uint64_t h);
int wsm_engine_emit(wsm_engine *e, int kind, uint64_t h, const uint8_t *data, size_t len);
/* Like wsm_engine_emit, but the event takes data (malloc'ed), freed here on failure. */
int wsm_engine_emit_owned(wsm_engine *e, int kind, uint64_t h, uint8_t *data, size_t len);
/* What an event costs the event queue. */
size_t wsm_event_charge(const wsm_event *ev);
/* The connection waits for the event queue to drain (reading stopped meanwhile). */
void wsm_engine_defer(wsm_engine *e, struct wsm_nconn *c);
void wsm_engine_mark_closing(wsm_engine *e, uint64_t h);
void wsm_engine_mark_dirty(wsm_engine *e, struct wsm_nconn *c);
int64_t wsm_engine_now(void);

#endif
