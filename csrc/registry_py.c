/* wsmanager._core.Registry: the Python face of the connection registry (registry.h).
 *
 * The registry's mutex is taken with the GIL released whenever it may be contended, and every
 * loop over connections runs without the GIL; Python objects are only built after the mutex is
 * dropped, from copies taken under it. */
#include "pyutil.h"

#include <stdlib.h>
#include <string.h>

#include "clock.h"

/* ---- Registry -------------------------------------------------------------------------- */

/* The row Registry.info() returns, read by name (an index still works). */
static PyStructSequence_Field wsm_info_fields[] = {
    {"connection_id", NULL}, {"user_id", "None for anonymous connections"},
    {"state", "a STATE_* constant"}, {"connected_at", "monotonic_ns() at add()"},
    {"last_seen", "monotonic_ns() of the last sign of life"}, {"last_ping", "monotonic_ns(), 0 for none"},
    {"messages_in", NULL}, {"messages_out", NULL}, {"bytes_in", NULL}, {"bytes_out", NULL},
    {"native", "the engine handle, 0 on the portable plane"}, {NULL, NULL},
};

PyStructSequence_Desc wsm_info_desc = {
    .name = "wsmanager._core.ConnectionRow",
    .doc = "One connection as the registry holds it (Registry.info()).",
    .fields = wsm_info_fields,
    .n_in_sequence = 11,
};

typedef struct RegistryObject {
    PyObject_HEAD
    wsm_registry *r;
    /* stats()' connections_by_user as last built, and the registry's users_version then:
     * monitoring polls it far more often than the set of users changes (a copy is handed out,
     * 10 000 users: ~0.1 ms instead of ~1 ms to rebuild). */
    PyObject *byuser;
    uint64_t byuser_version;
} RegistryObject;

#define REG(self) (((RegistryObject *)(self))->r)

static PyObject *Registry_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"capacity", "stale_after", NULL};
    Py_ssize_t capacity = 1024;
    double stale_after = 0.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|nd:Registry", kwlist, &capacity, &stale_after))
        return NULL;
    if (capacity < 0 || capacity > (Py_ssize_t)UINT32_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "capacity must be between 0 and 2**31");
        return NULL;
    }
    if (!(stale_after >= 0.0)) {
        PyErr_SetString(PyExc_ValueError, "stale_after must be >= 0");
        return NULL;
    }
    RegistryObject *self = (RegistryObject *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    self->r = wsm_registry_new((uint32_t)capacity);
    if (!self->r) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    wsm_registry_set_stale_after(self->r, (int64_t)(stale_after * 1e9));
    return (PyObject *)self;
}

static int Registry_traverse(PyObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(((RegistryObject *)self)->byuser);
    return 0;
}

static int Registry_clear(PyObject *self)
{
    Py_CLEAR(((RegistryObject *)self)->byuser);
    return 0;
}

static void Registry_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Registry_clear(self);
    wsm_registry_free(REG(self));
    tp->tp_free(self);
    Py_DECREF(tp);
}

static Py_ssize_t Registry_len(PyObject *self)
{
    return (Py_ssize_t)__atomic_load_n(&REG(self)->live, __ATOMIC_RELAXED);
}

static PyObject *Registry_add(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"connection_id", "user_id", "max_per_user", "max_total", NULL};
    PyObject *cid_o, *user_o = Py_None;
    Py_ssize_t max_per_user = 0, max_total = 0, clen, ulen = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O$nn:add", kwlist, &cid_o, &user_o,
                                     &max_per_user, &max_total))
        return NULL;
    const char *cid = wsm_str_arg(cid_o, "connection_id", &clen, 0), *user = NULL;
    if (!cid)
        return NULL;
    if (user_o != Py_None && !(user = wsm_str_arg(user_o, "user_id", &ulen, 0)))
        return NULL;
    if (max_per_user < 0 || max_total < 0 || max_per_user > UINT32_MAX || max_total > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "limits must be >= 0 (0 means no limit)");
        return NULL;
    }
    wsm_registry *r = REG(self);
    wsm_handle h = 0;
    wsm_lock(r);
    int rc = wsm_registry_add(r, cid, (size_t)clen, user, (size_t)ulen, user != NULL,
                              (uint32_t)max_per_user, (uint32_t)max_total, wsm_clock_ns(), &h);
    wsm_unlock(r);
    if (rc == WSM_OK)
        return PyLong_FromUnsignedLongLong(h);
    if (rc == WSM_EDUP)
        return PyErr_Format(PyExc_ValueError, "connection_id %R is already registered", cid_o);
    if (rc == WSM_ELIMIT_USER || rc == WSM_ELIMIT_TOTAL) {
        wsm_module_state *st = PyType_GetModuleState(Py_TYPE(self));
        const char *scope = rc == WSM_ELIMIT_USER ? "user" : "total";
        PyObject *exc = PyObject_CallFunction(st->LimitReached, "s",
                                              rc == WSM_ELIMIT_USER ? "per-user connection limit reached"
                                                                    : "connection limit reached");
        if (!exc)
            return NULL;
        PyObject *sc = PyUnicode_FromString(scope);
        if (!sc || PyObject_SetAttrString(exc, "scope", sc) < 0) {
            Py_XDECREF(sc);
            Py_DECREF(exc);
            return NULL;
        }
        Py_DECREF(sc);
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
        return NULL;
    }
    return PyErr_NoMemory();
}

