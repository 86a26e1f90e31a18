/* One native connection: wslay context, inbound scanner, out-queue (see conn.h). */
/* Linux only (epoll, eventfd); elsewhere the module builds without the engine. */
#ifdef __linux__
#include "conn.h"

#include "timer.h"

#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define WSM_IOV_MAX 64

_Static_assert(offsetof(wsm_nconn, z_bits) < 128, "a delivery's fields span two cache lines");

static void wsm_conn_count(_Atomic uint64_t *ctr, int64_t delta)
{
    wsm_counter_add(ctr, (uint64_t)delta); /* two's complement: a negative delta subtracts */
}

/* ---- budget ------------------------------------------------------------------------------ */

static void wsm_conn_charge(wsm_nconn *c, int64_t delta)
{
    wsm_conn_count(&c->host->st.inbound_bytes, delta);
}

size_t wsm_conn_inbound(const wsm_nconn *c)
{
    return c->in_unacked + c->rs_cap + c->held_len + (c->rs_inf ? WSM_INFLATE_CHARGE : 0);
}

/* wslay parses from a read buffer of its own (4 096 bytes): what is in it when reading pauses
 * still becomes messages, at most one per 6 bytes (the smallest masked frame). */
#define WSM_WSLAY_IBUF 4096

/* The payload the messages in wslay's buffer can hold once decompressed: each message at most
 * max_message_size, all of them at most what DEFLATE can expand 4 096 bytes to. */
static size_t wsm_conn_ibuf_payload(const wsm_conn_opts *o)
{
    size_t inflated = (size_t)WSM_WSLAY_IBUF * WSM_INFLATE_RATIO + 64 * 1024;
    size_t each = (WSM_WSLAY_IBUF / 6 + 1) * o->max_message_size;
    size_t most = o->max_message_size > SIZE_MAX / (WSM_WSLAY_IBUF / 6 + 1) ? inflated : each;
    return WSM_WSLAY_IBUF + (inflated < most ? inflated : most);
}

size_t wsm_conn_inbound_bound(const wsm_conn_opts *o)
{
    size_t read = (o->read_limit > WSM_WSLAY_IBUF ? o->read_limit : WSM_WSLAY_IBUF) +
                  WSM_SCAN_CLOSE_MAX + WSM_LEFTOVER_MAX;
    return o->read_limit                                   /* acknowledged-pending, up to the pause */
           + wsm_msg_charge(o->max_message_size)           /* the message that crossed it */
           + (WSM_WSLAY_IBUF / 6 + 1) * WSM_MSG_CHARGE + wsm_conn_ibuf_payload(o) /* wslay's */
           + o->max_message_size + WSM_INFLATE_CHARGE      /* the message in reassembly */
           + read; /* read, not yet parsed: a read's worth, an incomplete Close, the leftover */
}

static int wsm_conn_rx_paused(const wsm_nconn *c)
{
    return c->read_paused || c->host->rx_blocked;
}

/* ---- wslay callbacks ------------------------------------------------------------------- */

/* wslay asks for bytes: each is scanned (scan.h) just before wslay gets it, so the scanner and
 * wslay always agree on where frames start. */
