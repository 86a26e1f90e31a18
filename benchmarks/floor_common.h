/* floor_common.h — the shared body of the two floor servers (floor_onesend.c, floor_coalesce.c).
 *
 * A minimal single-threaded epoll WebSocket server: just enough RFC 6455 for the benchmarks
 * (handshake, masked client frames, text/close/ping, unfragmented messages) and the benchmark
 * app's protocol:
 *   {"type":"broadcast","content":C}  ->  {"type": "broadcast", "content": C} to every other
 *                                         connection (the frame is encoded once)
 *   {"type":"message","content":C}    ->  {"type": "message", "content": C} back to the sender
 *   anything else                     ->  ignored
 * A plain HTTP request gets a small 200 JSON answer ({"connections": N}).
 *
 * FLOOR_COALESCE 0: one send() per receiver per frame, straight away (the queue is used only
 * when the socket is full). FLOOR_COALESCE 1: frames are appended to each receiver's queue and
 * every dirty queue is written with one send() at the end of the loop iteration.
 *
 * usage: floor_xxx PORT [HOST]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_QUEUE (64u << 20)
#define MAX_IN (1u << 20)

typedef struct {
    int open;        /* handshake done */
    int used;
    int pos;         /* index in the open list */
    int dirty;
    int want_out;
    unsigned char *in;
    size_t ilen, icap;
    unsigned char *out;
    size_t olen, ooff, ocap;
} fconn_t;

static fconn_t *fc;
static int nfc;
static int *open_list;
static int n_openl;
static int *dirty_list;
static int n_dirty;
static int epfd;
static volatile sig_atomic_t stopping;

static void on_term(int s) { (void)s; stopping = 1; }

/* ---- SHA-1 and base64 for Sec-WebSocket-Accept ---- */

static uint32_t rol(uint32_t x, int n) { return x << n | x >> (32 - n); }

static void sha1(const unsigned char *msg, size_t len, unsigned char out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t total = ((len + 8) / 64 + 1) * 64;
    unsigned char *buf = calloc(total, 1);
    if (!buf) abort();
    memcpy(buf, msg, len);
    buf[len] = 0x80;
    uint64_t bits = (uint64_t)len * 8;
    for (int k = 0; k < 8; k++) buf[total - 1 - k] = (unsigned char)(bits >> (8 * k));
    for (size_t off = 0; off < total; off += 64) {
        uint32_t w[80];
        for (int t = 0; t < 16; t++)
            w[t] = (uint32_t)buf[off + 4 * t] << 24 | (uint32_t)buf[off + 4 * t + 1] << 16 |
                   (uint32_t)buf[off + 4 * t + 2] << 8 | buf[off + 4 * t + 3];
        for (int t = 16; t < 80; t++) w[t] = rol(w[t - 3] ^ w[t - 8] ^ w[t - 14] ^ w[t - 16], 1);
        uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
        for (int t = 0; t < 80; t++) {
            uint32_t f, k;
            if (t < 20) { f = (b & c) | (~b & d); k = 0x5A827999; }
            else if (t < 40) { f = b ^ c ^ d; k = 0x6ED9EBA1; }
            else if (t < 60) { f = (b & c) | (b & d) | (c & d); k = 0x8F1BBCDC; }
            else { f = b ^ c ^ d; k = 0xCA62C1D6; }
            uint32_t tmp = rol(a, 5) + f + e + k + w[t];
            e = d; d = c; c = rol(b, 30); b = a; a = tmp;
        }
        h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e;
    }
    free(buf);
    for (int k = 0; k < 5; k++) {
        out[4 * k] = (unsigned char)(h[k] >> 24);
        out[4 * k + 1] = (unsigned char)(h[k] >> 16);
        out[4 * k + 2] = (unsigned char)(h[k] >> 8);
        out[4 * k + 3] = (unsigned char)h[k];
    }
}

static void base64(const unsigned char *in, size_t len, char *out) {
    static const char T[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < len; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < len ? (uint32_t)in[i + 1] << 8 : 0) |
                     (i + 2 < len ? in[i + 2] : 0);
        out[o++] = T[v >> 18 & 63];
        out[o++] = T[v >> 12 & 63];
        out[o++] = i + 1 < len ? T[v >> 6 & 63] : '=';
        out[o++] = i + 2 < len ? T[v & 63] : '=';
    }
    out[o] = 0;
}

