/* Fan-out of one shared frame (see fanout.h). */
/* Linux only (epoll, eventfd); elsewhere the module builds without the engine. */
#ifdef __linux__
#include "fanout.h"

#include <stdlib.h>
#include <string.h>

#include "conn.h"

long wsm_fanout_submit(wsm_engine *e, const uint64_t *handles, size_t n, wsm_frame *f)
{
    if (n == 0) {
        wsm_frame_decref(f);
        return 0;
    }
    uint64_t *copy = malloc(n * sizeof(*copy));
    if (copy == NULL) {
        wsm_frame_decref(f);
        return -1;
    }
    memcpy(copy, handles, n * sizeof(*copy));
    wsm_cmd cmd = {.kind = WSM_CMD_FANOUT, .frame = f, .handles = copy, .n = n};
    long live = 0;
    pthread_mutex_lock(&e->lock);
    /* Counting under the lock answers "queued for how many" without a round trip to the I/O
     * thread; a receiver that dies before delivery is reported by its disconnect event. */
    for (size_t i = 0; i < n; i++)
        live += wsm_engine_slot_live(e, copy[i]);
    int wake = wsm_engine_push_locked(e, &cmd);
    pthread_mutex_unlock(&e->lock);
    if (wake < 0) {
        wsm_engine_cmd_release(&cmd);
        return 0;
    }
    if (wake)
        wsm_engine_wake(e);
    return live;
}

void wsm_fanout_deliver(wsm_engine *e, wsm_cmd *cmd)
{
    enum { AHEAD = 8 }; /* receivers' structs are scattered: start the fetch a few ahead */
    for (size_t i = 0; i < cmd->n; i++) {
        if (i + AHEAD < cmd->n) {
            uint32_t slot = (uint32_t)cmd->handles[i + AHEAD];
            if (slot < e->capconns && e->conns[slot] != NULL)
                __builtin_prefetch(e->conns[slot], 1);
        }
        wsm_nconn *c = wsm_engine_lookup(e, cmd->handles[i]);
        if (c == NULL || c->phase != WSM_CONN_OPEN) {
            wsm_counter_add(&e->st.frames_dropped, 1);
            continue;
        }
        if (wsm_conn_append(c, cmd->frame, 1) < 0)
            wsm_conn_close(c, 1011, NULL, 0, WSM_ER_ABRUPT);
    }
}

#endif /* __linux__ */
