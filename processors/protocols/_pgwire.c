/* processors.protocols._pgwire: PostgreSQL's in-place segment walk (feed_whole) in C.
 *
 * Contract (postgresql.py stays the reference and the fallback):
 *   limits(max_query_bytes, max_name, max_error_head) -> None
 *       the caps postgresql.py reads bodies with (called once at import).
 *   Op(kind, info, start)
 *       postgresql._Op's twin (its attributes, their defaults), the session's ops when loaded.
 *   client(data) -> tuple | False | None
 *   server(data) -> tuple | False | None
 * ``data`` is one segment (any buffer). False: the segment is not whole messages of
 * this side (a header feed_whole would not accept, a message going on past the end),
 * exactly when the Python framing loop of feed_whole declines. None: whole, but a body
 * is unusual (a Parse or Bind whose names have no NUL): the Python reader then reads
 * the segment and raises what it raises. So this file never decides an error.
 *   client(data, True) -> (end, tuple) | None, server(data, True) likewise
 * the buffered feed's form: the whole messages before the first one that is not (cut
 * short, or a header feed would raise on), ``end`` where they stop; feed reads on
 * from there in Python. None as above.
 *
 * client's tuple holds one record a message that leaves a trace (H, X, d, c, f, p leave
 * none), in order, each read from the body capped as _CLIENT_HEAD caps it:
 *   (81, text)                Query: its text (to its NUL, else the capped end) as
 *                             sql.decode_query decodes it (cut at max_query bytes, UTF-8 replaced)
 *   (80, name, text)          Parse: statement name (bytes, cut at max_name), query text as Q's
 *   (66, portal, statement)   Bind: both names (bytes; b"" the unnamed)
 *   (69, portal)              Execute
 *   (67, kind, name | None)   Close: 'S'/'P' (0 for an empty body), the name if NUL-ended
 *   (68,) (83,) (70,)         Describe, Sync, FunctionCall: nothing read
 * server's tuple is flat ints, one a message that _server_msg/_server_error act on:
 *   -k                        a run of k DataRows
 *   69, code, msg             ErrorResponse: SQLSTATE and message (str), read from the body
 *                             capped at max_error_head as postgresql._error_fields_view reads them
 *   t                         C Z 1 2 3 T n I s V (the others are nothing to pair: left out)
 *
 * Memory: every read is checked against the segment's length (a declared length is
 * trusted only once its message is seen to end within the segment); the allocations
 * are the result tuple, its records, the names and texts (each at most the capped body). No
 * mutable global state but the three caps set by limits().
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>

/* PQ_LARGE_MESSAGE_LIMIT, as postgresql.MAX_MESSAGE_LEN. */
#define MAX_MESSAGE_LEN ((1L << 30) - 1)

static Py_ssize_t MAX_QUERY = 8192, MAX_NAME = 256, MAX_ERROR_HEAD = 4096;

/* Message types each side may send (postgresql._CLIENT_HEAD / _SERVER_HEAD keys). */
static unsigned char CLIENT_T[256], SERVER_T[256];
/* Server types left out of server()'s result: nothing in the session pairs them. */
static unsigned char SERVER_SKIP[256];
static PyObject *REC_D, *REC_S, *REC_F, *EMPTY;

static void init_tables(void) {
    const char *c = "QPBEDCSHXdcfpF";
    const char *s = "ENCZRSKTDI123ntsGHWdcAvV";
    const char *skip = "NRSKtGHWdcAv";
    for (; *c; c++)
        CLIENT_T[(unsigned char)*c] = 1;
    for (; *s; s++)
        SERVER_T[(unsigned char)*s] = 1;
    for (; *skip; skip++)
        SERVER_SKIP[(unsigned char)*skip] = 1;
}

static long be32(const unsigned char *p) {
    return (long)(int32_t)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3]);
}

