/* libFuzzer target: a native connection's inbound byte path, end to end.
 *
 * The engine is built without its thread (wsm_engine_new, never wsm_engine_start): this
 * function is its I/O thread (wsm_engine_iterate) and its Python side at once (take events,
 * acknowledge them, send, close). Each connection is one end of an AF_UNIX socketpair; the
 * fuzzer plays the client on the other end, writing frames it generates from the input (or raw
 * input bytes) and reading what the server writes back.
 *
 * The input is a small program (fuzz/README.md has the table):
 *
 *   byte 0..5   options: read_limit, max_message_size, event_queue_limit, max_queue_bytes,
 *               high_water (each an index into a table of small values), flags (pings, close
 *               and send timeouts of 0, small socket buffers)
 *   then ops    one op byte each: low nibble = op, bits 4-5 = connection slot (0..3),
 *               bits 6-7 = variant; followed by the op's own argument bytes.
 *
 * A missing byte reads as 0, so every input is a valid program. After every op the engine's
 * invariants are checked (check_engine) and a violation aborts with "INVARIANT: ..."; at the
 * end every peer closes, the app acknowledges everything, and every connection must be gone
 * with exactly one DISCONNECT each before wsm_engine_free (LeakSanitizer checks the rest, and
 * the target itself checks that no descriptor is left open). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>
#include <zlib.h>

#include "conn.h"
#include "engine.h"
#include "frame.h"
#if __has_include("fanout.h")
#include "fanout.h"
#define FANOUT wsm_fanout_submit
#else
#define FANOUT wsm_engine_fanout
#endif

/* The engine's layout, as far as the invariants read it: the one place to adapt when it moves.
 * CONN_OPTS: the options every connection runs under; STATS: the atomic counters; OWNS: the
 * connection belongs to this engine; R(x): a disconnect reason (reasons.h). */
#define CONN_OPTS(e) (&(e)->host.o)
#define RX_BLOCKED(e) ((e)->host.rx_blocked)
#define STATS(e) ((e)->host.st)
#define OWNS(e, c) ((c)->host == &(e)->host)
#define R(x) WSM_R_##x
typedef wsm_conn_opts conn_opts;

static wsm_engine_opts make_engine_opts(const conn_opts *co, size_t event_queue_limit)
{
    wsm_engine_opts o;
    memset(&o, 0, sizeof(o));
    o.conn = *co;
    o.event_queue_limit = event_queue_limit;
    return o;
}

#define NSLOT 4              /* connection slots an op can address */
#define MAXREG 8             /* registrations per input (a slot can be re-registered) */
#define GEN_BUDGET (1u << 20) /* bytes of client frames one input may generate */
#define MAXFDS 64
/* The most a REGISTER may carry as the handshake leftover: the engine's own limit (Engine.register
 * refuses more) when it has one, else what wsmanager's protocol class can hand over (it stops
 * reading past 64 KiB, after one read of up to asyncio's 256 KiB). */
#ifdef WSM_LEFTOVER_MAX
#define LEFTOVER_MAX ((size_t)WSM_LEFTOVER_MAX)
#else
#define LEFTOVER_MAX (64u * 1024 + 256u * 1024)
#endif

/* The harness's own loops (checks, parsers, generators) carry no coverage instrumentation: they
 * are not the target, and instrumented they cost more than the engine itself. The ops' dispatch
 * keeps it, so that libFuzzer tells programs apart by what they do too. */
#define HOT __attribute__((no_sanitize("coverage"), noinline)) /* inlined, it would be instrumented */

/* ---- failure ------------------------------------------------------------------------------ */

static size_t g_input_len, g_op_index;

__attribute__((noreturn, format(printf, 1, 2))) static void fail(const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "\nINVARIANT: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, " (after op #%zu of a %zu-byte input)\n", g_op_index, g_input_len);
    abort();
}

/* FUZZ_CONN_TRACE=1 in the environment: every event and server frame on stderr (to see what
 * a seed or a regression does; slow). */
static int g_trace;

#define TRACE(...)                                                                                 \
    do {                                                                                           \
        if (g_trace)                                                                               \
            fprintf(stderr, __VA_ARGS__);                                                          \
    } while (0)

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    const char *t = getenv("FUZZ_CONN_TRACE");
    g_trace = t != NULL && *t && *t != '0';
    return 0;
}

/* ---- input cursor ------------------------------------------------------------------------- */

typedef struct {
    const uint8_t *p;
    size_t n;
} cursor;

static uint8_t u8(cursor *c)
{
    if (c->n == 0)
        return 0;
    c->n--;
    return *c->p++;
}

/* Up to want bytes of the input (fewer at its end). */
static size_t take(cursor *c, size_t want, const uint8_t **out)
{
    size_t k = want < c->n ? want : c->n;
    *out = c->p;
    c->p += k;
    c->n -= k;
    return k;
}

/* ---- an independent UTF-8 checker (RFC 3629 table 3-7, not the engine's decoder) ----------- */

HOT static int utf8_ok(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint8_t b = s[i];
        if (b <= 0x7f) {
            i++;
            continue;
        }
        uint8_t lo = 0x80, hi = 0xbf;
        size_t k;
        if (b >= 0xc2 && b <= 0xdf)
            k = 1;
        else if (b == 0xe0)
            k = 2, lo = 0xa0;
        else if ((b >= 0xe1 && b <= 0xec) || b == 0xee || b == 0xef)
            k = 2;
        else if (b == 0xed)
            k = 2, hi = 0x9f;
        else if (b == 0xf0)
            k = 3, lo = 0x90;
        else if (b >= 0xf1 && b <= 0xf3)
            k = 3;
        else if (b == 0xf4)
            k = 3, hi = 0x8f;
        else
            return 0;
        if (n - i <= k)
            return 0;
        if (s[i + 1] < lo || s[i + 1] > hi)
            return 0;
        for (size_t j = 2; j <= k; j++)
            if (s[i + j] < 0x80 || s[i + j] > 0xbf)
                return 0;
        i += k + 1;
    }
    return 1;
}

/* Codes a server may put in a Close frame (RFC 6455 7.4.1/7.4.2, IANA 1012-1014). */
static int code_sendable(unsigned code)
{
    return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) ||
           (code >= 3000 && code <= 4999);
}

/* A payload's fingerprint: eight bytes at a time (payloads reach 100 KB, hashed once sent and
 * once received). */
HOT static uint64_t fnv(const uint8_t *p, size_t n)
{
    uint64_t h = 1469598103934665603ull ^ n;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        h = (h ^ w) * 0x9e3779b97f4a7c15ull;
        h ^= h >> 29;
    }
    for (; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

/* ---- growable byte buffers ------------------------------------------------------------------ */

/* b[off..len) is the content: dropping from the front is O(1), compaction happens on growth. */
typedef struct {
    uint8_t *b;
    size_t off, len, cap;
} buf_t;

#define BUF_DATA(x) ((x)->b + (x)->off)
#define BUF_LEN(x) ((x)->len - (x)->off)

HOT static uint8_t *buf_room(buf_t *b, size_t n)
{
    if (b->len + n > b->cap && b->off) {
        memmove(b->b, b->b + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
    }
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n)
            cap *= 2;
        uint8_t *p = realloc(b->b, cap);
        if (p == NULL)
            abort();
        b->b = p;
        b->cap = cap;
    }
    uint8_t *r = b->b + b->len;
    b->len += n;
    return r;
}

static void buf_put(buf_t *b, const void *p, size_t n)
{
    if (n)
        memcpy(buf_room(b, n), p, n);
}

static void buf_drop_front(buf_t *b, size_t n)
{
    b->off += n;
    if (b->off == b->len)
        b->off = b->len = 0;
}

static void buf_free(buf_t *b)
{
    free(b->b);
    memset(b, 0, sizeof(*b));
}

/* ---- the model of one registration ---------------------------------------------------------- */

