/* The native plane's I/O thread: epoll loop, command and event queues, timers (engine.h). */
/* Linux only (epoll, eventfd); elsewhere the module builds without the engine. */
#ifdef __linux__
#include "engine.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "conn.h"

#define WSM_EPOLL_BATCH 256
#define WSM_RBUF_SIZE (256 * 1024)
#define WSM_LINGER_MAX 2000000000LL /* ns: bound on draining a closed peer */

/* ---- shared state (any thread, under lock) ----------------------------------------------- */

static int wsm_engine_grow(void **arr, size_t *cap, size_t need, size_t item)
{
    if (need <= *cap)
        return 0;
    size_t n = *cap ? *cap * 2 : 64;
    while (n < need)
        n *= 2;
    void *p = realloc(*arr, n * item);
    if (p == NULL)
        return -1;
    *arr = p;
    *cap = n;
    return 0;
}

void wsm_engine_wake(wsm_engine *e)
{
    uint64_t one = 1;
    ssize_t r;
    do
        r = write(e->cmd_efd, &one, sizeof(one));
    while (r < 0 && errno == EINTR);
    /* EAGAIN means the counter is already non-zero: the thread will wake anyway. */
}

int wsm_engine_push_locked(wsm_engine *e, const wsm_cmd *c)
{
    if (e->stop_requested)
        return -1;
    if (wsm_engine_grow((void **)&e->cmds, &e->capcmds, e->ncmds + 1, sizeof(wsm_cmd)) < 0)
        return -1;
    e->cmds[e->ncmds++] = *c;
    /* Only the first command of a batch writes the eventfd: one syscall per wake-up. */
    return e->ncmds == 1;
}

void wsm_engine_cmd_release(wsm_cmd *c)
{
    if (c->kind == WSM_CMD_REGISTER && c->fd >= 0)
        close(c->fd);
    wsm_frame_decref(c->frame);
    free(c->handles);
    free(c->data);
    c->frame = NULL;
    c->handles = NULL;
    c->data = NULL;
}

int wsm_engine_slot_live(const wsm_engine *e, uint64_t h)
{
    uint32_t slot = (uint32_t)h;
    return slot < e->nslots && e->slots[slot].gen == (uint32_t)(h >> 32) &&
           e->slots[slot].state == WSM_SLOT_LIVE;
}

static uint64_t wsm_engine_slot_alloc(wsm_engine *e)
{
    uint32_t slot;
    if (e->free_head != UINT32_MAX) {
        slot = e->free_head;
        e->free_head = e->slots[slot].next_free;
    } else {
        size_t cap = e->capslots;
        if (e->nslots == UINT32_MAX - 1 ||
            wsm_engine_grow((void **)&e->slots, &cap, (size_t)e->nslots + 1, sizeof(wsm_slot)) < 0)
            return 0;
        e->capslots = (uint32_t)cap;
        slot = e->nslots++;
        e->slots[slot].gen = 0;
    }
    if (++e->slots[slot].gen == 0) /* handle 0 means "none" */
        e->slots[slot].gen = 1;
    e->slots[slot].state = WSM_SLOT_LIVE;
    return ((uint64_t)e->slots[slot].gen << 32) | slot;
}

static void wsm_engine_slot_release(wsm_engine *e, uint64_t h)
{
    uint32_t slot = (uint32_t)h;
    pthread_mutex_lock(&e->lock);
    e->slots[slot].state = WSM_SLOT_FREE;
    e->slots[slot].next_free = e->free_head;
    e->free_head = slot;
    pthread_mutex_unlock(&e->lock);
}

static void wsm_engine_mark_closing(wsm_engine *e, uint64_t h)
{
    pthread_mutex_lock(&e->lock);
    if (wsm_engine_slot_live(e, h))
        e->slots[(uint32_t)h].state = WSM_SLOT_CLOSING;
    pthread_mutex_unlock(&e->lock);
}

/* ---- loop-thread API --------------------------------------------------------------------- */

/* Under the lock, decides whether a command goes in (and updates the shared state it
 * touches): a result >= 0 queues it, -1 refuses it. */
typedef long (*wsm_admit_fn)(wsm_engine *e, wsm_cmd *cmd);

/* The one way in for a command from any thread: admit under the lock, queue, wake the I/O
 * thread if this is the first command of its batch. A command that does not go in (refused,
 * engine stopping, out of memory) is released here: its fd, frame, data and handles. Returns
 * admit's result, or -1. */