/* ---- connections ---- */

static void arm(int fd) {
    fconn_t *c = &fc[fd];
    int want = c->olen > c->ooff;
    if (want == c->want_out) return;
    struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.fd = fd};
    epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev);
    c->want_out = want;
}

static void drop(int fd) {
    fconn_t *c = &fc[fd];
    if (!c->used) return;
    if (c->open) {
        int last = open_list[--n_openl];
        open_list[c->pos] = last;
        fc[last].pos = c->pos;
    }
    epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    free(c->in);
    free(c->out);
    int dirty = c->dirty;
    memset(c, 0, sizeof *c);
    c->dirty = dirty; /* the dirty list skips unused entries */
}

static int append_out(int fd, const void *data, size_t len) {
    fconn_t *c = &fc[fd];
    if (c->olen - c->ooff + len > MAX_QUEUE) { drop(fd); return -1; }
    if (c->ooff && c->ooff == c->olen) c->ooff = c->olen = 0;
    if (c->olen + len > c->ocap) {
        if (c->ooff) {
            memmove(c->out, c->out + c->ooff, c->olen - c->ooff);
            c->olen -= c->ooff;
            c->ooff = 0;
        }
        if (c->olen + len > c->ocap) {
            size_t cap = c->ocap ? c->ocap : 4096;
            while (cap < c->olen + len) cap *= 2;
            unsigned char *p = realloc(c->out, cap);
            if (!p) abort();
            c->out = p;
            c->ocap = cap;
        }
    }
    memcpy(c->out + c->olen, data, len);
    c->olen += len;
    return 0;
}

/* one send() of whatever is queued */
static void flush_once(int fd) {
    fconn_t *c = &fc[fd];
    if (c->olen > c->ooff) {
        ssize_t w = send(fd, c->out + c->ooff, c->olen - c->ooff, MSG_NOSIGNAL);
        if (w > 0) c->ooff += (size_t)w;
        else if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) { drop(fd); return; }
        if (c->ooff == c->olen) c->ooff = c->olen = 0;
    }
    arm(fd);
}

/* Delivers one encoded frame to fd. */
static void deliver(int fd, const unsigned char *frame, size_t len) {
    fconn_t *c = &fc[fd];
#if FLOOR_COALESCE
    if (append_out(fd, frame, len) < 0) return;
    if (!c->dirty) {
        c->dirty = 1;
        dirty_list[n_dirty++] = fd;
    }
#else
    if (c->olen == c->ooff) {
        ssize_t w = send(fd, frame, len, MSG_NOSIGNAL);
        if (w == (ssize_t)len) return;
        if (w < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) { drop(fd); return; }
            w = 0;
        }
        frame += w;
        len -= (size_t)w;
    }
    if (append_out(fd, frame, len) < 0) return;
    arm(fd);
#endif
}

static size_t encode_header(unsigned char *h, int opcode, size_t len) {
    size_t n = 0;
    h[n++] = (unsigned char)(0x80 | opcode);
    if (len < 126) {
        h[n++] = (unsigned char)len;
    } else if (len < 65536) {
        h[n++] = 126;
        h[n++] = (unsigned char)(len >> 8);
        h[n++] = (unsigned char)len;
    } else {
        h[n++] = 127;
        for (int k = 7; k >= 0; k--) h[n++] = (unsigned char)((uint64_t)len >> (8 * k));
    }
    return n;
}

static unsigned char *framebuf;
static size_t framecap;

/* {"type": "<type>", "content": "<content>"} as one text frame in framebuf */
static size_t build_frame(const char *type, const unsigned char *content, size_t clen) {
    size_t tlen = strlen(type);
    size_t plen = 10 + tlen + 15 + clen + 2;
    if (plen + 14 > framecap) {
        framecap = (plen + 14) * 2;
        framebuf = realloc(framebuf, framecap);
        if (!framebuf) abort();
    }
    size_t h = encode_header(framebuf, 1, plen);
    unsigned char *p = framebuf + h;
    memcpy(p, "{\"type\": \"", 10); p += 10;
    memcpy(p, type, tlen); p += tlen;
    memcpy(p, "\", \"content\": \"", 15); p += 15;
    memcpy(p, content, clen); p += clen;
    memcpy(p, "\"}", 2); p += 2;
    return (size_t)(p - framebuf);
}