typedef struct {
    uint8_t kind; /* WSM_OP_TEXT / WSM_OP_BINARY */
    size_t len;
    uint64_t hash;
} sent_t;

typedef struct {
    uint64_t h;   /* 0: wsm_engine_register failed */
    size_t leftover; /* bytes handed over with the REGISTER */
    size_t resp_left; /* bytes of the 101 response still expected first on the wire */
    int peer;     /* the client end, -1 once closed */
    int peer_shut; /* the client shut its write side */
    unsigned z_bits; /* permessage-deflate negotiated with this window (0: not) */
    int takeover;    /* ... and the client keeps its inflate window between messages */
    z_stream zin;    /* that window: the client's inflater, made at its first compressed frame */
    int zin_made;
    int disconnected;
    uint16_t disc_code;
    uint8_t disc_why;
    int write_paused;
    /* Inbound accounting: charges of message events taken, acks sent / run by an iterate. */
    uint64_t taken, acked_sent, acked_done;
    size_t *fifo; /* charges of taken messages not yet acknowledged, oldest first */
    size_t fhead, flen, fcap;
    uint64_t unacked; /* sum of fifo */
    /* What the server wrote: an unparsed tail, the Close seen, the data frames expected. */
    buf_t wire;
    int wire_close;
    uint16_t wire_code;
    sent_t *sent;
    size_t nsent, capsent, nmatched;
} reg_t;

static struct {
    wsm_engine *e;
    conn_opts o; /* the connections' options of this run */
    reg_t regs[MAXREG];
    int nregs;
    int slot_reg[NSLOT];
    buf_t pend[NSLOT]; /* client bytes generated for a slot, not written yet */
    size_t gen_total;
    int small_srv_sndbuf, small_peer_sndbuf;
    int fds[MAXFDS];
    int nfds;
} S;

static uint8_t g_scratch[GEN_BUDGET]; /* payload building */
static uint8_t g_rd[64 * 1024];

static void note_fd(int fd)
{
    if (fd >= 0 && S.nfds < MAXFDS)
        S.fds[S.nfds++] = fd;
}

HOT static reg_t *reg_of_handle(uint64_t h)
{
    for (int i = 0; i < S.nregs; i++)
        if (S.regs[i].h == h && h != 0)
            return &S.regs[i];
    return NULL;
}

static reg_t *slot_reg(int slot)
{
    return S.slot_reg[slot] >= 0 ? &S.regs[S.slot_reg[slot]] : NULL;
}

HOT static void fifo_push(reg_t *r, size_t charge)
{
    if (r->flen == r->fcap) {
        size_t cap = r->fcap ? r->fcap * 2 : 16;
        size_t *q = malloc(cap * sizeof(*q));
        if (q == NULL)
            abort();
        for (size_t i = 0; i < r->flen; i++)
            q[i] = r->fifo[(r->fhead + i) % r->fcap];
        free(r->fifo);
        r->fifo = q;
        r->fcap = cap;
        r->fhead = 0;
    }
    r->fifo[(r->fhead + r->flen) % r->fcap] = charge;
    r->flen++;
    r->unacked += charge;
}

/* Acknowledges n charged bytes (oldest messages first), as Engine.ack would. */
HOT static void do_ack(reg_t *r, uint64_t n)
{
    if (n > r->unacked)
        n = r->unacked;
    if (n == 0)
        return;
    uint64_t left = n;
    while (left) {
        size_t *head = &r->fifo[r->fhead];
        if (*head <= left) {
            left -= *head;
            r->fhead = (r->fhead + 1) % r->fcap;
            r->flen--;
        } else {
            *head -= left;
            left = 0;
        }
    }
    r->unacked -= n;
    r->acked_sent += n;
    wsm_engine_ack(S.e, r->h, (size_t)n);
}

static void record_sent(reg_t *r, int kind, uint64_t hash, size_t n)
{
    if (r->nsent == r->capsent) {
        r->capsent = r->capsent ? r->capsent * 2 : 8;
        r->sent = realloc(r->sent, r->capsent * sizeof(*r->sent));
        if (r->sent == NULL)
            abort();
    }
    r->sent[r->nsent++] = (sent_t){.kind = (uint8_t)kind, .len = n, .hash = hash};
}

/* ---- permessage-deflate, as a client does it ------------------------------------------------ */

/* A payload compressed as a client compresses it (raw deflate, the sync flush's tail removed;
 * with bfinal the stream ends in a final block instead), into g_zbuf. level 0: stored blocks.
 * The harness's own zlib calls, not the engine's. */
static uint8_t g_zbuf[GEN_BUDGET + 4096];

HOT static size_t client_deflate(const uint8_t *p, size_t n, int level, int bfinal)
{
    z_stream z;
    memset(&z, 0, sizeof(z));
    if (deflateInit2(&z, level, Z_DEFLATED, -15, 8, Z_DEFAULT_STRATEGY) != Z_OK)
        abort();
    z.next_in = (Bytef *)(uintptr_t)p;
    z.avail_in = (uInt)n;
    z.next_out = g_zbuf;
    z.avail_out = sizeof(g_zbuf);
    int r = deflate(&z, bfinal ? Z_FINISH : Z_SYNC_FLUSH);
    size_t out = sizeof(g_zbuf) - z.avail_out;
    deflateEnd(&z);
    if (r != (bfinal ? Z_STREAM_END : Z_OK) || (!bfinal && out < 4))
        abort();
    return bfinal ? out : out - 4;
}

/* What a client inflates from a server's compressed payload (the tail put back), into g_zbuf:
 * with its window kept from message to message when it takes over the server's context (keep
 * non-NULL, as browsers do), else on its own. -1 when it is not a valid stream; max when it
 * inflates to at least max bytes (the caller's comparison tells). */
HOT static long client_inflate(const uint8_t *p, size_t n, size_t max, z_stream *keep)
{
    static const uint8_t tail[4] = {0, 0, 0xff, 0xff};
    z_stream own, *z = keep != NULL ? keep : &own;
    if (keep == NULL) {
        memset(&own, 0, sizeof(own));
        if (inflateInit2(&own, -15) != Z_OK)
            abort();
    }
    z->next_out = g_zbuf;
    z->avail_out = (uInt)(max < sizeof(g_zbuf) ? max : sizeof(g_zbuf));
    z->next_in = (Bytef *)(uintptr_t)p;
    z->avail_in = (uInt)n;
    int r = inflate(z, Z_SYNC_FLUSH);
    if (r == Z_OK || r == Z_BUF_ERROR) {
        z->next_in = (Bytef *)(uintptr_t)tail;
        z->avail_in = 4;
        r = inflate(z, Z_SYNC_FLUSH);
    }
    long got = (long)(z->next_out - g_zbuf);
    int full = z->avail_out == 0, left = z->avail_in != 0;
    if (keep == NULL)
        inflateEnd(&own);
    if (full)
        return got;
    return (r == Z_OK || r == Z_BUF_ERROR) && !left ? got : -1;
}

/* ---- what the server wrote: a strict parser of server frames ------------------------------- */

static const char resp101[] = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                              "Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

