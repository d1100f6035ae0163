/* processors.protocols._fcgi: the FastCGI record walk's common case in C.
 *
 * Contract (fastcgi.py stays the reference and the fallback):
 *   pairs(data) -> dict | None
 *     The wanted name-value pairs of one PARAMS stream (fastcgi._walk_pairs' answer:
 *     1- or 4-byte lengths, a kept value bounded to MAX_VALUE bytes, a later duplicate
 *     wins); None wherever _walk_pairs raises Malformed (truncated length, a pair
 *     overrunning the stream), so Python raises it with its reason and offset.
 *   walk(data) -> False | None | tuple
 *     One segment given to Session.feed_whole. False: it is not exactly whole records
 *     (a header cut short, version != 1, a type outside 1..11, the last record running
 *     past the end): feed_whole's own answer, nothing done. None: whole records, but
 *     not the one shape handled here; the Python loop then does the segment record by
 *     record. The shape: every record of one request id (not 0), in this order:
 *       [BEGIN_REQUEST first] [PARAMS: the empty end record, or one non-empty record
 *       and the end record] [STDIN/DATA...] [STDOUT...] [END_REQUEST last]
 *     with the first non-empty STDOUT record holding the whole response head (its
 *     blank line) and a Status: line, if any, whose code is plain digits.
 *     STDERR records may come anywhere in it (php-fpm sends a warning
 *     before the STDOUT it goes with: a ninth of the real capture's replies).
 *     The tuple (all ints unless said):
 *       (rid, begin, params, params_len, stdin, stdout, head_len, status, end,
 *        app_status, protocol_status, stderr)
 *     params: None (no PARAMS record), 0 (only the end record), or the dict of pairs
 *     (params_len: that record's content length, charged to the request);
 *     head_len: 0 when no STDOUT content came, else the head's length in the first
 *     non-empty record (through \r\n\r\n, else \n\n: fastcgi._head's rule) and
 *     status its code (fastcgi._status: the first "status:" line, ASCII case
 *     ignored, with something after the colon; 200 when none); end: 1 when the
 *     segment ends with END_REQUEST, app_status (signed) and protocol_status then
 *     from its content (0, 0 when it is shorter than 5 bytes, as fastcgi.py reads it);
 *     stderr: None without a non-empty STDERR record, else a tuple of the first
 *     MAX_STDERR_EVENTS non-empty ones' contents, each its first MAX_STDERR_BYTES bytes
 *     (fastcgi._record's event message, before decoding; the session keeps as many as fit).
 *   WANTED: the names pairs() keeps (the test holds it equal to fastcgi._WANTED).
 *   MAX_VALUE: the bound on a kept value; MAX_STDERR_EVENTS, MAX_STDERR_BYTES: fastcgi.py's.
 *
 * Memory: every read is bounds-checked against the buffer's length (declared lengths
 * are never trusted); the only allocations are the small result objects (a dict of
 * at most 15 bounded values, a tuple of at most 8 bounded STDERR contents). No mutable global state: the module holds only the
 * constant name objects made at import.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

enum { BEGIN_REQUEST = 1, ABORT_REQUEST, END_REQUEST, PARAMS, STDIN, STDOUT, STDERR, DATA };
#define MAX_TYPE 11
#define MAX_VALUE 2048
#define STATUS_VALUE_MAX 64
#define MAX_STDERR_EVENTS 8
#define MAX_STDERR_BYTES 1024

static const char *const WANTED_NAMES[] = {
    "REQUEST_METHOD", "REQUEST_URI", "SCRIPT_NAME", "QUERY_STRING", "SERVER_PORT",
    "SERVER_NAME", "REMOTE_ADDR", "REMOTE_PORT", "SERVER_PROTOCOL", "REQUEST_SCHEME",
    "HTTPS", "HTTP_USER_AGENT", "HTTP_TRACEPARENT", "HTTP_HOST", "DOCUMENT_URI",
};
#define N_WANTED ((int)(sizeof(WANTED_NAMES) / sizeof(WANTED_NAMES[0])))
static PyObject *wanted_obj[N_WANTED];
static Py_ssize_t wanted_len[N_WANTED];

/* Index of the wanted name d[0:len], or -1. */
static int wanted_index(const unsigned char *d, Py_ssize_t len)
{
    if (len < 5 || len > 16)
        return -1;
    for (int k = 0; k < N_WANTED; k++)
        if (wanted_len[k] == len && memcmp(d, WANTED_NAMES[k], (size_t)len) == 0)
            return k;
    return -1;
}

