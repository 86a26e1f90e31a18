/* The scanner ahead of wslay 1.1.1 (scan.h). */
#include "scan.h"

#include <string.h>

#define WSM_SCAN_OP_CLOSE 0x8

int wsm_utf8_valid(const uint8_t *s, size_t n)
{
    static const uint32_t min[4] = {0, 0x80, 0x800, 0x10000};
    size_t i = 0;
    while (i < n) {
        uint8_t b = s[i];
        size_t k;
        uint32_t cp;
        if (b < 0x80) {
            i++;
            continue;
        } else if ((b & 0xe0) == 0xc0) {
            k = 1, cp = b & 0x1f;
        } else if ((b & 0xf0) == 0xe0) {
            k = 2, cp = b & 0x0f;
        } else if ((b & 0xf8) == 0xf0) {
            k = 3, cp = b & 0x07;
        } else {
            return 0;
        }
        if (i + k >= n)
            return 0;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xc0) != 0x80)
                return 0;
            cp = (cp << 6) | (s[i + j] & 0x3f);
        }
        if (cp < min[k] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return 0;
        i += k + 1;
    }
    return 1;
}

int wsm_close_code_valid(unsigned code)
{
    if (code >= 3000 && code <= 4999)
        return 1;
    return code >= 1000 && code <= 1014 && code != 1004 && code != 1005 && code != 1006;
}

static size_t wsm_scan_fail(wsm_scan_verdict *v, uint16_t code, size_t at)
{
    v->result = WSM_SCAN_FAIL;
    v->code = code;
    return at;
}

/* A Close frame starts at p (n bytes available): judged whole, or HOLD until it is complete. */
static size_t wsm_scan_close(const uint8_t *p, size_t n, size_t at, wsm_scan_verdict *v)
{
    if (n < 2) {
        v->result = WSM_SCAN_HOLD;
        return at;
    }
    size_t plen = p[1] & 0x7f;
    /* fragmented, RSV bits, unmasked, too long for a control frame, or a lone code byte */
    if (!(p[0] & 0x80) || (p[0] & 0x70) || !(p[1] & 0x80) || plen > 125 || plen == 1)
        return wsm_scan_fail(v, 1002, at);
    if (n < 6 + plen) {
        v->result = WSM_SCAN_HOLD;
        return at;
    }
    uint8_t pl[125];
    for (size_t i = 0; i < plen; i++)
        pl[i] = p[6 + i] ^ p[2 + (i & 3)];
    unsigned code = plen ? ((unsigned)pl[0] << 8) | pl[1] : 1005;
    if (plen && !wsm_close_code_valid(code))
        return wsm_scan_fail(v, 1002, at);
    size_t rlen = plen ? plen - 2 : 0;
    if (!wsm_utf8_valid(pl + 2, rlen))
        return wsm_scan_fail(v, 1007, at);
    v->result = WSM_SCAN_CLOSE;
    v->code = (uint16_t)code;
    v->reason_len = (uint8_t)rlen;
    memcpy(v->reason, pl + 2, rlen);
    return at;
}

/* One more header byte of a non-Close frame: 0, or a close code when the header is one wslay
 * would answer without a status code. */
static uint16_t wsm_scan_header_byte(wsm_scan *s, uint8_t b)
{
    s->hdr[s->have++] = b;
    if (s->have < 2)
        return 0;
    uint8_t l7 = s->hdr[1] & 0x7f;
    if (s->have == 2 && (s->hdr[0] & 0x08) && (!(s->hdr[0] & 0x80) || l7 > 125))
        return 1002; /* a fragmented or oversized control frame */
    size_t ext = l7 == 126 ? 2 : l7 == 127 ? 8 : 0;
    size_t need = 2 + ext + ((s->hdr[1] & 0x80) ? 4 : 0);
    uint64_t len = l7;
    if (ext && s->have >= 2 + ext) {
        len = 0;
        for (size_t i = 0; i < ext; i++)
            len = (len << 8) | s->hdr[2 + i];
        /* RFC 6455 5.2: the minimal number of bytes, and the top bit of a 64-bit length 0;
         * judged before the mask key arrives, as wslay does */
        if (s->have == 2 + ext && ((ext == 2 && len < 126) || (ext == 8 && (len < 65536 || len >> 63))))
            return 1002;
    }
    if (s->have < need)
        return 0;
    if (s->max_payload && len > s->max_payload && !(s->hdr[0] & 0x08))
        return 1009;
    s->have = 0;
    s->left = len;
    return 0;
}

size_t wsm_scan_run(wsm_scan *s, const uint8_t *p, size_t n, size_t avail, wsm_scan_verdict *v)
{
    v->result = WSM_SCAN_PASS;
    size_t i = 0;
    while (i < n) {
        if (s->left) {
            size_t k = (uint64_t)(n - i) < s->left ? n - i : (size_t)s->left;
            i += k;
            s->left -= k;
            continue;
        }
        if (s->have == 0 && (p[i] & 0x0f) == WSM_SCAN_OP_CLOSE)
            return wsm_scan_close(p + i, avail - i, i, v);
        uint16_t code = wsm_scan_header_byte(s, p[i]);
        if (code)
            return wsm_scan_fail(v, code, i);
        i++;
    }
    return n;
}
