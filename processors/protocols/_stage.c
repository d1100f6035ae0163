/* The protocols stage's per-event fast path (processors/protocols/processor.py), in C.
 *
 * Most events are data of a connection already being parsed whose buffer for that direction is
 * empty: the stage then hands the payload to the session's ``feed_whole`` and is done. In Python
 * that dispatch (the connection lookup, the LRU move, the side, the checks around the call) cost
 * as much as a short message's parse (issue 21). A short connection's OPEN and its first FIN cost
 * the same again, and they are as plain: the OPEN of a connection not tracked makes its _State,
 * and a FIN that ends nothing (the other side's is still to come, and no session is to hear it)
 * sets a bit. ``run`` does exactly the stage's steps for a run of such events and returns at the
 * first event that needs anything else, which the Python
 * code (``ProtocolsProcessor._one``, the reference) then takes whole; it never decides anything
 * the Python code would decide differently:
 *
 *   run(events, i, conns, move_to_end, out, budget, where, stats, max_connections) -> i * 8 + code
 *
 * code EVENT: event i is none of those (the stage's ``_event`` takes it,
 * as ``_one`` would hand it there); BAIL: event i is untouched (or only had the idempotent steps: LRU move, last_ts) and is
 * Python's; DECLINED: feed_whole(...) returned false for event i (nothing changed: Python buffers
 * it without asking again); SWITCH: event i was taken and its session asked for a protocol switch;
 * SHED: event i was taken and the pending budget is over; DONE: every event was taken (i == n).
 * An exception from feed_whole (or any other) is raised as it is, the event's index in where[0]
 * (a one-item list: the index is the caller's, whichever stage's thread runs next): the stage
 * handles it as the Python path would (ProtocolError: counted, resync; any other: a bug).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include "../../service/_slots.h"

static PyTypeObject *EventT, *StateT, *ConnT, *BufT, *BudgetT;
static PyObject *DATA_KIND, *OPEN_KIND, *CLOSE_KIND, *S_FEED_WHOLE, *S_SWITCH_TO, *S_CONNECTIONS;
static long PARSING;

static Py_ssize_t e_kind, e_conn_id, e_src, e_sport, e_payload, e_ts_ns, e_egress, e_tid, e_client_is_src;
static Py_ssize_t s_mode, s_egress_side, s_last_ts, s_a_port, s_a_addr, s_bufs, s_conn, s_session, s_client_side,
    s_errors, s_closed, s_server_closed;
static Py_ssize_t c_assembler, c_extra, c_tid, c_req_from_client;
static Py_ssize_t b_len, g_over;

enum { DONE = 0, BAIL = 1, DECLINED = 2, SWITCH = 3, SHED = 4, EVENT = 5 };

/* setup(TcpEvent, _State, Conn, LargeBuffer, PendingBudget, DATA, PARSING, OPEN, CLOSE): once, at import. */
static PyObject *setup(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 9 || !PyType_Check(args[0]) || !PyType_Check(args[1]) || !PyType_Check(args[2]) ||
        !PyType_Check(args[3]) || !PyType_Check(args[4]) || !PyLong_Check(args[6])) {
        PyErr_SetString(PyExc_TypeError,
                        "setup(TcpEvent, _State, Conn, LargeBuffer, PendingBudget, DATA, PARSING, OPEN, CLOSE)");
        return NULL;
    }
    PyTypeObject *e = (PyTypeObject *)args[0], *s = (PyTypeObject *)args[1], *c = (PyTypeObject *)args[2],
                 *b = (PyTypeObject *)args[3], *g = (PyTypeObject *)args[4];
