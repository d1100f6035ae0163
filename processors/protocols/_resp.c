/* processors.protocols._resp: redis.py's whole-value reader (_whole_values) in C.
 *
 * Contract (redis.py stays the reference and the fallback):
 *   values(data, start, keep, out) -> end
 * Reads, from data[start:], the top-level RESP values of the common shapes that lie
 * whole in ``data``, exactly as redis._whole_values does, appends one tuple
 * ``(type, args, nargs, is_null, error)`` a value to the list ``out``, and stops, having taken
 * nothing of it, at the first value it cannot take whole (cut by the buffer's end,
 * nested, an attribute, an inline command, a malformed or over-long line, a bulk
 * length over MAX_BULK). ``end`` is the offset after the last value taken. Whatever
 * it stops at, the pure-Python scanner reads as before and decides alone (errors,
 * limits, drop reasons): this file never raises for bad input and never reproduces
 * an error reason, so the session's spans and drop counts do not depend on it.
 *
 * Shapes taken (each a header line ``<type><text>\r\n``):
 *   aggregates  * % ~ >   count -?[0-9]{1,9}; a map's entries count twice; <= 0 is
 *                          empty (negative: null); elements flat: the bulk and line
 *                          types below
 *   bulk        $ ! =     length -?[0-9]{1,9}; negative: null, no body; the body and
 *                          its CRLF are stepped over (the CRLF unchecked, as the
 *                          scanner's skip)
 *   line        + - : _ , # (   [^\r\n]{0,MAX_LINE} then CRLF
 * Per value: ``type`` the type byte; ``args`` the first ``keep`` non-null bulk or
 * ``+`` elements of an aggregate, each cut to MAX_ARG_BYTES (bytes); ``nargs`` an
 * aggregate's element count (0 otherwise); ``is_null``; ``error`` the text of a
 * top-level ``-`` line (first 512 bytes) or ``!`` bulk (first 256), UTF-8 decoded
 * with errors replaced, else None.
 *
 * Memory: every read is bounds-checked against the buffer's length (a declared
 * length is only ever added to an offset that is then compared with it, never
 * dereferenced); the kept arguments' offsets live in a fixed array (keep <= MAX_KEEP);
 * objects are made only for a value wholly validated, one small tuple each, as the
 * Python twin makes them. No recursion, no global mutable state.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* redis.py's limits (MAX_LINE, MAX_BULK, MAX_ARG_BYTES): test_redis_speedup checks they agree. */
#define MAX_LINE (64 * 1024)
#define MAX_BULK (512L * 1024 * 1024)
#define MAX_ARG_BYTES 128
#define MAX_KEEP 16
#define ERROR_LINE_BYTES 512
#define ERROR_BULK_BYTES 256

enum { K_NONE = 0, K_AGG, K_BULK, K_LINE };
static unsigned char KIND[256];

static void init_tables(void) {
    const char *agg = "*%~>", *bulk = "$!=", *line = "+-:_,#(";
    for (const char *p = agg; *p; p++)
        KIND[(unsigned char)*p] = K_AGG;
    for (const char *p = bulk; *p; p++)
        KIND[(unsigned char)*p] = K_BULK;
    for (const char *p = line; *p; p++)
        KIND[(unsigned char)*p] = K_LINE;
}

/* ``-?[0-9]{1,9}\r\n`` at s[p]: its value in *v and the offset after the CRLF in *next.
 * 0 when not that (a tenth digit, a sign alone, no CRLF within the buffer). */
static int num_line(const unsigned char *s, Py_ssize_t n, Py_ssize_t p, long *v, Py_ssize_t *next) {
    int neg = 0;
    if (p < n && s[p] == '-') {
        neg = 1;
        p++;
    }
    Py_ssize_t d0 = p;
    long x = 0;
    while (p < n && p - d0 < 9 && s[p] >= '0' && s[p] <= '9') {
        x = x * 10 + (s[p] - '0');
        p++;
    }
    if (p == d0 || p + 1 >= n || s[p] != '\r' || s[p + 1] != '\n')
        return 0;
    *v = neg ? -x : x;
    *next = p + 2;
    return 1;
}

