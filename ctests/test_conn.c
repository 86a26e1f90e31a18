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

/* ---- permessage-deflate (deflate.h) ------------------------------------------------------- */

#include <zlib.h>

/* A message compressed as a client does it (raw deflate, sync flush, its tail removed). */
static size_t client_deflate(uint8_t *out, size_t cap, const void *p, size_t n)
{
    z_stream z;
    memset(&z, 0, sizeof z);
    deflateInit2(&z, 6, Z_DEFLATED, -15, 8, Z_DEFAULT_STRATEGY);
    z.next_in = (Bytef *)(uintptr_t)p;
    z.avail_in = (uInt)n;
    z.next_out = out;
    z.avail_out = (uInt)cap;
    deflate(&z, Z_SYNC_FLUSH);
    size_t len = cap - z.avail_out;
    deflateEnd(&z);
    return len - 4;
}

/* What a client inflates from a compressed frame's payload (the tail put back). */
static size_t client_inflate(uint8_t *out, size_t cap, const uint8_t *p, size_t n)
{
    static uint8_t in[1 << 16];
    memcpy(in, p, n);
    memcpy(in + n, "\x00\x00\xff\xff", 4);
    z_stream z;
    memset(&z, 0, sizeof z);
    inflateInit2(&z, -15);
    z.next_in = in;
    z.avail_in = (uInt)(n + 4);
    z.next_out = out;
    z.avail_out = (uInt)cap;
    inflate(&z, Z_SYNC_FLUSH);
    size_t len = cap - z.avail_out;
    inflateEnd(&z);
    return len;
}

static wsm_frame *oq_tail(wsm_nconn *c)
{
    return c->oq_len ? c->oq[(c->oq_head + c->oq_len - 1) & (c->oq_cap - 1)] : NULL;
}

void test_deflate_fanout_compresses_once(void)
{
    fake_host *f = fake_new(1 << 20, 1 << 20);
    f->h.o.compress_threshold = 256;
    wsm_nconn *a = wsm_conn_new(&f->h, 1, -1), *b = wsm_conn_new(&f->h, 2, -1);
    wsm_nconn *plain = wsm_conn_new(&f->h, 3, -1), *narrow = wsm_conn_new(&f->h, 4, -1);
    wsm_conn_set_deflate(a, 15);
    wsm_conn_set_deflate(b, 15);
    wsm_conn_set_deflate(narrow, 9); /* a 512-byte window */
    static uint8_t msg[9000], back[9000];
    for (size_t i = 0; i < sizeof msg; i++)
        msg[i] = (uint8_t)("{\"seq\":1,\"text\":\"hello the deploy is done\"},"[i % 45]);
    wsm_frame *fr = wsm_frame_encode(WSM_OP_TEXT, msg, sizeof msg);
    wsm_nconn *all[] = {a, b, plain, narrow};
    for (int i = 0; i < 4; i++) /* the engine's fan-out: one append per receiver */
        CHECK_EQ(wsm_conn_append(all[i], fr, 1), 0);
    /* one compressed encoding, made once, shared by reference by both deflate receivers */
    CHECK_EQ(atomic_load(&f->h.st.deflated), 1);
    wsm_frame *z = fr->z;
    CHECK(z != NULL && fr->z_tried);
    CHECK(oq_tail(a) == z && oq_tail(b) == z);
    CHECK_EQ(z->refcnt, 3); /* the plain frame's reference and two receivers' */
    CHECK(oq_tail(plain) == fr && oq_tail(narrow) == fr); /* 9000 B > its window: plain */
    CHECK_EQ(fr->refcnt, 3); /* the caller's, plain's and narrow's */
    CHECK_EQ(z->data[0], 0x80 | 0x40 | WSM_OP_TEXT); /* FIN, RSV1, text */
    const uint8_t *zp;
    size_t zn = wsm_frame_payload(z, &zp);
    CHECK(zn < sizeof msg / 4);
    CHECK_EQ(client_inflate(back, sizeof back, zp, zn), sizeof msg);
    CHECK(memcmp(back, msg, sizeof msg) == 0);
    CHECK_EQ(a->oq_bytes, z->len); /* the queue counts what goes on the wire */
    wsm_frame_decref(fr);
    /* under the threshold: everybody gets the plain frame, deflate never runs */
    wsm_frame *small = wsm_frame_encode(WSM_OP_BINARY, msg, 255);
    for (int i = 0; i < 4; i++)
        CHECK_EQ(wsm_conn_append(all[i], small, 1), 0);
    CHECK(oq_tail(a) == small && oq_tail(b) == small && small->z == NULL);
    CHECK_EQ(atomic_load(&f->h.st.deflated), 1);
    /* at it, within the narrow window too; a message that would not shrink goes plain */
    wsm_frame *mid = wsm_frame_encode(WSM_OP_BINARY, msg, 256);
    CHECK_EQ(wsm_conn_append(narrow, mid, 1), 0);
    CHECK(mid->z != NULL && oq_tail(narrow) == mid->z);
    static uint8_t noise[1000];
    uint32_t x = 2463534242u; /* xorshift32: incompressible enough */
    for (size_t i = 0; i < sizeof noise; i++) {
        x ^= x << 13, x ^= x >> 17, x ^= x << 5;
        noise[i] = (uint8_t)(x >> 24);
    }
    wsm_frame *rnd = wsm_frame_encode(WSM_OP_BINARY, noise, sizeof noise);
    CHECK_EQ(wsm_conn_append(a, rnd, 1), 0);
    CHECK_EQ(wsm_conn_append(b, rnd, 1), 0);
    CHECK(rnd->z_tried && rnd->z == NULL && oq_tail(a) == rnd && oq_tail(b) == rnd);
    CHECK_EQ(atomic_load(&f->h.st.deflated), 2);
    wsm_frame_decref(small);
    wsm_frame_decref(mid);
    wsm_frame_decref(rnd);
    for (int i = 0; i < 4; i++)
        wsm_conn_free(all[i]);
    wsm_z_free(&f->h.z);
    fake_free(f);
}

