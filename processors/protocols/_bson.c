/* processors.protocols._bson: the whole-OP_MSG read of mongodb.py's Session.feed_whole in C.
 *
 * Contract (mongodb.py's ``_op_msg`` stays the reference and the fallback):
 *   op_msg(data, ms, length, reply) -> (flags, fields) | None
 * ``data`` is any simple buffer (bytes, a byte memoryview) holding a whole OP_MSG of
 * ``length`` bytes at ``ms`` (its 16-byte header included). The result is ``_op_msg``'s:
 * the message's flags and the top-level fields of its body section's document, as
 * ``_fields_in_view`` gives them: ``""`` -> (first key, its value), then the wanted names
 * (a reply's ``ok``, ``errmsg``, ``code``, ``codeName``, ``$err``; a command's ``$db``,
 * ``collection``), each its first occurrence. A value is read for the scalar types a span
 * uses (string, at most 512 bytes of it; double; int32; int64; bool), None for any other.
 * None means "not taken here": anything ``_op_msg`` would raise on (unknown flags, a bad
 * section kind or size, a value overrunning its document, an unknown BSON type...) and
 * anything outside the buffer. The Python walk then decides, so this file never reproduces
 * an error, and any non-None result equals ``_op_msg``'s.
 *
 * Memory: every read is bounded by the message (itself checked to lie inside the buffer)
 * and by the document's end (its terminator checked first, so a key's NUL is always found
 * before it); a declared length only moves the cursor, compared against the end before any
 * read through it. Allocations: the result tuple, one dict, the first key and the values
 * kept. No mutable global state (the wanted names are made once, at import).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* mongodb.py's constants: kept equal by tests/test_mongodb_speedup.py. */
#define FLAG_CHECKSUM (1u << 0)
#define KNOWN_FLAGS ((1u << 0) | (1u << 1) | (1u << 16))
#define MAX_DOCUMENT (16 * 1024 * 1024)
#define MAX_STRING 512

/* Wanted names: a reply's, then a command's. */
static const char *const REPLY_NAMES[] = {"ok", "errmsg", "code", "codeName", "$err"};
static const char *const CMD_NAMES[] = {"$db", "collection"};
#define N_REPLY 5
#define N_CMD 2
static PyObject *reply_keys[N_REPLY];
static PyObject *cmd_keys[N_CMD];
static PyObject *empty_key;

static int32_t le32(const unsigned char *p) {
    return (int32_t)((uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24));
}

static int64_t le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return (int64_t)v;
}

/* mongodb.py _FIXED: >= 0 a fixed size; -1 int32-prefixed string-like, -2 int32 total size,
 * -3 binary, -4 regex (two cstrings), -5 DBPointer; NOT_A_TYPE otherwise. */
#define NOT_A_TYPE (-100)
static int value_kind(unsigned t) {
    switch (t) {
    case 0x01: case 0x09: case 0x11: case 0x12: return 8;
    case 0x06: case 0x0A: case 0xFF: case 0x7F: return 0;
    case 0x07: return 12;
    case 0x08: return 1;
    case 0x10: return 4;
    case 0x13: return 16;
    case 0x02: case 0x0D: case 0x0E: return -1;
    case 0x03: case 0x04: case 0x0F: return -2;
    case 0x05: return -3;
    case 0x0B: return -4;
    case 0x0C: return -5;
    default: return NOT_A_TYPE;
    }
}

/* The value ``_fields_in_view`` reads for type ``t`` at ``v`` (its bytes checked to lie inside
 * the document): a new reference, or NULL with an exception set. */
static PyObject *scalar(unsigned t, const unsigned char *v) {
    switch (t) {
    case 0x02: {
        int64_t n = (int64_t)le32(v) - 1; /* its bytes less the NUL, 512 at most read */
        Py_ssize_t k = n < 0 ? 0 : n > MAX_STRING ? MAX_STRING : (Py_ssize_t)n;
        return PyUnicode_DecodeUTF8((const char *)v + 4, k, "replace");
    }
    case 0x01:
        {
            double d = PyFloat_Unpack8((const char *)v, 1);
            if (d == -1.0 && PyErr_Occurred())
                return NULL;
            return PyFloat_FromDouble(d);
        }
    case 0x10: return PyLong_FromLong(le32(v));
    case 0x12: return PyLong_FromLongLong(le64(v));
    case 0x08: return PyBool_FromLong(v[0] != 0);
    default: Py_RETURN_NONE;
    }
}

/* Index of the wanted name the key ``k[0:n]`` is, or -1. */
static int wanted_index(const unsigned char *k, Py_ssize_t n, const char *const *names, int count) {
    for (int i = 0; i < count; i++) {
        if ((Py_ssize_t)strlen(names[i]) == n && memcmp(names[i], k, (size_t)n) == 0)
            return i;
    }
    return -1;
}

/* ``_fields_in_view`` over the document c[p - 4:end] (terminator checked): 1 and the fields
 * set in ``out``; 0 when the walk would raise (``out`` then to be discarded); -1 on a Python
 * error. */