static long wsm_engine_submit(wsm_engine *e, wsm_cmd *cmd, wsm_admit_fn admit)
{
    pthread_mutex_lock(&e->lock);
    long r = e->stop_requested ? -1 : admit ? admit(e, cmd) : 0;
    int wake = r >= 0 ? wsm_engine_push_locked(e, cmd) : -1;
    if (wake < 0 && r >= 0 && cmd->kind == WSM_CMD_REGISTER) {
        uint32_t slot = (uint32_t)cmd->handle; /* admitted, then no room: the slot goes back */
        e->slots[slot].state = WSM_SLOT_FREE;
        e->slots[slot].next_free = e->free_head;
        e->free_head = slot;
    }
    pthread_mutex_unlock(&e->lock);
    if (wake < 0) {
        wsm_engine_cmd_release(cmd);
        return -1;
    }
    if (wake)
        wsm_engine_wake(e);
    return r;
}

static long wsm_admit_register(wsm_engine *e, wsm_cmd *cmd)
{
    cmd->handle = wsm_engine_slot_alloc(e);
    return cmd->handle ? 0 : -1;
}

static long wsm_admit_live(wsm_engine *e, wsm_cmd *cmd)
{
    return wsm_engine_slot_live(e, cmd->handle) ? 1 : -1;
}

static long wsm_admit_close(wsm_engine *e, wsm_cmd *cmd)
{
    if (!wsm_engine_slot_live(e, cmd->handle))
        return -1;
    /* Sends after this point are refused at once, not discovered by the I/O thread. */
    e->slots[(uint32_t)cmd->handle].state = WSM_SLOT_CLOSING;
    return 1;
}

/* Counting under the lock answers "queued for how many" without a round trip to the I/O
 * thread; a receiver that dies before delivery is reported by its disconnect event. */
static long wsm_admit_fanout(wsm_engine *e, wsm_cmd *cmd)
{
    long live = 0;
    for (size_t i = 0; i < cmd->n; i++)
        live += wsm_engine_slot_live(e, cmd->handles[i]);
    return live;
}

uint64_t wsm_engine_register(wsm_engine *e, int fd, wsm_frame *out, uint8_t *in, size_t inlen,
                             unsigned z_bits)
{
    wsm_cmd cmd = {.kind = WSM_CMD_REGISTER, .fd = fd, .frame = out, .data = in, .len = inlen,
                   .z_bits = (uint8_t)z_bits};
    return wsm_engine_submit(e, &cmd, wsm_admit_register) < 0 ? 0 : cmd.handle;
}

int wsm_engine_send(wsm_engine *e, uint64_t h, wsm_frame *f)
{
    wsm_cmd cmd = {.kind = WSM_CMD_SEND, .handle = h, .frame = f};
    return wsm_engine_submit(e, &cmd, wsm_admit_live) > 0;
}

long wsm_engine_fanout(wsm_engine *e, const uint64_t *handles, size_t n, wsm_frame *f)
{
    if (n == 0) {
        wsm_frame_decref(f);
        return 0;
    }
    wsm_cmd cmd = {.kind = WSM_CMD_FANOUT, .frame = f, .n = n};
    cmd.handles = malloc(n * sizeof(*cmd.handles));
    if (cmd.handles == NULL) {
        wsm_frame_decref(f);
        return -1;
    }
    memcpy(cmd.handles, handles, n * sizeof(*cmd.handles));
    long live = wsm_engine_submit(e, &cmd, wsm_admit_fanout);
    return live < 0 ? 0 : live;
}

int wsm_engine_close(wsm_engine *e, uint64_t h, int code, const char *reason, size_t len, int why)
{
    wsm_cmd cmd = {.kind = WSM_CMD_CLOSE, .handle = h, .code = (uint16_t)code, .why = (uint8_t)why};
    if (len > 123)
        len = 123;
    if (len && (cmd.data = malloc(len)) != NULL) {
        memcpy(cmd.data, reason, len);
        cmd.len = len;
    }
    return wsm_engine_submit(e, &cmd, wsm_admit_close) > 0;
}

void wsm_engine_ack(wsm_engine *e, uint64_t h, size_t nbytes)
{
    wsm_cmd cmd = {.kind = WSM_CMD_ACK, .handle = h, .n = nbytes};
    wsm_engine_submit(e, &cmd, NULL);
}

size_t wsm_engine_take_events(wsm_engine *e, wsm_event **out)
{
    uint64_t v;
    ssize_t r = read(e->evt_efd, &v, sizeof(v));
    (void)r; /* EAGAIN: nothing was announced, the queue may still hold a batch */
    pthread_mutex_lock(&e->lock);
    size_t n = e->nevs;
    *out = e->evs;
    e->evs = NULL;
    e->nevs = e->capevs = 0;
    pthread_mutex_unlock(&e->lock);
    size_t charged = 0;
    for (size_t i = 0; i < n; i++)
        charged += wsm_event_charge(&(*out)[i]);
    uint64_t left = atomic_fetch_sub_explicit(&e->host.st.event_queue_bytes, charged,
                                              memory_order_relaxed) - charged;
    /* The I/O thread stopped reading for us: tell it the queue has room again. */
    if (left <= e->evq_limit / 2 && atomic_exchange(&e->evq_wake, 0))
        wsm_engine_wake(e);
    return n;
}