/* The capped body cap of a client message type (postgresql._CLIENT_HEAD). */
static Py_ssize_t client_cap(unsigned char t) {
    switch (t) {
    case 'Q': return MAX_QUERY + 1;
    case 'P': return MAX_NAME + MAX_QUERY + 2;
    case 'B': return 2 * MAX_NAME + 2;
    case 'E': return MAX_NAME + 5;
    case 'D': case 'C': return MAX_NAME + 2;
    default: return 0;
    }
}

/* _cstr_end_view: just past the NUL at or after off within [off, end), or -1. */
static Py_ssize_t cstr_end(const unsigned char *b, Py_ssize_t off, Py_ssize_t end) {
    if (off >= end)
        return -1;
    const unsigned char *z = memchr(b + off, 0, (size_t)(end - off));
    return z == NULL ? -1 : (Py_ssize_t)(z - b) + 1;
}

/* Frame a segment: every header of this side's types, length 4..MAX_MESSAGE_LEN, the last
 * message ending at n. Returns the number of messages (counting only the wanted ones into
 * *kept), or -1 when feed_whole's framing loop would decline. */
static Py_ssize_t frame(const unsigned char *b, Py_ssize_t *np, const unsigned char *types, int client,
                        int partial, Py_ssize_t *kept) {
    Py_ssize_t n = *np, pos = 0, count = 0, k = 0;
    unsigned char prev = 0;
    while (pos < n) {
        unsigned char t;
        long ln = 0;
        if (n - pos < 5 || !types[t = b[pos]] || (ln = be32(b + pos + 1)) < 4 || ln > MAX_MESSAGE_LEN
                || (Py_ssize_t)ln > n - pos - 1) {
            if (!partial)
                return -1;
            *np = pos;  /* the whole messages before it: the Python loop takes it from here */
            break;
        }
        pos += ln + 1;
        count++;
        if (client) {
            if (!(t == 'H' || t == 'X' || t == 'd' || t == 'c' || t == 'f' || t == 'p'))
                k++;
        } else if (t == 'E') {
            k += 3;
        } else if (t == 'D') {
            if (prev != 'D')
                k++;
        } else if (!SERVER_SKIP[t]) {
            k++;
        }
        prev = t;
    }
    *kept = k;
    return count;
}

static PyObject *name_bytes(const unsigned char *b, Py_ssize_t s, Py_ssize_t e) {
    if (e <= s) {
        Py_INCREF(EMPTY);
        return EMPTY;
    }
    return PyBytes_FromStringAndSize((const char *)b + s, e - s);
}

/* sql.decode_query of b[s:e]: the text cut at max_query bytes, broken UTF-8 replaced. Decoded
 * here, not sliced and decoded in Python: a memoryview slice and a call a query. */
static PyObject *query_text(const unsigned char *b, Py_ssize_t s, Py_ssize_t e) {
    Py_ssize_t n = e - s;
    if (n > MAX_QUERY)
        n = MAX_QUERY;
    return PyUnicode_DecodeUTF8((const char *)b + s, n > 0 ? n : 0, "replace");
}

/* postgresql._error_fields_view of b[off:end]: SQLSTATE and message as str into *code and *msg
 * (new references; 0, or -1 with an error set), the last 'C' and 'M' fields winning, the code
 * cut at 5 bytes (ASCII, else replaced), the message UTF-8 (replaced). In C because the Python
 * reader's loop, slices and decodes cost more than the rest of an error's span. */
static int error_fields(const unsigned char *b, Py_ssize_t off, Py_ssize_t end, PyObject **code, PyObject **msg) {
    Py_ssize_t p = off, cs = 0, ce = 0, ms = 0, me = 0;
    while (p < end) {
        unsigned char c = b[p];
        if (c == 0)
            break;
        Py_ssize_t z = cstr_end(b, p + 1, end);
        Py_ssize_t stop = z > 0 ? z - 1 : end;
        if (c == 'C') {
            cs = p + 1;
            ce = cs + (stop - cs < 5 ? stop - cs : 5);
        } else if (c == 'M') {
            ms = p + 1;
            me = stop;
        }
        if (z < 0)
            break;
        p = z;
    }
    *code = PyUnicode_DecodeASCII((const char *)b + cs, ce - cs, "replace");
    if (*code == NULL)
        return -1;
    *msg = PyUnicode_DecodeUTF8((const char *)b + ms, me - ms, "replace");
    if (*msg == NULL) {
        Py_CLEAR(*code);
        return -1;
    }
    return 0;
}

