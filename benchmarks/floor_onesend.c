/* The one-send floor: every broadcast frame is encoded once and written to each receiver with
 * its own send() at once (see floor_common.h). */
#define FLOOR_COALESCE 0
#include "floor_common.h"