/* ``[^\r\n]{0,MAX_LINE}\r\n`` at s[p]: the offset of its CR in *cr. 0 when not that. */
static int text_line(const unsigned char *s, Py_ssize_t n, Py_ssize_t p, Py_ssize_t *cr) {
    if (p >= n)
        return 0;
    Py_ssize_t limit = n - p < MAX_LINE + 1 ? n - p : MAX_LINE + 1; /* the CR may follow MAX_LINE bytes */
    const unsigned char *r = memchr(s + p, '\r', (size_t)limit);
    if (r == NULL)
        return 0;
    Py_ssize_t at = r - s;
    if (at + 1 >= n || s[at + 1] != '\n' || memchr(s + p, '\n', (size_t)(at - p)) != NULL)
        return 0;
    *cr = at;
    return 1;
}

static PyObject *decoded(const unsigned char *s, Py_ssize_t len) {
    return PyUnicode_DecodeUTF8((const char *)s, len, "replace");
}

/* One value's tuple; steals nothing, returns a new reference or NULL (error set). */
static PyObject *value_tuple(int t, PyObject *args, long nargs, int is_null, PyObject *error) {
    PyObject *tt = PyLong_FromLong(t), *na = PyLong_FromLong(nargs);
    PyObject *out = NULL;
    if (tt != NULL && na != NULL)
        out = PyTuple_Pack(5, tt, args, na, is_null ? Py_True : Py_False, error);
    Py_XDECREF(tt);
    Py_XDECREF(na);
    return out;
}

