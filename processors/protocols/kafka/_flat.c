/* processors.protocols.kafka._flat: flat.py's Produce and Fetch request walk in C.
 *
 * Contract (flat.py stays the reference and the fallback):
 *   setup(FastTopic, FastTopic3, limits)   once, from flat.py at import
 *   request(view, scan_bytes, want_tp)     -> tuple | None
 *   metadata(view, version, flex, tags)    -> [(topic id, name), ...] | None
 *   clear_caches()                         empty the name caches (benchmarks, tests)
 *   cache_sizes()                          -> (topic names, client ids) cached
 * ``request`` parses a complete Produce or Fetch request (header, every topic and
 * partition; for Produce each partition's record count and the first record's
 * ``traceparent`` header), or any other request's header (all a request whose API
 * makes no span needs), exactly as flat.parse_request does, and returns
 *   (api_key, version, flex, corr, client_id, acks, scan_left, truncated, topics)
 * where topics is a list of FastTopic / FastTopic3 objects holding the same values
 * (and the same representations: a Fetch topic's fixed-stride partitions are the
 * same flat tuple) as flat.py builds (none for other APIs). None means "not handled
 * here": an unknown API key, anything flat.py would raise Malformed for (lengths out of bounds, a bad
 * topic name, a negative partition, a bad varint or tagged field, ...), a varint
 * wider than 64 bits, or a rare layout (the same topic twice). flat.py then runs
 * and decides as it always has, so this file never reproduces an error reason, and
 * every non-None result equals Python's (tests/test_kafka_fast.py holds them to it).
 *
 * Each step below mirrors flat.py's line by line: reads are checked against the
 * view's length exactly where Python's indexing or struct.unpack_from would raise,
 * and Python's explicit checks are repeated as written (including those against a
 * record's end rather than the view's). Memory: the view is held with
 * PyBUF_SIMPLE and released on every path; the only allocations are the result
 * objects; the only global mutable state is two bounded, direct-mapped caches of
 * validated topic names and client ids (a slot is replaced on collision).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#ifndef Py_T_OBJECT_EX
#define Py_T_OBJECT_EX T_OBJECT_EX
#endif
#ifndef Py_READONLY
#define Py_READONLY READONLY
#endif

/* Fixed part of a v2 record batch, and enough of any batch to tell its magic (records.py). */
#define BATCH_HEADER 61
#define BATCH_PREFIX 17
#define MAX_NAME 249    /* Kafka's Topic.MAX_NAME_LENGTH */
#define MAX_TAGS 64     /* flat._tags: more tagged fields than this is malformed */
/* Cache sizes (powers of two): names 1024 x at most 249 bytes, client ids 256 x 128. */
#define NAME_SLOTS 1024
#define CID_SLOTS 256
#define MAX_CACHED_CID 128

typedef Py_ssize_t ssize;

/* -- set up once from flat.py ----------------------------------------------------- */
static PyTypeObject *T_FAST, *T_FAST3;
/* Offsets of TopicData's object slots in an instance. */
static ssize OFF_P, OFF_NAME, OFF_RECORDS, OFF_TID, OFF_TP;
static int PRODUCE_MAX, PRODUCE_FLEX, FETCH_MAX, FETCH_FLEX;
/* apis.APIS for the other keys: highest version and first flexible version by key (-1: unknown). */
#define MAX_KEYS 256
static int API_MAX[MAX_KEYS], API_FLEX[MAX_KEYS];
static int64_t MAX_HEADERS_SCAN, MAX_TRACEPARENT, MAX_LAYOUT;
static PyObject *S_RECORDS_UNKNOWN, *S_O, *EMPTY;

static unsigned char NAME_OK[256];  /* [a-zA-Z0-9._-] */
static PyObject *NAMES[NAME_SLOTS];
static PyObject *CIDS[CID_SLOTS];

/* Outcome of a step: OK, BAIL (hand back to Python: return None), ERR (exception set). */
#define OK 1
#define BAIL 0
#define ERR (-1)
#define TRY(x) do { int r_ = (x); if (r_ != OK) return r_; } while (0)

typedef struct {
    const uint8_t *b;
    ssize len;
    int64_t scan;     /* Msg.scan_left */
    int truncated;    /* Msg.truncated */
    int want_tp;
} Ctx;

/* -- scalar reads (the caller checks bounds) -------------------------------------- */
static inline int16_t rd16(const uint8_t *p) { return (int16_t)(uint16_t)((unsigned)p[0] << 8 | p[1]); }
static inline int32_t rd32(const uint8_t *p) {
    return (int32_t)((uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]);
}
static inline int64_t rd64(const uint8_t *p) { return (int64_t)((uint64_t)(uint32_t)rd32(p) << 32 | (uint32_t)rd32(p + 4)); }

/* flat._uvarint: at most 10 bytes. BAIL past the view's end, on an 11th byte, or when
 * the value does not fit 64 bits (Python would hold it as a big int: rare, let it). */
static inline int uvarint(const Ctx *c, ssize *pos, uint64_t *out) {
    ssize p = *pos;
    if (p >= c->len)
        return BAIL;
    uint8_t x = c->b[p];
    if (x < 0x80) {
        *out = x;
        *pos = p + 1;
        return OK;
    }
    uint64_t v = x & 0x7F;
    for (int shift = 7; shift <= 63; shift += 7) {
        if (++p >= c->len)
            return BAIL;
        x = c->b[p];
        if (shift == 63 && (x & 0x7E))
            return BAIL;
        v |= (uint64_t)(x & 0x7F) << shift;
        if (x < 0x80) {
            *out = v;
            *pos = p + 1;
            return OK;
        }
    }
    return BAIL;
}