static ssize_t wsm_conn_recv_cb(wslay_event_context_ptr ctx, uint8_t *buf, size_t len,
                                int flags, void *user)
{
    (void)flags;
    wsm_nconn *c = user;
    size_t k = len < c->rfeed ? len : c->rfeed;
    if (k && !c->rx_stop && !wsm_conn_rx_paused(c)) {
        k = wsm_scan_run(&c->scan, c->rp, k, c->rfeed, &c->verdict);
        if (c->verdict.result != WSM_SCAN_PASS)
            c->rx_stop = 1;
    } else {
        k = 0;
    }
    if (k == 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    memcpy(buf, c->rp, k);
    c->rp += k;
    c->rfeed -= k;
    return (ssize_t)k;
}

/* Stops parsing from inside a wslay callback; the Close follows once wslay returns. */
static void wsm_conn_fail(wsm_nconn *c, uint16_t code)
{
    if (c->fail_code == 0)
        c->fail_code = code;
    c->rx_stop = 1;
}

static void wsm_conn_z_frame(wsm_nconn *c, uint64_t payload_length);
static void wsm_conn_z_inflate(wsm_nconn *c, const uint8_t *p, size_t n);

static void wsm_conn_on_frame_start(wslay_event_context_ptr ctx,
                                    const struct wslay_event_on_frame_recv_start_arg *a, void *user)
{
    (void)ctx;
    wsm_nconn *c = user;
    c->rs_in_data = a->opcode <= WSLAY_BINARY_FRAME; /* control frames: wslay buffers them */
    if (!c->rs_in_data || c->fail_code)
        return;
    if (a->opcode != WSLAY_CONTINUATION_FRAME) {
        c->rs_op = a->opcode; /* wslay refuses a new message inside another one */
        /* RSV1 only gets here on a connection that negotiated deflate, and only on a first
         * frame: wslay refuses it elsewhere (1002) */
        c->rs_z = (a->rsv & WSLAY_RSV1_BIT) != 0;
        if (c->rs_z)
            c->rs_wire = 0; /* shares its word with rs_frame_end */
    }
    c->rs_fin = a->fin;
    if (c->rs_z) {
        wsm_conn_z_frame(c, a->payload_length);
        return;
    }
    if (a->payload_length > c->host->o.max_message_size - c->rs_len) {
        wsm_conn_fail(c, 1009);
        return;
    }
    c->rs_frame_end = c->rs_len + a->payload_length;
}

/* Room for `need` bytes: grows by half (so a message in many fragments is not copied once per
 * fragment), never past the end of the message once its last frame is known, never past
 * max_message_size. */
static int wsm_conn_rs_reserve(wsm_nconn *c, size_t need)
{
    if (need <= c->rs_cap)
        return 0;
    size_t cap = c->rs_cap + c->rs_cap / 2;
    if (cap < 1024)
        cap = 1024;
    if (c->rs_fin && !c->rs_z && cap > c->rs_frame_end)
        cap = (size_t)c->rs_frame_end;
    if (cap > c->host->o.max_message_size)
        cap = c->host->o.max_message_size;
    if (cap < need)
        cap = need;
    uint8_t *p = realloc(c->rs, cap);
    if (p == NULL)
        return -1;
    wsm_conn_charge(c, (int64_t)(cap - c->rs_cap));
    c->rs = p;
    c->rs_cap = cap;
    return 0;
}

static void wsm_conn_on_frame_chunk(wslay_event_context_ptr ctx,
                                    const struct wslay_event_on_frame_recv_chunk_arg *a, void *user)
{
    (void)ctx;
    wsm_nconn *c = user;
    if (!c->rs_in_data || c->fail_code || a->data_length == 0)
        return;
    if (c->rs_z) {
        wsm_conn_z_inflate(c, a->data, a->data_length);
        return;
    }
    if (wsm_conn_rs_reserve(c, c->rs_len + a->data_length) < 0) {
        wsm_conn_fail(c, 1011);
        return;
    }
    memcpy(c->rs + c->rs_len, a->data, a->data_length);
    c->rs_len += a->data_length;
}

/* ---- compressed messages (deflate.h) ------------------------------------------------------ */

/* The first frame of a compressed message takes an inflater; every frame's compressed length
 * counts against max_message_size too (what arrives is streamed through, never held). */
static void wsm_conn_z_frame(wsm_nconn *c, uint64_t payload_length)
{
    if (payload_length > c->host->o.max_message_size - c->rs_wire) {
        wsm_conn_fail(c, 1009);
        return;
    }
    c->rs_wire += payload_length;
    if (c->rs_inf != NULL)
        return;
    c->rs_inf = wsm_z_take(&c->host->z);
    if (c->rs_inf == NULL) {
        wsm_conn_fail(c, 1011);
        return;
    }
    c->rs_z_end = 0;
    wsm_conn_charge(c, WSM_INFLATE_CHARGE);
}

/* The inflater goes back to the host's pool: the message ended or failed. */
static void wsm_conn_z_release(wsm_nconn *c)
{
    if (c->rs_inf == NULL)
        return;
    wsm_z_give(&c->host->z, c->rs_inf);
    c->rs_inf = NULL;
    wsm_conn_charge(c, -(int64_t)WSM_INFLATE_CHARGE);
}

/* Inflates compressed bytes into the reassembly buffer, grown by the same rule as for plain
 * bytes and never past max_message_size: once full, one spare byte tells whether the stream
 * has more to give, and then the message is too big (1009) without a byte more allocated. */
static void wsm_conn_z_inflate(wsm_nconn *c, const uint8_t *p, size_t n)
{
    size_t max = c->host->o.max_message_size;
    while (!c->rs_z_end && !c->fail_code) {
        if (c->rs_len == c->rs_cap && c->rs_cap < max &&
            wsm_conn_rs_reserve(c, c->rs_len + 1) < 0) {
            wsm_conn_fail(c, 1011);
            return;
        }
        uint8_t spare;
        int full = c->rs_len == c->rs_cap;
        size_t made, left = n;
        int r = wsm_z_inflate(c->rs_inf, p, &left, full ? &spare : c->rs + c->rs_len,
                              full ? 1 : c->rs_cap - c->rs_len, &made);
        p += n - left;
        n = left;
        if (full && made) {
            wsm_conn_fail(c, 1009);
            return;
        }
        c->rs_len += made;
        if (r == WSM_Z_ERROR) {
            wsm_conn_fail(c, 1007);
            return;
        }
        c->rs_z_end = r == WSM_Z_END;
        if (r == WSM_Z_OK || (full && !made && n == 0))
            return;
    }
}

/* The last frame of a compressed message is in: the sync flush's tail the sender left out
 * (RFC 7692 7.2.2) goes in, the inflater goes back, a text message's UTF-8 is checked. */
static int wsm_conn_z_finish(wsm_nconn *c)
{
    static const uint8_t tail[4] = {0x00, 0x00, 0xff, 0xff};
    if (c->rs_inf == NULL) { /* every frame start took it or failed: not expected */
        wsm_conn_fail(c, 1011);
        return -1;
    }
    wsm_conn_z_inflate(c, tail, sizeof tail);
    wsm_conn_z_release(c);
    if (c->fail_code)
        return -1;
    wsm_counter_add(&c->host->st.inflated, 1);
    if (c->rs_op == WSLAY_TEXT_FRAME && !wsm_utf8_valid(c->rs, c->rs_len)) {
        wsm_conn_fail(c, 1007);
        return -1;
    }
    c->rs_z = 0;
    return 0;
}

static void wsm_conn_rs_release(wsm_nconn *c)
{
    wsm_conn_charge(c, -(int64_t)c->rs_cap);
    free(c->rs);
    c->rs = NULL;
    c->rs_len = c->rs_cap = 0;
    c->rs_op = 0;
}

/* The message in the reassembly buffer is complete: the buffer itself becomes the event. */
static void wsm_conn_deliver(wsm_nconn *c)
{
    wsm_conn_host *e = c->host;
    int kind = c->rs_op == WSLAY_TEXT_FRAME ? WSM_EV_TEXT : WSM_EV_BINARY;
    uint8_t *data = c->rs;
    size_t len = c->rs_len;
    if (c->phase != WSM_CONN_OPEN) {
        /* Past our Close: the app no longer reads, so the message is dropped (as uvicorn). */
        wsm_conn_rs_release(c);
        wsm_conn_count(&e->st.frames_dropped, 1);
        return;
    }
    wsm_conn_charge(c, -(int64_t)c->rs_cap);
    c->rs = NULL;
    c->rs_len = c->rs_cap = 0;
    c->rs_op = 0;
    if (len == 0) {
        free(data);
        data = NULL;
    } else if (len < 64 * 1024 * 1024) { /* the slack of the last growth step goes back */
        uint8_t *p = realloc(data, len);
        if (p != NULL)
            data = p;
    }
    if (e->emit(e->user, kind, c->handle, data, len, 0, 0) < 0) {
        wsm_conn_fail(c, 1011);
        return;
    }
    wsm_conn_count(&e->st.messages_in, 1);
    c->in_unacked += wsm_msg_charge(len);
    wsm_conn_charge(c, (int64_t)wsm_msg_charge(len));
    if (!c->read_paused && c->in_unacked > e->o.read_limit) {
        c->read_paused = 1; /* the recv callback gives wslay nothing more */
        wsm_counter_add(&e->st.read_pauses, 1);
        e->emit(e->user, WSM_EV_READ_PAUSED, c->handle, NULL, 0, 0, 0);
    }
}

static void wsm_conn_on_msg(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *a,
                            void *user)
{
    (void)ctx;
    wsm_nconn *c = user;
    if ((a->opcode == WSLAY_TEXT_FRAME || a->opcode == WSLAY_BINARY_FRAME) && !c->fail_code &&
        (!c->rs_z || wsm_conn_z_finish(c) == 0))
        wsm_conn_deliver(c);
    /* Close frames never reach wslay (scan.h); pings and pongs: every frame already refreshed
     * last_seen, and wslay queued the pong itself. */
}

/* wslay hands over its frames piecewise (header, then payload); consecutive pieces are packed
 * into the tail byte run when it has room, so a control frame is one iovec. */
static ssize_t wsm_conn_send_cb(wslay_event_context_ptr ctx, const uint8_t *data, size_t len,
                                int flags, void *user)
{
    (void)flags;
    wsm_nconn *c = user;
    if (c->oq_len) {
        wsm_frame *t = c->oq[(c->oq_head + c->oq_len - 1) & (c->oq_cap - 1)];
        if (t->appendable && t->cap - t->len >= len) {
            memcpy(t->data + t->len, data, len);
            t->len += len;
            c->oq_bytes += len;
            wsm_conn_count(&c->host->st.queued_bytes, (int64_t)len);
            return (ssize_t)len;
        }
    }
    wsm_frame *f = wsm_frame_raw(data, len);
    if (f == NULL || wsm_conn_append(c, f, 0) < 0) {
        wsm_frame_decref(f);
        wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
        return -1;
    }
    wsm_frame_decref(f);
    return (ssize_t)len;
}

static const struct wslay_event_callbacks wsm_conn_callbacks = {
    .recv_callback = wsm_conn_recv_cb,
    .send_callback = wsm_conn_send_cb,
    .on_msg_recv_callback = wsm_conn_on_msg,
    .on_frame_recv_start_callback = wsm_conn_on_frame_start,
    .on_frame_recv_chunk_callback = wsm_conn_on_frame_chunk,
};

/* ---- life cycle ------------------------------------------------------------------------ */

/* The connection's wslay context, made with its first inbound bytes (and for a Close): an open
 * connection at a frame boundary with nothing in wslay gives it back (wsm_conn_doze), so an idle
 * connection holds none (a context is ~8.5 KiB: its 4 KiB input and output buffers; making and
 * freeing one costs ~0.25 µs). 0, or -1 when out of memory. */
static int wsm_conn_wake(wsm_nconn *c)
{
    if (c->ctx != NULL)
        return 0;
    if (wslay_event_context_server_init(&c->ctx, &wsm_conn_callbacks, c) != 0) {
        c->ctx = NULL;
        return -1;
    }
    wslay_event_config_set_max_recv_msg_length(c->ctx, c->host->o.max_message_size);
    wslay_event_config_set_no_buffering(c->ctx, 1);
    if (c->z_bits)
        wslay_event_config_set_allowed_rsv_bits(c->ctx, WSLAY_RSV1_BIT);
    wsm_conn_count(&c->host->st.wslay_contexts, 1);
    return 0;
}

/* Gives the context back when a new one would be in the same state: the connection is open,
 * every byte wslay was given ended a frame (the scanner is at a boundary, so wslay's input
 * buffer is empty), no message is in progress (wslay's UTF-8 and fragment state start afresh),
 * nothing is held back, wslay has nothing to send and reading goes on. */
static void wsm_conn_doze(wsm_nconn *c)
{
    if (c->ctx == NULL || c->phase != WSM_CONN_OPEN || c->wslay_out || c->read_shut || c->fail_code ||
        c->held_len || c->rs_op || c->scan.have || c->scan.left ||
        c->verdict.result != WSM_SCAN_PASS || wslay_event_want_write(c->ctx) ||
        !wslay_event_get_read_enabled(c->ctx))
        return;
    wslay_event_context_free(c->ctx);
    c->ctx = NULL;
    wsm_conn_count(&c->host->st.wslay_contexts, -1);
}

wsm_nconn *wsm_conn_new(wsm_conn_host *e, uint64_t handle, int fd)
{
    size_t size = (sizeof(wsm_nconn) + 63) & ~(size_t)63;
    wsm_nconn *c = aligned_alloc(64, size);
    if (c == NULL)
        return NULL;
    memset(c, 0, size);
    c->host = e;
    c->oq = c->oq_inline;
    c->oq_cap = WSM_OQ_INLINE;
    c->handle = handle;
    c->fd = fd;
    c->timer_idx = WSM_TIMER_NONE;
    c->last_seen = e->now;
    c->scan.max_payload = e->o.max_message_size;
    return c; /* no wslay context until bytes arrive (wsm_conn_wake) */
}

void wsm_conn_set_deflate(wsm_nconn *c, unsigned bits)
{
    unsigned window = bits & 15u;
    c->z_bits = (uint8_t)(window < 8 ? 8 : window);
    c->z_takeover = (bits & WSM_Z_TAKEOVER) != 0;
    if (c->ctx != NULL) /* else set when it wakes */
        wslay_event_config_set_allowed_rsv_bits(c->ctx, WSLAY_RSV1_BIT);
}

void wsm_conn_free(wsm_nconn *c)
{
    wsm_conn_count(&c->host->st.queued_bytes, -(int64_t)c->oq_bytes);
    for (uint32_t i = 0; i < c->oq_len; i++)
        wsm_frame_decref(c->oq[(c->oq_head + i) & (c->oq_cap - 1)]);
    if (c->oq != c->oq_inline)
        free(c->oq);
    if (c->ctx) {
        wslay_event_context_free(c->ctx);
        wsm_conn_count(&c->host->st.wslay_contexts, -1);
    }
    wsm_conn_charge(c, -(int64_t)wsm_conn_inbound(c));
    if (c->rs_inf != NULL)
        wsm_z_give(&c->host->z, c->rs_inf);
    free(c->rs);
    free(c->held);
    free(c);
}

/* ---- inbound ----------------------------------------------------------------------------- */

/* The one place a connection leaves OPEN: our Close, wslay's, or the answer to the peer's. */
static void wsm_conn_enter_closing(wsm_nconn *c, int why, uint16_t code)
{
    c->phase = WSM_CONN_CLOSING;
    c->why = (uint8_t)why;
    c->our_code = code;
    c->close_deadline = c->host->now + c->host->o.close_timeout;
    c->host->closing(c->host->user, c->handle);
}

/* The peer's Close, validated by the scanner: answered as the RFC says, reading ends. */
static void wsm_conn_take_close(wsm_nconn *c)
{
    c->close_rcvd = 1;
    c->peer_code = c->verdict.code;
    c->peer_reason_len = c->verdict.reason_len;
    memcpy(c->peer_reason, c->verdict.reason, c->verdict.reason_len);
    if (!wslay_event_get_close_sent(c->ctx)) {
        /* 1005 means "no code": the answer then carries none either */
        uint16_t code = c->peer_code == 1005 ? 0 : c->peer_code;
        wslay_event_queue_close(c->ctx, code, c->peer_reason, c->peer_reason_len);
    }
    wslay_event_shutdown_read(c->ctx);
    c->wslay_out = 1;
    if (c->phase == WSM_CONN_OPEN)
        wsm_conn_enter_closing(c, WSM_R_NORMAL, c->peer_code);
}

/* Keeps the bytes wslay was not given (they were not scanned either). */
/* Keeps the bytes wslay was not given (they were not scanned either), in front of any still
 * held from before: the stream's order is kept. */
static int wsm_conn_hold(wsm_nconn *c, const uint8_t *p, size_t n)
{
    uint8_t *h = malloc(n + c->held_len);
    if (h == NULL)
        return -1;
    memcpy(h, p, n);
    if (c->held_len)
        memcpy(h + n, c->held, c->held_len);
    free(c->held);
    c->held = h;
    c->held_len += n;
    wsm_conn_charge(c, (int64_t)n);
    return 0;
}

int wsm_conn_feed(wsm_nconn *c, const uint8_t *p, size_t n)
{
    if (c->read_shut || (n == 0 && c->ctx == NULL)) /* a dozing context held nothing */
        return 0;
    if (wsm_conn_wake(c) < 0)
        return -1;
    c->rp = p;
    c->rfeed = n;
    c->rx_stop = 0;
    c->verdict.result = WSM_SCAN_PASS;
    /* Called even with nothing new: wslay may still hold bytes of its own from before a pause. */
    int r = wslay_event_recv(c->ctx);
    c->wslay_out = 1; /* a pong, or a Close after a protocol error */
    if (r != 0 && !wslay_event_want_write(c->ctx))
        return -1;
    size_t rest = c->rfeed;
    c->rfeed = 0;
    if (wsm_conn_pump(c) < 0)
        return -1;
    /* A Close wslay queued by itself is classified before ours could be. */
    wsm_conn_note_wslay_close(c);
    switch (c->verdict.result) {
    case WSM_SCAN_CLOSE:
        wsm_conn_take_close(c);
        break;
    case WSM_SCAN_FAIL:
        wsm_conn_fail(c, c->verdict.code);
        break;
    default: /* HOLD, or PASS with bytes left because reading paused */
        if (rest && wslay_event_get_read_enabled(c->ctx) && !c->fail_code &&
            wsm_conn_hold(c, c->rp, rest) < 0)
            wsm_conn_fail(c, 1011);
        break;
    }
    if (c->fail_code) {
        static const char *const why[] = {[0] = "", [1] = "protocol error", [2] = "invalid payload",
                                          [3] = "message too big", [4] = "out of memory"};
        int k = c->fail_code == 1002 ? 1 : c->fail_code == 1007 ? 2 : c->fail_code == 1009 ? 3 : 4;
        wsm_conn_close(c, c->fail_code, (const uint8_t *)why[k], strlen(why[k]),
                       c->fail_code == 1011 ? WSM_R_ABRUPT : WSM_R_PROTOCOL_ERROR);
        wslay_event_shutdown_read(c->ctx);
    }
    c->read_shut = !wslay_event_get_read_enabled(c->ctx);
    if (c->read_shut && c->held) {
        wsm_conn_charge(c, -(int64_t)c->held_len);
        free(c->held);
        c->held = NULL;
        c->held_len = 0;
    }
    if (wsm_conn_pump(c) < 0)
        return -1;
    if (!c->read_shut && !c->read_paused && c->host->rx_blocked && (c->held_len || rest))
        c->host->defer(c->host->user, c);
    wsm_conn_doze(c);
    return 0;
}

/* Moves held bytes, as many as fit, to the front of the host's read buffer; returns how many.
 * More than fits can be held only from a handshake leftover fed while reading was paused. */
static size_t wsm_conn_unhold(wsm_nconn *c)
{
    size_t n = c->held_len < c->host->rbuf_size ? c->held_len : c->host->rbuf_size;
    if (n == 0)
        return 0;
    memcpy(c->host->rbuf, c->held, n);
    wsm_conn_charge(c, -(int64_t)n);
    c->held_len -= n;
    if (c->held_len) {
        memmove(c->held, c->held + n, c->held_len);
    } else {
        free(c->held);
        c->held = NULL;
    }
    return n;
}

/* Feeds held bytes until they are gone, reading pauses, or a pass makes no progress (an
 * incomplete Close frame waits for the rest). Called once even with nothing held: wslay may
 * still have bytes of its own from before a pause. */
static int wsm_conn_feed_held(wsm_nconn *c)
{
    size_t before;
    do {
        before = c->held_len;
        if (wsm_conn_feed(c, c->host->rbuf, wsm_conn_unhold(c)) < 0)
            return -1;
    } while (c->held_len && c->held_len < before && !wsm_conn_rx_paused(c) && !c->read_shut);
    return 0;
}

int wsm_conn_read(wsm_nconn *c)
{
    wsm_conn_host *e = c->host;
    if (wsm_conn_rx_paused(c)) { /* a readiness reported before reading paused */
        if (e->rx_blocked && !c->read_paused)
            e->defer(e->user, c);
        return 0;
    }
    if (c->held_len > WSM_SCAN_CLOSE_MAX) /* a leftover still waits: it goes first */
        return wsm_conn_feed_held(c);
    size_t held = wsm_conn_unhold(c);
    /* Near the budget, read no more than it has room for: what cannot be parsed is held. */
    size_t room = e->o.read_limit > c->in_unacked ? e->o.read_limit - c->in_unacked : 0;
    size_t want = e->rbuf_size - held;
    if (room < WSM_WSLAY_IBUF)
        room = WSM_WSLAY_IBUF;
    if (want > room)
        want = room;
    if (want == 0) /* the buffer is all held bytes: parse them first */
        return wsm_conn_feed(c, e->rbuf, held);
    ssize_t n;
    do
        n = read(c->fd, e->rbuf + held, want);
    while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        if (held && wsm_conn_hold(c, e->rbuf, held) < 0)
            return -1;
        return 0;
    }
    if (n <= 0)
        return -1;
    wsm_conn_count(&e->st.bytes_in, n);
    c->last_seen = e->now;
    return wsm_conn_feed(c, e->rbuf, held + (size_t)n);
}

