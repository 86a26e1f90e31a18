/* permessage-deflate: the compressed encoding of a frame, made once; pooled inflaters
 * (deflate.h). */
/* Linux only, with the engine that uses it: elsewhere the module builds without zlib. */
#ifdef __linux__
#include "deflate.h"

#include <stdlib.h>
#include <string.h>

/* zlib's default level: on independent messages it keeps 5-20% more of the gain than level 1
 * (9 KB of JSON: 20.5% against 24.6% of the original) for twice the CPU, and a broadcast pays
 * it once (README "Compression" has the figures). */
#define WSM_DEFLATE_LEVEL 6
#define WSM_DEFLATE_MEMLEVEL 8
/* A raw deflate stream of the largest window: valid for any receiver as long as the message
 * is no longer than the receiver's window (see wsm_z_encoding). */
#define WSM_DEFLATE_BITS 15

/* ---- outbound ---------------------------------------------------------------------------- */

/* A compressor made on first use: *state 0 not made yet, 1 ready, -1 zlib refused. */
static int wsm_z_ready(z_stream *def, int *state)
{
    if (*state == 0) {
        memset(def, 0, sizeof(*def));
        *state = deflateInit2(def, WSM_DEFLATE_LEVEL, Z_DEFLATED, -WSM_DEFLATE_BITS,
                              WSM_DEFLATE_MEMLEVEL, Z_DEFAULT_STRATEGY) == Z_OK ? 1 : -1;
    }
    return *state == 1 ? 0 : -1;
}

/* The compressed frame of a payload by the compressor def (reset afterwards when `alone`),
 * NULL when it would not be smaller or memory is short. The header's room is reserved at its
 * largest (10 bytes) and the output moved down to the header's real size once the compressed
 * length is known. */
static wsm_frame *wsm_z_compress(z_stream *def, int alone, unsigned b0, const uint8_t *p,
                                 size_t len)
{
    if (len > UINT32_MAX)
        return NULL;
    uLong bound = deflateBound(def, (uLong)len) + 16; /* + the sync flush's empty block */
    wsm_frame *f = wsm_frame_alloc(10 + bound);
    if (f == NULL)
        return NULL;
    def->next_in = (Bytef *)(uintptr_t)p;
    def->avail_in = (uInt)len;
    def->next_out = f->data + 10;
    def->avail_out = (uInt)bound;
    int r = deflate(def, Z_SYNC_FLUSH);
    size_t out = bound - def->avail_out;
    if (alone)
        deflateReset(def);
    /* RFC 7692 7.2.1: the sync flush's trailing 00 00 ff ff is not sent */
    if (r != Z_OK || def->avail_in != 0 || out < 4 || memcmp(f->data + 10 + out - 4,
                                                             "\x00\x00\xff\xff", 4) != 0) {
        wsm_frame_decref(f);
        return NULL;
    }
    out -= 4;
    if (out >= len) {
        wsm_frame_decref(f);
        return NULL;
    }
    size_t hl = wsm_frame_header_len(out);
    memmove(f->data + hl, f->data + 10, out);
    wsm_frame_put_header(f->data, b0 | 0x40u, out); /* RSV1: a compressed message */
    f->len = hl + out;
    wsm_frame *g = realloc(f, sizeof(*f) + f->len); /* the bound's slack goes back */
    if (g != NULL) {
        f = g;
        f->cap = f->len;
    }
    return f;
}

wsm_frame *wsm_z_encoding(wsm_zhost *z, wsm_frame *f, unsigned bits, size_t threshold, int *made)
{
    const uint8_t *p;
    size_t len = wsm_frame_payload(f, &p);
    *made = 0;
    if (len < threshold || len == 0 || (bits < WSM_DEFLATE_BITS && len > ((size_t)1 << bits)))
        return f;
    if (!f->z_tried) {
        f->z_tried = 1;
        if (wsm_z_ready(&z->def, &z->def_state) == 0)
            f->z = wsm_z_compress(&z->def, 1, f->data[0], p, len);
        *made = f->z != NULL;
    }
    return f->z != NULL ? f->z : f;
}

/* ---- shared contexts (deflate.h) --------------------------------------------------------- */