/* flat._varint: zigzag. */
static inline int varint(const Ctx *c, ssize *pos, int64_t *out) {
    uint64_t u;
    TRY(uvarint(c, pos, &u));
    *out = (int64_t)(u >> 1) ^ -(int64_t)(u & 1);
    return OK;
}

static inline int64_t zz(uint8_t x) { return (int64_t)(x >> 1) ^ -(int64_t)(x & 1); }

/* flat._tags (and its inlined "count byte is 0" shortcut). */
static int tags(const Ctx *c, ssize *pos) {
    if (*pos >= c->len)
        return BAIL;
    if (c->b[*pos] == 0) {
        *pos += 1;
        return OK;
    }
    uint64_t n, tag, size;
    ssize p = *pos;
    TRY(uvarint(c, &p, &n));
    if (n > MAX_TAGS)
        return BAIL;
    for (uint64_t i = 0; i < n; i++) {
        TRY(uvarint(c, &p, &tag));
        TRY(uvarint(c, &p, &size));
        if (size > (uint64_t)c->len)
            return BAIL;
        p += (ssize)size;
    }
    if (p > c->len)
        return BAIL;
    *pos = p;
    return OK;
}

/* flat._array: a compact (uvarint N+1) or INT32 array length, -1 for null. */
static int array(const Ctx *c, ssize *pos, int flex, int64_t *n) {
    if (flex) {
        uint64_t u;
        TRY(uvarint(c, pos, &u));
        if (u > (uint64_t)c->len + 1)
            return BAIL;
        *n = (int64_t)u - 1;
    } else {
        if (*pos + 4 > c->len)
            return BAIL;
        *n = rd32(c->b + *pos);
        *pos += 4;
    }
    if (*n < -1 || *n > c->len - *pos)
        return BAIL;
    return OK;
}

/* flat._skip_str. */
static int skip_str(const Ctx *c, ssize *pos, int flex) {
    int64_t n;
    if (flex) {
        uint64_t u;
        TRY(uvarint(c, pos, &u));
        if (u > (uint64_t)c->len + 1)
            return BAIL;
        n = (int64_t)u - 1;
    } else {
        if (*pos + 2 > c->len)
            return BAIL;
        n = rd16(c->b + *pos);
        *pos += 2;
    }
    if (n < -1)
        return BAIL;
    if (n > 0) {
        *pos += n;
        if (*pos > c->len)
            return BAIL;
    }
    return OK;
}

/* -- names ---------------------------------------------------------------------- */
static inline uint32_t fnv(const uint8_t *p, ssize n) {
    uint32_t h = 2166136261u;
    for (ssize i = 0; i < n; i++)
        h = (h ^ p[i]) * 16777619u;
    return h;
}

static inline int same_ascii(PyObject *s, const uint8_t *p, ssize n) {
    return s != NULL && PyUnicode_GET_LENGTH(s) == n && memcmp(PyUnicode_1BYTE_DATA(s), p, (size_t)n) == 0;
}

static PyObject *ascii_str(const uint8_t *p, ssize n) {
    PyObject *s = PyUnicode_New(n, 127);
    if (s != NULL)
        memcpy(PyUnicode_1BYTE_DATA(s), p, (size_t)n);
    return s;
}

/* A topic name (1..249 bytes, checked by the caller) as str: *out new ref; BAIL when
 * it does not match TOPIC_RE. Only validated names enter the cache. */
static int topic_name(const uint8_t *p, ssize n, PyObject **out) {
    uint32_t slot = fnv(p, n) & (NAME_SLOTS - 1);
    PyObject *s = NAMES[slot];
    if (same_ascii(s, p, n)) {
        Py_INCREF(s);
        *out = s;
        return OK;
    }
    for (ssize i = 0; i < n; i++)
        if (!NAME_OK[p[i]])
            return BAIL;
    s = ascii_str(p, n);
    if (s == NULL)
        return ERR;
    Py_INCREF(s);
    Py_XSETREF(NAMES[slot], s);
    *out = s;
    return OK;
}

/* flat._client_id: str(raw, "ascii", "replace"); ASCII ids up to 128 bytes cached. */
static PyObject *client_id(const uint8_t *p, ssize n) {
    int ascii = 1;
    for (ssize i = 0; i < n; i++)
        if (p[i] >= 0x80) {
            ascii = 0;
            break;
        }
    if (!ascii)
        return PyUnicode_DecodeASCII((const char *)p, n, "replace");
    if (n > MAX_CACHED_CID)
        return ascii_str(p, n);
    uint32_t slot = fnv(p, n) & (CID_SLOTS - 1);
    PyObject *s = CIDS[slot];
    if (same_ascii(s, p, n)) {
        Py_INCREF(s);
        return s;
    }
    s = ascii_str(p, n);
    if (s != NULL) {
        Py_INCREF(s);
        Py_XSETREF(CIDS[slot], s);
    }
    return s;
}

/* -- topics --------------------------------------------------------------------- */
#define SLOT(o, off) (*(PyObject **)((char *)(o) + (off)))

/* A FastTopic with every slot set: name, topic_id (steals both), _p, records 0 and
 * traceparent None (the caller replaces _p / records / traceparent). */
static PyObject *new_topic(PyTypeObject *tp, PyObject *name, PyObject *tid) {
    PyObject *t = tp->tp_new(tp, EMPTY, NULL);  /* FastTopic(): object.__new__, and __init__ is object's */
    if (t == NULL) {
        Py_XDECREF(name);
        Py_XDECREF(tid);
        return NULL;
    }
    SLOT(t, OFF_NAME) = name != NULL ? name : Py_NewRef(Py_None);
    SLOT(t, OFF_TID) = tid != NULL ? tid : Py_NewRef(Py_None);
    SLOT(t, OFF_RECORDS) = PyLong_FromLong(0);  /* a cached small int */
    SLOT(t, OFF_TP) = Py_NewRef(Py_None);
    return t;
}