HOT static void parse_wire(reg_t *r)
{
    buf_t *w = &r->wire;
    size_t off = 0;
    if (BUF_LEN(w) == 0)
        return;
    if (r->resp_left) { /* the 101 the REGISTER was given, byte for byte */
        size_t k = BUF_LEN(w) < r->resp_left ? BUF_LEN(w) : r->resp_left;
        size_t at = sizeof(resp101) - 1 - r->resp_left;
        if (memcmp(BUF_DATA(w), resp101 + at, k) != 0)
            fail("handle %#llx: the 101 response is not written first", (unsigned long long)r->h);
        r->resp_left -= k;
        off = k;
    }
    while (off < BUF_LEN(w)) {
        const uint8_t *p = BUF_DATA(w) + off;
        size_t n = BUF_LEN(w) - off;
        if (r->wire_close)
            fail("handle %#llx: %zu bytes written after the server's Close frame",
                 (unsigned long long)r->h, n);
        if (n < 2)
            break;
        unsigned fin = p[0] >> 7, rsv = (p[0] >> 4) & 7, op = p[0] & 15;
        int compressed = rsv == 4 && r->z_bits && (op == WSM_OP_TEXT || op == WSM_OP_BINARY);
        if (!fin || (rsv && !compressed))
            fail("handle %#llx: server frame with fin=%u rsv=%u", (unsigned long long)r->h, fin, rsv);
        if (op != WSM_OP_TEXT && op != WSM_OP_BINARY && op != WSM_OP_CLOSE && op != WSM_OP_PING &&
            op != WSM_OP_PONG)
            fail("handle %#llx: server frame with opcode %#x", (unsigned long long)r->h, op);
        if (p[1] & 0x80)
            fail("handle %#llx: masked server frame", (unsigned long long)r->h);
        size_t l7 = p[1] & 0x7f, hl = 2;
        uint64_t len = l7;
        if (l7 == 126) {
            if (n < 4)
                break;
            len = ((uint64_t)p[2] << 8) | p[3];
            hl = 4;
            if (len < 126)
                fail("handle %#llx: server frame length %llu not minimally encoded",
                     (unsigned long long)r->h, (unsigned long long)len);
        } else if (l7 == 127) {
            if (n < 10)
                break;
            len = 0;
            for (int i = 0; i < 8; i++)
                len = (len << 8) | p[2 + i];
            hl = 10;
            if (len <= 0xffff || len >> 63)
                fail("handle %#llx: server frame length %llu badly encoded",
                     (unsigned long long)r->h, (unsigned long long)len);
        }
        if (op >= 8 && len > 125)
            fail("handle %#llx: server control frame of %llu bytes", (unsigned long long)r->h,
                 (unsigned long long)len);
        if (len > (64u << 20))
            fail("handle %#llx: server frame of %llu bytes, never sent", (unsigned long long)r->h,
                 (unsigned long long)len);
        if (n - hl < len)
            break;
        uint64_t wire_len = len;
        const uint8_t *pl = p + hl;
        if (compressed) { /* what the client reads is what it inflates */
            const sent_t *s = r->nmatched < r->nsent ? &r->sent[r->nmatched] : NULL;
            if (r->takeover && !r->zin_made) {
                if (inflateInit2(&r->zin, -15) != Z_OK)
                    abort();
                r->zin_made = 1;
            }
            long got = client_inflate(pl, (size_t)len, s ? s->len + 1 : GEN_BUDGET,
                                      r->takeover ? &r->zin : NULL);
            if (got < 0)
                fail("handle %#llx: compressed server frame of %llu bytes does not inflate",
                     (unsigned long long)r->h, (unsigned long long)len);
            if (s && (size_t)got > ((size_t)1 << r->z_bits) && r->z_bits < 15)
                fail("handle %#llx: a compressed %ld-byte message past the client's %u-bit window",
                     (unsigned long long)r->h, got, r->z_bits);
            if (len >= (uint64_t)got)
                fail("handle %#llx: a compressed frame no smaller than its message",
                     (unsigned long long)r->h);
            pl = g_zbuf;
            len = (uint64_t)got;
        }
        TRACE("  wire  %#llx: op %u, %llu bytes, close code %u\n", (unsigned long long)r->h, op,
              (unsigned long long)len,
              op == WSM_OP_CLOSE ? (len >= 2 ? ((unsigned)pl[0] << 8) | pl[1] : 1005) : 0);
        if (op == WSM_OP_TEXT || op == WSM_OP_BINARY) {
            if (r->nmatched == r->nsent)
                fail("handle %#llx: server data frame (op %u, %llu bytes) the app never sent",
                     (unsigned long long)r->h, op, (unsigned long long)len);
            const sent_t *s = &r->sent[r->nmatched++];
            if (s->kind != op || s->len != len || s->hash != fnv(pl, (size_t)len))
                fail("handle %#llx: server data frame #%zu (op %u, %llu bytes) is not the one sent "
                     "(op %u, %zu bytes)",
                     (unsigned long long)r->h, r->nmatched - 1, op, (unsigned long long)len, s->kind,
                     s->len);
            if (op == WSM_OP_TEXT && !utf8_ok(pl, (size_t)len))
                fail("handle %#llx: server text frame not valid UTF-8", (unsigned long long)r->h);
        } else if (op == WSM_OP_CLOSE) {
            if (len == 1)
                fail("handle %#llx: server Close frame with a 1-byte payload", (unsigned long long)r->h);
            unsigned code = len ? ((unsigned)pl[0] << 8) | pl[1] : 1005;
            if (len && !code_sendable(code))
                fail("handle %#llx: server Close frame with code %u", (unsigned long long)r->h, code);
            if (len > 2 && !utf8_ok(pl + 2, (size_t)len - 2))
                fail("handle %#llx: server Close reason not valid UTF-8", (unsigned long long)r->h);
            r->wire_close = 1;
            r->wire_code = (uint16_t)code;
        }
        off += hl + (size_t)wire_len;
    }
    buf_drop_front(w, off);
}

/* Reads what the server wrote to the client end (at most max bytes) and parses it. */
HOT static void drain_peer(reg_t *r, size_t max)
{
    if (r->peer < 0)
        return;
    size_t got = 0;
    while (got < max) {
        size_t want = max - got < sizeof(g_rd) ? max - got : sizeof(g_rd);
        ssize_t n = recv(r->peer, g_rd, want, MSG_DONTWAIT);
        if (n <= 0)
            break;
        buf_put(&r->wire, g_rd, (size_t)n);
        got += (size_t)n;
    }
    parse_wire(r);
}

/* ---- events ------------------------------------------------------------------------------- */

static size_t ev_charge(const wsm_event *ev)
{
    return wsm_event_charge(ev);
}

HOT static void check_event(const wsm_event *ev)
{
    TRACE("  event %#llx: kind %u, %zu bytes, code %u, why %u\n", (unsigned long long)ev->handle,
          ev->kind, ev->len, ev->code, ev->why);
    reg_t *r = reg_of_handle(ev->handle);
    if (r == NULL)
        fail("event kind %u for handle %#llx that was never registered", ev->kind,
             (unsigned long long)ev->handle);
    if (r->disconnected)
        fail("event kind %u for handle %#llx after its DISCONNECT", ev->kind,
             (unsigned long long)ev->handle);
    if (ev->len && ev->data == NULL)
        fail("event kind %u with %zu bytes and no data", ev->kind, ev->len);
    switch (ev->kind) {
    case WSM_EV_TEXT:
        if (!utf8_ok(ev->data, ev->len))
            fail("TEXT event of %zu bytes is not valid UTF-8", ev->len);
        /* fall through */
    case WSM_EV_BINARY:
        if (ev->len > S.o.max_message_size)
            fail("message of %zu bytes delivered, max_message_size %zu", ev->len,
                 S.o.max_message_size);
        r->taken += wsm_msg_charge(ev->len);
        fifo_push(r, wsm_msg_charge(ev->len));
        break;
    case WSM_EV_DISCONNECT: {
        unsigned code = ev->code, why = ev->why;
        if (why >= R(COUNT))
            fail("DISCONNECT with reason kind %u", why);
        if (!code_sendable(code) && !(code == 1005 && why == R(NORMAL)) &&
            !(code == 1006 && why == R(ABRUPT)))
            fail("DISCONNECT with close code %u (reason kind %u)", code, why);
        if (why == R(PROTOCOL_ERROR) && code != 1002 && code != 1007 && code != 1009)
            fail("protocol-error DISCONNECT with close code %u", code);
        if (why == R(SLOW_CONSUMER) && code != 1008)
            fail("slow-consumer DISCONNECT with close code %u", code);
        if (why == R(STALE) && code != 1011)
            fail("stale DISCONNECT with close code %u", code);
        if (ev->len > 123)
            fail("DISCONNECT reason of %zu bytes", ev->len);
        if (!utf8_ok(ev->data, ev->len))
            fail("DISCONNECT reason (%zu bytes) not valid UTF-8", ev->len);
        r->disconnected = 1;
        r->disc_code = (uint16_t)code;
        r->disc_why = (uint8_t)why;
        break;
    }
    case WSM_EV_WRITE_PAUSED:
    case WSM_EV_WRITE_RESUMED:
        if (ev->len)
            fail("flow-control event with %zu bytes", ev->len);
        if ((ev->kind == WSM_EV_WRITE_PAUSED) == r->write_paused)
            fail("%s twice in a row", ev->kind == WSM_EV_WRITE_PAUSED ? "WRITE_PAUSED" : "WRITE_RESUMED");
        r->write_paused = ev->kind == WSM_EV_WRITE_PAUSED;
        break;
    case WSM_EV_READ_PAUSED:
        if (ev->len)
            fail("READ_PAUSED with %zu bytes", ev->len);
        break;
    default:
        fail("event of unknown kind %u", ev->kind);
    }
}

