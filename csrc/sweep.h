/* wsm_sweep: a binary min-heap of connection deadlines for stale detection.
 *
 * Deadlines move on every inbound message, far more often than anything expires, so entries
 * are lazy: touching a connection only updates its last_seen, and a popped entry whose real
 * deadline moved on is pushed back once. Each connection has at most one entry, so a sweep
 * costs O((expired + rescheduled) log n), never O(n). */
#ifndef WSM_SWEEP_H
#define WSM_SWEEP_H

#include <stddef.h>
#include <stdint.h>

typedef struct wsm_sweep_entry {
    int64_t deadline;
    uint32_t slot;
    uint32_t gen;
    uint32_t seq; /* the connection's heap_seq when pushed: only its latest entry counts */
} wsm_sweep_entry;

typedef struct wsm_sweep {
    wsm_sweep_entry *heap;
    size_t len;
    size_t cap;
} wsm_sweep;

void wsm_sweep_free(wsm_sweep *s);
int wsm_sweep_push(wsm_sweep *s, int64_t deadline, uint32_t slot, uint32_t gen, uint32_t seq);
/* Pops the earliest entry if its deadline is <= now. Returns 1 when one was popped. */
int wsm_sweep_pop_due(wsm_sweep *s, int64_t now, wsm_sweep_entry *out);
/* Visits every entry due at now in one pass over the array (in no particular order): judge
 * returns 0 to drop the entry, 1 to keep it (it may move e->deadline). Then restores the heap
 * order in O(n). */
typedef int (*wsm_sweep_judge)(void *ctx, wsm_sweep_entry *e);
void wsm_sweep_filter(wsm_sweep *s, int64_t now, wsm_sweep_judge judge, void *ctx);

#endif
