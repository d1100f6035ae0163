/* The pcap replay's common packet in C: the twin of three pure-Python paths, run back to back.
 *
 *   receivers/pcap.py         PcapReader.records: a classic pcap record (bounds, timestamp)
 *   receivers/packet.py       _ethernet's fast path: untagged Ethernet, IPv4 without options,
 *                             unfragmented TCP
 *   receivers/tcp_reassembly  TcpReassembler.segment's fast path: a known connection, no
 *                             SYN/FIN/RST, payload (if any) exactly in order, nothing buffered
 *                             and no FIN pending on the peer; and the bare ACK/FIN/RST of an
 *                             untracked connection (counted ``ignored``)
 *
 * scan(view, pos, tick, big_endian, ts_shift, halves, touch, events, max_events, budget,
 *      next_sweep, stats) -> (status, pos, packets, nbytes, first_ts, last_ts, slow)
 *
 * reads records from ``pos`` and does for each what the Python loop would, stopping
 *   LIMIT (0) before a record, when ``events`` holds ``max_events`` or ``budget`` records were
 *            read (the replay's flush points: the receiver flushes there, exactly as it does);
 *   SLOW  (1) at a record it does not handle (anything else: another frame, a SYN, a FIN, a
 *            retransmission, a sweep due, ...): counted, its (ts, off, end) handed back in
 *            ``slow`` for the Python path to decode and reassemble, nothing of it done here;
 *   END   (2) at the end of the records or at a damaged one (``pos`` at it): the Python reader
 *            resumes there and says what is wrong.
 * So every decision that is not the common case stays in Python (one place for the rules), and
 * tests run the replay both ways to the same events (tests/test_pcap_fastpath.py).
 *
 * The reassembler's objects are read and written through their __slots__ offsets, taken from
 * the classes' member descriptors by setup(); exact type checks guard every access, and a slot
 * holding anything unexpected sends the packet to Python.
 *
 * Why C: per packet the Python path is a generator step, a decoder call, a tuple, a segment
 * call and a TcpEvent __init__: ~2.5 us against a ~0.9 us floor of a bare struct loop, a quarter
 * of a small exchange's replay (issue 21).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <structmember.h>

#define MAX_CAPLEN (64 << 20) /* receivers/pcap.py MAX_CAPLEN */
#define ST_LIMIT 0
/* tcp_reassembly.py HOLD_AHEAD (tests check the two agree) */
#define HOLD_AHEAD (1u << 20)
#define ST_SLOW 1
#define ST_END 2

static PyTypeObject *HalfT, *ConnT, *EventT;
static PyObject *DATA_KIND, *S_IGNORED, *ONE;

/* _Half slots */
static Py_ssize_t h_conn, h_next_seq, h_delivered, h_segs, h_closed, h_fin_at, h_peer, h_src, h_sport, h_dst, h_dport,
    h_is_client, h_held;
/* _Conn slots */
static Py_ssize_t c_id, c_last_ts;
/* TcpEvent slots */
static Py_ssize_t e_kind, e_conn_id, e_src, e_sport, e_dst, e_dport, e_ts_ns, e_payload, e_gap, e_client_is_src,
    e_egress, e_pid, e_tid, e_comm;

#define SLOT(o, off) (*(PyObject **)((char *)(o) + (off)))

/* Replace a slot's value; steals ``v``. */
static inline void set_slot(PyObject *o, Py_ssize_t off, PyObject *v) {
    PyObject *old = SLOT(o, off);
    SLOT(o, off) = v;
    Py_XDECREF(old);
}

static int slot_offset(PyTypeObject *t, const char *name, Py_ssize_t *out) {
    PyObject *d = PyObject_GetAttrString((PyObject *)t, name);
    if (d == NULL)
        return -1;
    int ok = Py_IS_TYPE(d, &PyMemberDescr_Type);
    if (ok) {
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        ok = m->type == T_OBJECT_EX && !(m->flags & READONLY);
        *out = m->offset;
    }
    Py_DECREF(d);
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not a writable __slots__ member", t->tp_name, name);
        return -1;
    }
    return 0;
}

