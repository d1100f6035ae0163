/* The pcap replay's common packet in C: the twin of three pure-Python paths, run back to back.
 *
 *   receivers/pcap.py         PcapReader.records: a classic pcap record (bounds, timestamp)
 *   receivers/packet.py       _ethernet's fast path: untagged Ethernet, IPv4 without options,
 *                             unfragmented TCP
 *   receivers/tcp_reassembly  TcpReassembler.segment's fast path: a known connection, no
 *                             SYN/FIN/RST, payload (if any) exactly in order, nothing buffered
 *                             and no FIN pending on the peer; and the bare ACK/FIN/RST of an
 *                             untracked connection (counted ``ignored``); and _slow's common
 *                             short-connection packets, each only when nothing is buffered, held
 *                             or pending that the Python path would act on:
 *                               SYN or SYN-ACK (no data, no FIN) of a new 4-tuple while there is
 *                               room (_new_conn, _str: the _Conn and both _Half made here, every
 *                               slot as __init__ sets it; evicting for room stays in Python);
 *                               SYN-ACK of a known connection (the ISNs);
 *                               FIN exactly in order, with or without data (_data, _check_fin:
 *                               DATA, CLOSE, and _forget after both directions closed);
 *                               RST (_drain with nothing to give up: RESET, _forget).
 *                             A SYN on a known 4-tuple (retransmission, port reuse, simultaneous
 *                             open), data or FIN on a SYN, holes and holds: Python.
 *
 * scan(view, pos, tick, big_endian, ts_shift, halves, touch, events, max_events, budget,
 *      next_sweep, stats, lru, addr_cache, max_connections)
 *     -> (status, pos, packets, nbytes, first_ts, last_ts, slow)
 *
 * reads records from ``pos`` and does for each what the Python loop would, stopping
 *   LIMIT (0) before a record, when ``events`` holds ``max_events`` or ``budget`` records were
 *            read (the replay's flush points: the receiver flushes there, exactly as it does);
 *   SLOW  (1) at a record it does not handle (anything else: another frame, a SYN on a known
 *            connection, a retransmission, a sweep due, ...): counted, its (ts, off, end) handed back in
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
 * of a small exchange's replay (issue 21). Handshakes and closes are 6 of a short connection's
 * ~26 packets; handed back, each cost a return to Python, a decode, _slow and two _Half
 * __init__s: the receiver took 2.5 times as long on 5000 short connections as on 10 long ones
 * carrying the same exchanges ("per-packet cost must not depend on the traffic's shape").
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <structmember.h>

#include "../service/_slots.h"

#define MAX_CAPLEN (64 << 20) /* receivers/pcap.py MAX_CAPLEN */
#define ST_LIMIT 0
/* tcp_reassembly.py HOLD_AHEAD (tests check the two agree) */
#define HOLD_AHEAD (1u << 20)
#define ST_SLOW 1
#define ST_END 2

static PyTypeObject *HalfT, *ConnT, *EventT;
static PyObject *DATA_KIND, *OPEN_KIND, *CLOSE_KIND, *RESET_KIND, *GONE, *CONN_IDS, *S_IGNORED, *S_CONNECTIONS, *ONE,
    *ZERO;

/* _Half slots (all of them: new_conn() fills every one, as _Half.__init__ does) */
static Py_ssize_t h_conn, h_next_seq, h_delivered, h_segs, h_closed, h_fin_at, h_peer, h_src, h_sport, h_dst, h_dport,
    h_is_client, h_held, h_key, h_buffered, h_held_ack;
/* _Conn slots */
static Py_ssize_t c_id, c_last_ts, c_syn_isn, c_buffered, c_a, c_b;
/* TcpEvent slots */
static Py_ssize_t e_kind, e_conn_id, e_src, e_sport, e_dst, e_dport, e_ts_ns, e_payload, e_gap, e_client_is_src,
    e_egress, e_pid, e_tid, e_comm;


/* setup(Half, Conn, TcpEvent, DATA, OPEN, CLOSE, RESET, GONE, conn_ids): the reassembler's classes, event
 * kinds, the peer of a forgotten half and the connection id counter (once, at import). */
static PyObject *setup(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 9 || !PyType_Check(args[0]) || !PyType_Check(args[1]) || !PyType_Check(args[2]) ||
        !Py_IS_TYPE(args[7], (PyTypeObject *)args[0]) || !PyIter_Check(args[8])) {
        PyErr_SetString(PyExc_TypeError, "setup(Half, Conn, TcpEvent, DATA, OPEN, CLOSE, RESET, GONE, conn_ids)");
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
    OFF(h, h_key, "key");
    OFF(h, h_buffered, "buffered");
    OFF(h, h_held_ack, "held_ack");
    OFF(c, c_id, "id");
    OFF(c, c_last_ts, "last_ts");
    OFF(c, c_syn_isn, "syn_isn");
    OFF(c, c_buffered, "buffered");
    OFF(c, c_a, "a");
    OFF(c, c_b, "b");
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
    if (h->tp_dictoffset != 0 || c->tp_dictoffset != 0 || h->tp_base != &PyBaseObject_Type ||
        c->tp_base != &PyBaseObject_Type ||
        h->tp_basicsize != (Py_ssize_t)sizeof(PyObject) + 16 * (Py_ssize_t)sizeof(PyObject *) ||
        c->tp_basicsize != (Py_ssize_t)sizeof(PyObject) + 6 * (Py_ssize_t)sizeof(PyObject *)) {
        /* new_conn() fills every slot: a slot added to the classes must be added there too */
        PyErr_SetString(PyExc_TypeError, "_Half must have 16 slots and _Conn 6 (receivers/_fastpath.c new_conn)");
        return NULL;
    }
    Py_INCREF(h);
    Py_INCREF(c);
    Py_INCREF(e);
    Py_XSETREF(HalfT, h);
    Py_XSETREF(ConnT, c);
    Py_XSETREF(EventT, e);
    Py_XSETREF(DATA_KIND, Py_NewRef(args[3]));
    Py_XSETREF(OPEN_KIND, Py_NewRef(args[4]));
    Py_XSETREF(CLOSE_KIND, Py_NewRef(args[5]));
    Py_XSETREF(RESET_KIND, Py_NewRef(args[6]));
    Py_XSETREF(GONE, Py_NewRef(args[7]));
    Py_XSETREF(CONN_IDS, Py_NewRef(args[8]));
    Py_RETURN_NONE;
}

