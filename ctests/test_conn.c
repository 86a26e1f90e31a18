/* One connection (csrc/conn.c) run by a fake host: no engine, no thread, no socket for what
 * arrives (bytes go in with wsm_conn_receive, one at a time where it matters); a socket pair
 * only where the out-queue is flushed. */
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "conn.h"
#include "ctest.h"
#include "frames.h"
#include "timer.h"

typedef struct fake_event {
    int kind;
    uint8_t *data;
    size_t len;
} fake_event;

typedef struct fake_host {
    wsm_conn_host h;
    uint8_t rbuf[64 * 1024];
    fake_event ev[8192];
    size_t nev;
    int closing, dirty, deferred, armed;
} fake_host;

static int fake_emit(void *user, int kind, uint64_t handle, uint8_t *data, size_t len, int why,
                     int code)
{
    (void)handle, (void)why, (void)code;
    fake_host *f = user;
    if (f->nev == sizeof f->ev / sizeof f->ev[0]) {
        free(data);
        return -1;
    }
    f->ev[f->nev++] = (fake_event){kind, data, len};
    return 0;
}

static void fake_closing(void *user, uint64_t h) { (void)h; ((fake_host *)user)->closing++; }
static void fake_dirty(void *user, wsm_nconn *c) { (void)c; ((fake_host *)user)->dirty++; }
static void fake_defer(void *user, wsm_nconn *c) { (void)c; ((fake_host *)user)->deferred++; }
static void fake_arm(void *user, wsm_nconn *c, int64_t w) { (void)c, (void)w; ((fake_host *)user)->armed++; }

static fake_host *fake_new(size_t read_limit, size_t max_message)
{
    fake_host *f = calloc(1, sizeof *f);
    f->h.o = (wsm_conn_opts){.ping_interval = 0, .close_timeout = 1000000000, .send_timeout = 0,
                             .max_message_size = max_message, .high_water = 1 << 20,
                             .max_queue_bytes = 16 << 20, .read_limit = read_limit};
    f->h.rbuf = f->rbuf;
    f->h.rbuf_size = sizeof f->rbuf;
    f->h.user = f;
    f->h.emit = fake_emit;
    f->h.closing = fake_closing;
    f->h.dirty = fake_dirty;
    f->h.defer = fake_defer;
    f->h.arm = fake_arm;
    return f;
}

static void fake_free(fake_host *f)
{
    for (size_t i = 0; i < f->nev; i++)
        free(f->ev[i].data);
    free(f);
}

static void receive_bytewise(wsm_nconn *c, const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        CHECK_EQ(wsm_conn_receive(c, p + i, 1), 1);
}

/* The connection's own accounting agrees with the host's counter. */
static void check_charges(fake_host *f, wsm_nconn *c)
{
    CHECK_EQ(atomic_load(&f->h.st.inbound_bytes), wsm_conn_inbound(c));
    CHECK(wsm_conn_inbound(c) <= wsm_conn_inbound_bound(&f->h.o));
}

void test_conn_messages_byte_by_byte(void)
{
    fake_host *f = fake_new(1 << 20, 1 << 20);
    wsm_nconn *c = wsm_conn_new(&f->h, 1, -1);
    uint8_t buf[1024];
    size_t n = client_frame(buf, 0, 1, "hel", 3);
    n += client_frame(buf + n, 1, 9, "ping", 4); /* a ping inside a fragmented message */
    n += client_frame(buf + n, 1, 0, "lo \xc3\xa9", 5);
    n += client_frame(buf + n, 1, 2, "", 0);
    receive_bytewise(c, buf, n);
    CHECK_EQ(f->nev, 2);
    CHECK_EQ(f->ev[0].kind, WSM_EV_TEXT);
    CHECK_EQ(f->ev[0].len, 8);
    CHECK(f->ev[0].data && memcmp(f->ev[0].data, "hello \xc3\xa9", 8) == 0);
    CHECK_EQ(f->ev[1].kind, WSM_EV_BINARY);
    CHECK_EQ(f->ev[1].len, 0);
    CHECK_EQ(c->in_unacked, wsm_msg_charge(8) + wsm_msg_charge(0));
    CHECK(c->oq_len > 0); /* the pong */
    check_charges(f, c);
    wsm_conn_ack(c, wsm_msg_charge(8) + wsm_msg_charge(0));
    CHECK_EQ(c->in_unacked, 0);
    wsm_conn_free(c);
    CHECK_EQ(atomic_load(&f->h.st.inbound_bytes), 0);
    fake_free(f);
}

