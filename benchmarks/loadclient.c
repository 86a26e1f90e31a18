/* loadclient — WebSocket load generator for the wsmanager benchmarks (one thread, epoll).
 *
 * Opens N connections (a distinct user per connection: "{i}" in --path is replaced by the
 * connection index), then runs measurement phases and prints one JSON object per line:
 *
 *   {"event":"connected", ...}   connect+handshake time, rate, handshake latency percentiles
 *   {"event":"phase", ...}       one per run: deliveries, deliveries/s, fan-out latency
 *                                percentiles (send -> the last receiver has it), lost,
 *                                duplicated, out-of-order, server/client/other CPU seconds
 *
 * Modes
 *   broadcast  closed loop: connection 0 sends {"type":"broadcast"}, waits until every other
 *              connection has it, sends the next; --sizes, --duration, --runs
 *   chat       --senders S connections publish open-loop at --rates (messages/s, aggregate);
 *              every message is expected at every other connection; --grace after each run
 *   echo       every connection sends {"type":"message"} and waits for the answer; round trips/s
 *   idle       hold the connections (answering pings) until SIGTERM/SIGINT or --hold seconds
 *
 * Payload content: "#PPSSSSQQQQQQQQ" (phase, sender, sequence in hex) padded to --sizes bytes,
 * with 'x' (--filler x, the default) or, with --filler text, with JSON-like records that compress
 * like real traffic (zlib level 6, each message on its own: ~41% at 700 B, ~24% at 9 KB; with
 * context takeover over a stream of them ~24% and ~20%), different for every message. The
 * client sends masked frames with an all-zero key (valid RFC 6455 masking) and answers ping
 * frames and JSON {"type": "ping"} messages.
 *
 * --deflate 1 offers permessage-deflate as browsers do ("permessage-deflate;
 * client_max_window_bits"); a compressed message (RSV1) is inflated by the connection's own zlib
 * stream (reset after each message when the server answered server_no_context_takeover) before
 * it is counted. The client itself never compresses. "connected" reports how many connections
 * negotiated it, "phase" how many messages arrived compressed, how many of those it inflated and
 * the bytes read from the sockets during the phase (rx_bytes: frames with their headers, what the
 * server put on the wire for the receivers). --inflate-every K (broadcast mode): only every K-th
 * connection inflates (and checks sequence and order); on the others a compressed frame of more
 * than 64 bytes counts as a delivery of the one broadcast outstanding, so that 1 000 zlib
 * windows in the client (40 MB) do not crowd the server out of the shared caches.
 *
 * Server CPU: with --watch-pid, utime+stime of that process from /proc before and after each
 * phase; client CPU from getrusage; "other" = every other process in /proc.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

enum { ST_CONNECTING, ST_HANDSHAKE, ST_OPEN, ST_CLOSED };
enum { M_BROADCAST, M_CHAT, M_ECHO, M_IDLE };

#define RING_BITS 16
#define RING (1u << RING_BITS)
#define RBUF_SIZE (4u << 20)
#define MAX_EVENTS 4096

typedef struct {
    int fd;
    int state;
    int64_t t_start;       /* connect() called */
    char *pend;            /* partial frame / handshake bytes */
    size_t plen, pcap;
    char *wbuf;            /* unsent bytes */
    size_t wlen, woff, wcap;
    int want_out;
    uint32_t echo_seq;     /* echo: outstanding sequence (0 = none) */
    int64_t echo_sent;
    int deflate;           /* permessage-deflate negotiated */
    int z_reset;           /* ... with server_no_context_takeover: reset after each message */
    z_stream *inf;         /* inflate stream, made at the first compressed message */
} conn_t;

typedef struct {
    uint32_t seq;
    uint32_t expected;
    uint32_t count;
    int64_t sent;
    int64_t last;
} msg_t;

/* options */
static const char *o_host = "127.0.0.1";
static int o_port = 8000;
static const char *o_path = "/ws?user=u{i}";
static int o_n = 10;
static int o_src = 1;
static int o_mode = M_BROADCAST;
static int o_sizes[16] = {64};
static int o_nsizes = 1;
static double o_rates[64];
static int o_nrates = 0;
static int o_senders = 10;
static double o_duration = 2.0;
static int o_runs = 1;
static double o_grace = 2.0;
static double o_hold = 0;
static int o_watch = 0;
static int o_conc = 200;
static double o_connect_timeout = 120.0;
static double o_msg_timeout = 10.0;
static int o_deflate = 0;
static int o_text_filler = 0;
static int o_inflate_every = 1;

/* state */
static conn_t *conns;
static int epfd;
static char *rbuf;
static int n_open, n_failed, n_closed_during;
static volatile sig_atomic_t stop_flag;
static int cur_phase = -1;     /* phase id carried in payloads, 0..254; 255 = warm-up */
static int phase_active;
static int nsend;              /* number of sender slots (msg tables) */
static msg_t *msgs;            /* nsend * RING */
static uint32_t *sent_count;   /* per sender */
static uint32_t *lastseq;      /* n * nsend */
static uint64_t deliveries, dups, ooo, stale_frames;
static uint64_t rx_bytes, n_rsv1, n_inflated; /* this phase: bytes read on open connections,
                                               * compressed messages, of them inflated */
static int n_deflate;                   /* connections that negotiated permessage-deflate */
static unsigned char *zbuf;             /* inflated payloads */
static size_t zbuf_cap;
static double *lat;            /* completion latencies, ms */
static size_t nlat, lat_cap;
static uint64_t lost_evicted;
static uint64_t n_incomplete;  /* published messages not yet at every receiver */
static int bc_waiting;         /* broadcast closed loop: a message is outstanding */
static int64_t hs_lat_cap;
static double *hs_lat;
static size_t n_hs_lat;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "loadclient: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) die("out of memory");
    return q;
}

