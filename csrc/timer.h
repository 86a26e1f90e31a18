/* wsm_timer: a binary min-heap of per-connection deadlines for the I/O thread.
 *
 * Each connection has at most one entry: its earliest deadline (next ping, stale limit, close
 * timeout, slow-consumer limit). Traffic does not touch the heap; an expired entry is
 * re-evaluated and rescheduled, so work per tick is O(expired log n), never O(n).
 *
 * Why not the registry's heap (sweep.h): that one is lazy, with duplicates and no positions,
 * because its deadlines move on every message under a mutex another thread may want; this one
 * moves an entry in place (the connection keeps its index), because the I/O thread alone owns
 * it and must also pull deadlines earlier (a close, a slow consumer), which a lazy heap cannot
 * do without a second entry. */
#ifndef WSM_TIMER_H
#define WSM_TIMER_H

#include <stddef.h>
#include <stdint.h>

#define WSM_TIMER_NONE UINT32_MAX

typedef struct wsm_timer_entry {
    int64_t when;
    void *owner;
    uint32_t *idx; /* the owner's copy of its position, WSM_TIMER_NONE when absent */
} wsm_timer_entry;

typedef struct wsm_timer_heap {
    wsm_timer_entry *e;
    size_t n, cap;
} wsm_timer_heap;

void wsm_timer_init(wsm_timer_heap *h);
void wsm_timer_free(wsm_timer_heap *h);
/* Inserts or moves the owner's entry. Returns -1 when out of memory. */
int wsm_timer_set(wsm_timer_heap *h, void *owner, uint32_t *idx, int64_t when);
void wsm_timer_remove(wsm_timer_heap *h, uint32_t *idx);
/* The earliest deadline, or INT64_MAX when empty. */
int64_t wsm_timer_next(const wsm_timer_heap *h);
/* Pops the earliest entry if due by now; returns its owner or NULL. */
void *wsm_timer_pop_due(wsm_timer_heap *h, int64_t now);

#endif
