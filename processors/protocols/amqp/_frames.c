/* processors.protocols.amqp._frames: v091.py's feed_whole frame walk in C.
 *
 * Contract (v091.py stays the reference and the fallback):
 *   walk(data, start) -> tuple | False | None
 * ``data``: one TCP segment (bytes or a contiguous memoryview); ``start``: where its frames
 * begin (8 after a client's protocol header, else 0). False: the frames from ``start`` do
 * not fill the segment exactly, each whole and ending with the frame-end octet 0xCE, a
 * method, content header or heartbeat of at most MAX_FRAME bytes, a body of any size
 * (feed_whole's check, which declines the segment then). None: a frame whose fields this
 * module decodes does not decode as v091.py's readers would read it without raising, or
 * anything else unusual: the Python path then reads the segment and classifies any fault
 * as it always has. So this file never reproduces an error reason, and any tuple it
 * returns is what the Python readers would have read, frame by frame.
 *
 * The tuple holds one record a frame, in order (heartbeats, which do nothing, have none):
 *   (1, channel, off, end, (class_id, method_id))  any other method: off = the frame's first
 *                                                  octet, end = its frame-end octet's offset
 *   (2, channel, body_size, correlation_id, message_id, traceparent)
 *                                                  a content header (str or None each: None
 *                                                  when the property is absent; traceparent
 *                                                  the headers table's last one, possibly "")
 *   (3, channel, size)                             a body frame
 *   (4, channel, exchange, routing_key)            basic.publish
 *   (5, channel, consumer_tag, delivery_tag, redelivered, exchange, routing_key)
 *                                                  basic.deliver (redelivered: 0 or 1)
 *   (6, channel, method_id, delivery_tag, bits)    basic.ack (80), reject (90), nack (120)
 *   (7, channel, connection_name)                  connection.start-ok (str or None)
 *   (11, channel)                                  methods without a span (v091's _no_span
 *                                                  handler: tune, open, flow, ...), consecutive
 *                                                  on the channel (heartbeats between them too)
 *   (9, channel, exchange, routing_key, body_size, correlation_id, message_id, traceparent, total)
 *   (10, channel, consumer_tag, delivery_tag, redelivered, exchange, routing_key, body_size,
 *        correlation_id, message_id, traceparent, total)
 *                                                  a message: a publish (9) or deliver (10)
 *                                                  followed by its content header on the same
 *                                                  channel (the records 4 or 5, then 2, in one)
 *                                                  and by the body frames on the channel that
 *                                                  follow it while the body is not complete
 *                                                  and do not overrun it: ``total`` their bytes
 *                                                  (none after a header of body size 0)
 * Names are decoded as v091.py does (UTF-8, errors replaced).
 *
 * Memory: every read is bounds-checked against the frame it belongs to (and so the
 * buffer); declared lengths are u32 and summed in 64 bits. At most MAX_RECORDS records a
 * call (more: None), so what is allocated is bounded whatever the segment. No mutable
 * global state.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdarg.h>
#include <stdint.h>

/* v091.MAX_FRAME: the largest method, content-header or heartbeat frame read whole. */
#define MAX_FRAME (1024 * 1024)
/* Records a call: a segment of more frames (tiny ones) is left to the Python path. */
#define MAX_RECORDS 256

#define T_METHOD 1
#define T_HEADER 2
#define T_BODY 3
#define T_HEARTBEAT 8
#define FRAME_END 0xCE
/* Record kinds beyond the frame types (the header lists them). */
#define K_PUBLISH 4
#define K_DELIVER 5
#define K_MESSAGE 5 /* + K_PUBLISH: 9, + K_DELIVER: 10 */

/* A run of methods without a span (v091's _no_span handler) on one channel. */
#define K_NO_SPAN 11

/* v091._HANDLERS' methods whose handler is _no_span: connection.start, secure, secure-ok, tune,
 * tune-ok, open, blocked, unblocked, update-secret, update-secret-ok; channel.flow, flow-ok;
 * basic.recover-async (tests/test_amqp_speedup.py holds this list equal to the table). */