static void on_signal(int sig) { (void)sig; stop_flag = 1; }

/* ---- CPU accounting from /proc ---- */

static double proc_cpu(int pid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return 0;
    ssize_t r = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (r <= 0) return 0;
    buf[r] = 0;
    char *p = strrchr(buf, ')');
    if (!p) return 0;
    unsigned long ut = 0, st = 0;
    /* after ')': state(3) ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime */
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2) return 0;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

/* CPU of every other process: per-pid deltas between two snapshots (a process that started
 * meanwhile counts from zero; one that exited is missed). */
typedef struct { int pid; double cpu; } pidcpu_t;
static pidcpu_t *snap_prev;
static size_t n_snap_prev;

static int cmp_pid(const void *a, const void *b) {
    return ((const pidcpu_t *)a)->pid - ((const pidcpu_t *)b)->pid;
}

static size_t take_snapshot(pidcpu_t **out) {
    DIR *d = opendir("/proc");
    size_t n = 0, cap = 256;
    pidcpu_t *v = malloc(cap * sizeof *v);
    if (!d || !v) { if (d) closedir(d); *out = v; return 0; }
    int self = getpid();
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!isdigit((unsigned char)e->d_name[0])) continue;
        int pid = atoi(e->d_name);
        if (pid == self || pid == o_watch) continue;
        if (n == cap) {
            cap *= 2;
            pidcpu_t *nv = realloc(v, cap * sizeof *v);
            if (!nv) break;
            v = nv;
        }
        v[n].pid = pid;
        v[n].cpu = proc_cpu(pid);
        n++;
    }
    closedir(d);
    qsort(v, n, sizeof *v, cmp_pid);
    *out = v;
    return n;
}

/* returns CPU seconds used by other processes since the previous call */
static double others_cpu(void) {
    pidcpu_t *cur;
    size_t n = take_snapshot(&cur);
    double total = 0;
    for (size_t k = 0; k < n; k++) {
        pidcpu_t key = {cur[k].pid, 0};
        pidcpu_t *p = snap_prev ? bsearch(&key, snap_prev, n_snap_prev, sizeof key, cmp_pid) : NULL;
        double d = cur[k].cpu - (p ? p->cpu : 0);
        if (d > 0) total += d;
    }
    free(snap_prev);
    snap_prev = cur;
    n_snap_prev = n;
    return total;
}

static double self_cpu(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

/* ---- output buffering per connection ---- */

static void set_events(int i) {
    conn_t *c = &conns[i];
    int want = c->wlen > c->woff || c->state == ST_CONNECTING;
    if (want == c->want_out) return;
    struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.u32 = (uint32_t)i};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = want;
}

static void conn_fail(int i);

static void flush_conn(int i) {
    conn_t *c = &conns[i];
    while (c->woff < c->wlen) {
        ssize_t w = send(c->fd, c->wbuf + c->woff, c->wlen - c->woff, MSG_NOSIGNAL);
        if (w > 0) {
            c->woff += (size_t)w;
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else {
            conn_fail(i);
            return;
        }
    }
    if (c->woff == c->wlen) c->woff = c->wlen = 0;
    set_events(i);
}

static void queue_bytes(int i, const char *data, size_t len) {
    conn_t *c = &conns[i];
    if (c->state == ST_CLOSED) return;
    if (c->wlen == c->woff) {
        /* nothing pending: try to write straight away */
        ssize_t w = send(c->fd, data, len, MSG_NOSIGNAL);
        if (w == (ssize_t)len) return;
        if (w < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) { conn_fail(i); return; }
            w = 0;
        }
        data += w;
        len -= (size_t)w;
        c->wlen = c->woff = 0;
    }
    if (c->wlen + len > c->wcap) {
        c->wcap = (c->wlen + len) * 2;
        c->wbuf = xrealloc(c->wbuf, c->wcap);
    }
    memcpy(c->wbuf + c->wlen, data, len);
    c->wlen += len;
    set_events(i);
}

/* client frame, mask key 0 */
static void send_frame(int i, int opcode, const char *payload, size_t len) {
    char hdr[14];
    size_t h = 0;
    hdr[h++] = (char)(0x80 | opcode);
    if (len < 126) {
        hdr[h++] = (char)(0x80 | len);
    } else if (len < 65536) {
        hdr[h++] = (char)(0x80 | 126);
        hdr[h++] = (char)(len >> 8);
        hdr[h++] = (char)len;
    } else {
        hdr[h++] = (char)(0x80 | 127);
        for (int k = 7; k >= 0; k--) hdr[h++] = (char)((uint64_t)len >> (8 * k));
    }
    memset(hdr + h, 0, 4);
    h += 4;
    conn_t *c = &conns[i];
    if (c->wlen == c->woff && len < 8192) {
        char tmp[8192 + 14];
        memcpy(tmp, hdr, h);
        memcpy(tmp + h, payload, len);
        queue_bytes(i, tmp, h + len);
    } else {
        queue_bytes(i, hdr, h);
        queue_bytes(i, payload, len);
    }
}

/* ---- payloads ---- */

static const char HEX[] = "0123456789abcdef";

static const char *const WORDS[] = {
    "the", "deploy", "is", "done", "please", "check", "latency", "build", "green", "order", "shipped",
    "payment", "received", "user", "joined", "left", "room", "message", "typing", "online", "away",
    "status", "update", "price", "quote", "alert", "cpu", "memory", "disk", "queue", "depth", "error",
    "warning", "info", "region", "eu", "us", "asia", "node", "pod", "ready", "failed", "retry", "ok"};
