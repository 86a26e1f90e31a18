/* Helpers shared by the Python types of wsmanager._core (registry_py.c, targets_py.c): the
 * registry's mutex taken without stalling the interpreter, snapshots of strings copied under
 * it and turned into Python objects after it, and argument parsing. */
#ifndef WSM_PYUTIL_H
#define WSM_PYUTIL_H

#include "module.h"

/* Strings and counts copied under the mutex, turned into Python objects after it. */
typedef struct wsm_snap {
    char *buf;
    size_t used, cap;
    size_t *off;     /* n + 1 offsets into buf */
    uint64_t *num;   /* one number per string */
    size_t n, capn;
    int oom;
} wsm_snap;

/* exclude: None or a collection of connection ids (a bare str is a mistake, not a set). */
typedef struct wsm_excl {
    PyObject *seq;
    const char **ids;
    Py_ssize_t *lens;
    wsm_handle *handles;
    Py_ssize_t n;
} wsm_excl;

void wsm_lock(wsm_registry *r);
void wsm_unlock(wsm_registry *r);
void wsm_snap_add(wsm_snap *s, const char *str, size_t len, uint64_t num);
void wsm_snap_free(wsm_snap *s);
PyObject *wsm_snap_str(const wsm_snap *s, size_t i);
PyObject *wsm_snap_list(wsm_snap *s);
PyObject *wsm_snap_dict(wsm_snap *s);
const char *wsm_str_arg(PyObject *o, const char *what, Py_ssize_t *len, int allow_empty);
int wsm_reg_handle_arg(PyObject *o, wsm_handle *h);
int wsm_excl_init(wsm_excl *e, PyObject *exclude);
void wsm_excl_free(wsm_excl *e);
size_t wsm_excl_resolve(wsm_registry *r, wsm_excl *e);

#endif