size_t wsm_event_charge(const wsm_event *ev)
{
    return ev->kind == WSM_EV_TEXT || ev->kind == WSM_EV_BINARY ? wsm_msg_charge(ev->len)
                                                                 : WSM_MSG_CHARGE + ev->len;
}

void wsm_engine_event_free(wsm_event *ev, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(ev[i].data);
    free(ev);
}

/* ---- I/O thread: events out -------------------------------------------------------------- */

/* Takes data (malloc'ed, may be NULL) even on failure. */
static int wsm_engine_emit(wsm_engine *e, int kind, uint64_t h, uint8_t *data, size_t len, int why,
                           int code)
{
    if (wsm_engine_grow((void **)&e->lev, &e->caplev, e->nlev + 1, sizeof(wsm_event)) < 0) {
        free(data);
        return -1;
    }
    wsm_event ev = {.kind = (uint8_t)kind, .why = (uint8_t)why, .code = (uint16_t)code,
                    .handle = h, .data = data, .len = len};
    e->lev[e->nlev++] = ev;
    /* The I/O thread adds, the loop thread subtracts: a locked add, unlike the other counters. */
    uint64_t q = atomic_fetch_add_explicit(&e->host.st.event_queue_bytes, wsm_event_charge(&ev),
                                           memory_order_relaxed) + wsm_event_charge(&ev);
    if (!e->host.rx_blocked && q > e->evq_limit) {
        e->host.rx_blocked = 1; /* every recv callback now says "would block" */
        atomic_store(&e->evq_wake, 1);
        wsm_counter_add(&e->host.st.event_queue_pauses, 1);
    }
    return 0;
}

static int wsm_engine_emit_copy(wsm_engine *e, int kind, uint64_t h, const uint8_t *data,
                                size_t len, int why, int code)
{
    uint8_t *copy = NULL;
    if (len && (copy = malloc(len)) == NULL)
        return -1;
    if (len)
        memcpy(copy, data, len);
    return wsm_engine_emit(e, kind, h, copy, len, why, code);
}

static void wsm_engine_mark_dirty(wsm_engine *e, wsm_nconn *c);

static void wsm_engine_defer(wsm_engine *e, wsm_nconn *c)
{
    if (c->deferred)
        return;
    c->deferred = 1;
    c->deferred_next = e->deferred;
    e->deferred = c;
    wsm_engine_mark_dirty(e, c); /* the flush pass drops EPOLLIN */
}

static void wsm_engine_undefer(wsm_engine *e, wsm_nconn *c)
{
    if (!c->deferred)
        return;
    for (wsm_nconn **p = &e->deferred; *p != NULL; p = &(*p)->deferred_next) {
        if (*p == c) {
            *p = c->deferred_next;
            break;
        }
    }
    c->deferred = 0;
}

static void wsm_engine_lost(wsm_engine *e, wsm_nconn *c);

/* The loop drained the event queue below half its limit: everyone is read again. */
static void wsm_engine_evq_resume(wsm_engine *e)
{
    if (!e->host.rx_blocked ||
        atomic_load_explicit(&e->host.st.event_queue_bytes, memory_order_relaxed) > e->evq_limit / 2)
        return;
    e->host.rx_blocked = 0;
    atomic_store(&e->evq_wake, 0);
    wsm_nconn *c;
    while ((c = e->deferred) != NULL && !e->host.rx_blocked) {
        e->deferred = c->deferred_next;
        c->deferred = 0;
        if (c->phase == WSM_CONN_DEAD || c->phase == WSM_CONN_LINGER)
            continue;
        if (wsm_conn_resume(c) < 0)
            wsm_engine_lost(e, c);
        else
            wsm_engine_mark_dirty(e, c); /* the flush pass restores EPOLLIN */
    }
}

static void wsm_engine_publish(wsm_engine *e)
{
    if (e->nlev == 0)
        return;
    int announce = 0;
    pthread_mutex_lock(&e->lock);
    if (e->nevs == 0) {
        wsm_event *t = e->evs;
        size_t cap = e->capevs;
        e->evs = e->lev;
        e->capevs = e->caplev;
        e->nevs = e->nlev;
        e->lev = t;
        e->caplev = cap;
        e->nlev = 0;
        announce = 1;
    } else if (wsm_engine_grow((void **)&e->evs, &e->capevs, e->nevs + e->nlev, sizeof(wsm_event)) == 0) {
        memcpy(e->evs + e->nevs, e->lev, e->nlev * sizeof(wsm_event));
        e->nevs += e->nlev;
        e->nlev = 0;
    } /* else: kept in lev, retried next iteration */
    pthread_mutex_unlock(&e->lock);
    if (announce) {
        uint64_t one = 1;
        ssize_t r = write(e->evt_efd, &one, sizeof(one));
        (void)r;
    }
}

