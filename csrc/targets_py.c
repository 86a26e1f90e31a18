/* wsmanager._core.Targets: the receivers of one delivery, resolved in C (module.h). */
#include "module.h"

/* ---- Targets --------------------------------------------------------------------------- */

static int Targets_traverse(PyObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static void Targets_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    wsm_targets_clear(&((wsm_TargetsObject *)self)->t);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static Py_ssize_t Targets_len(PyObject *self)
{
    wsm_targets *t = &((wsm_TargetsObject *)self)->t;
    return (Py_ssize_t)(t->nportable + t->nnative);
}

static PyObject *Targets_iter(PyObject *self)
{
    wsm_targets *t = &((wsm_TargetsObject *)self)->t;
    PyObject *list = PyList_New((Py_ssize_t)t->nportable);
    for (size_t i = 0; list && i < t->nportable; i++) {
        PyObject *h = PyLong_FromUnsignedLongLong(t->portable[i]);
        if (!h)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, (Py_ssize_t)i, h);
    }
    if (!list)
        return NULL;
    PyObject *it = PyObject_GetIter(list);
    Py_DECREF(list);
    return it;
}

static PyObject *Targets_portable_count(PyObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromSize_t(((wsm_TargetsObject *)self)->t.nportable);
}

static PyObject *Targets_native_count(PyObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromSize_t(((wsm_TargetsObject *)self)->t.nnative);
}

static PyGetSetDef Targets_getset[] = {
    {"portable_count", Targets_portable_count, NULL, "receivers delivered through ASGI send", NULL},
    {"native_count", Targets_native_count, NULL, "receivers owned by the native engine", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Targets_slots[] = {
    {Py_tp_doc, "Receivers of one delivery, resolved in C; iterating yields portable handles."},
    {Py_tp_traverse, Targets_traverse},
    {Py_tp_dealloc, Targets_dealloc},
    {Py_tp_iter, Targets_iter},
    {Py_tp_getset, Targets_getset},
    {Py_sq_length, Targets_len},
    {0, NULL},
};

PyType_Spec wsm_targets_spec = {
    .name = "wsmanager._core.Targets",
    .basicsize = sizeof(wsm_TargetsObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE |
             Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = Targets_slots,
};