static inline void set_slot(PyObject *t, ssize off, PyObject *v) { Py_XSETREF(SLOT(t, off), v); }

static inline int key_eq(PyObject *a, PyObject *b) {
    if (a == b)
        return 1;
    if (PyUnicode_CheckExact(a) && PyUnicode_CheckExact(b))
        return PyUnicode_GET_LENGTH(a) == PyUnicode_GET_LENGTH(b)
               && memcmp(PyUnicode_1BYTE_DATA(a), PyUnicode_1BYTE_DATA(b), (size_t)PyUnicode_GET_LENGTH(a)) == 0;
    if (PyBytes_CheckExact(a) && PyBytes_CheckExact(b))
        return PyBytes_GET_SIZE(a) == PyBytes_GET_SIZE(b)
               && memcmp(PyBytes_AS_STRING(a), PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(a)) == 0;
    return 0;
}

/* The same topic twice in one request (real clients never send it): flat.py merges
 * those, so hand them back. OK when all keys differ. */
static int distinct(PyObject *topics, ssize off) {
    ssize n = PyList_GET_SIZE(topics);
    if (n <= 32) {
        for (ssize i = 1; i < n; i++) {
            PyObject *a = SLOT(PyList_GET_ITEM(topics, i), off);
            for (ssize j = 0; j < i; j++)
                if (key_eq(a, SLOT(PyList_GET_ITEM(topics, j), off)))
                    return BAIL;
        }
        return OK;
    }
    PyObject *seen = PySet_New(NULL);
    if (seen == NULL)
        return ERR;
    for (ssize i = 0; i < n; i++)
        if (PySet_Add(seen, SLOT(PyList_GET_ITEM(topics, i), off)) < 0) {
            Py_DECREF(seen);
            return ERR;
        }
    int r = PySet_GET_SIZE(seen) == n ? OK : BAIL;
    Py_DECREF(seen);
    return r;
}

/* -- record data ------------------------------------------------------------------ */
/* The first occurrence of the traceparent key's wire form (varint 11, then the key)
 * in b[pos:end], or -1: flat._TP_KEY. */
static ssize find_tp_key(const uint8_t *b, ssize pos, ssize end) {
    static const char key[12] = "\x16traceparent";
    while (end - pos >= 12) {
        const uint8_t *hit = memchr(b + pos, 0x16, (size_t)(end - pos - 11));
        if (hit == NULL)
            return -1;
        ssize at = hit - b;
        if (memcmp(hit + 1, key + 1, 11) == 0)
            return at;
        pos = at + 1;
    }
    return -1;
}

/* flat._traceparent: the first record's traceparent header (from the record at pos,
 * inside a batch ending at end) into *tp (new ref) when there is one. */
static int first_traceparent(const Ctx *c, ssize pos, ssize end, PyObject **tp) {
    const uint8_t *b = c->b;
    const ssize len = c->len;
    int64_t length, klen, vlen, n, kl, vl, skip;
    TRY(varint(c, &pos, &length));
    if (length < 0 || length > end - pos)
        return BAIL;
    end = pos + length;
    ssize hit = find_tp_key(b, pos, end);
    if (hit < 0)
        return OK;
    /* attributes, timestamp delta, offset delta, key length */
    if (length >= 4 && b[pos + 1] < 0x80 && b[pos + 2] < 0x80 && b[pos + 3] < 0x80) {
        klen = zz(b[pos + 3]);
        pos += 4;
    } else {
        pos += 1;
        TRY(varint(c, &pos, &skip));
        TRY(varint(c, &pos, &skip));
        TRY(varint(c, &pos, &klen));
    }
    if (klen > 0) {
        if (klen > len)
            return BAIL;
        pos += klen;
    } else if (klen < -1) {
        return BAIL;
    }
    if (pos >= end)
        return BAIL;
    TRY(varint(c, &pos, &vlen));
    if (vlen > 0) {
        if (vlen > len)
            return BAIL;
        pos += vlen;
    } else if (vlen < -1) {
        return BAIL;
    }
    if (pos >= end || end - pos > MAX_HEADERS_SCAN)
        return pos > end ? BAIL : OK;
    uint8_t x = b[pos];
    if (x < 0x80) {
        n = zz(x);
        pos += 1;
        if (n > 0 && pos == hit) {
            /* The search's hit is the first header's key: its value length follows. */
            if (pos + 12 >= len)
                return BAIL;
            x = b[pos + 12];
            vl = x < 0x80 ? zz(x) : -2;
            if (vl > 0 && vl <= MAX_TRACEPARENT) {
                pos += 13;
                if (pos + vl > end)
                    return BAIL;
                *tp = PyBytes_FromStringAndSize((const char *)b + pos, (ssize)vl);
                return *tp != NULL ? OK : ERR;
            }
        }
    } else {
        TRY(varint(c, &pos, &n));
    }
    if (n < 0 || n > end - pos)
        return BAIL;
    while (n) {
        n--;
        TRY(varint(c, &pos, &kl));
        if (kl < 0 || kl > len)
            return BAIL;
        ssize kpos = pos;
        pos += kl;
        TRY(varint(c, &pos, &vl));
        if (vl < -1)
            return BAIL;
        if (kl == 11 && vl > 0 && vl <= MAX_TRACEPARENT && memcmp(b + kpos, "traceparent", 11) == 0) {
            if (pos + vl > end)
                return BAIL;
            *tp = PyBytes_FromStringAndSize((const char *)b + pos, (ssize)vl);
            return *tp != NULL ? OK : ERR;
        }
        if (vl > 0) {
            if (vl > len)
                return BAIL;
            pos += vl;
            if (pos > end)
                return BAIL;
        }
    }
    return OK;
}

/* Per-topic results while walking a produce topic. */
typedef struct {
    int64_t records;
    PyObject *tp;  /* owned, NULL until found */
    int unknown;   /* records_unknown */
} Acc;