#define OFF(t, var, name)                                                                                              \
    if (slot_offset(t, name, &var) < 0)                                                                               \
        return NULL;
    OFF(e, e_kind, "kind");
    OFF(e, e_conn_id, "conn_id");
    OFF(e, e_src, "src");
    OFF(e, e_sport, "sport");
    OFF(e, e_payload, "payload");
    OFF(e, e_ts_ns, "ts_ns");
    OFF(e, e_egress, "egress");
    OFF(e, e_tid, "tid");
    OFF(e, e_client_is_src, "client_is_src");
    OFF(s, s_mode, "mode");
    OFF(s, s_egress_side, "egress_side");
    OFF(s, s_last_ts, "last_ts");
    OFF(s, s_a_port, "a_port");
    OFF(s, s_a_addr, "a_addr");
    OFF(s, s_bufs, "bufs");
    OFF(s, s_conn, "conn");
    OFF(s, s_session, "session");
    OFF(s, s_client_side, "client_side");
    OFF(s, s_errors, "errors");
    OFF(s, s_closed, "closed");
    OFF(s, s_server_closed, "server_closed");
    OFF(c, c_assembler, "assembler");
    OFF(c, c_extra, "extra");
    OFF(c, c_tid, "tid");
    OFF(c, c_req_from_client, "req_from_client");
    OFF(b, b_len, "_len");
    OFF(g, g_over, "over");
#undef OFF
    PARSING = PyLong_AsLong(args[6]);
    if (PARSING == -1 && PyErr_Occurred())
        return NULL;
    Py_XSETREF(EventT, (PyTypeObject *)Py_NewRef(e));
    Py_XSETREF(StateT, (PyTypeObject *)Py_NewRef(s));
    Py_XSETREF(ConnT, (PyTypeObject *)Py_NewRef(c));
    Py_XSETREF(BufT, (PyTypeObject *)Py_NewRef(b));
    Py_XSETREF(BudgetT, (PyTypeObject *)Py_NewRef(g));
    Py_XSETREF(DATA_KIND, Py_NewRef(args[5]));
    Py_XSETREF(OPEN_KIND, Py_NewRef(args[7]));
    Py_XSETREF(CLOSE_KIND, Py_NewRef(args[8]));
    Py_RETURN_NONE;
}

/* One int, not a tuple: a handed-back event costs the stage no tuple to build and unpack. */
static PyObject *ret(Py_ssize_t i, int code) { return PyLong_FromSsize_t(i * 8 + code); }

/* The exception set stands; where[0] = i says which event raised it. */
static PyObject *fail(PyObject *where, Py_ssize_t i) {
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyObject *n = PyLong_FromSsize_t(i);
    if (n != NULL)
        PyList_SetItem(where, 0, n);
    else
        PyErr_Clear();
    PyErr_Restore(t, v, tb);
    return NULL;
}

/* A small non-negative int slot's value, or -1 (None, unset, or anything else). */
static inline long small_int(PyObject *o) {
    if (o == NULL || !PyLong_CheckExact(o))
        return -1;
    int overflow = 0;
    long v = PyLong_AsLongAndOverflow(o, &overflow);
    return overflow ? -1 : v;
}

/* a == b as Python's == says (identity first: the receivers reuse the same objects). -1: error. */
static inline int same(PyObject *a, PyObject *b) {
    if (a == b)
        return 1;
    return PyObject_RichCompareBool(a, b, Py_EQ);
}

/* The side ``ev``'s sender is on, as processor.py says it:
 * ``0 if (ev.sport == st.a_port and ev.src == st.a_addr) else 1``; -1 with an exception set,
 * -2 when a slot is unset (the event is Python's). */
static int side_of(PyObject *ev, PyObject *st) {
    PyObject *sport = SLOT(ev, e_sport), *src = SLOT(ev, e_src), *a_port = SLOT(st, s_a_port),
             *a_addr = SLOT(st, s_a_addr);
    if (sport == NULL || src == NULL || a_port == NULL || a_addr == NULL)
        return -2;
    int eq = same(sport, a_port);
    if (eq > 0)
        eq = same(src, a_addr);
    return eq < 0 ? -1 : (eq ? 0 : 1);
}