/* The one-handle methods share a shape: parse a handle, lock, act, unlock. */
#define WSM_WITH_CONN(self, arg, c, body)                                                     \
    do {                                                                                      \
        wsm_handle h_;                                                                        \
        if (wsm_reg_handle_arg((arg), &h_) < 0)                                                   \
            return NULL;                                                                      \
        wsm_registry *r_ = REG(self);                                                         \
        wsm_lock(r_);                                                                         \
        wsm_conn *c = wsm_registry_get(r_, h_);                                               \
        body;                                                                                 \
        wsm_unlock(r_);                                                                       \
    } while (0)

static PyObject *Registry_remove(PyObject *self, PyObject *arg)
{
    wsm_handle h;
    if (wsm_reg_handle_arg(arg, &h) < 0)
        return NULL;
    wsm_registry *r = REG(self);
    wsm_lock(r);
    int rc = wsm_registry_remove(r, h);
    wsm_unlock(r);
    return PyBool_FromLong(rc == WSM_OK);
}

static PyObject *Registry_find(PyObject *self, PyObject *arg)
{
    Py_ssize_t len;
    const char *cid = wsm_str_arg(arg, "connection_id", &len, 1);
    if (!cid)
        return NULL;
    wsm_registry *r = REG(self);
    wsm_handle h;
    wsm_lock(r);
    int rc = wsm_registry_find(r, cid, (size_t)len, &h);
    wsm_unlock(r);
    if (rc != WSM_OK)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(h);
}

/* The one string a lookup copied under the lock, or None when it found nothing. */
static PyObject *wsm_snap_first(wsm_snap *s, int found)
{
    if (!found) {
        wsm_snap_free(s);
        Py_RETURN_NONE;
    }
    PyObject *list = wsm_snap_list(s);
    if (!list)
        return NULL;
    PyObject *res = Py_NewRef(PyList_GET_ITEM(list, 0));
    Py_DECREF(list);
    return res;
}

static PyObject *Registry_connection_id(PyObject *self, PyObject *arg)
{
    wsm_snap s = {0};
    int found = 0;
    WSM_WITH_CONN(self, arg, c, if (c) { found = 1; wsm_snap_add(&s, c->cid, c->cid_len, 0); });
    return wsm_snap_first(&s, found);
}

static PyObject *Registry_user_id(PyObject *self, PyObject *arg)
{
    wsm_snap s = {0};
    int found = 0;
    WSM_WITH_CONN(self, arg, c, if (c && c->user != WSM_NONE) {
        found = 1;
        wsm_snap_add(&s, r_->users[c->user].name, r_->users[c->user].len, 0);
    });
    return wsm_snap_first(&s, found);
}

static PyObject *Registry_state(PyObject *self, PyObject *arg)
{
    int state = WSM_FREE;
    WSM_WITH_CONN(self, arg, c, if (c) state = c->state);
    return PyLong_FromLong(state);
}