#define N_WORDS (sizeof WORDS / sizeof WORDS[0])

/* --filler text: JSON-like records ({'id':..,'user':..,'text':..,'ms':..,'ok':..},) from a
 * xorshift stream seeded by the message, cut at `len` bytes; no '"', '\\' or '#'. */
static void text_filler(char *out, size_t len, uint32_t seed) {
    uint32_t x = seed * 2654435761u;
    if (!x) x = 1;
#define NEXT() (x ^= x << 13, x ^= x >> 17, x ^= x << 5, x)
    char rec[160];
    size_t done = 0;
    while (done < len) {
        uint32_t k = NEXT();
        uint32_t id = NEXT() % 100000, user = NEXT() % 1000, ms = NEXT() % 1000;
        int n = snprintf(rec, sizeof rec, "{'id':%u,'user':'user_%u','text':'%s %s %s','ms':%u,'ok':%s},", id, user,
                         WORDS[k % N_WORDS], WORDS[(k >> 8) % N_WORDS], WORDS[(k >> 16) % N_WORDS], ms,
                         (k & 1) ? "true" : "false");
        size_t take = (size_t)n < len - done ? (size_t)n : len - done;
        memcpy(out + done, rec, take);
        done += take;
    }
#undef NEXT
}

static size_t build_msg(char *out, const char *type, int phase, int sender, uint32_t seq, int size) {
    size_t n = (size_t)sprintf(out, "{\"type\":\"%s\",\"content\":\"#", type);
    char *p = out + n;
    p[0] = HEX[(phase >> 4) & 15];
    p[1] = HEX[phase & 15];
    for (int k = 0; k < 4; k++) p[2 + k] = HEX[(sender >> (12 - 4 * k)) & 15];
    for (int k = 0; k < 8; k++) p[6 + k] = HEX[(seq >> (28 - 4 * k)) & 15];
    p += 14;
    int pad = size - 15;
    if (pad > 0) {
        if (o_text_filler) text_filler(p, (size_t)pad, (uint32_t)sender << 24 ^ seq ^ (uint32_t)phase << 16);
        else memset(p, 'x', (size_t)pad);
        p += pad;
    }
    memcpy(p, "\"}", 2);
    p += 2;
    return (size_t)(p - out);
}

static int hexval(char ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    return -1;
}

static int parse_marker(const char *m, size_t avail, int *phase, int *sender, uint32_t *seq) {
    if (avail < 15) return 0;
    uint32_t v[14];
    for (int k = 0; k < 14; k++) {
        int h = hexval(m[1 + k]);
        if (h < 0) return 0;
        v[k] = (uint32_t)h;
    }
    *phase = (int)(v[0] << 4 | v[1]);
    *sender = (int)(v[2] << 12 | v[3] << 8 | v[4] << 4 | v[5]);
    uint32_t s = 0;
    for (int k = 6; k < 14; k++) s = s << 4 | v[k];
    *seq = s;
    return 1;
}

static void lat_push(double ms) {
    if (nlat == lat_cap) {
        lat_cap = lat_cap ? lat_cap * 2 : 65536;
        lat = xrealloc(lat, lat_cap * sizeof *lat);
    }
    lat[nlat++] = ms;
}

/* ---- inbound ---- */

static void on_delivery(int i, int sender, uint32_t seq, int64_t t) {
    if (sender >= nsend) { stale_frames++; return; }
    msg_t *m = &msgs[(size_t)sender * RING + (seq & (RING - 1))];
    if (m->seq != seq) { stale_frames++; return; }
    deliveries++;
    uint32_t *ls = &lastseq[(size_t)i * nsend + sender];
    if (seq == *ls) dups++;
    else if (seq < *ls) ooo++;
    else *ls = seq;
    m->count++;
    m->last = t;
    if (m->count == m->expected) {
        n_incomplete--;
        lat_push((double)(m->last - m->sent) / 1e6);
        if (o_mode == M_BROADCAST) bc_waiting = 0;
    }
}

static void send_echo(int i);

static void on_text(int i, const char *p, size_t len, int64_t t) {
    const char *m = memchr(p, '#', len < 256 ? len : 256);
    if (!m) {
        if (len < 200 && memmem(p, len, "\"ping\"", 6)) send_frame(i, 1, "{\"type\":\"pong\"}", 15);
        return;
    }
    int phase, sender;
    uint32_t seq;
    if (!parse_marker(m, len - (size_t)(m - p), &phase, &sender, &seq)) return;
    if (o_mode == M_ECHO) {
        conn_t *c = &conns[i];
        if (phase == cur_phase && seq == c->echo_seq) {
            deliveries++;
            lat_push((double)(t - c->echo_sent) / 1e6);
            c->echo_seq = 0;
            if (phase_active) send_echo(i);
        } else {
            stale_frames++;
        }
        return;
    }
    if (phase != cur_phase) { stale_frames++; return; }
    on_delivery(i, sender, seq, t);
}

/* A compressed message (one frame: this server's and the stock ones' messages here are never
 * fragmented) inflated into zbuf; dies on a stream error, which no server under test may cause. */
