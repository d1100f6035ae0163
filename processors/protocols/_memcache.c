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
 * And the text protocol's (memcached.py's ``_text_walk`` the reference):
 *   text_walk(data, from_client, skip) -> (list, int) | None
 * ``skip`` data bytes first (a block begun in an earlier segment), then each line up to its
 * CRLF (found within MAX_LINE + 2 bytes), read from its first MAX_TEXT_LINE bytes as
 * ``_text_command`` (from the client) or ``_text_reply_line`` reads it, and the data block
 * it announces stepped over; the result is the items those give (a command's (name, key,
 * get family, noreply) tuple; a reply's int code or error text; nothing for a blank
 * command line or a STAT line) and the block bytes left past the segment. None for a line
 * cut short or over-long, anything the Python readers would raise on, and anything odd
 * they read without raising (a meta block length past 2**40, a skip that is no C long):
 * the Python walk then decides, so any non-None result equals ``_text_walk``'s.
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
#include <string.h>

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

/* -- the text protocol ------------------------------------------------------------------ */

/* memcached.py's MAX_LINE and MAX_TEXT_LINE. */
#define MAX_LINE 8192
#define MAX_TEXT_LINE 512
/* A meta (ms, VA) block length beyond this is left to Python (it reads any length). */
#define MAX_META_BLOCK ((long long)1 << 40)
/* Whitespace bytes.split() splits on (Py_ISSPACE). */
#define IS_SPACE(c) ((c) == ' ' || (c) == '\t' || (c) == '\n' || (c) == '\r' || (c) == '\v' || (c) == '\f')
/* A MAX_TEXT_LINE-byte line has at most this many words. */
#define MAX_WORDS (MAX_TEXT_LINE / 2 + 1)

/* memcached.py _TEXT_CMDS; the flags say what _text_command does with each. */
enum { STORAGE = 1, GETF = 2, GAT = 4, NOKEY = 8, META = 16 /* ms: a data block after its length */ };
static const struct {
    const char *word;
    int flags;
} text_cmds[] = {
    {"set", STORAGE}, {"add", STORAGE}, {"replace", STORAGE}, {"append", STORAGE}, {"prepend", STORAGE},
    {"cas", STORAGE}, {"get", GETF}, {"gets", GETF}, {"gat", GETF | GAT}, {"gats", GETF | GAT}, {"mg", GETF},
    {"incr", 0}, {"decr", 0}, {"delete", 0}, {"touch", 0}, {"version", NOKEY}, {"stats", NOKEY},
    {"flush_all", NOKEY}, {"verbosity", NOKEY}, {"quit", 0}, {"ms", META}, {"md", 0}, {"ma", 0}, {"mn", 0},
    {"me", 0}, {"cache_memlimit", 0}, {"shutdown", 0}, {"lru_crawler", 0}, {"slabs", 0}, {"watch", 0},
};
#define N_CMDS ((int)(sizeof(text_cmds) / sizeof(text_cmds[0])))
#define LONGEST_CMD 14
/* Each command word as a str (the name a command sent in lower case gets: equal to its
 * decoding, made once). Immutable after module init. */
static PyObject *cmd_names[N_CMDS];

/* memcached.py _REPLY_CODES (the words that end a command) and memcached.py _HD. */
#define HD_CODE 0x100
static const struct {
    const char *word;
    int code;
} reply_codes[] = {
    {"STORED", 0}, {"DELETED", 0}, {"TOUCHED", 0}, {"OK", 0}, {"MN", 0}, {"RESET", 0}, {"END", 0},
    {"VERSION", 0}, {"HD", HD_CODE}, {"NOT_FOUND", 1}, {"NF", 1}, {"EN", 1}, {"EXISTS", 2}, {"EX", 2},
    {"NOT_STORED", 5}, {"NS", 5},
};
#define N_CODES ((int)(sizeof(reply_codes) / sizeof(reply_codes[0])))

typedef struct {
    const unsigned char *s;
    Py_ssize_t n;
} word_t;

static int word_is(word_t w, const char *lit) {
    size_t l = strlen(lit);
    return (size_t)w.n == l && memcmp(w.s, lit, l) == 0;
}

/* bytes.split(): the whitespace-separated words of s[0:n] (n <= MAX_TEXT_LINE). */
static int split_words(const unsigned char *s, Py_ssize_t n, word_t *out) {
    int k = 0;
    Py_ssize_t i = 0;
    while (i < n) {
        while (i < n && IS_SPACE(s[i]))
            i++;
        if (i >= n)
            break;
        Py_ssize_t j = i;
        while (j < n && !IS_SPACE(s[j]))
            j++;
        out[k].s = s + i;
        out[k].n = j - i;
        k++;
        i = j;
    }
    return k;
}

/* bytes.isdigit(): ASCII digits, at least one. */
static int all_digits(word_t w) {
    if (w.n == 0)
        return 0;
    for (Py_ssize_t i = 0; i < w.n; i++)
        if (w.s[i] < '0' || w.s[i] > '9')
            return 0;
    return 1;
}

