/* wsm_conn: one native connection, owned by the I/O thread.
 *
 * A wslay event context is the protocol state machine (parse, unmask, UTF-8 of text, control
 * frames, close handshake). wslay runs without buffering: the connection reassembles messages
 * itself, in one buffer that grows with the bytes that arrived (never with a length a header
 * merely claims), so a fragmented message costs what it weighs. The send callback appends to
 * the connection's own out-queue, where data frames encoded once by frame.c are appended by
 * reference too, so the wire order is the order of the appends and one send/sendmsg flushes
 * them all. The scanner of scan.h sees every inbound byte just before wslay does and takes
 * over what wslay 1.1.1 gets wrong (Close frames, bad lengths).
 *
 * The inbound budget. Every byte the peer makes us hold is charged to the connection (and to
 * the engine's inbound_bytes counter): payload delivered to Python and not yet acknowledged,
 * plus WSM_MSG_CHARGE per message (an empty message still costs an event, a Python object and
 * an inbox slot); the reassembly buffer's capacity (a compressed message's decompressed bytes);
 * an inflater while a compressed message is in progress (WSM_INFLATE_CHARGE, deflate.h); bytes
 * read from the socket but not yet parsed. Reading stops once the acknowledged-pending part passes read_limit, wslay is given
 * nothing more in that call, and reading resumes when Python acknowledges half of it.
 * wsm_conn_inbound_bound() is the most a connection can be charged. */
#ifndef WSM_CONN_H
#define WSM_CONN_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <wslay/wslay.h>

#include "deflate.h"
#include "frame.h"
#include "reasons.h"
#include "scan.h"

/* What a connection reports to its host (each becomes a Python event). */
enum wsm_event_kind {
    WSM_EV_TEXT = 1,
    WSM_EV_BINARY,
    WSM_EV_DISCONNECT,
    WSM_EV_WRITE_PAUSED,
    WSM_EV_WRITE_RESUMED,
    WSM_EV_READ_PAUSED,
};

typedef struct wsm_conn_opts {
    int64_t ping_interval;   /* ns; 0 disables pings and the stale check */
    int64_t ping_timeout;    /* ns of extra silence tolerated after ping_interval */
    int64_t send_timeout;    /* ns over max_queue_bytes before a slow-consumer close */
    int64_t close_timeout;   /* ns to wait for the peer's close frame */
    size_t max_message_size; /* inbound message limit (1009 above it) */
    size_t high_water;       /* queued bytes above which ASGI sends wait */
    size_t max_queue_bytes;  /* queued bytes tolerated for send_timeout */
    size_t read_limit;       /* charged, unacknowledged inbound bytes before reading stops */
    size_t compress_threshold; /* messages shorter than this go uncompressed (deflate.h) */
} wsm_conn_opts;

/* What one inbound message costs beyond its payload: the event, the Python message dict and
 * its inbox slot (measured at ~250 bytes with tracemalloc). Charged to the connection's budget
 * and to the event queue, and acknowledged by Python with the payload. */
#define WSM_MSG_CHARGE 256

/* The most a connection may be handed at registration as bytes read past the handshake
 * (Engine.register refuses more): the protocol stops reading at 64 KiB, plus one last read. */
#define WSM_LEFTOVER_MAX (1024 * 1024)

/* Counters written by the host's I/O thread only, read by stats() from any thread (relaxed
 * atomics), except event_queue_bytes, which the loop thread decreases when it drains. */
typedef struct wsm_counters {
    _Atomic uint64_t connections, total_connections;
    _Atomic uint64_t bytes_in, bytes_out, messages_in, messages_out, frames_dropped;
    _Atomic uint64_t queued_bytes, pings_sent, write_syscalls;
    _Atomic uint64_t inbound_bytes;      /* charged to every connection's inbound budget now */
    _Atomic uint64_t read_pauses;        /* connections whose reading paused at read_limit */
    _Atomic uint64_t event_queue_bytes;  /* charged events not yet drained (both threads) */
    _Atomic uint64_t event_queue_pauses; /* times the I/O thread stopped reading for them */
    _Atomic uint64_t deflated;           /* compressed encodings made (at most two per message) */
    _Atomic uint64_t deflate_shared;     /* deliveries of a shared context's encoding (deflate.h) */
    _Atomic uint64_t inflated;           /* compressed messages received */
    _Atomic uint64_t wslay_contexts;     /* connections holding a wslay context now (conn.c) */
    _Atomic uint64_t disconnects[WSM_R_COUNT];
} wsm_counters;

/* One writer thread, so an add is a relaxed load and store: no locked read-modify-write
 * (several per delivery), and readers still never see a torn value. */