static const char *inflate_message(int i, const char *payload, size_t len, int fin, size_t *out_len) {
    conn_t *c = &conns[i];
    if (!c->deflate) die("connection %d: a compressed frame without permessage-deflate", i);
    if (!fin) die("connection %d: a fragmented compressed message (not supported by the load client)", i);
    if (!c->inf) {
        c->inf = calloc(1, sizeof *c->inf);
        if (!c->inf || inflateInit2(c->inf, -15) != Z_OK) die("inflateInit2 failed");
    }
    static const unsigned char tail[4] = {0, 0, 0xff, 0xff};
    size_t n = 0;
    for (int part = 0; part < 2; part++) {
        c->inf->next_in = part ? (unsigned char *)tail : (unsigned char *)payload;
        c->inf->avail_in = part ? 4 : (uInt)len;
        while (c->inf->avail_in) {
            if (zbuf_cap - n < 65536) {
                zbuf_cap = zbuf_cap ? zbuf_cap * 2 : 1 << 20;
                zbuf = xrealloc(zbuf, zbuf_cap);
            }
            c->inf->next_out = zbuf + n;
            c->inf->avail_out = (uInt)(zbuf_cap - n);
            int r = inflate(c->inf, Z_SYNC_FLUSH);
            n = (size_t)(c->inf->next_out - zbuf);
            if (r != Z_OK && r != Z_BUF_ERROR && r != Z_STREAM_END) die("connection %d: inflate: %d", i, r);
            if (r == Z_BUF_ERROR && c->inf->avail_out) break;
        }
    }
    if (c->z_reset) inflateReset(c->inf);
    n_inflated++;
    *out_len = n;
    return (const char *)zbuf;
}

/* Parses complete frames in buf; returns bytes consumed. */
static size_t parse_frames(int i, const char *buf, size_t len, int64_t t) {
    size_t off = 0;
    while (len - off >= 2) {
        const unsigned char *b = (const unsigned char *)buf + off;
        int opcode = b[0] & 15;
        int masked = b[1] & 0x80;
        uint64_t plen = b[1] & 0x7f;
        size_t h = 2;
        if (plen == 126) {
            if (len - off < 4) break;
            plen = (uint64_t)b[2] << 8 | b[3];
            h = 4;
        } else if (plen == 127) {
            if (len - off < 10) break;
            plen = 0;
            for (int k = 0; k < 8; k++) plen = plen << 8 | b[2 + k];
            h = 10;
        }
        if (masked) h += 4;
        if (len - off < h + plen) break;
        const char *payload = buf + off + h;
        switch (opcode) {
        case 0: case 1: case 2:
            if (b[0] & 0x40) {
                n_rsv1++;
                if (o_mode == M_BROADCAST && o_inflate_every > 1 && i % o_inflate_every && plen > 64) {
                    on_delivery(i, 0, sent_count[0], t); /* closed loop: the one outstanding */
                    break;
                }
                size_t zn;
                const char *plain = inflate_message(i, payload, (size_t)plen, b[0] & 0x80, &zn);
                on_text(i, plain, zn, t);
            } else {
                on_text(i, payload, (size_t)plen, t);
            }
            break;
        case 8:
            if (conns[i].state == ST_OPEN && !stop_flag) n_closed_during++;
            conn_fail(i);
            return len;
        case 9:
            send_frame(i, 10, payload, (size_t)plen);
            break;
        default:
            break;
        }
        off += h + (size_t)plen;
    }
    return off;
}

static void conn_fail(int i) {
    conn_t *c = &conns[i];
    if (c->state == ST_CLOSED) return;
    if (c->state == ST_OPEN) n_open--;
    else n_failed++;
    c->state = ST_CLOSED;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    struct linger lg = {1, 0};
    setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(c->fd);
    c->fd = -1;
    if (c->inf) {
        inflateEnd(c->inf);
        free(c->inf);
        c->inf = NULL;
    }
    free(c->pend);
    c->pend = NULL;
    c->plen = c->pcap = 0;
}

static void handle_handshake(int i, const char *data, size_t len, int64_t t) {
    conn_t *c = &conns[i];
    if (c->plen + len > c->pcap) {
        c->pcap = c->plen + len + 256;
        c->pend = xrealloc(c->pend, c->pcap);
    }
    memcpy(c->pend + c->plen, data, len);
    c->plen += len;
    char *end = memmem(c->pend, c->plen, "\r\n\r\n", 4);
    if (!end) {
        if (c->plen > 16384) conn_fail(i);
        return;
    }
    if (c->plen < 12 || memcmp(c->pend, "HTTP/1.1 101", 12) != 0) {
        conn_fail(i);
        return;
    }
    c->state = ST_OPEN;
    n_open++;
    *end = 0; /* the response head as a string: its extension answer */
    if (o_deflate && strcasestr(c->pend, "\r\nsec-websocket-extensions:") && strstr(c->pend, "permessage-deflate")) {
        c->deflate = 1;
        c->z_reset = strstr(c->pend, "server_no_context_takeover") != NULL;
        n_deflate++;
    }
    if ((size_t)n_hs_lat < (size_t)hs_lat_cap) hs_lat[n_hs_lat++] = (double)(t - c->t_start) / 1e6;
    size_t hl = (size_t)(end + 4 - c->pend);
    size_t rest = c->plen - hl;
    memmove(c->pend, c->pend + hl, rest);
    c->plen = rest;
    if (rest) {
        size_t used = parse_frames(i, c->pend, c->plen, t);
        if (c->state == ST_CLOSED) return;
        memmove(c->pend, c->pend + used, c->plen - used);
        c->plen -= used;
    }
}