static PyObject *Registry_set_state(PyObject *self, PyObject *args)
{
    PyObject *ho;
    int state;
    if (!PyArg_ParseTuple(args, "Oi:set_state", &ho, &state))
        return NULL;
    if (state < WSM_CONNECTING || state > WSM_CLOSED) {
        PyErr_Format(PyExc_ValueError, "state must be one of STATE_CONNECTING..STATE_CLOSED, not %d", state);
        return NULL;
    }
    wsm_handle h;
    if (wsm_reg_handle_arg(ho, &h) < 0)
        return NULL;
    wsm_registry *r = REG(self);
    wsm_lock(r);
    int rc = wsm_registry_set_state(r, h, state);
    wsm_unlock(r);
    if (rc == WSM_ENOMEM)
        return PyErr_NoMemory();
    return PyBool_FromLong(rc == WSM_OK);
}

static PyObject *Registry_set_native(PyObject *self, PyObject *args)
{
    PyObject *ho;
    unsigned long long native;
    if (!PyArg_ParseTuple(args, "OK:set_native", &ho, &native))
        return NULL;
    int ok = 0;
    WSM_WITH_CONN(self, ho, c, if (c) {
        r_->native_live += (native != 0) - (c->native != 0);
        c->native = native;
        ok = 1;
    });
    return PyBool_FromLong(ok);
}

static PyObject *Registry_native(PyObject *self, PyObject *arg)
{
    uint64_t native = 0;
    WSM_WITH_CONN(self, arg, c, if (c) native = c->native);
    return PyLong_FromUnsignedLongLong(native);
}

static PyObject *Registry_touch(PyObject *self, PyObject *args)
{
    PyObject *ho;
    long long nbytes = -1;
    if (!PyArg_ParseTuple(args, "O|L:touch", &ho, &nbytes))
        return NULL;
    int ok = 0;
    int64_t now = wsm_clock_ns();
    WSM_WITH_CONN(self, ho, c, if (c) {
        ok = 1;
        wsm_registry_touch(r_, c, now);
        if (nbytes >= 0) {
            c->msgs_in++;
            c->bytes_in += (uint64_t)nbytes;
            r_->msgs_in++;
            r_->bytes_in += (uint64_t)nbytes;
        }
    });
    return PyBool_FromLong(ok);
}

static PyObject *Registry_set_last_ping(PyObject *self, PyObject *args)
{
    PyObject *ho;
    long long when;
    if (!PyArg_ParseTuple(args, "OL:set_last_ping", &ho, &when))
        return NULL;
    int ok = 0;
    WSM_WITH_CONN(self, ho, c, if (c) {
        ok = 1;
        c->last_ping = when;
        wsm_registry_touch(r_, c, when);
    });
    return PyBool_FromLong(ok);
}

static PyObject *Registry_record_sent(PyObject *self, PyObject *args)
{
    PyObject *ho;
    unsigned long long nbytes;
    if (!PyArg_ParseTuple(args, "OK:record_sent", &ho, &nbytes))
        return NULL;
    int ok = 0;
    WSM_WITH_CONN(self, ho, c, if (c) {
        ok = 1;
        c->msgs_out++;
        c->bytes_out += nbytes;
        r_->msgs_out++;
        r_->bytes_out += nbytes;
    });
    return PyBool_FromLong(ok);
}