/* flat.records: every batch of a partition's records b[pos:pos+n]. */
static int walk_records(Ctx *c, ssize pos, ssize n, Acc *a) {
    ssize left = n;
    int first = 1;
    while (left > 0) {
        if (left < BATCH_PREFIX)
            return OK;
        if (c->scan <= 0) {
            a->unknown = 1;
            c->truncated = 1;
            return OK;
        }
        const uint8_t *h = c->b + pos;
        int32_t length = rd32(h + 8);
        int magic = (int8_t)h[16];
        int attrs = 0;
        int32_t count = 0;
        if (left >= BATCH_HEADER) {
            attrs = rd16(h + 21);
            count = rd32(h + 57);
        }
        int64_t total = 12 + (int64_t)length;
        if (length < BATCH_PREFIX - 12 || magic > 2 || magic < 0)
            return BAIL;
        if (total > left || (magic == 2 && left < BATCH_HEADER))
            return OK;  /* a partial trailing batch */
        if (magic == 2) {
            if (count < 0)
                return BAIL;
            a->records += count;
            if (first && a->tp == NULL && count > 0 && (attrs & 7) == 0 && c->want_tp)
                TRY(first_traceparent(c, pos + BATCH_HEADER, pos + total, &a->tp));
        } else {
            a->records += 1;
        }
        c->scan -= total;
        pos += total;
        left -= total;
        first = 0;
    }
    return OK;
}

/* -- Produce -------------------------------------------------------------------- */
/* One produce topic's key (name or id) and partition count; *t gets the new topic. */
static int produce_topic_key(Ctx *c, ssize *pos, int flex, int ids, PyObject **t, int64_t *np) {
    const uint8_t *b = c->b;
    ssize p = *pos;
    PyObject *name = NULL, *tid = NULL;
    if (ids) {
        if (p + (flex ? 16 : 20) > c->len)
            return BAIL;
        tid = PyBytes_FromStringAndSize((const char *)b + p, 16);  /* 16-byte id, kept */
        if (tid == NULL)
            return ERR;
        p += 16;
        if (flex) {
            uint64_t u;
            if (uvarint(c, &p, &u) != OK || u > (uint64_t)c->len + 1) {
                Py_DECREF(tid);
                return BAIL;
            }
            *np = (int64_t)u - 1;
        } else {
            *np = rd32(b + p);
            p += 4;
        }
    } else {
        int64_t ln;
        if (flex) {
            uint64_t u;
            TRY(uvarint(c, &p, &u));
            if (u < 2 || u > MAX_NAME + 1)
                return BAIL;
            ln = (int64_t)u - 1;
            if (p + ln > c->len)
                return BAIL;
            TRY(topic_name(b + p, ln, &name));
            p += ln;
            if (uvarint(c, &p, &u) != OK || u > (uint64_t)c->len + 1) {
                Py_DECREF(name);
                return BAIL;
            }
            *np = (int64_t)u - 1;
        } else {
            if (p + 2 > c->len)
                return BAIL;
            ln = (int64_t)b[p] << 8 | b[p + 1];
            if (ln < 1 || ln > MAX_NAME || p + 6 + ln > c->len)
                return BAIL;
            TRY(topic_name(b + p + 2, ln, &name));
            *np = rd32(b + p + 2 + ln);
            p += 6 + ln;
        }
    }
    *t = new_topic(T_FAST, name, tid);
    if (*t == NULL)
        return ERR;
    *pos = p;
    return OK;
}