static void on_readable(int i, int64_t t) {
    conn_t *c = &conns[i];
    for (;;) {
        ssize_t r = recv(c->fd, rbuf, RBUF_SIZE, 0);
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            if (errno == EINTR) continue;
            if (c->state == ST_OPEN && !stop_flag) n_closed_during++;
            conn_fail(i);
            return;
        }
        if (r == 0) {
            if (c->state == ST_OPEN && !stop_flag) n_closed_during++;
            conn_fail(i);
            return;
        }
        if (c->state == ST_OPEN) rx_bytes += (uint64_t)r;
        if (c->state == ST_HANDSHAKE) {
            handle_handshake(i, rbuf, (size_t)r, t);
        } else if (c->plen == 0) {
            size_t used = parse_frames(i, rbuf, (size_t)r, t);
            if (c->state == ST_CLOSED) return;
            if (used < (size_t)r) {
                size_t rest = (size_t)r - used;
                if (rest > c->pcap) {
                    c->pcap = rest + 4096;
                    c->pend = xrealloc(c->pend, c->pcap);
                }
                memcpy(c->pend, rbuf + used, rest);
                c->plen = rest;
            }
        } else {
            if (c->plen + (size_t)r > c->pcap) {
                c->pcap = (c->plen + (size_t)r) * 2;
                c->pend = xrealloc(c->pend, c->pcap);
            }
            memcpy(c->pend + c->plen, rbuf, (size_t)r);
            c->plen += (size_t)r;
            size_t used = parse_frames(i, c->pend, c->plen, t);
            if (c->state == ST_CLOSED) return;
            memmove(c->pend, c->pend + used, c->plen - used);
            c->plen -= used;
        }
        if (c->state == ST_CLOSED) return;
        if ((size_t)r < RBUF_SIZE) return;
    }
}

static void start_handshake(int i) {
    conn_t *c = &conns[i];
    char path[512], req[1024];
    const char *ph = strstr(o_path, "{i}");
    if (ph) snprintf(path, sizeof path, "%.*s%d%s", (int)(ph - o_path), o_path, i, ph + 3);
    else snprintf(path, sizeof path, "%s", o_path);
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n%s\r\n",
                     path, o_host, o_port,
                     o_deflate ? "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" : "");
    c->state = ST_HANDSHAKE;
    queue_bytes(i, req, (size_t)n);
}

static void on_event(uint32_t idx, uint32_t events, int64_t t) {
    conn_t *c = &conns[idx];
    if (c->state == ST_CLOSED) return;
    if (c->state == ST_CONNECTING) {
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err || (events & (EPOLLERR | EPOLLHUP))) { conn_fail((int)idx); return; }
        start_handshake((int)idx);
        set_events((int)idx);
        return;
    }
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable((int)idx, t);
    if (c->state != ST_CLOSED && (events & EPOLLOUT)) flush_conn((int)idx);
}

static int poll_once(int timeout_ms) {
    static struct epoll_event evs[MAX_EVENTS];
    int n = epoll_wait(epfd, evs, MAX_EVENTS, timeout_ms);
    if (n <= 0) return 0;
    int64_t t = now_ns();
    for (int k = 0; k < n; k++) on_event(evs[k].data.u32, evs[k].events, t);
    return n;
}

static int poll_until(int64_t deadline) {
    static struct epoll_event evs[MAX_EVENTS];
    int64_t now = now_ns();
    if (now >= deadline) return poll_once(0);
    struct timespec ts = {(deadline - now) / 1000000000LL, (deadline - now) % 1000000000LL};
    int n = epoll_pwait2(epfd, evs, MAX_EVENTS, &ts, NULL);
    if (n <= 0) return 0;
    int64_t t = now_ns();
    for (int k = 0; k < n; k++) on_event(evs[k].data.u32, evs[k].events, t);
    return n;
}

/* ---- connecting ---- */

static int open_socket(int i) {
    conn_t *c = &conns[i];
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket: %s", strerror(errno));
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (o_src > 1) {
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl(0x7f000001u + (uint32_t)(i % o_src));
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) die("bind: %s", strerror(errno));
    }
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons((uint16_t)o_port)};
    inet_pton(AF_INET, o_host, &dst.sin_addr);
    c->fd = fd;
    c->t_start = now_ns();
    c->want_out = 1;
    c->state = ST_CONNECTING;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = (uint32_t)i};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl: %s", strerror(errno));
    int r = connect(fd, (struct sockaddr *)&dst, sizeof dst);
    if (r < 0 && errno != EINPROGRESS) { conn_fail(i); return 0; }
    return 1;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double *v, size_t n, double p) {
    if (!n) return -1;
    size_t k = (size_t)(p / 100.0 * (double)(n - 1) + 0.5);
    if (k >= n) k = n - 1;
    return v[k];
}

static void connect_all(void) {
    hs_lat_cap = o_n;
    hs_lat = xrealloc(NULL, (size_t)o_n * sizeof *hs_lat);
    int64_t t0 = now_ns();
    int64_t deadline = t0 + (int64_t)(o_connect_timeout * 1e9);
    int next = 0;
    while (n_open + n_failed < o_n && now_ns() < deadline && !stop_flag) {
        int pending = next - n_open - n_failed;
        while (next < o_n && pending < o_conc) {
            open_socket(next++);
            pending++;
        }
        poll_once(5);
    }
    int64_t t1 = now_ns();
    for (int i = 0; i < o_n; i++)
        if (conns[i].state != ST_OPEN && conns[i].state != ST_CLOSED) conn_fail(i);
    qsort(hs_lat, n_hs_lat, sizeof *hs_lat, cmp_double);
    double secs = (double)(t1 - t0) / 1e9;
    printf("{\"event\":\"connected\",\"n\":%d,\"open\":%d,\"failed\":%d,\"secs\":%.4f,\"rate\":%.1f,"
           "\"hs_p50_ms\":%.3f,\"hs_p99_ms\":%.3f,\"hs_max_ms\":%.3f,\"deflate\":%d}\n",
           o_n, n_open, n_failed, secs, n_open / (secs > 0 ? secs : 1e-9), pct(hs_lat, n_hs_lat, 50),
           pct(hs_lat, n_hs_lat, 99), n_hs_lat ? hs_lat[n_hs_lat - 1] : -1, n_deflate);
    fflush(stdout);
}