static PyObject *Registry_record_sent_many(PyObject *self, PyObject *args)
{
    PyObject *to;
    unsigned long long nbytes;
    if (!PyArg_ParseTuple(args, "OK:record_sent_many", &to, &nbytes))
        return NULL;
    wsm_module_state *st = PyType_GetModuleState(Py_TYPE(self));
    if (!Py_IS_TYPE(to, st->TargetsType)) {
        PyErr_Format(PyExc_TypeError, "targets must be Targets, not %.100s", Py_TYPE(to)->tp_name);
        return NULL;
    }
    wsm_targets *t = &((wsm_TargetsObject *)to)->t;
    wsm_registry *r = REG(self);
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&r->lock);
    for (int pass = 0; pass < 2; pass++) {
        const wsm_handle *hs = pass ? t->native_reg : t->portable;
        size_t n = pass ? t->nnative : t->nportable;
        for (size_t i = 0; i < n; i++) {
            wsm_conn *c = wsm_registry_get(r, hs[i]);
            if (c) {
                c->msgs_out++;
                c->bytes_out += nbytes;
                r->msgs_out++;
                r->bytes_out += nbytes;
            }
        }
    }
    pthread_mutex_unlock(&r->lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *Registry_record_failure(PyObject *self, PyObject *args)
{
    unsigned long long n = 1;
    if (!PyArg_ParseTuple(args, "|K:record_failure", &n))
        return NULL;
    wsm_registry *r = REG(self);
    wsm_lock(r);
    r->send_failures += n;
    wsm_unlock(r);
    Py_RETURN_NONE;
}

static PyObject *Registry_record_disconnect(PyObject *self, PyObject *arg)
{
    long reason = PyLong_AsLong(arg);
    if (reason == -1 && PyErr_Occurred())
        return NULL;
    if (reason < 0 || reason >= WSM_R_COUNT) {
        PyErr_Format(PyExc_ValueError, "reason must be an index into REASONS, not %ld", reason);
        return NULL;
    }
    wsm_registry *r = REG(self);
    wsm_lock(r);
    r->disconnects[reason]++;
    wsm_unlock(r);
    Py_RETURN_NONE;
}

static PyObject *Registry_expire(PyObject *self, PyObject *arg)
{
    wsm_handle h;
    if (wsm_reg_handle_arg(arg, &h) < 0)
        return NULL;
    wsm_registry *r = REG(self);
    wsm_lock(r);
    int rc = wsm_registry_expire(r, h);
    wsm_unlock(r);
    if (rc == WSM_ENOMEM)
        return PyErr_NoMemory();
    return PyBool_FromLong(rc == WSM_OK);
}

static PyObject *Registry_membership(PyObject *self, PyObject *args, int join)
{
    PyObject *ho, *cho;
    if (!PyArg_ParseTuple(args, join ? "OO:join" : "OO:leave", &ho, &cho))
        return NULL;
    wsm_handle h;
    Py_ssize_t len;
    const char *name;
    if (wsm_reg_handle_arg(ho, &h) < 0 || !(name = wsm_str_arg(cho, "channel", &len, 0)))
        return NULL;
    wsm_registry *r = REG(self);
    wsm_lock(r);
    int rc = join ? wsm_registry_join(r, h, name, (size_t)len) : wsm_registry_leave(r, h, name, (size_t)len);
    wsm_unlock(r);
    if (rc == WSM_ENOMEM)
        return PyErr_NoMemory();
    if (rc == WSM_ENOTFOUND) {
        PyErr_SetString(PyExc_ValueError, "unknown connection (not registered or already removed)");
        return NULL;
    }
    return PyBool_FromLong(rc);
}

static PyObject *Registry_join(PyObject *self, PyObject *args) { return Registry_membership(self, args, 1); }
static PyObject *Registry_leave(PyObject *self, PyObject *args) { return Registry_membership(self, args, 0); }

static PyObject *Registry_channels_of(PyObject *self, PyObject *arg)
{
    wsm_snap s = {0};
    WSM_WITH_CONN(self, arg, c, if (c) {
        for (uint16_t k = 0; k < c->nchans; k++)
            wsm_snap_add(&s, r_->chans[c->chans[k]].name, r_->chans[c->chans[k]].len, 0);
    });
    return wsm_snap_list(&s);
}

enum { WSM_RESOLVE_ALL, WSM_RESOLVE_USER, WSM_RESOLVE_CHANNEL };

static PyObject *Registry_resolve(PyObject *self, int kind, PyObject *key_o, PyObject *exclude)
{
    Py_ssize_t klen = 0;
    const char *key = NULL;
    if (kind != WSM_RESOLVE_ALL &&
        !(key = wsm_str_arg(key_o, kind == WSM_RESOLVE_USER ? "user_id" : "channel", &klen, 0)))
        return NULL;
    wsm_excl e;
    if (wsm_excl_init(&e, exclude) < 0) {
        wsm_excl_free(&e);
        return NULL;
    }
    wsm_module_state *st = PyType_GetModuleState(Py_TYPE(self));
    wsm_TargetsObject *to = PyObject_GC_New(wsm_TargetsObject, st->TargetsType);
    if (!to) {
        wsm_excl_free(&e);
        return NULL;
    }
    memset(&to->t, 0, sizeof(to->t));
    wsm_registry *r = REG(self);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&r->lock);
    size_t nexcl = wsm_excl_resolve(r, &e);
    if (kind == WSM_RESOLVE_ALL)
        rc = wsm_registry_resolve_all(r, e.handles, nexcl, &to->t);
    else if (kind == WSM_RESOLVE_USER)
        rc = wsm_registry_resolve_user(r, key, (size_t)klen, e.handles, nexcl, &to->t);
    else
        rc = wsm_registry_resolve_channel(r, key, (size_t)klen, e.handles, nexcl, &to->t);
    pthread_mutex_unlock(&r->lock);
    Py_END_ALLOW_THREADS
    wsm_excl_free(&e);
    PyObject_GC_Track((PyObject *)to);
    if (rc != WSM_OK) {
        Py_DECREF(to);
        return PyErr_NoMemory();
    }
    return (PyObject *)to;
}