/* flat.produce_request's topics: appends FastTopics to ``topics``. */
static int produce_topics(Ctx *c, ssize pos, int version, int flex, PyObject *topics, int *acks) {
    const uint8_t *b = c->b;
    const ssize end = c->len;
    if (version >= 3) {  /* transactional id */
        if (flex) {
            if (pos >= end)
                return BAIL;
            if (b[pos] == 0)
                pos += 1;
            else
                TRY(skip_str(c, &pos, 1));
        } else {
            TRY(skip_str(c, &pos, 0));
        }
    }
    if (pos + 2 > end)
        return BAIL;
    *acks = rd16(b + pos);
    pos += 6;
    int ids = version >= 13;
    int64_t n;
    TRY(array(c, &pos, flex, &n));
    int64_t scan = c->scan;
    for (int64_t i = 0; i < n; i++) {
        PyObject *t;
        int64_t np;
        TRY(produce_topic_key(c, &pos, flex, ids, &t, &np));
        int r = PyList_Append(topics, t);
        Py_DECREF(t);
        if (r < 0)
            return ERR;
        if (np < -1 || np > end - pos)
            return BAIL;
        PyObject *parts = PyList_New(0);
        if (parts == NULL)
            return ERR;
        SLOT(t, OFF_P) = parts;
        Acc a = {0, NULL, 0};
        int64_t recs = 0;
        int need_tp = c->want_tp;
        for (int64_t k = 0; k < np; k++) {
            int32_t idx, length = 0, count = 0;
            int64_t rlen;
            int magic = -1, attrs = 0;
            if (flex) {
                if (pos + 4 > end)
                    goto bail;
                idx = rd32(b + pos);
                ssize p = pos + 4;
                uint64_t u;
                if (uvarint(c, &p, &u) != OK || u > (uint64_t)end + 1)
                    goto bail;
                rlen = (int64_t)u - 1;
                pos = p;
                if (rlen >= BATCH_HEADER && scan > 0) {
                    if (pos + BATCH_HEADER > end)
                        goto bail;
                    length = rd32(b + pos + 8);
                    magic = (int8_t)b[pos + 16];
                    attrs = rd16(b + pos + 21);
                    count = rd32(b + pos + 57);
                }
            } else {
                if (pos + 8 > end)
                    goto bail;
                idx = rd32(b + pos);
                rlen = rd32(b + pos + 4);
                if (scan > 0 && pos + 8 + BATCH_HEADER <= end) {
                    length = rd32(b + pos + 16);
                    magic = (int8_t)b[pos + 24];
                    attrs = rd16(b + pos + 29);
                    count = rd32(b + pos + 65);
                }
                pos += 8;
            }
            if (idx < 0 || rlen < -1)
                goto bail;
            PyObject *pi = PyLong_FromLong(idx);
            if (pi == NULL)
                goto err;
            int ra = PyList_Append(parts, pi);
            Py_DECREF(pi);
            if (ra < 0)
                goto err;
            if (rlen > 0) {
                if (rlen > end - pos)
                    goto bail;
                ssize e = pos + (ssize)rlen;
                if (magic == 2 && (int64_t)length + 12 == rlen && rlen >= BATCH_HEADER && count >= 0) {
                    /* The usual produce: one v2 batch filling the partition's records. */
                    recs += count;
                    scan -= rlen;
                    if (need_tp && count && (attrs & 7) == 0) {
                        int r2 = first_traceparent(c, pos + BATCH_HEADER, e, &a.tp);
                        if (r2 == BAIL)
                            goto bail;
                        if (r2 == ERR)
                            goto err;
                        need_tp = a.tp == NULL;
                    }
                } else if (scan <= 0) {
                    if (rlen >= BATCH_PREFIX) {
                        a.unknown = 1;
                        c->truncated = 1;
                    }
                } else {
                    c->scan = scan;
                    int r2 = walk_records(c, pos, (ssize)rlen, &a);
                    if (r2 == BAIL)
                        goto bail;
                    if (r2 == ERR)
                        goto err;
                    scan = c->scan;
                    need_tp = c->want_tp && a.tp == NULL;
                }
                pos = e;
            }
            if (flex && tags(c, &pos) != OK)
                goto bail;
        }
        recs += a.records;
        if (recs) {
            PyObject *rv = PyLong_FromLongLong(recs);
            if (rv == NULL)
                goto err;
            set_slot(t, OFF_RECORDS, rv);
        }
        if (a.tp != NULL)
            set_slot(t, OFF_TP, a.tp);  /* steals */
        a.tp = NULL;
        if (a.unknown && PyObject_SetAttr(t, S_RECORDS_UNKNOWN, Py_True) < 0)
            return ERR;
        if (flex)
            TRY(tags(c, &pos));
        continue;
    bail:
        Py_XDECREF(a.tp);
        return BAIL;
    err:
        Py_XDECREF(a.tp);
        return ERR;
    }
    c->scan = scan;
    return OK;
}

/* -- Fetch ---------------------------------------------------------------------- */
/* A Fetch topic's partitions walked one by one (flat._fetch_parts_walk): _p a list,
 * _o a dict of fetch offsets. */
static int fetch_parts_walk(Ctx *c, ssize *pos, int64_t np, ssize size, ssize off_at, int flex, PyObject *t) {
    const uint8_t *b = c->b;
    ssize p = *pos;
    PyObject *parts = PyList_New(0), *offsets = PyDict_New();
    if (parts == NULL || offsets == NULL)
        goto err;
    for (int64_t i = 0; i < np; i++) {
        if (p + size > c->len)
            goto bail;
        int32_t idx = rd32(b + p);
        if (idx < 0)
            goto bail;
        PyObject *pi = PyLong_FromLong(idx);
        PyObject *po = PyLong_FromLongLong(rd64(b + p + off_at));
        int r = pi == NULL || po == NULL ? -1 : PyList_Append(parts, pi);
        if (r == 0)
            r = PyDict_SetItem(offsets, pi, po);
        Py_XDECREF(pi);
        Py_XDECREF(po);
        if (r < 0)
            goto err;
        p += size - flex;
        if (flex && tags(c, &p) != OK)
            goto bail;
    }
    set_slot(t, OFF_P, parts);
    if (PyObject_SetAttr(t, S_O, offsets) < 0) {
        Py_DECREF(offsets);
        return ERR;
    }
    Py_DECREF(offsets);
    *pos = p;
    return OK;
bail:
    Py_XDECREF(parts);
    Py_XDECREF(offsets);
    return BAIL;
err:
    Py_XDECREF(parts);
    Py_XDECREF(offsets);
    return ERR;
}

/* One Fetch topic's partitions (flat.fetch_request's layout path and _fetch_topic_rest). */
static int fetch_parts(Ctx *c, ssize *pos, int64_t np, int version, int flex, PyObject *t) {
    const uint8_t *b = c->b;
    ssize p = *pos;
    ssize off_at = 4 + (version >= 9 ? 4 : 0);
    ssize size = off_at + 8 + (version >= 12 ? 4 : 0) + (version >= 5 ? 8 : 0) + 4 + flex;
    if (np <= 0) {
        if (np < -1)
            return BAIL;
        PyObject *empty = PyList_New(0);
        if (empty == NULL)
            return ERR;
        set_slot(t, OFF_P, empty);
        return OK;
    }
    if (np > c->len - p)
        return BAIL;
    if (np <= MAX_LAYOUT) {
        /* The fixed-stride reading flat.py unpacks in one call, then checks. */
        if (np * size > c->len - p)
            return BAIL;
        int neg = 0, tagged = 0;
        for (int64_t i = 0; i < np; i++) {
            const uint8_t *q = b + p + i * size;
            neg |= q[0] & 0x80;
            if (flex)
                tagged |= q[size - 1];
        }
        if (neg)
            return BAIL;
        if (!tagged) {
            int k = flex ? 3 : 2;
            PyObject *raw = PyTuple_New((ssize)np * k);
            if (raw == NULL)
                return ERR;
            for (int64_t i = 0; i < np; i++) {
                const uint8_t *q = b + p + i * size;
                PyObject *pi = PyLong_FromLong(rd32(q));
                PyObject *po = PyLong_FromLongLong(rd64(q + off_at));
                if (pi == NULL || po == NULL) {
                    Py_XDECREF(pi);
                    Py_XDECREF(po);
                    Py_DECREF(raw);
                    return ERR;
                }
                PyTuple_SET_ITEM(raw, (ssize)(i * k), pi);
                PyTuple_SET_ITEM(raw, (ssize)(i * k + 1), po);
                if (flex)
                    PyTuple_SET_ITEM(raw, (ssize)(i * k + 2), PyLong_FromLong(0));  /* a cached small int */
            }
            set_slot(t, OFF_P, raw);
            *pos = p + (ssize)(np * size);
            return OK;
        }
    }
    return fetch_parts_walk(c, pos, np, size, off_at, flex, t);
}

