/* processors.protocols._memcache: the memcached binary walk of Session.feed_whole in C.
 *
 * Contract (memcached.py's ``_walk`` stays the reference and the fallback):
 *   walk(data, from_client, collections) -> tuple | None
 * ``data`` is one TCP segment (any simple buffer: bytes, a byte memoryview). It is taken
 * only when it holds exactly whole classic binary packets (24-byte header, then
 * ``bodylen`` bytes) in the right direction, each passing exactly _walk's checks:
 *   - magic 0x80 from the client, 0x81 from the server (alternative framing, text and
 *     anything else: None);
 *   - bodylen <= MAX_BODY, extlen + keylen <= bodylen, keylen <= MAX_KEY;
 *   - from the client with ``collections`` true: no key read as a collection id (a key
 *     of an opcode outside _NO_CID_OPS);
 *   - from the server: no GET_COLLECTION_ID (0xBB) or HELLO (0x1F) response (their
 *     bodies teach the session something: the buffered path reads them);
 *   - the last packet ends exactly where the segment ends.
 * The result is one (op, key offset, key length, status, opaque) tuple a packet, in
 * order, in a tuple (empty for an empty segment); "status" is the header's vbucket/status
 * field. None means "not taken here": the Python walk then decides (so this file never
 * reproduces an error, and any non-None result equals _walk's).
 *
 * Memory: every header read is checked against the segment's length before it is made
 * (a declared length only moves the cursor, compared against the length, never read
 * through); at most MAX_PACKETS packets a segment are taken (more: None, the Python walk
 * runs), so the only allocations are that many small tuples and their ints. No mutable
 * global state.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* memcached.py's limits (MAX_KEY, MAX_BODY): kept equal by tests/test_memcached_speedup.py. */
#define MAX_KEY (255 + 8)
#define MAX_BODY (64u * 1024u * 1024u)
/* A segment of more packets than this (a pipeline of tiny commands) is left to Python:
 * the results fit a fixed array on the stack. */
#define MAX_PACKETS 64
#define HDR 24

typedef struct {
    unsigned op, keylen, status;
    Py_ssize_t key_off;
    uint32_t opaque;
} pkt_t;

/* Opcodes whose key carries no collection id (memcached.py _NO_CID_OPS). */
static int no_cid_op(unsigned op) {
    switch (op) {
    case 0x89: case 0x1F: case 0xBA: case 0xBB: case 0xB5: case 0x20: case 0x21: case 0x22: case 0xFE:
        return 1;
    default:
        return 0;
    }
}

static unsigned be16(const unsigned char *p) { return ((unsigned)p[0] << 8) | p[1]; }

static uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* The packets of p[0:n], into out (at most MAX_PACKETS): their count, or -1 to decline. */
static Py_ssize_t scan(const unsigned char *p, Py_ssize_t n, int from_client, int collections, pkt_t *out) {
    unsigned magic_ok = from_client ? 0x80 : 0x81;
    Py_ssize_t off = 0, count = 0;
    while (off < n) {
        if (n - off < HDR)
            return -1; /* a header cut short */
        const unsigned char *h = p + off;
        unsigned op = h[1], keylen = be16(h + 2), extlen = h[4];
        uint32_t body = be32(h + 8);
        if (h[0] != magic_ok || body > MAX_BODY || extlen + keylen > body || keylen > MAX_KEY)
            return -1;
        if (collections && keylen && !no_cid_op(op))
            return -1;
        if (!from_client && (op == 0xBB || op == 0x1F))
            return -1;
        if (count == MAX_PACKETS)
            return -1;
        out[count].op = op;
        out[count].key_off = off + HDR + (Py_ssize_t)extlen;
        out[count].keylen = keylen;
        out[count].status = be16(h + 6);
        out[count].opaque = be32(h + 12);
        count++;
        /* body <= MAX_BODY: no overflow; a body past the segment ends the loop below. */
        if ((Py_ssize_t)body > n - off - HDR)
            return -1;
        off += HDR + (Py_ssize_t)body;
    }
    return count;
}

static PyObject *walk(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "walk(data, from_client, collections)");
        return NULL;
    }
    int from_client = PyObject_IsTrue(args[1]);
    int collections = PyObject_IsTrue(args[2]);
    if (from_client < 0 || collections < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear(); /* not a simple buffer: the Python path decides */
        Py_RETURN_NONE;
    }
    pkt_t pk[MAX_PACKETS];
    Py_ssize_t count = scan((const unsigned char *)view.buf, view.len, from_client, collections, pk);
    PyBuffer_Release(&view);
    if (count < 0)
        Py_RETURN_NONE;
    PyObject *out = PyTuple_New(count);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *t = PyTuple_New(5);
        if (t == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, i, t);
        PyObject *v[5] = {PyLong_FromUnsignedLong(pk[i].op), PyLong_FromSsize_t(pk[i].key_off),
                          PyLong_FromUnsignedLong(pk[i].keylen), PyLong_FromUnsignedLong(pk[i].status),
                          PyLong_FromUnsignedLong(pk[i].opaque)};
        for (int j = 0; j < 5; j++) {
            if (v[j] == NULL) {
                for (int k = j + 1; k < 5; k++)
                    Py_XDECREF(v[k]);
                Py_DECREF(out); /* and the items set so far */
                return NULL;
            }
            PyTuple_SET_ITEM(t, j, v[j]);
        }
    }
    return out;
}

static PyMethodDef methods[] = {
    {"walk", (PyCFunction)(void (*)(void))walk, METH_FASTCALL,
     "walk(data, from_client, collections) -> tuple | None: a segment's whole binary packets as\n"
     "(op, key offset, key length, status, opaque) tuples, or None to leave it to the Python walk."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_memcache", "memcached binary segment walker (see memcached.py feed_whole).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__memcache(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "MAX_KEY", MAX_KEY) < 0 || PyModule_AddIntConstant(m, "MAX_BODY", MAX_BODY) < 0 ||
        PyModule_AddIntConstant(m, "MAX_PACKETS", MAX_PACKETS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