/* The same set in any order gives the same key: a sum of mixed handles (splitmix64's finaliser). */
static uint64_t wsm_z_set_key(const uint64_t *handles, size_t n)
{
    uint64_t key = n;
    for (size_t i = 0; i < n; i++) {
        uint64_t x = handles[i] + 0x9e3779b97f4a7c15ull;
        x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
        x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
        key += x ^ (x >> 31);
    }
    return key;
}

void wsm_z_fan_begin(wsm_zhost *z, wsm_frame *f, const uint64_t *handles, size_t n,
                     size_t threshold)
{
    const uint8_t *p;
    size_t len = wsm_frame_payload(f, &p);
    memset(&z->fan, 0, sizeof(z->fan));
    if (n < 2 || len == 0 || len < threshold)
        return; /* one receiver gains nothing from a stream; under the threshold all go plain */
    uint64_t key = wsm_z_set_key(handles, n);
    z->fan.key = key;
    for (unsigned i = 0; i < WSM_ZSTREAMS; i++) { /* the set's own stream, if it has one */
        wsm_zstream *t = &z->streams[i];
        if (t->used != 0 && t->key == key) {
            z->fan.s = t;
            z->fan.prev = t->last;
            break;
        }
    }
    z->fan.f = f;
    z->fan.id = ++z->ids;
}

/* A set without a stream takes over the least recently used one, only once a receiver that
 * can follow it asks (a fan-out nobody could follow evicts nobody). */
static wsm_zstream *wsm_z_fan_stream(wsm_zhost *z)
{
    wsm_zfan *fan = &z->fan;
    if (fan->s == NULL) {
        wsm_zstream *s = &z->streams[0];
        for (unsigned i = 1; i < WSM_ZSTREAMS; i++)
            if (z->streams[i].used < s->used)
                s = &z->streams[i];
        s->key = fan->key;
        s->last = 0;
        fan->s = s;
        fan->prev = 0;
    }
    fan->s->used = ++z->fans;
    return fan->s;
}

/* The stream's encoding of the fan-out's message, made once; NULL turns the stream off for it.
 * A keyframe is compressed from a fresh start, so it also serves as f's independent encoding. */
static wsm_frame *wsm_z_fan_encoding(wsm_zhost *z, wsm_frame *f, int *made)
{
    wsm_zfan *fan = &z->fan;
    if (fan->tried)
        return fan->enc;
    fan->tried = 1;
    wsm_z_fan_stream(z);
    if (wsm_z_ready(&fan->s->def, &fan->s->state) < 0)
        return NULL;
    if (fan->prev == 0)
        deflateReset(&fan->s->def);
    const uint8_t *p;
    size_t len = wsm_frame_payload(f, &p);
    fan->enc = wsm_z_compress(&fan->s->def, 0, f->data[0], p, len);
    *made = fan->enc != NULL;
    if (fan->enc != NULL && fan->prev == 0 && !f->z_tried) {
        f->z_tried = 1;
        f->z = fan->enc;
        wsm_frame_incref(f->z);
    }
    return fan->enc;
}

wsm_frame *wsm_z_encoding_for(wsm_zhost *z, wsm_frame *f, unsigned bits, uint64_t *sync,
                              size_t threshold, int *made)
{
    wsm_zfan *fan = &z->fan;
    *made = 0;
    unsigned window = bits & 15u;
    int follows = fan->f == f && (bits & WSM_Z_TAKEOVER) && window == WSM_DEFLATE_BITS;
    if (follows && (fan->prev == 0 || *sync == fan->prev)) {
        wsm_frame *enc = wsm_z_fan_encoding(z, f, made);
        if (enc != NULL) {
            *sync = fan->id;
            fan->in_sync++;
            return enc;
        }
    }
    int again = 0;
    wsm_frame *e = wsm_z_encoding(z, f, window, threshold, &again);
    *made |= again;
    if (e != f) { /* the peer's window now holds a message no stream has */
        *sync = 0;
        if (follows)
            fan->behind++;
    }
    return e;
}

