/* Client frames for the tests: masked, FIN and opcode as given, 7- or 16-bit lengths. */
#ifndef WSM_CTEST_FRAMES_H
#define WSM_CTEST_FRAMES_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static inline size_t client_frame(uint8_t *out, int fin, int op, const void *payload, size_t n)
{
    static const uint8_t mask[4] = {9, 8, 7, 6};
    const uint8_t *p = payload;
    size_t i = 0;
    out[i++] = (uint8_t)((fin ? 0x80 : 0) | op);
    if (n < 126) {
        out[i++] = (uint8_t)(0x80 | n);
    } else {
        out[i++] = 0x80 | 126;
        out[i++] = (uint8_t)(n >> 8);
        out[i++] = (uint8_t)n;
    }
    memcpy(out + i, mask, 4);
    i += 4;
    for (size_t k = 0; k < n; k++)
        out[i + k] = p[k] ^ mask[k & 3];
    return i + n;
}

#endif