static inline uint32_t rd32(const unsigned char *p, int big) {
    if (big)
        return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
    return ((uint32_t)p[3] << 24) | ((uint32_t)p[2] << 16) | ((uint32_t)p[1] << 8) | p[0];
}

static inline unsigned be16(const unsigned char *p) { return ((unsigned)p[0] << 8) | p[1]; }

/* The packed IPv4 addresses as bytes, the same few objects again and again (their hash is then
 * computed once, and the halves' keys compare by identity): a direct-mapped cache, large enough for
 * a busy server's clients (16k entries, 128 KiB of pointers). New reference. */
#define ACACHE_BITS 14
static PyObject *acache[1 << ACACHE_BITS];

static PyObject *addr4(const unsigned char *p) {
    uint32_t a;
    memcpy(&a, p, 4);
    unsigned i = (unsigned)((a * 2654435761u) >> (32 - ACACHE_BITS));
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

/* tcp_reassembly.py TcpReassembler._str's bound: past it the address cache starts over */
#define ADDR_CACHE_MAX 65536

/* What one scan() call works on. */
typedef struct {
    PyObject *view, *halves, *touch, *events, *stats, *lru, *addr_cache;
    Py_ssize_t max_connections;
    /* The connection at the LRU's end as far as this call knows (a reference; NULL: not known): a
     * request's answer then costs no move_to_end. Set by touch() and new_conn(), cleared when forget()
     * takes it out; each call starts not knowing (Python reorders the LRU between calls). */
    PyObject *last;
} Ctx;

/* An exact int that fits a long long: 1 and its value, else 0 (the packet goes to Python). */
static inline int as_ll(PyObject *o, long long *out) {
    if (o == NULL || !PyLong_CheckExact(o))
        return 0;
    int ovf = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &ovf);
    if (ovf)
        return 0;
    *out = v;
    return 1;
}

/* An exact int 0 (what ``buffered`` is when nothing is): _forget then has no total to correct. */
static inline int is_zero(PyObject *o) {
    long long v;
    return as_ll(o, &v) && v == 0;
}

/* ``segs`` holding nothing: None, or the empty list _deliver_buffered may leave. */
static inline int no_segs(PyObject *o) { return o == Py_None || (o != NULL && PyList_CheckExact(o) && !PyList_GET_SIZE(o)); }

/* _emit: TcpEvent(kind, conn.id, h.src, h.sport, h.dst, h.dport, ts, payload, 0, h.is_client) appended to
 * ``events``. Steals ``payload`` (NULL: None). 0, or -1 with an exception. */
static int emit(PyObject *events, PyObject *kind, PyObject *h, PyObject *cid, PyObject *tso, PyObject *payload) {
    PyObject *ev = EventT->tp_alloc(EventT, 0);
    if (ev == NULL) {
        Py_XDECREF(payload);
        return -1;
    }
    SLOT(ev, e_kind) = Py_NewRef(kind);
    SLOT(ev, e_conn_id) = Py_NewRef(cid);
    SLOT(ev, e_src) = Py_XNewRef(SLOT(h, h_src));
    SLOT(ev, e_sport) = Py_XNewRef(SLOT(h, h_sport));
    SLOT(ev, e_dst) = Py_XNewRef(SLOT(h, h_dst));
    SLOT(ev, e_dport) = Py_XNewRef(SLOT(h, h_dport));
    SLOT(ev, e_ts_ns) = Py_NewRef(tso);
    SLOT(ev, e_payload) = payload != NULL ? payload : Py_NewRef(Py_None);
    SLOT(ev, e_gap) = Py_NewRef(ZERO);
    SLOT(ev, e_client_is_src) = Py_XNewRef(SLOT(h, h_is_client));
    SLOT(ev, e_egress) = Py_NewRef(Py_None);
    SLOT(ev, e_pid) = Py_NewRef(Py_None);
    SLOT(ev, e_tid) = Py_NewRef(Py_None);
    SLOT(ev, e_comm) = Py_NewRef(Py_None);
    int rc = PyList_Append(events, ev);
    Py_DECREF(ev);
    return rc;
}

/* d[key] += 1, for a value the caller saw is an exact int. */
static int stat_inc(PyObject *d, PyObject *key) {
    PyObject *v = PyDict_GetItemWithError(d, key);
    if (v == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "_fastpath: a counter went missing");
        return -1;
    }
    PyObject *v1 = PyNumber_Add(v, ONE);
    if (v1 == NULL)
        return -1;
    int rc = PyDict_SetItem(d, key, v1);
    Py_DECREF(v1);
    return rc;
}

/* 1 when d[key] is an exact int (stat_inc can count it), else 0; -1 on error. */
static int stat_ok(PyObject *d, PyObject *key) {
    PyObject *v = PyDict_GetItemWithError(d, key);
    if (v == NULL)
        return PyErr_Occurred() ? -1 : 0;
    return PyLong_CheckExact(v);
}

