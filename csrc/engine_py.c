/* Python glue of the native engine: the wsmanager._core.Engine heap type.
 *
 * Every method runs on the caller's thread and only queues a command; the I/O thread does the
 * work. The GIL is released around anything proportional to the payload or the number of
 * receivers (frame encoding, fan-out, joining the thread). */
#include "module.h"

#ifdef __linux__

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "conn.h"
#include "engine.h"
#include "frame.h"

typedef struct {
    PyObject_HEAD
    wsm_engine *e;
} wsm_EngineObject;

/* Frames at least this big are encoded with the GIL released. */
#define WSM_ENGINE_NOGIL_BYTES (64 * 1024)

static wsm_engine *wsm_engine_of(PyObject *self)
{
    wsm_engine *e = ((wsm_EngineObject *)self)->e;
    if (e == NULL)
        PyErr_SetString(PyExc_RuntimeError, "engine is not initialised");
    return e;
}

static int64_t wsm_engine_secs(double s)
{
    return s <= 0 ? 0 : (int64_t)(s * 1e9);
}

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"ping_interval", "ping_timeout", "max_message_size", "high_water",
                             "max_queue_bytes", "send_timeout", "close_timeout", "read_limit",
                             "event_queue_limit", "compress_threshold", NULL};
    /* The defaults of wsmanager/config.py's table (the one owner; test_config keeps these in
     * step): they matter only for a bare _core.Engine(), get_engine() passes every option. */
    double ping_interval = 30.0, ping_timeout = 10.0, send_timeout = 5.0, close_timeout = 2.0;
    Py_ssize_t max_msg = 16 * 1024 * 1024, high = 1024 * 1024, maxq = 16 * 1024 * 1024;
    Py_ssize_t rlimit = 1024 * 1024, evq = 64 * 1024 * 1024, zmin = 256;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|$ddnnnddnnn:Engine", kwlist, &ping_interval,
                                     &ping_timeout, &max_msg, &high, &maxq, &send_timeout,
                                     &close_timeout, &rlimit, &evq, &zmin))
        return NULL;
    if (max_msg <= 0 || high <= 0 || maxq <= 0 || rlimit <= 0 || evq <= 0 || ping_interval < 0 ||
        ping_timeout < 0 || send_timeout < 0 || close_timeout < 0 || zmin < 0) {
        PyErr_SetString(PyExc_ValueError, "engine sizes must be > 0 (compress_threshold >= 0) "
                                          "and timeouts >= 0");
        return NULL;
    }
    wsm_engine_opts o = {.conn = {
        .ping_interval = wsm_engine_secs(ping_interval),
        .ping_timeout = wsm_engine_secs(ping_timeout),
        .send_timeout = wsm_engine_secs(send_timeout),
        .close_timeout = wsm_engine_secs(close_timeout),
        .max_message_size = (size_t)max_msg,
        .high_water = (size_t)high,
        .max_queue_bytes = (size_t)maxq,
        .read_limit = (size_t)rlimit,
        .compress_threshold = (size_t)zmin,
        }, .event_queue_limit = (size_t)evq,
    };
    wsm_EngineObject *self = (wsm_EngineObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->e = wsm_engine_new(&o);
    if (self->e == NULL || wsm_engine_start(self->e) < 0) {
        Py_DECREF(self);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return (PyObject *)self;
}

static void Engine_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    wsm_engine *e = ((wsm_EngineObject *)self)->e;
    ((wsm_EngineObject *)self)->e = NULL;
    if (e != NULL) {
        Py_BEGIN_ALLOW_THREADS
        wsm_engine_free(e);
        Py_END_ALLOW_THREADS
    }
    tp->tp_free(self);
    Py_DECREF(tp);
}

/* ---- payloads -------------------------------------------------------------------------- */

typedef struct {
    Py_buffer view;
    const char *p;
    Py_ssize_t n;
    int opcode;
    int has_view;
} wsm_payload;

/* str is a text frame (UTF-8), anything with the buffer protocol a binary frame. */
static int wsm_payload_get(PyObject *data, wsm_payload *pl)
{
    pl->has_view = 0;
    if (PyUnicode_Check(data)) {
        pl->p = PyUnicode_AsUTF8AndSize(data, &pl->n);
        pl->opcode = WSM_OP_TEXT;
        return pl->p ? 0 : -1;
    }
    if (PyObject_GetBuffer(data, &pl->view, PyBUF_SIMPLE) < 0)
        return -1;
    pl->has_view = 1;
    pl->p = pl->view.buf;
    pl->n = pl->view.len;
    pl->opcode = WSM_OP_BINARY;
    return 0;
}

