/* wsm_fanout: one encoded frame to many native connections.
 *
 * The loop thread side copies the receiver handles and queues one command holding one
 * reference to the frame; the I/O thread appends that same frame to each live receiver's
 * out-queue. Per receiver that is a pointer in a ring and a refcount increment: no copy of the
 * payload, no allocation beyond the occasional ring growth, no Python object. */
#ifndef WSM_FANOUT_H
#define WSM_FANOUT_H

#include <stddef.h>
#include <stdint.h>

#include "engine.h"

/* Takes ownership of f. Returns the number of receivers alive when queued, or -1 when out of
 * memory. Safe without the GIL. */
long wsm_fanout_submit(wsm_engine *e, const uint64_t *handles, size_t n, wsm_frame *f);
/* I/O thread: runs a WSM_CMD_FANOUT command. */
void wsm_fanout_deliver(wsm_engine *e, wsm_cmd *cmd);

#endif
