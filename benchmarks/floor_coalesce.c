/* The coalescing floor: frames are queued per receiver and each dirty queue leaves with one
 * send() per event-loop iteration (see floor_common.h). */
#define FLOOR_COALESCE 1
#include "floor_common.h"