/* resolve_all(exclude=None), resolve_user(user_id, exclude=None), resolve_channel(channel,
 * exclude=None): one parser, the key present unless the kind is ALL. */
static PyObject *Registry_resolve_args(PyObject *self, PyObject *args, PyObject *kwds,
                                       const char *fmt, char **kwlist, int kind)
{
    PyObject *key = NULL, *exclude = Py_None;
    int ok = kind == WSM_RESOLVE_ALL
                 ? PyArg_ParseTupleAndKeywords(args, kwds, fmt, kwlist, &exclude)
                 : PyArg_ParseTupleAndKeywords(args, kwds, fmt, kwlist, &key, &exclude);
    return ok ? Registry_resolve(self, kind, key, exclude) : NULL;
}

static PyObject *Registry_resolve_all(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"exclude", NULL};
    return Registry_resolve_args(self, args, kwds, "|O:resolve_all", kwlist, WSM_RESOLVE_ALL);
}

static PyObject *Registry_resolve_user(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"user_id", "exclude", NULL};
    return Registry_resolve_args(self, args, kwds, "O|O:resolve_user", kwlist, WSM_RESOLVE_USER);
}

static PyObject *Registry_resolve_channel(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"channel", "exclude", NULL};
    return Registry_resolve_args(self, args, kwds, "O|O:resolve_channel", kwlist,
                                 WSM_RESOLVE_CHANNEL);
}

static PyObject *Registry_sweep(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"now_ns", "max", NULL};
    PyObject *now_o = Py_None;
    Py_ssize_t max = 65536;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|On:sweep", kwlist, &now_o, &max))
        return NULL;
    if (max <= 0) {
        PyErr_SetString(PyExc_ValueError, "max must be > 0");
        return NULL;
    }
    int64_t now;
    if (now_o == Py_None) {
        now = wsm_clock_ns();
    } else {
        now = PyLong_AsLongLong(now_o);
        if (now == -1 && PyErr_Occurred())
            return NULL;
    }
    wsm_handle *out = malloc((size_t)max * sizeof(wsm_handle));
    if (!out)
        return PyErr_NoMemory();
    wsm_registry *r = REG(self);
    long n;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&r->lock);
    n = wsm_registry_sweep(r, now, out, (size_t)max);
    pthread_mutex_unlock(&r->lock);
    Py_END_ALLOW_THREADS
    if (n < 0) {
        free(out);
        return PyErr_NoMemory();
    }
    _Static_assert(sizeof(unsigned long long) == sizeof(wsm_handle), "array('Q') holds handles");
    /* One array('Q') rather than a list: a mass timeout of 100 000 connections would spend
     * more (with the GIL held) building 100 000 ints than finding them. */
    wsm_module_state *st = PyType_GetModuleState(Py_TYPE(self));
    PyObject *arr = PyObject_CallFunction(st->array_type, "sy#", "Q", (const char *)out,
                                          (Py_ssize_t)((size_t)n * sizeof(wsm_handle)));
    free(out);
    return arr;
}

