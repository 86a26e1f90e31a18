/* wsm_sweep: lazy deadline heap (see sweep.h). */
#include "sweep.h"

#include <stdlib.h>

void wsm_sweep_free(wsm_sweep *s)
{
    free(s->heap);
    s->heap = NULL;
    s->len = s->cap = 0;
}

int wsm_sweep_push(wsm_sweep *s, int64_t deadline, uint32_t slot, uint32_t gen, uint32_t seq)
{
    if (s->len == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 256;
        wsm_sweep_entry *h = realloc(s->heap, cap * sizeof(*h));
        if (!h)
            return -1;
        s->heap = h;
        s->cap = cap;
    }
    size_t i = s->len++;
    wsm_sweep_entry e = {deadline, slot, gen, seq};
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (s->heap[parent].deadline <= deadline)
            break;
        s->heap[i] = s->heap[parent];
        i = parent;
    }
    s->heap[i] = e;
    return 0;
}

/* Puts last at index i, or further down where the heap order wants it. */
static void wsm_sweep_sift_down(wsm_sweep *s, size_t i, wsm_sweep_entry last)
{
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= s->len)
            break;
        if (child + 1 < s->len && s->heap[child + 1].deadline < s->heap[child].deadline)
            child++;
        if (last.deadline <= s->heap[child].deadline)
            break;
        s->heap[i] = s->heap[child];
        i = child;
    }
    s->heap[i] = last;
}

int wsm_sweep_pop_due(wsm_sweep *s, int64_t now, wsm_sweep_entry *out)
{
    if (s->len == 0 || s->heap[0].deadline > now)
        return 0;
    *out = s->heap[0];
    wsm_sweep_entry last = s->heap[--s->len];
    if (s->len)
        wsm_sweep_sift_down(s, 0, last);
    return 1;
}

void wsm_sweep_filter(wsm_sweep *s, int64_t now, wsm_sweep_judge judge, void *ctx)
{
    size_t kept = 0;
    for (size_t i = 0; i < s->len; i++) {
        wsm_sweep_entry e = s->heap[i];
        if (e.deadline > now || judge(ctx, &e))
            s->heap[kept++] = e;
    }
    s->len = kept;
    for (size_t i = kept / 2; i-- > 0;) /* Floyd's heapify */
        wsm_sweep_sift_down(s, i, s->heap[i]);
}
