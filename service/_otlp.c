/* OTLP protobuf wire encoding of spans: the C twin of service/model.py's _span_bytes.
 *
 * span_fields(spans, fallback) -> bytes: for each span, ScopeSpans field 2 (tag 0x12,
 * length, Span message), byte for byte what the Python encoder writes. Field numbers
 * are opentelemetry-proto's trace.proto / common.proto. A span this file does not
 * handle (events, a non-scalar attribute value, an id of an unusual length, a value
 * out of range, a str that is not valid UTF-8) is encoded by ``fallback(span)``, the
 * Python function, so every rule and every error stays in one place; tests hold the
 * two to the same bytes.
 *
 * json_spans(spans, fallback) -> str: the same for the OTLP/JSON lines of the file exporter
 * (model.py's _json_span; see its section below).
 *
 * Why C: the exporters encode every span once, and in Python that is ~3.8 us a span,
 * a fifth of what a small HTTP exchange costs end to end.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

typedef struct {
    char *p;
    Py_ssize_t len, cap;
} Out;

static int out_reserve(Out *o, Py_ssize_t n) {
    if (o->len + n <= o->cap)
        return 0;
    Py_ssize_t cap = o->cap ? o->cap : 4096;
    while (cap < o->len + n) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    char *p = PyMem_Realloc(o->p, (size_t)cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    o->p = p;
    o->cap = cap;
    return 0;
}

static inline int varint_len(unsigned long long v) {
    int n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

/* The caller has reserved room. */
static inline void put_varint(Out *o, unsigned long long v) {
    char *p = o->p + o->len;
    while (v >= 0x80) {
        *p++ = (char)((v & 0x7F) | 0x80);
        v >>= 7;
    }
    *p++ = (char)v;
    o->len = p - o->p;
}

static inline void put_byte(Out *o, unsigned char b) { o->p[o->len++] = (char)b; }

static inline void put_raw(Out *o, const char *s, Py_ssize_t n) {
    memcpy(o->p + o->len, s, (size_t)n);
    o->len += n;
}

static inline void put_fixed64(Out *o, unsigned long long v) {
    for (int i = 0; i < 8; i++)
        o->p[o->len++] = (char)((v >> (8 * i)) & 0xFF);
}

/* Span slot names, interned once. */
static PyObject *s_trace_id, *s_span_id, *s_trace_state, *s_parent_span_id, *s_name, *s_kind, *s_start_ns,
    *s_end_ns, *s_attributes, *s_events, *s_status_code, *s_status_message, *s_flags;

/* A scalar AnyValue's body, read once and written later (an array's elements are measured before
 * any is written). */
typedef struct {
    int kind; /* 1 str, 2 bool, 3 int, 4 double */
    const char *sv;
    Py_ssize_t slen;
    unsigned long long iv;
    double dv;
    Py_ssize_t len; /* the AnyValue body's length */
} Scalar;

/* 1: ``v`` is a scalar this writes; 0: not handled here (no error set); -1: error set. */
static int scalar_of(PyObject *v, Scalar *sc) {
    if (PyUnicode_Check(v)) {
        sc->sv = PyUnicode_AsUTF8AndSize(v, &sc->slen);
        if (sc->sv == NULL) {
            PyErr_Clear(); /* surrogates: Python's surrogatepass handles them */
            return 0;
        }
        sc->kind = 1;
        sc->len = 1 + varint_len((unsigned long long)sc->slen) + sc->slen;
    } else if (PyBool_Check(v)) {
        sc->kind = 2;
        sc->iv = (v == Py_True);
        sc->len = 2;
    } else if (PyLong_Check(v)) {
        int overflow = 0;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow)
            return 0; /* beyond int64: Python writes it as a string */
        if (x == -1 && PyErr_Occurred())
            return -1;
        sc->kind = 3;
        sc->iv = (unsigned long long)x;
        sc->len = 1 + varint_len(sc->iv);
    } else if (PyFloat_CheckExact(v)) {
        sc->kind = 4;
        sc->dv = PyFloat_AS_DOUBLE(v);
        sc->len = 9;
    } else {
        return 0;
    }
    return 1;
}