/* A client's side of one connection in the shared-context tests: a persistent inflater when
 * the connection keeps its window (as browsers do), a fresh one per message when it asked for
 * server_no_context_takeover. */
typedef struct zpeer {
    wsm_nconn *c;
    z_stream in;
    int takeover;
    size_t got, shared; /* compressed frames received; of those, shared-stream encodings */
} zpeer;

/* Peer i's connection on host f, negotiated with the window bits and flags bits(i). */
static void zpeer_open(fake_host *f, zpeer *p, int i, unsigned bits)
{
    memset(p, 0, sizeof(*p));
    p->c = wsm_conn_new(&f->h, (uint64_t)(i + 1), -1);
    p->takeover = (bits & WSM_Z_TAKEOVER) != 0;
    wsm_conn_set_deflate(p->c, bits);
    inflateInit2(&p->in, -15);
}

static void zpeer_close(zpeer *p)
{
    inflateEnd(&p->in);
    wsm_conn_free(p->c);
}

/* Takes every queued frame of p and checks it decodes, in order, to what was sent (msgs). */
static void zpeer_drain(zpeer *p, const uint8_t *const *msgs, const size_t *lens, size_t nmsgs,
                        size_t *next)
{
    static uint8_t in[1 << 16], out[1 << 16];
    while (p->c->oq_len) {
        wsm_frame *fr = p->c->oq[p->c->oq_head];
        p->c->oq_head = (p->c->oq_head + 1) & (p->c->oq_cap - 1);
        p->c->oq_len--;
        p->c->oq_bytes -= fr->len;
        CHECK(*next < nmsgs);
        const uint8_t *pl;
        size_t n = wsm_frame_payload(fr, &pl), len = n;
        const uint8_t *msg = pl;
        if (fr->data[0] & 0x40) {
            p->got++;
            if (!p->takeover)
                inflateReset(&p->in);
            memcpy(in, pl, n);
            memcpy(in + n, "\x00\x00\xff\xff", 4);
            p->in.next_in = in;
            p->in.avail_in = (uInt)(n + 4);
            p->in.next_out = out;
            p->in.avail_out = sizeof out;
            int r = inflate(&p->in, Z_SYNC_FLUSH);
            CHECK(r == Z_OK);
            len = sizeof out - p->in.avail_out;
            msg = out;
        }
        CHECK_EQ(len, lens[*next]);
        CHECK(len == lens[*next] && memcmp(msg, msgs[*next], len) == 0);
        (*next)++;
        wsm_frame_decref(fr);
    }
}