/* setup(Half, Conn, TcpEvent, DATA): the reassembler's classes (once, at import). */
static PyObject *setup(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4 || !PyType_Check(args[0]) || !PyType_Check(args[1]) || !PyType_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "setup(Half, Conn, TcpEvent, DATA)");
        return NULL;
    }
    PyTypeObject *h = (PyTypeObject *)args[0], *c = (PyTypeObject *)args[1], *e = (PyTypeObject *)args[2];
    if (e->tp_dictoffset != 0 || e->tp_alloc == NULL) {
        PyErr_SetString(PyExc_TypeError, "TcpEvent must be a __slots__ class");
        return NULL;
    }
#define OFF(t, var, name)                                                                                              \
    if (slot_offset(t, name, &var) < 0)                                                                               \
        return NULL;
    OFF(h, h_conn, "conn");
    OFF(h, h_next_seq, "next_seq");
    OFF(h, h_delivered, "delivered");
    OFF(h, h_segs, "segs");
    OFF(h, h_closed, "closed");
    OFF(h, h_fin_at, "fin_at");
    OFF(h, h_peer, "peer");
    OFF(h, h_src, "src");
    OFF(h, h_sport, "sport");
    OFF(h, h_dst, "dst");
    OFF(h, h_dport, "dport");
    OFF(h, h_is_client, "is_client");
    OFF(h, h_held, "held");
    OFF(c, c_id, "id");
    OFF(c, c_last_ts, "last_ts");
    OFF(e, e_kind, "kind");
    OFF(e, e_conn_id, "conn_id");
    OFF(e, e_src, "src");
    OFF(e, e_sport, "sport");
    OFF(e, e_dst, "dst");
    OFF(e, e_dport, "dport");
    OFF(e, e_ts_ns, "ts_ns");
    OFF(e, e_payload, "payload");
    OFF(e, e_gap, "gap");
    OFF(e, e_client_is_src, "client_is_src");
    OFF(e, e_egress, "egress");
    OFF(e, e_pid, "pid");
    OFF(e, e_tid, "tid");
    OFF(e, e_comm, "comm");
#undef OFF
    Py_INCREF(h);
    Py_INCREF(c);
    Py_INCREF(e);
    Py_INCREF(args[3]);
    Py_XSETREF(HalfT, h);
    Py_XSETREF(ConnT, c);
    Py_XSETREF(EventT, e);
    Py_XSETREF(DATA_KIND, args[3]);
    Py_RETURN_NONE;
}

static inline uint32_t rd32(const unsigned char *p, int big) {
    if (big)
        return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
    return ((uint32_t)p[3] << 24) | ((uint32_t)p[2] << 16) | ((uint32_t)p[1] << 8) | p[0];
}

static inline unsigned be16(const unsigned char *p) { return ((unsigned)p[0] << 8) | p[1]; }

/* The packed IPv4 addresses as bytes, the same few objects again and again (their hash is then
 * computed once): a direct-mapped cache. New reference. */
#define ACACHE 512
static PyObject *acache[ACACHE];

static PyObject *addr4(const unsigned char *p) {
    uint32_t a;
    memcpy(&a, p, 4);
    unsigned i = (a ^ (a >> 9) ^ (a >> 18) ^ (a >> 27)) & (ACACHE - 1);
    PyObject *b = acache[i];
    if (b != NULL && memcmp(PyBytes_AS_STRING(b), p, 4) == 0) {
        Py_INCREF(b);
        return b;
    }
    b = PyBytes_FromStringAndSize((const char *)p, 4);
    if (b == NULL)
        return NULL;
    Py_INCREF(b);
    Py_XSETREF(acache[i], b);
    return b;
}