static void wsm_payload_release(wsm_payload *pl)
{
    if (pl->has_view)
        PyBuffer_Release(&pl->view);
}

static wsm_frame *wsm_payload_encode(wsm_payload *pl)
{
    wsm_frame *f;
    if (pl->n >= WSM_ENGINE_NOGIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        f = wsm_frame_encode(pl->opcode, pl->p, (size_t)pl->n);
        Py_END_ALLOW_THREADS
    } else {
        f = wsm_frame_encode(pl->opcode, pl->p, (size_t)pl->n);
    }
    if (f == NULL)
        PyErr_NoMemory();
    return f;
}

static int wsm_handle_arg(PyObject *o, uint64_t *h)
{
    *h = PyLong_AsUnsignedLongLong(o);
    if (*h == (uint64_t)-1 && PyErr_Occurred())
        return -1;
    return 0;
}

/* ---- methods --------------------------------------------------------------------------- */

static PyObject *Engine_register(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "response", "data", "deflate", "takeover", NULL};
    int fd, z_bits = 0, takeover = 0;
    Py_buffer resp = {0}, data = {0};
    wsm_engine *e = wsm_engine_of(self);
    if (e == NULL || !PyArg_ParseTupleAndKeywords(args, kw, "i|y*y*$ip:register", kwlist, &fd, &resp,
                                                  &data, &z_bits, &takeover))
        return NULL;
    if (z_bits != 0 && (z_bits < 8 || z_bits > 15)) {
        PyErr_Format(PyExc_ValueError, "register(): deflate is 0 or a window of 8-15 bits, not %d",
                     z_bits);
        PyBuffer_Release(&resp);
        PyBuffer_Release(&data);
        return NULL;
    }
    wsm_frame *out = NULL;
    uint8_t *in = NULL;
    int dup = -1;
    if (resp.len && (out = wsm_frame_raw(resp.buf, (size_t)resp.len)) == NULL)
        goto nomem;
    if ((size_t)data.len > WSM_LEFTOVER_MAX) {
        PyErr_Format(PyExc_ValueError, "register(): data is %zd bytes, at most %d may follow the "
                     "handshake", data.len, WSM_LEFTOVER_MAX);
        goto fail;
    }
    if (data.len) {
        if ((in = malloc((size_t)data.len)) == NULL)
            goto nomem;
        memcpy(in, data.buf, (size_t)data.len);
    }
    /* The engine owns a duplicate: the transport keeps its own fd until the engine is done. */
    dup = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (dup < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    size_t inlen = data.len > 0 ? (size_t)data.len : 0;
    PyBuffer_Release(&resp);
    PyBuffer_Release(&data);
    unsigned bits = (unsigned)z_bits | (z_bits && takeover ? WSM_Z_TAKEOVER : 0u);
    uint64_t h = wsm_engine_register(e, dup, out, in, inlen, bits);
    if (h == 0) {
        PyErr_SetString(PyExc_RuntimeError, "the engine is stopped or out of memory");
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(h);
nomem:
    PyErr_NoMemory();
fail:
    wsm_frame_decref(out);
    free(in);
    PyBuffer_Release(&resp);
    PyBuffer_Release(&data);
    return NULL;
}

static PyObject *Engine_send(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t h;
    wsm_payload pl;
    wsm_engine *e = wsm_engine_of(self);
    if (e == NULL)
        return NULL;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "send(handle, data) takes 2 arguments");
        return NULL;
    }
    if (wsm_handle_arg(args[0], &h) < 0 || wsm_payload_get(args[1], &pl) < 0)
        return NULL;
    wsm_frame *f = wsm_payload_encode(&pl);
    wsm_payload_release(&pl);
    if (f == NULL)
        return NULL;
    return PyBool_FromLong(wsm_engine_send(e, h, f));
}

