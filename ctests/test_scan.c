/* The scanner ahead of wslay (csrc/scan.c), byte by byte. */
#include <string.h>

#include "ctest.h"
#include "frames.h"
#include "scan.h"

/* Offers buf to the scanner one byte at a time, the way wslay may ask for it; returns the
 * verdict where it stopped and how many bytes passed. */
static int feed_bytewise(const uint8_t *buf, size_t n, size_t *passed, wsm_scan_verdict *v)
{
    wsm_scan s = {0};
    v->result = WSM_SCAN_PASS;
    for (*passed = 0; *passed < n; (*passed)++) {
        if (wsm_scan_run(&s, buf + *passed, 1, n - *passed, v) == 0)
            break;
    }
    return v->result;
}

void test_scan_data_frames_pass(void)
{
    uint8_t buf[512];
    uint8_t pl[300];
    memset(pl, 'x', sizeof pl);
    size_t n = client_frame(buf, 1, 2, pl, 5);
    n += client_frame(buf + n, 0, 1, pl, 200);
    n += client_frame(buf + n, 1, 0, pl, 3);
    n += client_frame(buf + n, 1, 9, pl, 125);
    wsm_scan_verdict v;
    size_t passed;
    CHECK_EQ(feed_bytewise(buf, n, &passed, &v), WSM_SCAN_PASS);
    CHECK_EQ(passed, n);
    wsm_scan s = {0};
    CHECK_EQ(wsm_scan_run(&s, buf, n, n, &v), n);
    CHECK_EQ(v.result, WSM_SCAN_PASS);
}

void test_scan_close_frames(void)
{
    uint8_t buf[256], pl[130];
    wsm_scan_verdict v;
    wsm_scan s = {0};
    /* valid, with 1012 (which wslay 1.1.1 refuses) and a UTF-8 reason */
    pl[0] = 1012 >> 8, pl[1] = 1012 & 0xff;
    memcpy(pl + 2, "caf\xc3\xa9", 5);
    size_t n = client_frame(buf, 1, 8, pl, 7);
    CHECK_EQ(wsm_scan_run(&s, buf, n, n, &v), 0);
    CHECK_EQ(v.result, WSM_SCAN_CLOSE);
    CHECK_EQ(v.code, 1012);
    CHECK_EQ(v.reason_len, 5);
    CHECK(memcmp(v.reason, "caf\xc3\xa9", 5) == 0);
    /* incomplete: held, whatever wslay's buffer would have seen */
    for (size_t k = 1; k < n; k++) {
        wsm_scan s2 = {0};
        CHECK_EQ(wsm_scan_run(&s2, buf, k, k, &v), 0);
        CHECK_EQ(v.result, WSM_SCAN_HOLD);
    }
    /* judged on what has arrived even when wslay asks for fewer bytes */
    wsm_scan s3 = {0};
    CHECK_EQ(wsm_scan_run(&s3, buf, 3, n, &v), 0);
    CHECK_EQ(v.result, WSM_SCAN_CLOSE);
    /* no payload: 1005 */
    wsm_scan s4 = {0};
    n = client_frame(buf, 1, 8, pl, 0);
    wsm_scan_run(&s4, buf, n, n, &v);
    CHECK_EQ(v.result, WSM_SCAN_CLOSE);
    CHECK_EQ(v.code, 1005);
}

void test_scan_bad_close_frames(void)
{
    static const struct { uint16_t code; const char *reason; size_t len; uint16_t want; } cases[] = {
        {1000, "\xff\xfe", 2, 1007}, {1000, "\xed\xa0\x80", 3, 1007}, {1000, "\xc3", 1, 1007},
        {1000, "\xf4\x90\x80\x80", 4, 1007}, {1000, "\xc0\xaf", 2, 1007},
        {999, "", 0, 1002}, {1004, "", 0, 1002}, {1005, "", 0, 1002}, {1006, "", 0, 1002},
        {1015, "", 0, 1002}, {2999, "", 0, 1002}, {5000, "", 0, 1002},
    };
    uint8_t buf[256], pl[130];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        pl[0] = (uint8_t)(cases[i].code >> 8), pl[1] = (uint8_t)cases[i].code;
        memcpy(pl + 2, cases[i].reason, cases[i].len);
        size_t n = client_frame(buf, 1, 8, pl, 2 + cases[i].len);
        wsm_scan s = {0};
        wsm_scan_verdict v;
        wsm_scan_run(&s, buf, n, n, &v);
        CHECK_EQ(v.result, WSM_SCAN_FAIL);
        CHECK_EQ(v.code, cases[i].want);
    }
    /* one payload byte, fragmented, RSV bits, unmasked */
    uint8_t one[] = {0x88, 0x81, 1, 2, 3, 4, 0};
    uint8_t frag[] = {0x08, 0x80, 1, 2, 3, 4};
    uint8_t rsv[] = {0xC8, 0x80, 1, 2, 3, 4};
    uint8_t bare[] = {0x88, 0x00};
    const uint8_t *bad[] = {one, frag, rsv, bare};
    size_t lens[] = {sizeof one, sizeof frag, sizeof rsv, sizeof bare};
    for (size_t i = 0; i < 4; i++) {
        wsm_scan s = {0};
        wsm_scan_verdict v;
        wsm_scan_run(&s, bad[i], lens[i], lens[i], &v);
        CHECK_EQ(v.result, WSM_SCAN_FAIL);
        CHECK_EQ(v.code, 1002);
    }
}