/* Whether the pending budget is over, as ``budget.over`` says; -1 with an exception set. */
static inline int over(PyObject *budget) {
    PyObject *o = SLOT(budget, g_over);
    if (o == NULL || o == Py_False)
        return 0;
    return PyObject_IsTrue(o);
}

/* The role a first event says (``side if flag else 1 - side``, side 0) into the state's slot. */
static int set_role(PyObject *st, Py_ssize_t off, PyObject *flag) {
    int t = PyObject_IsTrue(flag);
    if (t < 0)
        return -1;
    PyObject *v = PyLong_FromLong(t ? 0 : 1);
    if (v == NULL)
        return -1;
    set_slot(st, off, v);
    return 0;
}

/* An OPEN of a connection not tracked: _event's steps for it (a new _State, counted, its roles
 * from the event). 1: Python's (the table is full: an eviction), 0: taken, -1: an exception. */
static int open_event(PyObject *ev, PyObject *cid, PyObject *conns, PyObject *stats, Py_ssize_t max_conns) {
    PyObject *cis = SLOT(ev, e_client_is_src), *egress = SLOT(ev, e_egress);
    if (cis == NULL || egress == NULL || PyDict_GET_SIZE(conns) >= max_conns)
        return 1;
    PyObject *n = PyDict_GetItemWithError(stats, S_CONNECTIONS); /* borrowed */
    if (n == NULL || !PyLong_CheckExact(n))
        return PyErr_Occurred() ? -1 : 1;
    PyObject *st = PyObject_CallOneArg((PyObject *)StateT, ev);
    if (st == NULL)
        return -1;
    if (!Py_IS_TYPE(st, StateT) || PyObject_SetItem(conns, cid, st) < 0) { /* an OrderedDict: its own setitem */
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "_State(ev) is no _State");
        Py_DECREF(st);
        return -1;
    }
    Py_ssize_t k = PyLong_AsSsize_t(n);
    PyObject *n1 = k == -1 && PyErr_Occurred() ? NULL : PyLong_FromSsize_t(k + 1);
    int bad = n1 == NULL || PyDict_SetItem(stats, S_CONNECTIONS, n1) < 0;
    Py_XDECREF(n1);
    /* Its last_ts is the event's already; the event's side is 0 (the state's a_ is its sender). */
    if (!bad && cis != Py_None && SLOT(st, s_client_side) == Py_None)
        bad = set_role(st, s_client_side, cis) < 0;
    if (!bad && egress != Py_None && SLOT(st, s_egress_side) == Py_None)
        bad = set_role(st, s_egress_side, egress) < 0;
    Py_DECREF(st);
    return bad ? -1 : 0;
}

/* A CLOSE of a tracked connection that ends nothing: a side's first FIN while the other's is
 * still to come, when no session is to hear it (the client's FIN, or a connection not parsed).
 * 1: Python's (roles to learn, a server's FIN for a session, the connection's end), 0: taken,
 * -1: an exception. */
static int close_event(PyObject *ev, PyObject *cid, PyObject *st, PyObject *move) {
    PyObject *cis = SLOT(ev, e_client_is_src), *egress = SLOT(ev, e_egress), *cs = SLOT(st, s_client_side),
             *es = SLOT(st, s_egress_side), *ts = SLOT(ev, e_ts_ns), *last = SLOT(st, s_last_ts);
    if (cis == NULL || egress == NULL || cs == NULL || es == NULL || ts == NULL || last == NULL ||
        (cis != Py_None && cs == Py_None) || (egress != Py_None && es == Py_None) ||
        (cs != Py_None && !PyLong_CheckExact(cs)))
        return 1;
    long closed = small_int(SLOT(st, s_closed)), mode = small_int(SLOT(st, s_mode));
    if (closed < 0 || mode < 0)
        return 1;
    int side = side_of(ev, st);
    if (side < 0)
        return side == -1 ? -1 : 1;
    long now = closed | (1L << side);
    if (now == 3)
        return 1;
    if (mode == PARSING && side != small_int(cs)) {
        PyObject *sc = SLOT(st, s_server_closed);
        if (sc != Py_True)
            return 1; /* the server is done: the session hears it (Python) */
    }
    PyObject *r = PyObject_CallOneArg(move, cid);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    int gt = PyObject_RichCompareBool(ts, last, Py_GT);
    if (gt < 0)
        return -1;
    if (gt)
        set_slot(st, s_last_ts, Py_NewRef(ts));
    PyObject *v = PyLong_FromLong(now);
    if (v == NULL)
        return -1;
    set_slot(st, s_closed, v);
    return 0;
}

