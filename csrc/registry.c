/* wsm_registry: slots, indexes, target resolution, stale sweep (see registry.h). */
#include "registry.h"

#include <stdlib.h>
#include <string.h>

#define WSM_IS_LIVE(c) ((c)->gen & 1u)

static int wsm_grow(void **arr, uint32_t *cap, size_t elem, uint32_t need)
{
    if (need <= *cap)
        return 0;
    uint32_t ncap = *cap ? *cap : 16;
    while (ncap < need) {
        if (ncap > UINT32_MAX / 2)
            return -1;
        ncap *= 2;
    }
    void *p = realloc(*arr, (size_t)ncap * elem);
    if (!p)
        return -1;
    memset((char *)p + (size_t)*cap * elem, 0, (size_t)(ncap - *cap) * elem);
    *arr = p;
    *cap = ncap;
    return 0;
}

wsm_registry *wsm_registry_new(uint32_t initial_slots)
{
    wsm_registry *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    if (initial_slots < 16)
        initial_slots = 16;
    if (pthread_mutex_init(&r->lock, NULL) != 0) {
        free(r);
        return NULL;
    }
    r->free_head = r->users_free = r->chans_free = WSM_NONE;
    if (wsm_strmap_init(&r->ids, initial_slots) < 0 || wsm_strmap_init(&r->user_map, 16) < 0 ||
        wsm_strmap_init(&r->chan_map, 16) < 0 ||
        wsm_grow((void **)&r->conns, &r->capslots, sizeof(wsm_conn), initial_slots) < 0) {
        wsm_registry_free(r);
        return NULL;
    }
    return r;
}

void wsm_registry_free(wsm_registry *r)
{
    if (!r)
        return;
    for (uint32_t i = 0; i < r->nslots; i++) {
        free(r->conns[i].chans);
        free(r->conns[i].chanpos);
    }
    for (uint32_t i = 0; i < r->nchans_; i++)
        free(r->chans[i].members);
    free(r->conns);
    free(r->users);
    free(r->chans);
    wsm_strmap_free(&r->ids);
    wsm_strmap_free(&r->user_map);
    wsm_strmap_free(&r->chan_map);
    wsm_sweep_free(&r->sweep);
    pthread_mutex_destroy(&r->lock);
    free(r);
}

wsm_conn *wsm_registry_get(wsm_registry *r, wsm_handle h)
{
    uint32_t slot = WSM_SLOT(h);
    if (slot >= r->nslots)
        return NULL;
    wsm_conn *c = &r->conns[slot];
    return (WSM_IS_LIVE(c) && c->gen == WSM_GEN(h)) ? c : NULL;
}

int wsm_registry_find(wsm_registry *r, const char *cid, size_t len, wsm_handle *out)
{
    uint32_t slot;
    if (!wsm_strmap_get(&r->ids, cid, len, &slot))
        return WSM_ENOTFOUND;
    *out = WSM_HANDLE(slot, r->conns[slot].gen);
    return WSM_OK;
}

static int wsm_registry_alloc_slot(wsm_registry *r, uint32_t *slot)
{
    if (r->free_head != WSM_NONE) {
        *slot = r->free_head;
        r->free_head = r->conns[*slot].next_free;
        return 0;
    }
    if (wsm_grow((void **)&r->conns, &r->capslots, sizeof(wsm_conn), r->nslots + 1) < 0)
        return -1;
    *slot = r->nslots++;
    return 0;
}

static int wsm_registry_user_ref(wsm_registry *r, const char *user, size_t len, uint32_t *idx)
{
    if (wsm_strmap_get(&r->user_map, user, len, idx))
        return 0;
    uint32_t i;
    if (r->users_free != WSM_NONE) {
        i = r->users_free;
        r->users_free = r->users[i].next_free;
    } else {
        if (wsm_grow((void **)&r->users, &r->capusers, sizeof(wsm_user), r->nusers + 1) < 0)
            return -1;
        i = r->nusers++;
    }
    if (wsm_strmap_put(&r->user_map, user, len, i) < 0) {
        r->users[i].next_free = r->users_free;
        r->users_free = i;
        return -1;
    }
    wsm_user *u = &r->users[i];
    u->name = wsm_strmap_key(&r->user_map, user, len);
    u->len = (uint32_t)len;
    u->count = 0;
    u->head = WSM_NONE;
    r->live_users++;
    *idx = i;
    return 0;
}