/* The receivers of a fan-out: a Targets (its native handles) or any iterable of handles. */
static int wsm_fanout_handles(PyObject *self, PyObject *targets, const uint64_t **hs, size_t *n,
                              uint64_t **owned)
{
    PyObject *mod = PyType_GetModule(Py_TYPE(self));
    wsm_module_state *st = mod ? wsm_state(mod) : NULL;
    *owned = NULL;
    if (st && st->TargetsType && PyObject_TypeCheck(targets, st->TargetsType)) {
        wsm_targets *t = &((wsm_TargetsObject *)targets)->t;
        *hs = t->native;
        *n = t->nnative;
        return 0;
    }
    PyErr_Clear();
    PyObject *seq = PySequence_Fast(targets, "targets must be Targets or an iterable of handles");
    if (seq == NULL)
        return -1;
    Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
    uint64_t *arr = PyMem_Malloc((size_t)(len ? len : 1) * sizeof(uint64_t));
    if (arr == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        if (wsm_handle_arg(PySequence_Fast_GET_ITEM(seq, i), &arr[i]) < 0) {
            PyMem_Free(arr);
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    *hs = arr;
    *n = (size_t)len;
    *owned = arr;
    return 0;
}

static PyObject *Engine_fanout(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    wsm_payload pl;
    const uint64_t *hs;
    size_t n;
    uint64_t *owned;
    wsm_engine *e = wsm_engine_of(self);
    if (e == NULL)
        return NULL;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "fanout(targets, data) takes 2 arguments");
        return NULL;
    }
    if (wsm_fanout_handles(self, args[0], &hs, &n, &owned) < 0)
        return NULL;
    if (wsm_payload_get(args[1], &pl) < 0) {
        PyMem_Free(owned);
        return NULL;
    }
    long live = 0;
    if (n) {
        /* The arguments keep the payload and the handle array alive while the GIL is released. */
        Py_BEGIN_ALLOW_THREADS
        wsm_frame *f = wsm_frame_encode(pl.opcode, pl.p, (size_t)pl.n);
        live = f ? wsm_engine_fanout(e, hs, n, f) : -1;
        Py_END_ALLOW_THREADS
    }
    wsm_payload_release(&pl);
    PyMem_Free(owned);
    if (live < 0)
        return PyErr_NoMemory();
    return PyLong_FromLong(live);
}

static PyObject *Engine_close(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"handle", "code", "reason", "why", NULL};
    PyObject *ho;
    int code = 1000, why = WSM_R_NORMAL;
    const char *reason = "";
    Py_ssize_t rlen = 0;
    uint64_t h;
    wsm_engine *e = wsm_engine_of(self);
    if (e == NULL || !PyArg_ParseTupleAndKeywords(args, kw, "O|is#i:close", kwlist, &ho, &code,
                                                  &reason, &rlen, &why))
        return NULL;
    if (wsm_handle_arg(ho, &h) < 0)
        return NULL;
    if (code < 1000 || code > 4999 || why < 0 || why >= WSM_R_COUNT) {
        PyErr_Format(PyExc_ValueError, "invalid close code %d or reason kind %d", code, why);
        return NULL;
    }
    if (rlen > 123) { /* a Close frame holds 123 bytes of reason: cut at a character boundary */
        rlen = 123;
        while (rlen > 0 && ((unsigned char)reason[rlen] & 0xC0) == 0x80)
            rlen--;
    }
    return PyBool_FromLong(wsm_engine_close(e, h, code, reason, (size_t)rlen, why));
}

static PyObject *Engine_ack(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t h;
    wsm_engine *e = wsm_engine_of(self);
    if (e == NULL)
        return NULL;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "ack(handle, nbytes) takes 2 arguments");
        return NULL;
    }
    if (wsm_handle_arg(args[0], &h) < 0)
        return NULL;
    Py_ssize_t nbytes = PyLong_AsSsize_t(args[1]);
    if (nbytes == -1 && PyErr_Occurred())
        return NULL;
    if (nbytes > 0)
        wsm_engine_ack(e, h, (size_t)nbytes);
    Py_RETURN_NONE;
}

static PyObject *wsm_event_payload(const wsm_event *ev)
{
    switch (ev->kind) {
    case WSM_EV_TEXT: {
        PyObject *s = PyUnicode_DecodeUTF8((const char *)ev->data, (Py_ssize_t)ev->len, NULL);
        if (s == NULL) { /* wslay validated it; never expected */
            PyErr_Clear();
            s = PyUnicode_DecodeUTF8((const char *)ev->data, (Py_ssize_t)ev->len, "replace");
        }
        return s;
    }
    case WSM_EV_BINARY:
        return PyBytes_FromStringAndSize((const char *)ev->data, (Py_ssize_t)ev->len);
    case WSM_EV_DISCONNECT: {
        /* The engine validated the peer's reason; decoded leniently all the same, so that no
         * byte from a peer can make drain() fail for everybody else's events. */
        PyObject *reason = PyUnicode_DecodeUTF8(ev->data ? (const char *)ev->data : "",
                                                (Py_ssize_t)ev->len, "replace");
        if (reason == NULL)
            return NULL;
        return Py_BuildValue("(iNs)", (int)ev->code, reason,
                             wsm_reason_name(ev->why));
    }
    default:
        Py_RETURN_NONE;
    }
}

