/* The frame check of http2.py's feed_whole, in C: _scan_whole there is the reference.
 *
 * scan(data, max_block) walks the frame headers of one segment (bytes or a contiguous byte
 * view) and answers None when the segment is not for feed_whole: a frame not whole, a kind
 * feed_whole does not read (PUSH_PROMISE, CONTINUATION, unknown types, padded DATA, HEADERS
 * without END_HEADERS or past max_block), a frame past the initial frame size, or one of a
 * bad shape (RFC 9113 section 6: lengths and stream ids). Otherwise it answers the list of
 * the frames with effects, as (type, flags, stream id, payload offset, length) tuples, in
 * order: DATA with a payload or END_STREAM, HEADERS, SETTINGS, RST_STREAM, GOAWAY
 * (WINDOW_UPDATE, PING, PRIORITY and empty DATA frames are checked, then left out).
 *
 * Only the header bytes are read (9 a frame, each inside the buffer: checked before), never
 * past the buffer's end. Why C: in Python this walk was a fifth of a gRPC connection's cost
 * in the protocols stage, a few simple tests a frame.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define FRAME_HDR 9
#define MAX_FRAME 16384 /* RFC 9113 6.5.2: the initial SETTINGS_MAX_FRAME_SIZE */

enum { DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE };
#define F_END_STREAM 0x1
#define F_END_HEADERS 0x4
#define F_PADDED 0x8

static PyObject *
scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "scan(data, max_block)");
        return NULL;
    }
    Py_ssize_t max_block = PyLong_AsSsize_t(args[1]);
    if (max_block == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *p = (const unsigned char *)view.buf;
    Py_ssize_t n = view.len;
    Py_ssize_t pos = 0;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        goto error;
    while (pos < n) {
        if (n - pos < FRAME_HDR)
            goto decline;
        const unsigned char *h = p + pos;
        Py_ssize_t length = ((Py_ssize_t)h[0] << 16) | ((Py_ssize_t)h[1] << 8) | h[2];
        int type = h[3];
        int flags = h[4];
        long sid = (long)((((unsigned long)h[5] << 24) | ((unsigned long)h[6] << 16) |
                           ((unsigned long)h[7] << 8) | h[8]) & 0x7FFFFFFFUL);
        Py_ssize_t body = pos + FRAME_HDR;
        int keep = 0;
        pos = body + length; /* past n for a frame not whole: the loop ends, declined below */
        switch (type) {
        case WINDOW_UPDATE:
            if (length != 4)
                goto decline;
            break;
        case DATA:
            if ((flags & F_PADDED) || sid == 0 || length > MAX_FRAME)
                goto decline;
            keep = length > 0 || (flags & F_END_STREAM);
            break;
        case PING:
            if (length != 8 || sid != 0)
                goto decline;
            break;
        case HEADERS:
            if (!(flags & F_END_HEADERS) || sid == 0 || length > max_block || length > MAX_FRAME)
                goto decline;
            keep = 1;
            break;
        case SETTINGS:
            if (length > MAX_FRAME || sid != 0)
                goto decline;
            keep = 1;
            break;
        case RST_STREAM:
            if (length != 4 || sid == 0)
                goto decline;
            keep = 1;
            break;
        case GOAWAY:
            if (length > MAX_FRAME || sid != 0 || length < 8)
                goto decline;
            keep = 1;
            break;
        case PRIORITY:
            if (length != 5 || sid == 0)
                goto decline;
            break;
        default: /* PUSH_PROMISE, CONTINUATION, unknown */
            goto decline;
        }
        if (keep) {
            PyObject *t = Py_BuildValue("(iilnn)", type, flags, sid, body, length);
            if (t == NULL)
                goto error;
            int r = PyList_Append(out, t);
            Py_DECREF(t);
            if (r < 0)
                goto error;
        }
    }
    if (pos != n)
        goto decline;
    PyBuffer_Release(&view);
    return out;
decline:
    Py_DECREF(out);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
error:
    Py_XDECREF(out);
    PyBuffer_Release(&view);
    return NULL;
}

static PyMethodDef methods[] = {
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "scan(data, max_block) -> list of (type, flags, stream, offset, length), or None: http2._scan_whole"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_h2frames", "http2.py's feed_whole frame check (see _h2frames.c).", -1, methods,
};

PyMODINIT_FUNC
PyInit__h2frames(void)
{
    return PyModule_Create(&module);
}