/* flat.fetch_request's topics: appends FastTopic (v0-v11) / FastTopic3 objects. */
static int fetch_topics(Ctx *c, ssize pos, int version, int flex, PyObject *topics) {
    const uint8_t *b = c->b;
    pos += (version <= 14 ? 4 : 0) + 8 + (version >= 3 ? 4 : 0) + (version >= 4 ? 1 : 0) + (version >= 7 ? 8 : 0);
    int64_t n;
    TRY(array(c, &pos, flex, &n));
    int ids = version >= 13;
    PyTypeObject *tp = flex ? T_FAST3 : T_FAST;
    for (int64_t i = 0; i < n; i++) {
        PyObject *name = NULL, *tid = NULL, *t;
        int64_t np;
        if (!flex) {
            if (pos + 2 > c->len)
                return BAIL;
            int64_t ln = (int64_t)b[pos] << 8 | b[pos + 1];
            if (ln < 1 || ln > MAX_NAME || pos + 6 + ln > c->len)
                return BAIL;
            TRY(topic_name(b + pos + 2, ln, &name));
            np = rd32(b + pos + 2 + ln);
            pos += 6 + ln;
        } else {
            uint64_t u;
            if (ids) {
                if (pos + 16 > c->len)
                    return BAIL;
                tid = PyBytes_FromStringAndSize((const char *)b + pos, 16);  /* 16-byte id, kept */
                if (tid == NULL)
                    return ERR;
                pos += 16;
            } else {
                TRY(uvarint(c, &pos, &u));
                if (u < 2 || u > MAX_NAME + 1)
                    return BAIL;
                int64_t ln = (int64_t)u - 1;
                if (pos + ln > c->len)
                    return BAIL;
                TRY(topic_name(b + pos, ln, &name));
                pos += ln;
            }
            if (uvarint(c, &pos, &u) != OK || u > (uint64_t)c->len + 1) {
                Py_XDECREF(name);
                Py_XDECREF(tid);
                return BAIL;
            }
            np = (int64_t)u - 1;
        }
        t = new_topic(tp, name, tid);
        if (t == NULL)
            return ERR;
        int r = PyList_Append(topics, t);
        Py_DECREF(t);
        if (r < 0)
            return ERR;
        TRY(fetch_parts(c, &pos, np, version, flex, t));
        if (flex)
            TRY(tags(c, &pos));
    }
    return OK;
}

/* -- Metadata response ------------------------------------------------------------ */
/* flat.metadata_response_py step for step: the (topic id, name) pairs a complete
 * Metadata response names, appended to ``out``. BAIL wherever Python would fail a read
 * or a check (it then returns None), and for a varint wider than 64 bits (Python
 * decides). A name that is not a valid topic name is not cached, as in Python. */
static int metadata_body(Ctx *c, int version, int flex, int header_tags, PyObject *out) {
    const uint8_t *b = c->b;
    ssize pos = 8;
    int64_t n, np, k;
    if (header_tags)
        TRY(tags(c, &pos));
    if (version >= 3)
        pos += 4;  /* throttle_time_ms */
    TRY(array(c, &pos, flex, &n));
    for (int64_t i = 0; i < n; i++) {  /* brokers: node_id host port [rack] <tags> */
        pos += 4;
        TRY(skip_str(c, &pos, flex));
        pos += 4;
        if (version >= 1)
            TRY(skip_str(c, &pos, flex));
        if (flex)
            TRY(tags(c, &pos));
    }
    if (version >= 2)
        TRY(skip_str(c, &pos, flex));  /* cluster_id */
    if (version >= 1)
        pos += 4;  /* controller_id */
    TRY(array(c, &pos, flex, &n));
    ssize fixed = version >= 7 ? 14 : 10;
    int arrays = version >= 5 ? 3 : 2;
    for (int64_t i = 0; i < n; i++) {
        pos += 2;  /* error_code */
        int64_t ln;
        if (flex) {
            uint64_t u;
            TRY(uvarint(c, &pos, &u));
            if (u > (uint64_t)c->len + 1)
                return BAIL;
            ln = (int64_t)u - 1;
        } else {
            if (pos + 2 > c->len)
                return BAIL;
            ln = rd16(b + pos);
            pos += 2;
        }
        if (ln < -1 || pos + ln > c->len)
            return BAIL;
        PyObject *name = NULL;
        if (ln >= 0) {
            if (ln >= 1 && ln <= MAX_NAME && topic_name(b + pos, ln, &name) == ERR)
                return ERR;  /* BAIL there: not a topic name, so not cached (name stays NULL) */
            pos += ln;
        }
        const uint8_t *tid = NULL;
        int r = OK;
        if (version >= 10) {
            if (pos + 16 > c->len)
                r = BAIL;
            else
                tid = b + pos;
            pos += 16;
        }
        if (version >= 1)
            pos += 1;  /* is_internal */
        if (r == OK)
            r = array(c, &pos, flex, &np);
        for (int64_t j = 0; r == OK && j < np; j++) {  /* partitions: fixed, replica/isr[/offline], <tags> */
            pos += fixed;
            for (int a = 0; r == OK && a < arrays; a++) {
                r = array(c, &pos, flex, &k);
                if (r == OK && k > 0)
                    pos += 4 * k;
            }
            if (r == OK && flex)
                r = tags(c, &pos);
        }
        if (r == OK && version >= 8)
            pos += 4;  /* topic_authorized_operations */
        if (r == OK && flex)
            r = tags(c, &pos);
        int zero = 1;
        for (int z = 0; r == OK && tid != NULL && z < 16; z++)
            zero &= tid[z] == 0;
        if (r == OK && name != NULL && tid != NULL && !zero) {
            PyObject *pair = Py_BuildValue("(y#O)", (const char *)tid, (ssize)16, name);
            if (pair == NULL || PyList_Append(out, pair) < 0)
                r = ERR;
            Py_XDECREF(pair);
        }
        Py_XDECREF(name);
        if (r != OK)
            return r;
    }
    return pos > c->len ? BAIL : OK;
}