HOT static void take_events(void)
{
    wsm_event *evs = NULL;
    size_t n = wsm_engine_take_events(S.e, &evs);
    for (size_t i = 0; i < n; i++)
        check_event(&evs[i]);
    wsm_engine_event_free(evs, n);
}

/* ---- the invariants ----------------------------------------------------------------------- */

HOT static void check_engine(int after_iterate)
{
    wsm_engine *e = S.e;
    const conn_opts *o = CONN_OPTS(e);
    size_t bound = wsm_conn_inbound_bound(o);
    uint64_t sum_q = 0, sum_in = 0, live = 0, present = 0, contexts = 0;
    uint64_t pending[MAXREG] = {0};
    uint64_t evq = 0;
    /* Events published but not taken, and events of an iteration not published yet. */
    for (int pass = 0; pass < 2; pass++) {
        const wsm_event *v = pass ? e->lev : e->evs;
        size_t nv = pass ? e->nlev : e->nevs;
        for (size_t i = 0; i < nv; i++) {
            evq += ev_charge(&v[i]);
            if (v[i].kind == WSM_EV_TEXT || v[i].kind == WSM_EV_BINARY) {
                reg_t *r = reg_of_handle(v[i].handle);
                if (r == NULL)
                    fail("pending event for unknown handle %#llx", (unsigned long long)v[i].handle);
                pending[r - S.regs] += wsm_msg_charge(v[i].len);
            }
        }
    }
    for (uint32_t i = 0; i < e->capconns; i++) {
        const wsm_nconn *c = e->conns[i];
        if (c == NULL)
            continue;
        present++;
        TRACE("  conn  %#llx: phase %u, in_unacked %zu, rs %zu/%zu, held %zu, oq %zu, paused %u, "
              "deferred %u, read_shut %u\n",
              (unsigned long long)c->handle, c->phase, c->in_unacked, c->rs_len, c->rs_cap,
              c->held_len, c->oq_bytes, c->read_paused, c->deferred, c->read_shut);
        if ((uint32_t)c->handle != i || !OWNS(e, c))
            fail("conns[%u] holds handle %#llx", i, (unsigned long long)c->handle);
        if (c->phase != WSM_CONN_OPEN && c->phase != WSM_CONN_CLOSING && c->phase != WSM_CONN_LINGER)
            fail("conns[%u] in phase %u", i, c->phase);
        reg_t *r = reg_of_handle(c->handle);
        if (r == NULL)
            fail("live connection %#llx the fuzzer never registered", (unsigned long long)c->handle);
        if (c->phase != WSM_CONN_LINGER)
            live++;
        /* The inbound budget. */
        size_t in = wsm_conn_inbound(c);
        if (in > bound)
            fail("handle %#llx charged %zu inbound bytes, bound %zu (in_unacked %zu, rs_cap %zu, "
                 "held %zu)",
                 (unsigned long long)c->handle, in, bound, c->in_unacked, c->rs_cap, c->held_len);
        if (c->rs_len > c->rs_cap || c->rs_cap > o->max_message_size)
            fail("handle %#llx reassembly %zu/%zu bytes, max_message_size %zu",
                 (unsigned long long)c->handle, c->rs_len, c->rs_cap, o->max_message_size);
        uint64_t expect = r->taken + pending[r - S.regs] - r->acked_done;
        if (c->phase != WSM_CONN_LINGER && c->in_unacked != expect)
            fail("handle %#llx in_unacked %zu, but delivered-and-not-acknowledged is %llu",
                 (unsigned long long)c->handle, c->in_unacked, (unsigned long long)expect);
        if (c->phase != WSM_CONN_LINGER && !c->read_paused && c->in_unacked > o->read_limit)
            fail("handle %#llx not paused with in_unacked %zu > read_limit %zu",
                 (unsigned long long)c->handle, c->in_unacked, o->read_limit);
        sum_in += in;
        /* A dozing connection (no wslay context) is open, at a frame boundary, with nothing
         * held and no message in progress: what a new context would start from. */
        contexts += c->ctx != NULL;
        if (c->ctx == NULL && (c->held_len || c->rs_op || c->scan.have || c->scan.left))
            fail("handle %#llx without a wslay context mid-stream (held %zu, rs_op %u, scan %u/%llu)",
                 (unsigned long long)c->handle, c->held_len, c->rs_op, c->scan.have,
                 (unsigned long long)c->scan.left);
        if (c->ctx == NULL && c->phase == WSM_CONN_CLOSING && c->oq_len)
            fail("handle %#llx closing without a wslay context", (unsigned long long)c->handle);
        /* The out-queue. */
        if (c->oq_cap == 0 || (c->oq_cap & (c->oq_cap - 1)) || c->oq_len > c->oq_cap ||
            c->oq_head >= c->oq_cap)
            fail("handle %#llx out-queue ring cap %u len %u head %u", (unsigned long long)c->handle,
                 c->oq_cap, c->oq_len, c->oq_head);
        uint64_t q = 0;
        for (uint32_t k = 0; k < c->oq_len; k++) {
            const wsm_frame *f = c->oq[(c->oq_head + k) & (c->oq_cap - 1)];
            if (f == NULL || f->refcnt == 0 || f->len > f->cap)
                fail("handle %#llx out-queue entry %u broken", (unsigned long long)c->handle, k);
            q += f->len;
        }
        if (c->oq_len && c->oq_off >= c->oq[c->oq_head]->len)
            fail("handle %#llx oq_off %zu past its head frame of %zu", (unsigned long long)c->handle,
                 c->oq_off, c->oq[c->oq_head]->len);
        if (!c->oq_len && c->oq_off)
            fail("handle %#llx oq_off %zu with an empty queue", (unsigned long long)c->handle, c->oq_off);
        q -= c->oq_len ? c->oq_off : 0;
        if (c->oq_bytes != q)
            fail("handle %#llx oq_bytes %zu, the ring holds %llu", (unsigned long long)c->handle,
                 c->oq_bytes, (unsigned long long)q);
        /* Above twice max_queue_bytes a connection is closed in the same iteration (the tail
         * byte run wslay's pieces are packed into may add up to its 256-byte capacity). */
        if (after_iterate && c->phase == WSM_CONN_OPEN && c->oq_bytes > 2 * o->max_queue_bytes + 512)
            fail("handle %#llx still open with %zu queued bytes, max_queue_bytes %zu",
                 (unsigned long long)c->handle, c->oq_bytes, o->max_queue_bytes);
        sum_q += c->oq_bytes;
    }
    if (present > (uint64_t)S.nregs)
        fail("%llu connections, %d registered", (unsigned long long)present, S.nregs);
    uint64_t st_q = atomic_load(&STATS(e).queued_bytes), st_in = atomic_load(&STATS(e).inbound_bytes);
    uint64_t st_evq = atomic_load(&STATS(e).event_queue_bytes), st_live = atomic_load(&STATS(e).connections);
    if (st_q != sum_q)
        fail("queued_bytes %llu, connections' out-queues hold %llu", (unsigned long long)st_q,
             (unsigned long long)sum_q);
    if (st_in != sum_in)
        fail("inbound_bytes %llu, connections are charged %llu", (unsigned long long)st_in,
             (unsigned long long)sum_in);
    if (st_evq != evq)
        fail("event_queue_bytes %llu, events not taken are charged %llu (%zu published, %zu in lev)",
             (unsigned long long)st_evq, (unsigned long long)evq, e->nevs, e->nlev);
    if (st_live != live)
        fail("connections counter %llu, %llu open or closing", (unsigned long long)st_live,
             (unsigned long long)live);
    if (atomic_load(&STATS(e).wslay_contexts) != contexts)
        fail("wslay_contexts %llu, connections hold %llu", (unsigned long long)atomic_load(&STATS(e).wslay_contexts),
             (unsigned long long)contexts);
    /* Liveness: what epoll reports now (level-triggered, so looking changes nothing) must make the
     * next iteration progress. A hang-up on a connection that neither reads nor writes would be
     * reported again at once, forever: the I/O thread would spin. */
    if (after_iterate) {
        struct epoll_event rev[64];
        int nr = epoll_wait(e->epfd, rev, 64, 0);
        for (int k = 0; k < nr; k++) {
            const wsm_nconn *c = rev[k].data.ptr;
            if (c == NULL || !(rev[k].events & (EPOLLHUP | EPOLLERR)) || (c->ev_mask & EPOLLOUT) ||
                c->phase == WSM_CONN_LINGER || !(c->read_paused || c->deferred || RX_BLOCKED(e)))
                continue;
            /* still asking to read (the event queue filled after its last read): the next
             * iteration's read defers it and parks it, which is progress */
            if ((c->ev_mask & EPOLLIN) && !c->read_paused && !c->deferred)
                continue;
            fail("handle %#llx: epoll reports %s while its reading is paused (interest %#x): the "
                 "I/O thread spins until the app acknowledges",
                 (unsigned long long)c->handle, (rev[k].events & EPOLLERR) ? "EPOLLERR" : "EPOLLHUP",
                 c->ev_mask);
        }
    }
    if (after_iterate) {
        if (e->nlev)
            fail("%zu events left unpublished after an iteration", e->nlev);
        if (e->dirty != NULL || e->dead != NULL)
            fail("dirty or dead list not empty after an iteration");
    }
}