static PyObject *Registry_info(PyObject *self, PyObject *arg)
{
    wsm_conn copy;
    wsm_snap s = {0};
    int found = 0, has_user = 0;
    WSM_WITH_CONN(self, arg, c, if (c) {
        found = 1;
        copy = *c;
        wsm_snap_add(&s, c->cid, c->cid_len, 0);
        if (c->user != WSM_NONE) {
            has_user = 1;
            wsm_snap_add(&s, r_->users[c->user].name, r_->users[c->user].len, 0);
        }
    });
    if (!found) {
        wsm_snap_free(&s);
        Py_RETURN_NONE;
    }
    PyObject *mod = PyType_GetModule(Py_TYPE(self));
    PyObject *strs = mod ? wsm_snap_list(&s) : NULL;
    if (!strs)
        return NULL;
    PyObject *res = PyStructSequence_New(wsm_state(mod)->InfoType);
    PyObject *fields[] = {
        Py_NewRef(PyList_GET_ITEM(strs, 0)), Py_NewRef(has_user ? PyList_GET_ITEM(strs, 1) : Py_None),
        PyLong_FromLong(copy.state), PyLong_FromLongLong(copy.connected_at),
        PyLong_FromLongLong(copy.last_seen), PyLong_FromLongLong(copy.last_ping),
        PyLong_FromUnsignedLongLong(copy.msgs_in), PyLong_FromUnsignedLongLong(copy.msgs_out),
        PyLong_FromUnsignedLongLong(copy.bytes_in), PyLong_FromUnsignedLongLong(copy.bytes_out),
        PyLong_FromUnsignedLongLong(copy.native),
    };
    int ok = res != NULL;
    for (Py_ssize_t i = 0; i < (Py_ssize_t)(sizeof fields / sizeof fields[0]); i++) {
        ok &= fields[i] != NULL;
        if (res != NULL)
            PyStructSequence_SET_ITEM(res, i, fields[i]); /* steals; NULL is cleared below */
        else
            Py_XDECREF(fields[i]);
    }
    Py_DECREF(strs);
    if (!ok)
        Py_CLEAR(res);
    return res;
}

static PyObject *Registry_ids(PyObject *self, PyObject *unused)
{
    (void)unused;
    wsm_snap s = {0};
    wsm_registry *r = REG(self);
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&r->lock);
    for (uint32_t i = 0; i < r->nslots; i++)
        if (r->conns[i].gen & 1u)
            wsm_snap_add(&s, r->conns[i].cid, r->conns[i].cid_len, 0);
    pthread_mutex_unlock(&r->lock);
    Py_END_ALLOW_THREADS
    return wsm_snap_list(&s);
}

static void wsm_snap_users(wsm_registry *r, wsm_snap *s)
{
    for (uint32_t i = 0; i < r->nusers; i++)
        if (r->users[i].name)
            wsm_snap_add(s, r->users[i].name, r->users[i].len, r->users[i].count);
}

static PyObject *Registry_users(PyObject *self, PyObject *unused)
{
    (void)unused;
    wsm_snap s = {0};
    wsm_registry *r = REG(self);
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&r->lock);
    wsm_snap_users(r, &s);
    pthread_mutex_unlock(&r->lock);
    Py_END_ALLOW_THREADS
    return wsm_snap_dict(&s);
}

static PyObject *Registry_channels(PyObject *self, PyObject *unused)
{
    (void)unused;
    wsm_snap s = {0};
    wsm_registry *r = REG(self);
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&r->lock);
    for (uint32_t i = 0; i < r->nchans_; i++)
        if (r->chans[i].name)
            wsm_snap_add(&s, r->chans[i].name, r->chans[i].len, r->chans[i].count);
    pthread_mutex_unlock(&r->lock);
    Py_END_ALLOW_THREADS
    return wsm_snap_dict(&s);
}

/* Connection ids of a user's or a channel's members. */
static PyObject *Registry_member_ids(PyObject *self, PyObject *arg, int channel)
{
    Py_ssize_t len;
    const char *key = wsm_str_arg(arg, channel ? "channel" : "user_id", &len, 1);
    if (!key)
        return NULL;
    wsm_snap s = {0};
    wsm_registry *r = REG(self);
    uint32_t idx;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&r->lock);
    if (channel && wsm_strmap_get(&r->chan_map, key, (size_t)len, &idx)) {
        wsm_channel *ch = &r->chans[idx];
        for (uint32_t i = 0; i < ch->count; i++)
            wsm_snap_add(&s, r->conns[ch->members[i]].cid, r->conns[ch->members[i]].cid_len, 0);
    } else if (!channel && wsm_strmap_get(&r->user_map, key, (size_t)len, &idx)) {
        for (uint32_t sl = r->users[idx].head; sl != WSM_NONE; sl = r->conns[sl].user_next)
            wsm_snap_add(&s, r->conns[sl].cid, r->conns[sl].cid_len, 0);
    }
    pthread_mutex_unlock(&r->lock);
    Py_END_ALLOW_THREADS
    return wsm_snap_list(&s);
}