/* One pair length at d[*i] (1 byte, or 4 with the top bit set); -1 when cut short. */
static Py_ssize_t nv_length(const unsigned char *d, Py_ssize_t n, Py_ssize_t *i)
{
    Py_ssize_t p = *i;
    if (p >= n)
        return -1;
    if (d[p] < 0x80) {
        *i = p + 1;
        return d[p];
    }
    if (n - p < 4)
        return -1;
    *i = p + 4;
    return (Py_ssize_t)((((uint32_t)d[p] & 0x7F) << 24) | ((uint32_t)d[p + 1] << 16) |
                        ((uint32_t)d[p + 2] << 8) | (uint32_t)d[p + 3]);
}

/* The wanted pairs of d[0:n] as a new dict; NULL with no exception set when the stream is
 * malformed (the Python walk's Malformed), NULL with one on a memory error. */
static PyObject *decode_pairs(const unsigned char *d, Py_ssize_t n)
{
    PyObject *out = PyDict_New();
    if (out == NULL)
        return NULL;
    Py_ssize_t i = 0;
    while (i < n) {
        Py_ssize_t nlen = nv_length(d, n, &i);
        if (nlen < 0)
            goto bad;
        Py_ssize_t vlen = nv_length(d, n, &i);
        if (vlen < 0)
            goto bad;
        /* both lengths < 2**31: their sum fits a Py_ssize_t (64-bit) without overflow */
        if (nlen + vlen > n - i)
            goto bad;
        int k = wanted_index(d + i, nlen);
        if (k >= 0) {
            PyObject *v = PyBytes_FromStringAndSize((const char *)d + i + nlen,
                                                    vlen < MAX_VALUE ? vlen : MAX_VALUE);
            if (v == NULL || PyDict_SetItem(out, wanted_obj[k], v) < 0) {
                Py_XDECREF(v);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(v);
        }
        i += nlen + vlen;
    }
    return out;
bad:
    Py_DECREF(out);
    return NULL;
}

static PyObject *fcgi_pairs(PyObject *self, PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *r = decode_pairs((const unsigned char *)b.buf, b.len);
    PyBuffer_Release(&b);
    if (r == NULL && !PyErr_Occurred())
        Py_RETURN_NONE;
    return r;
}

/* First offset of the 2- or 4-byte pattern pat in d[0:n], or -1. */
static Py_ssize_t find(const unsigned char *d, Py_ssize_t n, const char *pat, Py_ssize_t m)
{
    for (Py_ssize_t p = 0; p + m <= n; p++) {
        const unsigned char *q = memchr(d + p, pat[0], (size_t)(n - m + 1 - p));
        if (q == NULL)
            return -1;
        p = q - d;
        if (memcmp(q, pat, (size_t)m) == 0)
            return p;
    }
    return -1;
}

static int is_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == 0x0b || c == 0x0c;
}

/* The status code of the head d[0:n] as fastcgi._status reads it (200 without a Status:
 * line); -1 for a value whose code is not plain digits (or is 0): Python decides those. */
static long head_status(const unsigned char *d, Py_ssize_t n)
{
    Py_ssize_t p = 0;
    while (p < n) {
        const unsigned char *nl = memchr(d + p, '\n', (size_t)(n - p));
        if (nl == NULL)
            break;
        Py_ssize_t e = nl - d;
        if (e - p > 7) {
            static const char want[] = "status:";
            int same = 1;
            for (int k = 0; k < 7; k++) {
                unsigned char c = d[p + k];
                if (c >= 'A' && c <= 'Z')
                    c = (unsigned char)(c + 32);
                if (c != (unsigned char)want[k]) {
                    same = 0;
                    break;
                }
            }
            if (same) {
                Py_ssize_t a = p + 7;
                Py_ssize_t z = e - a < STATUS_VALUE_MAX ? e : a + STATUS_VALUE_MAX;
                while (a < z && is_space(d[a]))
                    a++;
                while (z > a && is_space(d[z - 1]))
                    z--;
                Py_ssize_t t = a;
                while (t < z && d[t] != ' ')
                    t++;
                if (t == a || t - a > 9)
                    return -1;
                long code = 0;
                for (Py_ssize_t k = a; k < t; k++) {
                    if (d[k] < '0' || d[k] > '9')
                        return -1;
                    code = code * 10 + (d[k] - '0');
                }
                return code > 0 ? code : -1;
            }
        }
        p = e + 1;
    }
    return 200;
}