static int nospan(uint32_t cls, uint32_t meth) {
    if (cls == 10)
        return meth == 10 || meth == 20 || meth == 21 || meth == 30 || meth == 31 || meth == 40 || meth == 60 ||
               meth == 61 || meth == 70 || meth == 71;
    if (cls == 20)
        return meth == 20 || meth == 21;
    return cls == 60 && meth == 100;
}

/* A field table's value types of a fixed size (v091._FIXED), -1: not fixed. */
static signed char FIXED[256];

static void init_tables(void) {
    for (int i = 0; i < 256; i++)
        FIXED[i] = -1;
    FIXED['t'] = 1; FIXED['b'] = 1; FIXED['B'] = 1; FIXED['s'] = 2; FIXED['u'] = 2;
    FIXED['I'] = 4; FIXED['i'] = 4; FIXED['l'] = 8; FIXED['L'] = 8; FIXED['f'] = 4;
    FIXED['d'] = 8; FIXED['D'] = 5; FIXED['T'] = 8; FIXED['V'] = 0;
}

static inline uint32_t be16(const unsigned char *p) { return ((uint32_t)p[0] << 8) | p[1]; }

static inline uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline uint64_t be64(const unsigned char *p) { return ((uint64_t)be32(p) << 32) | be32(p + 4); }

/* bytes.lower() of p[0:n] equals the lower-case ``lit`` (ASCII letters only, as bytes.lower). */
static int ieq(const unsigned char *p, const char *lit, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = p[i];
        if (c >= 'A' && c <= 'Z')
            c |= 0x20;
        if (c != (unsigned char)lit[i])
            return 0;
    }
    return 1;
}

/* A shortstr at ``off`` within [.., end): *s its first byte, *len its length. Returns the
 * offset after it, or -1 where v091._shortstr raises. */
static Py_ssize_t shortstr(const unsigned char *p, Py_ssize_t off, Py_ssize_t end, Py_ssize_t *s,
                           Py_ssize_t *len) {
    if (off >= end)
        return -1;
    Py_ssize_t nxt = off + 1 + p[off];
    if (nxt > end)
        return -1;
    *s = off + 1;
    *len = p[off];
    return nxt;
}

/* v091._table_get with one wanted key ``key`` (lower case, ``klen_want`` bytes): the table
 * at ``off`` within [.., end). *vs / *vl: the last matching long-string value (*vs = -1:
 * none). Returns the offset after the table, or -1 where _table_get raises (or would keep
 * "" for a value overrunning the table: it then raises at the next check anyway). */
static Py_ssize_t table_find(const unsigned char *p, Py_ssize_t off, Py_ssize_t end, const char *key,
                             Py_ssize_t klen_want, Py_ssize_t *vs, Py_ssize_t *vl) {
    *vs = -1;
    *vl = 0;
    if (off + 4 > end)
        return -1;
    Py_ssize_t tend = off + 4 + (Py_ssize_t)be32(p + off);
    if (tend > end)
        return -1;
    Py_ssize_t q = off + 4;
    while (q < tend) {
        Py_ssize_t klen = p[q];
        Py_ssize_t tpos = q + 1 + klen; /* the value's type octet */
        if (tpos >= tend)
            return -1;
        unsigned char t = p[tpos];
        q = tpos + 1;
        if (t == 'S') {
            if (q + 4 > tend)
                return -1;
            Py_ssize_t n = (Py_ssize_t)be32(p + q);
            if (klen == klen_want && n <= 1024 && ieq(p + tpos - klen, key, klen)) {
                if (q + 4 + n > tend)
                    return -1;
                *vs = q + 4;
                *vl = n;
            }
            q += 4 + n;
        } else if (FIXED[t] >= 0) {
            q += FIXED[t];
        } else if (t == 'x' || t == 'A' || t == 'F') {
            if (q + 4 > tend)
                return -1;
            q += 4 + (Py_ssize_t)be32(p + q);
        } else {
            return -1;
        }
        if (q > tend)
            return -1;
    }
    return tend;
}

static PyObject *str_at(const unsigned char *p, Py_ssize_t s, Py_ssize_t len) {
    return PyUnicode_DecodeUTF8((const char *)p + s, len, "replace");
}