/* One client message's record (see the header), NULL with no error set to decline. */
static PyObject *client_rec(const unsigned char *b, unsigned char t, Py_ssize_t off, Py_ssize_t end) {
    Py_ssize_t p, q, z;
    PyObject *a, *c;
    switch (t) {
    case 'Q':
        z = cstr_end(b, off, end);
        c = query_text(b, off, z > 0 ? z - 1 : end);
        if (c == NULL)
            return NULL;
        return Py_BuildValue("(iN)", 81, c);
    case 'P':
        p = cstr_end(b, off, end);
        if (p < 0)
            return NULL;
        z = cstr_end(b, p, end);
        a = name_bytes(b, off, off + (p - 1 - off < MAX_NAME ? p - 1 - off : MAX_NAME));
        if (a == NULL)
            return NULL;
        c = query_text(b, p, z > 0 ? z - 1 : end);
        if (c == NULL) {
            Py_DECREF(a);
            return NULL;
        }
        return Py_BuildValue("(iNN)", 80, a, c);
    case 'B':
        p = cstr_end(b, off, end);
        if (p < 0)
            return NULL;
        q = cstr_end(b, p, end);
        if (q < 0)
            return NULL;
        a = name_bytes(b, off, p - 1);
        if (a == NULL)
            return NULL;
        c = name_bytes(b, p, q - 1);
        if (c == NULL) {
            Py_DECREF(a);
            return NULL;
        }
        return Py_BuildValue("(iNN)", 66, a, c);
    case 'E':
        p = cstr_end(b, off, end);
        a = name_bytes(b, off, p > 0 ? p - 1 : end);
        if (a == NULL)
            return NULL;
        return Py_BuildValue("(iN)", 69, a);
    case 'C':
        p = cstr_end(b, off + 1, end);
        if (p > 0) {
            a = name_bytes(b, off + 1, p - 1);
            if (a == NULL)
                return NULL;
        } else {
            Py_INCREF(Py_None);
            a = Py_None;
        }
        return Py_BuildValue("(iiN)", 67, end > off ? (int)b[off] : 0, a);
    case 'D':
        Py_INCREF(REC_D);
        return REC_D;
    case 'S':
        Py_INCREF(REC_S);
        return REC_S;
    case 'F':
        Py_INCREF(REC_F);
        return REC_F;
    default:
        return NULL;  /* not reached: frame() counted only the types above */
    }
}