/* JSON-like text of n bytes that differs from message to message (seed). */
static void zmsg(uint8_t *out, size_t n, uint32_t seed)
{
    static const char *const words[] = {"deploy", "green", "latency", "user", "joined", "room",
                                        "price", "alert", "queue", "ready"};
    uint32_t x = seed * 2654435761u + 1;
    size_t k = 0;
    while (k < n) {
        x ^= x << 13, x ^= x >> 17, x ^= x << 5;
        char rec[96];
        int m = snprintf(rec, sizeof rec, "{'id':%u,'user':'u_%u','text':'%s %s'},", x % 100000,
                         (x >> 8) % 1000, words[x % 10], words[(x >> 4) % 10]);
        for (int i = 0; i < m && k < n; i++)
            out[k++] = (uint8_t)rec[i];
    }
}

/* Fan-outs to changing receiver sets and direct sends in between, on connections that keep
 * their window, one that does not and one with a small window: every frame each client gets
 * decodes, in order, with its own (persistent) inflater; receivers in sync share the stream's
 * encoding, which is smaller than the message compressed on its own. */
void test_deflate_shared_contexts(void)
{
    enum { NP = 6, NMSG = 400, LEN = 1500 };
    fake_host *f = fake_new(1 << 20, 1 << 20);
    f->h.o.compress_threshold = 256;
    zpeer peer[NP];
    /* 0-3 keep their window, 4 asked for server_no_context_takeover, 5 a 2^11-byte window */
    for (int i = 0; i < NP; i++)
        zpeer_open(f, &peer[i], i, (i == 5 ? 11u : 15u) | (i != 4 ? WSM_Z_TAKEOVER : 0u));
    static uint8_t store[NP][NMSG][LEN];
    static const uint8_t *msgs[NP][NMSG];
    static size_t lens[NP][NMSG];
    size_t nsent[NP] = {0}, next[NP] = {0};
    uint32_t x = 88172645u;
    size_t shared_bytes = 0, alone_bytes = 0;
    for (int step = 0; step < NMSG; step++) {
        x ^= x << 13, x ^= x >> 17, x ^= x << 5;
        static uint8_t m[LEN];
        size_t len = 300 + x % (LEN - 300);
        if ((x >> 20) % 16 == 0)
            len = 100; /* under the threshold: plain, leaves every window as it was */
        zmsg(m, len, (uint32_t)step);
        wsm_frame *fr = wsm_frame_encode(WSM_OP_TEXT, m, len);
        uint64_t handles[NP];
        size_t n = 0;
        unsigned pick = (x >> 8) % 20; /* 80% to everyone, 10% to a subset, 10% to one */
        for (int i = 0; i < NP; i++)
            if (pick < 16 || (pick == 16 && i % 2 == 0) || (pick == 17 && i < 3) || (pick >= 18 && i == (int)(x % NP)))
                handles[n++] = (uint64_t)(i + 1);
        int fan = n > 1;
        if (fan)
            wsm_z_fan_begin(&f->h.z, fr, handles, n, f->h.o.compress_threshold);
        for (size_t k = 0; k < n; k++) {
            zpeer *p = &peer[handles[k] - 1];
            size_t j = nsent[handles[k] - 1]++;
            memcpy(store[handles[k] - 1][j], m, len);
            msgs[handles[k] - 1][j] = store[handles[k] - 1][j];
            lens[handles[k] - 1][j] = len;
            CHECK_EQ(wsm_conn_append(p->c, fr, 1), 0);
            wsm_frame *got = oq_tail(p->c);
            if (got != fr && got != fr->z) {
                p->shared++;
                shared_bytes += got->len;
                uint8_t alone[LEN + 64];
                alone_bytes += client_deflate(alone, sizeof alone, m, len) + 4;
            }
        }
        if (fan)
            wsm_z_fan_end(&f->h.z);
        wsm_frame_decref(fr);
        for (int i = 0; i < NP; i++)
            zpeer_drain(&peer[i], msgs[i], lens[i], nsent[i], &next[i]);
    }
    for (int i = 0; i < NP; i++) {
        CHECK_EQ(next[i], nsent[i]);
        CHECK(peer[i].got > 0);
        zpeer_close(&peer[i]);
    }
    /* the connections that keep a 15-bit window mostly follow a stream; the others never do */
    for (int i = 0; i < 4; i++)
        CHECK(peer[i].shared > peer[i].got / 2);
    CHECK_EQ(peer[4].shared, 0);
    CHECK_EQ(peer[5].shared, 0);
    CHECK(shared_bytes * 10 < alone_bytes * 8); /* a stream's messages are at least 20% smaller */
    wsm_z_free(&f->h.z);
    fake_free(f);
}