/* bytes.isdigit() and int() of it, into *v; -1 when not all digits (or none), or when the
 * value passes `max` (then the caller declines). */
static int digits(word_t w, long long max, long long *v) {
    if (w.n == 0)
        return -1;
    long long x = 0;
    for (Py_ssize_t i = 0; i < w.n; i++) {
        unsigned c = w.s[i];
        if (c < '0' || c > '9')
            return -1;
        x = x * 10 + (c - '0');
        if (x > max)
            return -1;
    }
    *v = x;
    return 0;
}

/* _text_command on s[0:n]: 1 with *item (NULL for a blank line) and *blk set, 0 to
 * decline, -1 with an exception set. */
static int text_command(const unsigned char *s, Py_ssize_t n, PyObject **item, long long *blk) {
    word_t w[MAX_WORDS];
    int k = split_words(s, n, w);
    *item = NULL;
    *blk = 0;
    if (k == 0)
        return 1;
    if (w[0].n > LONGEST_CMD)
        return 0; /* no command: Python raises unknown_command */
    char low[LONGEST_CMD + 1];
    for (Py_ssize_t i = 0; i < w[0].n; i++) {
        unsigned c = w[0].s[i];
        low[i] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
    }
    word_t lw = {(const unsigned char *)low, w[0].n};
    int ci = -1;
    for (int i = 0; i < N_CMDS; i++)
        if (word_is(lw, text_cmds[i].word)) {
            ci = i;
            break;
        }
    if (ci < 0)
        return 0;
    int flags = text_cmds[ci].flags;
    int ki = (flags & GAT) ? 2 : 1;
    long long v;
    if (flags & STORAGE) {
        if (k < 5 || digits(w[4], (long long)MAX_BODY, &v) < 0)
            return 0; /* bad_storage_command, or body_too_large past MAX_BODY */
        if (v + 2 > (long long)MAX_BODY)
            return 0;
        *blk = v + 2;
    } else if ((flags & META) && k > 2 && all_digits(w[2])) {
        if (digits(w[2], MAX_META_BLOCK, &v) < 0)
            return 0; /* a length past MAX_META_BLOCK: Python decides */
        *blk = v + 2;
    }
    int noreply = 0;
    for (int i = 2; i < k && !noreply; i++)
        if (word_is(w[i], "noreply") || (low[0] == 'm' && word_is(w[i], "q")))
            noreply = 1;
    PyObject *name;
    if (word_is(w[0], text_cmds[ci].word)) {
        name = cmd_names[ci];
        Py_INCREF(name);
    } else {
        name = PyUnicode_DecodeASCII((const char *)w[0].s, w[0].n, "replace");
        if (name == NULL)
            return -1;
    }
    PyObject *key = (k > ki && !(flags & NOKEY)) ? PyUnicode_DecodeUTF8((const char *)w[ki].s, w[ki].n, "replace")
                                                  : PyUnicode_FromStringAndSize("", 0);
    if (key == NULL) {
        Py_DECREF(name);
        return -1;
    }
    PyObject *t = PyTuple_New(4);
    if (t == NULL) {
        Py_DECREF(name);
        Py_DECREF(key);
        return -1;
    }
    PyObject *gf = (flags & GETF) ? Py_True : Py_False, *nr = noreply ? Py_True : Py_False;
    Py_INCREF(gf);
    Py_INCREF(nr);
    PyTuple_SET_ITEM(t, 0, name);
    PyTuple_SET_ITEM(t, 1, key);
    PyTuple_SET_ITEM(t, 2, gf);
    PyTuple_SET_ITEM(t, 3, nr);
    *item = t;
    return 1;
}

/* _text_reply_line on s[0:n]: as text_command. */
static int text_reply(const unsigned char *s, Py_ssize_t n, PyObject **item, long long *blk) {
    *item = NULL;
    *blk = 0;
    const unsigned char *sp = memchr(s, ' ', (size_t)n);
    word_t word = {s, sp ? sp - s : n};
    long long v;
    if (word_is(word, "VALUE")) {
        word_t w[MAX_WORDS];
        int k = split_words(s, n, w);
        if (k < 4 || digits(w[3], (long long)MAX_BODY, &v) < 0 || v + 2 > (long long)MAX_BODY)
            return 0; /* bad_value_line, body_too_large */
        *blk = v + 2;
        *item = PyLong_FromLong(-1);
        return *item ? 1 : -1;
    }
    if (word_is(word, "STAT"))
        return 1;
    if (word_is(word, "VA")) {
        word_t w[MAX_WORDS];
        int k = split_words(s, n, w);
        if (k > 1 && all_digits(w[1])) {
            if (digits(w[1], MAX_META_BLOCK, &v) < 0)
                return 0; /* a length past MAX_META_BLOCK: Python decides */
            *blk = v + 2;
            *item = PyLong_FromLong(-1);
            return *item ? 1 : -1;
        }
        return 0; /* VA without a length: Python raises unknown_reply */
    }
    if (word_is(word, "ERROR") || word_is(word, "CLIENT_ERROR") || word_is(word, "SERVER_ERROR")) {
        PyObject *text = PyUnicode_DecodeUTF8((const char *)s, n, "replace");
        if (text == NULL)
            return -1;
        if (PyUnicode_GET_LENGTH(text) > 256) {
            PyObject *cut = PyUnicode_Substring(text, 0, 256);
            Py_DECREF(text);
            if (cut == NULL)
                return -1;
            text = cut;
        }
        *item = text;
        return 1;
    }
    for (int i = 0; i < N_CODES; i++)
        if (word_is(word, reply_codes[i].word)) {
            *item = PyLong_FromLong(reply_codes[i].code);
            return *item ? 1 : -1;
        }
    if (all_digits(word)) {
        *item = PyLong_FromLong(0); /* a number: incr/decr's answer */
        return *item ? 1 : -1;
    }
    return 0; /* unknown_reply */
}