static void put_scalar(Out *o, const Scalar *sc) {
    switch (sc->kind) {
    case 1:
        put_byte(o, 0x0a);
        put_varint(o, (unsigned long long)sc->slen);
        put_raw(o, sc->sv, sc->slen);
        break;
    case 2:
        put_byte(o, 0x10);
        put_byte(o, (unsigned char)sc->iv);
        break;
    case 3:
        put_byte(o, 0x18);
        put_varint(o, sc->iv);
        break;
    default: {
        unsigned long long bits;
        memcpy(&bits, &sc->dv, 8);
        put_byte(o, 0x21);
        put_fixed64(o, bits); /* little-endian, as struct "<d" */
    }
    }
}

/* An array of at most this many scalars is written here (more: Python's, a rare case). */
#define MAX_ARRAY 64

/* 1: encoded; 0: not handled here (use the fallback; no error set); -1: error set. */
static int encode_value(Out *o, PyObject *key, PyObject *v) {
    Py_ssize_t klen;
    if (!PyUnicode_Check(key))
        return 0;
    const char *k = PyUnicode_AsUTF8AndSize(key, &klen);
    if (k == NULL) {
        PyErr_Clear(); /* surrogates: Python's surrogatepass handles them */
        return 0;
    }
    Scalar one, items[MAX_ARRAY];
    Py_ssize_t count = -1, arr_len = 0, any_len; /* count >= 0: an array (AnyValue field 5) */
    int r = scalar_of(v, &one);
    if (r < 0)
        return -1;
    if (r == 0) {
        /* A list of scalars (MQTT's topic filters): an ArrayValue of AnyValues (field 1 each). */
        if (!(PyList_CheckExact(v) || PyTuple_CheckExact(v)) || PySequence_Fast_GET_SIZE(v) > MAX_ARRAY)
            return 0;
        count = PySequence_Fast_GET_SIZE(v);
        for (Py_ssize_t i = 0; i < count; i++) {
            r = scalar_of(PySequence_Fast_GET_ITEM(v, i), &items[i]);
            if (r <= 0)
                return r;
            arr_len += 1 + varint_len((unsigned long long)items[i].len) + items[i].len;
        }
        any_len = 1 + varint_len((unsigned long long)arr_len) + arr_len;
    } else {
        any_len = one.len;
    }
    Py_ssize_t kv_len = 1 + varint_len((unsigned long long)klen) + klen + 1 + varint_len((unsigned long long)any_len)
                        + any_len;
    if (out_reserve(o, 1 + 10 + kv_len) < 0)
        return -1;
    put_byte(o, 0x4a);
    put_varint(o, (unsigned long long)kv_len);
    put_byte(o, 0x0a);
    put_varint(o, (unsigned long long)klen);
    put_raw(o, k, klen);
    put_byte(o, 0x12);
    put_varint(o, (unsigned long long)any_len);
    if (count < 0) {
        put_scalar(o, &one);
        return 1;
    }
    put_byte(o, 0x2a);
    put_varint(o, (unsigned long long)arr_len);
    for (Py_ssize_t i = 0; i < count; i++) {
        put_byte(o, 0x0a);
        put_varint(o, (unsigned long long)items[i].len);
        put_scalar(o, &items[i]);
    }
    return 1;
}

/* A bytes attribute of exactly n bytes (n > 0), or NULL. New reference. */
static PyObject *get_bytes(PyObject *span, PyObject *name, Py_ssize_t n, int allow_empty) {
    PyObject *b = PyObject_GetAttr(span, name);
    if (b == NULL)
        return NULL;
    if (!PyBytes_CheckExact(b) || !(PyBytes_GET_SIZE(b) == n || (allow_empty && PyBytes_GET_SIZE(b) == 0))) {
        Py_DECREF(b);
        return Py_None; /* sentinel: not handled (borrowed, never decref'd by the caller) */
    }
    return b;
}

