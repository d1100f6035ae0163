/* processors.protocols._http1: the HTTP/1 head parser's common case in C.
 *
 * Contract (http1.py stays the reference and the fallback):
 *   parse_request(data, max_headers)         -> tuple | None
 *   parse_response(data, max_headers, limit) -> tuple | None
 * Each validates exactly what http1.py's whole-head regexes accept at the start of
 * ``data`` (request line / status line, at most ``max_headers`` field lines
 * ``tchar+ ":" [\t\x20-\x7e\x80-\xff]* CRLF``, the empty line) and extracts exactly
 * what http1._fields extracts. None means "not accepted here": a malformed or
 * incomplete head, too many fields, a bad or conflicting Content-Length; the
 * Python path then runs and classifies the case as it always has. So this file
 * never reproduces an error reason, and any non-None result equals Python's.
 *
 * Request tuple:  (end, method, method_original, target, version, length, te, chunked,
 *                  upgrade, host, user_agent, traceparent, path, query)
 *   method: the semconv method str ("GET", ...) or "_OTHER" (+ method_original str);
 *   target, upgrade (lower-cased first token), host, user_agent, traceparent: bytes
 *   or None; version "1.1" / "1.0"; length -1 when absent; path/query: url.path and
 *   the raw url.query as str (UTF-8, errors replaced) for an origin-form target,
 *   else None (the span builder then works from ``target``).
 * Response tuple: (end, status, version, length, te, chunked, upgrade)
 *   chunked_body(data, start, max_trailer) -> (end, size) | None
 * walks a whole chunked body as _Body._chunked does (None: incomplete, or anything
 * the Python walker would count as an error, or merely unusual: a long line).
 *
 * Memory: reads are bounds-checked against the buffer's length; the only
 * allocations are the few small result objects. No mutable global state: the
 * module holds only constant strs made at import.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* RFC 9110 5.6.2 tchar. */
static unsigned char TCHAR[256];
/* Field value bytes the head regex accepts: HTAB, SP..~, obs-text. */
static unsigned char VCHAR[256];
/* Request-target bytes: anything but CTLs, SP and DEL. */
static unsigned char TARGET[256];
/* Hex digits of a chunk size. */
static unsigned char HEX[256];