static void on_message(int fd, unsigned char *p, size_t len) {
    unsigned char *k = memmem(p, len, "\"content\"", 9);
    if (!k) return;
    unsigned char *q = k + 9, *end = p + len;
    while (q < end && (*q == ' ' || *q == ':')) q++;
    if (q >= end || *q != '"') return;
    q++;
    unsigned char *e = memchr(q, '"', (size_t)(end - q));
    if (!e) return;
    int is_bc = memmem(p, (size_t)(k - p), "\"broadcast\"", 11) != NULL;
    int is_msg = !is_bc && memmem(p, (size_t)(k - p), "\"message\"", 9) != NULL;
    if (is_bc) {
        size_t n = build_frame("broadcast", q, (size_t)(e - q));
        for (int i = 0; i < n_openl; i++) {
            int r = open_list[i];
            if (r != fd) deliver(r, framebuf, n);
        }
    } else if (is_msg) {
        size_t n = build_frame("message", q, (size_t)(e - q));
        deliver(fd, framebuf, n);
    }
}

static void handshake(int fd) {
    fconn_t *c = &fc[fd];
    unsigned char *end = memmem(c->in, c->ilen, "\r\n\r\n", 4);
    if (!end) {
        if (c->ilen > 16384) drop(fd);
        return;
    }
    *end = 0;
    char *key = NULL;
    for (char *line = strstr((char *)c->in, "\r\n"); line; line = strstr(line + 2, "\r\n")) {
        if (!strncasecmp(line + 2, "Sec-WebSocket-Key:", 18)) {
            key = line + 20;
            while (*key == ' ') key++;
            break;
        }
    }
    size_t hl = (size_t)(end + 4 - c->in);
    if (!key) {
        char body[64], resp[256];
        int bl = snprintf(body, sizeof body, "{\"connections\": %d}", n_openl);
        int rl = snprintf(resp, sizeof resp,
                          "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s", bl,
                          body);
        append_out(fd, resp, (size_t)rl);
        memmove(c->in, c->in + hl, c->ilen - hl);
        c->ilen -= hl;
        flush_once(fd);
        return;
    }
    char *kend = strstr(key, "\r\n");
    size_t klen = kend ? (size_t)(kend - key) : strlen(key);
    while (klen && key[klen - 1] == ' ') klen--;
    unsigned char cat[128], dig[20];
    if (klen > 60) { drop(fd); return; }
    memcpy(cat, key, klen);
    memcpy(cat + klen, "258EAFA5-E914-47DA-95CA-C5AB0DC85B11", 36);
    sha1(cat, klen + 36, dig);
    char acc[32], resp[256];
    base64(dig, 20, acc);
    int rl = snprintf(resp, sizeof resp,
                      "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Accept: %s\r\n\r\n", acc);
    memmove(c->in, c->in + hl, c->ilen - hl);
    c->ilen -= hl;
    c->open = 1;
    c->pos = n_openl;
    open_list[n_openl++] = fd;
    if (append_out(fd, resp, (size_t)rl) < 0) return;
    flush_once(fd);
}