size_t wsm_z_fan_end(wsm_zhost *z)
{
    wsm_zfan *fan = &z->fan;
    size_t shared = fan->in_sync;
    if (fan->f == NULL)
        return 0;
    wsm_zstream *s = fan->s;
    if (s == NULL)
        goto out; /* nobody could follow a stream: none was taken */
    if (fan->tried) { /* the stream took the message: its receivers follow it, or it starts afresh */
        s->last = fan->enc != NULL ? fan->id : 0;
        s->run = fan->prev == 0 ? 1 : s->run + 1;
    }
    /* too many left behind, or some for too long: the next message brings all of them back */
    if (fan->behind * 4 > fan->in_sync + fan->behind ||
        (fan->behind && s->run >= WSM_ZSTREAM_RUN))
        s->last = 0; /* also when none was in sync: else the stream would never start again */
out:
    if (fan->enc != NULL)
        wsm_frame_decref(fan->enc);
    memset(fan, 0, sizeof(*fan));
    return shared;
}

/* ---- inbound ----------------------------------------------------------------------------- */

/* zlib's allocations of one inflater, counted (its charge is checked against them). */
static voidpf wsm_z_alloc(voidpf opaque, uInt items, uInt size)
{
    wsm_inflater *i = opaque;
    if (size && items > (SIZE_MAX - sizeof(size_t)) / size)
        return NULL;
    size_t n = (size_t)items * size;
    size_t *p = malloc(n + sizeof(size_t));
    if (p == NULL)
        return NULL;
    *p = n;
    i->bytes += n;
    return p + 1;
}

static void wsm_z_dealloc(voidpf opaque, voidpf address)
{
    wsm_inflater *i = opaque;
    size_t *p = (size_t *)address - 1;
    i->bytes -= *p;
    free(p);
}

wsm_inflater *wsm_z_take(wsm_zhost *z)
{
    wsm_inflater *i = z->pool;
    if (i != NULL) {
        z->pool = i->next;
        z->npool--;
        i->next = NULL;
        if (inflateReset(&i->z) == Z_OK)
            return i;
        inflateEnd(&i->z);
        free(i);
        return NULL;
    }
    i = calloc(1, sizeof(*i));
    if (i == NULL)
        return NULL;
    i->z.zalloc = wsm_z_alloc;
    i->z.zfree = wsm_z_dealloc;
    i->z.opaque = i;
    if (inflateInit2(&i->z, -WSM_DEFLATE_BITS) != Z_OK) { /* a 15-bit window decodes any */
        free(i);
        return NULL;
    }
    return i;
}

static void wsm_z_drop(wsm_inflater *i)
{
    inflateEnd(&i->z);
    free(i);
}

void wsm_z_give(wsm_zhost *z, wsm_inflater *i)
{
    if (i == NULL)
        return;
    if (z->npool >= WSM_INFLATE_POOL) {
        wsm_z_drop(i);
        return;
    }
    i->next = z->pool;
    z->pool = i;
    z->npool++;
}

int wsm_z_inflate(wsm_inflater *i, const uint8_t *in, size_t *n, uint8_t *out, size_t room,
                  size_t *made)
{
    size_t chunk = *n < UINT32_MAX ? *n : UINT32_MAX;
    size_t space = room < UINT32_MAX ? room : UINT32_MAX;
    i->z.next_in = (Bytef *)(uintptr_t)in;
    i->z.avail_in = (uInt)chunk;
    i->z.next_out = out;
    i->z.avail_out = (uInt)space;
    int r = inflate(&i->z, Z_SYNC_FLUSH);
    *made = space - i->z.avail_out;
    *n -= chunk - i->z.avail_in;
    if (r == Z_STREAM_END)
        return WSM_Z_END;
    if (r != Z_OK && r != Z_BUF_ERROR)
        return WSM_Z_ERROR;
    /* zlib stops only when the input is used up or the output is full */
    if (i->z.avail_out == 0)
        return WSM_Z_FULL;
    return *n ? WSM_Z_FULL : WSM_Z_OK; /* more than 4 GiB of input: call again */
}

void wsm_z_free(wsm_zhost *z)
{
    if (z->def_state == 1)
        deflateEnd(&z->def);
    z->def_state = 0;
    for (unsigned i = 0; i < WSM_ZSTREAMS; i++) {
        if (z->streams[i].state == 1)
            deflateEnd(&z->streams[i].def);
        memset(&z->streams[i], 0, sizeof(z->streams[i]));
    }
    while (z->pool != NULL) {
        wsm_inflater *i = z->pool;
        z->pool = i->next;
        wsm_z_drop(i);
    }
    z->npool = 0;
}

#endif /* __linux__ */