/* Encode one span's Span message body at o->len. 1 done, 0 not handled (o->len restored), -1 error. */
static int encode_span(Out *o, PyObject *span) {
    Py_ssize_t start = o->len;
    int ret = -1;
    PyObject *tid = NULL, *sid = NULL, *psid = NULL, *ts = NULL, *name = NULL, *kind = NULL, *st = NULL, *en = NULL,
             *attrs = NULL, *events = NULL, *code = NULL, *msg = NULL, *flags = NULL;
#define NOT_HANDLED                                                                                                    \
    do {                                                                                                               \
        ret = 0;                                                                                                       \
        goto done;                                                                                                     \
    } while (0)
#define GET(var, nm)                                                                                                   \
    do {                                                                                                               \
        var = PyObject_GetAttr(span, nm);                                                                              \
        if (var == NULL)                                                                                               \
            goto done;                                                                                                 \
    } while (0)

#define GET_BYTES(var, nm, n, allow_empty)                                                                             \
    do {                                                                                                               \
        var = get_bytes(span, nm, n, allow_empty);                                                                     \
        if (var == NULL)                                                                                               \
            goto done;                                                                                                 \
        if (var == Py_None) { /* borrowed sentinel: not handled here */                                               \
            var = NULL;                                                                                                \
            NOT_HANDLED;                                                                                               \
        }                                                                                                              \
    } while (0)

    GET_BYTES(tid, s_trace_id, 16, 0);
    GET_BYTES(sid, s_span_id, 8, 0);
    GET_BYTES(psid, s_parent_span_id, 8, 1);
    GET(events, s_events);
    if (events != Py_None) { /* events: Python's path */
        int has = PyObject_IsTrue(events);
        if (has < 0)
            goto done;
        if (has)
            NOT_HANDLED;
    }
    GET(ts, s_trace_state);
    GET(name, s_name);
    GET(kind, s_kind);
    GET(st, s_start_ns);
    GET(en, s_end_ns);
    GET(attrs, s_attributes);
    GET(code, s_status_code);
    GET(msg, s_status_message);
    GET(flags, s_flags);
    if (!PyUnicode_Check(ts) || !PyUnicode_Check(name) || !PyUnicode_Check(msg) || !PyLong_Check(kind)
        || !PyLong_Check(st) || !PyLong_Check(en) || !PyLong_Check(code) || !PyLong_Check(flags)
        || !PyDict_Check(attrs))
        NOT_HANDLED;
    Py_ssize_t ts_len, name_len, msg_len;
    const char *tsu = PyUnicode_AsUTF8AndSize(ts, &ts_len);
    const char *nameu = tsu ? PyUnicode_AsUTF8AndSize(name, &name_len) : NULL;
    const char *msgu = nameu ? PyUnicode_AsUTF8AndSize(msg, &msg_len) : NULL;
    if (msgu == NULL) {
        PyErr_Clear();
        NOT_HANDLED;
    }
    unsigned long long start_ns = PyLong_AsUnsignedLongLong(st);
    if (PyErr_Occurred()) { /* negative or too large: Python raises struct.error */
        PyErr_Clear();
        NOT_HANDLED;
    }
    unsigned long long end_ns = PyLong_AsUnsignedLongLong(en);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        NOT_HANDLED;
    }
    /* kind and status code are one-byte varints here; anything else takes Python's path */
    int ovf1 = 0, ovf2 = 0, ovf3 = 0;
    long long kindv = PyLong_AsLongLongAndOverflow(kind, &ovf1);
    long long codev = PyLong_AsLongLongAndOverflow(code, &ovf2);
    long long flagsv = PyLong_AsLongLongAndOverflow(flags, &ovf3);
    if (PyErr_Occurred())
        goto done;
    if (ovf1 || ovf2 || ovf3 || kindv < 0 || kindv > 127 || codev < 0 || codev > 127)
        NOT_HANDLED;
    flagsv &= 0xFF;
    if (out_reserve(o, 2 + 16 + 2 + 8 + 1 + 10 + ts_len + 2 + 8 + 1 + 10 + name_len + 2 + 9 + 9) < 0)
        goto done;
    put_byte(o, 0x0a);
    put_byte(o, 0x10);
    put_raw(o, PyBytes_AS_STRING(tid), 16);
    put_byte(o, 0x12);
    put_byte(o, 0x08);
    put_raw(o, PyBytes_AS_STRING(sid), 8);
    if (ts_len) {
        put_byte(o, 0x1a);
        put_varint(o, (unsigned long long)ts_len);
        put_raw(o, tsu, ts_len);
    }
    if (PyBytes_GET_SIZE(psid)) {
        put_byte(o, 0x22);
        put_byte(o, 0x08);
        put_raw(o, PyBytes_AS_STRING(psid), 8);
    }
    put_byte(o, 0x2a);
    put_varint(o, (unsigned long long)name_len);
    put_raw(o, nameu, name_len);
    put_byte(o, 0x30);
    put_byte(o, (unsigned char)kindv);
    put_byte(o, 0x39);
    put_fixed64(o, start_ns);
    put_byte(o, 0x41);
    put_fixed64(o, end_ns);

    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(attrs, &pos, &key, &value)) {
        int r = encode_value(o, key, value);
        if (r < 0)
            goto done;
        if (r == 0)
            NOT_HANDLED;
    }
    if (out_reserve(o, 2 + 10 + msg_len + 2 + 6) < 0)
        goto done;
    if (codev || msg_len) {
        Py_ssize_t body = (msg_len ? 1 + varint_len((unsigned long long)msg_len) + msg_len : 0) + (codev ? 2 : 0);
        put_byte(o, 0x7a);
        put_varint(o, (unsigned long long)body);
        if (msg_len) {
            put_byte(o, 0x12);
            put_varint(o, (unsigned long long)msg_len);
            put_raw(o, msgu, msg_len);
        }
        if (codev) {
            put_byte(o, 0x18);
            put_byte(o, (unsigned char)codev);
        }
    } else {
        put_byte(o, 0x7a);
        put_byte(o, 0x00);
    }
    put_byte(o, 0x85);
    put_byte(o, 0x01);
    for (int i = 0; i < 4; i++)
        put_byte(o, (unsigned char)((flagsv >> (8 * i)) & 0xFF));
    ret = 1;
