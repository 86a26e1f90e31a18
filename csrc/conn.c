/* One native connection: wslay context, inbound scanner, out-queue (see conn.h). */
/* Linux only (epoll, eventfd); elsewhere the module builds without the engine. */
#ifdef __linux__
#include "conn.h"

#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define WSM_IOV_MAX 64

_Static_assert(offsetof(wsm_nconn, read_shut) < 128, "a delivery's fields span two cache lines");

static void wsm_conn_count(_Atomic uint64_t *ctr, int64_t delta)
{
    wsm_counter_add(ctr, (uint64_t)delta); /* two's complement: a negative delta subtracts */
}

/* ---- wslay callbacks ------------------------------------------------------------------- */

static ssize_t wsm_conn_recv_cb(wslay_event_context_ptr ctx, uint8_t *buf, size_t len,
                                int flags, void *user)
{
    (void)flags;
    wsm_nconn *c = user;
    if (c->rfeed == 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    size_t k = len < c->rfeed ? len : c->rfeed;
    memcpy(buf, c->rp, k);
    c->rp += k;
    c->rfeed -= k;
    return (ssize_t)k;
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
            wsm_conn_count(&c->eng->st.queued_bytes, (int64_t)len);
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

static void wsm_conn_deliver(wsm_nconn *c, const struct wslay_event_on_msg_recv_arg *a)
{
    wsm_engine *e = c->eng;
    if (c->phase != WSM_CONN_OPEN) {
        /* Past our Close: the app no longer reads, so the message is dropped (as uvicorn). */
        wsm_conn_count(&e->st.frames_dropped, 1);
        return;
    }
    int kind = a->opcode == WSLAY_TEXT_FRAME ? WSM_EV_TEXT : WSM_EV_BINARY;
    if (wsm_engine_emit(e, kind, c->handle, a->msg, a->msg_length) < 0) {
        wslay_event_set_error(c->ctx, WSLAY_ERR_NOMEM);
        return;
    }
    wsm_conn_count(&e->st.messages_in, 1);
    c->in_unacked += a->msg_length;
    if (!c->read_paused && c->in_unacked > e->o.read_limit) {
        c->read_paused = 1;
        wsm_engine_emit(e, WSM_EV_READ_PAUSED, c->handle, NULL, 0);
    }
}

static void wsm_conn_on_msg(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *a,
                            void *user)
{
    (void)ctx;
    wsm_nconn *c = user;
    switch (a->opcode) {
    case WSLAY_TEXT_FRAME:
    case WSLAY_BINARY_FRAME:
        wsm_conn_deliver(c, a);
        break;
    case WSLAY_CONNECTION_CLOSE:
        c->close_rcvd = 1;
        c->peer_code = a->status_code ? a->status_code : 1005;
        if (a->msg_length > 2) {
            size_t n = a->msg_length - 2;
            c->peer_reason_len = (uint8_t)(n > sizeof(c->peer_reason) ? sizeof(c->peer_reason) : n);
            memcpy(c->peer_reason, a->msg + 2, c->peer_reason_len);
        }
        if (c->phase == WSM_CONN_OPEN) {
            c->phase = WSM_CONN_CLOSING;
            c->why = WSM_ER_NORMAL;
            c->our_code = c->peer_code;
            c->close_deadline = c->eng->now + c->eng->o.close_timeout;
            wsm_engine_mark_closing(c->eng, c->handle);
        }
        break;
    default: /* pongs and pings: any frame already refreshed last_seen */
        break;
    }
}

static const struct wslay_event_callbacks wsm_conn_callbacks = {
    .recv_callback = wsm_conn_recv_cb,
    .send_callback = wsm_conn_send_cb,
    .on_msg_recv_callback = wsm_conn_on_msg,
};

/* ---- life cycle ------------------------------------------------------------------------ */

wsm_nconn *wsm_conn_new(wsm_engine *e, uint64_t handle, int fd)
{
    size_t size = (sizeof(wsm_nconn) + 63) & ~(size_t)63;
    wsm_nconn *c = aligned_alloc(64, size);
    if (c == NULL)
        return NULL;
    memset(c, 0, size);
    c->eng = e;
    c->oq = c->oq_inline;
    c->oq_cap = WSM_OQ_INLINE;
    c->handle = handle;
    c->fd = fd;
    c->timer_idx = WSM_TIMER_NONE;
    c->last_seen = e->now;
    if (wslay_event_context_server_init(&c->ctx, &wsm_conn_callbacks, c) != 0) {
        free(c);
        return NULL;
    }
    wslay_event_config_set_max_recv_msg_length(c->ctx, e->o.max_message_size);
    return c;
}

void wsm_conn_free(wsm_nconn *c)
{
    wsm_conn_count(&c->eng->st.queued_bytes, -(int64_t)c->oq_bytes);
    for (uint32_t i = 0; i < c->oq_len; i++)
        wsm_frame_decref(c->oq[(c->oq_head + i) & (c->oq_cap - 1)]);
    if (c->oq != c->oq_inline)
        free(c->oq);
    if (c->ctx)
        wslay_event_context_free(c->ctx);
    free(c);
}

/* ---- inbound ----------------------------------------------------------------------------- */

int wsm_conn_utf8_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint8_t b = s[i];
        size_t k;
        uint32_t cp;
        if (b < 0x80) {
            i++;
            continue;
        } else if ((b & 0xe0) == 0xc0) {
            k = 1, cp = b & 0x1f;
        } else if ((b & 0xf0) == 0xe0) {
            k = 2, cp = b & 0x0f;
        } else if ((b & 0xf8) == 0xf0) {
            k = 3, cp = b & 0x07;
        } else {
            return 0;
        }
        if (i + k >= n)
            return 0;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xc0) != 0x80)
                return 0;
            cp = (cp << 6) | (s[i + j] & 0x3f);
        }
        static const uint32_t min[4] = {0, 0x80, 0x800, 0x10000};
        if (cp < min[k] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return 0;
        i += k + 1;
    }
    return 1;
}