static PyObject *S_V11, *S_V10, *S_OTHER;
#define N_METHODS 10
static const char *METHOD_NAMES[N_METHODS] = {
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY"};
static PyObject *METHODS[N_METHODS];

static void init_tables(void) {
    const char *extra = "!#$%&'*+-.^_`|~";
    for (int c = 0; c < 256; c++) {
        TCHAR[c] = (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
        VCHAR[c] = c == '\t' || (c >= 0x20 && c != 0x7f);
        TARGET[c] = c > 0x20 && c != 0x7f;
        HEX[c] = (c >= '0' && c <= '9') || (c >= 'A' && c <= 'F') || (c >= 'a' && c <= 'f');
    }
    for (const char *p = extra; *p; p++)
        TCHAR[(unsigned char)*p] = 1;
}

/* Case-insensitive (ASCII) compare of p[0:n] with the lower-case ``lit``. */
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

static int is_ows(unsigned char c) { return c == ' ' || c == '\t'; }

/* What _fields extracts, as offsets (values made into objects only at the end). */
typedef struct {
    long long length;         /* -1: no Content-Length */
    int te, chunked;
    Py_ssize_t up_s, up_e;    /* upgrade token, -1: none */
    Py_ssize_t host_s, host_e, ua_s, ua_e, tp_s, tp_e;
} fields_t;

/* Content-Length value p[s:e] (already trimmed): 1-18 digit parts split by ",", each
 * trimmed, all equal to each other and to any earlier value. 0 on any violation. */
static int content_length(const unsigned char *p, Py_ssize_t s, Py_ssize_t e, long long *length) {
    Py_ssize_t i = s;
    for (;;) {
        Py_ssize_t ps = i;
        while (i < e && p[i] != ',')
            i++;
        Py_ssize_t pe = i;
        /* bytes.strip(): in a validated value the only ASCII whitespace is SP and HTAB */
        while (ps < pe && is_ows(p[ps]))
            ps++;
        while (pe > ps && is_ows(p[pe - 1]))
            pe--;
        if (pe == ps || pe - ps > 18)
            return 0;
        long long n = 0;
        for (Py_ssize_t k = ps; k < pe; k++) {
            if (p[k] < '0' || p[k] > '9')
                return 0;
            n = n * 10 + (p[k] - '0');
        }
        if (*length >= 0 && n != *length)
            return 0;
        *length = n;
        if (i >= e)
            return 1;
        i++; /* past the comma */
    }
}

/* Field lines from p[i] to the empty line. Returns the offset past the head's final
 * CRLF, or -1 when the block is not accepted (or a field is bad: Python decides). */
static Py_ssize_t parse_fields(const unsigned char *p, Py_ssize_t i, Py_ssize_t n, Py_ssize_t max_headers,
                               fields_t *f) {
    Py_ssize_t count = 0;
    f->length = -1;
    f->te = f->chunked = 0;
    f->up_s = f->host_s = f->ua_s = f->tp_s = -1;
    f->up_e = f->host_e = f->ua_e = f->tp_e = -1;
    for (;;) {
        if (i + 1 < n && p[i] == '\r' && p[i + 1] == '\n')
            return i + 2;
        if (count >= max_headers)
            return -1;
        Py_ssize_t ns = i;
        while (i < n && TCHAR[p[i]])
            i++;
        if (i == ns || i >= n || p[i] != ':')
            return -1;
        Py_ssize_t nlen = i - ns;
        i++;
        Py_ssize_t vs = i;
        while (i < n && VCHAR[p[i]])
            i++;
        if (i + 1 >= n || p[i] != '\r' || p[i + 1] != '\n')
            return -1;
        Py_ssize_t ve = i;
        i += 2;
        count++;
        const unsigned char *name = p + ns;
        int which;
        switch (nlen) {
        case 4: which = ieq(name, "host", 4) ? 1 : 0; break;
        case 7: which = ieq(name, "upgrade", 7) ? 2 : 0; break;
        case 10: which = ieq(name, "user-agent", 10) ? 3 : 0; break;
        case 11: which = ieq(name, "traceparent", 11) ? 4 : 0; break;
        case 14: which = ieq(name, "content-length", 14) ? 5 : 0; break;
        case 17: which = ieq(name, "transfer-encoding", 17) ? 6 : 0; break;
        default: which = 0;
        }
        if (!which)
            continue;
        /* OWS on both sides: the regex's [ \t]* before the value, then rstrip(b" \t"). */
        while (vs < ve && is_ows(p[vs]))
            vs++;
        while (ve > vs && is_ows(p[ve - 1]))
            ve--;
        switch (which) {
        case 1: f->host_s = vs; f->host_e = ve; break;
        case 3: f->ua_s = vs; f->ua_e = ve; break;
        case 4: f->tp_s = vs; f->tp_e = ve; break;
        case 5:
            if (!content_length(p, vs, ve, &f->length))
                return -1;
            break;
        case 6: {
            /* rsplit(b",", 1)[-1].strip().lower() == b"chunked" */
            Py_ssize_t s = ve;
            while (s > vs && p[s - 1] != ',')
                s--;
            Py_ssize_t e = ve;
            while (s < e && is_ows(p[s]))
                s++;
            while (e > s && is_ows(p[e - 1]))
                e--;
            f->te = 1;
            f->chunked = e - s == 7 && ieq(p + s, "chunked", 7);
            break;
        }
        case 2: {
            /* split(b",", 1)[0].strip().lower() */
            Py_ssize_t e = vs;
            while (e < ve && p[e] != ',')
                e++;
            Py_ssize_t s = vs;
            while (s < e && is_ows(p[s]))
                s++;
            while (e > s && is_ows(p[e - 1]))
                e--;
            f->up_s = s;
            f->up_e = e;
            break;
        }
        }
    }
}

static PyObject *bytes_or_none(const unsigned char *p, Py_ssize_t s, Py_ssize_t e) {
    if (s < 0)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)p + s, e - s);
}