/* ---- I/O thread: connection bookkeeping -------------------------------------------------- */

wsm_nconn *wsm_engine_lookup(wsm_engine *e, uint64_t h)
{
    uint32_t slot = (uint32_t)h;
    if (slot >= e->capconns || e->conns[slot] == NULL || e->conns[slot]->handle != h)
        return NULL;
    return e->conns[slot];
}

static void wsm_engine_mark_dirty(wsm_engine *e, wsm_nconn *c)
{
    if (c->in_dirty)
        return;
    c->in_dirty = 1;
    c->dirty_next = e->dirty;
    e->dirty = c;
}

/* epoll reports a hang-up or an error whatever the interest, at every epoll_wait: a
 * connection that neither reads (paused for the app or the event queue, or reading shut) nor
 * writes is therefore not in the epoll set at all ("parked") until it reads or writes again;
 * the bytes a peer sent before hanging up wait in the socket meanwhile. */
static void wsm_engine_park(wsm_engine *e, wsm_nconn *c)
{
    if (!c->parked && epoll_ctl(e->epfd, EPOLL_CTL_DEL, c->fd, NULL) == 0) {
        c->parked = 1;
        c->ev_mask = 0;
    }
}

static void wsm_engine_interest(wsm_engine *e, wsm_nconn *c, uint32_t mask)
{
    if (mask == 0) {
        wsm_engine_park(e, c);
        return;
    }
    if (mask == c->ev_mask && !c->parked)
        return;
    struct epoll_event ev = {.events = mask, .data.ptr = c};
    if (epoll_ctl(e->epfd, c->parked ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, c->fd, &ev) == 0) {
        c->ev_mask = mask;
        c->parked = 0;
    }
}

static void wsm_engine_update_interest(wsm_engine *e, wsm_nconn *c)
{
    uint32_t mask = 0;
    if (!c->read_paused && !c->read_shut && !c->deferred)
        mask |= EPOLLIN;
    if (c->want_out)
        mask |= EPOLLOUT;
    wsm_engine_interest(e, c, mask);
}

/* The end: the fd leaves epoll and is closed, the slot is released after the disconnect
 * event. */
static void wsm_engine_destroy(wsm_engine *e, wsm_nconn *c)
{
    epoll_ctl(e->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    shutdown(c->fd, SHUT_RDWR);
    close(c->fd);
    c->fd = -1;
    wsm_timer_remove(&e->timers, &c->timer_idx);
    wsm_engine_undefer(e, c);
    e->conns[(uint32_t)c->handle] = NULL;
    wsm_engine_slot_release(e, c->handle);
    c->phase = WSM_CONN_DEAD;
    c->dead_next = e->dead;
    e->dead = c;
}

static void wsm_engine_schedule(wsm_engine *e, wsm_nconn *c, int64_t when);

/* Reports the connection gone. With linger, the write side is shut (FIN after our Close frame)
 * and the read side drained until EOF, so unread input does not turn our FIN into a RST that
 * could destroy the Close frame in flight. */
static void wsm_engine_finish(wsm_engine *e, wsm_nconn *c, int why, int code, int linger)
{
    const uint8_t *reason = c->close_rcvd ? c->peer_reason : NULL;
    size_t rlen = c->close_rcvd ? c->peer_reason_len : 0;
    wsm_engine_emit_copy(e, WSM_EV_DISCONNECT, c->handle, reason, rlen, why, code);
    wsm_engine_mark_closing(e, c->handle);
    wsm_counter_add(&e->host.st.connections, (uint64_t)-1);
    wsm_counter_add(&e->host.st.disconnects[why], 1);
    if (!linger || shutdown(c->fd, SHUT_WR) < 0) {
        wsm_engine_destroy(e, c);
        return;
    }
    c->phase = WSM_CONN_LINGER;
    wsm_engine_interest(e, c, EPOLLIN);
    int64_t t = e->host.o.close_timeout < WSM_LINGER_MAX ? e->host.o.close_timeout : WSM_LINGER_MAX;
    wsm_engine_schedule(e, c, e->host.now + t);
}

/* The socket failed or hit EOF: a close handshake in progress keeps its reason. */
static void wsm_engine_lost(wsm_engine *e, wsm_nconn *c)
{
    if (c->phase == WSM_CONN_CLOSING)
        wsm_engine_finish(e, c, c->why, c->our_code, 0);
    else
        wsm_engine_finish(e, c, WSM_R_ABRUPT, 1006, 0);
}

static void wsm_engine_schedule(wsm_engine *e, wsm_nconn *c, int64_t when)
{
    if (when == INT64_MAX) {
        wsm_timer_remove(&e->timers, &c->timer_idx);
        return;
    }
    if (wsm_timer_set(&e->timers, c, &c->timer_idx, when) == 0)
        return;
    /* Out of memory: a connection without its timer could live forever, so it ends now. */
    if (c->phase == WSM_CONN_LINGER)
        wsm_engine_destroy(e, c);
    else
        wsm_engine_finish(e, c, WSM_R_ABRUPT, 1011, 0);
}

static void wsm_engine_linger_read(wsm_engine *e, wsm_nconn *c)
{
    ssize_t n;
    do
        n = read(c->fd, e->host.rbuf, e->host.rbuf_size);
    while (n < 0 && errno == EINTR);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK))
        wsm_engine_destroy(e, c);
}