static PyObject *walk(PyObject *const *args, Py_ssize_t nargs, int client) {
    Py_buffer view;
    int partial = 0;
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "expected (data[, partial])");
        return NULL;
    }
    if (nargs == 2 && (partial = PyObject_IsTrue(args[1])) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *b = view.buf;
    Py_ssize_t n = view.len, kept = 0;
    Py_ssize_t count = frame(b, &n, client ? CLIENT_T : SERVER_T, client, partial, &kept);
    if (count < 0) {
        PyBuffer_Release(&view);
        Py_RETURN_FALSE;
    }
    PyObject *out = PyTuple_New(kept);
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    Py_ssize_t pos = 0, i = 0;
    while (pos < n && i <= kept) {  /* frame() vouched for every header and length */
        unsigned char t = b[pos];
        Py_ssize_t ln = be32(b + pos + 1);
        Py_ssize_t off = pos + 5, body = ln - 4;
        PyObject *r = NULL;
        if (client) {
            if (t == 'H' || t == 'X' || t == 'd' || t == 'c' || t == 'f' || t == 'p') {
                pos += ln + 1;
                continue;
            }
            Py_ssize_t cap = client_cap(t);
            r = client_rec(b, t, off, off + (body < cap ? body : cap));
            if (r == NULL) {
                Py_DECREF(out);
                PyBuffer_Release(&view);
                if (PyErr_Occurred())
                    return NULL;
                Py_RETURN_NONE;
            }
        } else if (t == 'D') {
            Py_ssize_t k = 0;
            while (pos < n && b[pos] == 'D') {
                pos += be32(b + pos + 1) + 1;
                k++;
            }
            r = PyLong_FromSsize_t(-k);
            ln = -1;  /* pos already moved past the run */
        } else if (t == 'E') {
            Py_ssize_t cap = body < MAX_ERROR_HEAD ? body : MAX_ERROR_HEAD;
            PyObject *e = PyLong_FromLong('E'), *code = NULL, *msg = NULL;
            if (e == NULL || i + 3 > kept || error_fields(b, off, off + cap, &code, &msg) < 0) {
                Py_XDECREF(e);
                Py_DECREF(out);
                PyBuffer_Release(&view);
                return PyErr_Occurred() ? NULL : (Py_INCREF(Py_None), Py_None);
            }
            PyTuple_SET_ITEM(out, i++, e);
            PyTuple_SET_ITEM(out, i++, code);
            PyTuple_SET_ITEM(out, i++, msg);
            pos += ln + 1;
            continue;
        } else if (SERVER_SKIP[t]) {
            pos += ln + 1;
            continue;
        } else {
            r = PyLong_FromLong(t);
        }
        if (r == NULL || i >= kept) {
            Py_XDECREF(r);
            Py_DECREF(out);
            PyBuffer_Release(&view);
            return PyErr_Occurred() ? NULL : (Py_INCREF(Py_None), Py_None);
        }
        PyTuple_SET_ITEM(out, i++, r);
        if (ln >= 0)
            pos += ln + 1;
    }
    PyBuffer_Release(&view);
    if (i != kept) {  /* cannot happen: frame() counted what this loop emits */
        Py_DECREF(out);
        Py_RETURN_NONE;
    }
    if (partial)
        return Py_BuildValue("(nN)", n, out);
    return out;
}

static PyObject *client(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return walk(args, nargs, 1);
}

static PyObject *server(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return walk(args, nargs, 0);
}

/* -- detect and resync's chain (postgresql._chain over a buffer held in one view) ---------- */
#define DETECT_CHAIN 4
#define DETECT_MAX_LEN 65536

static unsigned char CLIENT_ONLY[256], SERVER_ONLY[256], CONTROL[256];

static void init_chain_tables(void) {
    const char *c = "QPBXpFf", *s = "RKZTI123ntsGWAvV";
    for (; *c; c++)
        CLIENT_ONLY[(unsigned char)*c] = 1;
    for (; *s; s++)
        SERVER_ONLY[(unsigned char)*s] = 1;
    for (int i = 0; i < 0x20; i++)
        CONTROL[i] = i != '\t' && i != '\n' && i != '\r';
}

static int be16(const unsigned char *p) { return (int)(int16_t)(((unsigned)p[0] << 8) | p[1]); }

/* _printable (nul=False): no control byte but tab, LF, CR in the first 64 bytes of [off, end). */
static int printable(const unsigned char *b, Py_ssize_t off, Py_ssize_t end) {
    Py_ssize_t n = end - off < 64 ? end - off : 64;
    for (Py_ssize_t i = 0; i < n; i++)
        if (CONTROL[b[off + i]])
            return 0;
    return 1;
}

/* _valid_body: is b[off:end] a well-formed body of a t message from this side? Every read is
 * within [off, end): the Python reads that may pass end (a T or D body under 2 bytes) end in
 * False there whatever they read, and so here. */
