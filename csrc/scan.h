/* wsm_scan: the frame-boundary scanner that runs ahead of wslay 1.1.1 on a connection's inbound
 * bytes, for what wslay gets wrong. It sees every byte once, in order, just before wslay does
 * (from the connection's recv callback), and says how many of them wslay may have:
 *
 * - Close frames never reach wslay. wslay rejects the valid codes 1012-1014, answers a Close of
 *   one payload byte with a Close without a code, and checks a reason's UTF-8 afresh in each
 *   piece of its 4 096-byte read buffer (skipping two bytes each time), so a reason straddling
 *   that buffer is judged wrongly. The scanner waits for the whole Close frame, validates code
 *   and reason itself and hands the result to the connection.
 * - A data frame longer than max_payload is refused (1009) as soon as its header is complete;
 *   wslay checks only once a payload byte has arrived, so a bare header was never answered.
 * - wslay answers bad frame lengths (a 64-bit length with the top bit set, a length not in its
 *   shortest encoding) and oversized or fragmented control frames with a Close without a status
 *   code; the scanner stops there and the connection closes with 1002.
 *
 * Everything else (opcodes, RSV bits, masking, UTF-8 of text, reassembly order) is wslay's.
 * This file has no other dependency and can go, with the calls to it, once wslay is fixed. */
#ifndef WSM_SCAN_H
#define WSM_SCAN_H

#include <stddef.h>
#include <stdint.h>

/* A complete Close frame from a client: 2 header + 4 mask + 125 payload bytes. */
#define WSM_SCAN_CLOSE_MAX 131

enum wsm_scan_result {
    WSM_SCAN_PASS = 0, /* every byte may go to wslay */
    WSM_SCAN_HOLD,     /* stopped at an incomplete Close frame: keep the rest for later */
    WSM_SCAN_CLOSE,    /* stopped at a complete, valid Close frame: code and reason are set */
    WSM_SCAN_FAIL,     /* stopped at a frame the peer must be closed for, with code */
};

typedef struct wsm_scan {
    uint8_t hdr[14];
    uint8_t have;         /* header bytes of the current frame seen so far */
    uint64_t left;        /* payload bytes of the current frame still to skip */
    uint64_t max_payload; /* a data frame claiming more fails with 1009 at once (0: no limit):
                           * wslay would wait for a payload byte before judging its length */
} wsm_scan;

typedef struct wsm_scan_verdict {
    uint8_t result;     /* enum wsm_scan_result */
    uint16_t code;      /* CLOSE: the peer's code (1005 when none); FAIL: ours (1002/1007/1009) */
    uint8_t reason_len; /* CLOSE: the peer's reason, valid UTF-8 */
    uint8_t reason[123];
} wsm_scan_verdict;

/* Scans p[0..n): returns how many bytes wslay may consume now. Short of n only when *v says
 * why; the bytes from there on have not been scanned and must be offered again (HOLD) or never
 * (CLOSE, FAIL). A Close frame is judged on all `avail` (>= n) bytes at p: wslay asks for at
 * most what its buffer holds, which may end inside a Close frame that has arrived whole. */
size_t wsm_scan_run(wsm_scan *s, const uint8_t *p, size_t n, size_t avail, wsm_scan_verdict *v);

/* Strict UTF-8 (RFC 3629: no overlongs, no surrogates, nothing above U+10FFFF). */
int wsm_utf8_valid(const uint8_t *s, size_t n);

/* The close codes a peer may send (RFC 6455 7.4, with 1012-1014 from the IANA registry). */
int wsm_close_code_valid(unsigned code);

#endif