static PyObject *lower_bytes_or_none(const unsigned char *p, Py_ssize_t s, Py_ssize_t e) {
    if (s < 0)
        Py_RETURN_NONE;
    PyObject *b = PyBytes_FromStringAndSize(NULL, e - s);
    if (b == NULL)
        return NULL;
    char *d = PyBytes_AS_STRING(b);
    for (Py_ssize_t k = s; k < e; k++) {
        unsigned char c = p[k];
        d[k - s] = (char)((c >= 'A' && c <= 'Z') ? (c | 0x20) : c);
    }
    return b;
}

/* Fill ``t`` from index ``at`` with new references; on failure the tuple owns what was set. */
/* A new tuple holding ``items`` (references stolen), or NULL with the error set when
 * the tuple or any item (NULL: its constructor failed) could not be made. */
static PyObject *tuple_of(PyObject **items, Py_ssize_t k) {
    PyObject *t = PyTuple_New(k);
    int ok = t != NULL;
    for (Py_ssize_t j = 0; j < k; j++) {
        if (items[j] == NULL)
            ok = 0;
        if (t != NULL)
            PyTuple_SET_ITEM(t, j, items[j]); /* NULL slots are fine for Py_DECREF(tuple) */
        else
            Py_XDECREF(items[j]);
    }
    if (!ok)
        Py_CLEAR(t);
    return t;
}

static int get_buffer(PyObject *obj, Py_buffer *view) {
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear(); /* not a simple buffer: the Python path decides */
        return 0;
    }
    return 1;
}

static PyObject *parse_request(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "parse_request(data, max_headers)");
        return NULL;
    }
    Py_ssize_t max_headers = PyLong_AsSsize_t(args[1]);
    if (max_headers == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (!get_buffer(args[0], &view))
        Py_RETURN_NONE;
    const unsigned char *p = view.buf;
    Py_ssize_t n = view.len;
    PyObject *result = NULL;

    /* request-line: method SP request-target SP HTTP/1.[01] CRLF */
    Py_ssize_t i = 0;
    while (i < n && i <= 32 && TCHAR[p[i]])
        i++;
    if (i == 0 || i > 32 || i >= n || p[i] != ' ')
        goto decline;
    Py_ssize_t mlen = i;
    Py_ssize_t ts = ++i;
    while (i < n && TARGET[p[i]])
        i++;
    if (i == ts || n - i < 11 || memcmp(p + i, " HTTP/1.", 8) != 0 || (p[i + 8] != '0' && p[i + 8] != '1') ||
        p[i + 9] != '\r' || p[i + 10] != '\n')
        goto decline;
    Py_ssize_t te_ = i;
    int minor1 = p[i + 8] == '1';
    fields_t f;
    Py_ssize_t end = parse_fields(p, i + 11, n, max_headers, &f);
    if (end < 0)
        goto decline;

    PyObject *method = NULL, *original = Py_None;
    for (int k = 0; k < N_METHODS; k++) {
        if ((Py_ssize_t)strlen(METHOD_NAMES[k]) == mlen && memcmp(p, METHOD_NAMES[k], mlen) == 0) {
            method = METHODS[k];
            break;
        }
    }
    if (method == NULL) {
        method = S_OTHER;
        original = PyUnicode_DecodeASCII((const char *)p, mlen, "replace"); /* tchars: ASCII */
    } else {
        Py_INCREF(original);
    }
    Py_INCREF(method);
    PyObject *path, *query;
    const unsigned char *tg = p + ts;
    Py_ssize_t tlen = te_ - ts;
    if (tg[0] == '/') { /* origin-form: url.path and the raw url.query, decoded as _span does */
        const unsigned char *q = memchr(tg, '?', tlen);
        if (q == NULL) {
            path = PyUnicode_DecodeUTF8((const char *)tg, tlen, "replace");
            query = Py_None;
            Py_INCREF(query);
        } else {
            path = PyUnicode_DecodeUTF8((const char *)tg, q - tg, "replace");
            query = PyUnicode_DecodeUTF8((const char *)q + 1, tlen - (q - tg) - 1, "replace");
        }
    } else {
        path = query = Py_None;
        Py_INCREF(path);
        Py_INCREF(query);
    }
    PyObject *items[14] = {
        PyLong_FromSsize_t(end),
        method,
        original,
        PyBytes_FromStringAndSize((const char *)tg, tlen),
        minor1 ? S_V11 : S_V10,
        PyLong_FromLongLong(f.length),
        PyBool_FromLong(f.te),
        PyBool_FromLong(f.chunked),
        lower_bytes_or_none(p, f.up_s, f.up_e),
        bytes_or_none(p, f.host_s, f.host_e),
        bytes_or_none(p, f.ua_s, f.ua_e),
        bytes_or_none(p, f.tp_s, f.tp_e),
        path,
        query,
    };
    Py_INCREF(items[4]);
    result = tuple_of(items, 14);
    goto done;
decline:
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&view);
    return result;
}