/* ---- phases ---- */

static void reset_phase(int senders) {
    nsend = senders;
    free(msgs);
    free(sent_count);
    free(lastseq);
    msgs = calloc((size_t)nsend * RING, sizeof *msgs);
    sent_count = calloc((size_t)nsend, sizeof *sent_count);
    lastseq = calloc((size_t)o_n * (size_t)nsend, sizeof *lastseq);
    if (!msgs || !sent_count || !lastseq) die("out of memory");
    deliveries = dups = ooo = stale_frames = lost_evicted = n_incomplete = 0;
    rx_bytes = n_rsv1 = n_inflated = 0;
    nlat = 0;
    bc_waiting = 0;
    cur_phase = (cur_phase + 1) % 255;
}

static char *msgbuf;

static void publish(int sender, int size, const char *type) {
    if (conns[sender].state != ST_OPEN) return;
    uint32_t seq = ++sent_count[sender];
    msg_t *m = &msgs[(size_t)sender * RING + (seq & (RING - 1))];
    if (m->seq && m->count < m->expected) {
        lost_evicted += m->expected - m->count;
        n_incomplete--;
    }
    m->seq = seq;
    m->expected = (uint32_t)(n_open - 1);
    if (m->expected) n_incomplete++;
    m->count = 0;
    m->sent = now_ns();
    m->last = 0;
    size_t len = build_msg(msgbuf, type, cur_phase, sender, seq, size);
    send_frame(sender, 1, msgbuf, len);
}

static void send_echo(int i) {
    conn_t *c = &conns[i];
    if (c->state != ST_OPEN) return;
    uint32_t seq = ++sent_count[0];
    c->echo_seq = seq;
    c->echo_sent = now_ns();
    size_t len = build_msg(msgbuf, "message", cur_phase, 0, seq, o_sizes[0]);
    send_frame(i, 1, msgbuf, len);
}

static uint64_t count_lost(void) {
    uint64_t lost = lost_evicted;
    for (int s = 0; s < nsend; s++) {
        for (uint32_t k = 0; k < RING; k++) {
            msg_t *m = &msgs[(size_t)s * RING + k];
            if (m->seq && m->count < m->expected) lost += m->expected - m->count;
        }
    }
    return lost;
}

static uint64_t incomplete_msgs(void) {
    uint64_t n = 0;
    for (size_t k = 0; k < (size_t)nsend * RING; k++)
        if (msgs[k].seq && msgs[k].count < msgs[k].expected) n++;
    return n;
}

static int all_complete(void) { return n_incomplete == 0; }

static void report_phase(const char *mode, int run, int size, double rate, double secs, uint64_t msgs_sent,
                         double cpu_srv, double cpu_cli, double cpu_oth, int receivers) {
    qsort(lat, nlat, sizeof *lat, cmp_double);
    uint64_t lost = o_mode == M_ECHO ? 0 : count_lost();
    uint64_t incomplete = o_mode == M_ECHO ? 0 : incomplete_msgs();
    if (o_mode == M_ECHO) {
        for (int i = 0; i < o_n; i++) if (conns[i].echo_seq) lost++;
    }
    printf("{\"event\":\"phase\",\"mode\":\"%s\",\"run\":%d,\"size\":%d,\"rate\":%.1f,\"receivers\":%d,"
           "\"open\":%d,\"secs\":%.4f,\"msgs\":%llu,\"completed\":%zu,\"deliveries\":%llu,\"dps\":%.1f,"
           "\"p50_ms\":%.3f,\"p90_ms\":%.3f,\"p99_ms\":%.3f,\"max_ms\":%.3f,\"lost\":%llu,\"incomplete\":%llu,"
           "\"dup\":%llu,\"ooo\":%llu,\"stale\":%llu,\"closed\":%d,\"server_cpu\":%.3f,\"client_cpu\":%.3f,"
           "\"other_cpu\":%.3f,\"rx_bytes\":%llu,\"compressed\":%llu,\"inflated\":%llu}\n",
           mode, run, size, rate, receivers, n_open, secs, (unsigned long long)msgs_sent, nlat,
           (unsigned long long)deliveries, deliveries / secs, pct(lat, nlat, 50), pct(lat, nlat, 90),
           pct(lat, nlat, 99), nlat ? lat[nlat - 1] : -1, (unsigned long long)lost,
           (unsigned long long)incomplete, (unsigned long long)dups, (unsigned long long)ooo,
           (unsigned long long)stale_frames, n_closed_during, cpu_srv, cpu_cli, cpu_oth,
           (unsigned long long)rx_bytes, (unsigned long long)n_rsv1, (unsigned long long)n_inflated);
    fflush(stdout);
}

static void announce(const char *mode, int run, int size, double rate) {
    printf("{\"event\":\"phase_start\",\"mode\":\"%s\",\"run\":%d,\"size\":%d,\"rate\":%.1f}\n", mode, run,
           size, rate);
    fflush(stdout);
}

static void warmup(void) {
    /* one broadcast from connection 0 that everyone must see: every server has registered all */
    for (int attempt = 0; attempt < 10 && !stop_flag; attempt++) {
        reset_phase(1);
        publish(0, 16, "broadcast");
        int64_t dl = now_ns() + 3000000000LL;
        while (!all_complete() && now_ns() < dl && !stop_flag) poll_once(10);
        if (all_complete()) return;
    }
    fprintf(stderr, "loadclient: warm-up broadcast did not reach every connection\n");
}