/* A Close frame starting at p: 1 when it is complete and carries 1012-1014 with a valid reason
 * (we take it over), 0 when incomplete, -1 when wslay should judge it. */
static int wsm_conn_close_candidate(wsm_nconn *c, const uint8_t *p, size_t n, size_t *flen)
{
    if (n < 2)
        return 0;
    size_t plen = p[1] & 0x7f;
    if (!(p[0] & 0x80) || (p[0] & 0x70) || !(p[1] & 0x80) || plen < 2 || plen > 125)
        return -1;
    if (n < 6 + plen)
        return 0;
    uint8_t pl[125];
    for (size_t i = 0; i < plen; i++)
        pl[i] = p[6 + i] ^ p[2 + (i & 3)];
    unsigned code = ((unsigned)pl[0] << 8) | pl[1];
    if (code < 1012 || code > 1014 || !wsm_conn_utf8_valid(pl + 2, plen - 2))
        return -1;
    c->peer_code = (uint16_t)code;
    c->peer_reason_len = (uint8_t)(plen - 2);
    memcpy(c->peer_reason, pl + 2, plen - 2);
    *flen = 6 + plen;
    return 1;
}

/* Tracks one more header byte; at the end of a header, switches to skipping its payload. */
static void wsm_conn_scan_header_byte(wsm_nconn *c, uint8_t b)
{
    c->sc_hdr[c->sc_have++] = b;
    if (c->sc_have < 2)
        return;
    uint8_t l7 = c->sc_hdr[1] & 0x7f;
    size_t ext = l7 == 126 ? 2 : l7 == 127 ? 8 : 0;
    size_t need = 2 + ext + ((c->sc_hdr[1] & 0x80) ? 4 : 0);
    if (c->sc_have < need)
        return;
    uint64_t len = l7;
    if (ext) {
        len = 0;
        for (size_t i = 0; i < ext; i++)
            len = (len << 8) | c->sc_hdr[2 + i];
    }
    c->sc_have = 0;
    c->sc_left = len;
    c->sc_inpayload = len > 0;
}

/* How many of the n bytes wslay may see now: all of them, except from the start of a Close
 * frame that is incomplete (held for later) or that we divert (1012-1014). */
static size_t wsm_conn_scan(wsm_nconn *c, const uint8_t *p, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if (c->sc_inpayload) {
            size_t k = (uint64_t)(n - i) < c->sc_left ? n - i : (size_t)c->sc_left;
            i += k;
            c->sc_left -= k;
            c->sc_inpayload = c->sc_left > 0;
            continue;
        }
        if (c->sc_have == 0 && (p[i] & 0x08)) {
            /* wslay 1.1.1 answers these with a Close frame without a code: we say 1002. */
            if (n - i < 2)
                return i;
            uint8_t l7 = p[i + 1] & 0x7f;
            if (!(p[i] & 0x80) || l7 > 125 || ((p[i] & 0x0f) == WSM_OP_CLOSE && l7 == 1)) {
                c->diverted = 3;
                return i;
            }
        }
        if (c->sc_have == 0 && (p[i] & 0x0f) == WSM_OP_CLOSE) {
            size_t flen = 0;
            int r = wsm_conn_close_candidate(c, p + i, n - i, &flen);
            if (r == 0)
                return i;
            if (r == 1) {
                c->diverted = 1;
                return i;
            }
        }
        wsm_conn_scan_header_byte(c, p[i++]);
    }
    return n;
}