done:
    if (ret != 1)
        o->len = start;
    Py_XDECREF(tid);
    Py_XDECREF(sid);
    Py_XDECREF(psid);
    Py_XDECREF(ts);
    Py_XDECREF(name);
    Py_XDECREF(kind);
    Py_XDECREF(st);
    Py_XDECREF(en);
    Py_XDECREF(attrs);
    Py_XDECREF(events);
    Py_XDECREF(code);
    Py_XDECREF(msg);
    Py_XDECREF(flags);
    return ret;
#undef NOT_HANDLED
#undef GET
#undef GET_BYTES
}

/* Room for the length varint of a span body written after it: 3 bytes covers 2 MiB. */
#define LEN_ROOM 3

static PyObject *span_fields(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if ((nargs != 2 && nargs != 4) || (nargs == 4 && (!PyBytes_Check(args[2]) || !PyBytes_Check(args[3])))) {
        PyErr_SetString(PyExc_TypeError, "span_fields(spans, fallback[, resource: bytes, scope: bytes])");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[0], "spans must be a sequence");
    if (seq == NULL)
        return NULL;
    PyObject *fallback = args[1];
    Out o = {NULL, 0, 0};
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    /* With a resource and a scope field: the whole ResourceSpans field (1, around field 2
     * ScopeSpans: the scope, then the spans), its head written last into room kept before the
     * spans. Built in Python, the batch's bytes (megabytes) were copied five more times. */
    Py_ssize_t rn = nargs == 4 ? PyBytes_GET_SIZE(args[2]) : 0, sn = nargs == 4 ? PyBytes_GET_SIZE(args[3]) : 0;
    Py_ssize_t room = nargs == 4 ? 1 + 10 + rn + 1 + 10 + sn : 0;
    if (room) {
        if (out_reserve(&o, room) < 0)
            goto fail;
        o.len = room;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (out_reserve(&o, 1 + LEN_ROOM) < 0)
            goto fail;
        put_byte(&o, 0x12);
        Py_ssize_t at = o.len;
        o.len += LEN_ROOM;
        int r = encode_span(&o, items[i]);
        if (r < 0)
            goto fail;
        if (r == 0) {
            PyObject *b = PyObject_CallOneArg(fallback, items[i]);
            if (b == NULL)
                goto fail;
            if (!PyBytes_Check(b)) {
                Py_DECREF(b);
                PyErr_SetString(PyExc_TypeError, "fallback must return bytes");
                goto fail;
            }
            if (out_reserve(&o, PyBytes_GET_SIZE(b)) < 0) {
                Py_DECREF(b);
                goto fail;
            }
            put_raw(&o, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b));
            Py_DECREF(b);
        }
        Py_ssize_t body = o.len - at - LEN_ROOM;
        int vl = varint_len((unsigned long long)body);
        if (vl > LEN_ROOM) {
            if (out_reserve(&o, vl - LEN_ROOM) < 0)
                goto fail;
            memmove(o.p + at + vl, o.p + at + LEN_ROOM, (size_t)body);
        } else if (vl < LEN_ROOM) {
            memmove(o.p + at + vl, o.p + at + LEN_ROOM, (size_t)body);
        }
        Py_ssize_t end = at + vl + body;
        o.len = at;
        put_varint(&o, (unsigned long long)body);
        o.len = end;
    }
    Py_DECREF(seq);
    Py_ssize_t start = 0;
    if (room) {
        Py_ssize_t fields = o.len - room;
        unsigned long long ss = (unsigned long long)(sn + fields);
        unsigned long long rs = (unsigned long long)(rn + 1 + varint_len(ss)) + ss;
        start = room - (1 + varint_len(rs) + rn + 1 + varint_len(ss) + sn);
        Py_ssize_t end = o.len;
        o.len = start;
        put_byte(&o, 0x0a);
        put_varint(&o, rs);
        put_raw(&o, PyBytes_AS_STRING(args[2]), rn);
        put_byte(&o, 0x12);
        put_varint(&o, ss);
        put_raw(&o, PyBytes_AS_STRING(args[3]), sn);
        o.len = end;
    }
    PyObject *res = PyBytes_FromStringAndSize(o.p ? o.p + start : "", o.len - start);
    PyMem_Free(o.p);
    return res;