/* _str for a packed IPv4 address: the cached text, or inet_ntop's dotted quad, cached. New reference. */
static PyObject *addr_str(PyObject *cache, PyObject *a) {
    PyObject *s = PyDict_GetItemWithError(cache, a);
    if (s != NULL)
        return Py_NewRef(s);
    if (PyErr_Occurred())
        return NULL;
    if (PyDict_GET_SIZE(cache) > ADDR_CACHE_MAX)
        PyDict_Clear(cache);
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(a);
    s = PyUnicode_FromFormat("%u.%u.%u.%u", p[0], p[1], p[2], p[3]);
    if (s == NULL)
        return NULL;
    if (PyDict_SetItem(cache, a, s) < 0) {
        Py_DECREF(s);
        return NULL;
    }
    return s;
}

/* _Half.__init__: every slot, as there. New reference. */
static PyObject *new_half(PyObject *conn, PyObject *key, PyObject *src, PyObject *sport, PyObject *dst, PyObject *dport,
                          PyObject *is_client) {
    PyObject *h = HalfT->tp_alloc(HalfT, 0);
    if (h == NULL)
        return NULL;
    SLOT(h, h_conn) = Py_NewRef(conn);
    SLOT(h, h_key) = Py_NewRef(key);
    SLOT(h, h_src) = Py_NewRef(src);
    SLOT(h, h_sport) = Py_NewRef(sport);
    SLOT(h, h_dst) = Py_NewRef(dst);
    SLOT(h, h_dport) = Py_NewRef(dport);
    SLOT(h, h_is_client) = Py_NewRef(is_client);
    SLOT(h, h_next_seq) = Py_NewRef(Py_None);
    SLOT(h, h_delivered) = Py_NewRef(ZERO);
    SLOT(h, h_segs) = Py_NewRef(Py_None);
    SLOT(h, h_buffered) = Py_NewRef(ZERO);
    SLOT(h, h_fin_at) = Py_NewRef(Py_None);
    SLOT(h, h_closed) = Py_NewRef(Py_False);
    SLOT(h, h_peer) = Py_NewRef(Py_None);
    SLOT(h, h_held) = Py_NewRef(Py_None);
    SLOT(h, h_held_ack) = Py_NewRef(ZERO);
    return h;
}

/* _new_conn(src, sport, dst, dport, ts, client_is_src) when there is room (the caller checked: no
 * eviction here) and stats["connections"] is an exact int. New reference to the sender's half. */
static PyObject *new_conn(Ctx *c, PyObject *k1, PyObject *tso, PyObject *client_is_src) {
    PyObject *src = PyTuple_GET_ITEM(k1, 0), *sport = PyTuple_GET_ITEM(k1, 1), *dst = PyTuple_GET_ITEM(k1, 2),
             *dport = PyTuple_GET_ITEM(k1, 3);
    PyObject *cid = PyIter_Next(CONN_IDS);
    if (cid == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "_fastpath: the connection id counter ended");
        return NULL;
    }
    PyObject *conn = ConnT->tp_alloc(ConnT, 0), *s = NULL, *d = NULL, *k2 = NULL, *h = NULL, *p = NULL;
    if (conn == NULL) {
        Py_DECREF(cid);
        return NULL;
    }
    SLOT(conn, c_id) = cid;
    SLOT(conn, c_last_ts) = Py_NewRef(tso);
    SLOT(conn, c_syn_isn) = Py_NewRef(Py_None);
    SLOT(conn, c_buffered) = Py_NewRef(ZERO);
    SLOT(conn, c_a) = Py_NewRef(Py_None);
    SLOT(conn, c_b) = Py_NewRef(Py_None);
    if ((s = addr_str(c->addr_cache, src)) == NULL || (d = addr_str(c->addr_cache, dst)) == NULL ||
        (k2 = PyTuple_Pack(4, dst, dport, src, sport)) == NULL)
        goto error;
    h = new_half(conn, k1, s, sport, d, dport, client_is_src);
    if (h == NULL)
        goto error;
    p = new_half(conn, k2, d, dport, s, sport, client_is_src == Py_True ? Py_False : Py_True);
    if (p == NULL)
        goto error;
    set_slot(h, h_peer, Py_NewRef(p));
    set_slot(p, h_peer, Py_NewRef(h));
    set_slot(conn, c_a, Py_NewRef(h));
    set_slot(conn, c_b, Py_NewRef(p));
    if (PyDict_SetItem(c->halves, k1, h) < 0 || PyDict_SetItem(c->halves, k2, p) < 0 ||
        PyObject_SetItem(c->lru, cid, conn) < 0 || stat_inc(c->stats, S_CONNECTIONS) < 0)
        goto error;
    Py_XSETREF(c->last, Py_NewRef(conn));
    Py_DECREF(s);
    Py_DECREF(d);
    Py_DECREF(k2);
    Py_DECREF(p);
    Py_DECREF(conn);
    return h;
error:
    Py_XDECREF(s);
    Py_XDECREF(d);
    Py_XDECREF(k2);
    Py_XDECREF(h);
    Py_XDECREF(p);
    Py_DECREF(conn);
    return NULL;
}

/* _forget(conn), for a connection whose halves buffer nothing (the caller checked: buffered 0, so the
 * reassembler's total stays as it is). The caller holds references to the connection and its halves. */
static int forget(Ctx *c, PyObject *conn) {
    PyObject *hs[2] = {SLOT(conn, c_a), SLOT(conn, c_b)};
    if (conn == c->last)
        Py_CLEAR(c->last);
    if (PyObject_DelItem(c->lru, SLOT(conn, c_id)) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_KeyError))
            return -1;
        PyErr_Clear();
    }
    for (int i = 0; i < 2; i++) {
        PyObject *x = hs[i], *key = SLOT(x, h_key);
        PyObject *cur = PyDict_GetItemWithError(c->halves, key);
        if (cur == NULL && PyErr_Occurred())
            return -1;
        if (cur == x && PyDict_DelItem(c->halves, key) < 0)
            return -1;
        set_slot(x, h_buffered, Py_NewRef(ZERO));
        set_slot(x, h_segs, Py_NewRef(Py_None));
        set_slot(x, h_held, Py_NewRef(Py_None));
        set_slot(x, h_peer, Py_NewRef(GONE));
    }
    set_slot(conn, c_a, Py_NewRef(Py_None));
    set_slot(conn, c_b, Py_NewRef(Py_None));
    set_slot(conn, c_buffered, Py_NewRef(ZERO));
    return 0;
}