void test_scan_bad_lengths(void)
{
    uint8_t top[] = {0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0};
    uint8_t long16[] = {0x82, 0xFF, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF};
    uint8_t short7[] = {0x82, 0xFE, 0, 125};
    uint8_t ping[] = {0x89, 0xFE};
    uint8_t fragping[] = {0x09, 0x80};
    const uint8_t *bad[] = {top, long16, short7, ping, fragping};
    size_t lens[] = {sizeof top, sizeof long16, sizeof short7, sizeof ping, sizeof fragping};
    for (size_t i = 0; i < 5; i++) {
        /* in one piece and byte by byte: judged as soon as the length is known */
        wsm_scan s = {0};
        wsm_scan_verdict v;
        size_t ok = wsm_scan_run(&s, bad[i], lens[i], lens[i], &v);
        CHECK_EQ(v.result, WSM_SCAN_FAIL);
        CHECK_EQ(v.code, 1002);
        CHECK(ok < lens[i]);
        wsm_scan s2 = {0};
        size_t k = 0;
        for (; k < lens[i]; k++) {
            if (wsm_scan_run(&s2, bad[i] + k, 1, 1, &v) == 0)
                break;
        }
        CHECK_EQ(v.result, WSM_SCAN_FAIL);
        CHECK_EQ(k, lens[i] - 1);
    }
    /* the shortest encodings pass */
    uint8_t ok16[] = {0x82, 0xFE, 0, 126, 1, 2, 3, 4};
    wsm_scan s = {0};
    wsm_scan_verdict v;
    CHECK_EQ(wsm_scan_run(&s, ok16, sizeof ok16, sizeof ok16, &v), sizeof ok16);
    CHECK_EQ(v.result, WSM_SCAN_PASS);
    CHECK_EQ(s.left, 126);
}

void test_scan_frame_over_the_limit(void)
{
    /* a 63-bit length far above the limit, mask key, no payload: refused at once */
    uint8_t big[] = {0x82, 0xFF, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3, 4};
    wsm_scan s = {.max_payload = 1 << 20};
    wsm_scan_verdict v;
    wsm_scan_run(&s, big, sizeof big, sizeof big, &v);
    CHECK_EQ(v.result, WSM_SCAN_FAIL);
    CHECK_EQ(v.code, 1009);
    /* at the limit it passes; control frames are judged by their own rule */
    uint8_t ok[] = {0x82, 0xFE, 0x01, 0x00, 1, 2, 3, 4};
    wsm_scan s2 = {.max_payload = 256};
    CHECK_EQ(wsm_scan_run(&s2, ok, sizeof ok, sizeof ok, &v), sizeof ok);
    CHECK_EQ(v.result, WSM_SCAN_PASS);
}

void test_utf8(void)
{
    CHECK(wsm_utf8_valid((const uint8_t *)"", 0));
    CHECK(wsm_utf8_valid((const uint8_t *)"h\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80", 10));
    CHECK(!wsm_utf8_valid((const uint8_t *)"\xe2\x82", 2));
    CHECK(!wsm_utf8_valid((const uint8_t *)"\xe0\x80\x80", 3));  /* overlong */
    CHECK(!wsm_utf8_valid((const uint8_t *)"\xed\xbf\xbf", 3));  /* surrogate */
    CHECK(!wsm_utf8_valid((const uint8_t *)"\xf8\x88\x80\x80\x80", 5));
    CHECK(wsm_close_code_valid(1000) && wsm_close_code_valid(1014) && wsm_close_code_valid(4999));
    CHECK(!wsm_close_code_valid(1004) && !wsm_close_code_valid(1015) && !wsm_close_code_valid(0));
}
