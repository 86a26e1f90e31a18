/* wsm_conn: one native connection, owned by the I/O thread.
 *
 * A wslay event context is the protocol state machine (parse, unmask, reassemble, UTF-8,
 * control frames, close handshake). Its send callback appends to the connection's own
 * out-queue, where data frames encoded once by frame.c are appended by reference too, so the
 * wire order is the order of the appends and one send/sendmsg flushes them all. A small scanner
 * walks the inbound stream frame by frame ahead of wslay, only to divert Close frames with the
 * codes 1012-1014, which wslay 1.1.1 wrongly rejects as protocol errors. */
#ifndef WSM_CONN_H
#define WSM_CONN_H

#include <stddef.h>
#include <stdint.h>
#include <wslay/wslay.h>

#include "engine.h"
#include "frame.h"

/* A complete Close frame from a client: 2 header + 4 mask + 125 payload bytes. */
#define WSM_HELD_MAX 131

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

    /* cold */
    wslay_event_context_ptr ctx;
    uint32_t timer_idx;
    size_t in_unacked;
    int64_t last_seen, ping_sent, close_deadline;
    struct wsm_nconn *dead_next;

    /* The bytes wslay may consume in the current wslay_event_recv call. */
    const uint8_t *rp;
    size_t rfeed;

    /* Close state. */
    uint8_t why;        /* enum wsm_engine_reason, once closing */
    uint8_t diverted;   /* the scanner stopped: 1 at a 1012-1014 Close, 3 at a bad control frame */
    uint8_t close_rcvd; /* the peer's Close frame arrived */
    uint8_t peer_reason_len;
    uint16_t our_code;
    uint16_t peer_code;
    uint8_t peer_reason[125];

    /* Frame-boundary scanner. */
    uint8_t sc_hdr[14];
    uint8_t sc_have;
    uint8_t sc_inpayload;
    uint64_t sc_left;

    /* An incomplete Close frame kept until the rest arrives (see wsm_conn_scan). */
    uint16_t held_len;
    uint8_t held[WSM_HELD_MAX];
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
/* Strict UTF-8 check (RFC 3629). */
int wsm_conn_utf8_valid(const uint8_t *s, size_t n);

#endif