static void wsm_engine_on_io(wsm_engine *e, wsm_nconn *c, uint32_t events)
{
    if (c->phase == WSM_CONN_DEAD)
        return;
    if (c->phase == WSM_CONN_LINGER) {
        wsm_engine_linger_read(e, c);
        return;
    }
    if ((events & (EPOLLERR | EPOLLHUP)) && !(c->ev_mask & EPOLLIN)) {
        if (!(c->ev_mask & EPOLLOUT)) {
            wsm_engine_park(e, c);
            return;
        }
        /* it wants to write: the flush pass finds out whether the peer is gone */
    } else if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
        if (wsm_conn_read(c) < 0) {
            wsm_engine_lost(e, c);
            return;
        }
        /* the read itself found reading paused (or just paused it): the same hang-up would
         * come back at once */
        if ((events & (EPOLLERR | EPOLLHUP)) && !c->want_out &&
            (c->read_paused || c->deferred || c->read_shut))
            wsm_engine_park(e, c);
    }
    /* Even with nothing to write, the flush pass checks whether the handshake has ended. */
    wsm_engine_mark_dirty(e, c);
}

static void wsm_engine_flush_dirty(wsm_engine *e)
{
    wsm_nconn *c;
    while ((c = e->dirty) != NULL) {
        e->dirty = c->dirty_next;
        /* The list runs through thousands of structs after a broadcast: fetch the next one's
         * two hot lines while this one's send is in the kernel, instead of missing on each. */
        if (c->dirty_next != NULL) {
            __builtin_prefetch(c->dirty_next, 1);
            __builtin_prefetch((const char *)c->dirty_next + 64, 1);
        }
        c->in_dirty = 0;
        if (c->phase == WSM_CONN_DEAD || c->phase == WSM_CONN_LINGER)
            continue;
        int pumped = wsm_conn_pump(c);
        if (pumped < 0 || wsm_conn_flush(c) < 0) {
            wsm_engine_lost(e, c);
            continue;
        }
        if (pumped)
            wsm_conn_note_wslay_close(c);
        if (wsm_conn_finished(c)) {
            wsm_engine_finish(e, c, c->why, c->our_code, 1);
            continue;
        }
        wsm_engine_update_interest(e, c);
        if (c->phase == WSM_CONN_CLOSING && c->timer_idx == WSM_TIMER_NONE)
            wsm_engine_schedule(e, c, c->close_deadline);
    }
}

static void wsm_engine_reap(wsm_engine *e)
{
    wsm_nconn *c;
    while ((c = e->dead) != NULL) {
        e->dead = c->dead_next;
        wsm_conn_free(c);
    }
}

/* ---- I/O thread: timers ------------------------------------------------------------------ */

static void wsm_engine_keepalive(wsm_engine *e, wsm_nconn *c)
{
    const wsm_conn_opts *o = &e->host.o;
    int64_t silent = e->host.now - c->last_seen;
    /* While reading is paused (the app is behind, or the event queue is full) the peer's pong
     * waits unread in the socket: the peer's kernel acknowledging the ping we sent since it was
     * last seen (or anything within ping_timeout) is then the sign of life. */
    if ((c->read_paused || c->deferred) && c->ping_sent > c->last_seen && o->ping_interval > 0 &&
        silent >= o->ping_interval + o->ping_timeout &&
        wsm_conn_tcp_alive(c, o->ping_timeout > 0 ? o->ping_timeout : o->ping_interval)) {
        c->last_seen = e->host.now;
        silent = 0;
    }
    int stalled = c->blocked_since && o->send_timeout > 0 &&
                  e->host.now >= c->blocked_since + o->send_timeout;
    if (stalled || (c->over_since && e->host.now >= c->over_since + o->send_timeout)) {
        wsm_conn_drop_queue(c);
        wsm_conn_close(c, 1008, (const uint8_t *)"slow consumer", 13, WSM_R_SLOW_CONSUMER);
        wsm_engine_mark_dirty(e, c);
    } else if (o->ping_interval > 0 && silent >= o->ping_interval + o->ping_timeout) {
        /* A peer silent this long will not answer a Close either: say it, and end now. */
        wsm_conn_close(c, 1011, (const uint8_t *)"keepalive ping timeout", 22, WSM_R_STALE);
        wsm_conn_flush(c);
        wsm_engine_finish(e, c, WSM_R_STALE, 1011, 0);
    } else if (o->ping_interval > 0 && silent >= o->ping_interval && c->ping_sent <= c->last_seen) {
        wsm_conn_ping(c);
    }
}