static PyObject *Engine_drain(PyObject *self, PyObject *unused)
{
    (void)unused;
    wsm_engine *e = wsm_engine_of(self);
    if (e == NULL)
        return NULL;
    wsm_event *evs;
    size_t n = wsm_engine_take_events(e, &evs);
    PyObject *out = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; out != NULL && i < n; i++) {
        PyObject *payload = wsm_event_payload(&evs[i]);
        /* A message's nbytes is its charge (payload + WSM_MSG_CHARGE): what ack() gives back. */
        int msg = evs[i].kind == WSM_EV_TEXT || evs[i].kind == WSM_EV_BINARY;
        size_t nbytes = msg ? wsm_msg_charge(evs[i].len) : evs[i].len;
        PyObject *t = payload ? Py_BuildValue("(iKNn)", (int)evs[i].kind,
                                              (unsigned long long)evs[i].handle, payload,
                                              (Py_ssize_t)nbytes)
                              : NULL;
        if (t == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, (Py_ssize_t)i, t);
    }
    wsm_engine_event_free(evs, n);
    return out;
}

static PyObject *Engine_fileno(PyObject *self, PyObject *unused)
{
    (void)unused;
    wsm_engine *e = wsm_engine_of(self);
    return e ? PyLong_FromLong(e->evt_efd) : NULL;
}

static int wsm_stat_put(PyObject *d, const char *k, uint64_t v)
{
    PyObject *o = PyLong_FromUnsignedLongLong(v);
    int r = o ? PyDict_SetItemString(d, k, o) : -1;
    Py_XDECREF(o);
    return r;
}

#define WSM_LOAD(x) atomic_load_explicit(&(x), memory_order_relaxed)

static PyObject *Engine_stats(PyObject *self, PyObject *unused)
{
    (void)unused;
    wsm_engine *e = wsm_engine_of(self);
    if (e == NULL)
        return NULL;
    wsm_counters *s = &e->host.st;
    PyObject *d = PyDict_New(), *disc = PyDict_New();
    if (d == NULL || disc == NULL)
        goto fail;
    if (wsm_stat_put(d, "connections", WSM_LOAD(s->connections)) < 0 ||
        wsm_stat_put(d, "total_connections", WSM_LOAD(s->total_connections)) < 0 ||
        wsm_stat_put(d, "bytes_in", WSM_LOAD(s->bytes_in)) < 0 ||
        wsm_stat_put(d, "bytes_out", WSM_LOAD(s->bytes_out)) < 0 ||
        wsm_stat_put(d, "messages_in", WSM_LOAD(s->messages_in)) < 0 ||
        wsm_stat_put(d, "messages_out", WSM_LOAD(s->messages_out)) < 0 ||
        wsm_stat_put(d, "frames_dropped", WSM_LOAD(s->frames_dropped)) < 0 ||
        wsm_stat_put(d, "queued_bytes", WSM_LOAD(s->queued_bytes)) < 0 ||
        wsm_stat_put(d, "pings_sent", WSM_LOAD(s->pings_sent)) < 0 ||
        wsm_stat_put(d, "write_syscalls", WSM_LOAD(s->write_syscalls)) < 0 ||
        wsm_stat_put(d, "inbound_bytes", WSM_LOAD(s->inbound_bytes)) < 0 ||
        wsm_stat_put(d, "read_pauses", WSM_LOAD(s->read_pauses)) < 0 ||
        wsm_stat_put(d, "event_queue_bytes", WSM_LOAD(s->event_queue_bytes)) < 0 ||
        wsm_stat_put(d, "event_queue_pauses", WSM_LOAD(s->event_queue_pauses)) < 0 ||
        wsm_stat_put(d, "messages_deflated", WSM_LOAD(s->deflated)) < 0 ||
        wsm_stat_put(d, "messages_inflated", WSM_LOAD(s->inflated)) < 0 ||
        wsm_stat_put(d, "deflate_shared", WSM_LOAD(s->deflate_shared)) < 0 ||
        wsm_stat_put(d, "wslay_contexts", WSM_LOAD(s->wslay_contexts)) < 0 ||
        wsm_stat_put(d, "message_charge", WSM_MSG_CHARGE) < 0 ||
        wsm_stat_put(d, "inbound_bound", wsm_conn_inbound_bound(&e->host.o)) < 0)
        goto fail;
    for (int i = 0; i < WSM_R_COUNT; i++)
        if (wsm_stat_put(disc, wsm_reason_name(i), WSM_LOAD(s->disconnects[i])) < 0)
            goto fail;
    if (PyDict_SetItemString(d, "disconnects", disc) < 0 ||
        PyDict_SetItemString(d, "running", (e->started && !e->joined) ? Py_True : Py_False) < 0)
        goto fail;
    Py_DECREF(disc);
    return d;
fail:
    Py_XDECREF(d);
    Py_XDECREF(disc);
    return NULL;
}

