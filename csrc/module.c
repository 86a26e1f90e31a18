/* wsmanager._core: the module definition (multi-phase init, module state, heap types: PEP
 * 489/573/630, so the module can be imported in subinterpreters and reloaded). Its types live
 * in registry_py.c (Registry), targets_py.c (Targets) and engine_py.c (Engine). */
#include "module.h"

#include "clock.h"
#include "reasons.h"

/* ---- module ---------------------------------------------------------------------------- */

static PyObject *wsm_monotonic_ns(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyLong_FromLongLong(wsm_clock_ns());
}

static PyMethodDef wsm_module_methods[] = {
    {"monotonic_ns", wsm_monotonic_ns, METH_NOARGS, "CLOCK_MONOTONIC in ns (the registry's clock)"},
    {NULL, NULL, 0, NULL},
};

static int wsm_module_exec(PyObject *m)
{
    wsm_module_state *st = wsm_state(m);
    st->RegistryType = (PyTypeObject *)PyType_FromModuleAndSpec(m, &wsm_registry_spec, NULL);
    if (!st->RegistryType || PyModule_AddType(m, st->RegistryType) < 0)
        return -1;
    st->TargetsType = (PyTypeObject *)PyType_FromModuleAndSpec(m, &wsm_targets_spec, NULL);
    if (!st->TargetsType || PyModule_AddType(m, st->TargetsType) < 0)
        return -1;
    st->InfoType = PyStructSequence_NewType(&wsm_info_desc);
    if (!st->InfoType || PyModule_AddType(m, st->InfoType) < 0)
        return -1;
    st->LimitReached = PyErr_NewExceptionWithDoc(
        "wsmanager._core.LimitReached",
        "A per-user or global connection limit is full (attribute scope: 'user' or 'total').",
        NULL, NULL);
    if (!st->LimitReached || PyModule_AddObjectRef(m, "LimitReached", st->LimitReached) < 0)
        return -1;
    PyObject *array_mod = PyImport_ImportModule("array");
    if (!array_mod)
        return -1;
    st->array_type = PyObject_GetAttrString(array_mod, "array");
    Py_DECREF(array_mod);
    if (!st->array_type)
        return -1;
    if (PyModule_AddIntConstant(m, "STATE_FREE", WSM_FREE) < 0 ||
        PyModule_AddIntConstant(m, "STATE_CONNECTING", WSM_CONNECTING) < 0 ||
        PyModule_AddIntConstant(m, "STATE_OPEN", WSM_OPEN) < 0 ||
        PyModule_AddIntConstant(m, "STATE_DISCONNECTING", WSM_DISCONNECTING) < 0 ||
        PyModule_AddIntConstant(m, "STATE_CLOSED", WSM_CLOSED) < 0)
        return -1;
    PyObject *reasons = PyTuple_New(WSM_R_COUNT);
    if (!reasons)
        return -1;
    for (int i = 0; i < WSM_R_COUNT; i++) {
        PyObject *s = PyUnicode_FromString(wsm_reason_name(i));
        if (!s) {
            Py_DECREF(reasons);
            return -1;
        }
        PyTuple_SET_ITEM(reasons, i, s);
    }
    if (PyModule_AddObject(m, "REASONS", reasons) < 0) {
        Py_DECREF(reasons);
        return -1;
    }
    return wsm_engine_exec(m, st);
}

static int wsm_module_traverse(PyObject *m, visitproc visit, void *arg)
{
    wsm_module_state *st = wsm_state(m);
    Py_VISIT(st->RegistryType);
    Py_VISIT(st->TargetsType);
    Py_VISIT(st->InfoType);
    Py_VISIT(st->LimitReached);
    Py_VISIT(st->array_type);
    return wsm_engine_traverse(st, visit, arg);
}

static int wsm_module_clear(PyObject *m)
{
    wsm_module_state *st = wsm_state(m);
    Py_CLEAR(st->RegistryType);
    Py_CLEAR(st->TargetsType);
    Py_CLEAR(st->InfoType);
    Py_CLEAR(st->LimitReached);
    Py_CLEAR(st->array_type);
    wsm_engine_clear(st);
    return 0;
}

static void wsm_module_free(void *m)
{
    wsm_module_clear((PyObject *)m);
}

static PyModuleDef_Slot wsm_module_slots[] = {
    {Py_mod_exec, wsm_module_exec},
    {0, NULL},
};

static struct PyModuleDef wsm_module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "wsmanager._core",
    .m_doc = "wsmanager's C core: the connection registry and the native WebSocket engine.",
    .m_size = sizeof(wsm_module_state),
    .m_methods = wsm_module_methods,
    .m_slots = wsm_module_slots,
    .m_traverse = wsm_module_traverse,
    .m_clear = wsm_module_clear,
    .m_free = wsm_module_free,
};

PyMODINIT_FUNC PyInit__core(void)
{
    return PyModuleDef_Init(&wsm_module_def);
}