static int fields(const unsigned char *c, Py_ssize_t p, Py_ssize_t end, int reply, PyObject *out) {
    const char *const *names = reply ? REPLY_NAMES : CMD_NAMES;
    PyObject **keys = reply ? reply_keys : cmd_keys;
    int count = reply ? N_REPLY : N_CMD;
    unsigned seen = 0;
    int first = 1;
    Py_ssize_t last = end - 1;
    while (p < last) {
        unsigned t = c[p];
        /* the key's NUL: the terminator at end - 1 bounds the search */
        const unsigned char *zp = memchr(c + p + 1, 0, (size_t)(end - p - 1));
        Py_ssize_t z = zp - c;
        Py_ssize_t vs = z + 1;
        int kind = value_kind(t);
        Py_ssize_t nxt;
        if (kind == NOT_A_TYPE)
            return 0;
        if (kind >= 0) {
            nxt = vs + kind;
        } else if (kind == -4) { /* regex: two cstrings */
            Py_ssize_t q = vs;
            for (int i = 0; i < 2; i++) {
                while (q < end && c[q])
                    q++;
                if (q >= end)
                    return 0;
                q++;
            }
            nxt = q;
        } else {
            if (vs + 4 > end)
                return 0;
            int64_t n = le32(c + vs);
            if (n < 0)
                return 0;
            int64_t add = kind == -2 ? n : kind == -1 ? 4 + n : kind == -3 ? 5 + n : 16 + n;
            if (add > end - vs)
                return 0;
            nxt = vs + (Py_ssize_t)add;
        }
        if (nxt > end)
            return 0;
        Py_ssize_t klen = z - p - 1;
        int w = klen <= 10 ? wanted_index(c + p + 1, klen, names, count) : -1; /* the longest name: 10 */
        int keep = w >= 0 && !(seen & (1u << w));
        if (first || keep) {
            PyObject *val = scalar(t, c + vs);
            if (val == NULL)
                return -1;
            if (first) {
                /* a key cut at 128 bytes, as the Python walk decodes it */
                PyObject *name = PyUnicode_DecodeUTF8((const char *)c + p + 1, klen < 128 ? klen : 128, "replace");
                if (name == NULL) {
                    Py_DECREF(val);
                    return -1;
                }
                PyObject *pair = PyTuple_Pack(2, name, val);
                Py_DECREF(name);
                if (pair == NULL || PyDict_SetItem(out, empty_key, pair) < 0) {
                    Py_XDECREF(pair);
                    Py_DECREF(val);
                    return -1;
                }
                Py_DECREF(pair);
                first = 0;
            }
            if (keep) {
                seen |= 1u << w;
                if (PyDict_SetItem(out, keys[w], val) < 0) {
                    Py_DECREF(val);
                    return -1;
                }
            }
            Py_DECREF(val);
        }
        p = nxt;
    }
    return p == last;
}

/* ``_op_msg`` over the message c[0:length]: 1 with *flags and ``out`` set, 0 to leave it to
 * Python, -1 on a Python error. */
static int read_msg(const unsigned char *c, Py_ssize_t length, int reply, uint32_t *flags, PyObject *out) {
    if (length < 21)
        return 0;
    uint32_t f = (uint32_t)le32(c + 16);
    if (f & ~KNOWN_FLAGS)
        return 0;
    *flags = f;
    Py_ssize_t p = 20;
    Py_ssize_t end = f & FLAG_CHECKSUM ? length - 4 : length;
    while (p < end) {
        if (p + 5 > length)
            return 0;
        unsigned kind = c[p];
        int32_t size = le32(c + p + 1);
        if (size < 5 || size > MAX_DOCUMENT + 1024)
            return 0;
        if (kind == 0) {
            if (p + 1 + size > length)
                return 0;
            Py_ssize_t doc = p + 1;
            if (c[doc + size - 1] != 0)
                return 0;
            return fields(c, doc + 4, doc + size, reply, out);
        }
        if (kind != 1)
            return 0;
        p += 1 + size; /* a document sequence: skipped, not read */
    }
    return 0;
}

static PyObject *op_msg(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "op_msg(data, ms, length, reply)");
        return NULL;
    }
    Py_ssize_t ms = PyLong_AsSsize_t(args[1]);
    if (ms == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t length = PyLong_AsSsize_t(args[2]);
    if (length == -1 && PyErr_Occurred())
        return NULL;
    int reply = PyObject_IsTrue(args[3]);
    if (reply < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear(); /* not a simple buffer: the Python path decides */
        Py_RETURN_NONE;
    }
    if (ms < 0 || length < 0 || length > view.len - ms) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    PyObject *out = PyDict_New();
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    uint32_t flags = 0;
    int r = read_msg((const unsigned char *)view.buf + ms, length, reply, &flags, out);
    PyBuffer_Release(&view);
    if (r <= 0) {
        Py_DECREF(out);
        if (r < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    PyObject *fl = PyLong_FromUnsignedLong(flags);
    if (fl == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    PyObject *res = PyTuple_New(2);
    if (res == NULL) {
        Py_DECREF(fl);
        Py_DECREF(out);
        return NULL;
    }
    PyTuple_SET_ITEM(res, 0, fl);
    PyTuple_SET_ITEM(res, 1, out);
    return res;
}

static PyMethodDef methods[] = {
    {"op_msg", (PyCFunction)(void (*)(void))op_msg, METH_FASTCALL,
     "op_msg(data, ms, length, reply) -> (flags, fields) | None: a whole OP_MSG's flags and its body\n"
     "document's fields (mongodb._op_msg's), or None to leave it to the Python walk."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_bson", "MongoDB OP_MSG reader (see mongodb.py feed_whole).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__bson(void) {
    empty_key = PyUnicode_InternFromString("");
    if (empty_key == NULL)
        return NULL;
    for (int i = 0; i < N_REPLY; i++)
        if ((reply_keys[i] = PyUnicode_InternFromString(REPLY_NAMES[i])) == NULL)
            return NULL;
    for (int i = 0; i < N_CMD; i++)
        if ((cmd_keys[i] = PyUnicode_InternFromString(CMD_NAMES[i])) == NULL)
            return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "MAX_DOCUMENT", MAX_DOCUMENT) < 0 ||
        PyModule_AddIntConstant(m, "KNOWN_FLAGS", KNOWN_FLAGS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_STRING", MAX_STRING) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