static PyObject *Registry_user_ids(PyObject *self, PyObject *arg) { return Registry_member_ids(self, arg, 0); }
static PyObject *Registry_channel_ids(PyObject *self, PyObject *arg) { return Registry_member_ids(self, arg, 1); }

static PyObject *Registry_user_count(PyObject *self, PyObject *arg)
{
    Py_ssize_t len;
    const char *key = wsm_str_arg(arg, "user_id", &len, 1);
    if (!key)
        return NULL;
    wsm_registry *r = REG(self);
    uint32_t idx, n = 0;
    wsm_lock(r);
    if (wsm_strmap_get(&r->user_map, key, (size_t)len, &idx))
        n = r->users[idx].count;
    wsm_unlock(r);
    return PyLong_FromUnsignedLong(n);
}

static int wsm_dict_set_u64(PyObject *d, const char *key, uint64_t v)
{
    PyObject *o = PyLong_FromUnsignedLongLong(v);
    if (!o)
        return -1;
    int rc = PyDict_SetItemString(d, key, o);
    Py_DECREF(o);
    return rc;
}

static PyObject *Registry_stats(PyObject *self, PyObject *unused)
{
    (void)unused;
    RegistryObject *ro = (RegistryObject *)self;
    wsm_registry *r = REG(self);
    wsm_snap users = {0};
    uint64_t v[12], disc[WSM_R_COUNT], version;
    int cached = ro->byuser != NULL; /* read with the GIL held */
    uint64_t cached_version = ro->byuser_version;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&r->lock);
    version = r->users_version;
    cached = cached && cached_version == version;
    if (!cached)
        wsm_snap_users(r, &users);
    v[0] = r->live; v[1] = r->open; v[2] = r->live_users; v[3] = r->live_chans;
    v[4] = r->total_connects; v[5] = r->msgs_out; v[6] = r->msgs_in; v[7] = r->bytes_out;
    v[8] = r->bytes_in; v[9] = r->send_failures; v[10] = r->sweep.len; v[11] = r->native_live;
    memcpy(disc, r->disconnects, sizeof(disc));
    pthread_mutex_unlock(&r->lock);
    Py_END_ALLOW_THREADS
    static const char *const names[12] = {
        "total_connections", "open_connections", "total_users", "total_channels", "total_connects",
        "messages_sent", "messages_received", "bytes_sent", "bytes_received", "send_failures",
        "sweep_heap_entries", "native_connections",
    };
    PyObject *d = PyDict_New(), *byuser = NULL, *dd = NULL;
    if (!d)
        goto fail;
    for (int i = 0; i < 12; i++)
        if (wsm_dict_set_u64(d, names[i], v[i]) < 0)
            goto fail;
    if (!cached) {
        PyObject *fresh = wsm_snap_dict(&users);
        users.buf = NULL; users.off = NULL; users.num = NULL;
        if (!fresh)
            goto fail;
        Py_XSETREF(ro->byuser, fresh);
        ro->byuser_version = version;
    }
    byuser = PyDict_Copy(ro->byuser);
    if (!byuser || PyDict_SetItemString(d, "connections_by_user", byuser) < 0)
        goto fail;
    if (!(dd = PyDict_New()))
        goto fail;
    for (int i = 0; i < WSM_R_COUNT; i++)
        if (wsm_dict_set_u64(dd, wsm_reason_name(i), disc[i]) < 0)
            goto fail;
    if (PyDict_SetItemString(d, "disconnects", dd) < 0)
        goto fail;
    Py_DECREF(byuser);
    Py_DECREF(dd);
    return d;
fail:
    wsm_snap_free(&users);
    Py_XDECREF(d);
    Py_XDECREF(byuser);
    Py_XDECREF(dd);
    return NULL;
}

static PyObject *Registry_get_stale_after(PyObject *self, void *closure)
{
    (void)closure;
    wsm_registry *r = REG(self);
    wsm_lock(r);
    int64_t ns = r->stale_after;
    wsm_unlock(r);
    return PyFloat_FromDouble((double)ns / 1e9);
}

