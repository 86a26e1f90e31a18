/* The one clock: CLOCK_MONOTONIC in nanoseconds (the registry's last_seen and deadlines, the
 * engine's timers, _core.monotonic_ns()). */
#ifndef WSM_CLOCK_H
#define WSM_CLOCK_H

#include <stdint.h>
#include <time.h>

static inline int64_t wsm_clock_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

#endif