/* Phases of the one shape walk() takes, in the order records may come. */
enum { P_START, P_BEGUN, P_PARAMS, P_PARAMS_DONE, P_STDIN, P_STDOUT, P_ENDED };

static PyObject *fcgi_walk(PyObject *self, PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *d = (const unsigned char *)b.buf;
    const Py_ssize_t n = b.len;
    PyObject *params = NULL; /* a new reference once decoded */
    PyObject *errs[MAX_STDERR_EVENTS]; /* new references: the first n_errs STDERR contents */
    int n_errs = 0;
    PyObject *result = NULL;

    /* The framing, as feed_whole's first loop checks it. */
    Py_ssize_t off = 0;
    while (off < n) {
        if (n - off < 8 || d[off] != 1 || d[off + 1] < 1 || d[off + 1] > MAX_TYPE) {
            PyBuffer_Release(&b);
            Py_RETURN_FALSE;
        }
        off += 8 + (((Py_ssize_t)d[off + 4] << 8) | d[off + 5]) + d[off + 6];
    }
    if (off != n || n == 0) {
        PyBuffer_Release(&b);
        if (n == 0)
            Py_RETURN_NONE;
        Py_RETURN_FALSE;
    }

    /* The shape: every record is whole (checked above), so content reads stay inside. */
    long rid = -1;
    int phase = P_START, begin = 0, params_end_only = 0;
    Py_ssize_t params_at = 0, params_len = 0, stdin_n = 0, stdout_n = 0, head_len = 0;
    long status = 0, app = 0, proto = 0;
    for (off = 0; off < n;) {
        const int t = d[off + 1];
        const long r = ((long)d[off + 2] << 8) | d[off + 3];
        const Py_ssize_t clen = ((Py_ssize_t)d[off + 4] << 8) | d[off + 5];
        const unsigned char *c = d + off + 8;
        if (r == 0 || (rid >= 0 && r != rid) || phase == P_ENDED)
            goto decline;
        rid = r;
        switch (t) {
        case BEGIN_REQUEST:
            if (off != 0)
                goto decline;
            begin = 1;
            phase = P_BEGUN;
            break;
        case PARAMS:
            if (phase <= P_BEGUN) {
                if (clen == 0) {
                    params_end_only = 1;
                    phase = P_PARAMS_DONE;
                } else {
                    params_at = off + 8;
                    params_len = clen;
                    phase = P_PARAMS;
                }
            } else if (phase == P_PARAMS && clen == 0) {
                params = decode_pairs(d + params_at, params_len);
                if (params == NULL) {
                    if (PyErr_Occurred())
                        goto fail;
                    goto decline;
                }
                phase = P_PARAMS_DONE;
            } else {
                goto decline;
            }
            break;
        case STDIN:
        case DATA:
            if (phase == P_PARAMS || phase > P_STDIN)
                goto decline;
            phase = P_STDIN;
            stdin_n += clen;
            break;
        case STDOUT:
            if (phase == P_PARAMS)
                goto decline;
            phase = P_STDOUT;
            stdout_n += clen;
            if (clen && head_len == 0) {
                Py_ssize_t e = find(c, clen, "\r\n\r\n", 4);
                if (e >= 0) {
                    head_len = e + 4;
                } else {
                    e = find(c, clen, "\n\n", 2);
                    if (e < 0)
                        goto decline;
                    head_len = e + 2;
                }
                status = head_status(c, head_len);
                if (status < 0)
                    goto decline;
            }
            break;
        case END_REQUEST:
            if (phase == P_PARAMS)
                goto decline;
            phase = P_ENDED;
            if (clen >= 5) {
                app = (long)(int32_t)(((uint32_t)c[0] << 24) | ((uint32_t)c[1] << 16) |
                                      ((uint32_t)c[2] << 8) | (uint32_t)c[3]);
                proto = c[4];
            }
            break;
        case STDERR:
            if (clen && n_errs < MAX_STDERR_EVENTS) {
                PyObject *e = PyBytes_FromStringAndSize((const char *)c, clen < MAX_STDERR_BYTES ? clen : MAX_STDERR_BYTES);
                if (e == NULL)
                    goto fail;
                errs[n_errs++] = e;
            }
            break;
        default: /* ABORT_REQUEST, management records: the Python loop */
            goto decline;
        }
        off += 8 + clen + d[off + 6];
    }
    if (phase == P_PARAMS)
        goto decline; /* a stream going on in the next segment: held by the Python path */
    PyBuffer_Release(&b);
    PyObject *stderr_obj;
    if (n_errs) {
        stderr_obj = PyTuple_New(n_errs);
        if (stderr_obj == NULL) {
            for (int k = 0; k < n_errs; k++)
                Py_DECREF(errs[k]);
            Py_XDECREF(params);
            return NULL;
        }
        for (int k = 0; k < n_errs; k++)
            PyTuple_SET_ITEM(stderr_obj, k, errs[k]); /* steals */
    } else {
        stderr_obj = Py_NewRef(Py_None);
    }
    if (params == NULL) {
        params = params_end_only ? PyLong_FromLong(0) : Py_NewRef(Py_None);
        if (params == NULL) {
            Py_DECREF(stderr_obj);
            return NULL;
        }
        params_len = 0;
    }
    /* The tuple filled in place (Py_BuildValue parses its format at every call: twice a request). */
    result = PyTuple_New(12);
    if (result == NULL) {
        Py_DECREF(params);
        Py_DECREF(stderr_obj);
        return NULL;
    }
    const Py_ssize_t ints[] = {rid, begin, 0, params_len, stdin_n, stdout_n, head_len, status, phase == P_ENDED,
                               app, proto};
    for (int k = 0; k < 11; k++) {
        PyObject *v = k == 2 ? params : PyLong_FromSsize_t(ints[k]);
        if (v == NULL) {
            Py_DECREF(result); /* the items set so far with it */
            if (k < 2)
                Py_DECREF(params);
            Py_DECREF(stderr_obj);
            return NULL;
        }
        PyTuple_SET_ITEM(result, k, v); /* steals */
    }
    PyTuple_SET_ITEM(result, 11, stderr_obj);
    return result;
decline:
    PyBuffer_Release(&b);
    Py_XDECREF(params);
    for (int k = 0; k < n_errs; k++)
        Py_DECREF(errs[k]);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&b);
    Py_XDECREF(params);
    for (int k = 0; k < n_errs; k++)
        Py_DECREF(errs[k]);
    return NULL;
}