static PyObject *parse_response(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "parse_response(data, max_headers, limit)");
        return NULL;
    }
    Py_ssize_t max_headers = PyLong_AsSsize_t(args[1]);
    if (max_headers == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t limit = PyLong_AsSsize_t(args[2]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (!get_buffer(args[0], &view))
        Py_RETURN_NONE;
    const unsigned char *p = view.buf;
    Py_ssize_t n = view.len < limit ? view.len : limit; /* the regex's endpos */
    if (n < 0)
        n = 0;
    PyObject *result = NULL;

    /* status-line: HTTP/1.[01] SP 3DIGIT [ (SP / HTAB) reason ] CRLF */
    if (n < 14 || memcmp(p, "HTTP/1.", 7) != 0 || (p[7] != '0' && p[7] != '1') || p[8] != ' ')
        goto decline;
    for (int k = 9; k < 12; k++)
        if (p[k] < '0' || p[k] > '9')
            goto decline;
    int status = (p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0');
    Py_ssize_t i = 12;
    if (p[i] == ' ' || p[i] == '\t') {
        i++;
        while (i < n && VCHAR[p[i]])
            i++;
    }
    if (i + 1 >= n || p[i] != '\r' || p[i + 1] != '\n')
        goto decline;
    fields_t f;
    Py_ssize_t end = parse_fields(p, i + 2, n, max_headers, &f);
    if (end < 0)
        goto decline;
    PyObject *items[7] = {
        PyLong_FromSsize_t(end),
        PyLong_FromLong(status),
        p[7] == '1' ? S_V11 : S_V10,
        PyLong_FromLongLong(f.length),
        PyBool_FromLong(f.te),
        PyBool_FromLong(f.chunked),
        lower_bytes_or_none(p, f.up_s, f.up_e),
    };
    Py_INCREF(items[2]);
    result = tuple_of(items, 7);
    goto done;
decline:
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&view);
    return result;
}

/* Longest chunk-size or trailer line taken here; longer ones go to the Python path
 * (which allows MAX_CHUNK_LINE and counts the violations). */
#define C_MAX_CHUNK_LINE 1024

/* Offset of the CRLF ending the line at p[i], or -1 (none within C_MAX_CHUNK_LINE). */
static Py_ssize_t line_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t n) {
    Py_ssize_t stop = n - 1;
    if (stop > i + C_MAX_CHUNK_LINE)
        stop = i + C_MAX_CHUNK_LINE;
    for (Py_ssize_t j = i; j < stop; j++)
        if (p[j] == '\r' && p[j + 1] == '\n')
            return j;
    return -1;
}

