/* http_prober — event-loop freedom probe: one keep-alive HTTP/1.1 connection, GET PATH every
 * INTERVAL ms for DURATION s, one request in flight. Prints one JSON line with latency
 * percentiles measured from the moment each request is written, and the same percentiles
 * measured from each request's scheduled time (corrected for coordinated omission: a stalled
 * server delays the requests that should have been sent meanwhile).
 *
 * usage: http_prober PORT PATH DURATION_S [INTERVAL_MS] [HOST]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double *v, size_t n, double p) {
    if (!n) return -1;
    size_t k = (size_t)(p / 100.0 * (double)(n - 1) + 0.5);
    return v[k < n ? k : n - 1];
}

static int dial(const char *host, int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, host, &a.sin_addr);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* reads one response; returns 0 on success */
static int read_response(int fd, char *buf, size_t cap, int64_t deadline) {
    size_t len = 0;
    long body = -1;
    size_t hl = 0;
    for (;;) {
        if (hl && len >= hl + (size_t)body) return 0;
        int64_t left = deadline - now_ns();
        if (left <= 0) return -1;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, (int)(left / 1000000 + 1)) <= 0) return -1;
        ssize_t r = recv(fd, buf + len, cap - len - 1, 0);
        if (r <= 0) return -1;
        len += (size_t)r;
        buf[len] = 0;
        if (!hl) {
            char *e = strstr(buf, "\r\n\r\n");
            if (e) {
                hl = (size_t)(e + 4 - buf);
                char *cl = strcasestr(buf, "content-length:");
                body = cl && cl < e ? atol(cl + 15) : 0;
                if (hl + (size_t)body > cap - 1) return -1;
            }
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: http_prober PORT PATH DURATION_S [INTERVAL_MS] [HOST]\n");
        return 2;
    }
    int port = atoi(argv[1]);
    const char *path = argv[2];
    double dur = atof(argv[3]);
    double interval_ms = argc > 4 ? atof(argv[4]) : 10.0;
    const char *host = argc > 5 ? argv[5] : "127.0.0.1";
    size_t cap = (size_t)(dur * 1000 / interval_ms) + 16;
    double *lat = calloc(cap, sizeof *lat), *co = calloc(cap, sizeof *co);
    static char buf[1 << 22];
    char req[512];
    int rl = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: %s:%d\r\n\r\n", path, host, port);
    int fd = dial(host, port);
    if (fd < 0) {
        perror("connect");
        return 1;
    }
    int64_t t0 = now_ns(), end = t0 + (int64_t)(dur * 1e9), step = (int64_t)(interval_ms * 1e6);
    int64_t sched = t0;
    size_t n = 0;
    int errors = 0;
    while (n < cap) {
        int64_t t = now_ns();
        if (sched >= end) break;
        if (t < sched) {
            struct timespec ts = {(sched - t) / 1000000000LL, (sched - t) % 1000000000LL};
            nanosleep(&ts, NULL);
        }
        int64_t ts0 = now_ns();
        if (send(fd, req, (size_t)rl, MSG_NOSIGNAL) != rl || read_response(fd, buf, sizeof buf, ts0 + 10000000000LL)) {
            errors++;
            close(fd);
            fd = dial(host, port);
            if (fd < 0) break;
        } else {
            int64_t t1 = now_ns();
            lat[n] = (double)(t1 - ts0) / 1e6;
            co[n] = (double)(t1 - sched) / 1e6;
            n++;
        }
        sched += step;
    }
    if (fd >= 0) close(fd);
    qsort(lat, n, sizeof *lat, cmp);
    qsort(co, n, sizeof *co, cmp);
    printf("{\"path\":\"%s\",\"n\":%zu,\"errors\":%d,\"p50_ms\":%.3f,\"p90_ms\":%.3f,\"p99_ms\":%.3f,"
           "\"max_ms\":%.3f,\"co_p50_ms\":%.3f,\"co_p99_ms\":%.3f,\"co_max_ms\":%.3f}\n",
           path, n, errors, pct(lat, n, 50), pct(lat, n, 90), pct(lat, n, 99), n ? lat[n - 1] : -1,
           pct(co, n, 50), pct(co, n, 99), n ? co[n - 1] : -1);
    return 0;
}