static int valid_body(const unsigned char *b, unsigned char t, Py_ssize_t off, Py_ssize_t end, int client) {
    Py_ssize_t ln = end - off, p, q;
    if (client) {
        switch (t) {
        case 'Q':
            return ln >= 1 && b[end - 1] == 0 && printable(b, off, end - 1);
        case 'P':
            p = cstr_end(b, off, end);
            q = p > 0 ? cstr_end(b, p, end) : -1;
            return q > 0 && q + 2 <= end && q + 2 + 4 * (Py_ssize_t)be16(b + q) == end && printable(b, p, q - 1);
        case 'B': {
            p = cstr_end(b, off, end);
            if (p < 0)
                return 0;
            p = cstr_end(b, p, end);
            if (p < 0 || p + 2 > end)
                return 0;
            int nf = be16(b + p);
            p += 2 + 2 * (Py_ssize_t)nf;
            if (nf < 0 || p + 2 > end)
                return 0;
            int npar = be16(b + p);
            p += 2;
            if (npar < 0)
                return 0;
            for (int i = 0; i < npar; i++) {
                if (p + 4 > end)
                    return 0;
                long vl = be32(b + p);
                p += 4 + (vl > 0 ? vl : 0);
                if (vl < -1 || p > end)
                    return 0;
            }
            if (p + 2 > end)
                return 0;
            return p + 2 + 2 * (Py_ssize_t)be16(b + p) == end;
        }
        case 'E':
            p = cstr_end(b, off, end);
            return p > 0 && p + 4 == end;
        case 'D': case 'C':
            return ln >= 2 && (b[off] == 'P' || b[off] == 'S') && cstr_end(b, off + 1, end) == end;
        case 'S': case 'H': case 'X': case 'c':
            return ln == 0;
        case 'f':
            return cstr_end(b, off, end) == end;
        default:
            return t == 'd' || t == 'p' || t == 'F';
        }
    }
    switch (t) {
    case 'R': {
        if (ln < 4)
            return 0;
        long code = be32(b + off);
        return code == 0 || code == 2 || code == 3 || code == 5 || (code >= 7 && code <= 12);
    }
    case 'S':
        p = cstr_end(b, off, end);
        return p > 0 && cstr_end(b, p, end) == end && printable(b, off, p - 1);
    case 'K':
        return 8 <= ln && ln <= 260;
    case 'Z':
        return ln == 1 && (b[off] == 'I' || b[off] == 'T' || b[off] == 'E');
    case 'T': case 'D': {
        if (ln < 2)
            return 0;
        int n = be16(b + off);
        p = off + 2;
        if (n < 0)
            return 0;
        for (int i = 0; i < n; i++) {
            if (t == 'T') {
                p = cstr_end(b, p, end);
                if (p < 0)
                    return 0;
                p += 18;
            } else {
                if (p + 4 > end)
                    return 0;
                long vl = be32(b + p);
                p += 4 + (vl > 0 ? vl : 0);
                if (vl < -1)
                    return 0;
            }
        }
        return p == end;
    }
    case 'C':
        return cstr_end(b, off, end) == end && printable(b, off, end - 1);
    case 'E': case 'N':
        p = off;
        while (p < end) {
            if (b[p] == 0)
                return p + 1 == end;
            p = cstr_end(b, p + 1, end);
            if (p < 0)
                return 0;
        }
        return 0;
    case 'I': case '1': case '2': case '3': case 'n': case 's': case 'c':
        return ln == 0;
    case 't':
        return ln >= 2 && off + 2 + 4 * (Py_ssize_t)be16(b + off) == end;
    case 'G': case 'H': case 'W':
        return ln >= 3 && b[off] <= 1 && off + 3 + 2 * (Py_ssize_t)be16(b + off + 1) == end;
    case 'A':
        p = cstr_end(b, off + 4, end);
        return p > 0 && cstr_end(b, p, end) == end;
    default:
        return t == 'd' || t == 'v' || t == 'V';
    }
}

/* _check_at: 1 a complete valid message at off, 0 invalid, -1 undecided. */
static int check_at(const unsigned char *b, Py_ssize_t n, Py_ssize_t off, int client) {
    if (off + 5 > n)
        return -1;
    unsigned char t = b[off];
    if (!(client ? CLIENT_T : SERVER_T)[t])
        return 0;
    long ln = be32(b + off + 1);
    if (ln < 4 || ln > DETECT_MAX_LEN)
        return 0;
    if (off + 1 + ln > n)
        return -1;
    return valid_body(b, t, off + 5, off + 1 + ln, client);
}