/* touch(conn.id): the LRU's move_to_end (nothing to do for the connection already at its end). */
static int touch(Ctx *c, PyObject *conn) {
    if (conn == c->last)
        return 0;
    PyObject *res = PyObject_CallOneArg(c->touch, SLOT(conn, c_id));
    if (res == NULL)
        return -1;
    Py_DECREF(res);
    Py_XSETREF(c->last, Py_NewRef(conn));
    return 0;
}

/* The peer of ``h`` and ``h``'s connection, when both are what the reassembler makes (the connection
 * live, its halves ``h`` and the peer): 1, else 0. Borrowed. */
static int pair_of(PyObject *h, PyObject **pconn, PyObject **ppeer) {
    PyObject *conn = SLOT(h, h_conn), *p = SLOT(h, h_peer);
    if (conn == NULL || !Py_IS_TYPE(conn, ConnT) || p == NULL || !Py_IS_TYPE(p, HalfT) || SLOT(conn, c_id) == NULL ||
        SLOT(p, h_conn) != conn || SLOT(p, h_peer) != h)
        return 0;
    PyObject *a = SLOT(conn, c_a), *b = SLOT(conn, c_b);
    if (!((a == h && b == p) || (a == p && b == h)))
        return 0;
    *pconn = conn;
    *ppeer = p;
    return 1;
}

/* A new int for ``ts``, or NULL with an exception. */
#define TSO(ts) PyLong_FromLongLong(ts)

/* segment's fast path: a known connection, no SYN/FIN/RST, payload (if any) exactly in order, nothing
 * buffered, no hold, and no hole or pending FIN of the peer below the ACK. */
static int in_order(Ctx *c, PyObject *h, PyObject *conn, PyObject *p, const unsigned char *t, Py_ssize_t poff,
                    Py_ssize_t plen, long long ts) {
    uint32_t seq = rd32(t + 4, 1);
    unsigned flags = t[13];
    long long delivered = 0, nsv, pv;
    /* A hold of the peer's, which this packet may end (segment's last lines: _release, in Python). */
    if (SLOT(p, h_held) != Py_None)
        return 0;
    if (plen) {
        if (!as_ll(SLOT(h, h_next_seq), &nsv) || nsv != (long long)seq)
            return 0;
        if (!as_ll(SLOT(h, h_delivered), &delivered) || delivered < 0 || delivered > LLONG_MAX - plen)
            return 0;
        if (SLOT(h, h_segs) != Py_None || SLOT(h, h_closed) != Py_False || SLOT(h, h_held) != Py_None)
            return 0;
    }
    if (flags & 0x10) { /* the peer's holes or pending FIN below this ACK: _ack_gap, in Python */
        PyObject *fin_at = SLOT(p, h_fin_at), *pns = SLOT(p, h_next_seq);
        if (!no_segs(SLOT(p, h_segs)) || fin_at == NULL || pns == NULL)
            return 0;
        if (fin_at != Py_None && SLOT(p, h_closed) != Py_True)
            return 0;
        /* This payload's ACK ahead of the peer bytes seen: it may have to wait (_hold, rare). */
        if (plen && pns != Py_None) {
            if (!as_ll(pns, &pv) || pv < 0 || pv > 0xFFFFFFFFLL)
                return 0;
            uint32_t ahead = rd32(t + 8, 1) - (uint32_t)pv;
            if (ahead != 0 && ahead <= HOLD_AHEAD)
                return 0;
        }
    }
    /* Everything checked: from here on the packet is taken. */
    PyObject *tso = TSO(ts);
    if (tso == NULL)
        return -1;
    set_slot(conn, c_last_ts, Py_NewRef(tso));
    if (touch(c, conn) < 0)
        goto error;
    if (plen) {
        PyObject *payload = PySequence_GetSlice(c->view, poff, poff + plen);
        if (payload == NULL || emit(c->events, DATA_KIND, h, SLOT(conn, c_id), tso, payload) < 0)
            goto error;
        PyObject *nseq = PyLong_FromUnsignedLong((unsigned long)((seq + (uint32_t)plen) & 0xFFFFFFFFu));
        PyObject *ndel = PyLong_FromLongLong(delivered + plen);
        if (nseq == NULL || ndel == NULL) {
            Py_XDECREF(nseq);
            Py_XDECREF(ndel);
            goto error;
        }
        set_slot(h, h_next_seq, nseq);
        set_slot(h, h_delivered, ndel);
    }
    Py_DECREF(tso);
    return 1;
error:
    Py_DECREF(tso);
    return -1;
}

/* _slow's RST of a known connection with nothing buffered or pending (_drain has nothing to give up):
 * RESET from its sender, both directions closed, the connection forgotten. */