/* OPEN and CLOSE: 0 taken, 1 the event is Python's (EVENT), -1 an exception. */
static int edge_event(PyObject *ev, PyObject *kind, PyObject *conns, PyObject *move, PyObject *stats,
                      Py_ssize_t max_conns) {
    if (kind != OPEN_KIND && kind != CLOSE_KIND)
        return 1;
    PyObject *cid = SLOT(ev, e_conn_id);
    if (cid == NULL)
        return 1;
    PyObject *st = PyDict_GetItemWithError(conns, cid); /* borrowed */
    if (st == NULL && PyErr_Occurred())
        return -1;
    if (kind == OPEN_KIND)
        return st == NULL ? open_event(ev, cid, conns, stats, max_conns) : 1;
    if (st == NULL)
        return 0; /* nothing known about it: nothing to end (_event) */
    if (!Py_IS_TYPE(st, StateT))
        return 1;
    Py_INCREF(st);
    int r = close_event(ev, cid, st, move);
    Py_DECREF(st);
    return r;
}

static PyObject *run(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 9 || !PyList_Check(args[0]) || !PyDict_Check(args[2]) || !PyList_Check(args[4]) ||
        !PyList_CheckExact(args[6]) || PyList_GET_SIZE(args[6]) != 1 || !PyDict_CheckExact(args[7]) ||
        !PyLong_CheckExact(args[8])) {
        PyErr_SetString(PyExc_TypeError,
                        "run(events, i, conns, move_to_end, out, budget, where, stats, max_connections)");
        return NULL;
    }
    if (EventT == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "setup() was not called");
        return NULL;
    }
    PyObject *events = args[0], *conns = args[2], *move = args[3], *out = args[4], *budget = args[5],
             *where = args[6], *stats = args[7];
    Py_ssize_t max_conns = PyLong_AsSsize_t(args[8]);
    if (max_conns < 0)
        return PyErr_Occurred() ? NULL : ret(PyLong_AsSsize_t(args[1]), BAIL);
    Py_ssize_t i = PyLong_AsSsize_t(args[1]);
    if (i < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "negative index");
        return NULL;
    }
    if (!Py_IS_TYPE(budget, BudgetT))
        return ret(i, BAIL);
    for (; i < PyList_GET_SIZE(events); i++) {
        PyObject *ev = PyList_GET_ITEM(events, i);
        if (!Py_IS_TYPE(ev, EventT))
            return ret(i, BAIL);
        PyObject *kind = SLOT(ev, e_kind);
        if (kind != DATA_KIND) {
            int r = edge_event(ev, kind, conns, move, stats, max_conns);
            if (r < 0)
                return fail(where, i);
            if (r)
                return ret(i, EVENT);
            goto taken;
        }
        PyObject *cid = SLOT(ev, e_conn_id);
        if (cid == NULL)
            return ret(i, BAIL);
        PyObject *st = PyDict_GetItemWithError(conns, cid); /* borrowed */
        if (st == NULL) {
            if (PyErr_Occurred())
                return fail(where, i);
            return ret(i, EVENT);
        }
        if (!Py_IS_TYPE(st, StateT))
            return ret(i, BAIL);
        PyObject *mode = SLOT(st, s_mode);
        if (mode == NULL || !PyLong_CheckExact(mode))
            return ret(i, BAIL);
        if (small_int(mode) != PARSING)
            return ret(i, EVENT);
        PyObject *egress = SLOT(ev, e_egress), *egress_side = SLOT(st, s_egress_side);
        if (egress == NULL || egress_side == NULL)
            return ret(i, BAIL);
        if (egress != Py_None && egress_side == Py_None)
            return ret(i, EVENT);
        PyObject *payload = SLOT(ev, e_payload), *ts = SLOT(ev, e_ts_ns), *last = SLOT(st, s_last_ts);
        PyObject *bufs = SLOT(st, s_bufs), *conn = SLOT(st, s_conn), *session = SLOT(st, s_session);
        if (payload == NULL || ts == NULL || last == NULL || bufs == NULL || !PyTuple_CheckExact(bufs) ||
            PyTuple_GET_SIZE(bufs) != 2 || conn == NULL || !Py_IS_TYPE(conn, ConnT) || session == NULL ||
            session == Py_None)
            return ret(i, BAIL);
        /* What follows mirrors processor.py's fast path step by step. */
        Py_ssize_t plen = 0;
        if (payload != Py_None) {
            plen = PyObject_Length(payload);
            if (plen < 0) { /* Python's len() raises it again, as a bug of the receiver */
                PyErr_Clear();
                return ret(i, BAIL);
            }
        }
        int side = 1;
        if (plen) {
            side = side_of(ev, st);
            if (side == -2)
                return ret(i, BAIL);
            if (side < 0)
                return fail(where, i);
            PyObject *buf = PyTuple_GET_ITEM(bufs, side);
            if (!Py_IS_TYPE(buf, BufT))
                return ret(i, BAIL);
            PyObject *blen = SLOT(buf, b_len);
            if (blen == NULL || small_int(blen) != 0)
                return ret(i, BAIL); /* data waits in the buffer: the buffered path is Python's */
        }
        /* Committed: the event is this path's from here (the steps before the call are the
         * Python path's too, and idempotent, should it take the event back). */
        PyObject *r = PyObject_CallOneArg(move, cid);
        if (r == NULL)
            return fail(where, i);
        Py_DECREF(r);
        int gt = PyObject_RichCompareBool(ts, last, Py_GT);
        if (gt < 0)
            return fail(where, i);
        if (gt)
            set_slot(st, s_last_ts, Py_NewRef(ts));
        if (!plen)
            goto taken;
        long cs = small_int(SLOT(st, s_client_side));
        PyObject *from_client = side == cs ? Py_True : Py_False;
        PyObject *assembler = SLOT(conn, c_assembler);
        if (assembler == NULL)
            return ret(i, BAIL);
        if (assembler != Py_None) {
            PyObject *tid = SLOT(ev, e_tid);
            if (tid == NULL)
                return ret(i, BAIL);
            set_slot(conn, c_tid, Py_NewRef(tid));
            set_slot(conn, c_req_from_client, Py_NewRef(from_client));
        }
        PyObject *whole = PyObject_GetAttr(session, S_FEED_WHOLE);
        if (whole == NULL)
            return fail(where, i);
        if (whole == Py_None) {
            Py_DECREF(whole);
            return ret(i, DECLINED); /* no feed_whole: buffered, as Python would */
        }
        Py_ssize_t before = PyList_GET_SIZE(out);
        Py_INCREF(st);
        Py_INCREF(conn);
        PyObject *cargs[3] = {from_client, payload, ts};
        r = PyObject_Vectorcall(whole, cargs, 3, NULL);
        Py_DECREF(whole);
        if (r == NULL) {
            Py_DECREF(st);
            Py_DECREF(conn);
            return fail(where, i);
        }
        int took = PyObject_IsTrue(r);
        Py_DECREF(r);
        if (took <= 0) {
            Py_DECREF(st);
            Py_DECREF(conn);
            if (took < 0)
                return fail(where, i);
            return ret(i, DECLINED);
        }
        PyObject *errors = SLOT(st, s_errors);
        if (errors != NULL && PyList_GET_SIZE(out) > before) {
            int nz = PyObject_IsTrue(errors);
            if (nz > 0) {
                PyObject *zero = PyLong_FromLong(0);
                if (zero == NULL) {
                    Py_DECREF(st);
                    Py_DECREF(conn);
                    return fail(where, i);
                }
                set_slot(st, s_errors, zero);
            } else if (nz < 0) {
                PyErr_Clear();
            }
        }
        PyObject *extra = SLOT(conn, c_extra);
        int sw = 0;
        if (extra != NULL && extra != Py_None) {
            if (PyDict_CheckExact(extra)) {
                sw = PyDict_GET_SIZE(extra) ? PyDict_Contains(extra, S_SWITCH_TO) : 0;
            } else {
                sw = PyObject_IsTrue(extra);
                if (sw > 0)
                    sw = PySequence_Contains(extra, S_SWITCH_TO);
            }
        }
        Py_DECREF(st);
        Py_DECREF(conn);
        if (sw < 0)
            return fail(where, i);
        if (sw)
            return ret(i, SWITCH);
    taken:;
        int o = over(budget);
        if (o < 0)
            return fail(where, i);
        if (o)
            return ret(i, SHED);
    }
    return ret(i, DONE);
}