static void run_broadcast(void) {
    warmup();
    for (int si = 0; si < o_nsizes; si++) {
        for (int run = 0; run < o_runs && !stop_flag; run++) {
            reset_phase(1);
            announce("broadcast", run, o_sizes[si], 0);
            double c0s = o_watch ? proc_cpu(o_watch) : 0, c0c = self_cpu(); others_cpu();
            int64_t t0 = now_ns(), end = t0 + (int64_t)(o_duration * 1e9);
            uint64_t sent = 0;
            int receivers = n_open - 1;
            while (!stop_flag) {
                int64_t t = now_ns();
                if (!bc_waiting) {
                    if (t >= end) break;
                    publish(0, o_sizes[si], "broadcast");
                    sent++;
                    bc_waiting = 1;
                }
                msg_t *m = &msgs[sent_count[0] & (RING - 1)];
                if (t - m->sent > (int64_t)(o_msg_timeout * 1e9)) { bc_waiting = 0; break; }
                poll_once(100);
            }
            int64_t t1 = now_ns();
            double c1s = o_watch ? proc_cpu(o_watch) : 0, c1c = self_cpu(), c1o = others_cpu();
            report_phase("broadcast", run, o_sizes[si], 0, (double)(t1 - t0) / 1e9, sent, c1s - c0s, c1c - c0c,
                         c1o, receivers);
        }
    }
}

static void run_chat(void) {
    if (o_senders > n_open) o_senders = n_open;
    warmup();
    for (int ri = 0; ri < o_nrates; ri++) {
        for (int run = 0; run < o_runs && !stop_flag; run++) {
            reset_phase(o_senders);
            double rate = o_rates[ri];
            announce("chat", run, o_sizes[0], rate);
            double c0s = o_watch ? proc_cpu(o_watch) : 0, c0c = self_cpu(); others_cpu();
            int64_t t0 = now_ns(), end = t0 + (int64_t)(o_duration * 1e9);
            uint64_t k = 0;
            int receivers = n_open - 1;
            while (!stop_flag) {
                int64_t t = now_ns();
                if (t >= end) break;
                int64_t next = t0 + (int64_t)((double)k * 1e9 / rate);
                while (next <= t && next < end) {
                    publish((int)(k % (uint64_t)o_senders), o_sizes[0], "broadcast");
                    k++;
                    next = t0 + (int64_t)((double)k * 1e9 / rate);
                }
                poll_until(next < end ? next : end);
            }
            int64_t t_send_end = now_ns();
            int64_t dl = t_send_end + (int64_t)(o_grace * 1e9);
            while (!all_complete() && now_ns() < dl && !stop_flag) poll_once(5);
            double c1s = o_watch ? proc_cpu(o_watch) : 0, c1c = self_cpu(), c1o = others_cpu();
            /* k messages span k/rate seconds of the schedule (the first goes at t0): rate the run on that */
            double window = k ? (double)k / rate : (double)(t_send_end - t0) / 1e9;
            report_phase("chat", run, o_sizes[0], rate, window, k, c1s - c0s, c1c - c0c,
                         c1o, receivers);
            /* drain stragglers so the next run starts clean */
            int64_t quiet = now_ns() + 200000000LL;
            while (now_ns() < quiet) poll_once(10);
        }
    }
}

static void run_echo(void) {
    for (int run = 0; run < o_runs && !stop_flag; run++) {
        reset_phase(1);
        for (int i = 0; i < o_n; i++) conns[i].echo_seq = 0;
        announce("echo", run, o_sizes[0], 0);
        double c0s = o_watch ? proc_cpu(o_watch) : 0, c0c = self_cpu(); others_cpu();
        int64_t t0 = now_ns(), end = t0 + (int64_t)(o_duration * 1e9);
        phase_active = 1;
        for (int i = 0; i < o_n; i++) send_echo(i);
        while (now_ns() < end && !stop_flag) poll_once(10);
        phase_active = 0;
        int64_t t1 = now_ns();
        int64_t dl = t1 + 2000000000LL;
        for (;;) {
            int out = 0;
            for (int i = 0; i < o_n; i++) if (conns[i].state == ST_OPEN && conns[i].echo_seq) out++;
            if (!out || now_ns() >= dl) break;
            poll_once(10);
        }
        double c1s = o_watch ? proc_cpu(o_watch) : 0, c1c = self_cpu(), c1o = others_cpu();
        report_phase("echo", run, o_sizes[0], 0, (double)(t1 - t0) / 1e9, sent_count[0], c1s - c0s, c1c - c0c,
                     c1o, n_open);
    }
}

static void run_idle(void) {
    int64_t end = o_hold > 0 ? now_ns() + (int64_t)(o_hold * 1e9) : INT64_MAX;
    reset_phase(1);
    while (!stop_flag && now_ns() < end) poll_once(100);
    printf("{\"event\":\"idle_end\",\"open\":%d,\"closed\":%d}\n", n_open, n_closed_during);
    fflush(stdout);
}

static void close_all(void) {
    static const char close_payload[2] = {0x03, (char)0xe8};
    stop_flag = 1;
    for (int i = 0; i < o_n; i++)
        if (conns[i].state == ST_OPEN) send_frame(i, 8, close_payload, 2);
    int64_t dl = now_ns() + 300000000LL;
    while (n_open > 0 && now_ns() < dl) poll_once(10);
    for (int i = 0; i < o_n; i++) {
        if (conns[i].state != ST_CLOSED) {
            if (conns[i].state != ST_OPEN) n_failed--; /* not a failure: we are stopping */
            conn_fail(i);
        }
    }
}