void test_conn_reading_pauses_and_resumes(void)
{
    enum { MSGS = 2000 }; /* 12 000 bytes: more than wslay's own 4 096-byte buffer */
    size_t limit = 4 * WSM_MSG_CHARGE - 1;
    fake_host *f = fake_new(limit, 1 << 20);
    wsm_nconn *c = wsm_conn_new(&f->h, 1, -1);
    static uint8_t buf[MSGS * 6];
    size_t n = 0;
    for (int i = 0; i < MSGS; i++)
        n += client_frame(buf + n, 1, 2, "", 0);
    CHECK_EQ(wsm_conn_receive(c, buf, n), (int)n); /* all in one read */
    /* the limit is crossed at the 4th message; what wslay had in its buffer still arrives,
     * the rest is held, unparsed */
    size_t first = 0, paused_at = 0;
    for (size_t i = 0; i < f->nev; i++) {
        first += f->ev[i].kind == WSM_EV_BINARY;
        if (f->ev[i].kind == WSM_EV_READ_PAUSED)
            paused_at = i;
    }
    CHECK_EQ(paused_at, 4);
    CHECK(c->read_paused);
    CHECK(first <= 4096 / 6 + 1);
    CHECK_EQ(c->held_len, n - 4096);
    check_charges(f, c);
    /* the app takes them: half the limit acknowledged resumes reading, held bytes first */
    size_t msgs = first;
    for (int round = 0; round < 100 && (c->read_paused || c->held_len); round++) {
        size_t before = f->nev;
        wsm_conn_ack(c, c->in_unacked);
        for (size_t i = before; i < f->nev; i++)
            msgs += f->ev[i].kind == WSM_EV_BINARY;
        check_charges(f, c);
    }
    CHECK_EQ(msgs, MSGS);
    CHECK_EQ(c->held_len, 0);
    wsm_conn_free(c);
    fake_free(f);
}

void test_conn_fragments_cost_what_they_weigh(void)
{
    fake_host *f = fake_new(1 << 20, 20000);
    wsm_nconn *c = wsm_conn_new(&f->h, 1, -1);
    uint8_t fr[8];
    size_t n = client_frame(fr, 0, 2, "a", 1);
    wsm_conn_receive(c, fr, n);
    for (int i = 0; i < 10000; i++) {
        n = client_frame(fr, 0, 0, "b", 1);
        wsm_conn_receive(c, fr, n);
    }
    CHECK_EQ(c->rs_len, 10001);
    CHECK(c->rs_cap <= 10001 + 10001 / 2 + 1024);
    check_charges(f, c);
    /* crossing max_message_size in a later fragment: 1009, nothing delivered */
    uint8_t big[20000 + 16];
    static uint8_t payload[10000];
    n = client_frame(big, 1, 0, payload, sizeof payload);
    wsm_conn_receive(c, big, n);
    CHECK_EQ(c->phase, WSM_CONN_CLOSING);
    CHECK_EQ(c->our_code, 1009);
    CHECK_EQ(c->why, WSM_R_PROTOCOL_ERROR);
    CHECK_EQ(f->nev, 0);
    CHECK(c->read_shut);
    wsm_conn_free(c);
    CHECK_EQ(atomic_load(&f->h.st.inbound_bytes), 0);
    fake_free(f);
}

void test_conn_close_floor_byte_by_byte(void)
{
    static const struct { const char *payload; size_t len; uint16_t code; int why; } cases[] = {
        {"\x03\xe8" "ab\xff\xfe", 6, 1007, WSM_R_PROTOCOL_ERROR},
        {"\x03\xe8" "ok", 4, 1000, WSM_R_NORMAL},
        {"\x03\xf4" "restart", 9, 1012, WSM_R_NORMAL},
        {"\x03\xed", 2, 1002, WSM_R_PROTOCOL_ERROR}, /* 1005 may not be sent */
        {"", 0, 1005, WSM_R_NORMAL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        fake_host *f = fake_new(1 << 20, 1 << 20);
        wsm_nconn *c = wsm_conn_new(&f->h, 1, -1);
        uint8_t buf[4200];
        static uint8_t x[4078];
        size_t n = client_frame(buf, 1, 2, x, sizeof x);
        n += client_frame(buf + n, 1, 8, cases[i].payload, cases[i].len);
        receive_bytewise(c, buf, n);
        CHECK_EQ(f->nev, 1); /* the binary message, then nothing */
        CHECK_EQ(c->phase, WSM_CONN_CLOSING);
        CHECK_EQ(c->our_code, cases[i].code);
        CHECK_EQ(c->why, cases[i].why);
        CHECK_EQ(f->closing, 1);
        CHECK(c->read_shut);
        wsm_conn_free(c);
        fake_free(f);
    }
}

void test_conn_out_queue_accounting(void)
{
    fake_host *f = fake_new(1 << 20, 1 << 20);
    int sv[2];
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
    wsm_nconn *c = wsm_conn_new(&f->h, 1, sv[0]);
    wsm_frame *fr = wsm_frame_encode(WSM_OP_TEXT, "shared", 6);
    for (int i = 0; i < 100; i++)
        CHECK_EQ(wsm_conn_append(c, fr, 1), 0);
    CHECK_EQ(fr->refcnt, 101);
    CHECK_EQ(c->oq_bytes, 100 * fr->len);
    CHECK_EQ(atomic_load(&f->h.st.queued_bytes), c->oq_bytes);
    CHECK_EQ(wsm_conn_flush(c), 0);
    CHECK_EQ(c->oq_bytes, 0);
    CHECK_EQ(atomic_load(&f->h.st.queued_bytes), 0);
    CHECK_EQ(fr->refcnt, 1);
    uint8_t out[2048];
    CHECK_EQ(read(sv[1], out, sizeof out), (ssize_t)(100 * fr->len));
    wsm_frame_decref(fr);
    wsm_conn_free(c);
    close(sv[0]);
    close(sv[1]);
    fake_free(f);
}