int wsm_conn_receive(wsm_nconn *c, const uint8_t *p, size_t n)
{
    wsm_conn_host *e = c->host;
    if (c->held_len > WSM_SCAN_CLOSE_MAX) /* a leftover goes first; the caller offers again */
        return wsm_conn_feed_held(c) < 0 ? -1 : 0;
    size_t held = wsm_conn_unhold(c);
    if (n > e->rbuf_size - held)
        n = e->rbuf_size - held; /* the caller offers the rest again */
    memcpy(e->rbuf + held, p, n);
    return wsm_conn_feed(c, e->rbuf, held + n) < 0 ? -1 : (int)n;
}

int wsm_conn_resume(wsm_nconn *c)
{
    if (c->read_paused)
        return 0;
    if (c->host->rx_blocked) { /* its held bytes wait with everybody else's */
        c->host->defer(c->host->user, c);
        return 0;
    }
    return wsm_conn_feed_held(c);
}

int wsm_conn_ack(wsm_nconn *c, size_t n)
{
    n = n < c->in_unacked ? n : c->in_unacked;
    c->in_unacked -= n;
    wsm_conn_charge(c, -(int64_t)n);
    if (c->read_paused && c->in_unacked <= c->host->o.read_limit / 2) {
        c->read_paused = 0;
        return wsm_conn_resume(c);
    }
    return 0;
}