static int parse_list_int(const char *s, int *out, int max) {
    int n = 0;
    while (*s && n < max) {
        out[n++] = atoi(s);
        s = strchr(s, ',');
        if (!s) break;
        s++;
    }
    return n;
}

static int parse_list_double(const char *s, double *out, int max) {
    int n = 0;
    while (*s && n < max) {
        out[n++] = atof(s);
        s = strchr(s, ',');
        if (!s) break;
        s++;
    }
    return n;
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadclient --port P [--host 127.0.0.1] [--path '/ws?user=u{i}'] -n N [--src K]\n"
            "  --mode broadcast|chat|echo|idle [--sizes 64,4096] [--rates 100,200] [--senders 10]\n"
            "  [--duration S] [--runs R] [--grace S] [--hold S] [--watch-pid PID] [--concurrency C]\n"
            "  [--deflate 0|1] [--inflate-every K] [--filler x|text]\n");
    exit(2);
}

int main(int argc, char **argv) {
    for (int a = 1; a < argc; a++) {
        const char *k = argv[a];
        if (a + 1 >= argc) usage();
        const char *v = argv[++a];
        if (!strcmp(k, "--host")) o_host = v;
        else if (!strcmp(k, "--port")) o_port = atoi(v);
        else if (!strcmp(k, "--path")) o_path = v;
        else if (!strcmp(k, "-n")) o_n = atoi(v);
        else if (!strcmp(k, "--src")) o_src = atoi(v);
        else if (!strcmp(k, "--mode")) {
            if (!strcmp(v, "broadcast")) o_mode = M_BROADCAST;
            else if (!strcmp(v, "chat")) o_mode = M_CHAT;
            else if (!strcmp(v, "echo")) o_mode = M_ECHO;
            else if (!strcmp(v, "idle")) o_mode = M_IDLE;
            else usage();
        } else if (!strcmp(k, "--sizes")) o_nsizes = parse_list_int(v, o_sizes, 16);
        else if (!strcmp(k, "--rates")) o_nrates = parse_list_double(v, o_rates, 64);
        else if (!strcmp(k, "--senders")) o_senders = atoi(v);
        else if (!strcmp(k, "--duration")) o_duration = atof(v);
        else if (!strcmp(k, "--runs")) o_runs = atoi(v);
        else if (!strcmp(k, "--grace")) o_grace = atof(v);
        else if (!strcmp(k, "--hold")) o_hold = atof(v);
        else if (!strcmp(k, "--watch-pid")) o_watch = atoi(v);
        else if (!strcmp(k, "--concurrency")) o_conc = atoi(v);
        else if (!strcmp(k, "--connect-timeout")) o_connect_timeout = atof(v);
        else if (!strcmp(k, "--msg-timeout")) o_msg_timeout = atof(v);
        else if (!strcmp(k, "--deflate")) o_deflate = atoi(v);
        else if (!strcmp(k, "--inflate-every")) o_inflate_every = atoi(v);
        else if (!strcmp(k, "--filler")) {
            if (!strcmp(v, "text")) o_text_filler = 1;
            else if (strcmp(v, "x")) usage();
        } else usage();
    }
    if (o_n < 1 || o_src < 1 || o_src > 250 || o_nsizes < 1 || o_conc < 1 || o_inflate_every < 1) usage();
    for (int k = 0; k < o_nsizes; k++) {
        if (o_sizes[k] < 15) o_sizes[k] = 15;
        if (o_sizes[k] > 1 << 20) usage();
    }
    if (o_mode == M_CHAT && (o_nrates < 1 || o_senders < 1)) usage();

    /* descriptors: one per connection, plus stdio, epoll and one /proc file at a time (32 is
     * ample); ask for 1 024 spare, but up to the hard limit only where that cannot be raised
     * (a host whose hard limit is 20 000 still runs 19 000 connections) */
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rlim_t want = (rlim_t)o_n + 1024, need = (rlim_t)o_n + 32;
    if (rl.rlim_cur < want) {
        struct rlimit up = {want, rl.rlim_max < want ? want : rl.rlim_max};
        if (setrlimit(RLIMIT_NOFILE, &up) < 0) {
            if (rl.rlim_max < need)
                die("%d connections need %lu descriptors; RLIMIT_NOFILE's hard limit is %lu", o_n,
                    (unsigned long)need, (unsigned long)rl.rlim_max);
            rl.rlim_cur = rl.rlim_max;
            if (setrlimit(RLIMIT_NOFILE, &rl) < 0) die("setrlimit(RLIMIT_NOFILE, %lu): %s", (unsigned long)rl.rlim_max, strerror(errno));
        }
    }
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    conns = calloc((size_t)o_n, sizeof *conns);
    rbuf = malloc(RBUF_SIZE);
    int maxsize = 0;
    for (int k = 0; k < o_nsizes; k++) if (o_sizes[k] > maxsize) maxsize = o_sizes[k];
    msgbuf = malloc((size_t)maxsize + 128);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (!conns || !rbuf || !msgbuf || epfd < 0) die("init failed");
    for (int i = 0; i < o_n; i++) conns[i].fd = -1;

    connect_all();
    if (n_open < 2 && o_mode != M_IDLE && o_mode != M_ECHO) die("only %d connections open", n_open);
    switch (o_mode) {
    case M_BROADCAST: run_broadcast(); break;
    case M_CHAT: run_chat(); break;
    case M_ECHO: run_echo(); break;
    case M_IDLE: run_idle(); break;
    }
    close_all();
    return 0;
}