static void wsm_registry_user_unref(wsm_registry *r, uint32_t idx)
{
    wsm_user *u = &r->users[idx];
    if (u->count)
        return;
    wsm_strmap_del(&r->user_map, u->name, u->len);
    u->name = NULL;
    u->next_free = r->users_free;
    r->users_free = idx;
    r->live_users--;
}

int wsm_registry_add(wsm_registry *r, const char *cid, size_t cid_len, const char *user,
                     size_t user_len, int has_user, uint32_t max_per_user, uint32_t max_total,
                     int64_t now, wsm_handle *out)
{
    uint32_t uidx = WSM_NONE, slot;
    if (has_user && wsm_strmap_get(&r->user_map, user, user_len, &uidx) && max_per_user &&
        r->users[uidx].count >= max_per_user)
        return WSM_ELIMIT_USER;
    if (max_total && r->live >= max_total)
        return WSM_ELIMIT_TOTAL;
    if (wsm_strmap_get(&r->ids, cid, cid_len, &slot))
        return WSM_EDUP;
    if (wsm_registry_alloc_slot(r, &slot) < 0)
        return WSM_ENOMEM;
    if (wsm_strmap_put(&r->ids, cid, cid_len, slot) < 0)
        goto fail_slot;
    if (has_user && wsm_registry_user_ref(r, user, user_len, &uidx) < 0)
        goto fail_id;

    wsm_conn *c = &r->conns[slot];
    uint32_t gen = c->gen + 1;
    memset(c, 0, sizeof(*c));
    c->gen = gen;
    c->state = WSM_CONNECTING;
    c->cid = wsm_strmap_key(&r->ids, cid, cid_len);
    c->cid_len = (uint32_t)cid_len;
    c->connected_at = c->last_seen = c->last_ping = now;
    c->user = has_user ? uidx : WSM_NONE;
    c->user_prev = c->user_next = WSM_NONE;
    if (has_user) {
        wsm_user *u = &r->users[uidx];
        c->user_next = u->head;
        if (u->head != WSM_NONE)
            r->conns[u->head].user_prev = slot;
        u->head = slot;
        u->count++;
        r->users_version++;
    }
    r->live++;
    r->total_connects++;
    *out = WSM_HANDLE(slot, gen);
    return WSM_OK;

fail_id:
    wsm_strmap_del(&r->ids, cid, cid_len);
fail_slot:
    r->conns[slot].next_free = r->free_head;
    r->free_head = slot;
    return WSM_ENOMEM;
}

static void wsm_registry_drop_membership(wsm_registry *r, uint32_t slot, uint16_t k)
{
    wsm_conn *c = &r->conns[slot];
    uint32_t idx = c->chans[k], pos = c->chanpos[k];
    wsm_channel *ch = &r->chans[idx];
    uint32_t moved = ch->members[--ch->count];
    if (pos != ch->count) {
        ch->members[pos] = moved;
        wsm_conn *m = &r->conns[moved];
        for (uint16_t j = 0; j < m->nchans; j++)
            if (m->chans[j] == idx) {
                m->chanpos[j] = pos;
                break;
            }
    }
    c->nchans--;
    c->chans[k] = c->chans[c->nchans];
    c->chanpos[k] = c->chanpos[c->nchans];
    if (ch->count == 0) {
        wsm_strmap_del(&r->chan_map, ch->name, ch->len);
        free(ch->members);
        memset(ch, 0, sizeof(*ch));
        ch->next_free = r->chans_free;
        r->chans_free = idx;
        r->live_chans--;
    }
}

int wsm_registry_remove(wsm_registry *r, wsm_handle h)
{
    wsm_conn *c = wsm_registry_get(r, h);
    if (!c)
        return WSM_ENOTFOUND;
    uint32_t slot = WSM_SLOT(h);
    while (c->nchans)
        wsm_registry_drop_membership(r, slot, c->nchans - 1);
    if (c->user != WSM_NONE) {
        wsm_user *u = &r->users[c->user];
        if (c->user_prev != WSM_NONE)
            r->conns[c->user_prev].user_next = c->user_next;
        else
            u->head = c->user_next;
        if (c->user_next != WSM_NONE)
            r->conns[c->user_next].user_prev = c->user_prev;
        u->count--;
        r->users_version++;
        wsm_registry_user_unref(r, c->user);
    }
    if (c->state == WSM_OPEN)
        r->open--;
    if (c->native)
        r->native_live--;
    wsm_strmap_del(&r->ids, c->cid, c->cid_len);
    free(c->chans);
    free(c->chanpos);
    uint32_t gen = c->gen + 1;
    memset(c, 0, sizeof(*c));
    c->gen = gen; /* even: free; a heap entry left behind no longer matches */
    c->next_free = r->free_head;
    r->free_head = slot;
    r->live--;
    return WSM_OK;
}