static PyObject *scan(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError, "scan() takes 12 arguments");
        return NULL;
    }
    if (HalfT == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "setup() was not called");
        return NULL;
    }
    PyObject *view = args[0], *halves = args[5], *touch = args[6], *events = args[7], *stats = args[11];
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    long long tick = PyLong_AsLongLong(args[2]);
    int big = PyObject_IsTrue(args[3]);
    long long ts_shift = PyLong_AsLongLong(args[4]);
    Py_ssize_t max_events = PyLong_AsSsize_t(args[8]);
    Py_ssize_t budget = PyLong_AsSsize_t(args[9]);
    long long next_sweep = PyLong_AsLongLong(args[10]);
    if (PyErr_Occurred())
        return NULL;
    if (!PyDict_CheckExact(halves) || !PyList_CheckExact(events) || !PyDict_CheckExact(stats)) {
        PyErr_SetString(PyExc_TypeError, "scan(): halves and stats must be dicts, events a list");
        return NULL;
    }
    Py_buffer b;
    if (PyObject_GetBuffer(view, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *buf = b.buf;
    Py_ssize_t size = b.len;
    Py_ssize_t n = 0, nbytes = 0;
    long long first = 0, last = 0, ts = 0;
    Py_ssize_t off = 0, end = 0;
    int status;
    PyObject *key = NULL;

    for (;;) {
        if (PyList_GET_SIZE(events) >= max_events || n >= budget) {
            status = ST_LIMIT;
            break;
        }
        if (pos < 0 || pos + 16 > size) {
            status = ST_END;
            break;
        }
        const unsigned char *r = buf + pos;
        uint32_t sec = rd32(r, big), frac = rd32(r + 4, big), caplen = rd32(r + 8, big);
        off = pos + 16;
        end = off + (Py_ssize_t)caplen;
        if (caplen > MAX_CAPLEN || end > size) {
            status = ST_END;
            break;
        }
        ts = (long long)sec * 1000000000LL + (long long)frac * tick + ts_shift;
        if (n == 0)
            first = ts;
        last = ts;
        n++;
        nbytes += (Py_ssize_t)caplen;
        pos = end;

        /* packet.py _ethernet, the fast branch only */
        const unsigned char *f = buf + off;
        if (end - off < 54 || be16(f + 12) != 0x0800 || f[14] != 0x45 || f[23] != 6 || (be16(f + 20) & 0x3FFF))
            goto slow;
        unsigned total = be16(f + 16);
        if (total < 40)
            goto slow;
        Py_ssize_t ip_end = off + 14 + (Py_ssize_t)total;
        if (ip_end > end)
            goto slow;
        const unsigned char *t = f + 34;
        unsigned hl = (unsigned)(t[12] >> 4) << 2;
        if (hl < 20 || off + 34 + (Py_ssize_t)hl > ip_end)
            goto slow;
        unsigned sport = be16(t), dport = be16(t + 2);
        uint32_t seq = rd32(t + 4, 1);
        unsigned flags = t[13];
        Py_ssize_t poff = off + 34 + hl, plen = ip_end - poff;

        /* tcp_reassembly.py TcpReassembler.segment */
        if (ts >= next_sweep)
            goto slow;
        PyObject *src = addr4(f + 26), *dst = addr4(f + 30);
        PyObject *ps = PyLong_FromLong((long)sport), *pd = PyLong_FromLong((long)dport);
        if (src == NULL || dst == NULL || ps == NULL || pd == NULL) {
            Py_XDECREF(src);
            Py_XDECREF(dst);
            Py_XDECREF(ps);
            Py_XDECREF(pd);
            goto error;
        }
        key = PyTuple_New(4);
        if (key == NULL) {
            Py_DECREF(src);
            Py_DECREF(dst);
            Py_DECREF(ps);
            Py_DECREF(pd);
            goto error;
        }
        PyTuple_SET_ITEM(key, 0, src);
        PyTuple_SET_ITEM(key, 1, ps);
        PyTuple_SET_ITEM(key, 2, dst);
        PyTuple_SET_ITEM(key, 3, pd);
        PyObject *h = PyDict_GetItemWithError(halves, key); /* borrowed */
        Py_CLEAR(key);
        if (h == NULL) {
            if (PyErr_Occurred())
                goto error;
            /* _slow: an RST, or a bare ACK/FIN, of a connection not tracked */
            if ((flags & 0x02) || plen)
                goto slow;
            PyObject *v = PyDict_GetItemWithError(stats, S_IGNORED);
            if (v == NULL) {
                if (PyErr_Occurred())
                    goto error;
                goto slow;
            }
            if (!PyLong_CheckExact(v))
                goto slow;
            PyObject *v1 = PyNumber_Add(v, ONE);
            if (v1 == NULL)
                goto error;
            int rc = PyDict_SetItem(stats, S_IGNORED, v1);
            Py_DECREF(v1);
            if (rc < 0)
                goto error;
            continue;
        }
        if ((flags & 0x07) || !Py_IS_TYPE(h, HalfT))
            goto slow;
        PyObject *conn = SLOT(h, h_conn);
        if (conn == NULL || !Py_IS_TYPE(conn, ConnT) || SLOT(conn, c_id) == NULL)
            goto slow;
        long long delivered = 0;
        if (plen) {
            PyObject *ns = SLOT(h, h_next_seq), *dv = SLOT(h, h_delivered);
            if (ns == NULL || !PyLong_CheckExact(ns) || dv == NULL || !PyLong_CheckExact(dv))
                goto slow;
            int ovf = 0;
            long long nsv = PyLong_AsLongLongAndOverflow(ns, &ovf);
            if (ovf || nsv != (long long)seq)
                goto slow;
            delivered = PyLong_AsLongLongAndOverflow(dv, &ovf);
            if (ovf || delivered < 0 || delivered > LLONG_MAX - plen)
                goto slow;
            if (SLOT(h, h_segs) != Py_None || SLOT(h, h_closed) != Py_False || SLOT(h, h_held) != Py_None)
                goto slow;
        }
        if (flags & 0x10) { /* the peer's holes or pending FIN below this ACK: _ack_gap, in Python */
            PyObject *p = SLOT(h, h_peer);
            if (p == NULL || !Py_IS_TYPE(p, HalfT))
                goto slow;
            PyObject *segs = SLOT(p, h_segs), *fin_at = SLOT(p, h_fin_at);
            if (segs == NULL || fin_at == NULL)
                goto slow;
            if (segs != Py_None && (!PyList_CheckExact(segs) || PyList_GET_SIZE(segs)))
                goto slow;
            if (fin_at != Py_None && SLOT(p, h_closed) != Py_True)
                goto slow;
            /* A hold (tcp_reassembly.py _hold/_release): the peer's, which this packet may end,
             * or this payload's ACK ahead of the peer bytes seen (it may have to wait). */
            PyObject *pheld = SLOT(p, h_held), *pns = SLOT(p, h_next_seq);
            if (pheld != Py_None || pns == NULL)
                goto slow;
            if (plen && pns != Py_None) {
                if (!PyLong_CheckExact(pns))
                    goto slow;
                int ovf = 0;
                long long pv = PyLong_AsLongLongAndOverflow(pns, &ovf);
                if (ovf || pv < 0 || pv > 0xFFFFFFFFLL)
                    goto slow;
                uint32_t ahead = rd32(t + 8, 1) - (uint32_t)pv;
                if (ahead != 0 && ahead <= HOLD_AHEAD)
                    goto slow; /* ahead: the Python path decides whether it waits (rare) */
            }
        }
        /* Everything checked: from here on the packet is taken. */
        PyObject *tso = PyLong_FromLongLong(ts);
        if (tso == NULL)
            goto error;
        Py_INCREF(tso);
        set_slot(conn, c_last_ts, tso);
        PyObject *cid = SLOT(conn, c_id);
        Py_INCREF(cid);
        PyObject *res = PyObject_CallOneArg(touch, cid);
        if (res == NULL) {
            Py_DECREF(cid);
            Py_DECREF(tso);
            goto error;
        }
        Py_DECREF(res);
        if (plen) {
            PyObject *payload = PySequence_GetSlice(view, poff, ip_end);
            PyObject *nseq = PyLong_FromUnsignedLong((unsigned long)((seq + (uint32_t)plen) & 0xFFFFFFFFu));
            PyObject *ndel = PyLong_FromLongLong(delivered + plen);
            PyObject *ev = EventT->tp_alloc(EventT, 0);
            if (payload == NULL || nseq == NULL || ndel == NULL || ev == NULL) {
                Py_XDECREF(payload);
                Py_XDECREF(nseq);
                Py_XDECREF(ndel);
                Py_XDECREF(ev);
                Py_DECREF(cid);
                Py_DECREF(tso);
                goto error;
            }
            /* TcpEvent(_DATA, conn.id, h.src, h.sport, h.dst, h.dport, ts, payload, 0, h.is_client) */
            PyObject *hs = SLOT(h, h_src), *hsp = SLOT(h, h_sport), *hd = SLOT(h, h_dst), *hdp = SLOT(h, h_dport),
                     *hc = SLOT(h, h_is_client);
            Py_INCREF(DATA_KIND);
            SLOT(ev, e_kind) = DATA_KIND;
            SLOT(ev, e_conn_id) = cid; /* the reference taken above */
            Py_XINCREF(hs);
            SLOT(ev, e_src) = hs;
            Py_XINCREF(hsp);
            SLOT(ev, e_sport) = hsp;
            Py_XINCREF(hd);
            SLOT(ev, e_dst) = hd;
            Py_XINCREF(hdp);
            SLOT(ev, e_dport) = hdp;
            SLOT(ev, e_ts_ns) = tso; /* the second reference taken above */
            SLOT(ev, e_payload) = payload;
            SLOT(ev, e_gap) = PyLong_FromLong(0);
            Py_XINCREF(hc);
            SLOT(ev, e_client_is_src) = hc;
            Py_INCREF(Py_None);
            SLOT(ev, e_egress) = Py_None;
            Py_INCREF(Py_None);
            SLOT(ev, e_pid) = Py_None;
            Py_INCREF(Py_None);
            SLOT(ev, e_tid) = Py_None;
            Py_INCREF(Py_None);
            SLOT(ev, e_comm) = Py_None;
            int rc = PyList_Append(events, ev);
            Py_DECREF(ev);
            set_slot(h, h_next_seq, nseq);
            set_slot(h, h_delivered, ndel);
            if (rc < 0)
                goto error;
        } else {
            Py_DECREF(cid);
            Py_DECREF(tso);
        }
        continue;
    slow:
        status = ST_SLOW;
        break;
    }
    PyBuffer_Release(&b);
    if (status == ST_SLOW)
        return Py_BuildValue("(innnLL(Lnn))", status, pos, n, nbytes, first, last, ts, off, end);
    return Py_BuildValue("(innnLLO)", status, pos, n, nbytes, first, last, Py_None);
error:
    Py_XDECREF(key);
    PyBuffer_Release(&b);
    return NULL;
}

static PyMethodDef methods[] = {
    {"setup", (PyCFunction)(void (*)(void))setup, METH_FASTCALL,
     "setup(Half, Conn, TcpEvent, DATA): the reassembler's classes, whose slots scan() reads."},
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "scan(view, pos, tick, big_endian, ts_shift, halves, touch, events, max_events, budget, next_sweep, stats)"
     " -> (status, pos, packets, nbytes, first_ts, last_ts, slow)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastpath", "The pcap replay's common packet (C).", -1,
                                     methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastpath(void) {
    if ((S_IGNORED = PyUnicode_InternFromString("ignored")) == NULL || (ONE = PyLong_FromLong(1)) == NULL)
        return NULL;
    return PyModule_Create(&module);
}