/* metadata(view, version, flex, header_tags) -> [(topic id, name), ...] | None */
static PyObject *metadata(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "metadata(view, version, flex, header_tags)");
        return NULL;
    }
    int overflow;
    long version = PyLong_AsLongAndOverflow(args[1], &overflow);
    if (version == -1 && PyErr_Occurred())
        return NULL;
    int flex = PyObject_IsTrue(args[2]), header_tags = PyObject_IsTrue(args[3]);
    if (flex < 0 || header_tags < 0)
        return NULL;
    if (overflow || version < 0 || version > 0x7FFF)
        Py_RETURN_NONE;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_BufferError))
            return NULL;
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    Ctx c = {(const uint8_t *)view.buf, view.len, 0, 0, 0};
    PyObject *out = PyList_New(0);
    int r = out == NULL ? ERR : metadata_body(&c, (int)version, flex, header_tags, out);
    PyBuffer_Release(&view);
    if (r == OK)
        return out;
    Py_XDECREF(out);
    if (r == ERR)
        return NULL;
    Py_RETURN_NONE;
}

/* -- request ---------------------------------------------------------------------- */
static int request_body(Ctx *c, PyObject **result) {
    const uint8_t *b = c->b;
    if (c->len < 14)
        return BAIL;
    int key = rd16(b + 4), version = rd16(b + 6);
    int32_t corr = rd32(b + 8);
    int cid = rd16(b + 12);
    int max_v, flex_v;
    if (key == 0) {
        max_v = PRODUCE_MAX;
        flex_v = PRODUCE_FLEX;
    } else if (key == 1) {
        max_v = FETCH_MAX;
        flex_v = FETCH_FLEX;
    } else if (key >= 0 && key < MAX_KEYS && API_MAX[key] >= 0) {
        max_v = API_MAX[key];  /* other APIs: only the header, as flat.request_header reads it */
        flex_v = API_FLEX[key];
    } else {
        return BAIL;
    }
    if (version < 0 || version > max_v || corr < 0 || cid < -1)
        return BAIL;
    int flex = version >= flex_v;
    ssize pos = 14;
    PyObject *cid_s = NULL;
    if (cid > 0) {
        if (pos + cid > c->len)
            return BAIL;
        cid_s = client_id(b + pos, cid);
        if (cid_s == NULL)
            return ERR;
        pos += cid;
    }
    int r = OK, acks = -1;
    PyObject *topics = NULL;
    if (flex)
        r = tags(c, &pos);
    if (r == OK) {
        topics = PyList_New(0);
        if (topics == NULL)
            r = ERR;
    }
    if (r == OK && key <= 1)
        r = key == 0 ? produce_topics(c, pos, version, flex, topics, &acks)
                     : fetch_topics(c, pos, version, flex, topics);
    if (r == OK)
        r = distinct(topics, PyList_GET_SIZE(topics) && SLOT(PyList_GET_ITEM(topics, 0), OFF_NAME) == Py_None
                                 ? OFF_TID : OFF_NAME);
    if (r == OK) {
        *result = Py_BuildValue("(iiOiOiLON)", key, version, flex ? Py_True : Py_False, (int)corr,
                                cid_s != NULL ? cid_s : Py_None, acks, (long long)c->scan,
                                c->truncated ? Py_True : Py_False, topics);
        topics = NULL;  /* stolen by N (also on failure) */
        if (*result == NULL)
            r = ERR;
    }
    Py_XDECREF(cid_s);
    Py_XDECREF(topics);
    return r;
}

/* request(view, scan_bytes, want_tp) -> tuple | None */
static PyObject *request(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "request(view, scan_bytes, want_tp)");
        return NULL;
    }
    if (T_FAST == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_flat.setup() was not called");
        return NULL;
    }
    int overflow;
    long long scan = PyLong_AsLongLongAndOverflow(args[1], &overflow);
    if (scan == -1 && PyErr_Occurred())
        return NULL;
    int want_tp = PyObject_IsTrue(args[2]);
    if (want_tp < 0)
        return NULL;
    if (overflow)
        Py_RETURN_NONE;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_BufferError))
            return NULL;
        PyErr_Clear();  /* not a contiguous view: Python's path */
        Py_RETURN_NONE;
    }
    Ctx c = {(const uint8_t *)view.buf, view.len, scan, 0, want_tp};
    PyObject *result = NULL;
    int r = request_body(&c, &result);
    PyBuffer_Release(&view);
    if (r == ERR)
        return NULL;
    if (r == BAIL)
        Py_RETURN_NONE;
    return result;
}