/* One fan-out of a fresh message to the peers `idx` (a receiver set), every peer drained and
 * checked; returns how many receivers took the shared context's encoding, and adds to *cont
 * those of them that got it as a continued stream (not a keyframe: not f's own encoding). */
static size_t zfan(fake_host *f, zpeer *peer, const int *idx, size_t n, uint32_t seed,
                   uint8_t (*store)[64][1000], size_t *nsent, size_t *next, size_t np, size_t *cont)
{
    static const uint8_t *msgs[16][64];
    static size_t lens[16][64];
    uint8_t m[1000];
    zmsg(m, sizeof m, seed);
    wsm_frame *fr = wsm_frame_encode(WSM_OP_TEXT, m, sizeof m);
    uint64_t handles[16];
    for (size_t k = 0; k < n; k++)
        handles[k] = peer[idx[k]].c->handle;
    wsm_z_fan_begin(&f->h.z, fr, handles, n, f->h.o.compress_threshold);
    for (size_t k = 0; k < n; k++) {
        int i = idx[k];
        size_t j = nsent[i]++ % 64;
        memcpy(store[i][j], m, sizeof m);
        CHECK_EQ(wsm_conn_append(peer[i].c, fr, 1), 0);
        wsm_frame *got = oq_tail(peer[i].c);
        *cont += got != fr && got != fr->z;
    }
    size_t shared = wsm_z_fan_end(&f->h.z);
    wsm_frame_decref(fr);
    for (size_t i = 0; i < np; i++) { /* the ring of 64 sent messages is drained every time */
        size_t base = next[i];
        for (size_t j = base; j < nsent[i]; j++) {
            msgs[i][j - base] = store[i][j % 64];
            lens[i][j - base] = sizeof m;
        }
        size_t at = 0;
        zpeer_drain(&peer[i], msgs[i], lens[i], nsent[i] - base, &at);
        next[i] = base + at;
    }
    return shared;
}

/* A set's stream comes back after a visitor came and went (every member then follows the
 * visited set's stream, none the set's own), and fan-outs to sets nobody can follow (no
 * receiver keeps its window) take no stream from the sets that can. */