fail:
    Py_DECREF(seq);
    PyMem_Free(o.p);
    return NULL;
}

/* ------------------------------------------------------------------------------------------
 * OTLP/JSON: the C twin of service/model.py's _json_span.
 *
 * json_spans(spans, fallback[, prefix, suffix]) -> str | None: prefix + ",".join(_json_span(s) for s in
 * spans) + suffix, the same
 * text. A span this code does not write itself (events, a trace state, a status message that is
 * not a str, an attribute value other than str/bool/int64/finite float, an id of an unusual
 * length, a str that is not valid UTF-8, ...) is written by ``fallback(span)``, the Python
 * function; None when a fallback's text cannot be UTF-8 (a lone surrogate), and the caller then
 * does it all in Python. Strings are escaped as json.encoder.encode_basestring does
 * (ensure_ascii off): '"', '\\', \b \f \n \r \t by name, other control bytes as \u00xx.
 */
static const char HEXL[] = "0123456789abcdef";

static int j_raw(Out *o, const char *s, Py_ssize_t n) {
    if (out_reserve(o, n) < 0)
        return -1;
    put_raw(o, s, n);
    return 0;
}

#define J_LIT(o, s) j_raw(o, s, (Py_ssize_t)(sizeof(s) - 1))

static int j_str(Out *o, const char *s, Py_ssize_t n) {
    if (out_reserve(o, 2 + 6 * n) < 0)
        return -1;
    char *p = o->p + o->len;
    *p++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            *p++ = (char)c;
            continue;
        }
        *p++ = '\\';
        switch (c) {
        case '"':
            *p++ = '"';
            break;
        case '\\':
            *p++ = '\\';
            break;
        case '\b':
            *p++ = 'b';
            break;
        case '\f':
            *p++ = 'f';
            break;
        case '\n':
            *p++ = 'n';
            break;
        case '\r':
            *p++ = 'r';
            break;
        case '\t':
            *p++ = 't';
            break;
        default:
            *p++ = 'u';
            *p++ = '0';
            *p++ = '0';
            *p++ = HEXL[c >> 4];
            *p++ = HEXL[c & 15];
        }
    }
    *p++ = '"';
    o->len = p - o->p;
    return 0;
}

/* A str as a JSON string: 1 written, 0 not valid UTF-8 (no error set), -1 error. */
static int j_pystr(Out *o, PyObject *s) {
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(s, &n);
    if (u == NULL) {
        PyErr_Clear();
        return 0;
    }
    return j_str(o, u, n) < 0 ? -1 : 1;
}

static int j_hex(Out *o, PyObject *b) {
    Py_ssize_t n = PyBytes_GET_SIZE(b);
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(b);
    if (out_reserve(o, 2 * n) < 0)
        return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        o->p[o->len++] = HEXL[s[i] >> 4];
        o->p[o->len++] = HEXL[s[i] & 15];
    }
    return 0;
}