/* _chain: (verdict, saw a role-unique type) for up to DETECT_CHAIN messages from off. */
static int chain(const unsigned char *b, Py_ssize_t n, Py_ssize_t off, int client, int *unique) {
    const unsigned char *only = client ? CLIENT_ONLY : SERVER_ONLY;
    *unique = 0;
    for (int i = 0; i < DETECT_CHAIN; i++) {
        int r = check_at(b, n, off, client);
        if (r != 1) {
            if (r == -1 && off + 5 <= n && *unique)
                return 1;
            return r;
        }
        *unique = *unique || only[b[off]];
        off += 1 + be32(b + off + 1);
        if (off == n)
            return 1;
    }
    return 1;
}

/* boundary(data, client, limit) -> (off, first_undecided): _find_boundary's scan of a buffer
 * held in one view: the first off < limit where the chain holds (-1: none), and the first
 * off before it where it was undecided (-1: none). */
static PyObject *boundary(PyObject *self, PyObject *args) {
    Py_buffer view;
    int client;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "y*pn", &view, &client, &limit))
        return NULL;
    const unsigned char *b = view.buf;
    Py_ssize_t n = view.len, found = -1, undecided = -1;
    if (limit > n)
        limit = n;
    for (Py_ssize_t off = 0; off < limit; off++) {
        int unique;
        int r = chain(b, n, off, client, &unique);
        if (r == 1) {
            found = off;
            break;
        }
        if (r == -1 && undecided < 0)
            undecided = off;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(nn)", found, undecided);
}

/* chain_at(data, off, client) -> (verdict, unique): _chain itself, for the tests. */
static PyObject *chain_at(PyObject *self, PyObject *args) {
    Py_buffer view;
    int client;
    Py_ssize_t off;
    if (!PyArg_ParseTuple(args, "y*np", &view, &off, &client))
        return NULL;
    int unique = 0, r;
    if (off < 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "negative offset");
        return NULL;
    }
    r = chain(view.buf, view.len, off, client, &unique);  /* off past the end: -1, nothing read */
    PyBuffer_Release(&view);
    return Py_BuildValue("(iO)", r, unique ? Py_True : Py_False);
}

static PyObject *limits(PyObject *self, PyObject *args) {
    Py_ssize_t q, nm, eh;
    if (!PyArg_ParseTuple(args, "nnn", &q, &nm, &eh))
        return NULL;
    if (q < 0 || nm < 0 || eh < 0 || q > MAX_MESSAGE_LEN || nm > MAX_MESSAGE_LEN || eh > MAX_MESSAGE_LEN) {
        PyErr_SetString(PyExc_ValueError, "limits out of range");
        return NULL;
    }
    MAX_QUERY = q;
    MAX_NAME = nm;
    MAX_ERROR_HEAD = eh;
    Py_RETURN_NONE;
}

/* -- Op: postgresql._Op, a request waiting for its response ---------------------------------
 * The same seven attributes, read and written alike (kind, info, start as given; rows 0,
 * err_code and err_msg "", begun False), made by one C call: the Python class's __init__ is a
 * frame a message, as much as the rest of a Sync's handling. It holds only what it is given
 * (a statement's analysis, ints, strs), never a container of itself: no GC tracking. */
typedef struct {
    PyObject_HEAD
    PyObject *kind, *info, *start, *rows, *err_code, *err_msg, *begun;
} OpObject;

static PyObject *ZERO, *EMPTY_STR;

static PyObject *op_make(PyTypeObject *type, PyObject *kind, PyObject *info, PyObject *start) {
    OpObject *o = PyObject_New(OpObject, type);
    if (o == NULL)
        return NULL;
    Py_INCREF(kind);
    o->kind = kind;
    Py_INCREF(info);
    o->info = info;
    Py_INCREF(start);
    o->start = start;
    Py_INCREF(ZERO);
    o->rows = ZERO;
    Py_INCREF(EMPTY_STR);
    o->err_code = EMPTY_STR;
    Py_INCREF(EMPTY_STR);
    o->err_msg = EMPTY_STR;
    Py_INCREF(Py_False);
    o->begun = Py_False;
    return (PyObject *)o;
}

