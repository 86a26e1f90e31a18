/* wsm_frame: an encoded WebSocket frame (or a run of raw bytes) in one refcounted buffer.
 *
 * A data frame is encoded once and the same buffer is appended to every receiver's out-queue,
 * so a fan-out costs one copy of the payload whatever the number of receivers. The refcount is
 * a plain integer on purpose: a frame is built by the event-loop thread, handed to the I/O
 * thread under the command mutex (which orders the memory), and from then on only the I/O
 * thread touches it. */
#ifndef WSM_FRAME_H
#define WSM_FRAME_H

#include <stddef.h>
#include <stdint.h>

#define WSM_OP_TEXT 0x1
#define WSM_OP_BINARY 0x2
#define WSM_OP_CLOSE 0x8
#define WSM_OP_PING 0x9
#define WSM_OP_PONG 0xA

typedef struct wsm_frame {
    uint32_t refcnt;
    uint8_t appendable; /* a private byte run (wslay output) that later bytes may extend */
    uint8_t z_tried;    /* a data frame: its compressed encoding was asked for (deflate.h) */
    struct wsm_frame *z; /* that encoding (RSV1 set), NULL when not worth it; one reference */
    size_t len;
    size_t cap;
    uint8_t data[];
} wsm_frame;

/* A raw byte run of capacity max(len, small default), with len bytes copied in. */
wsm_frame *wsm_frame_raw(const void *bytes, size_t len);
/* An unmasked server frame with FIN set: header + payload in one buffer. */
wsm_frame *wsm_frame_encode(int opcode, const void *payload, size_t len);
/* Size of the header wsm_frame_encode writes for a payload of len bytes. */
size_t wsm_frame_header_len(size_t len);
/* Writes a server frame header: b0 is the first byte (FIN, RSV, opcode). Returns its size. */
size_t wsm_frame_put_header(uint8_t *p, unsigned b0, size_t len);
/* A frame of capacity cap and length 0, to be filled by the caller. */
wsm_frame *wsm_frame_alloc(size_t cap);
/* The payload of an encoded frame (one of wsm_frame_encode's): its start, and its length. */
size_t wsm_frame_payload(const wsm_frame *f, const uint8_t **p);

static inline void wsm_frame_incref(wsm_frame *f) { f->refcnt++; }
void wsm_frame_decref(wsm_frame *f);

#endif