/* ---- client side: frames ------------------------------------------------------------------ */

static const size_t size_tab[24] = {64,   100,  125,  126,   127,   200,   255,   256,
                                    1000, 1024, 2000, 4077,  4078,  4090,  4096,  4097,
                                    8192, 16000, 65535, 65536, 65537, 100000, 270000, 300000};

static size_t size_of(uint8_t sel)
{
    sel &= 63;
    return sel < 40 ? sel : size_tab[sel - 40];
}

/* Appends one client frame: b0 is FIN/RSV/opcode, enc the length encoding (0 shortest, 1 16-bit,
 * 2 64-bit, 3 64-bit with the top bit set), key NULL for an unmasked frame. */
HOT static void put_frame(buf_t *b, uint8_t b0, int enc, const uint8_t *key, const uint8_t *pl, size_t len)
{
    uint8_t h[14];
    size_t hl = 2;
    h[0] = b0;
    uint8_t m = key ? 0x80 : 0;
    if (enc == 1 && len > 0xffff)
        enc = 0;
    if (enc == 0 && len < 126) {
        h[1] = m | (uint8_t)len;
    } else if (enc <= 1 && len <= 0xffff) {
        h[1] = m | 126;
        h[2] = (uint8_t)(len >> 8);
        h[3] = (uint8_t)len;
        hl = 4;
    } else {
        uint64_t l = len | (enc == 3 ? 1ull << 63 : 0);
        h[1] = m | 127;
        for (int i = 0; i < 8; i++)
            h[2 + i] = (uint8_t)(l >> (56 - 8 * i));
        hl = 10;
    }
    if (key) {
        memcpy(h + hl, key, 4);
        hl += 4;
    }
    buf_put(b, h, hl);
    uint8_t *d = buf_room(b, len);
    if (len)
        memcpy(d, pl, len);
    if (key == NULL)
        return;
    uint64_t k8;
    uint8_t kb[8] = {key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3]};
    memcpy(&k8, kb, 8);
    size_t i = 0;
    for (; i + 8 <= len; i += 8) { /* the mask repeats every 4 bytes: 8 at a time */
        uint64_t w;
        memcpy(&w, d + i, 8);
        w ^= k8;
        memcpy(d + i, &w, 8);
    }
    for (; i < len; i++)
        d[i] ^= key[i & 3];
}

/* One character from a byte: ASCII, 2, 3 or 4 bytes, edges included; never a surrogate. */
HOT static size_t utf8_char(uint8_t b, uint8_t out[4])
{
    uint32_t cp;
    switch (b >> 6) {
    case 0:
    case 1:
        out[0] = b & 0x7f;
        return 1;
    case 2:
        cp = (b & 0x3f) == 0x3f ? 0x7ff : 0x80 + (uint32_t)(b & 0x3f) * 29;
        out[0] = (uint8_t)(0xc0 | (cp >> 6));
        out[1] = (uint8_t)(0x80 | (cp & 0x3f));
        return 2;
    default:
        if (b & 0x20) {
            cp = (b & 0x1f) == 0x1f ? 0x10ffff : 0x10000 + (uint32_t)(b & 0x1f) * 0x7fff;
            out[0] = (uint8_t)(0xf0 | (cp >> 18));
            out[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3f));
            out[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3f));
            out[3] = (uint8_t)(0x80 | (cp & 0x3f));
            return 4;
        }
        cp = (b & 0x1f) == 0x1f ? 0xffff : (b & 0x1f) == 0x1e ? 0xd7ff : 0x800 + (uint32_t)(b & 0x1f) * 0x7ff;
        if (cp >= 0xd800 && cp <= 0xdfff)
            cp += 0x800;
        out[0] = (uint8_t)(0xe0 | (cp >> 12));
        out[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3f));
        out[2] = (uint8_t)(0x80 | (cp & 0x3f));
        return 3;
    }
}

/* Fills out[0..len) from src (cycled): mode 0 raw bytes, 1 valid UTF-8, 2 UTF-8 with one
 * defect (kind: bits 0-2 of `at`, position: bits 3-5, in eighths of len), 3 'A's. */
HOT static void fill_payload(uint8_t *out, size_t len, int mode, const uint8_t *src, size_t nsrc, uint8_t at)
{
    if (len == 0)
        return;
    if (mode == 3 || (nsrc == 0 && mode != 2)) {
        memset(out, mode == 0 ? 0 : 'A', len);
        return;
    }
    if (mode == 0) {
        size_t i = nsrc < len ? nsrc : len;
        memcpy(out, src, i);
        while (i < len) { /* the pattern doubles: a few memcpy for a megabyte */
            size_t c = i < len - i ? i : len - i;
            memcpy(out + i, out, c);
            i += c;
        }
        return;
    }
    /* One period of whole characters (one per source byte), then the period doubles. */
    size_t i = 0, k = 0, nchars = nsrc ? nsrc : 1;
    while (i < len && k < nchars) {
        uint8_t ch[4];
        size_t n = utf8_char(nsrc ? src[k++] : (k++, 'a'), ch);
        if (n > len - i) {
            memset(out + i, 'a', len - i);
            i = len;
            break;
        }
        memcpy(out + i, ch, n);
        i += n;
    }
    size_t period = i;
    while (i < len) {
        size_t c = i < len - i ? i : len - i;
        memcpy(out + i, out, c);
        i += c;
    }
    if (period < len) { /* the last copy may end mid-character: ASCII from its lead byte on */
        size_t j = len;
        while (j > 0 && (out[j - 1] & 0xc0) == 0x80)
            j--;
        if (j > 0 && out[j - 1] >= 0xc0)
            memset(out + j - 1, 'a', len - j + 1);
    }
    if (mode == 2) {
        static const uint8_t bad[8][2] = {{0xff, 0}, {0xc0, 0x80}, {0x80, 0}, {0xed, 0xa0},
                                          {0xf4, 0x90}, {0xe0, 0x80}, {0xf8, 0x88}, {0xc3, 0}};
        size_t pos = ((size_t)(at >> 3) & 7) * len / 8;
        const uint8_t *d = bad[at & 7];
        out[pos] = d[0];
        if (pos + 1 < len && d[1])
            out[pos + 1] = d[1];
    }
}