static void wsm_engine_on_timer(wsm_engine *e, wsm_nconn *c)
{
    if (c->phase == WSM_CONN_LINGER) {
        wsm_engine_destroy(e, c);
        return;
    }
    if (c->phase == WSM_CONN_CLOSING) {
        if (e->host.now >= c->close_deadline) {
            wsm_engine_finish(e, c, c->why, c->our_code, 0);
            return;
        }
    } else {
        wsm_engine_keepalive(e, c);
    }
    if (c->phase == WSM_CONN_OPEN || c->phase == WSM_CONN_CLOSING)
        wsm_engine_schedule(e, c, wsm_conn_deadline(c));
}

static void wsm_engine_run_timers(wsm_engine *e)
{
    wsm_nconn *c;
    while ((c = wsm_timer_pop_due(&e->timers, e->host.now)) != NULL)
        wsm_engine_on_timer(e, c);
}

static int wsm_engine_timeout_ms(wsm_engine *e)
{
    if (e->dirty != NULL || e->nlev)
        return 0;
    int64_t next = wsm_timer_next(&e->timers);
    if (next == INT64_MAX)
        return -1;
    int64_t d = next - wsm_clock_ns();
    if (d <= 0)
        return 0;
    d = (d + 999999) / 1000000;
    return d > 60000 ? 60000 : (int)d;
}

/* ---- I/O thread: commands ---------------------------------------------------------------- */

static int wsm_engine_conns_fit(wsm_engine *e, uint32_t slot)
{
    if (slot < e->capconns)
        return 0;
    size_t cap = e->capconns;
    size_t old = cap;
    if (wsm_engine_grow((void **)&e->conns, &cap, (size_t)slot + 1, sizeof(wsm_nconn *)) < 0)
        return -1;
    memset(e->conns + old, 0, (cap - old) * sizeof(wsm_nconn *));
    e->capconns = (uint32_t)cap;
    return 0;
}

static void wsm_engine_do_register(wsm_engine *e, wsm_cmd *cmd)
{
    uint32_t slot = (uint32_t)cmd->handle;
    wsm_nconn *c = NULL;
    if (wsm_engine_conns_fit(e, slot) == 0)
        c = wsm_conn_new(&e->host, cmd->handle, cmd->fd);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (c == NULL || epoll_ctl(e->epfd, EPOLL_CTL_ADD, cmd->fd, &ev) < 0) {
        /* Reported like any other end, so Python releases the transport. */
        wsm_engine_emit(e, WSM_EV_DISCONNECT, cmd->handle, NULL, 0, WSM_R_ABRUPT, 1011);
        if (c != NULL)
            wsm_conn_free(c);
        wsm_engine_slot_release(e, cmd->handle);
        return; /* the fd is closed by wsm_engine_cmd_release */
    }
    cmd->fd = -1;
    c->ev_mask = EPOLLIN;
    if (cmd->z_bits)
        wsm_conn_set_deflate(c, cmd->z_bits);
    e->conns[slot] = c;
    wsm_counter_add(&e->host.st.connections, 1);
    wsm_counter_add(&e->host.st.total_connections, 1);
    if (cmd->frame != NULL) {
        if (wsm_conn_append(c, cmd->frame, 0) < 0) {
            wsm_engine_finish(e, c, WSM_R_ABRUPT, 1011, 0);
            return;
        }
        c->oq_pinned = 1;
    }
    if (cmd->len && wsm_conn_feed(c, cmd->data, cmd->len) < 0) {
        wsm_engine_lost(e, c);
        return;
    }
    wsm_engine_mark_dirty(e, c);
    wsm_engine_schedule(e, c, wsm_conn_deadline(c));
}

static void wsm_engine_do_ack(wsm_engine *e, wsm_cmd *cmd)
{
    wsm_nconn *c = wsm_engine_lookup(e, cmd->handle);
    if (c == NULL || c->phase == WSM_CONN_DEAD || c->phase == WSM_CONN_LINGER)
        return;
    int paused = c->read_paused;
    if (wsm_conn_ack(c, cmd->n) < 0)
        wsm_engine_lost(e, c);
    else if (paused && !c->read_paused)
        wsm_engine_mark_dirty(e, c); /* the flush pass restores EPOLLIN */
}