static PyObject *Engine_options(PyObject *self, void *closure)
{
    (void)closure;
    wsm_engine *e = wsm_engine_of(self);
    if (e == NULL)
        return NULL;
    const wsm_conn_opts *o = &e->host.o;
    return Py_BuildValue("{sdsdsnsnsnsdsdsnsnsn}", "ping_interval", o->ping_interval / 1e9,
                         "ping_timeout", o->ping_timeout / 1e9, "max_message_size",
                         (Py_ssize_t)o->max_message_size, "high_water", (Py_ssize_t)o->high_water,
                         "max_queue_bytes", (Py_ssize_t)o->max_queue_bytes, "send_timeout",
                         o->send_timeout / 1e9, "close_timeout", o->close_timeout / 1e9,
                         "read_limit", (Py_ssize_t)o->read_limit, "event_queue_limit",
                         (Py_ssize_t)e->evq_limit, "compress_threshold",
                         (Py_ssize_t)o->compress_threshold);
}

static PyObject *Engine_shutdown(PyObject *self, PyObject *unused)
{
    (void)unused;
    wsm_engine *e = wsm_engine_of(self);
    if (e == NULL)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    wsm_engine_stop(e);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef Engine_methods[] = {
    {"register", (PyCFunction)(void (*)(void))Engine_register, METH_VARARGS | METH_KEYWORDS,
     "register(fd, response=b'', data=b'', *, deflate=0, takeover=False) -> handle: the engine "
     "takes a duplicate of fd, writes response first and parses data as already received; "
     "deflate: permessage-deflate was negotiated with that server_max_window_bits (8-15), 0 if "
     "not; takeover: the peer keeps its inflate window between messages (server_no_context_takeover "
     "was not answered), so broadcasts may reach it through a shared compression context."},
    {"send", (PyCFunction)(void (*)(void))Engine_send, METH_FASTCALL,
     "send(handle, data) -> bool: str is a text frame, bytes a binary frame."},
    {"fanout", (PyCFunction)(void (*)(void))Engine_fanout, METH_FASTCALL,
     "fanout(targets, data) -> int: one frame to every native receiver, GIL released."},
    {"close", (PyCFunction)(void (*)(void))Engine_close, METH_VARARGS | METH_KEYWORDS,
     "close(handle, code=1000, reason='', why=0) -> bool: starts the closing handshake."},
    {"ack", (PyCFunction)(void (*)(void))Engine_ack, METH_FASTCALL,
     "ack(handle, nbytes): inbound bytes consumed by the app (read backpressure)."},
    {"drain", Engine_drain, METH_NOARGS,
     "drain() -> [(kind, handle, payload, nbytes)]: events since the last call."},
    {"fileno", Engine_fileno, METH_NOARGS, "fileno() -> the eventfd that announces events."},
    {"stats", Engine_stats, METH_NOARGS, "stats() -> dict of counters."},
    {"shutdown", Engine_shutdown, METH_NOARGS,
     "shutdown(): closes every connection with 1012 and joins the I/O thread."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"options", Engine_options, NULL, "the options the engine runs with", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Engine_slots[] = {
    {Py_tp_new, Engine_new},
    {Py_tp_dealloc, Engine_dealloc},
    {Py_tp_methods, Engine_methods},
    {Py_tp_getset, Engine_getset},
    {Py_tp_doc, "Engine(*, ping_interval=30.0, ping_timeout=10.0, max_message_size=16 MiB, "
                "high_water=1 MiB, max_queue_bytes=16 MiB, send_timeout=5.0, close_timeout=2.0, "
                "read_limit=1 MiB, event_queue_limit=64 MiB, compress_threshold=256): the native "
                "plane's I/O thread."},
    {0, NULL},
};

static PyType_Spec Engine_spec = {
    .name = "wsmanager._core.Engine",
    .basicsize = sizeof(wsm_EngineObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Engine_slots,
};

/* The kernel's struct sched_attr (SCHED_ATTR_SIZE_VER1); glibc has no wrapper before 2.41. */
typedef struct wsm_sched_attr {
    uint32_t size, policy;
    uint64_t flags;
    int32_t nice;
    uint32_t priority;
    uint64_t runtime, deadline, period;
    uint32_t util_min, util_max;
} wsm_sched_attr;

#define WSM_SCHED_FLAG_RESET_ON_FORK 0x01

static int wsm_sched_get(wsm_sched_attr *a)
{
    memset(a, 0, sizeof *a);
    return (int)syscall(SYS_sched_getattr, 0, a, (unsigned)sizeof *a, 0u);
}

/* set_thread_slice(ns): EEVDF (Linux >= 6.12) lets a fair-class thread ask for a shorter slice,
 * which makes it preempt the running task when it wakes. The policy, nice value and
 * reset-on-fork flag are read first and written back unchanged; only the slice moves. */
static PyObject *wsm_set_thread_slice(PyObject *module, PyObject *arg)
{
    (void)module;
    if (!PyLong_Check(arg))
        return PyErr_Format(PyExc_TypeError, "set_thread_slice() takes an int (ns), not %.100s",
                            Py_TYPE(arg)->tp_name);
    long long ns = PyLong_AsLongLong(arg);
    if (ns == -1 && PyErr_Occurred())
        return NULL;
    if (ns < 0)
        return PyErr_Format(PyExc_ValueError, "set_thread_slice(): ns must be >= 0, got %lld", ns);
    wsm_sched_attr a;
    if (wsm_sched_get(&a) != 0)
        return errno == ENOSYS ? PyLong_FromLong(0) : PyErr_SetFromErrno(PyExc_OSError);
    if (a.policy != SCHED_OTHER && a.policy != SCHED_BATCH)
        return PyLong_FromLong(0); /* real-time or idle: not ours to touch */
    a.size = sizeof a;
    a.flags &= WSM_SCHED_FLAG_RESET_ON_FORK;
    a.runtime = (uint64_t)ns;
    if (syscall(SYS_sched_setattr, 0, &a, 0u) != 0 || wsm_sched_get(&a) != 0)
        return PyLong_FromLong(0); /* EPERM under a seccomp or container policy, EINVAL: no slices */
    return PyLong_FromUnsignedLongLong(a.runtime);
}

static PyMethodDef wsm_engine_functions[] = {
    {"set_thread_slice", wsm_set_thread_slice, METH_O,
     "set_thread_slice(ns) -> the calling thread's scheduler slice in ns now in effect, 0 when the\n"
     "kernel has no per-thread slices (before Linux 6.12) or the thread is not in the fair class.\n"
     "ns=0 gives the kernel's default slice back."},
    {NULL, NULL, 0, NULL},
};

#endif /* __linux__ */

/* Elsewhere the module has no Engine: wsmanager.uvicorn refuses to load, the manager runs on
 * the portable plane. */
int wsm_engine_exec(PyObject *module, wsm_module_state *st)
{
#ifndef __linux__
    (void)module;
    st->EngineType = NULL;
    return 0;
#else
    static const struct { const char *name; int value; } consts[] = {
        {"EV_TEXT", WSM_EV_TEXT}, {"EV_BINARY", WSM_EV_BINARY},
        {"EV_DISCONNECT", WSM_EV_DISCONNECT}, {"EV_WRITE_PAUSED", WSM_EV_WRITE_PAUSED},
        {"EV_WRITE_RESUMED", WSM_EV_WRITE_RESUMED}, {"EV_READ_PAUSED", WSM_EV_READ_PAUSED},
    };
    st->EngineType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &Engine_spec, NULL);
    if (st->EngineType == NULL || PyModule_AddType(module, st->EngineType) < 0)
        return -1;
    for (size_t i = 0; i < sizeof(consts) / sizeof(consts[0]); i++)
        if (PyModule_AddIntConstant(module, consts[i].name, consts[i].value) < 0)
            return -1;
    return PyModule_AddFunctions(module, wsm_engine_functions);
#endif
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