/* -- spans ---------------------------------------------------------------------------------
 * new_span(name, kind, start_ns, end_ns, attributes, resource, trace_id, span_id, parent_span_id,
 *          status_code, status_message, events, trace_state, flags) -> Span
 *
 * What ``Span(...)`` (service/model.py) makes, with its every argument given (base.py's Conn.span
 * gives them all): the slots set directly, not by a Python __init__, and new ids drawn from the
 * same generator (model._rand's getrandbits: 128 bits for a trace, 64 for a span, drawn again
 * while zero) in the same order, so a seeded generator gives the two the same ids. A span is
 * made per exchange: Span.__init__ was a sixth of a short exchange's span cost (issue 21). */
static PyTypeObject *SpanT;
static PyObject *GETRANDBITS, *DEFAULT_RESOURCE;
static Py_ssize_t sp_off[14];
static const char *SP_NAMES[14] = {"name", "kind", "start_ns", "end_ns", "attributes", "resource", "trace_id",
                                   "span_id", "parent_span_id", "status_code", "status_message", "events",
                                   "trace_state", "flags"};
enum { SP_ATTRS = 4, SP_RESOURCE = 5, SP_TRACE = 6, SP_SPAN = 7 };

/* span_setup(Span, getrandbits, DEFAULT_RESOURCE): once, at import. */
static PyObject *span_setup(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyType_Check(args[0]) || !PyCallable_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "span_setup(Span, getrandbits, DEFAULT_RESOURCE)");
        return NULL;
    }
    for (int i = 0; i < 14; i++)
        if (slot_offset((PyTypeObject *)args[0], SP_NAMES[i], &sp_off[i]) < 0)
            return NULL;
    Py_XSETREF(SpanT, (PyTypeObject *)Py_NewRef(args[0]));
    Py_XSETREF(GETRANDBITS, Py_NewRef(args[1]));
    Py_XSETREF(DEFAULT_RESOURCE, Py_NewRef(args[2]));
    Py_RETURN_NONE;
}