static int gen_ok(size_t n)
{
    if (S.gen_total + n > GEN_BUDGET)
        return 0;
    S.gen_total += n;
    return 1;
}

/* Source bytes for a payload: a count byte, then that many input bytes. */
static size_t src_bytes(cursor *in, const uint8_t **src)
{
    return take(in, u8(in) & 63, src);
}

static const uint8_t default_key[4] = {0x37, 0xfa, 0x21, 0x3d};

/* op 1: a data frame. */
static void op_data_frame(cursor *in, int slot)
{
    uint8_t h = u8(in), lb = u8(in), mode = u8(in);
    uint8_t key[4];
    for (int i = 0; i < 4; i++)
        key[i] = u8(in);
    const uint8_t *src;
    size_t nsrc = src_bytes(in, &src);
    static const uint8_t ops[8] = {0, 1, 2, 1, 2, 3, 0xb, 0};
    uint8_t opcode = ops[h & 7];
    if (opcode == 3)
        opcode = 3 + (mode >> 5) % 5; /* 3..7: reserved data opcodes */
    else if (opcode == 0xb)
        opcode = 0xb + (mode >> 5) % 5; /* 0xb..0xf: reserved control opcodes */
    uint8_t fin = (h & 8) ? 0 : 0x80;
    uint8_t rsv = (uint8_t)((h >> 4) & 3) << 4; /* RSV1, RSV2 */
    int masked = !(h & 0x40);
    size_t len = size_of(lb);
    if (!gen_ok(len + 14))
        return;
    fill_payload(g_scratch, len, mode & 3, src, nsrc, (h & 0x80) ? 0 : (uint8_t)(mode >> 2));
    const uint8_t *pl = g_scratch;
    if (h & 0x80) { /* RSV1 (permessage-deflate) on a compressed payload: of 'A's, a deflate
                     * bomb; mode bit 2: on the raw payload instead; bit 3: a final block;
                     * bits 4-6: the level */
        rsv |= 0x40;
        if (!(mode & 4)) {
            int level = (mode >> 4) & 7;
            len = client_deflate(g_scratch, len, level == 7 ? 9 : level, (mode >> 3) & 1);
            pl = g_zbuf;
        }
    }
    put_frame(&S.pend[slot], fin | rsv | opcode, lb >> 6, masked ? key : NULL, pl, len);
}

static const uint16_t close_codes[] = {1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008,
                                       1009, 1010, 1011, 1012, 1013, 1014, 1015, 1016, 2999,
                                       3000, 3999, 4000, 4999, 5000, 0,    65535, 999};
#define NCLOSE_CODES (sizeof(close_codes) / sizeof(close_codes[0]))

/* op 2: a control frame: v 0 ping, 1 pong, 2 close, 3 close with a raw 2-byte code. */
static void op_control_frame(cursor *in, int slot, int v)
{
    uint8_t f = u8(in), lb = u8(in), mode = u8(in);
    const uint8_t *src;
    size_t nsrc = src_bytes(in, &src);
    uint8_t fin = (f & 1) ? 0 : 0x80;
    uint8_t rsv = (f & 2) ? (uint8_t)(((f >> 2) & 7) << 4) : 0;
    int masked = !(f & 0x20);
    int enc = (f >> 6) & 3;
    if (enc == 3 && !(f & 0x10))
        enc = 0; /* 2^63 lengths only when asked twice */
    uint8_t pl[256];
    size_t len;
    uint8_t opcode;
    if (v <= 1) {
        opcode = v == 0 ? WSM_OP_PING : WSM_OP_PONG;
        len = lb & 0x7f; /* up to 127: 126 and 127 are oversized */
        fill_payload(pl, len, mode & 3, src, nsrc, (uint8_t)(mode >> 2));
    } else {
        opcode = WSM_OP_CLOSE;
        unsigned code;
        if (v == 2) {
            uint8_t sel = u8(in) % (NCLOSE_CODES + 2);
            if (sel >= NCLOSE_CODES) { /* no payload, or a lone byte */
                len = sel - NCLOSE_CODES;
                pl[0] = 0x03;
                goto build;
            }
            code = close_codes[sel];
        } else {
            code = (unsigned)u8(in) << 8;
            code |= u8(in);
        }
        size_t rlen = lb % 128; /* reasons of 124 and 125 bytes make the frame oversized */
        pl[0] = (uint8_t)(code >> 8);
        pl[1] = (uint8_t)code;
        fill_payload(pl + 2, rlen, mode & 3, src, nsrc, (uint8_t)(mode >> 2));
        len = 2 + rlen;
    }
build:
    if (!gen_ok(len + 14))
        return;
    put_frame(&S.pend[slot], fin | rsv | opcode, enc, masked ? default_key : NULL, pl, len);
}

/* op 3: raw bytes. */
static void op_raw(cursor *in, int slot)
{
    const uint8_t *p;
    size_t n = take(in, u8(in), &p);
    if (gen_ok(n))
        buf_put(&S.pend[slot], p, n);
}

/* op 14: one message in fragments, pings between them (each split point from the input, so a
 * fragment may end mid-character). */
static void op_fragmented(cursor *in, int slot)
{
    uint8_t a = u8(in), pings = u8(in), lb = u8(in);
    int nfrag = 1 + ((a >> 3) & 7);
    size_t cut[9];
    size_t len = size_of(lb);
    cut[0] = 0;
    for (int i = 1; i < nfrag; i++)
        cut[i] = (size_t)u8(in) * len / 256;
    cut[nfrag] = len;
    for (int i = 1; i < nfrag; i++) /* insertion sort: split points in order */
        for (int j = i; j > 1 && cut[j] < cut[j - 1]; j--) {
            size_t t = cut[j];
            cut[j] = cut[j - 1];
            cut[j - 1] = t;
        }
    uint8_t key[4];
    for (int i = 0; i < 4; i++)
        key[i] = u8(in);
    const uint8_t *src;
    size_t nsrc = src_bytes(in, &src);
    if (!gen_ok(len + 20 * (size_t)nfrag))
        return;
    int mode = (a >> 1) & 3;
    fill_payload(g_scratch, len, mode, src, nsrc, pings);
    const uint8_t *pl = g_scratch;
    uint8_t rsv1 = 0;
    if (lb & 0x40) { /* compressed, then split at the same proportions (RSV1 on the first) */
        size_t zlen = client_deflate(g_scratch, len, 6, lb >> 7);
        for (int i = 1; i < nfrag; i++)
            cut[i] = len ? cut[i] * zlen / len : 0;
        cut[nfrag] = zlen;
        pl = g_zbuf;
        rsv1 = 0x40;
    }
    uint8_t opcode = (a & 1) ? WSM_OP_BINARY : WSM_OP_TEXT;
    for (int i = 0; i < nfrag; i++) {
        uint8_t b0 = (uint8_t)((i == 0 ? opcode | rsv1 : 0) | (i == nfrag - 1 ? 0x80 : 0));
        put_frame(&S.pend[slot], b0, (a >> 6) == 3 && i == 1 ? 1 : 0, key, pl + cut[i],
                  cut[i + 1] - cut[i]);
        if ((pings >> i) & 1 && i < nfrag - 1) {
            uint8_t p[3] = {'p', (uint8_t)i, a};
            put_frame(&S.pend[slot], 0x80 | ((pings & 0x80) && i == 6 ? WSM_OP_PONG : WSM_OP_PING), 0,
                      key, p, (size_t)(i % 4));
        }
    }
}

