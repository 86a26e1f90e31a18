/* Python glue of the native engine (issue 3 replaces this with the Engine type). */
#include "module.h"

int wsm_engine_exec(PyObject *module, wsm_module_state *st)
{
    (void)module;
    st->EngineType = NULL;
    return 0;
}

int wsm_engine_traverse(wsm_module_state *st, visitproc visit, void *arg)
{
    Py_VISIT(st->EngineType);
    return 0;
}

void wsm_engine_clear(wsm_module_state *st)
{
    Py_CLEAR(st->EngineType);
}
