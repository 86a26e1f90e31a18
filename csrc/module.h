/* Module state shared by the files that define Python types of wsmanager._core. */
#ifndef WSM_MODULE_H
#define WSM_MODULE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "registry.h"

typedef struct wsm_module_state {
    PyTypeObject *RegistryType;
    PyTypeObject *TargetsType;
    PyTypeObject *InfoType;    /* ConnectionRow, the struct sequence of Registry.info() */
    PyTypeObject *EngineType;  /* set by wsm_engine_exec (engine_py.c) */
    PyObject *LimitReached;
    PyObject *array_type;      /* array.array: sweep() hands its handles over in one buffer */
} wsm_module_state;

/* A resolved set of receivers (returned by Registry.resolve_*). The engine reads t.native. */
typedef struct wsm_TargetsObject {
    PyObject_HEAD
    wsm_targets t;
} wsm_TargetsObject;

static inline wsm_module_state *wsm_state(PyObject *module)
{
    return (wsm_module_state *)PyModule_GetState(module);
}

/* The specs of the types defined in registry_py.c and targets_py.c. */
extern PyType_Spec wsm_registry_spec;
extern PyType_Spec wsm_targets_spec;
extern PyStructSequence_Desc wsm_info_desc;

/* Adds the native engine's types to the module (engine_py.c). */
int wsm_engine_exec(PyObject *module, wsm_module_state *st);
int wsm_engine_traverse(wsm_module_state *st, visitproc visit, void *arg);
void wsm_engine_clear(wsm_module_state *st);

#endif
