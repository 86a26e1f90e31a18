/* The registry's data structures (csrc/strmap.c, sweep.c, timer.c, registry.c) against simple
 * models. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctest.h"
#include "registry.h"
#include "strmap.h"
#include "sweep.h"
#include "timer.h"

static uint32_t rnd_state = 12345;
static uint32_t rnd(void)
{
    rnd_state = rnd_state * 1103515245u + 12345u;
    return rnd_state >> 8;
}

void test_strmap_against_a_model(void)
{
    enum { KEYS = 500 };
    wsm_strmap m;
    CHECK_EQ(wsm_strmap_init(&m, 4), 0);
    int present[KEYS] = {0};
    char key[16];
    for (int step = 0; step < 20000; step++) {
        int k = (int)(rnd() % KEYS);
        int len = snprintf(key, sizeof key, "k%d", k);
        uint32_t v;
        if (rnd() % 2) {
            if (!present[k]) {
                CHECK_EQ(wsm_strmap_put(&m, key, (size_t)len, (uint32_t)k), 0);
                present[k] = 1;
            }
        } else {
            CHECK_EQ(wsm_strmap_del(&m, key, (size_t)len), present[k]);
            present[k] = 0;
        }
        int probe = (int)(rnd() % KEYS);
        len = snprintf(key, sizeof key, "k%d", probe);
        CHECK_EQ(wsm_strmap_get(&m, key, (size_t)len, &v), present[probe]);
        if (present[probe])
            CHECK_EQ(v, (uint32_t)probe);
    }
    size_t count = 0;
    for (int k = 0; k < KEYS; k++)
        count += (size_t)present[k];
    CHECK_EQ(m.count, count);
    wsm_strmap_free(&m);
}

void test_timer_heap_order_and_moves(void)
{
    enum { N = 300 };
    wsm_timer_heap h;
    wsm_timer_init(&h);
    uint32_t idx[N];
    int64_t when[N];
    for (int i = 0; i < N; i++) {
        idx[i] = WSM_TIMER_NONE;
        when[i] = (int64_t)(rnd() % 100000);
        CHECK_EQ(wsm_timer_set(&h, &when[i], &idx[i], when[i]), 0);
    }
    for (int i = 0; i < N; i += 3) { /* moves, both ways */
        when[i] = (int64_t)(rnd() % 100000);
        wsm_timer_set(&h, &when[i], &idx[i], when[i]);
    }
    for (int i = 1; i < N; i += 7) {
        wsm_timer_remove(&h, &idx[i]);
        CHECK_EQ(idx[i], WSM_TIMER_NONE);
    }
    int64_t last = -1;
    size_t popped = 0;
    int64_t *o;
    while ((o = wsm_timer_pop_due(&h, 100000)) != NULL) {
        CHECK(*o >= last);
        last = *o;
        popped++;
    }
    CHECK_EQ(popped, N - (N - 1 + 6) / 7);
    CHECK_EQ(wsm_timer_next(&h), INT64_MAX);
    wsm_timer_free(&h);
}

void test_sweep_heap_due_entries(void)
{
    wsm_sweep s = {0};
    for (uint32_t i = 0; i < 1000; i++)
        CHECK_EQ(wsm_sweep_push(&s, (int64_t)(rnd() % 1000), i, 1, 0), 0);
    wsm_sweep_entry e;
    int64_t last = -1;
    size_t due = 0;
    while (wsm_sweep_pop_due(&s, 499, &e)) {
        CHECK(e.deadline >= last && e.deadline <= 499);
        last = e.deadline;
        due++;
    }
    CHECK_EQ(s.len + due, 1000);
    CHECK(!wsm_sweep_pop_due(&s, 499, &e));
    wsm_sweep_free(&s);
}

void test_registry_limits_channels_and_sweep(void)
{
    wsm_registry *r = wsm_registry_new(4);
    wsm_handle h[8];
    char cid[16];
    for (int i = 0; i < 6; i++) {
        snprintf(cid, sizeof cid, "c%d", i);
        int rc = wsm_registry_add(r, cid, strlen(cid), "alice", 5, 1, 5, 0, 1000, &h[i]);
        CHECK_EQ(rc, i < 5 ? WSM_OK : WSM_ELIMIT_USER); /* the 6th of one user is refused */
    }
    CHECK_EQ(wsm_registry_add(r, "c0", 2, "bob", 3, 1, 5, 0, 1000, &h[6]), WSM_EDUP);
    for (int i = 0; i < 5; i++)
        CHECK_EQ(wsm_registry_set_state(r, h[i], WSM_OPEN), WSM_OK);
    CHECK_EQ(wsm_registry_join(r, h[1], "room", 4), 1); /* 1: joined, 0: already a member */
    CHECK_EQ(wsm_registry_join(r, h[3], "room", 4), 1);
    CHECK_EQ(wsm_registry_join(r, h[3], "room", 4), 0);
    wsm_targets t = {0};
    CHECK_EQ(wsm_registry_resolve_channel(r, "room", 4, NULL, 0, &t), WSM_OK);
    CHECK_EQ(t.nportable, 2);
    wsm_targets_clear(&t);
    CHECK_EQ(wsm_registry_resolve_user(r, "alice", 5, &h[0], 1, &t), WSM_OK);
    CHECK_EQ(t.nportable, 4); /* minus the excluded one */
    wsm_targets_clear(&t);
    CHECK_EQ(wsm_registry_remove(r, h[3]), WSM_OK);
    CHECK_EQ(wsm_registry_resolve_channel(r, "room", 4, NULL, 0, &t), WSM_OK);
    CHECK_EQ(t.nportable, 1);
    wsm_targets_clear(&t);
    wsm_handle found;
    CHECK_EQ(wsm_registry_find(r, "c3", 2, &found), WSM_ENOTFOUND);
    /* stale after 100 ns of silence: one touched connection survives the sweep */
    wsm_registry_set_stale_after(r, 100);
    wsm_registry_touch(r, wsm_registry_get(r, h[0]), 1150);
    wsm_handle out[8];
    long n = wsm_registry_sweep(r, 1200, out, 8);
    CHECK_EQ(n, 3);
    for (long i = 0; i < n; i++)
        CHECK(out[i] != h[0]);
    wsm_registry_free(r);
}