static int wsm_registry_schedule(wsm_registry *r, wsm_conn *c, int64_t deadline)
{
    uint32_t slot = (uint32_t)(c - r->conns);
    if (wsm_sweep_push(&r->sweep, deadline, slot, c->gen, c->heap_seq + 1) < 0)
        return WSM_ENOMEM;
    c->heap_seq++; /* older entries of this connection are now ignored when popped */
    c->in_heap = 1;
    return WSM_OK;
}

static int wsm_registry_sweepable(const wsm_registry *r, const wsm_conn *c)
{
    return r->stale_after > 0 && c->state == WSM_OPEN && !c->native && !c->in_heap;
}

static int64_t wsm_conn_deadline(const wsm_registry *r, const wsm_conn *c)
{
    int64_t seen = c->last_seen > c->last_ping ? c->last_seen : c->last_ping;
    return seen + r->stale_after;
}

int wsm_registry_set_state(wsm_registry *r, wsm_handle h, int state)
{
    wsm_conn *c = wsm_registry_get(r, h);
    if (!c)
        return WSM_ENOTFOUND;
    if (c->state == WSM_OPEN && state != WSM_OPEN)
        r->open--;
    else if (c->state != WSM_OPEN && state == WSM_OPEN)
        r->open++;
    c->state = (uint8_t)state;
    if (wsm_registry_sweepable(r, c))
        return wsm_registry_schedule(r, c, wsm_conn_deadline(r, c));
    return WSM_OK;
}

void wsm_registry_touch(wsm_registry *r, wsm_conn *c, int64_t now)
{
    if (now > c->last_seen)
        c->last_seen = now;
    /* Out of memory here only delays stale detection until the next touch. */
    if (wsm_registry_sweepable(r, c))
        (void)wsm_registry_schedule(r, c, wsm_conn_deadline(r, c));
}

int wsm_registry_expire(wsm_registry *r, wsm_handle h)
{
    wsm_conn *c = wsm_registry_get(r, h);
    if (!c)
        return WSM_ENOTFOUND;
    c->forced = 1;
    return wsm_registry_schedule(r, c, INT64_MIN);
}

void wsm_registry_set_stale_after(wsm_registry *r, int64_t ns)
{
    r->stale_after = ns > 0 ? ns : 0;
    /* Rare (configuration): give every open connection a fresh heap entry under the new
     * timeout; entries computed under the old one are re-evaluated when popped. */
    for (uint32_t i = 0; i < r->nslots; i++) {
        wsm_conn *c = &r->conns[i];
        c->in_heap = 0; /* a fresh entry (new seq) supersedes the old one */
        if (WSM_IS_LIVE(c) && wsm_registry_sweepable(r, c))
            (void)wsm_registry_schedule(r, c, wsm_conn_deadline(r, c));
    }
}

/* What a due heap entry means now. */
enum { WSM_SWEEP_DROP, WSM_SWEEP_DUE, WSM_SWEEP_LATER };

static int wsm_registry_judge(wsm_registry *r, const wsm_sweep_entry *e, int64_t now, int64_t *later)
{
    if (e->slot >= r->nslots)
        return WSM_SWEEP_DROP;
    wsm_conn *c = &r->conns[e->slot];
    if (c->gen != e->gen || !WSM_IS_LIVE(c) || !c->in_heap || c->heap_seq != e->seq)
        return WSM_SWEEP_DROP; /* removed, or superseded by a later entry */
    c->in_heap = 0;
    if (c->state == WSM_DISCONNECTING)
        return WSM_SWEEP_DROP; /* already being torn down */
    if (c->forced) {
        c->forced = 0;
        return WSM_SWEEP_DUE;
    }
    if (r->stale_after <= 0 || c->state != WSM_OPEN || c->native)
        return WSM_SWEEP_DROP;
    *later = wsm_conn_deadline(r, c);
    return *later <= now ? WSM_SWEEP_DUE : WSM_SWEEP_LATER;
}

