/* wsm_z: permessage-deflate (RFC 7692) inside the engine; the one file that uses zlib.
 *
 * The parameters are negotiated by the handshake (wsmanager/_deflate.py, the one owner of
 * them); a connection only learns whether it compresses and the largest window its peer
 * takes for what we send (server_max_window_bits, 8-15).
 *
 * Outbound, once per message. A message compressed on its own ("independent": the host's one
 * compressor, raw deflate, a 15-bit window, reset after each message, the trailing 00 00 ff ff
 * of the sync flush removed) is valid for every receiver, whatever it negotiated and whatever
 * it received before. That encoding hangs off the plain frame (wsm_frame.z), is made the first
 * time a receiver that negotiated deflate takes the frame, and is shared by reference like the
 * plain one. A message under the threshold, or one that would not get smaller, goes plain (RSV1
 * clear), which the RFC allows at any time. A receiver whose window is smaller than a message
 * gets it plain too: a message compressed on its own refers back no further than its own length.
 *
 * Shared contexts for fan-outs. Small messages compress about half as well on their own as in
 * a stream of similar ones (a 700-byte JSON message: ~41% against ~24%), and stock servers keep
 * one context per connection. Here a fan-out's receiver set has one shared context instead
 * (wsm_zstream, at most WSM_ZSTREAMS per host; a set without one takes over the least recently
 * used one, once one of its receivers can follow a stream: sets nobody can follow evict nobody): its messages are compressed in one stream, without reset, and that encoding serves
 * every receiver "in sync" with the stream, i.e. whose peer inflated exactly the stream's
 * messages since the stream last started afresh, and nothing else. Then the peer's inflate
 * window is the stream's window, byte for byte. A connection records the id of the last stream
 * message it was given (wsm_nconn.z_sync); any other compressed message breaks that (0), plain
 * ones do not touch the peer's window. A stream's first message after a fresh start (a
 * "keyframe") is an independent encoding, valid for everybody, and brings every receiver in
 * sync; a stream starts afresh when it is new, when a compression failed, when more than a
 * quarter of a message's receivers that could follow were out of sync (connections that joined,
 * took a direct message or another set's broadcast; also when none was in sync), and after
 * WSM_ZSTREAM_RUN messages when any receiver is left out. Only receivers whose peers keep their window (we did not answer
 * server_no_context_takeover: wsm_conn_set_deflate's WSM_Z_TAKEOVER) and take a 15-bit window
 * join; the others get the independent encoding. So a broadcast still runs deflate at most twice
 * (its stream's encoding and, for receivers out of sync, the independent one), and a
 * connection holds 8 bytes for it, no compression state.
 *
 * Inbound, with state only while a compressed message is in progress. Clients are asked for
 * client_no_context_takeover, so no inflate state survives a message: a connection takes an
 * inflater from the host's pool at its message's first frame and gives it back at its end
 * (charged WSM_INFLATE_CHARGE to the connection's budget meanwhile). The caller inflates in
 * bounded steps into its reassembly buffer (wsm_z_inflate), so max_message_size holds for the
 * decompressed size: a deflate bomb is stopped at the limit without being expanded past it. */
#ifndef WSM_DEFLATE_H
#define WSM_DEFLATE_H

#include <stddef.h>
#include <stdint.h>
#include <zlib.h>

#include "frame.h"

/* What one inflater costs while a connection holds it: zlib's state (7 160 bytes) and its
 * 32 KiB window (39 928 bytes measured with a counting allocator, ctests check it), rounded up. */
#define WSM_INFLATE_CHARGE (48 * 1024)
/* Inflaters kept for reuse by the host once given back (each WSM_INFLATE_CHARGE at most). */
#define WSM_INFLATE_POOL 8
/* The most DEFLATE expands: a 258-byte match in 2 bits (1 032 : 1), plus a block's worth. */
#define WSM_INFLATE_RATIO 1032
/* Shared contexts kept by a host, each up to ~270 KiB of zlib state (level 6, memLevel 8,
 * 15-bit window) once used. */
#define WSM_ZSTREAMS 4
/* A stream with receivers out of sync starts afresh after this many messages at the latest: a
 * keyframe costs its receivers the difference between a message compressed on its own and in
 * the stream once (~17% of a 700-byte message, 0.3% over the run). */
#define WSM_ZSTREAM_RUN 64
/* In wsm_conn_set_deflate's and wsm_engine_register's bits: the peer keeps its inflate window
 * between our messages (no server_no_context_takeover answered), so it can follow a stream. */