/* The peer closed with 1012-1014: answer as wslay would for any valid code. */
static void wsm_conn_take_close(wsm_nconn *c)
{
    c->diverted = 2;
    c->close_rcvd = 1;
    if (!wslay_event_get_close_sent(c->ctx))
        wslay_event_queue_close(c->ctx, c->peer_code, c->peer_reason, c->peer_reason_len);
    wslay_event_shutdown_read(c->ctx);
    if (c->phase == WSM_CONN_OPEN) {
        c->phase = WSM_CONN_CLOSING;
        c->why = WSM_ER_NORMAL;
        c->our_code = c->peer_code;
        c->close_deadline = c->eng->now + c->eng->o.close_timeout;
        wsm_engine_mark_closing(c->eng, c->handle);
    }
}

int wsm_conn_feed(wsm_nconn *c, const uint8_t *p, size_t n)
{
    if (!wslay_event_get_read_enabled(c->ctx) || c->diverted)
        return 0;
    size_t ok = wsm_conn_scan(c, p, n);
    c->rp = p;
    c->rfeed = ok;
    if (ok) {
        int r = wslay_event_recv(c->ctx);
        c->rfeed = 0;
        c->wslay_out = 1; /* a pong, or a Close after a protocol error */
        if (r != 0 && !wslay_event_want_write(c->ctx))
            return -1;
    }
    if (c->diverted == 1) {
        c->wslay_out = 1;
        wsm_conn_take_close(c);
    } else if (c->diverted == 3) {
        wsm_conn_close(c, 1002, NULL, 0, WSM_ER_PROTOCOL_ERROR);
        wslay_event_shutdown_read(c->ctx);
    }
    else if (ok < n && wslay_event_get_read_enabled(c->ctx)) {
        c->held_len = (uint16_t)(n - ok); /* < WSM_HELD_MAX: an incomplete Close frame */
        memcpy(c->held, p + ok, n - ok);
    }
    c->read_shut = !wslay_event_get_read_enabled(c->ctx);
    if (wsm_conn_pump(c) < 0)
        return -1;
    /* Classified now, before a command of this same iteration could start another close. */
    wsm_conn_note_wslay_close(c);
    return 0;
}

int wsm_conn_read(wsm_nconn *c)
{
    wsm_engine *e = c->eng;
    size_t held = c->held_len;
    memcpy(e->rbuf, c->held, held);
    c->held_len = 0;
    ssize_t n;
    do
        n = read(c->fd, e->rbuf + held, e->rbuf_size - held);
    while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        c->held_len = (uint16_t)held;
        memcpy(c->held, e->rbuf, held);
        return 0;
    }
    if (n <= 0)
        return -1;
    wsm_conn_count(&e->st.bytes_in, n);
    c->last_seen = e->now;
    return wsm_conn_feed(c, e->rbuf, held + (size_t)n);
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
    wsm_engine *e = c->eng;
    if (!c->write_paused && c->oq_bytes > e->o.high_water) {
        c->write_paused = 1;
        wsm_engine_emit(e, WSM_EV_WRITE_PAUSED, c->handle, NULL, 0);
    }
    if (c->oq_bytes <= e->o.max_queue_bytes || c->phase != WSM_CONN_OPEN)
        return;
    int64_t since = e->now ? e->now : 1;
    /* Twice the limit is not worth waiting for: the timer closes it in this very iteration. */
    if (c->oq_bytes / 2 > e->o.max_queue_bytes)
        since = e->now - e->o.send_timeout;
    if (c->over_since == 0 || since < c->over_since) {
        c->over_since = since;
        wsm_timer_set(&e->timers, c, &c->timer_idx, wsm_conn_deadline(c));
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
    wsm_frame_incref(f);
    c->oq[(c->oq_head + c->oq_len) & (c->oq_cap - 1)] = f;
    c->oq_len++;
    c->oq_bytes += f->len;
    wsm_conn_count(&c->eng->st.queued_bytes, (int64_t)f->len);
    if (is_data)
        wsm_conn_count(&c->eng->st.messages_out, 1);
    wsm_engine_mark_dirty(c->eng, c);
    wsm_conn_check_high(c);
    return 0;
}