static int Registry_set_stale_after_attr(PyObject *self, PyObject *value, void *closure)
{
    (void)closure;
    if (!value) {
        PyErr_SetString(PyExc_AttributeError, "stale_after cannot be deleted");
        return -1;
    }
    double secs = PyFloat_AsDouble(value);
    if (secs == -1.0 && PyErr_Occurred())
        return -1;
    if (!(secs >= 0.0)) {
        PyErr_SetString(PyExc_ValueError, "stale_after must be >= 0");
        return -1;
    }
    wsm_registry *r = REG(self);
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&r->lock);
    wsm_registry_set_stale_after(r, (int64_t)(secs * 1e9));
    pthread_mutex_unlock(&r->lock);
    Py_END_ALLOW_THREADS
    return 0;
}

static PyGetSetDef Registry_getset[] = {
    {"stale_after", Registry_get_stale_after, Registry_set_stale_after_attr,
     "seconds of silence before sweep() reports a connection (0 disables)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

#define M_O(name, doc) {#name, (PyCFunction)Registry_##name, METH_O, doc}
#define M_VA(name, doc) {#name, (PyCFunction)Registry_##name, METH_VARARGS, doc}
#define M_KW(name, doc) {#name, (PyCFunction)(void (*)(void))Registry_##name, METH_VARARGS | METH_KEYWORDS, doc}
#define M_NO(name, doc) {#name, (PyCFunction)Registry_##name, METH_NOARGS, doc}

static PyMethodDef Registry_methods[] = {
    M_KW(add, "add(connection_id, user_id=None, *, max_per_user=0, max_total=0) -> handle"),
    M_O(remove, "remove(handle) -> bool"),
    M_O(find, "find(connection_id) -> handle | None"),
    M_O(connection_id, "connection_id(handle) -> str | None"),
    M_O(user_id, "user_id(handle) -> str | None"),
    M_O(state, "state(handle) -> int (0 for a stale handle)"),
    M_VA(set_state, "set_state(handle, state) -> bool"),
    M_VA(set_native, "set_native(handle, engine_handle) -> bool"),
    M_O(native, "native(handle) -> engine handle or 0"),
    M_VA(touch, "touch(handle, nbytes=-1) -> bool"),
    M_VA(set_last_ping, "set_last_ping(handle, when_ns) -> bool"),
    M_VA(record_sent, "record_sent(handle, nbytes) -> bool"),
    M_VA(record_sent_many, "record_sent_many(targets, nbytes)"),
    M_VA(record_failure, "record_failure(count=1)"),
    M_O(record_disconnect, "record_disconnect(reason_index)"),
    M_O(expire, "expire(handle) -> bool"),
    M_VA(join, "join(handle, channel) -> bool (False when already a member)"),
    M_VA(leave, "leave(handle, channel) -> bool (False when not a member)"),
    M_O(channels_of, "channels_of(handle) -> list[str]"),
    M_KW(resolve_all, "resolve_all(exclude=None) -> Targets"),
    M_KW(resolve_user, "resolve_user(user_id, exclude=None) -> Targets"),
    M_KW(resolve_channel, "resolve_channel(channel, exclude=None) -> Targets"),
    M_KW(sweep, "sweep(now_ns=None, max=65536) -> array('Q') of handles"),
    M_O(info, "info(handle) -> tuple | None"),
    M_NO(ids, "ids() -> list[str]"),
    M_NO(users, "users() -> dict[str, int]"),
    M_O(user_ids, "user_ids(user_id) -> list[str]"),
    M_O(user_count, "user_count(user_id) -> int"),
    M_NO(channels, "channels() -> dict[str, int]"),
    M_O(channel_ids, "channel_ids(channel) -> list[str]"),
    M_NO(stats, "stats() -> dict"),
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Registry_slots[] = {
    {Py_tp_doc, "Registry(capacity=1024, stale_after=0.0)\n\nThe connection registry: ids, "
                "users, channels, timestamps, counters, stale sweep."},
    {Py_tp_new, Registry_new},
    {Py_tp_traverse, Registry_traverse},
    {Py_tp_clear, Registry_clear},
    {Py_tp_dealloc, Registry_dealloc},
    {Py_tp_methods, Registry_methods},
    {Py_tp_getset, Registry_getset},
    {Py_sq_length, Registry_len},
    {Py_mp_length, Registry_len},
    {0, NULL},
};

PyType_Spec wsm_registry_spec = {
    .name = "wsmanager._core.Registry",
    .basicsize = sizeof(RegistryObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Registry_slots,
};