void test_deflate_shared_context_recovers(void)
{
    enum { NP = 9 };
    fake_host *f = fake_new(1 << 20, 1 << 20);
    f->h.o.compress_threshold = 256;
    zpeer peer[NP];
    for (int i = 0; i < NP; i++) /* 0-3 keep their window; 4-8 asked for no context takeover */
        zpeer_open(f, &peer[i], i, 15u | (i < 4 ? WSM_Z_TAKEOVER : 0u));
    static uint8_t store[NP][64][1000];
    size_t nsent[NP] = {0}, next[NP] = {0}, cont = 0;
    const int room[] = {0, 1, 2}, visited[] = {0, 1, 2, 3};
    uint32_t seed = 1;
    for (int k = 0; k < 5; k++)
        zfan(f, peer, room, 3, seed++, store, nsent, next, NP, &cont);
    zfan(f, peer, visited, 4, seed++, store, nsent, next, NP, &cont); /* peer 3 visits once */
    size_t shared = 0;
    for (int k = 0; k < 100; k++)
        shared += zfan(f, peer, room, 3, seed++, store, nsent, next, NP, &cont);
    CHECK(shared >= 3 * 98); /* at most the first message after the visit is behind */
    /* four rooms of peers that cannot follow a stream, between each of the room's messages */
    const int plain[4][2] = {{4, 5}, {5, 6}, {6, 7}, {7, 8}};
    shared = cont = 0;
    for (int k = 0; k < 50; k++) {
        size_t none = 0;
        for (int r = 0; r < 4; r++)
            CHECK_EQ(zfan(f, peer, plain[r], 2, seed++, store, nsent, next, NP, &none), 0);
        shared += zfan(f, peer, room, 3, seed++, store, nsent, next, NP, &cont);
    }
    CHECK_EQ(shared, 3 * 50);
    CHECK_EQ(cont, 3 * 50); /* the room's stream was never taken over: no keyframe */
    for (int i = 0; i < NP; i++) {
        CHECK_EQ(next[i], nsent[i]);
        zpeer_close(&peer[i]);
    }
    wsm_z_free(&f->h.z);
    fake_free(f);
}

void test_deflate_inbound_in_bounded_memory(void)
{
    fake_host *f = fake_new(1 << 20, 1 << 20);
    wsm_nconn *c = wsm_conn_new(&f->h, 1, -1);
    wsm_conn_set_deflate(c, 15);
    static uint8_t msg[20000], z[30000], buf[40000];
    static const char text[] = "compressed text, \xc3\xa9t\xc3\xa9 ";
    for (size_t i = 0; i < sizeof msg; i++)
        msg[i] = (uint8_t)text[i % (sizeof text - 1)];
    size_t zn = client_deflate(z, sizeof z, msg, sizeof msg);
    /* three fragments with a ping between, byte by byte: the inflater is charged meanwhile */
    size_t n = client_frame(buf, 0, 0x40 | 1, z, 7);
    n += client_frame(buf + n, 1, 9, "p", 1);
    CHECK(zn > 20);
    n += client_frame(buf + n, 0, 0, z + 7, zn / 2 - 7);
    receive_bytewise(c, buf, n);
    CHECK(c->rs_inf != NULL);
    CHECK(wsm_conn_inbound(c) >= WSM_INFLATE_CHARGE);
    check_charges(f, c);
    n = client_frame(buf, 1, 0, z + zn / 2, zn - zn / 2);
    receive_bytewise(c, buf, n);
    CHECK_EQ(f->nev, 1);
    CHECK_EQ(f->ev[0].kind, WSM_EV_TEXT);
    CHECK_EQ(f->ev[0].len, sizeof msg);
    CHECK(f->ev[0].data && memcmp(f->ev[0].data, msg, sizeof msg) == 0);
    CHECK(c->rs_inf == NULL && f->h.z.npool == 1); /* back in the pool */
    CHECK(f->h.z.pool->bytes <= WSM_INFLATE_CHARGE); /* zlib's allocations fit the charge */
    CHECK(f->h.z.pool->bytes > 32768);
    CHECK_EQ(atomic_load(&f->h.st.inflated), 1);
    check_charges(f, c);
    /* an uncompressed message next, then a compressed one reusing the pooled inflater */
    n = client_frame(buf, 1, 2, "raw", 3);
    n += client_frame(buf + n, 1, 0x40 | 2, z, zn);
    CHECK_EQ(wsm_conn_receive(c, buf, n), (int)n);
    CHECK_EQ(f->nev, 3);
    CHECK(f->ev[1].len == 3 && f->ev[2].len == sizeof msg);
    CHECK_EQ(f->h.z.npool, 1);
    /* invalid UTF-8 after inflate: 1007 */
    zn = client_deflate(z, sizeof z, "ok \xff", 4);
    n = client_frame(buf, 1, 0x40 | 1, z, zn);
    CHECK_EQ(wsm_conn_receive(c, buf, n), (int)n);
    CHECK_EQ(c->phase, WSM_CONN_CLOSING);
    CHECK_EQ(c->our_code, 1007);
    CHECK_EQ(f->nev, 3);
    wsm_conn_free(c);
    CHECK_EQ(atomic_load(&f->h.st.inbound_bytes), 0);
    wsm_z_free(&f->h.z);
    fake_free(f);
}

