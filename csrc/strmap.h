/* wsm_strmap: an open-addressing hash map from byte strings to uint32 values.
 *
 * Linear probing with backward-shift deletion (no tombstones), so lookups stay short after
 * many inserts and removals. Keys are copied and owned by the map. Not thread-safe: the
 * registry guards it with its own mutex. */
#ifndef WSM_STRMAP_H
#define WSM_STRMAP_H

#include <stddef.h>
#include <stdint.h>

typedef struct wsm_strmap_entry {
    uint64_t hash; /* 0 marks an empty bucket */
    char *key;
    uint32_t len;
    uint32_t value;
} wsm_strmap_entry;

typedef struct wsm_strmap {
    wsm_strmap_entry *buckets;
    size_t cap;   /* power of two */
    size_t count;
} wsm_strmap;

int wsm_strmap_init(wsm_strmap *m, size_t initial);
void wsm_strmap_free(wsm_strmap *m);
/* Returns 1 and sets *value when found, else 0. */
int wsm_strmap_get(const wsm_strmap *m, const char *key, size_t len, uint32_t *value);
/* Inserts a new key (must be absent). Returns 0, or -1 when out of memory. */
int wsm_strmap_put(wsm_strmap *m, const char *key, size_t len, uint32_t value);
/* Removes a key. Returns 1 when it was present. */
int wsm_strmap_del(wsm_strmap *m, const char *key, size_t len);
/* The map's own copy of a key (stable until the key is deleted), or NULL. */
const char *wsm_strmap_key(const wsm_strmap *m, const char *key, size_t len);

#endif