static PyObject *op_vectorcall(PyObject *type, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    if (PyVectorcall_NARGS(nargsf) != 3 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "Op(kind, info, start)");
        return NULL;
    }
    return op_make((PyTypeObject *)type, args[0], args[1], args[2]);
}

static PyObject *op_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *kind, *info, *start;
    if ((kwds != NULL && PyDict_GET_SIZE(kwds)) || !PyArg_UnpackTuple(args, "Op", 3, 3, &kind, &info, &start)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "Op(kind, info, start)");
        return NULL;
    }
    return op_make(type, kind, info, start);
}

static void op_dealloc(OpObject *o) {
    Py_XDECREF(o->kind);
    Py_XDECREF(o->info);
    Py_XDECREF(o->start);
    Py_XDECREF(o->rows);
    Py_XDECREF(o->err_code);
    Py_XDECREF(o->err_msg);
    Py_XDECREF(o->begun);
    Py_TYPE(o)->tp_free((PyObject *)o);
}

/* T_OBJECT_EX: deleting one leaves it unset (AttributeError on reading), as a slot does. */
static PyMemberDef op_members[] = {
    {"kind", T_OBJECT_EX, offsetof(OpObject, kind), 0, NULL},
    {"info", T_OBJECT_EX, offsetof(OpObject, info), 0, NULL},
    {"start", T_OBJECT_EX, offsetof(OpObject, start), 0, NULL},
    {"rows", T_OBJECT_EX, offsetof(OpObject, rows), 0, NULL},
    {"err_code", T_OBJECT_EX, offsetof(OpObject, err_code), 0, NULL},
    {"err_msg", T_OBJECT_EX, offsetof(OpObject, err_msg), 0, NULL},
    {"begun", T_OBJECT_EX, offsetof(OpObject, begun), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject OpType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "processors.protocols._pgwire.Op",
    .tp_basicsize = sizeof(OpObject),
    .tp_dealloc = (destructor)op_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Op(kind, info, start): postgresql._Op in C (see there).",
    .tp_members = op_members,
    .tp_new = op_new,
    .tp_vectorcall = op_vectorcall,
};

static PyMethodDef methods[] = {
    {"client", (PyCFunction)(void (*)(void))client, METH_FASTCALL,
     "client(data[, partial]): a client segment's records (see the header), False or None."},
    {"server", (PyCFunction)(void (*)(void))server, METH_FASTCALL,
     "server(data[, partial]): a server segment's events (see the header), False or None."},
    {"boundary", boundary, METH_VARARGS, "boundary(data, client, limit): _find_boundary's scan, (off, undecided)."},
    {"chain_at", chain_at, METH_VARARGS, "chain_at(data, off, client): _chain's (verdict, unique)."},
    {"limits", limits, METH_VARARGS, "Set the body caps: (max_query_bytes, max_name, max_error_head)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pgwire", "PostgreSQL segment walking accelerator (see postgresql.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__pgwire(void) {
    init_tables();
    init_chain_tables();
    REC_D = Py_BuildValue("(i)", 'D');
    REC_S = Py_BuildValue("(i)", 'S');
    REC_F = Py_BuildValue("(i)", 'F');
    EMPTY = PyBytes_FromStringAndSize(NULL, 0);
    ZERO = PyLong_FromLong(0);
    EMPTY_STR = PyUnicode_FromString("");
    if (REC_D == NULL || REC_S == NULL || REC_F == NULL || EMPTY == NULL || ZERO == NULL || EMPTY_STR == NULL)
        return NULL;
    if (PyType_Ready(&OpType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&OpType);
    if (PyModule_AddObject(m, "Op", (PyObject *)&OpType) < 0) {
        Py_DECREF(&OpType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
