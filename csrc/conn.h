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
 * an inbox slot); the reassembly buffer's capacity; bytes read from the socket but not yet
 * parsed. Reading stops once the acknowledged-pending part passes read_limit, wslay is given
 * nothing more in that call, and reading resumes when Python acknowledges half of it.
 * wsm_conn_inbound_bound() is the most a connection can be charged. */
#ifndef WSM_CONN_H
#define WSM_CONN_H

#include <stddef.h>
#include <stdint.h>
#include <wslay/wslay.h>

#include "engine.h"
#include "frame.h"
#include "scan.h"

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
    wsm_engine *eng;
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

    /* cold */
    wslay_event_context_ptr ctx;
    uint32_t timer_idx;
    size_t in_unacked; /* charged for messages Python has not acknowledged */
    int64_t last_seen, ping_sent, close_deadline;
    struct wsm_nconn *dead_next, *deferred_next;

    /* The bytes wslay may consume in the current wslay_event_recv call. */
    const uint8_t *rp;
    size_t rfeed;
    uint8_t rx_stop;     /* the recv callback gives wslay nothing more in this call */
    uint16_t fail_code;  /* set inside a wslay callback: close with it once wslay returns */

    /* Reassembly of the message in progress (rs_op 0 when none). */
    uint8_t *rs;
    size_t rs_len, rs_cap;
    uint64_t rs_frame_end; /* rs_len once the current frame is complete */
    uint8_t rs_op, rs_in_data, rs_fin;

    /* Close state. */
    uint8_t why;        /* enum wsm_engine_reason, once closing */
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

wsm_nconn *wsm_conn_new(wsm_engine *e, uint64_t handle, int fd);
/* Frees the context and the out-queue; the fd is the engine's to close. */
void wsm_conn_free(wsm_nconn *c);
/* Reads what the socket has and runs it through wslay. 0 ok, -1 EOF or error. */
int wsm_conn_read(wsm_nconn *c);
/* Runs bytes through the scanner and wslay. -1 on a fatal wslay error. */
int wsm_conn_feed(wsm_nconn *c, const uint8_t *p, size_t n);
/* Appends a reference to f. 0 queued, 1 dropped (closing), -1 out of memory. */
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
size_t wsm_conn_inbound_bound(const wsm_engine_opts *o);
/* While reading is paused the peer's pongs cannot be seen: 1 when TCP shows the peer's kernel
 * acknowledged everything we sent, or something within the last `window` ns. */
int wsm_conn_tcp_alive(const wsm_nconn *c, int64_t window);
/* The message charge of an event Python acknowledges: payload plus WSM_MSG_CHARGE. */
static inline size_t wsm_msg_charge(size_t len) { return len + WSM_MSG_CHARGE; }

#endif