#define WSM_Z_TAKEOVER 0x80u

typedef struct wsm_inflater {
    z_stream z;
    size_t bytes; /* what zlib allocated for it (the counting allocator) */
    struct wsm_inflater *next;
} wsm_inflater;

/* A shared context: one fan-out receiver set's compression stream. */
typedef struct wsm_zstream {
    z_stream def;
    int state;     /* 0 not made yet, 1 ready, -1 zlib refused (its fan-outs go independent) */
    uint64_t key;  /* the receiver set it follows (a hash of the fan-out's handles) */
    uint64_t last; /* the id of its last message given to a receiver; 0: start afresh next */
    uint64_t used; /* the host's fan-out count at its last use: the least recent is taken over */
    uint32_t run;  /* messages since it last started afresh */
} wsm_zstream;

/* The fan-out in progress (between wsm_z_fan_begin and wsm_z_fan_end). */
typedef struct wsm_zfan {
    wsm_frame *f;     /* its plain frame; NULL when no fan-out takes part in a stream */
    wsm_zstream *s;
    uint64_t key;     /* the receiver set's key; s NULL until a receiver follows */
    uint64_t id;      /* this message's id in the stream */
    uint64_t prev;    /* the stream's previous message (s->last at the start), 0: a keyframe */
    wsm_frame *enc;   /* its stream encoding, made for the first receiver in sync; a reference */
    uint8_t tried;    /* the stream has taken this message (enc NULL then: the stream is off) */
    size_t in_sync, behind; /* receivers given enc / the independent encoding */
} wsm_zfan;

/* A host's compression state: one compressor for independent messages, the shared contexts, a
 * pool of inflaters. Zero-initialised is a valid empty state; everything is made on first use.
 * I/O thread only. */
typedef struct wsm_zhost {
    z_stream def;
    int def_state; /* 0 not made yet, 1 ready, -1 zlib refused (compression is then off) */
    wsm_inflater *pool;
    unsigned npool;
    wsm_zstream streams[WSM_ZSTREAMS];
    wsm_zfan fan;
    uint64_t ids, fans; /* stream message ids given (0 is none), fan-outs that took part */
} wsm_zhost;

/* The encoding of the data frame f for a receiver that negotiated deflate with a window of
 * 2^bits bytes: f's compressed encoding (made now when it is the first to ask, *made set to 1)
 * or f itself. Never fails: out of memory, f goes plain. */
wsm_frame *wsm_z_encoding(wsm_zhost *z, wsm_frame *f, unsigned bits, size_t threshold, int *made);

/* A fan-out of the data frame f to the n receivers `handles` starts: from now to wsm_z_fan_end,
 * wsm_z_encoding_for gives f's receivers in sync with the set's stream its stream encoding. */
void wsm_z_fan_begin(wsm_zhost *z, wsm_frame *f, const uint64_t *handles, size_t n,
                     size_t threshold);
/* Ends it; returns how many receivers took the stream's encoding. */
size_t wsm_z_fan_end(wsm_zhost *z);
/* The encoding of data frame f for one receiver that negotiated deflate: `bits` its window and
 * flags (WSM_Z_TAKEOVER), *sync its stream position (updated). The stream encoding when f is
 * being fanned out and the receiver is in sync, else wsm_z_encoding's. *made: deflate ran. */
wsm_frame *wsm_z_encoding_for(wsm_zhost *z, wsm_frame *f, unsigned bits, uint64_t *sync,
                              size_t threshold, int *made);

/* An inflater reset for a new message, NULL when out of memory. */
wsm_inflater *wsm_z_take(wsm_zhost *z);
void wsm_z_give(wsm_zhost *z, wsm_inflater *i);

enum wsm_z_result {
    WSM_Z_OK = 0, /* every input byte consumed and every output byte it makes written */
    WSM_Z_FULL,   /* out is full and more output may follow: give more room */
    WSM_Z_END,    /* the stream ended (a block with BFINAL): what follows is ignored */
    WSM_Z_ERROR,  /* not a valid DEFLATE stream */
};

/* One step: inflates in[0..*n) into out[0..room). On return *n is what is left of the input
 * and *made what was written. */
int wsm_z_inflate(wsm_inflater *i, const uint8_t *in, size_t *n, uint8_t *out, size_t room,
                  size_t *made);

void wsm_z_free(wsm_zhost *z);

#endif