typedef struct wsm_sweep_run {
    wsm_registry *r;
    int64_t now;
    wsm_handle *out;
    size_t n, max;
} wsm_sweep_run;

/* wsm_sweep_filter's judge: the same verdicts as the popping loop, applied in place. */
static int wsm_registry_judge_in_place(void *ctx, wsm_sweep_entry *e)
{
    wsm_sweep_run *run = ctx;
    if (run->n == run->max)
        return 1; /* out of room: left for the next sweep */
    int64_t later;
    switch (wsm_registry_judge(run->r, e, run->now, &later)) {
    case WSM_SWEEP_DUE:
        run->out[run->n++] = WSM_HANDLE(e->slot, e->gen);
        return 0;
    case WSM_SWEEP_LATER:
        e->deadline = later; /* same seq: still the connection's one entry */
        run->r->conns[e->slot].in_heap = 1;
        return 1;
    default:
        return 0;
    }
}

/* Pops one at a time while few are due; past this many, one linear pass is cheaper. */
#define WSM_SWEEP_POP_LIMIT 256

long wsm_registry_sweep(wsm_registry *r, int64_t now, wsm_handle *out, size_t max)
{
    wsm_sweep_run run = {r, now, out, 0, max};
    wsm_sweep_entry e;
    for (int pops = 0; run.n < max && pops < WSM_SWEEP_POP_LIMIT; pops++) {
        if (!wsm_sweep_pop_due(&r->sweep, now, &e))
            return (long)run.n;
        int64_t later;
        switch (wsm_registry_judge(r, &e, now, &later)) {
        case WSM_SWEEP_DUE:
            out[run.n++] = WSM_HANDLE(e.slot, e.gen);
            break;
        case WSM_SWEEP_LATER:
            if (wsm_registry_schedule(r, &r->conns[e.slot], later) < 0)
                return -1;
            break;
        default:
            break;
        }
    }
    if (run.n < max && r->sweep.len && r->sweep.heap[0].deadline <= now)
        wsm_sweep_filter(&r->sweep, now, wsm_registry_judge_in_place, &run);
    return (long)run.n;
}

int wsm_registry_join(wsm_registry *r, wsm_handle h, const char *name, size_t len)
{
    wsm_conn *c = wsm_registry_get(r, h);
    if (!c)
        return WSM_ENOTFOUND;
    uint32_t idx, slot = WSM_SLOT(h);
    if (wsm_strmap_get(&r->chan_map, name, len, &idx)) {
        for (uint16_t k = 0; k < c->nchans; k++)
            if (c->chans[k] == idx)
                return 0; /* already a member */
    } else {
        if (r->chans_free != WSM_NONE) {
            idx = r->chans_free;
            r->chans_free = r->chans[idx].next_free;
        } else {
            if (wsm_grow((void **)&r->chans, &r->capchans_, sizeof(wsm_channel), r->nchans_ + 1) < 0)
                return WSM_ENOMEM;
            idx = r->nchans_++;
        }
        if (wsm_strmap_put(&r->chan_map, name, len, idx) < 0) {
            r->chans[idx].next_free = r->chans_free;
            r->chans_free = idx;
            return WSM_ENOMEM;
        }
        wsm_channel *nc = &r->chans[idx];
        memset(nc, 0, sizeof(*nc));
        nc->name = wsm_strmap_key(&r->chan_map, name, len);
        nc->len = (uint32_t)len;
        r->live_chans++;
    }
    wsm_channel *ch = &r->chans[idx];
    if (c->nchans == UINT16_MAX)
        return WSM_ENOMEM;
    if (c->nchans == c->capchans) {
        uint16_t cap = c->capchans ? (c->capchans > UINT16_MAX / 2 ? UINT16_MAX : c->capchans * 2) : 4;
        uint32_t *a = realloc(c->chans, cap * sizeof(uint32_t));
        if (!a)
            goto fail;
        c->chans = a;
        uint32_t *b = realloc(c->chanpos, cap * sizeof(uint32_t));
        if (!b)
            goto fail;
        c->chanpos = b;
        c->capchans = cap;
    }
    if (wsm_grow((void **)&ch->members, &ch->cap, sizeof(uint32_t), ch->count + 1) < 0)
        goto fail;
    ch->members[ch->count] = slot;
    c->chans[c->nchans] = idx;
    c->chanpos[c->nchans] = ch->count;
    c->nchans++;
    ch->count++;
    return 1;
fail:
    if (ch->count == 0) {
        wsm_strmap_del(&r->chan_map, ch->name, ch->len);
        free(ch->members);
        memset(ch, 0, sizeof(*ch));
        ch->next_free = r->chans_free;
        r->chans_free = idx;
        r->live_chans--;
    }
    return WSM_ENOMEM;
}

