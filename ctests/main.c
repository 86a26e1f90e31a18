/* Runs every C unit test (make ctest); the last line is what CI reads. */
#include <stdio.h>

#include "ctest.h"

int ctest_failures;

#define TESTS(X)                                  \
    X(test_utf8)                                  \
    X(test_scan_data_frames_pass)                 \
    X(test_scan_close_frames)                     \
    X(test_scan_bad_close_frames)                 \
    X(test_scan_bad_lengths)                      \
    X(test_scan_frame_over_the_limit)             \
    X(test_conn_messages_byte_by_byte)            \
    X(test_conn_reading_pauses_and_resumes)       \
    X(test_conn_fragments_cost_what_they_weigh)   \
    X(test_conn_close_floor_byte_by_byte)         \
    X(test_conn_out_queue_accounting)             \
    X(test_deflate_fanout_compresses_once)        \
    X(test_deflate_shared_contexts)               \
    X(test_deflate_shared_context_recovers)       \
    X(test_deflate_inbound_in_bounded_memory)     \
    X(test_deflate_bomb_stops_at_the_limit)       \
    X(test_deflate_rsv1_needs_negotiation)        \
    X(test_strmap_against_a_model)                \
    X(test_timer_heap_order_and_moves)            \
    X(test_sweep_heap_due_entries)                \
    X(test_registry_limits_channels_and_sweep)

#define DECLARE(name) void name(void);
TESTS(DECLARE)

int main(void)
{
    int passed = 0, failed = 0;
#define RUN(name)                                                 \
    do {                                                          \
        int before = ctest_failures;                              \
        name();                                                   \
        int ok = ctest_failures == before;                        \
        passed += ok;                                             \
        failed += !ok;                                            \
        printf("%s %s\n", ok ? "PASS" : "FAIL", #name);           \
    } while (0);
    TESTS(RUN)
    printf("ctest: %d passed, %d failed\n", passed, failed);
    return failed != 0;
}