/* A new random id of ``nbytes`` (16 or 8), never all zero: model.new_trace_id / new_span_id. */
static PyObject *new_id(int nbytes) {
    unsigned char b[16];
    for (;;) {
        PyObject *n = PyLong_FromLong(nbytes * 8);
        if (n == NULL)
            return NULL;
        PyObject *v = PyObject_CallOneArg(GETRANDBITS, n);
        Py_DECREF(n);
        if (v == NULL)
            return NULL;
        if (!PyLong_Check(v)) {
            Py_DECREF(v);
            PyErr_SetString(PyExc_TypeError, "getrandbits returned no int");
            return NULL;
        }
        int nz = PyObject_IsTrue(v);
        if (nz <= 0) {
            Py_DECREF(v);
            if (nz < 0)
                return NULL;
            continue; /* all-zero ids are invalid: draw again */
        }
#if PY_VERSION_HEX >= 0x030D0000
        int r = _PyLong_AsByteArray((PyLongObject *)v, b, (size_t)nbytes, 0, 0, 1);
#else
        int r = _PyLong_AsByteArray((PyLongObject *)v, b, (size_t)nbytes, 0, 0);
#endif
        Py_DECREF(v);
        if (r < 0)
            return NULL;
        return PyBytes_FromStringAndSize((const char *)b, nbytes);
    }
}