static int j_ll(Out *o, long long v) {
    char tmp[24];
    char *e = tmp + sizeof tmp, *p = e;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        *--p = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        *--p = '-';
    return j_raw(o, p, e - p);
}

/* One value's object ({"stringValue":...}), or an array's of such (not nested: Python's):
 * 1 written, 0 not handled (nothing written that counts), -1 error. */
static int j_value(Out *o, PyObject *v, int in_array) {
    if (PyUnicode_CheckExact(v)) {
        if (J_LIT(o, "{\"stringValue\":") < 0)
            return -1;
        int r = j_pystr(o, v);
        if (r <= 0)
            return r;
    } else if (PyBool_Check(v)) {
        if (v == Py_True ? J_LIT(o, "{\"boolValue\":true") : J_LIT(o, "{\"boolValue\":false"))
            return -1;
    } else if (PyLong_CheckExact(v)) {
        int ovf = 0;
        long long x = PyLong_AsLongLongAndOverflow(v, &ovf);
        if (ovf)
            return 0; /* beyond int64: a stringValue, Python's to write */
        if (x == -1 && PyErr_Occurred())
            return -1;
        if (J_LIT(o, "{\"intValue\":\"") < 0 || j_ll(o, x) < 0 || J_LIT(o, "\"") < 0)
            return -1;
    } else if (PyFloat_CheckExact(v)) {
        double d = PyFloat_AS_DOUBLE(v);
        if (!isfinite(d))
            return 0; /* NaN, Infinity: Python's to write */
        PyObject *rep = PyFloat_Type.tp_repr(v);
        if (rep == NULL)
            return -1;
        Py_ssize_t n;
        const char *u = PyUnicode_AsUTF8AndSize(rep, &n);
        int bad = u == NULL || J_LIT(o, "{\"doubleValue\":") < 0 || j_raw(o, u, n) < 0;
        Py_DECREF(rep);
        if (bad)
            return -1;
    } else if (!in_array && (PyList_CheckExact(v) || PyTuple_CheckExact(v))) {
        /* A list of scalars (MQTT's topic filters: one span in eight of a real MQTT session's,
         * each of them Python's to write before). */
        if (J_LIT(o, "{\"arrayValue\":{\"values\":[") < 0)
            return -1;
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(v); i++) {
            if (i && J_LIT(o, ",") < 0)
                return -1;
            int r = j_value(o, PySequence_Fast_GET_ITEM(v, i), 1);
            if (r <= 0)
                return r;
        }
        if (J_LIT(o, "]}") < 0)
            return -1;
    } else {
        return 0;
    }
    return J_LIT(o, "}") < 0 ? -1 : 1;
}

/* One attribute: 1 written, 0 not handled (nothing written that counts), -1 error. */
static int j_attr(Out *o, PyObject *k, PyObject *v) {
    if (!PyUnicode_CheckExact(k))
        return 0;
    if (J_LIT(o, "{\"key\":") < 0)
        return -1;
    int r = j_pystr(o, k);
    if (r <= 0)
        return r;
    if (J_LIT(o, ",\"value\":") < 0)
        return -1;
    r = j_value(o, v, 0);
    if (r <= 0)
        return r;
    return J_LIT(o, "}") < 0 ? -1 : 1;
}

