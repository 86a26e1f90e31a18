/* wsm_strmap: string -> uint32 map, linear probing with backward-shift deletion. */
#include "strmap.h"

#include <stdlib.h>
#include <string.h>

/* FNV-1a, folded so that 0 stays free as the empty-bucket marker. Keys are connection ids,
 * user ids and channel names chosen by the application, not by peers, so a keyed hash buys
 * little here. */
static uint64_t wsm_strmap_hash(const char *key, size_t len)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)key[i];
        h *= 1099511628211ULL;
    }
    h ^= h >> 29;
    return h ? h : 1;
}

int wsm_strmap_init(wsm_strmap *m, size_t initial)
{
    size_t cap = 16;
    while (cap < initial * 2)
        cap <<= 1;
    m->buckets = calloc(cap, sizeof(*m->buckets));
    if (!m->buckets)
        return -1;
    m->cap = cap;
    m->count = 0;
    return 0;
}

void wsm_strmap_free(wsm_strmap *m)
{
    if (!m->buckets)
        return;
    for (size_t i = 0; i < m->cap; i++)
        free(m->buckets[i].key);
    free(m->buckets);
    m->buckets = NULL;
    m->cap = m->count = 0;
}

static size_t wsm_strmap_find(const wsm_strmap *m, const char *key, size_t len, uint64_t h)
{
    size_t mask = m->cap - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
        const wsm_strmap_entry *e = &m->buckets[i];
        if (e->hash == 0)
            return SIZE_MAX;
        if (e->hash == h && e->len == len && memcmp(e->key, key, len) == 0)
            return i;
    }
}

int wsm_strmap_get(const wsm_strmap *m, const char *key, size_t len, uint32_t *value)
{
    size_t i = wsm_strmap_find(m, key, len, wsm_strmap_hash(key, len));
    if (i == SIZE_MAX)
        return 0;
    *value = m->buckets[i].value;
    return 1;
}

const char *wsm_strmap_key(const wsm_strmap *m, const char *key, size_t len)
{
    size_t i = wsm_strmap_find(m, key, len, wsm_strmap_hash(key, len));
    return i == SIZE_MAX ? NULL : m->buckets[i].key;
}

static void wsm_strmap_place(wsm_strmap_entry *buckets, size_t cap, wsm_strmap_entry e)
{
    size_t mask = cap - 1;
    size_t i = e.hash & mask;
    while (buckets[i].hash)
        i = (i + 1) & mask;
    buckets[i] = e;
}

static int wsm_strmap_grow(wsm_strmap *m)
{
    size_t cap = m->cap * 2;
    wsm_strmap_entry *nb = calloc(cap, sizeof(*nb));
    if (!nb)
        return -1;
    for (size_t i = 0; i < m->cap; i++)
        if (m->buckets[i].hash)
            wsm_strmap_place(nb, cap, m->buckets[i]);
    free(m->buckets);
    m->buckets = nb;
    m->cap = cap;
    return 0;
}

int wsm_strmap_put(wsm_strmap *m, const char *key, size_t len, uint32_t value)
{
    if ((m->count + 1) * 4 > m->cap * 3 && wsm_strmap_grow(m) < 0)
        return -1;
    if (len > UINT32_MAX)
        return -1;
    char *copy = malloc(len + 1);
    if (!copy)
        return -1;
    memcpy(copy, key, len);
    copy[len] = '\0';
    wsm_strmap_entry e = {wsm_strmap_hash(key, len), copy, (uint32_t)len, value};
    wsm_strmap_place(m->buckets, m->cap, e);
    m->count++;
    return 0;
}

int wsm_strmap_del(wsm_strmap *m, const char *key, size_t len)
{
    size_t i = wsm_strmap_find(m, key, len, wsm_strmap_hash(key, len));
    if (i == SIZE_MAX)
        return 0;
    size_t mask = m->cap - 1;
    free(m->buckets[i].key);
    /* Backward shift: pull later entries of the same probe run into the hole, so no
     * tombstones accumulate under connect/disconnect churn. */
    size_t hole = i;
    for (size_t j = (i + 1) & mask; m->buckets[j].hash; j = (j + 1) & mask) {
        size_t home = m->buckets[j].hash & mask;
        /* j's entry may move to the hole only if its home is not in (hole, j]. */
        int between = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
        if (!between) {
            m->buckets[hole] = m->buckets[j];
            hole = j;
        }
    }
    memset(&m->buckets[hole], 0, sizeof(m->buckets[hole]));
    m->count--;
    return 1;
}
