/* Frame encoding into shared buffers (see frame.h). */
#include "frame.h"

#include <stdlib.h>
#include <string.h>

/* Small runs (control frames, the 101 response) are padded so the following header/payload
 * pieces wslay emits separately land in the same buffer: one iovec instead of several. */
#define WSM_FRAME_RAW_MIN 256

wsm_frame *wsm_frame_raw(const void *bytes, size_t len)
{
    size_t cap = len < WSM_FRAME_RAW_MIN ? WSM_FRAME_RAW_MIN : len;
    wsm_frame *f = malloc(sizeof(*f) + cap);
    if (f == NULL)
        return NULL;
    f->refcnt = 1;
    f->appendable = 1;
    f->z_tried = 0;
    f->z = NULL;
    f->len = len;
    f->cap = cap;
    if (len)
        memcpy(f->data, bytes, len);
    return f;
}

size_t wsm_frame_header_len(size_t len)
{
    if (len < 126)
        return 2;
    return len <= 0xffff ? 4 : 10;
}

size_t wsm_frame_put_header(uint8_t *p, unsigned b0, size_t len)
{
    p[0] = (uint8_t)b0;
    if (len < 126) {
        p[1] = (uint8_t)len;
    } else if (len <= 0xffff) {
        p[1] = 126;
        p[2] = (uint8_t)(len >> 8);
        p[3] = (uint8_t)len;
    } else {
        p[1] = 127;
        for (int i = 0; i < 8; i++)
            p[2 + i] = (uint8_t)((uint64_t)len >> (56 - 8 * i));
    }
    return wsm_frame_header_len(len);
}

wsm_frame *wsm_frame_alloc(size_t cap)
{
    if (cap > SIZE_MAX - sizeof(wsm_frame))
        return NULL;
    wsm_frame *f = malloc(sizeof(*f) + cap);
    if (f == NULL)
        return NULL;
    f->refcnt = 1;
    f->appendable = 0;
    f->z_tried = 0;
    f->z = NULL;
    f->len = 0;
    f->cap = cap;
    return f;
}

size_t wsm_frame_payload(const wsm_frame *f, const uint8_t **p)
{
    size_t l7 = f->data[1] & 0x7f;
    size_t hl = l7 < 126 ? 2 : l7 == 126 ? 4 : 10;
    *p = f->data + hl;
    return f->len - hl;
}

wsm_frame *wsm_frame_encode(int opcode, const void *payload, size_t len)
{
    size_t hl = wsm_frame_header_len(len);
    if (len > SIZE_MAX - sizeof(wsm_frame) - hl)
        return NULL;
    wsm_frame *f = wsm_frame_alloc(hl + len);
    if (f == NULL)
        return NULL;
    f->len = hl + len;
    wsm_frame_put_header(f->data, 0x80u | ((unsigned)opcode & 0x0f), len);
    if (len)
        memcpy(f->data + hl, payload, len);
    return f;
}

void wsm_frame_decref(wsm_frame *f)
{
    if (f != NULL && --f->refcnt == 0) {
        wsm_frame_decref(f->z);
        free(f);
    }
}