static int reset(Ctx *c, PyObject *h, PyObject *conn, PyObject *p, long long ts) {
    PyObject *hs[2] = {h, p};
    for (int i = 0; i < 2; i++) {
        PyObject *x = hs[i], *closed = SLOT(x, h_closed), *fin_at = SLOT(x, h_fin_at);
        if (SLOT(x, h_held) != Py_None || !no_segs(SLOT(x, h_segs)) || !is_zero(SLOT(x, h_buffered)) ||
            (closed != Py_True && closed != Py_False) || fin_at == NULL || (fin_at != Py_None && closed != Py_True))
            return 0;
    }
    PyObject *tso = TSO(ts);
    if (tso == NULL)
        return -1;
    Py_INCREF(h);
    Py_INCREF(p);
    Py_INCREF(conn);
    set_slot(conn, c_last_ts, Py_NewRef(tso));
    int rc = emit(c->events, RESET_KIND, h, SLOT(conn, c_id), tso, NULL);
    if (rc == 0) {
        set_slot(h, h_closed, Py_NewRef(Py_True));
        set_slot(p, h_closed, Py_NewRef(Py_True));
        rc = forget(c, conn);
    }
    Py_DECREF(tso);
    Py_DECREF(conn);
    Py_DECREF(p);
    Py_DECREF(h);
    return rc < 0 ? -1 : 1;
}

/* _slow's SYN-ACK of a known connection (no data, no FIN): the server's ISN, the client's when its SYN
 * was missed. */
static int syn_ack(Ctx *c, PyObject *h, PyObject *conn, PyObject *p, uint32_t seq, uint32_t ack, long long ts) {
    PyObject *ns = SLOT(h, h_next_seq), *pns = SLOT(p, h_next_seq);
    if (ns == NULL || pns == NULL)
        return 0;
    PyObject *tso = TSO(ts);
    if (tso == NULL)
        return -1;
    if (ns == Py_None) {
        PyObject *v = PyLong_FromUnsignedLong((unsigned long)((seq + 1u) & 0xFFFFFFFFu));
        if (v == NULL)
            goto error;
        set_slot(h, h_next_seq, v);
    }
    if (pns == Py_None && ack) {
        PyObject *v = PyLong_FromUnsignedLong((unsigned long)ack);
        if (v == NULL)
            goto error;
        set_slot(p, h_next_seq, v);
    }
    set_slot(conn, c_last_ts, tso); /* the reference made above */
    return touch(c, conn) < 0 ? -1 : 1;
error:
    Py_DECREF(tso);
    return -1;
}

/* _slow's FIN (no SYN, no RST) of a known, open direction, exactly in order, nothing buffered or held on
 * either side, no hole or pending FIN of the peer below its ACK: its data (if any), CLOSE, and the
 * connection forgotten when the peer had closed already (_data, _check_fin, _forget). */
static int fin(Ctx *c, PyObject *h, PyObject *conn, PyObject *p, const unsigned char *t, Py_ssize_t poff,
               Py_ssize_t plen, long long ts) {
    uint32_t seq = rd32(t + 4, 1);
    unsigned flags = t[13];
    long long nsv, delivered, pv;
    PyObject *pclosed = SLOT(p, h_closed), *pns = SLOT(p, h_next_seq), *pfin = SLOT(p, h_fin_at);
    if (SLOT(h, h_closed) != Py_False || SLOT(h, h_held) != Py_None || SLOT(h, h_segs) != Py_None ||
        SLOT(h, h_fin_at) != Py_None || SLOT(p, h_held) != Py_None || pns == NULL || pfin == NULL ||
        (pclosed != Py_True && pclosed != Py_False))
        return 0;
    if (!as_ll(SLOT(h, h_next_seq), &nsv) || nsv != (long long)seq)
        return 0;
    if (!as_ll(SLOT(h, h_delivered), &delivered) || delivered < 0 || delivered > LLONG_MAX - plen)
        return 0;
    if (flags & 0x10) {
        if (!no_segs(SLOT(p, h_segs)) || (pfin != Py_None && pclosed != Py_True))
            return 0;
        if (plen && pns != Py_None) { /* _ahead: the Python path decides whether it waits */
            if (!as_ll(pns, &pv) || pv < 0 || pv > 0xFFFFFFFFLL)
                return 0;
            uint32_t ahead = rd32(t + 8, 1) - (uint32_t)pv;
            if (ahead != 0 && ahead <= HOLD_AHEAD)
                return 0;
        }
    }
    int gone = pclosed == Py_True; /* both directions closed: _forget */
    if (gone && (!is_zero(SLOT(h, h_buffered)) || !is_zero(SLOT(p, h_buffered))))
        return 0;
    PyObject *tso = TSO(ts);
    if (tso == NULL)
        return -1;
    int rc = -1;
    Py_INCREF(h);
    Py_INCREF(p);
    Py_INCREF(conn);
    PyObject *cid = SLOT(conn, c_id);
    set_slot(conn, c_last_ts, Py_NewRef(tso));
    if (touch(c, conn) < 0)
        goto done;
    PyObject *ndel = PyLong_FromLongLong(delivered + plen);
    if (ndel == NULL)
        goto done;
    if (plen) {
        PyObject *payload = PySequence_GetSlice(c->view, poff, poff + plen);
        PyObject *nseq = PyLong_FromUnsignedLong((unsigned long)((seq + (uint32_t)plen) & 0xFFFFFFFFu));
        if (payload == NULL || nseq == NULL || emit(c->events, DATA_KIND, h, cid, tso, payload) < 0) {
            if (payload == NULL)
                Py_XDECREF(nseq);
            else if (nseq == NULL)
                Py_DECREF(payload);
            else
                Py_DECREF(nseq);
            Py_DECREF(ndel);
            goto done;
        }
        set_slot(h, h_next_seq, nseq);
        set_slot(h, h_delivered, Py_NewRef(ndel));
    }
    set_slot(h, h_fin_at, ndel);
    set_slot(h, h_closed, Py_NewRef(Py_True));
    if (emit(c->events, CLOSE_KIND, h, cid, tso, NULL) < 0)
        goto done;
    rc = gone ? forget(c, conn) : 0;
done:
    Py_DECREF(tso);
    Py_DECREF(conn);
    Py_DECREF(p);
    Py_DECREF(h);
    return rc < 0 ? -1 : 1;
}