/* ---- client side: the socket ---------------------------------------------------------------- */

/* Writes up to max pending bytes of a slot to its client end. */
HOT static void write_pending(int slot, size_t max)
{
    reg_t *r = slot_reg(slot);
    buf_t *b = &S.pend[slot];
    size_t len = BUF_LEN(b);
    if (r == NULL || len == 0)
        return;
    if (r->peer < 0 || r->peer_shut) {
        buf_drop_front(b, len); /* the client cannot send any more */
        return;
    }
    size_t done = 0;
    while (done < len && done < max) {
        size_t n = len - done < max - done ? len - done : max - done;
        ssize_t k = send(r->peer, BUF_DATA(b) + done, n, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        if (k <= 0) { /* EPIPE, ECONNRESET: the server is gone */
            done = len;
            break;
        }
        done += (size_t)k;
    }
    buf_drop_front(b, done);
}

static void write_all_pending(void)
{
    for (int s = 0; s < NSLOT; s++)
        write_pending(s, SIZE_MAX);
}

static void iterate(void)
{
    wsm_engine_iterate(S.e, 0);
    /* Every command pushed before this iteration has run. */
    for (int i = 0; i < S.nregs; i++)
        S.regs[i].acked_done = S.regs[i].acked_sent;
    check_engine(1);
}

static void close_peer(reg_t *r)
{
    if (r->peer >= 0)
        close(r->peer);
    r->peer = -1;
}

static void small_sndbuf(int fd)
{
    int v = 1; /* the kernel rounds it up to its minimum */
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof(v));
}

/* op 0: register a new connection in the slot (the previous one's client end closes). The
 * leftover of the handshake: v 0 none, 1 all pending bytes, 2 a prefix of them (the argument's
 * low 7 bits), 3 none but the client's pending bytes are written before the REGISTER runs. The
 * argument's top bit: the REGISTER carries a 101 response for the engine to write first. */
static void op_register(cursor *in, int slot, int v)
{
    uint8_t a = u8(in);
    if (S.nregs == MAXREG)
        return;
    reg_t *old = slot_reg(slot);
    if (old != NULL)
        close_peer(old);
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0)
        return;
    note_fd(sv[0]);
    note_fd(sv[1]);
    if (S.small_srv_sndbuf)
        small_sndbuf(sv[0]);
    if (S.small_peer_sndbuf)
        small_sndbuf(sv[1]);
    buf_t *b = &S.pend[slot];
    size_t plen = BUF_LEN(b);
    size_t n = v == 1 ? plen : v == 2 ? ((a & 127u) < plen ? (a & 127u) : plen) : 0;
    if (n > LEFTOVER_MAX)
        n = LEFTOVER_MAX;
    uint8_t *data = NULL;
    if (n) {
        data = malloc(n);
        if (data == NULL)
            abort();
        memcpy(data, BUF_DATA(b), n);
        buf_drop_front(b, n);
    }
    reg_t *r = &S.regs[S.nregs];
    memset(r, 0, sizeof(*r));
    r->peer = sv[1];
    r->leftover = n;
    wsm_frame *resp = NULL;
    if (a & 128) {
        resp = wsm_frame_raw(resp101, sizeof(resp101) - 1);
        if (resp == NULL)
            abort();
        r->resp_left = sizeof(resp101) - 1;
    }
    /* bit 6: permessage-deflate negotiated, with a window of 15 bits or (bit 5) 8 + bits 0-2;
     * bit 4: the client keeps its window (it may follow a shared context) */
    r->z_bits = (a & 64) ? ((a & 32) ? 8u + (a & 7u) : 15u) : 0;
    r->takeover = r->z_bits && (a & 16);
    r->h = wsm_engine_register(S.e, sv[0], resp, data, n,
                               r->z_bits | (r->takeover ? WSM_Z_TAKEOVER : 0u));
    if (r->h == 0) {
        close(sv[1]);
        return;
    }
    if (reg_of_handle(r->h) != NULL)
        fail("handle %#llx handed out twice", (unsigned long long)r->h);
    S.slot_reg[slot] = S.nregs++;
    if (v == 3)
        write_pending(slot, SIZE_MAX);
}

static const uint16_t our_codes[] = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010,
                                     1011, 1012, 1013, 1014, 3000, 4000, 4999};

/* op 11: the app closes (Engine.close: a code in 1000-4999 the app may send, a reason of valid
 * UTF-8 cut at a character boundary to 123 bytes, as engine_py.c does). */
static void op_engine_close(cursor *in, int slot, int v)
{
    uint8_t a = u8(in), l = u8(in);
    const uint8_t *src;
    size_t nsrc = src_bytes(in, &src);
    reg_t *r = slot_reg(slot);
    if (r == NULL)
        return;
    uint8_t reason[200];
    size_t len = l % 160;
    fill_payload(reason, len, 1, src, nsrc, 0);
    if (len > 123) {
        len = 123;
        while (len > 0 && (reason[len] & 0xc0) == 0x80)
            len--;
    }
    static const uint8_t whys[4] = {R(NORMAL), R(ABRUPT), R(LIMIT), R(SHUTDOWN)};
    wsm_engine_close(S.e, r->h, our_codes[a % (sizeof(our_codes) / sizeof(our_codes[0]))],
                     (const char *)reason, len, whys[v]);
}

static const size_t send_sizes[16] = {0,    1,     10,    100,   125,   126,    1000,  4096,
                                      5000, 16384, 65535, 65536, 70000, 100000, 0,     3};

/* op 12 (one receiver) and op 13 (fan-out): the app sends. A fan-out goes to every registration
 * for slot 0, else to those whose index has bit (index % 3) of the slot set: receiver sets that
 * change, each with its own shared compression context. */
static void op_send(cursor *in, int slot, int fanout)
{
    uint8_t a = u8(in);
    const uint8_t *src;
    size_t nsrc = src_bytes(in, &src);
    int kind = (a & 1) ? WSM_OP_BINARY : WSM_OP_TEXT;
    size_t len = send_sizes[(a >> 1) & 15];
    if (!gen_ok(len))
        return;
    fill_payload(g_scratch, len, kind == WSM_OP_TEXT ? 1 : 0, src, nsrc, 0);
    wsm_frame *f = wsm_frame_encode(kind, g_scratch, len);
    if (f == NULL)
        abort();
    if (!fanout) {
        reg_t *r = slot_reg(slot);
        if (r == NULL) {
            wsm_frame_decref(f);
            return;
        }
        if (wsm_engine_send(S.e, r->h, f))
            record_sent(r, kind, fnv(g_scratch, len), len);
        return;
    }
    uint64_t hs[MAXREG], hash = fnv(g_scratch, len);
    size_t n = 0;
    for (int i = 0; i < S.nregs; i++) {
        if (slot != 0 && !((slot >> (i % 3)) & 1))
            continue;
        hs[n++] = S.regs[i].h;
        record_sent(&S.regs[i], kind, hash, len); /* a dead receiver never gets data again */
    }
    if (FANOUT(S.e, hs, n, f) < 0)
        abort();
}

/* The app side of a well-behaved turn: take everything, acknowledge everything. */
static void app_turn(void)
{
    take_events();
    for (int i = 0; i < S.nregs; i++)
        do_ack(&S.regs[i], UINT64_MAX);
}