static PyObject *new_span(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 14) {
        PyErr_SetString(PyExc_TypeError, "new_span takes Span's 14 arguments, positionally");
        return NULL;
    }
    if (SpanT == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "span_setup() was not called");
        return NULL;
    }
    PyObject *v[14];
    for (int i = 0; i < 14; i++)
        v[i] = Py_NewRef(args[i]);
    /* Span.__init__'s defaults, in its order: the trace id, then the span id. */
    if (v[SP_TRACE] == Py_None) {
        Py_SETREF(v[SP_TRACE], new_id(16));
        if (v[SP_TRACE] == NULL)
            goto fail;
    }
    if (v[SP_SPAN] == Py_None) {
        Py_SETREF(v[SP_SPAN], new_id(8));
        if (v[SP_SPAN] == NULL)
            goto fail;
    }
    if (v[SP_ATTRS] == Py_None) {
        Py_SETREF(v[SP_ATTRS], PyDict_New());
        if (v[SP_ATTRS] == NULL)
            goto fail;
    }
    if (v[SP_RESOURCE] == Py_None)
        Py_SETREF(v[SP_RESOURCE], Py_NewRef(DEFAULT_RESOURCE));
    PyObject *span = SpanT->tp_alloc(SpanT, 0);
    if (span == NULL)
        goto fail;
    for (int i = 0; i < 14; i++)
        set_slot(span, sp_off[i], v[i]); /* steals */
    return span;
fail:
    for (int i = 0; i < 14; i++)
        Py_XDECREF(v[i]);
    return NULL;
}

static PyMethodDef methods[] = {
    {"setup", (PyCFunction)(void (*)(void))setup, METH_FASTCALL, "setup(TcpEvent, _State, Conn, LargeBuffer, "
                                                                  "PendingBudget, DATA, PARSING, OPEN, CLOSE)"},
    {"run", (PyCFunction)(void (*)(void))run, METH_FASTCALL,
     "run(events, i, conns, move_to_end, out, budget, where, stats, max_connections) -> i * 8 + code"},
    {"span_setup", (PyCFunction)(void (*)(void))span_setup, METH_FASTCALL,
     "span_setup(Span, getrandbits, DEFAULT_RESOURCE)"},
    {"new_span", (PyCFunction)(void (*)(void))new_span, METH_FASTCALL,
     "new_span(name, kind, start_ns, end_ns, attributes, resource, trace_id, span_id, parent_span_id, "
     "status_code, status_message, events, trace_state, flags) -> Span, as Span(...) makes it"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_stage", NULL, -1, methods};

PyMODINIT_FUNC PyInit__stage(void) {
    S_FEED_WHOLE = PyUnicode_InternFromString("feed_whole");
    S_SWITCH_TO = PyUnicode_InternFromString("switch_to");
    S_CONNECTIONS = PyUnicode_InternFromString("connections");
    if (S_FEED_WHOLE == NULL || S_SWITCH_TO == NULL || S_CONNECTIONS == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    PyModule_AddIntConstant(m, "DONE", DONE);
    PyModule_AddIntConstant(m, "BAIL", BAIL);
    PyModule_AddIntConstant(m, "DECLINED", DECLINED);
    PyModule_AddIntConstant(m, "SWITCH", SWITCH);
    PyModule_AddIntConstant(m, "SHED", SHED);
    PyModule_AddIntConstant(m, "EVENT", EVENT);
    return m;
}