/* _slow's SYN (no ACK) or SYN-ACK of a connection not tracked, without data or FIN, when there is room
 * for it (else _new_conn evicts, in Python): OPEN from the client, the ISNs. */
static int open_conn(Ctx *c, PyObject *key, uint32_t seq, uint32_t ack, unsigned flags, long long ts) {
    Py_ssize_t live = PyObject_Length(c->lru);
    if (live < 0)
        return -1;
    if (live >= c->max_connections)
        return 0;
    int ok = stat_ok(c->stats, S_CONNECTIONS);
    if (ok <= 0)
        return ok;
    PyObject *tso = TSO(ts);
    if (tso == NULL)
        return -1;
    int synack = (flags & 0x10) != 0, rc = -1;
    PyObject *h = new_conn(c, key, tso, synack ? Py_False : Py_True);
    if (h == NULL)
        goto done;
    PyObject *conn = SLOT(h, h_conn), *p = SLOT(h, h_peer);
    PyObject *nseq = PyLong_FromUnsignedLong((unsigned long)((seq + 1u) & 0xFFFFFFFFu));
    if (nseq == NULL)
        goto done;
    set_slot(h, h_next_seq, nseq);
    if (synack) {
        if (emit(c->events, OPEN_KIND, p, SLOT(conn, c_id), tso, NULL) < 0)
            goto done;
        if (ack) {
            PyObject *v = PyLong_FromUnsignedLong((unsigned long)ack);
            if (v == NULL)
                goto done;
            set_slot(p, h_next_seq, v);
        }
    } else {
        PyObject *isn = PyLong_FromUnsignedLong((unsigned long)seq);
        if (isn == NULL)
            goto done;
        set_slot(conn, c_syn_isn, isn);
        if (emit(c->events, OPEN_KIND, h, SLOT(conn, c_id), tso, NULL) < 0)
            goto done;
    }
    rc = 1; /* the LRU's touch: the connection was just added at its end */
done:
    Py_XDECREF(h);
    Py_DECREF(tso);
    return rc;
}

/* _slow for a known connection: RST, SYN-ACK or FIN; anything else (a SYN on it, data on a SYN) to Python. */
static int flagged(Ctx *c, PyObject *h, PyObject *conn, PyObject *p, const unsigned char *t, Py_ssize_t poff,
                   Py_ssize_t plen, long long ts) {
    unsigned flags = t[13];
    if (flags & 0x04)
        return reset(c, h, conn, p, ts);
    if (flags & 0x02) {
        if ((flags & 0x11) != 0x10 || plen)
            return 0; /* retransmitted SYN, port reuse, simultaneous open, data or FIN on a SYN: Python */
        return syn_ack(c, h, conn, p, rd32(t + 4, 1), rd32(t + 8, 1), ts);
    }
    return fin(c, h, conn, p, t, poff, plen, ts);
}

/* One TCP segment (tcp_reassembly.py TcpReassembler.segment), ``key`` its 4-tuple: 1 taken, 0 for Python
 * (nothing of it done), -1 on error. */
static int segment(Ctx *c, PyObject *key, const unsigned char *t, Py_ssize_t poff, Py_ssize_t plen, long long ts) {
    uint32_t seq = rd32(t + 4, 1), ack = rd32(t + 8, 1);
    unsigned flags = t[13];
    PyObject *h = PyDict_GetItemWithError(c->halves, key); /* borrowed */
    if (h == NULL) {
        if (PyErr_Occurred())
            return -1;
        if ((flags & 0x07) == 0x02 && plen == 0) /* SYN, SYN-ACK of a new connection (no data, no FIN) */
            return open_conn(c, key, seq, ack, flags, ts);
        /* _slow: an RST, or a bare ACK/FIN, of a connection not tracked */
        if ((flags & 0x02) || plen)
            return 0;
        int ok = stat_ok(c->stats, S_IGNORED);
        if (ok <= 0)
            return ok;
        return stat_inc(c->stats, S_IGNORED) < 0 ? -1 : 1;
    }
    if (!Py_IS_TYPE(h, HalfT))
        return 0;
    PyObject *conn, *p;
    if (!pair_of(h, &conn, &p))
        return 0;
    if (flags & 0x07)
        return flagged(c, h, conn, p, t, poff, plen, ts);
    return in_order(c, h, conn, p, t, poff, plen, ts);
}

/* A port number's int, made once (ports above 256 are not among CPython's small ints): no allocation
 * a packet, and the halves' keys compare by identity. New reference. */
static PyObject *ports[65536];

static inline PyObject *port_obj(unsigned port) {
    PyObject *o = ports[port];
    if (o == NULL) {
        o = PyLong_FromLong((long)port);
        if (o == NULL)
            return NULL;
        ports[port] = o;
    }
    return Py_NewRef(o);
}