/* parses complete client frames from c->in */
static void frames(int fd) {
    fconn_t *c = &fc[fd];
    size_t off = 0;
    while (c->used && c->ilen - off >= 2) {
        unsigned char *b = c->in + off;
        int opcode = b[0] & 15;
        if (!(b[1] & 0x80)) { drop(fd); return; }
        uint64_t plen = b[1] & 0x7f;
        size_t h = 2;
        if (plen == 126) {
            if (c->ilen - off < 4) break;
            plen = (uint64_t)b[2] << 8 | b[3];
            h = 4;
        } else if (plen == 127) {
            if (c->ilen - off < 10) break;
            plen = 0;
            for (int k = 0; k < 8; k++) plen = plen << 8 | b[2 + k];
            h = 10;
        }
        if (plen > MAX_IN) { drop(fd); return; }
        if (c->ilen - off < h + 4 + plen) break;
        unsigned char *mask = b + h, *p = b + h + 4;
        if (mask[0] | mask[1] | mask[2] | mask[3])
            for (uint64_t k = 0; k < plen; k++) p[k] ^= mask[k & 3];
        off += h + 4 + (size_t)plen;
        if (opcode == 1 || opcode == 2) {
            on_message(fd, p, (size_t)plen);
        } else if (opcode == 8) {
            unsigned char hdr[4];
            size_t hn = encode_header(hdr, 8, 2);
            unsigned char cl[6];
            memcpy(cl, hdr, hn);
            cl[hn] = 0x03;
            cl[hn + 1] = 0xe8;
            send(fd, cl, hn + 2, MSG_NOSIGNAL);
            drop(fd);
            return;
        } else if (opcode == 9) {
            unsigned char hdr[14];
            size_t hn = encode_header(hdr, 10, (size_t)plen);
            if (append_out(fd, hdr, hn) < 0 || append_out(fd, p, (size_t)plen) < 0) return;
            flush_once(fd);
        }
    }
    if (!c->used) return;
    memmove(c->in, c->in + off, c->ilen - off);
    c->ilen -= off;
}

static void readable(int fd) {
    fconn_t *c = &fc[fd];
    for (;;) {
        if (c->icap - c->ilen < 65536) {
            c->icap = c->icap ? c->icap * 2 : 65536;
            if (c->icap > 4 * MAX_IN) { drop(fd); return; }
            c->in = realloc(c->in, c->icap);
            if (!c->in) abort();
        }
        ssize_t r = recv(fd, c->in + c->ilen, c->icap - c->ilen, 0);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) { drop(fd); return; }
        if (r < 0) return;
        c->ilen += (size_t)r;
        if (!c->open) {
            handshake(fd);
            if (!c->used || !c->open) return;
        }
        frames(fd);
        if (!c->used) return;
        if ((size_t)r < 65536) return;
    }
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s PORT [HOST]\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]);
    const char *host = argc > 2 ? argv[2] : "127.0.0.1";
    struct rlimit rl = {200000, 200000};
    if (setrlimit(RLIMIT_NOFILE, &rl) < 0) {
        getrlimit(RLIMIT_NOFILE, &rl);
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    getrlimit(RLIMIT_NOFILE, &rl);
    nfc = (int)rl.rlim_cur;
    fc = calloc((size_t)nfc, sizeof *fc);
    open_list = calloc((size_t)nfc, sizeof *open_list);
    dirty_list = calloc((size_t)nfc, sizeof *dirty_list);
    if (!fc || !open_list || !dirty_list) abort();
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_term};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, host, &addr.sin_addr);
    if (bind(ls, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(ls, 4096) < 0) {
        perror("bind/listen");
        return 1;
    }
    epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(epfd, EPOLL_CTL_ADD, ls, &lev);
    static struct epoll_event evs[1024];
    while (!stopping) {
        int n = epoll_wait(epfd, evs, 1024, 200);
        for (int k = 0; k < n; k++) {
            int fd = evs[k].data.fd;
            if (fd == ls) {
                for (;;) {
                    int cfd = accept4(ls, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (cfd < 0) break;
                    if (cfd >= nfc) { close(cfd); continue; }
                    setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    fconn_t *c = &fc[cfd];
                    int dirty = c->dirty;
                    memset(c, 0, sizeof *c);
                    c->dirty = dirty;
                    c->used = 1;
                    struct epoll_event ev = {.events = EPOLLIN, .data.fd = cfd};
                    epoll_ctl(epfd, EPOLL_CTL_ADD, cfd, &ev);
                }
                continue;
            }
            if (!fc[fd].used) continue;
            if (evs[k].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) readable(fd);
            if (fc[fd].used && (evs[k].events & EPOLLOUT)) flush_once(fd);
        }
        /* coalescing: one send() per dirty receiver per loop iteration */
        for (int i = 0; i < n_dirty; i++) {
            int fd = dirty_list[i];
            fc[fd].dirty = 0;
            if (fc[fd].used) flush_once(fd);
        }
        n_dirty = 0;
    }
    close(ls);
    return 0;
}