static inline void wsm_counter_add(_Atomic uint64_t *ctr, uint64_t delta)
{
    atomic_store_explicit(ctr, atomic_load_explicit(ctr, memory_order_relaxed) + delta,
                          memory_order_relaxed);
}

struct wsm_nconn;

/* Everything a connection needs from whoever runs it, as wslay's callbacks + user_data: the
 * engine fills one for all its connections; a unit test or the fuzzer can fill its own and run
 * a connection with no thread (a socket is still needed for reads and writes). */
typedef struct wsm_conn_host {
    wsm_conn_opts o;
    wsm_counters st;
    int64_t now;      /* the host's clock for this turn of its loop */
    uint8_t *rbuf;    /* shared read buffer */
    size_t rbuf_size;
    int rx_blocked;   /* nonzero: nobody is read (the host's event queue is full) */
    wsm_zhost z;      /* its compressor and inflater pool (deflate.h); zeroed is empty */
    void *user;
    /* An event for the connection `handle`; takes data (malloc'ed, may be NULL) even on
     * failure. why/code for DISCONNECT. 0, or -1 when out of memory. */
    int (*emit)(void *user, int kind, uint64_t handle, uint8_t *data, size_t len, int why, int code);
    void (*closing)(void *user, uint64_t handle);        /* sends to it are refused from now */
    void (*dirty)(void *user, struct wsm_nconn *c);      /* flush it at the end of this turn */
    void (*defer)(void *user, struct wsm_nconn *c);      /* read it again once rx_blocked ends */
    void (*arm)(void *user, struct wsm_nconn *c, int64_t when); /* call back at its deadline */
} wsm_conn_host;

enum wsm_conn_phase {
    WSM_CONN_OPEN = 0,
    WSM_CONN_CLOSING, /* a Close frame is queued or sent; waiting for the peer's */
    WSM_CONN_LINGER,  /* reported to Python; write side shut, draining until EOF */
    WSM_CONN_DEAD,    /* freed at the end of this loop iteration */
};

#define WSM_OQ_INLINE 4

/* The first two cache lines hold everything a delivery touches (lookup, append, flush): a
 * broadcast to 10 000 walks 10 000 of these, and every extra line per connection is a cache
 * miss that also pushes the kernel's socket state out of the cache. The allocation is aligned
 * to a line (wsm_conn_new). Colder state (wslay, the scanner, the close handshake) follows. */
typedef struct wsm_nconn {
    /* line 0 */
    uint64_t handle;
    wsm_conn_host *host;
    /* Out-queue: a ring of frame references (inline until it outgrows WSM_OQ_INLINE); oq_off
     * bytes of the head are already written. The capacity is a power of two. */
    wsm_frame **oq;
    size_t oq_off, oq_bytes;
    struct wsm_nconn *dirty_next;
    uint32_t oq_cap, oq_head, oq_len;
    int fd;
    /* line 1 */
    wsm_frame *oq_inline[WSM_OQ_INLINE];
    int64_t over_since;    /* the queue went above max_queue_bytes then; 0 if not */
    int64_t blocked_since; /* the socket took nothing since then while bytes wait; 0 if not */
    uint32_t ev_mask;      /* the epoll interest currently registered */
    uint8_t phase;
    uint8_t in_dirty, want_out, write_paused, read_paused;
    uint8_t wslay_out;  /* wslay may hold a frame to send: set by every call that can queue one */
    uint8_t read_shut;  /* wslay reads no more: a copy kept by wsm_conn_feed, the only place
                         * where that changes, so the write path need not look into wslay */
    uint8_t deferred;   /* not read while the engine's event queue is over its limit */
    uint8_t z_bits;     /* permessage-deflate negotiated: the peer's window (8-15); 0 if not */
    uint8_t z_takeover; /* ... and the peer keeps its window: it may follow a shared context */
    uint8_t parked;     /* the host's: out of its epoll set (a hang-up while not reading) */

    /* cold */
    uint64_t z_sync;    /* the shared-context message the peer inflated last (deflate.h), 0: none */
    wslay_event_context_ptr ctx; /* NULL while the connection dozes (wsm_conn_wake, _doze) */
    size_t in_unacked; /* charged for messages Python has not acknowledged */
    int64_t last_seen, ping_sent, close_deadline;
    struct wsm_nconn *dead_next, *deferred_next;

    /* The bytes wslay may consume in the current wslay_event_recv call. */
    const uint8_t *rp;
    size_t rfeed;
    uint32_t timer_idx;  /* the host's: its position in the host's timer heap (here: no padding) */
    uint16_t fail_code;  /* set inside a wslay callback: close with it once wslay returns */
    uint8_t rx_stop;     /* the recv callback gives wslay nothing more in this call */
    uint8_t oq_pinned;   /* head frames no drop may take (the 101 response, until written) */

    /* Reassembly of the message in progress (rs_op 0 when none). */
    uint8_t *rs;
    size_t rs_len, rs_cap;
    union {
        uint64_t rs_frame_end; /* plain: rs_len once the current frame is complete */
        uint64_t rs_wire;      /* compressed: its bytes so far (max_message_size bounds them too) */
    };
    uint8_t rs_op, rs_in_data, rs_fin;
    uint8_t rs_z;          /* the message is compressed (RSV1 on its first frame) */
    uint8_t rs_z_end;      /* its DEFLATE stream ended: the rest of it is ignored */
    wsm_inflater *rs_inf;  /* held from its first frame to its end */

    /* Close state. */
    uint8_t why;        /* enum wsm_reason, once closing */
    uint8_t close_rcvd; /* the peer's Close frame arrived */
    uint8_t peer_reason_len;
    uint16_t our_code;
    uint16_t peer_code;
    uint8_t peer_reason[123];

    wsm_scan scan;
    wsm_scan_verdict verdict;
    /* Bytes read but not given to wslay yet: the start of an incomplete Close frame, or what
     * came after the point where reading paused. They were not scanned yet either. */
    uint8_t *held;
    size_t held_len;
} wsm_nconn;