/* One span; 1 written, 0 not handled (o->len restored), -1 error. */
static int j_span(Out *o, PyObject *span) {
    Py_ssize_t start = o->len;
    int ret = -1;
    PyObject *tid = NULL, *sid = NULL, *psid = NULL, *ts = NULL, *name = NULL, *kind = NULL, *st = NULL, *en = NULL,
             *attrs = NULL, *events = NULL, *code = NULL, *msg = NULL, *flags = NULL;
#define NOT_HANDLED                                                                                                    \
    do {                                                                                                               \
        ret = 0;                                                                                                       \
        goto done;                                                                                                     \
    } while (0)
#define GET(var, nm)                                                                                                   \
    do {                                                                                                               \
        var = PyObject_GetAttr(span, nm);                                                                              \
        if (var == NULL)                                                                                               \
            goto done;                                                                                                 \
    } while (0)
#define W(call)                                                                                                        \
    do {                                                                                                               \
        if ((call) < 0)                                                                                                \
            goto done;                                                                                                 \
    } while (0)
    GET(tid, s_trace_id);
    GET(sid, s_span_id);
    GET(psid, s_parent_span_id);
    GET(events, s_events);
    GET(ts, s_trace_state);
    GET(name, s_name);
    GET(kind, s_kind);
    GET(st, s_start_ns);
    GET(en, s_end_ns);
    GET(attrs, s_attributes);
    GET(code, s_status_code);
    GET(msg, s_status_message);
    GET(flags, s_flags);
    if (!PyBytes_CheckExact(tid) || PyBytes_GET_SIZE(tid) != 16 || !PyBytes_CheckExact(sid)
        || PyBytes_GET_SIZE(sid) != 8 || !PyBytes_CheckExact(psid)
        || (PyBytes_GET_SIZE(psid) != 0 && PyBytes_GET_SIZE(psid) != 8))
        NOT_HANDLED;
    if (events != Py_None && !(PyList_CheckExact(events) && PyList_GET_SIZE(events) == 0))
        NOT_HANDLED;
    if (ts != Py_None && !(PyUnicode_CheckExact(ts) && PyUnicode_GET_LENGTH(ts) == 0))
        NOT_HANDLED;
    if (!PyUnicode_CheckExact(name) || !PyUnicode_CheckExact(msg) || !PyDict_CheckExact(attrs)
        || !PyLong_CheckExact(st) || !PyLong_CheckExact(en) || !PyLong_Check(kind) || !PyLong_Check(code)
        || !PyLong_Check(flags))
        NOT_HANDLED;
    int o1 = 0, o2 = 0, o3 = 0, o4 = 0, o5 = 0;
    long long kindv = PyLong_AsLongLongAndOverflow(kind, &o1);
    long long stv = PyLong_AsLongLongAndOverflow(st, &o2);
    long long env = PyLong_AsLongLongAndOverflow(en, &o3);
    long long codev = PyLong_AsLongLongAndOverflow(code, &o4);
    long long flagsv = PyLong_AsLongLongAndOverflow(flags, &o5);
    if (PyErr_Occurred())
        goto done;
    if (o1 || o2 || o3 || o4 || o5)
        NOT_HANDLED;
    W(J_LIT(o, "{\"traceId\":\""));
    W(j_hex(o, tid));
    W(J_LIT(o, "\",\"spanId\":\""));
    W(j_hex(o, sid));
    W(J_LIT(o, "\",\"name\":"));
    int r = j_pystr(o, name);
    if (r < 0)
        goto done;
    if (r == 0)
        NOT_HANDLED;
    W(J_LIT(o, ",\"kind\":"));
    W(j_ll(o, kindv));
    W(J_LIT(o, ",\"startTimeUnixNano\":\""));
    W(j_ll(o, stv));
    W(J_LIT(o, "\",\"endTimeUnixNano\":\""));
    W(j_ll(o, env));
    W(J_LIT(o, "\",\"attributes\":["));
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    int first = 1;
    while (PyDict_Next(attrs, &pos, &key, &value)) {
        if (!first)
            W(J_LIT(o, ","));
        first = 0;
        r = j_attr(o, key, value);
        if (r < 0)
            goto done;
        if (r == 0)
            NOT_HANDLED;
    }
    W(J_LIT(o, "],\"status\":{\"code\":"));
    W(j_ll(o, codev));
    if (PyUnicode_GET_LENGTH(msg)) {
        W(J_LIT(o, ",\"message\":"));
        r = j_pystr(o, msg);
        if (r < 0)
            goto done;
        if (r == 0)
            NOT_HANDLED;
    }
    W(J_LIT(o, "},\"flags\":"));
    W(j_ll(o, flagsv & 0xFF));
    if (PyBytes_GET_SIZE(psid)) {
        W(J_LIT(o, ",\"parentSpanId\":\""));
        W(j_hex(o, psid));
        W(J_LIT(o, "\""));
    }
    W(J_LIT(o, "}"));
    ret = 1;
done:
    if (ret != 1)
        o->len = start;
    Py_XDECREF(tid);
    Py_XDECREF(sid);
    Py_XDECREF(psid);
    Py_XDECREF(ts);
    Py_XDECREF(name);
    Py_XDECREF(kind);
    Py_XDECREF(st);
    Py_XDECREF(en);
    Py_XDECREF(attrs);
    Py_XDECREF(events);
    Py_XDECREF(code);
    Py_XDECREF(msg);
    Py_XDECREF(flags);
    return ret;
#undef NOT_HANDLED
#undef GET
#undef W
}