static PyObject *scan(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 15) {
        PyErr_SetString(PyExc_TypeError, "scan() takes 15 arguments");
        return NULL;
    }
    if (HalfT == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "setup() was not called");
        return NULL;
    }
    PyObject *view = args[0], *halves = args[5], *events = args[7], *stats = args[11], *lru = args[12],
             *addr_cache = args[13];
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    long long tick = PyLong_AsLongLong(args[2]);
    int big = PyObject_IsTrue(args[3]);
    long long ts_shift = PyLong_AsLongLong(args[4]);
    Py_ssize_t max_events = PyLong_AsSsize_t(args[8]);
    Py_ssize_t budget = PyLong_AsSsize_t(args[9]);
    long long next_sweep = PyLong_AsLongLong(args[10]);
    Py_ssize_t max_connections = PyLong_AsSsize_t(args[14]);
    if (PyErr_Occurred())
        return NULL;
    if (!PyDict_CheckExact(halves) || !PyList_CheckExact(events) || !PyDict_CheckExact(stats) ||
        !PyDict_CheckExact(addr_cache) || !PyDict_Check(lru)) {
        PyErr_SetString(PyExc_TypeError, "scan(): halves, stats and addr_cache must be dicts, lru a mapping, "
                                         "events a list");
        return NULL;
    }
    Ctx ctx = {view, halves, args[6], events, stats, lru, addr_cache, max_connections, NULL};
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
        Py_ssize_t poff = off + 34 + hl, plen = ip_end - poff;

        /* tcp_reassembly.py TcpReassembler.segment */
        if (ts >= next_sweep)
            goto slow;
        PyObject *src = addr4(f + 26), *dst = addr4(f + 30);
        PyObject *ps = port_obj(sport), *pd = port_obj(dport);
        if (src == NULL || dst == NULL || ps == NULL || pd == NULL) {
            Py_XDECREF(src);
            Py_XDECREF(dst);
            Py_XDECREF(ps);
            Py_XDECREF(pd);
            goto error;
        }
        /* The 4-tuple key. The last packet's is used again when nothing else kept it (only the
         * lookup saw it): an allocation less a packet. Not from 3.14 on, where a tuple caches its hash. */
#if PY_VERSION_HEX < 0x030E0000
        if (key != NULL && Py_REFCNT(key) == 1) {
            for (int i = 0; i < 4; i++)
                Py_DECREF(PyTuple_GET_ITEM(key, i));
        } else
#endif
        {
            Py_XDECREF(key);
            key = PyTuple_New(4);
        }
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
        int rc = segment(&ctx, key, t, poff, plen, ts);
        if (rc < 0)
            goto error;
        if (rc == 0)
            goto slow;
        continue;
    slow:
        status = ST_SLOW;
        break;
    }
    Py_XDECREF(key);
    Py_XDECREF(ctx.last);
    PyBuffer_Release(&b);
    if (status == ST_SLOW)
        return Py_BuildValue("(innnLL(Lnn))", status, pos, n, nbytes, first, last, ts, off, end);
    return Py_BuildValue("(innnLLO)", status, pos, n, nbytes, first, last, Py_None);
error:
    Py_XDECREF(key);
    Py_XDECREF(ctx.last);
    PyBuffer_Release(&b);
    return NULL;
}

/* receivers/tls.py's _Plain (a connection whose first bytes are still looked at for a handshake):
 * its slots, and how many bytes are looked at (SNIFF_BYTES). */
static PyTypeObject *PlainT;
static Py_ssize_t pl_seen, pl_closes, pl_held;
static long long SNIFF;

/* plain_setup(_Plain, SNIFF_BYTES): once, at tls.py's import. */
static PyObject *plain_setup(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyType_Check(args[0]) || !PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "plain_setup(_Plain, SNIFF_BYTES)");
        return NULL;
    }
    PyTypeObject *t = (PyTypeObject *)args[0];
    if (slot_offset(t, "seen", &pl_seen) < 0 || slot_offset(t, "closes", &pl_closes) < 0 ||
        slot_offset(t, "held", &pl_held) < 0)
        return NULL;
    SNIFF = PyLong_AsLongLong(args[1]);
    if (SNIFF == -1 && PyErr_Occurred())
        return NULL;
    Py_XSETREF(PlainT, (PyTypeObject *)Py_NewRef(t));
    Py_RETURN_NONE;
}

/* A non-negative int slot's value, or -1 (anything else). */
static long long nonneg(PyObject *o) {
    if (o == NULL || !PyLong_CheckExact(o))
        return -1;
    int ovf = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &ovf);
    return ovf || v < 0 ? -1 : v;
}

/* A payload's length and first byte as Python's len(p) and p[0] say them, for bytes and a 1-D
 * byte view; 0 when it is neither (process() reads it). */
static int payload_head(PyObject *p, Py_ssize_t *n, int *first) {
    const unsigned char *b;
    if (PyBytes_CheckExact(p)) {
        *n = PyBytes_GET_SIZE(p);
        b = (const unsigned char *)PyBytes_AS_STRING(p);
    } else if (PyMemoryView_Check(p)) {
        Py_buffer *v = PyMemoryView_GET_BUFFER(p);
        if (v->ndim != 1 || v->itemsize != 1 || (v->format != NULL && strcmp(v->format, "B") != 0) ||
            (v->strides != NULL && v->strides[0] != 1) || v->suboffsets != NULL)
            return 0;
        *n = v->len;
        b = (const unsigned char *)v->buf;
    } else {
        return 0;
    }
    *first = *n ? b[0] : -1;
    return 1;
}

/* Sets an int slot; 0, or -1 with an exception. */
static int set_int(PyObject *o, Py_ssize_t off, long long v) {
    PyObject *x = PyLong_FromLongLong(v);
    if (x == NULL)
        return -1;
    set_slot(o, off, x);
    return 0;
}

/* process()'s steps for one event of a _Plain connection while nothing of the batch changed:
 * 0 done, 1 process()'s (a first byte that may start a TLS record, held events, odd slots),
 * -1 an exception. */