int wsm_conn_pump(wsm_nconn *c)
{
    /* A broadcast marks thousands of connections dirty; most have nothing in wslay, and
     * asking would cost a cache miss on each context. */
    if (!c->wslay_out)
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
    wsm_conn_count(&c->eng->st.queued_bytes, -(int64_t)n);
    while (n) {
        wsm_frame *f = c->oq[c->oq_head];
        size_t left = f->len - c->oq_off;
        if (n < left) {
            c->oq_off += n;
            return;
        }
        n -= left;
        c->oq_off = 0;
        wsm_frame_decref(f);
        c->oq_head = (c->oq_head + 1) & (c->oq_cap - 1);
        c->oq_len--;
    }
}

static void wsm_conn_check_low(wsm_nconn *c)
{
    wsm_engine *e = c->eng;
    if (c->over_since && c->oq_bytes <= e->o.max_queue_bytes)
        c->over_since = 0;
    if (c->write_paused && c->oq_bytes <= e->o.high_water / 4) {
        c->write_paused = 0;
        wsm_engine_emit(e, WSM_EV_WRITE_RESUMED, c->handle, NULL, 0);
    }
}

/* A peer that takes no byte for send_timeout while we have some to send is a slow consumer,
 * like a queue above max_queue_bytes for as long: both end with 1008. */
static void wsm_conn_note_blocked(wsm_nconn *c, int progressed)
{
    wsm_engine *e = c->eng;
    if (!c->want_out) {
        if (c->blocked_since)
            c->blocked_since = 0;
    } else if (progressed || c->blocked_since == 0) {
        c->blocked_since = e->now ? e->now : 1;
        if (c->phase == WSM_CONN_OPEN && e->o.send_timeout > 0)
            wsm_timer_set(&e->timers, c, &c->timer_idx, wsm_conn_deadline(c));
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
        wsm_counter_add(&c->eng->st.write_syscalls, 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            c->want_out = 1;
            break;
        }
        if (n < 0)
            return -1;
        wsm_conn_count(&c->eng->st.bytes_out, n);
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
    while (c->oq_len > keep) {
        uint32_t i = (c->oq_head + c->oq_len - 1) & (c->oq_cap - 1);
        c->oq_bytes -= c->oq[i]->len;
        wsm_conn_count(&c->eng->st.queued_bytes, -(int64_t)c->oq[i]->len);
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
    c->phase = WSM_CONN_CLOSING;
    c->why = (uint8_t)why;
    c->our_code = (uint16_t)code;
    c->close_deadline = c->eng->now + c->eng->o.close_timeout;
    wsm_engine_mark_closing(c->eng, c->handle);
    /* wslay refuses to queue a Close after it has queued one itself: nothing more to do then. */
    wslay_event_queue_close(c->ctx, (uint16_t)code, reason, len);
    c->wslay_out = 1;
    wsm_conn_pump(c);
    wsm_timer_set(&c->eng->timers, c, &c->timer_idx, wsm_conn_deadline(c));
}

void wsm_conn_ping(wsm_nconn *c)
{
    if (wslay_event_queue_msg(c->ctx, &(struct wslay_event_msg){WSM_OP_PING, NULL, 0}) == 0) {
        c->ping_sent = c->eng->now;
        wsm_counter_add(&c->eng->st.pings_sent, 1);
        c->wslay_out = 1;
        wsm_conn_pump(c);
    }
}

void wsm_conn_note_wslay_close(wsm_nconn *c)
{
    if (c->phase != WSM_CONN_OPEN || !wslay_event_get_close_sent(c->ctx))
        return;
    c->phase = WSM_CONN_CLOSING;
    c->why = WSM_ER_PROTOCOL_ERROR;
    c->our_code = wslay_event_get_status_code_sent(c->ctx);
    c->close_deadline = c->eng->now + c->eng->o.close_timeout;
    wsm_engine_mark_closing(c->eng, c->handle);
}

int wsm_conn_finished(const wsm_nconn *c)
{
    if (c->phase != WSM_CONN_CLOSING || c->oq_len || !wslay_event_get_close_sent(c->ctx))
        return 0;
    return c->close_rcvd || !wslay_event_get_read_enabled(c->ctx);
}

int64_t wsm_conn_deadline(const wsm_nconn *c)
{
    const wsm_engine_opts *o = &c->eng->o;
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
