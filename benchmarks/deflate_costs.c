/* What permessage-deflate costs and saves per message, with zlib alone (README "Compression"):
 * the figures behind the compression threshold and behind compressing every message on its own.
 *
 *   cc -O2 -o /tmp/deflate_costs benchmarks/deflate_costs.c -lz && /tmp/deflate_costs [level]
 *
 * For JSON chat messages of about 64 B ... 9 KB (a stream of 2 000 similar ones each): the
 * compressed share of the bytes and the CPU per message, compressed each on its own (deflateReset
 * before each: what the engine does, one encoding valid for every receiver) and with the context
 * kept from message to message (context takeover: one compressor per connection), best of three
 * runs; then the memory of one compressor and of one inflater (zlib's allocations, counted). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zlib.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static size_t allocated;

static voidpf count_alloc(voidpf opaque, uInt n, uInt size)
{
    (void)opaque;
    allocated += (size_t)n * size;
    return calloc(n, size);
}

static void count_free(voidpf opaque, voidpf p)
{
    (void)opaque;
    free(p);
}

static const char *const words[] = {"hello", "the",    "server",  "deploy", "is",
                                    "done",  "please", "check",   "dashboard", "latency",
                                    "ok",    "thanks", "meeting", "at",     "noon",
                                    "build", "failed", "green",   "again",  "review"};

/* One chat message of about `target` bytes. */
static size_t message(char *out, size_t target)
{
    size_t n = (size_t)sprintf(out, "{\"type\":\"message\",\"id\":%d,\"user\":\"user_%d\",\"room\":"
                                    "\"general\",\"ts\":%d,\"content\":\"",
                               rand() % 100000, rand() % 5000, 1700000000 + rand() % 100000);
    while (n + 2 < target)
        n += (size_t)sprintf(out + n, "%s ", words[rand() % 20]);
    n += (size_t)sprintf(out + n, "\"}");
    return n;
}

static size_t squeeze(z_stream *z, const char *p, size_t n, unsigned char *out, size_t cap)
{
    z->next_in = (Bytef *)(uintptr_t)p;
    z->avail_in = (uInt)n;
    z->next_out = out;
    z->avail_out = (uInt)cap;
    deflate(z, Z_SYNC_FLUSH);
    return cap - z->avail_out - 4; /* the sync flush's tail is not sent */
}

int main(int argc, char **argv)
{
    int level = argc > 1 ? atoi(argv[1]) : 6;
    static const size_t targets[] = {64, 128, 192, 256, 384, 700, 9000};
    static char msg[20000];
    static unsigned char out[40000];
    enum { N = 2000 };
    printf("zlib %s, level %d, window 15, memLevel 8\n", zlibVersion(), level);
    for (size_t t = 0; t < sizeof targets / sizeof targets[0]; t++) {
        double best_own = 1e9, best_ctx = 1e9;
        size_t raw = 0, own = 0, ctx = 0;
        for (int rep = 0; rep < 3; rep++) {
            z_stream a, b;
            memset(&a, 0, sizeof a);
            memset(&b, 0, sizeof b);
            deflateInit2(&a, level, Z_DEFLATED, -15, 8, Z_DEFAULT_STRATEGY);
            deflateInit2(&b, level, Z_DEFLATED, -15, 8, Z_DEFAULT_STRATEGY);
            srand(7);
            raw = own = ctx = 0;
            double t_own = 0, t_ctx = 0;
            for (int i = 0; i < N; i++) {
                size_t len = message(msg, targets[t]);
                raw += len;
                double t0 = now();
                deflateReset(&a);
                own += squeeze(&a, msg, len, out, sizeof out);
                double t1 = now();
                ctx += squeeze(&b, msg, len, out, sizeof out);
                t_own += t1 - t0;
                t_ctx += now() - t1;
            }
            best_own = t_own < best_own ? t_own : best_own;
            best_ctx = t_ctx < best_ctx ? t_ctx : best_ctx;
            deflateEnd(&a);
            deflateEnd(&b);
        }
        printf("message ~%5zu B: on its own %5.1f%% %7.2f us | context kept %5.1f%% %7.2f us\n",
               raw / N, 100.0 * own / raw, best_own / N * 1e6, 100.0 * ctx / raw,
               best_ctx / N * 1e6);
    }
    z_stream z;
    memset(&z, 0, sizeof z);
    z.zalloc = count_alloc;
    z.zfree = count_free;
    allocated = 0;
    deflateInit2(&z, level, Z_DEFLATED, -15, 8, Z_DEFAULT_STRATEGY);
    printf("one compressor: %zu bytes\n", allocated);
    size_t len = message(msg, 700);
    size_t clen = squeeze(&z, msg, len, out, sizeof out) + 4;
    deflateEnd(&z);
    memset(&z, 0, sizeof z);
    z.zalloc = count_alloc;
    z.zfree = count_free;
    allocated = 0;
    inflateInit2(&z, -15);
    size_t state = allocated;
    static unsigned char back[40000];
    z.next_in = out;
    z.avail_in = (uInt)clen;
    z.next_out = back;
    z.avail_out = sizeof back;
    inflate(&z, Z_SYNC_FLUSH);
    printf("one inflater: %zu bytes of state, %zu with its window\n", state, allocated);
    inflateEnd(&z);
    return 0;
}
