/* wsm_z: permessage-deflate (RFC 7692) inside the engine; the one file that uses zlib.
 *
 * The parameters are negotiated by the handshake (wsmanager/_deflate.py, the one owner of
 * them); a connection only learns whether it compresses and the largest window its peer
 * takes for what we send (server_max_window_bits, 8-15).
 *
 * Outbound, once per message. We never take over a compression context: every message is
 * compressed on its own with the host's one compressor (raw deflate, a 15-bit window, the
 * trailing 00 00 ff ff of the sync flush removed), so the same bytes are valid for every
 * receiver, whatever it negotiated. The compressed encoding hangs off the plain frame
 * (wsm_frame.z), is made the first time a receiver that negotiated deflate takes the frame, and
 * is shared by reference like the plain one: a broadcast runs deflate at most once. A message
 * under the threshold, or one that would not get smaller, goes plain (RSV1 clear), which the
 * RFC allows at any time. A receiver whose window is smaller than a message gets it plain too:
 * a message compressed on its own refers back no further than its own length.
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

typedef struct wsm_inflater {
    z_stream z;
    size_t bytes; /* what zlib allocated for it (the counting allocator) */
    struct wsm_inflater *next;
} wsm_inflater;

/* A host's compression state: one compressor, a pool of inflaters. Zero-initialised is a valid
 * empty state; everything is made on first use. I/O thread only. */
typedef struct wsm_zhost {
    z_stream def;
    int def_state; /* 0 not made yet, 1 ready, -1 zlib refused (compression is then off) */
    wsm_inflater *pool;
    unsigned npool;
} wsm_zhost;

/* The encoding of the data frame f for a receiver that negotiated deflate with a window of
 * 2^bits bytes: f's compressed encoding (made now when it is the first to ask, *made set to 1)
 * or f itself. Never fails: out of memory, f goes plain. */
wsm_frame *wsm_z_encoding(wsm_zhost *z, wsm_frame *f, unsigned bits, size_t threshold, int *made);

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