static PyMethodDef methods[] = {
    {"pairs", fcgi_pairs, METH_O, "The wanted pairs of a PARAMS stream (dict), or None when it is malformed."},
    {"walk", fcgi_walk, METH_O, "One segment's records in the common shape (tuple); False: not whole records; "
                                "None: the Python loop decides."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "processors.protocols._fcgi",
    "The FastCGI record walk's common case (fastcgi.py is the reference).", -1, methods,
};

PyMODINIT_FUNC PyInit__fcgi(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    PyObject *names = PyTuple_New(N_WANTED);
    if (names == NULL)
        goto fail;
    for (int k = 0; k < N_WANTED; k++) {
        if (wanted_obj[k] == NULL) {
            wanted_len[k] = (Py_ssize_t)strlen(WANTED_NAMES[k]);
            wanted_obj[k] = PyBytes_FromStringAndSize(WANTED_NAMES[k], wanted_len[k]);
            if (wanted_obj[k] == NULL) {
                Py_DECREF(names);
                goto fail;
            }
        }
        PyTuple_SET_ITEM(names, k, Py_NewRef(wanted_obj[k]));
    }
    if (PyModule_AddObject(m, "WANTED", names) < 0) {
        Py_DECREF(names);
        goto fail;
    }
    if (PyModule_AddIntConstant(m, "MAX_VALUE", MAX_VALUE) < 0 ||
        PyModule_AddIntConstant(m, "MAX_STDERR_EVENTS", MAX_STDERR_EVENTS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_STDERR_BYTES", MAX_STDERR_BYTES) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