/* One frame, one reference per receiver: a pointer in its ring and a refcount increment, no
 * copy of the payload. */
static void wsm_engine_do_fanout(wsm_engine *e, wsm_cmd *cmd)
{
    enum { AHEAD = 8 }; /* receivers' structs are scattered: start the fetch a few ahead */
    wsm_z_fan_begin(&e->host.z, cmd->frame, cmd->handles, cmd->n, e->host.o.compress_threshold);
    for (size_t i = 0; i < cmd->n; i++) {
        if (i + AHEAD < cmd->n) {
            uint32_t slot = (uint32_t)cmd->handles[i + AHEAD];
            if (slot < e->capconns && e->conns[slot] != NULL)
                __builtin_prefetch(e->conns[slot], 1);
        }
        wsm_nconn *c = wsm_engine_lookup(e, cmd->handles[i]);
        if (c == NULL || c->phase != WSM_CONN_OPEN) {
            wsm_counter_add(&e->host.st.frames_dropped, 1);
            continue;
        }
        if (wsm_conn_append(c, cmd->frame, 1) < 0)
            wsm_conn_close(c, 1011, NULL, 0, WSM_R_ABRUPT);
    }
    size_t shared = wsm_z_fan_end(&e->host.z);
    if (shared)
        wsm_counter_add(&e->host.st.deflate_shared, shared);
}

static void wsm_engine_do_cmd(wsm_engine *e, wsm_cmd *cmd)
{
    wsm_nconn *c;
    switch (cmd->kind) {
    case WSM_CMD_REGISTER:
        wsm_engine_do_register(e, cmd);
        break;
    case WSM_CMD_SEND:
        c = wsm_engine_lookup(e, cmd->handle);
        if (c == NULL || wsm_conn_append(c, cmd->frame, 1) != 0)
            wsm_counter_add(&e->host.st.frames_dropped, 1);
        break;
    case WSM_CMD_FANOUT:
        wsm_engine_do_fanout(e, cmd);
        break;
    case WSM_CMD_CLOSE:
        c = wsm_engine_lookup(e, cmd->handle);
        if (c != NULL) {
            wsm_conn_close(c, cmd->code, cmd->data, cmd->len, cmd->why);
            wsm_engine_mark_dirty(e, c);
        }
        break;
    case WSM_CMD_ACK:
        wsm_engine_do_ack(e, cmd);
        break;
    default:
        break;
    }
}

/* Returns 1 when a STOP command was among them. */
static int wsm_engine_run_cmds(wsm_engine *e)
{
    uint64_t v;
    ssize_t r = read(e->cmd_efd, &v, sizeof(v));
    (void)r;
    pthread_mutex_lock(&e->lock);
    wsm_cmd *batch = e->cmds;
    size_t n = e->ncmds, cap = e->capcmds;
    e->cmds = e->cmds_io;
    e->capcmds = e->capcmds_io;
    e->ncmds = 0;
    int stop = e->stop_requested;
    pthread_mutex_unlock(&e->lock);
    for (size_t i = 0; i < n; i++) {
        stop |= batch[i].kind == WSM_CMD_STOP;
        wsm_engine_do_cmd(e, &batch[i]);
        wsm_engine_cmd_release(&batch[i]);
    }
    e->cmds_io = batch;
    e->capcmds_io = cap;
    return stop;
}

/* ---- I/O thread: main loop --------------------------------------------------------------- */

static void wsm_engine_close_all(wsm_engine *e)
{
    for (uint32_t i = 0; i < e->capconns; i++) {
        wsm_nconn *c = e->conns[i];
        if (c == NULL || c->phase == WSM_CONN_DEAD)
            continue;
        if (c->phase == WSM_CONN_LINGER) {
            wsm_engine_destroy(e, c);
            continue;
        }
        wsm_conn_close(c, 1012, NULL, 0, WSM_R_SHUTDOWN);
        wsm_conn_pump(c);
        wsm_conn_flush(c); /* best effort: the process is going away */
        wsm_engine_finish(e, c, c->why, c->our_code, 0);
    }
}

int wsm_engine_iterate(wsm_engine *e, int timeout_ms)
{
    struct epoll_event evs[WSM_EPOLL_BATCH];
    int stop = 0;
    int wait = wsm_engine_timeout_ms(e);
    if (timeout_ms >= 0 && (wait < 0 || wait > timeout_ms))
        wait = timeout_ms;
    int n = epoll_wait(e->epfd, evs, WSM_EPOLL_BATCH, wait);
    e->host.now = wsm_clock_ns();
    for (int i = 0; i < n; i++) {
        if (evs[i].data.ptr == NULL)
            stop |= wsm_engine_run_cmds(e);
        else
            wsm_engine_on_io(e, evs[i].data.ptr, evs[i].events);
    }
    wsm_engine_evq_resume(e);
    wsm_engine_run_timers(e);
    wsm_engine_flush_dirty(e);
    wsm_engine_reap(e);
    wsm_engine_publish(e);
    return stop;
}

