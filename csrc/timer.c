/* Deadline heap of the I/O thread (see timer.h). */
#include "timer.h"

#include <stdlib.h>

void wsm_timer_init(wsm_timer_heap *h)
{
    h->e = NULL;
    h->n = h->cap = 0;
}

void wsm_timer_free(wsm_timer_heap *h)
{
    for (size_t i = 0; i < h->n; i++)
        *h->e[i].idx = WSM_TIMER_NONE;
    free(h->e);
    wsm_timer_init(h);
}

static void wsm_timer_place(wsm_timer_heap *h, size_t i, wsm_timer_entry ent)
{
    h->e[i] = ent;
    *ent.idx = (uint32_t)i;
}

static void wsm_timer_up(wsm_timer_heap *h, size_t i)
{
    wsm_timer_entry ent = h->e[i];
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (h->e[p].when <= ent.when)
            break;
        wsm_timer_place(h, i, h->e[p]);
        i = p;
    }
    wsm_timer_place(h, i, ent);
}

static void wsm_timer_down(wsm_timer_heap *h, size_t i)
{
    wsm_timer_entry ent = h->e[i];
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= h->n)
            break;
        if (c + 1 < h->n && h->e[c + 1].when < h->e[c].when)
            c++;
        if (ent.when <= h->e[c].when)
            break;
        wsm_timer_place(h, i, h->e[c]);
        i = c;
    }
    wsm_timer_place(h, i, ent);
}

int wsm_timer_set(wsm_timer_heap *h, void *owner, uint32_t *idx, int64_t when)
{
    if (*idx != WSM_TIMER_NONE) {
        size_t i = *idx;
        int64_t old = h->e[i].when;
        h->e[i].when = when;
        if (when < old)
            wsm_timer_up(h, i);
        else
            wsm_timer_down(h, i);
        return 0;
    }
    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 64;
        wsm_timer_entry *e = realloc(h->e, cap * sizeof(*e));
        if (e == NULL)
            return -1;
        h->e = e;
        h->cap = cap;
    }
    wsm_timer_entry ent = {when, owner, idx};
    h->e[h->n] = ent;
    *idx = (uint32_t)h->n;
    h->n++;
    wsm_timer_up(h, h->n - 1);
    return 0;
}

void wsm_timer_remove(wsm_timer_heap *h, uint32_t *idx)
{
    if (*idx == WSM_TIMER_NONE)
        return;
    size_t i = *idx;
    *idx = WSM_TIMER_NONE;
    h->n--;
    if (i == h->n)
        return;
    int64_t old = h->e[i].when;
    wsm_timer_place(h, i, h->e[h->n]);
    if (h->e[i].when < old)
        wsm_timer_up(h, i);
    else
        wsm_timer_down(h, i);
}

int64_t wsm_timer_next(const wsm_timer_heap *h)
{
    return h->n ? h->e[0].when : INT64_MAX;
}

void *wsm_timer_pop_due(wsm_timer_heap *h, int64_t now)
{
    if (h->n == 0 || h->e[0].when > now)
        return NULL;
    void *owner = h->e[0].owner;
    wsm_timer_remove(h, h->e[0].idx);
    return owner;
}