wsm_nconn *wsm_conn_new(wsm_conn_host *host, uint64_t handle, int fd);
/* permessage-deflate was negotiated, with the peer's window for what we send (8-15), | WSM_Z_TAKEOVER
 * when the peer keeps its window between messages: RSV1 is allowed on the first frame of its
 * messages and its data frames go compressed from now on. */
void wsm_conn_set_deflate(wsm_nconn *c, unsigned bits);
/* Frees the context and the out-queue; the fd is the engine's to close. */
void wsm_conn_free(wsm_nconn *c);
/* Reads what the socket has and runs it through wslay. 0 ok, -1 EOF or error. */
int wsm_conn_read(wsm_nconn *c);
/* Bytes that arrived (from anywhere: tests, the fuzzer), after any held ones: copied into the
 * host's read buffer and fed. Returns how many were taken (fewer when the buffer is full), -1
 * on a fatal error. wsm_conn_read does the same straight from the socket. */
int wsm_conn_receive(wsm_nconn *c, const uint8_t *p, size_t n);
/* Runs bytes through the scanner and wslay. -1 on a fatal wslay error. */
int wsm_conn_feed(wsm_nconn *c, const uint8_t *p, size_t n);
/* Appends a reference to f. 0 queued, 1 dropped (closing), -1 out of memory. A data frame goes
 * in its compressed encoding to a connection that negotiated deflate (deflate.h). */
int wsm_conn_append(wsm_nconn *c, wsm_frame *f, int is_data);
/* Moves wslay's pending control frames into the out-queue: 1 if it moved any, 0 if not (wslay
 * is not even looked at unless a call since the last pump could have queued something), -1 on
 * a fatal error. */
int wsm_conn_pump(wsm_nconn *c);
/* One send/sendmsg (more while the socket takes everything). 0 ok, -1 the peer is gone. */
int wsm_conn_flush(wsm_nconn *c);
/* Starts the closing handshake from our side. */
void wsm_conn_close(wsm_nconn *c, int code, const uint8_t *reason, size_t len, int why);
void wsm_conn_ping(wsm_nconn *c);
/* The closing handshake is over and everything is written. */
int wsm_conn_finished(const wsm_nconn *c);
/* Notices a Close frame wslay queued by itself (a protocol error). */
void wsm_conn_note_wslay_close(wsm_nconn *c);
/* Earliest deadline of the connection, INT64_MAX for none. */
int64_t wsm_conn_deadline(const wsm_nconn *c);
/* Drops queued data after the partially written head (slow consumer, shutdown). */
void wsm_conn_drop_queue(wsm_nconn *c);
/* The app consumed n charged bytes (Engine.ack): may resume reading. -1 on a fatal error. */
int wsm_conn_ack(wsm_nconn *c, size_t n);
/* Feeds what was held back while reading was paused (also what wslay itself kept). */
int wsm_conn_resume(wsm_nconn *c);
/* Bytes charged to the inbound budget now. */
size_t wsm_conn_inbound(const wsm_nconn *c);
/* The most wsm_conn_inbound can ever be under these options (tested by the fuzzer). */
size_t wsm_conn_inbound_bound(const wsm_conn_opts *o);
/* While reading is paused the peer's pongs cannot be seen: 1 when TCP shows the peer's kernel
 * acknowledged everything we sent, or something within the last `window` ns. */
int wsm_conn_tcp_alive(const wsm_nconn *c, int64_t window);
/* The message charge of an event Python acknowledges: payload plus WSM_MSG_CHARGE. */
static inline size_t wsm_msg_charge(size_t len) { return len + WSM_MSG_CHARGE; }

#endif