int wsm_registry_leave(wsm_registry *r, wsm_handle h, const char *name, size_t len)
{
    wsm_conn *c = wsm_registry_get(r, h);
    if (!c)
        return WSM_ENOTFOUND;
    uint32_t idx;
    if (!wsm_strmap_get(&r->chan_map, name, len, &idx))
        return 0;
    for (uint16_t k = 0; k < c->nchans; k++)
        if (c->chans[k] == idx) {
            wsm_registry_drop_membership(r, WSM_SLOT(h), k);
            return 1;
        }
    return 0;
}

void wsm_targets_clear(wsm_targets *t)
{
    free(t->portable);
    free(t->native);
    free(t->native_reg);
    memset(t, 0, sizeof(*t));
}

static int wsm_targets_reserve(wsm_targets *t, size_t n)
{
    if (n == 0)
        n = 1;
    t->portable = malloc(n * sizeof(wsm_handle));
    t->native = malloc(n * sizeof(uint64_t));
    t->native_reg = malloc(n * sizeof(wsm_handle));
    if (!t->portable || !t->native || !t->native_reg) {
        wsm_targets_clear(t);
        return WSM_ENOMEM;
    }
    t->nportable = t->nnative = 0;
    return WSM_OK;
}

static void wsm_registry_mark(wsm_registry *r, const wsm_handle *excl, size_t nexcl)
{
    if (++r->epoch == 0) { /* wrapped: old marks could alias the new epoch */
        for (uint32_t i = 0; i < r->nslots; i++)
            r->conns[i].mark = 0;
        r->epoch = 1;
    }
    for (size_t i = 0; i < nexcl; i++) {
        wsm_conn *c = wsm_registry_get(r, excl[i]);
        if (c)
            c->mark = r->epoch;
    }
}

static inline void wsm_targets_add(wsm_registry *r, wsm_targets *t, uint32_t slot)
{
    wsm_conn *c = &r->conns[slot];
    if (c->state != WSM_OPEN || c->mark == r->epoch)
        return;
    wsm_handle h = WSM_HANDLE(slot, c->gen);
    if (c->native) {
        t->native[t->nnative] = c->native;
        t->native_reg[t->nnative++] = h;
    } else {
        t->portable[t->nportable++] = h;
    }
}

int wsm_registry_resolve_all(wsm_registry *r, const wsm_handle *excl, size_t nexcl, wsm_targets *t)
{
    if (wsm_targets_reserve(t, r->open) < 0)
        return WSM_ENOMEM;
    wsm_registry_mark(r, excl, nexcl);
    for (uint32_t i = 0; i < r->nslots; i++)
        if (WSM_IS_LIVE(&r->conns[i]))
            wsm_targets_add(r, t, i);
    return WSM_OK;
}

int wsm_registry_resolve_user(wsm_registry *r, const char *user, size_t len,
                              const wsm_handle *excl, size_t nexcl, wsm_targets *t)
{
    uint32_t idx;
    int found = wsm_strmap_get(&r->user_map, user, len, &idx);
    if (wsm_targets_reserve(t, found ? r->users[idx].count : 0) < 0)
        return WSM_ENOMEM;
    if (!found)
        return WSM_OK;
    wsm_registry_mark(r, excl, nexcl);
    for (uint32_t s = r->users[idx].head; s != WSM_NONE; s = r->conns[s].user_next)
        wsm_targets_add(r, t, s);
    return WSM_OK;
}

int wsm_registry_resolve_channel(wsm_registry *r, const char *name, size_t len,
                                 const wsm_handle *excl, size_t nexcl, wsm_targets *t)
{
    uint32_t idx;
    int found = wsm_strmap_get(&r->chan_map, name, len, &idx);
    if (wsm_targets_reserve(t, found ? r->chans[idx].count : 0) < 0)
        return WSM_ENOMEM;
    if (!found)
        return WSM_OK;
    wsm_registry_mark(r, excl, nexcl);
    wsm_channel *ch = &r->chans[idx];
    for (uint32_t i = 0; i < ch->count; i++)
        wsm_targets_add(r, t, ch->members[i]);
    return WSM_OK;
}