static PyObject *json_spans(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if ((nargs != 2 && nargs != 4) || (nargs == 4 && (!PyUnicode_Check(args[2]) || !PyUnicode_Check(args[3])))) {
        PyErr_SetString(PyExc_TypeError, "json_spans(spans, fallback[, prefix: str, suffix: str])");
        return NULL;
    }
    const char *pre = "", *suf = "";
    Py_ssize_t pre_n = 0, suf_n = 0;
    if (nargs == 4 && ((pre = PyUnicode_AsUTF8AndSize(args[2], &pre_n)) == NULL ||
                       (suf = PyUnicode_AsUTF8AndSize(args[3], &suf_n)) == NULL))
        return NULL;
    PyObject *seq = PySequence_Fast(args[0], "json_spans: spans must be a sequence");
    if (seq == NULL)
        return NULL;
    PyObject *fallback = args[1];
    Out o = {NULL, 0, 0};
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    /* The line's head and tail in the same buffer: joined after, a batch's text (megabytes)
     * was copied three more times (issue 21). */
    if (pre_n && j_raw(&o, pre, pre_n) < 0)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i && j_raw(&o, ",", 1) < 0)
            goto fail;
        PyObject *span = PySequence_Fast_GET_ITEM(seq, i);
        int r = j_span(&o, span);
        if (r < 0)
            goto fail;
        if (r == 0) {
            PyObject *text = PyObject_CallOneArg(fallback, span);
            if (text == NULL)
                goto fail;
            if (!PyUnicode_Check(text)) {
                Py_DECREF(text);
                PyErr_SetString(PyExc_TypeError, "json_spans: the fallback must return str");
                goto fail;
            }
            Py_ssize_t tn;
            const char *u = PyUnicode_AsUTF8AndSize(text, &tn);
            if (u == NULL) { /* not UTF-8: the caller writes the whole group in Python */
                PyErr_Clear();
                Py_DECREF(text);
                Py_DECREF(seq);
                PyMem_Free(o.p);
                Py_RETURN_NONE;
            }
            int bad = j_raw(&o, u, tn) < 0;
            Py_DECREF(text);
            if (bad)
                goto fail;
        }
    }
    if (suf_n && j_raw(&o, suf, suf_n) < 0)
        goto fail;
    Py_DECREF(seq);
    PyObject *res = PyUnicode_DecodeUTF8(o.p ? o.p : "", o.len, NULL);
    PyMem_Free(o.p);
    return res;
fail:
    Py_DECREF(seq);
    PyMem_Free(o.p);
    return NULL;
}

static PyMethodDef methods[] = {
    {"span_fields", (PyCFunction)(void (*)(void))span_fields, METH_FASTCALL,
     "span_fields(spans, fallback) -> bytes: ScopeSpans field 2 for each span, in order."},
    {"json_spans", (PyCFunction)(void (*)(void))json_spans, METH_FASTCALL,
     "json_spans(spans, fallback[, prefix, suffix]) -> str | None: the spans' OTLP/JSON objects, "
     "comma-separated, between prefix and suffix."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_otlp", "OTLP span wire encoding (C).", -1, methods,
                                     NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__otlp(void) {
#define INTERN(var, s)                                                                                                 \
    if ((var = PyUnicode_InternFromString(s)) == NULL)                                                                 \
        return NULL;
    INTERN(s_trace_id, "trace_id");
    INTERN(s_span_id, "span_id");
    INTERN(s_trace_state, "trace_state");
    INTERN(s_parent_span_id, "parent_span_id");
    INTERN(s_name, "name");
    INTERN(s_kind, "kind");
    INTERN(s_start_ns, "start_ns");
    INTERN(s_end_ns, "end_ns");
    INTERN(s_attributes, "attributes");
    INTERN(s_events, "events");
    INTERN(s_status_code, "status_code");
    INTERN(s_status_message, "status_message");
    INTERN(s_flags, "flags");
#undef INTERN
    return PyModule_Create(&module);
}