/* A str of p[s:s+len], or None for s < 0. */
static PyObject *str_or_none(const unsigned char *p, Py_ssize_t s, Py_ssize_t len) {
    if (s < 0)
        Py_RETURN_NONE;
    return str_at(p, s, len);
}

/* A tuple of the ``n`` objects after ``n``, each a new reference it takes (a NULL among them,
 * a failed conversion: the others released, NULL returned). Py_BuildValue parsed its format
 * string for each record: most of a short segment's time in this module. */
static PyObject *tup(Py_ssize_t n, ...) {
    PyObject *items[16];
    va_list ap;
    int failed = 0;
    va_start(ap, n);
    for (Py_ssize_t i = 0; i < n; i++) {
        items[i] = va_arg(ap, PyObject *);
        if (items[i] == NULL)
            failed = 1;
    }
    va_end(ap);
    PyObject *t = failed ? NULL : PyTuple_New(n);
    if (t == NULL) {
        for (Py_ssize_t i = 0; i < n; i++)
            Py_XDECREF(items[i]);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(t, i, items[i]);
    return t;
}

#define INT(x) PyLong_FromLong((long)(x))
#define U64(x) PyLong_FromUnsignedLongLong((unsigned long long)(x))

/* Sentinel for "decline" from the frame decoders (distinct from NULL: a Python error). */
static PyObject DECLINE_OBJ;
#define DECLINE (&DECLINE_OBJ)

/* The content header whose payload is [p, end) (end: the frame-end octet), as v091._header
 * reads it. */
static PyObject *header(const unsigned char *d, Py_ssize_t p, Py_ssize_t end, uint32_t channel) {
    if (end - p < 14)
        return DECLINE;
    if (be16(d + p) != 60)
        return DECLINE;
    uint64_t body = be64(d + p + 4);
    uint32_t flags = be16(d + p + 12);
    Py_ssize_t q = p + 14;
    uint32_t f = flags;
    while (f & 1) { /* further flag words: stepped over */
        if (q + 2 > end)
            return DECLINE;
        f = be16(d + q);
        q += 2;
    }
    Py_ssize_t cs = -1, cl = 0, ms = -1, ml = 0, ts = -1, tl = 0, s, l;
    for (int bit = 15; bit >= 2; bit--) {
        if (!(flags & (1u << bit)))
            continue;
        if (bit == 13) { /* headers: a table */
            q = table_find(d, q, end, "traceparent", 11, &ts, &tl);
            if (q < 0)
                return DECLINE;
        } else if (bit == 12 || bit == 11) { /* delivery-mode, priority */
            q += 1;
        } else if (bit == 6) { /* timestamp */
            q += 8;
        } else {
            q = shortstr(d, q, end, &s, &l);
            if (q < 0)
                return DECLINE;
            if (bit == 10) {
                cs = s;
                cl = l;
            } else if (bit == 7) {
                ms = s;
                ml = l;
            }
        }
        if (q > end)
            return DECLINE;
    }
    PyObject *corr = str_or_none(d, cs, cl);
    PyObject *mid = corr ? str_or_none(d, ms, ml) : NULL;
    PyObject *tp = mid ? str_or_none(d, ts, tl) : NULL;
    if (tp == NULL) {
        Py_XDECREF(corr);
        Py_XDECREF(mid);
        return NULL;
    }
    return tup(6, INT(T_HEADER), INT(channel), U64(body), corr, mid, tp);
}

/* A method frame whose payload is [p, end) (end: the frame-end octet) spanning
 * d[off:end + 1], as v091.py's readers read it. */
static PyObject *method(const unsigned char *d, Py_ssize_t off, Py_ssize_t p, Py_ssize_t end, uint32_t channel) {
    if (end - p < 4)
        return DECLINE;
    uint32_t cls = be16(d + p), meth = be16(d + p + 2);
    Py_ssize_t q = p + 4, s1, l1, s2, l2, s3, l3;
    if (cls == 60 && meth == 40) { /* publish: reserved u16, exchange, routing-key */
        q = shortstr(d, q + 2, end, &s1, &l1);
        if (q < 0 || shortstr(d, q, end, &s2, &l2) < 0)
            return DECLINE;
        return tup(4, INT(K_PUBLISH), INT(channel), str_at(d, s1, l1), str_at(d, s2, l2));
    }
    if (cls == 60 && meth == 60) { /* deliver: consumer-tag, delivery-tag, redelivered, exchange, rk */
        q = shortstr(d, q, end, &s1, &l1);
        if (q < 0 || q + 9 >= end)
            return DECLINE;
        uint64_t dtag = be64(d + q);
        int redelivered = d[q + 8] & 1;
        q = shortstr(d, q + 9, end, &s2, &l2);
        if (q < 0 || shortstr(d, q, end, &s3, &l3) < 0)
            return DECLINE;
        return tup(7, INT(K_DELIVER), INT(channel), str_at(d, s1, l1), U64(dtag), INT(redelivered),
                   str_at(d, s2, l2), str_at(d, s3, l3));
    }
    if (cls == 60 && (meth == 80 || meth == 90 || meth == 120)) { /* ack, reject, nack: tag, bits */
        if (q + 9 > end)
            return DECLINE;
        return tup(5, INT(6), INT(channel), INT(meth), U64(be64(d + q)), INT(d[q + 8]));
    }
    if (cls == 10 && meth == 11) { /* start-ok: client-properties' connection_name */
        if (table_find(d, q, end, "connection_name", 15, &s1, &l1) < 0)
            return DECLINE;
        return tup(3, INT(7), INT(channel), str_or_none(d, s1, l1));
    }
    return tup(5, INT(T_METHOD), INT(channel), PyLong_FromSsize_t(off), PyLong_FromSsize_t(end),
               tup(2, INT(cls), INT(meth)));
}

/* A message record: the method record ``m`` (kind K_PUBLISH or K_DELIVER, made K_MESSAGE +
 * that), then the content header record ``h``'s fields after its channel, then ``total``, the
 * bytes of the body frames taken with it. Consumes ``m`` and ``h``. */
static PyObject *message(PyObject *m, PyObject *h, unsigned long long total) {
    Py_ssize_t nm = PyTuple_GET_SIZE(m), nh = PyTuple_GET_SIZE(h);
    PyObject *out = PyTuple_New(nm + nh - 2 + 1);
    PyObject *kind = out ? PyLong_FromLong(K_MESSAGE + PyLong_AsLong(PyTuple_GET_ITEM(m, 0))) : NULL;
    PyObject *tot = kind ? PyLong_FromUnsignedLongLong(total) : NULL;
    if (tot == NULL) {
        Py_XDECREF(out);
        Py_XDECREF(kind);
        Py_DECREF(m);
        Py_DECREF(h);
        return NULL;
    }
    PyTuple_SET_ITEM(out, 0, kind);
    for (Py_ssize_t i = 1; i < nm; i++) {
        PyObject *x = PyTuple_GET_ITEM(m, i);
        Py_INCREF(x);
        PyTuple_SET_ITEM(out, i, x);
    }
    for (Py_ssize_t i = 2; i < nh; i++) {
        PyObject *x = PyTuple_GET_ITEM(h, i);
        Py_INCREF(x);
        PyTuple_SET_ITEM(out, nm + i - 2, x);
    }
    PyTuple_SET_ITEM(out, nm + nh - 2, tot);
    Py_DECREF(m);
    Py_DECREF(h);
    return out;
}

static PyObject *walk_buffer(const unsigned char *d, Py_ssize_t n, Py_ssize_t start) {
    PyObject *recs[MAX_RECORDS];
    Py_ssize_t count = 0;
    Py_ssize_t off = start;
    long run = -1; /* the channel of the last record when it is a run of methods without a span */
    PyObject *out = NULL;
    /* The framing first (as feed_whole checks it): nothing is decoded for a segment declined. */
    while (off < n) {
        if (n - off < 7)
            Py_RETURN_FALSE;
        unsigned char ftype = d[off];
        uint32_t size = be32(d + off + 3);
        Py_ssize_t end = off + 7 + (Py_ssize_t)size;
        if (end >= n || d[end] != FRAME_END)
            Py_RETURN_FALSE;
        if (ftype == T_BODY) {
        } else if (ftype == T_METHOD || ftype == T_HEADER || ftype == T_HEARTBEAT) {
            if (size > MAX_FRAME)
                Py_RETURN_FALSE;
        } else {
            Py_RETURN_FALSE;
        }
        off = end + 1;
    }
    off = start;
    while (off < n) {
        unsigned char ftype = d[off];
        uint32_t channel = be16(d + off + 1);
        uint32_t size = be32(d + off + 3);
        Py_ssize_t end = off + 7 + (Py_ssize_t)size;
        PyObject *rec;
        if (ftype == T_HEARTBEAT) {
            off = end + 1;
            continue;
        }
        if (ftype == T_METHOD && size >= 4 && nospan(be16(d + off + 7), be16(d + off + 9))) {
            /* A method without a span: a run of them on one channel is one record (the first
             * finds or makes the channel and ends any content there; the others change nothing). */
            off = end + 1;
            if (run == (long)channel)
                continue;
            if (count >= MAX_RECORDS)
                goto decline;
            rec = tup(2, INT(K_NO_SPAN), INT(channel));
            if (rec == NULL)
                goto done;
            recs[count++] = rec;
            run = (long)channel;
            continue;
        }
        if (count >= MAX_RECORDS)
            goto decline;
        run = -1;
        if (ftype == T_BODY)
            rec = tup(3, INT(T_BODY), INT(channel), U64(size));
        else if (ftype == T_METHOD)
            rec = method(d, off, off + 7, end, channel);
        else
            rec = header(d, off + 7, end, channel);
        if (rec == NULL)
            goto done; /* a Python error (memory): raised */
        if (rec == DECLINE)
            goto decline;
        off = end + 1;
        long kind = ftype == T_METHOD ? PyLong_AsLong(PyTuple_GET_ITEM(rec, 0)) : 0;
        if ((kind == K_PUBLISH || kind == K_DELIVER) && off < n && d[off] == T_HEADER && be16(d + off + 1) == channel) {
            /* A message: its method, then its content header on the channel, then the body
             * frames on the channel that do not complete it yet and the one that does. */
            Py_ssize_t hend = off + 7 + (Py_ssize_t)be32(d + off + 3);
            PyObject *hdr = header(d, off + 7, hend, channel);
            if (hdr == NULL || hdr == DECLINE) {
                Py_DECREF(rec);
                if (hdr == NULL)
                    goto done;
                goto decline;
            }
            off = hend + 1;
            unsigned long long body = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(hdr, 2)), total = 0;
            while (total < body && off < n && d[off] == T_BODY && be16(d + off + 1) == channel) {
                uint32_t bsize = be32(d + off + 3);
                if (bsize > body - total)
                    break; /* too long a body: its own record (the Python raises there) */
                total += bsize;
                off += 8 + (Py_ssize_t)bsize;
            }
            rec = message(rec, hdr, total);
            if (rec == NULL)
                goto done;
        }
        recs[count++] = rec;
    }
    out = PyTuple_New(count);
    if (out != NULL) {
        for (Py_ssize_t i = 0; i < count; i++)
            PyTuple_SET_ITEM(out, i, recs[i]);
        return out;
    }
    goto done;
decline:
    out = Py_None;
    Py_INCREF(out);
done:
    for (Py_ssize_t i = 0; i < count; i++)
        Py_DECREF(recs[i]);
    return out;
}

static PyObject *walk(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "walk(data, start)");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_BufferError))
            return NULL;
        PyErr_Clear(); /* not contiguous: the Python path reads it */
        Py_RETURN_NONE;
    }
    PyObject *out;
    if (start < 0 || start > view.len) {
        Py_INCREF(Py_None);
        out = Py_None;
    }
    else
        out = walk_buffer((const unsigned char *)view.buf, view.len, start);
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef METHODS[] = {
    {"walk", (PyCFunction)(void (*)(void))walk, METH_FASTCALL,
     "walk(data, start) -> tuple of frame records, or None to leave the segment to Python."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_frames",
                                    "AMQP 0-9-1 frame walking for v091.py's feed_whole (see the source's header).",
                                    -1, METHODS, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__frames(void) {
    init_tables();
    return PyModule_Create(&MODULE);
}
