/* Why a connection ended: the one list of disconnect reasons.
 *
 * The registry counts them (get_stats()["disconnects"]), the engine reports them with every
 * disconnect event, and _core.REASONS gives Python their names in this order, so a reason added
 * here is known everywhere. Names are what users see in stats and in
 * message["wsmanager.reason"]. */
#ifndef WSM_REASONS_H
#define WSM_REASONS_H

#define WSM_REASONS(X)                   \
    X(NORMAL, "normal")                  \
    X(ABRUPT, "abrupt")                  \
    X(STALE, "stale")                    \
    X(LIMIT, "limit")                    \
    X(SLOW_CONSUMER, "slow_consumer")    \
    X(PROTOCOL_ERROR, "protocol_error")  \
    X(SHUTDOWN, "shutdown")

enum wsm_reason {
#define WSM_REASON_ENUM(name, str) WSM_R_##name,
    WSM_REASONS(WSM_REASON_ENUM)
#undef WSM_REASON_ENUM
    WSM_R_COUNT
};

static inline const char *wsm_reason_name(int r)
{
    static const char *const names[WSM_R_COUNT] = {
#define WSM_REASON_NAME(name, str) str,
        WSM_REASONS(WSM_REASON_NAME)
#undef WSM_REASON_NAME
    };
    return r >= 0 && r < WSM_R_COUNT ? names[r] : "abrupt";
}

#endif