int wsm_conn_tcp_alive(const wsm_nconn *c, int64_t window)
{
    struct tcp_info ti;
    socklen_t len = sizeof(ti);
    if (getsockopt(c->fd, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0)
        return 0;
    return ti.tcpi_unacked == 0 || (int64_t)ti.tcpi_last_ack_recv * 1000000 < window;
}

/* ---- outbound ---------------------------------------------------------------------------- */

static int wsm_conn_oq_grow(wsm_nconn *c)
{
    uint32_t cap = c->oq_cap * 2;
    wsm_frame **q = malloc(cap * sizeof(*q));
    if (q == NULL)
        return -1;
    for (uint32_t i = 0; i < c->oq_len; i++)
        q[i] = c->oq[(c->oq_head + i) & (c->oq_cap - 1)];
    if (c->oq != c->oq_inline)
        free(c->oq);
    c->oq = q;
    c->oq_cap = cap;
    c->oq_head = 0;
    return 0;
}

static void wsm_conn_check_high(wsm_nconn *c)
{
    wsm_conn_host *e = c->host;
    if (!c->write_paused && c->oq_bytes > e->o.high_water) {
        c->write_paused = 1;
        e->emit(e->user, WSM_EV_WRITE_PAUSED, c->handle, NULL, 0, 0, 0);
    }
    if (c->oq_bytes <= e->o.max_queue_bytes || c->phase != WSM_CONN_OPEN)
        return;
    int64_t since = e->now ? e->now : 1;
    /* Twice the limit is not worth waiting for: the timer closes it in this very iteration. */
    if (c->oq_bytes / 2 > e->o.max_queue_bytes)
        since = e->now - e->o.send_timeout;
    if (c->over_since == 0 || since < c->over_since) {
        c->over_since = since;
        e->arm(e->user, c, wsm_conn_deadline(c));
    }
}

int wsm_conn_append(wsm_nconn *c, wsm_frame *f, int is_data)
{
    /* phase leaves OPEN whenever wslay queues a Close: every call into wslay that can queue one
     * is followed by a pump and wsm_conn_note_wslay_close (or sets phase itself). */
    if (is_data && c->phase != WSM_CONN_OPEN)
        return 1;
    if (c->oq_len == c->oq_cap && wsm_conn_oq_grow(c) < 0)
        return -1;
    if (is_data && c->z_bits) {
        int made;
        f = wsm_z_encoding_for(&c->host->z, f, c->z_bits | (c->z_takeover ? WSM_Z_TAKEOVER : 0u),
                               &c->z_sync, c->host->o.compress_threshold, &made);
        if (made)
            wsm_counter_add(&c->host->st.deflated, 1);
    }
    wsm_frame_incref(f);
    c->oq[(c->oq_head + c->oq_len) & (c->oq_cap - 1)] = f;
    c->oq_len++;
    c->oq_bytes += f->len;
    wsm_conn_count(&c->host->st.queued_bytes, (int64_t)f->len);
    if (is_data)
        wsm_conn_count(&c->host->st.messages_out, 1);
    if (!c->in_dirty) /* a broadcast marks each receiver once: no call for the others */
        c->host->dirty(c->host->user, c);
    wsm_conn_check_high(c);
    return 0;
}

int wsm_conn_pump(wsm_nconn *c)
{
    /* A broadcast marks thousands of connections dirty; most have nothing in wslay, and
     * asking would cost a cache miss on each context. */
    if (!c->wslay_out || c->ctx == NULL)
        return 0;
    c->wslay_out = 0;
    if (!wslay_event_want_write(c->ctx))
        return 0;
    if (wslay_event_send(c->ctx) != 0)
        return -1;
    c->wslay_out = wslay_event_want_write(c->ctx) != 0;
    return 1;
}

/* Removes n written bytes from the head of the out-queue. */
static void wsm_conn_consume(wsm_nconn *c, size_t n)
{
    c->oq_bytes -= n;
    wsm_conn_count(&c->host->st.queued_bytes, -(int64_t)n);
    while (n) {
        wsm_frame *f = c->oq[c->oq_head];
        size_t left = f->len - c->oq_off;
        if (n < left) {
            c->oq_off += n;
            return;
        }
        n -= left;
        c->oq_off = 0;
        if (c->oq_pinned)
            c->oq_pinned--;
        wsm_frame_decref(f);
        c->oq_head = (c->oq_head + 1) & (c->oq_cap - 1);
        c->oq_len--;
    }
}

static void wsm_conn_check_low(wsm_nconn *c)
{
    wsm_conn_host *e = c->host;
    if (c->over_since && c->oq_bytes <= e->o.max_queue_bytes)
        c->over_since = 0;
    if (c->write_paused && c->oq_bytes <= e->o.high_water / 4) {
        c->write_paused = 0;
        e->emit(e->user, WSM_EV_WRITE_RESUMED, c->handle, NULL, 0, 0, 0);
    }
}

/* A peer that takes no byte for send_timeout while we have some to send is a slow consumer,
 * like a queue above max_queue_bytes for as long: both end with 1008. */
static void wsm_conn_note_blocked(wsm_nconn *c, int progressed)
{
    wsm_conn_host *e = c->host;
    if (!c->want_out) {
        if (c->blocked_since)
            c->blocked_since = 0;
    } else if (progressed || c->blocked_since == 0) {
        c->blocked_since = e->now ? e->now : 1;
        if (c->phase == WSM_CONN_OPEN && e->o.send_timeout > 0)
            e->arm(e->user, c, wsm_conn_deadline(c));
    }
}

int wsm_conn_flush(wsm_nconn *c)
{
    struct iovec iov[WSM_IOV_MAX];
    int progressed = 0;
    c->want_out = 0;
    while (c->oq_len) {
        int cnt = 0;
        size_t total = 0;
        for (uint32_t i = 0; i < c->oq_len && cnt < WSM_IOV_MAX; i++, cnt++) {
            wsm_frame *f = c->oq[(c->oq_head + i) & (c->oq_cap - 1)];
            size_t off = i == 0 ? c->oq_off : 0;
            iov[cnt].iov_base = f->data + off;
            iov[cnt].iov_len = f->len - off;
            total += f->len - off;
        }
        /* send/sendmsg rather than writev: the socket path skips the VFS layer */
        ssize_t n;
        if (cnt == 1) {
            n = send(c->fd, iov[0].iov_base, iov[0].iov_len, MSG_NOSIGNAL);
        } else {
            struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)cnt};
            n = sendmsg(c->fd, &mh, MSG_NOSIGNAL);
        }
        wsm_counter_add(&c->host->st.write_syscalls, 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            c->want_out = 1;
            break;
        }
        if (n < 0)
            return -1;
        wsm_conn_count(&c->host->st.bytes_out, n);
        wsm_conn_consume(c, (size_t)n);
        progressed |= n > 0;
        if ((size_t)n < total) {
            c->want_out = 1;
            break;
        }
    }
    wsm_conn_check_low(c);
    wsm_conn_note_blocked(c, progressed);
    return 0;
}

