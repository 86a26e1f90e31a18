/* Helpers of the Python types (pyutil.h). */
#include "pyutil.h"

#include <stdlib.h>
#include <string.h>

/* ---- locking --------------------------------------------------------------------------- */

/* Uncontended: take it without dropping the GIL. Contended: wait with the GIL released, so a
 * long sweep in another thread never stalls the interpreter. */
void wsm_lock(wsm_registry *r)
{
    if (pthread_mutex_trylock(&r->lock) == 0)
        return;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&r->lock);
    Py_END_ALLOW_THREADS
}

void wsm_unlock(wsm_registry *r)
{
    pthread_mutex_unlock(&r->lock);
}

/* ---- string snapshots ------------------------------------------------------------------ */


void wsm_snap_add(wsm_snap *s, const char *str, size_t len, uint64_t num)
{
    if (s->oom)
        return;
    if (s->n + 2 > s->capn) {
        size_t capn = s->capn ? s->capn * 2 : 64;
        size_t *off = realloc(s->off, capn * sizeof(size_t));
        if (off)
            s->off = off;
        uint64_t *nm = realloc(s->num, capn * sizeof(uint64_t));
        if (nm)
            s->num = nm;
        if (!off || !nm) {
            s->oom = 1;
            return;
        }
        s->capn = capn;
    }
    if (s->used + len > s->cap) {
        size_t cap = s->cap ? s->cap : 1024;
        while (cap < s->used + len)
            cap *= 2;
        char *b = realloc(s->buf, cap);
        if (!b) {
            s->oom = 1;
            return;
        }
        s->buf = b;
        s->cap = cap;
    }
    if (s->n == 0)
        s->off[0] = 0;
    if (len)
        memcpy(s->buf + s->used, str, len);
    s->used += len;
    s->num[s->n] = num;
    s->off[++s->n] = s->used;
}

void wsm_snap_free(wsm_snap *s)
{
    free(s->buf);
    free(s->off);
    free(s->num);
}

PyObject *wsm_snap_str(const wsm_snap *s, size_t i)
{
    return PyUnicode_DecodeUTF8(s->buf + s->off[i], (Py_ssize_t)(s->off[i + 1] - s->off[i]),
                                "surrogatepass");
}

PyObject *wsm_snap_list(wsm_snap *s)
{
    if (s->oom) {
        wsm_snap_free(s);
        return PyErr_NoMemory();
    }
    PyObject *list = PyList_New((Py_ssize_t)s->n);
    for (size_t i = 0; list && i < s->n; i++) {
        PyObject *str = wsm_snap_str(s, i);
        if (!str)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, (Py_ssize_t)i, str);
    }
    wsm_snap_free(s);
    return list;
}

PyObject *wsm_snap_dict(wsm_snap *s)
{
    if (s->oom) {
        wsm_snap_free(s);
        return PyErr_NoMemory();
    }
    PyObject *d = PyDict_New();
    for (size_t i = 0; d && i < s->n; i++) {
        PyObject *k = wsm_snap_str(s, i);
        PyObject *v = k ? PyLong_FromUnsignedLongLong(s->num[i]) : NULL;
        if (!v || PyDict_SetItem(d, k, v) < 0)
            Py_CLEAR(d);
        Py_XDECREF(k);
        Py_XDECREF(v);
    }
    wsm_snap_free(s);
    return d;
}

/* ---- argument helpers ------------------------------------------------------------------ */

const char *wsm_str_arg(PyObject *o, const char *what, Py_ssize_t *len, int allow_empty)
{
    if (!PyUnicode_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be str, not %.100s", what, Py_TYPE(o)->tp_name);
        return NULL;
    }
    const char *s = PyUnicode_AsUTF8AndSize(o, len);
    if (s && !allow_empty && *len == 0) {
        PyErr_Format(PyExc_ValueError, "%s must not be empty", what);
        return NULL;
    }
    return s;
}

int wsm_reg_handle_arg(PyObject *o, wsm_handle *h)
{
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "handle must be int, not %.100s", Py_TYPE(o)->tp_name);
        return -1;
    }
    *h = PyLong_AsUnsignedLongLong(o);
    if (*h == (wsm_handle)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        *h = 0; /* out of range: a handle that matches no connection */
    }
    return 0;
}


int wsm_excl_init(wsm_excl *e, PyObject *exclude)
{
    memset(e, 0, sizeof(*e));
    if (exclude == NULL || exclude == Py_None)
        return 0;
    if (PyUnicode_Check(exclude) || PyBytes_Check(exclude)) {
        PyErr_SetString(PyExc_TypeError,
                        "exclude must be a collection of connection ids (e.g. a set), not a str");
        return -1;
    }
    e->seq = PySequence_Fast(exclude, "exclude must be an iterable of connection ids");
    if (!e->seq)
        return -1;
    e->n = PySequence_Fast_GET_SIZE(e->seq);
    size_t n = e->n ? (size_t)e->n : 1;
    e->ids = malloc(n * sizeof(char *));
    e->lens = malloc(n * sizeof(Py_ssize_t));
    e->handles = malloc(n * sizeof(wsm_handle));
    if (!e->ids || !e->lens || !e->handles) {
        PyErr_NoMemory();
        return -1;
    }
    PyObject **items = PySequence_Fast_ITEMS(e->seq);
    for (Py_ssize_t i = 0; i < e->n; i++) {
        e->ids[i] = wsm_str_arg(items[i], "each excluded connection id", &e->lens[i], 1);
        if (!e->ids[i])
            return -1;
    }
    return 0;
}

void wsm_excl_free(wsm_excl *e)
{
    Py_XDECREF(e->seq);
    free(e->ids);
    free(e->lens);
    free(e->handles);
}

/* Under the lock: ids -> handles (unknown ids are simply not excluded). */
size_t wsm_excl_resolve(wsm_registry *r, wsm_excl *e)
{
    size_t k = 0;
    for (Py_ssize_t i = 0; i < e->n; i++)
        if (wsm_registry_find(r, e->ids[i], (size_t)e->lens[i], &e->handles[k]) == WSM_OK)
            k++;
    return k;
}