static void client_drain_all(void)
{
    for (int i = 0; i < S.nregs; i++)
        drain_peer(&S.regs[i], SIZE_MAX);
}

static void run_op(cursor *in)
{
    uint8_t b = u8(in);
    int op = b & 15, slot = (b >> 4) & 3, v = b >> 6;
    reg_t *r = slot_reg(slot);
    TRACE("op #%zu: %u slot %d variant %d\n", g_op_index, op, slot, v);
    switch (op) {
    case 0:
        op_register(in, slot, v);
        break;
    case 1:
        op_data_frame(in, slot);
        break;
    case 2:
        op_control_frame(in, slot, v);
        break;
    case 3:
        op_raw(in, slot);
        break;
    case 4: {
        static const size_t sizes[8] = {1, 2, 5, 13, 100, 1000, 4096, SIZE_MAX};
        write_pending(slot, sizes[u8(in) & 7]);
        break;
    }
    case 5: /* iterate: v 0..2 with every pending byte written first (v+1 turns), 3 without */
        for (int i = 0; i <= (v == 3 ? 0 : v); i++) {
            if (v != 3)
                write_all_pending();
            iterate();
        }
        break;
    case 6:
        take_events();
        break;
    case 7: { /* ack: v 0 all, 1 the oldest message, 2 a number of messages, 3 a byte count */
        uint8_t a = u8(in);
        if (r == NULL)
            break;
        uint64_t n = 0;
        if (v == 0) {
            n = r->unacked;
        } else if (v == 3) {
            n = (uint64_t)a * 17 + 1;
        } else {
            size_t k = v == 1 ? 1 : a;
            for (size_t i = 0; i < k && i < r->flen; i++)
                n += r->fifo[(r->fhead + i) % r->fcap];
        }
        do_ack(r, n);
        break;
    }
    case 8:
        if (r != NULL)
            drain_peer(r, v == 0 ? 4096 : SIZE_MAX);
        break;
    case 9:
        if (r != NULL && r->peer >= 0 && !r->peer_shut) {
            shutdown(r->peer, SHUT_WR);
            r->peer_shut = 1;
        }
        break;
    case 10:
        if (r != NULL) {
            if (v & 1)
                drain_peer(r, SIZE_MAX); /* a clean close: nothing unread, so no reset */
            close_peer(r);
        }
        break;
    case 11:
        op_engine_close(in, slot, v);
        break;
    case 12:
    case 13:
        op_send(in, slot, op == 13);
        break;
    case 14:
        op_fragmented(in, slot);
        break;
    case 15: /* well-behaved turns: write, iterate, take, ack, read (v+1 of them) */
        for (int i = 0; i <= v; i++) {
            write_all_pending();
            iterate();
            app_turn();
            client_drain_all();
        }
        break;
    }
}

/* ---- the options ---------------------------------------------------------------------------- */

static size_t set_options(cursor *in, conn_opts *o)
{
    static const size_t read_limits[8] = {0, 64, 300, 1000, 4096, 9000, 65536, 1 << 20};
    static const size_t max_msgs[8] = {0, 1, 125, 200, 1000, 5000, 65536, 1 << 20};
    static const size_t evq_limits[8] = {0, 256, 1000, 4096, 20000, 100000, 1 << 20, 1 << 30};
    static const size_t max_queues[8] = {0, 100, 1000, 10000, 100000, 1 << 20, 1 << 24, 1 << 30};
    static const size_t high_waters[8] = {0, 50, 500, 5000, 65536, 1 << 20, 1 << 24, 1 << 30};
    const int64_t hour = 3600LL * 1000000000LL;
    memset(o, 0, sizeof(*o));
    o->read_limit = read_limits[u8(in) & 7];
    o->max_message_size = max_msgs[u8(in) & 7];
    size_t evq_limit = evq_limits[u8(in) & 7];
    o->max_queue_bytes = max_queues[u8(in) & 7];
    o->high_water = high_waters[u8(in) & 7];
    uint8_t f = u8(in);
    /* Time stays out of it: a deadline is 0 or 1 ns (always due) or an hour (never). */
    switch (f & 3) {
    case 1:
        o->ping_interval = 1, o->ping_timeout = hour; /* a ping every turn, never stale */
        break;
    case 2:
        o->ping_interval = 1, o->ping_timeout = 0; /* stale at once */
        break;
    default:
        o->ping_interval = 0, o->ping_timeout = 0;
        break;
    }
    o->close_timeout = (f & 4) ? 0 : hour;
    o->send_timeout = (f & 8) ? 0 : hour;
    o->compress_threshold = (f & 64) ? 0 : 256;
    S.small_srv_sndbuf = (f >> 4) & 1;
    S.small_peer_sndbuf = (f >> 5) & 1;
    return evq_limit;
}

/* ---- the end ------------------------------------------------------------------------------ */

HOT static void teardown(void)
{
    /* A last well-behaved exchange, then every client goes away and the app reads everything:
     * every connection must then end, each with exactly one DISCONNECT. */
    for (int i = 0; i < 2; i++) {
        write_all_pending();
        iterate();
        app_turn();
        client_drain_all();
    }
    for (int i = 0; i < S.nregs; i++)
        close_peer(&S.regs[i]);
    int left = 1;
    /* a paused reader takes at least 4 096 bytes a turn */
    size_t rounds = 64 + S.gen_total / 2048;
    for (size_t round = 0; round < rounds && left; round++) {
        iterate();
        app_turn();
        left = 0;
        for (uint32_t i = 0; i < S.e->capconns; i++)
            left += S.e->conns[i] != NULL;
    }
    if (left)
        fail("%d connection(s) still registered after every client closed and the app "
             "acknowledged everything (%zu iterations)",
             left, rounds);
    take_events();
    for (int i = 0; i < S.nregs; i++) {
        reg_t *r = &S.regs[i];
        if (!r->disconnected)
            fail("handle %#llx gone without a DISCONNECT event", (unsigned long long)r->h);
        if (r->wire_close && r->wire_code != r->disc_code)
            fail("handle %#llx: the server's Close frame said %u, the app was told %u",
                 (unsigned long long)r->h, r->wire_code, r->disc_code);
    }
    check_engine(1);
}

static void reset_model(void)
{
    for (int i = 0; i < S.nregs; i++) {
        reg_t *r = &S.regs[i];
        close_peer(r);
        free(r->fifo);
        free(r->sent);
        buf_free(&r->wire);
        if (r->zin_made)
            inflateEnd(&r->zin);
    }
    for (int s = 0; s < NSLOT; s++)
        buf_free(&S.pend[s]);
    memset(&S, 0, sizeof(S));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    cursor in = {data, size};
    g_input_len = size;
    g_op_index = 0;
    memset(&S, 0, sizeof(S));
    for (int s = 0; s < NSLOT; s++)
        S.slot_reg[s] = -1;
    size_t evq_limit = set_options(&in, &S.o);
    wsm_engine_opts eo = make_engine_opts(&S.o, evq_limit);
    S.e = wsm_engine_new(&eo);
    if (S.e == NULL)
        abort();
    note_fd(S.e->epfd);
    note_fd(S.e->cmd_efd);
    note_fd(S.e->evt_efd);
    check_engine(0);
    while (in.n) {
        g_op_index++;
        run_op(&in);
        check_engine(0);
    }
    g_op_index++;
    teardown();
    wsm_engine_free(S.e);
    int fds[MAXFDS], nfds = S.nfds;
    memcpy(fds, S.fds, sizeof(fds));
    reset_model();
    /* Every descriptor of this run is closed now (the engine owned the server ends). */
    for (int i = 0; i < nfds; i++)
        if (fcntl(fds[i], F_GETFD) != -1)
            fail("descriptor %d still open after wsm_engine_free", fds[i]);
    return 0;
}