void wsm_conn_drop_queue(wsm_nconn *c)
{
    uint32_t keep = c->oq_off ? 1 : 0; /* a half-written frame must be finished */
    if (keep < c->oq_pinned)
        keep = c->oq_pinned; /* and the 101 must go out before any Close */
    while (c->oq_len > keep) {
        uint32_t i = (c->oq_head + c->oq_len - 1) & (c->oq_cap - 1);
        c->oq_bytes -= c->oq[i]->len;
        wsm_conn_count(&c->host->st.queued_bytes, -(int64_t)c->oq[i]->len);
        wsm_frame_decref(c->oq[i]);
        c->oq_len--;
    }
}

/* ---- closing ----------------------------------------------------------------------------- */

void wsm_conn_close(wsm_nconn *c, int code, const uint8_t *reason, size_t len, int why)
{
    if (c->phase != WSM_CONN_OPEN)
        return;
    if (len > 123)
        len = 123;
    wsm_conn_enter_closing(c, why, (uint16_t)code);
    /* wslay refuses to queue a Close after it has queued one itself: nothing more to do then.
     * Out of memory for a context, nothing is sent: the close deadline ends it. */
    if (wsm_conn_wake(c) == 0) {
        wslay_event_queue_close(c->ctx, (uint16_t)code, reason, len);
        c->wslay_out = 1;
        wsm_conn_pump(c);
    }
    c->host->arm(c->host->user, c, wsm_conn_deadline(c));
}