/* The first CRLF in p[from:limit) (both bytes inside), or -1. */
static Py_ssize_t find_crlf(const unsigned char *p, Py_ssize_t from, Py_ssize_t limit) {
    Py_ssize_t i = from;
    while (i + 1 < limit) {
        const unsigned char *r = memchr(p + i, '\r', (size_t)(limit - 1 - i));
        if (r == NULL)
            return -1;
        i = r - p;
        if (p[i + 1] == '\n')
            return i;
        i++;
    }
    return -1;
}

static PyObject *text_walk(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "text_walk(data, from_client, skip)");
        return NULL;
    }
    int from_client = PyObject_IsTrue(args[1]);
    if (from_client < 0)
        return NULL;
    int overflow = 0;
    long long skip = PyLong_AsLongLongAndOverflow(args[2], &overflow);
    if (skip == -1 && PyErr_Occurred())
        return NULL;
    if (overflow || skip < 0)
        Py_RETURN_NONE; /* a skip no C long holds: Python decides */
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear(); /* not a simple buffer: the Python path decides */
        Py_RETURN_NONE;
    }
    const unsigned char *d = (const unsigned char *)view.buf;
    Py_ssize_t n = view.len;
    PyObject *items = PyList_New(0);
    if (items == NULL)
        goto fail;
    long long p = skip;
    while (p < n) {
        Py_ssize_t at = (Py_ssize_t)p;
        Py_ssize_t limit = n - at > MAX_LINE + 2 ? at + MAX_LINE + 2 : n;
        Py_ssize_t e = find_crlf(d, at, limit);
        if (e < 0)
            goto decline;
        Py_ssize_t len = e - at < MAX_TEXT_LINE ? e - at : MAX_TEXT_LINE;
        PyObject *item;
        long long blk;
        int r = from_client ? text_command(d + at, len, &item, &blk) : text_reply(d + at, len, &item, &blk);
        if (r < 0)
            goto fail;
        if (r == 0)
            goto decline;
        if (item != NULL) {
            int bad = PyList_Append(items, item);
            Py_DECREF(item);
            if (bad < 0)
                goto fail;
        }
        p = (long long)e + 2 + blk; /* blk <= 2**40 + 2: no overflow */
    }
    PyBuffer_Release(&view);
    PyObject *left = PyLong_FromLongLong(p - n);
    if (left == NULL) {
        Py_DECREF(items);
        return NULL;
    }
    PyObject *out = PyTuple_New(2);
    if (out == NULL) {
        Py_DECREF(items);
        Py_DECREF(left);
        return NULL;
    }
    PyTuple_SET_ITEM(out, 0, items);
    PyTuple_SET_ITEM(out, 1, left);
    return out;
decline:
    PyBuffer_Release(&view);
    Py_DECREF(items);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&view);
    Py_XDECREF(items);
    return NULL;
}

static PyMethodDef methods[] = {
    {"walk", (PyCFunction)(void (*)(void))walk, METH_FASTCALL,
     "walk(data, from_client, collections) -> tuple | None: a segment's whole binary packets as\n"
     "(op, key offset, key length, status, opaque) tuples, or None to leave it to the Python walk."},
    {"text_walk", (PyCFunction)(void (*)(void))text_walk, METH_FASTCALL,
     "text_walk(data, from_client, skip) -> (list, int) | None: a text segment's command or reply\n"
     "items and the data bytes left to skip, as memcached.py's _text_walk, or None to leave it to it."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_memcache", "memcached binary segment walker (see memcached.py feed_whole).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__memcache(void) {
    for (int i = 0; i < N_CMDS; i++)
        if (cmd_names[i] == NULL && (cmd_names[i] = PyUnicode_InternFromString(text_cmds[i].word)) == NULL)
            return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "MAX_KEY", MAX_KEY) < 0 || PyModule_AddIntConstant(m, "MAX_BODY", MAX_BODY) < 0 ||
        PyModule_AddIntConstant(m, "MAX_PACKETS", MAX_PACKETS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_LINE", MAX_LINE) < 0 ||
        PyModule_AddIntConstant(m, "MAX_TEXT_LINE", MAX_TEXT_LINE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