static int plain_step(PyObject *ev, PyObject *kind, PyObject *cid, PyObject *st, PyObject *conns, PyObject *pass,
                      PyObject *closing) {
    PyObject *held = SLOT(st, pl_held);
    long long seen = nonneg(SLOT(st, pl_seen)), closes = nonneg(SLOT(st, pl_closes));
    if (held != Py_None || seen < 0 || closes < 0)
        return 1;
    if (kind != DATA_KIND) {
        if (kind == CLOSE_KIND) {
            if (set_int(st, pl_closes, closes + 1) < 0)
                return -1;
            if (closes + 1 >= 2 && PyDict_DelItem(conns, cid) < 0)
                return -1;
        } else if (kind == RESET_KIND) {
            if (PyDict_DelItem(conns, cid) < 0)
                return -1;
        }
        return 0;
    }
    if (seen >= SNIFF) /* past the first bytes of a plain connection */
        return PyDict_SetItem(conns, cid, closes ? closing : pass);
    PyObject *p = SLOT(ev, e_payload);
    Py_ssize_t n;
    int first;
    if (p == NULL || !payload_head(p, &n, &first))
        return 1;
    if (n && first >= 20 && first <= 23) /* a TLS record type: the handshake tests are process()'s */
        return 1;
    seen += n;
    if (set_int(st, pl_seen, seen) < 0)
        return -1;
    if (seen >= SNIFF)
        return PyDict_SetItem(conns, cid, closes ? closing : pass);
    return 0;
}

/* plain_run(events, start, conns, PASS, PASS_CLOSING) -> the index of the first event from ``start``
 * that receivers/tls.py's process() must see itself, having done its steps for those before it:
 * an event of a connection known plain (``conns`` maps it to PASS or PASS_CLOSING: its FIN moves
 * it on, its second FIN or a RESET forgets it), a non-data event of one not tracked (OPEN), and
 * the events of a connection whose first bytes are still looked at (a _Plain: its data counted
 * unless a first byte may start a TLS record, its FINs and RESET). Only while nothing of the
 * batch was changed (process()'s ``out`` is None): those events then stay where they are. A
 * batch is mostly such events: process() was 7 % of a real Redis session's replay (its
 * connections are shorter than SNIFF_BYTES: they never leave _Plain). Before setup() and
 * plain_setup(), or for anything but a list and a dict, ``start``. */
static PyObject *plain_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "plain_run(events, start, conns, PASS, PASS_CLOSING)");
        return NULL;
    }
    Py_ssize_t i = PyLong_AsSsize_t(args[1]);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    PyObject *events = args[0], *conns = args[2], *pass = args[3], *closing = args[4];
    if (EventT == NULL || PlainT == NULL || !PyList_CheckExact(events) || !PyDict_CheckExact(conns) || i < 0)
        return PyLong_FromSsize_t(i < 0 ? 0 : i);
    for (; i < PyList_GET_SIZE(events); i++) {
        PyObject *ev = PyList_GET_ITEM(events, i);
        if (!Py_IS_TYPE(ev, EventT))
            break;
        PyObject *kind = SLOT(ev, e_kind), *cid = SLOT(ev, e_conn_id);
        if (kind == NULL || cid == NULL)
            break;
        Py_INCREF(ev); /* kept while any Python code (an id's __eq__, _Plain's __init__) runs */
        Py_INCREF(cid);
        PyObject *st = PyDict_GetItemWithError(conns, cid); /* borrowed */
        int r = 0;
        if (st == NULL && PyErr_Occurred()) {
            r = -1;
        } else if (st == pass || st == closing) {
            if (kind == CLOSE_KIND)
                r = st == pass ? PyDict_SetItem(conns, cid, closing) : PyDict_DelItem(conns, cid);
            else if (kind == RESET_KIND)
                r = PyDict_DelItem(conns, cid);
        } else if (st == NULL) {
            if (kind == DATA_KIND) { /* a new connection's first data: a _Plain(0), then as below */
                PyObject *zero = PyLong_FromLong(0);
                PyObject *pl = zero == NULL ? NULL : PyObject_CallOneArg((PyObject *)PlainT, zero);
                Py_XDECREF(zero);
                if (pl == NULL || PyDict_SetItem(conns, cid, pl) < 0)
                    r = -1;
                else
                    r = Py_IS_TYPE(pl, PlainT) ? plain_step(ev, kind, cid, pl, conns, pass, closing) : 1;
                Py_XDECREF(pl);
            }
        } else if (Py_IS_TYPE(st, PlainT)) {
            Py_INCREF(st);
            r = plain_step(ev, kind, cid, st, conns, pass, closing);
            Py_DECREF(st);
        } else {
            r = 1; /* a TLS session's: process()'s */
        }
        Py_DECREF(cid);
        Py_DECREF(ev);
        if (r < 0)
            return NULL;
        if (r)
            break;
    }
    return PyLong_FromSsize_t(i);
}

static PyMethodDef methods[] = {
    {"plain_setup", (PyCFunction)(void (*)(void))plain_setup, METH_FASTCALL, "plain_setup(_Plain, SNIFF_BYTES)"},
    {"plain_run", (PyCFunction)(void (*)(void))plain_run, METH_FASTCALL,
     "plain_run(events, start, conns, PASS, PASS_CLOSING) -> index of the first event tls.py must see"},
    {"setup", (PyCFunction)(void (*)(void))setup, METH_FASTCALL,
     "setup(Half, Conn, TcpEvent, DATA, OPEN, CLOSE, RESET, GONE, conn_ids): the reassembler's classes, whose slots"
     " scan() reads and writes, its event kinds, the peer of a forgotten half and the connection id counter."},
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "scan(view, pos, tick, big_endian, ts_shift, halves, touch, events, max_events, budget, next_sweep, stats, lru,"
     " addr_cache, max_connections)"
     " -> (status, pos, packets, nbytes, first_ts, last_ts, slow)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastpath", "The pcap replay's common packet (C).", -1,
                                     methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastpath(void) {
    if ((S_IGNORED = PyUnicode_InternFromString("ignored")) == NULL ||
        (S_CONNECTIONS = PyUnicode_InternFromString("connections")) == NULL || (ONE = PyLong_FromLong(1)) == NULL ||
        (ZERO = PyLong_FromLong(0)) == NULL)
        return NULL;
    return PyModule_Create(&module);
}