static ssize slot_offset(PyObject *cls, const char *attr) {
    PyObject *d = PyObject_GetAttrString(cls, attr);
    if (d == NULL)
        return -1;
    ssize off = -1;
    if (Py_IS_TYPE(d, &PyMemberDescr_Type)) {
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type == Py_T_OBJECT_EX && !(m->flags & Py_READONLY) && m->offset >= (ssize)sizeof(PyObject)
            && m->offset + (ssize)sizeof(PyObject *) <= ((PyTypeObject *)cls)->tp_basicsize)
            off = m->offset;
    }
    Py_DECREF(d);
    if (off < 0)
        PyErr_Format(PyExc_TypeError, "%s is not an object slot", attr);
    return off;
}

/* setup(FastTopic, FastTopic3, (produce max, produce flex, fetch max, fetch flex,
 *        MAX_HEADERS_SCAN, MAX_TRACEPARENT, MAX_LAYOUT_PARTITIONS),
 *        ((max version, first flexible version) | None by API key, ...)) */
static PyObject *setup(PyObject *self, PyObject *args) {
    PyObject *fast, *fast3;
    long long hs, mt, ml;
    PyObject *table;
    if (!PyArg_ParseTuple(args, "O!O!(iiiiLLL)O!", &PyType_Type, &fast, &PyType_Type, &fast3, &PRODUCE_MAX,
                          &PRODUCE_FLEX, &FETCH_MAX, &FETCH_FLEX, &hs, &mt, &ml, &PyTuple_Type, &table))
        return NULL;
    ssize nk = PyTuple_GET_SIZE(table);
    if (nk > MAX_KEYS) {
        PyErr_SetString(PyExc_ValueError, "API table longer than MAX_KEYS");
        return NULL;
    }
    for (int k = 0; k < MAX_KEYS; k++) {
        API_MAX[k] = API_FLEX[k] = -1;
        if (k >= nk)
            continue;
        PyObject *e = PyTuple_GET_ITEM(table, k);
        if (e == Py_None)
            continue;
        int mx, fl;
        if (!PyArg_ParseTuple(e, "ii", &mx, &fl))
            return NULL;
        if (mx < 0 || fl < 0) {
            PyErr_SetString(PyExc_ValueError, "API table: negative version");
            return NULL;
        }
        API_MAX[k] = mx;
        API_FLEX[k] = fl;
    }
    if (T_FAST != NULL && ((PyObject *)T_FAST != fast || (PyObject *)T_FAST3 != fast3)) {
        PyErr_SetString(PyExc_RuntimeError, "_flat.setup() was already called with other classes");
        return NULL;
    }
    if (!PyType_IsSubtype((PyTypeObject *)fast3, (PyTypeObject *)fast)
        || ((PyTypeObject *)fast3)->tp_basicsize != ((PyTypeObject *)fast)->tp_basicsize) {
        PyErr_SetString(PyExc_TypeError, "FastTopic3 must extend FastTopic without slots");
        return NULL;
    }
    if ((OFF_P = slot_offset(fast, "_p")) < 0 || (OFF_NAME = slot_offset(fast, "name")) < 0
        || (OFF_RECORDS = slot_offset(fast, "records")) < 0 || (OFF_TID = slot_offset(fast, "topic_id")) < 0
        || (OFF_TP = slot_offset(fast, "traceparent")) < 0)
        return NULL;
    MAX_HEADERS_SCAN = hs;
    MAX_TRACEPARENT = mt;
    MAX_LAYOUT = ml;
    Py_INCREF(fast);
    Py_INCREF(fast3);
    Py_XSETREF(T_FAST, (PyTypeObject *)fast);
    Py_XSETREF(T_FAST3, (PyTypeObject *)fast3);
    Py_RETURN_NONE;
}

static PyObject *clear_caches(PyObject *self, PyObject *unused) {
    for (int i = 0; i < NAME_SLOTS; i++)
        Py_CLEAR(NAMES[i]);
    for (int i = 0; i < CID_SLOTS; i++)
        Py_CLEAR(CIDS[i]);
    Py_RETURN_NONE;
}

static PyObject *cache_sizes(PyObject *self, PyObject *unused) {
    int n = 0, k = 0;
    for (int i = 0; i < NAME_SLOTS; i++)
        n += NAMES[i] != NULL;
    for (int i = 0; i < CID_SLOTS; i++)
        k += CIDS[i] != NULL;
    return Py_BuildValue("(ii)", n, k);
}

static PyMethodDef methods[] = {
    {"request", (PyCFunction)(void (*)(void))request, METH_FASTCALL,
     "request(view, scan_bytes, want_tp) -> (api_key, version, flex, corr, client_id, acks, scan_left, "
     "truncated, topics) for a valid request (topics for Produce/Fetch only), else None."},
    {"metadata", (PyCFunction)(void (*)(void))metadata, METH_FASTCALL,
     "metadata(view, version, flex, header_tags) -> the (topic id, name) pairs of a complete Metadata "
     "response, as flat.metadata_response_py gives them, else None."},
    {"setup", setup, METH_VARARGS, "setup(FastTopic, FastTopic3, limits): once, from flat.py."},
    {"clear_caches", clear_caches, METH_NOARGS, "Empty the topic-name and client-id caches."},
    {"cache_sizes", cache_sizes, METH_NOARGS, "(topic names, client ids) held by the caches."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_flat", "Kafka Produce/Fetch request walk accelerator (see flat.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__flat(void) {
    for (int c = 0; c < 256; c++)
        NAME_OK[c] = (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '.'
                     || c == '_' || c == '-';
    S_RECORDS_UNKNOWN = PyUnicode_InternFromString("records_unknown");
    S_O = PyUnicode_InternFromString("_o");
    EMPTY = PyTuple_New(0);
    if (S_RECORDS_UNKNOWN == NULL || S_O == NULL || EMPTY == NULL)
        return NULL;
    return PyModule_Create(&module);
}