/* Encoded here, not by wslay: a dozing connection is pinged without a context. */
void wsm_conn_ping(wsm_nconn *c)
{
    wsm_frame *f = wsm_frame_encode(WSM_OP_PING, NULL, 0);
    if (f == NULL)
        return; /* out of memory: the next deadline tries again */
    if (wsm_conn_append(c, f, 0) == 0) {
        c->ping_sent = c->host->now;
        wsm_counter_add(&c->host->st.pings_sent, 1);
    }
    wsm_frame_decref(f);
}

void wsm_conn_note_wslay_close(wsm_nconn *c)
{
    if (c->phase != WSM_CONN_OPEN || c->ctx == NULL || !wslay_event_get_close_sent(c->ctx))
        return;
    wsm_conn_enter_closing(c, WSM_R_PROTOCOL_ERROR, wslay_event_get_status_code_sent(c->ctx));
}

int wsm_conn_finished(const wsm_nconn *c)
{
    if (c->phase != WSM_CONN_CLOSING || c->oq_len || c->ctx == NULL ||
        !wslay_event_get_close_sent(c->ctx))
        return 0;
    return c->close_rcvd || !wslay_event_get_read_enabled(c->ctx);
}

int64_t wsm_conn_deadline(const wsm_nconn *c)
{
    const wsm_conn_opts *o = &c->host->o;
    if (c->phase != WSM_CONN_OPEN)
        return c->close_deadline;
    int64_t d = INT64_MAX;
    if (o->ping_interval > 0) {
        if (c->ping_sent > c->last_seen)
            d = c->last_seen + o->ping_interval + o->ping_timeout;
        else
            d = c->last_seen + o->ping_interval;
    }
    if (c->over_since && c->over_since + o->send_timeout < d)
        d = c->over_since + o->send_timeout;
    if (c->blocked_since && o->send_timeout > 0 && c->blocked_since + o->send_timeout < d)
        d = c->blocked_since + o->send_timeout;
    return d;
}

#endif /* __linux__ */