/* chunked_body(data, start, max_trailer) -> (end, size) | None
 * A whole chunked body (RFC 9112 7.1) at data[start:], as _Body._chunked walks it:
 * chunk-size lines matching ``[0-9A-Fa-f]{1,16}[ \t]*(;[^\r\n]*)?``, data, CRLF, the
 * last chunk, trailer lines (at most max_trailer bytes) and the empty line. ``size``
 * is the sum of the chunk sizes. None when incomplete or anything is off. */
static PyObject *chunked_body(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "chunked_body(data, start, max_trailer)");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t max_trailer = PyLong_AsSsize_t(args[2]);
    if (max_trailer == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (!get_buffer(args[0], &view))
        Py_RETURN_NONE;
    const unsigned char *p = view.buf;
    Py_ssize_t n = view.len;
    unsigned long long total = 0;
    Py_ssize_t i = start;
    if (i < 0 || i > n)
        goto decline;
    for (;;) {
        Py_ssize_t e = line_end(p, i, n);
        if (e < 0)
            goto decline;
        Py_ssize_t k = i;
        unsigned long long size = 0;
        while (k < e && k - i < 16 && HEX[p[k]]) {
            unsigned char c = p[k];
            size = size * 16 + (unsigned long long)(c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10);
            k++;
        }
        if (k == i)
            goto decline;
        while (k < e && is_ows(p[k]))
            k++;
        if (k < e) {
            if (p[k] != ';')
                goto decline; /* also a 17th hex digit */
            for (; k < e; k++)
                if (p[k] == '\r' || p[k] == '\n')
                    goto decline;
        }
        i = e + 2;
        if (size == 0)
            break;
        if (size > (unsigned long long)(n - i) || n - i - (Py_ssize_t)size < 2)
            goto decline; /* incomplete here */
        i += (Py_ssize_t)size;
        if (p[i] != '\r' || p[i + 1] != '\n')
            goto decline;
        i += 2;
        total += size;
    }
    Py_ssize_t trailer = 0;
    for (;;) { /* trailer fields (never read), then the empty line */
        Py_ssize_t ls = i;
        Py_ssize_t e = line_end(p, i, n);
        if (e < 0)
            goto decline;
        trailer += e - ls + 2;
        if (trailer > max_trailer)
            goto decline;
        i = e + 2;
        if (e == ls)
            break;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(nK)", i, total);
decline:
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"parse_request", (PyCFunction)(void (*)(void))parse_request, METH_FASTCALL,
     "parse_request(data, max_headers) -> tuple | None: a whole request head at data's start."},
    {"parse_response", (PyCFunction)(void (*)(void))parse_response, METH_FASTCALL,
     "parse_response(data, max_headers, limit) -> tuple | None: a whole response head in data[:limit]."},
    {"chunked_body", (PyCFunction)(void (*)(void))chunked_body, METH_FASTCALL,
     "chunked_body(data, start, max_trailer) -> (end, size) | None: a whole chunked body at data[start:]."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_http1", "HTTP/1 head parsing accelerator (see http1.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__http1(void) {
    init_tables();
    if (S_V11 == NULL) {
        S_V11 = PyUnicode_InternFromString("1.1");
        S_V10 = PyUnicode_InternFromString("1.0");
        S_OTHER = PyUnicode_InternFromString("_OTHER");
        if (S_V11 == NULL || S_V10 == NULL || S_OTHER == NULL)
            return NULL;
        for (int k = 0; k < N_METHODS; k++) {
            METHODS[k] = PyUnicode_InternFromString(METHOD_NAMES[k]);
            if (METHODS[k] == NULL)
                return NULL;
        }
    }
    return PyModule_Create(&module);
}