static PyObject *values(PyObject *self, PyObject *const *argv, Py_ssize_t argc) {
    if (argc != 4) {
        PyErr_SetString(PyExc_TypeError, "values(data, start, keep, out) takes 4 arguments");
        return NULL;
    }
    PyObject *out = argv[3];
    if (!PyList_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "values: out must be a list");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(argv[1]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t keep = PyLong_AsSsize_t(argv[2]);
    if (keep == -1 && PyErr_Occurred())
        return NULL;
    if (keep < 0 || keep > MAX_KEEP) {
        PyErr_SetString(PyExc_ValueError, "keep out of range");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(argv[0], &view, PyBUF_SIMPLE) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_BufferError))
            return NULL;
        PyErr_Clear(); /* not contiguous: nothing taken here, the scanner reads it */
        return PyLong_FromSsize_t(start);
    }
    const unsigned char *s = (const unsigned char *)view.buf;
    Py_ssize_t n = view.len;
    PyObject *result = NULL;
    if (start < 0 || start > n) {
        PyErr_SetString(PyExc_ValueError, "start out of range");
        goto done;
    }
    Py_ssize_t p = start;
    Py_ssize_t kept_at[MAX_KEEP], kept_len[MAX_KEEP];
    while (p < n) {
        int t = s[p];
        int kind = KIND[t];
        Py_ssize_t q;
        long nargs = 0;
        int is_null = 0, nk = 0;
        Py_ssize_t err_at = -1, err_len = 0;
        if (kind == K_AGG) {
            long cnt;
            if (!num_line(s, n, p + 1, &cnt, &q))
                break;
            if (t == '%')
                cnt *= 2; /* key and value per entry (|cnt| < 10^9: no overflow) */
            if (cnt <= 0) {
                is_null = cnt < 0;
            } else {
                nargs = cnt;
                int ok = 1;
                for (long i = 0; i < cnt; i++) { /* each element >= 3 bytes: the q >= n test ends it */
                    if (q >= n) {
                        ok = 0;
                        break;
                    }
                    int e = s[q];
                    int ek = KIND[e];
                    if (ek == K_BULK) {
                        long blen;
                        if (!num_line(s, n, q + 1, &blen, &q)) {
                            ok = 0;
                            break;
                        }
                        if (blen < 0)
                            continue; /* a null element: no body */
                        if (blen > MAX_BULK) {
                            ok = 0;
                            break;
                        }
                        if (nk < keep) {
                            kept_at[nk] = q;
                            kept_len[nk++] = blen < MAX_ARG_BYTES ? blen : MAX_ARG_BYTES;
                        }
                        q += blen + 2; /* checked against n before any read (q >= n above, q > n below) */
                    } else if (ek == K_LINE) {
                        Py_ssize_t cr;
                        if (!text_line(s, n, q + 1, &cr)) {
                            ok = 0;
                            break;
                        }
                        if (e == '+' && nk < keep) {
                            kept_at[nk] = q + 1;
                            kept_len[nk++] = cr - (q + 1) < MAX_ARG_BYTES ? cr - (q + 1) : MAX_ARG_BYTES;
                        }
                        q = cr + 2;
                    } else if (ek == K_AGG) {
                        /* An empty or null aggregate (HELLO's "modules" *0): a complete element,
                         * not kept, as the scanner has it; one with elements is the scanner's. */
                        long ecnt;
                        if (!num_line(s, n, q + 1, &ecnt, &q) || ecnt > 0) {
                            ok = 0;
                            break;
                        }
                    } else {
                        ok = 0; /* attribute, anything else */
                        break;
                    }
                }
                if (!ok || q > n)
                    break;
            }
        } else if (kind == K_BULK) {
            long blen;
            if (!num_line(s, n, p + 1, &blen, &q))
                break;
            if (blen < 0) {
                is_null = 1;
            } else {
                if (blen > MAX_BULK)
                    break;
                if (t == '!') {
                    err_at = q;
                    err_len = blen < ERROR_BULK_BYTES ? blen : ERROR_BULK_BYTES;
                }
                q += blen + 2;
                if (q > n)
                    break;
            }
        } else if (kind == K_LINE) {
            Py_ssize_t cr;
            if (!text_line(s, n, p + 1, &cr))
                break;
            if (t == '-') {
                err_at = p + 1;
                err_len = cr - err_at < ERROR_LINE_BYTES ? cr - err_at : ERROR_LINE_BYTES;
            } else if (t == '_') {
                is_null = 1;
            }
            q = cr + 2;
        } else {
            break;
        }
        /* The value is whole and every kept range lies inside data[:q] (q <= n). */
        PyObject *args = PyList_New(nk);
        if (args == NULL)
            goto done;
        for (int i = 0; i < nk; i++) {
            PyObject *b = PyBytes_FromStringAndSize((const char *)s + kept_at[i], kept_len[i]);
            if (b == NULL) {
                Py_DECREF(args);
                goto done;
            }
            PyList_SET_ITEM(args, i, b);
        }
        PyObject *error = Py_None;
        Py_INCREF(error);
        if (err_at >= 0) {
            Py_DECREF(error);
            error = decoded(s + err_at, err_len);
            if (error == NULL) {
                Py_DECREF(args);
                goto done;
            }
        }
        PyObject *v = value_tuple(t, args, nargs, is_null, error);
        Py_DECREF(args);
        Py_DECREF(error);
        if (v == NULL)
            goto done;
        int rc = PyList_Append(out, v);
        Py_DECREF(v);
        if (rc < 0)
            goto done;
        p = q;
    }
    result = PyLong_FromSsize_t(p);
done:
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"values", (PyCFunction)(void (*)(void))values, METH_FASTCALL,
     "values(data, start, keep, out) -> end: the whole RESP values of the common shapes at data[start:], "
     "appended to out as (type, args, nargs, is_null, error) (redis._whole_values)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_resp", "RESP whole-value reading accelerator (see redis.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__resp(void) {
    init_tables();
    return PyModule_Create(&module);
}
