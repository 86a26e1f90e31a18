/* A very small C test runner: CHECK records a failure and goes on, each test is a function
 * listed in main.c. The last line is "ctest: N passed, N failed". */
#ifndef WSM_CTEST_H
#define WSM_CTEST_H

#include <stdio.h>

extern int ctest_failures;

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "  %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
            ctest_failures++;                                                         \
        }                                                                             \
    } while (0)

#define CHECK_EQ(a, b)                                                                     \
    do {                                                                                   \
        long long ctest_a_ = (long long)(a), ctest_b_ = (long long)(b);                    \
        if (ctest_a_ != ctest_b_) {                                                        \
            fprintf(stderr, "  %s:%d: %s == %s failed: %lld != %lld\n", __FILE__, __LINE__, \
                    #a, #b, ctest_a_, ctest_b_);                                           \
            ctest_failures++;                                                              \
        }                                                                                  \
    } while (0)

#endif