static void *wsm_engine_main(void *arg)
{
    wsm_engine *e = arg;
    while (!wsm_engine_iterate(e, -1))
        ;
    wsm_engine_close_all(e);
    wsm_engine_flush_dirty(e);
    wsm_engine_reap(e);
    wsm_engine_publish(e);
    return NULL;
}

/* ---- construction ------------------------------------------------------------------------ */

/* The host side of wsm_conn_host: what a connection asks of the engine. */
static int wsm_host_emit(void *user, int kind, uint64_t h, uint8_t *data, size_t len, int why,
                         int code)
{
    return wsm_engine_emit(user, kind, h, data, len, why, code);
}

static void wsm_host_closing(void *user, uint64_t h)
{
    wsm_engine_mark_closing(user, h);
}

static void wsm_host_dirty(void *user, wsm_nconn *c)
{
    wsm_engine_mark_dirty(user, c);
}

static void wsm_host_defer(void *user, wsm_nconn *c)
{
    wsm_engine_defer(user, c);
}

static void wsm_host_arm(void *user, wsm_nconn *c, int64_t when)
{
    wsm_engine *e = user;
    /* out of memory: the connection's next timer event or flush pass tries again */
    (void)wsm_timer_set(&e->timers, c, &c->timer_idx, when);
}

wsm_engine *wsm_engine_new(const wsm_engine_opts *o)
{
    wsm_engine *e = calloc(1, sizeof(*e));
    if (e == NULL)
        return NULL;
    e->host.o = o->conn;
    e->evq_limit = o->event_queue_limit;
    e->host.user = e;
    e->host.emit = wsm_host_emit;
    e->host.closing = wsm_host_closing;
    e->host.dirty = wsm_host_dirty;
    e->host.defer = wsm_host_defer;
    e->host.arm = wsm_host_arm;
    e->free_head = UINT32_MAX;
    e->epfd = e->cmd_efd = e->evt_efd = -1;
    wsm_timer_init(&e->timers);
    if (pthread_mutex_init(&e->lock, NULL) != 0) {
        free(e);
        return NULL;
    }
    e->host.rbuf_size = WSM_RBUF_SIZE;
    e->host.rbuf = malloc(e->host.rbuf_size);
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    e->cmd_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->evt_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (e->host.rbuf == NULL || e->epfd < 0 || e->cmd_efd < 0 || e->evt_efd < 0 ||
        epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->cmd_efd, &ev) < 0) {
        wsm_engine_free(e);
        return NULL;
    }
    return e;
}

int wsm_engine_start(wsm_engine *e)
{
    sigset_t all, old;
    sigfillset(&all);
    /* The thread inherits a mask that blocks everything: signals stay with Python's thread. */
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int r = pthread_create(&e->thread, NULL, wsm_engine_main, e);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (r != 0)
        return -1;
    e->started = 1;
    return 0;
}

void wsm_engine_stop(wsm_engine *e)
{
    if (!e->started || e->joined)
        return;
    wsm_cmd cmd = {.kind = WSM_CMD_STOP};
    pthread_mutex_lock(&e->lock);
    int wake = wsm_engine_push_locked(e, &cmd);
    /* Nothing is queued after STOP: later commands are refused and released by the caller. */
    e->stop_requested = 1;
    pthread_mutex_unlock(&e->lock);
    if (wake != 0) /* -1 (no memory for the command): the eventfd alone still wakes it */
        wsm_engine_wake(e);
    pthread_join(e->thread, NULL);
    e->joined = 1;
}

void wsm_engine_free(wsm_engine *e)
{
    if (e == NULL)
        return;
    wsm_engine_stop(e);
    for (size_t i = 0; i < e->ncmds; i++)
        wsm_engine_cmd_release(&e->cmds[i]);
    free(e->cmds);
    free(e->cmds_io);
    wsm_engine_event_free(e->evs, e->nevs);
    wsm_engine_event_free(e->lev, e->nlev);
    for (uint32_t i = 0; i < e->capconns; i++)
        if (e->conns[i] != NULL)
            wsm_engine_destroy(e, e->conns[i]);
    wsm_engine_reap(e);
    free(e->conns);
    free(e->slots);
    wsm_timer_free(&e->timers);
    wsm_z_free(&e->host.z);
    free(e->host.rbuf);
    if (e->epfd >= 0)
        close(e->epfd);
    if (e->cmd_efd >= 0)
        close(e->cmd_efd);
    if (e->evt_efd >= 0)
        close(e->evt_efd);
    pthread_mutex_destroy(&e->lock);
    free(e);
}

#endif /* __linux__ */