void test_deflate_bomb_stops_at_the_limit(void)
{
    enum { MAX = 5000 };
    fake_host *f = fake_new(1 << 20, MAX);
    static uint8_t zeros[1 << 20], z[8192], buf[9000];
    size_t zn = client_deflate(z, sizeof z, zeros, sizeof zeros); /* 1 MiB in about 1 KiB */
    CHECK(zn < 2000);
    for (int exact = 0; exact < 2; exact++) {
        wsm_nconn *c = wsm_conn_new(&f->h, 1, -1);
        wsm_conn_set_deflate(c, 15);
        size_t len = exact ? client_deflate(z, sizeof z, zeros, MAX) : zn;
        size_t n = client_frame(buf, 1, 0x40 | 2, z, len);
        CHECK_EQ(wsm_conn_receive(c, buf, n), (int)n);
        CHECK(c->rs_cap <= MAX);
        check_charges(f, c);
        if (exact) { /* exactly max_message_size decompressed is a message */
            CHECK_EQ(c->phase, WSM_CONN_OPEN);
            CHECK_EQ(f->ev[f->nev - 1].len, MAX);
        } else {
            CHECK_EQ(c->phase, WSM_CONN_CLOSING);
            CHECK_EQ(c->our_code, 1009);
        }
        wsm_conn_free(c);
        CHECK_EQ(atomic_load(&f->h.st.inbound_bytes), 0);
        zn = client_deflate(z, sizeof z, zeros, sizeof zeros);
    }
    wsm_z_free(&f->h.z);
    fake_free(f);
}

void test_deflate_rsv1_needs_negotiation(void)
{
    static const struct { int deflate, fin, op1, op2; } cases[] = {
        {0, 1, 0x40 | 1, -1},       /* RSV1 without negotiation */
        {1, 0, 2, 0x40 | 0},        /* RSV1 on a continuation frame */
        {1, 1, 0x40 | 9, -1},       /* RSV1 on a ping */
        {1, 1, 0x20 | 1, -1},       /* RSV2 */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        fake_host *f = fake_new(1 << 20, 1 << 20);
        wsm_nconn *c = wsm_conn_new(&f->h, 1, -1);
        if (cases[i].deflate)
            wsm_conn_set_deflate(c, 15);
        uint8_t z[64], buf[128];
        size_t zn = client_deflate(z, sizeof z, "hi", 2);
        size_t n = client_frame(buf, cases[i].fin, cases[i].op1, z, zn);
        if (cases[i].op2 >= 0)
            n += client_frame(buf + n, 1, cases[i].op2, z, zn);
        wsm_conn_receive(c, buf, n);
        CHECK_EQ(c->phase, WSM_CONN_CLOSING);
        CHECK_EQ(c->our_code, 1002);
        CHECK_EQ(f->nev, 0);
        wsm_conn_free(c);
        wsm_z_free(&f->h.z);
        fake_free(f);
    }
}
