/* Writes OTLP Span messages (ScopeSpans.spans fields) for a batch of goroutines, one PyBytes each.

Why C: a per-span template encoder in plain Python measured ~4.6 us a span (FIELD-NOTES 4b), over
the agent's whole budget of 3-5 us a goroutine. Here Python (fastspans.py) prepares everything that
repeats (names, creation sites, event bodies, attribute key prefixes) once per distinct value and
the ids and times as uint64 columns; this file only lays those out in the fixed order of
SpanEncoder.span(SpanBuilder.build(rec)): varints, fixed64 times, big-endian ids, copied pieces.

encode(rows, ints, offsets, changes, pieces, prefixes, skip_zero, head_ints, link_attrs, link_offsets, links,
       waker_link_attrs, waker_id_prefix) -> list[bytes]
  rows      uint64 (ROW_COLS, n): ids, times and piece indices, columns as in enum row_col
  ints      uint64 (k, n): integer attributes, column j keyed by prefixes[j] (KeyValue.key field +
            the value's tag); left out above INT64_MAX (the SDK drops them) and, where skip_zero[j],
            when zero. The first head_ints come before the FN/SITE/EXISTED pieces, the rest after.
  offsets   int64 (n + 1): row i's state changes are changes[offsets[i]:offsets[i+1]]
  changes   uint64 (m, 3): event time, piece index of the event body (name + attributes), and the
            waker id, an integer attribute appended to the body (keyed by waker_id_prefix) unless
            above INT64_MAX (UINT64_MAX: none)
  pieces    tuple of bytes that rows and changes index
  link_attrs  the creator link's encoded attributes
  link_offsets  int64 (n + 1): row i's waker links are links[link_offsets[i]:link_offsets[i+1]],
            written after the creator link
  links     uint64 (l, 3): a waker link's trace id (high, low) and span id
  waker_link_attrs  the waker links' encoded attributes
lookup(keys, table_keys, table_values, out) -> misses: fastspans' per-process tables of pieces.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum row_col {
    TRACE_HI, TRACE_LO, SPAN_ID, PARENT_ID /* 0: a root span */, LINK_HI, LINK_LO,
    LINK_SPAN /* 0: no link */, START_NS, END_NS,
    HEAD /* name field + kind */, FN, SITE, EXISTED /* attributes after the head ints */,
    TAIL /* trace/end reason attributes */, END_BODY /* the end event's body */, ROW_COLS
};

#define MAX_INTS 64  /* integer attributes a span */

typedef struct { const char *p; Py_ssize_t n; } piece;

typedef struct {
    Py_buffer rows, ints, offsets, changes, link_offsets, links;
    piece *pieces, *prefixes;
    Py_ssize_t n, k, m, l, npieces, head_ints;
    const char *skip_zero;
    piece link_attrs, waker_link_attrs, waker_id_prefix;
} batch;

static const char SPAN_FLAGS[4] = {0x00, 0x01, 0x00, 0x00};  /* 0x100: the parent is local */

static inline Py_ssize_t vlen(uint64_t v) {
    Py_ssize_t n = 1;
    while (v >= 0x80) { v >>= 7; n++; }
    return n;
}

static inline char *put_varint(char *o, uint64_t v) {
    while (v >= 0x80) { *o++ = (char)((v & 0x7F) | 0x80); v >>= 7; }
    *o++ = (char)v;
    return o;
}

static inline char *put_be64(char *o, uint64_t v) {
    for (int i = 7; i >= 0; i--) { *o++ = (char)(v >> (8 * i)); }
    return o;
}

static inline char *put_le64(char *o, uint64_t v) {
    for (int i = 0; i < 8; i++) { *o++ = (char)(v >> (8 * i)); }
    return o;
}

static inline char *put(char *o, piece pc) {
    memcpy(o, pc.p, (size_t)pc.n);
    return o + pc.n;
}

/* A length-delimited field's size, from its payload's. */
static inline Py_ssize_t field_len(Py_ssize_t payload) { return 1 + vlen((uint64_t)payload) + payload; }

static inline int int_kept(const batch *b, Py_ssize_t j, uint64_t v) {
    return v <= (uint64_t)INT64_MAX && !(b->skip_zero[j] && v == 0);
}

/* Attributes field (a span's: tag 9, an event's: tag 3): KeyValue{key, AnyValue{int_value (tag 3)}}. */
static inline Py_ssize_t int_attr_len(piece prefix, uint64_t v) {
    return field_len(prefix.n + 2 + vlen(v));
}

static char *put_int_attr(char *o, char tag, piece prefix, uint64_t v) {
    *o++ = tag;
    o = put_varint(o, (uint64_t)(prefix.n + 2 + vlen(v)));
    o = put(o, prefix);
    *o++ = (char)(1 + vlen(v));
    *o++ = 0x18;
    return put_varint(o, v);
}

static Py_ssize_t ints_len(const batch *b, const uint64_t *v, Py_ssize_t from, Py_ssize_t to) {
    Py_ssize_t n = 0;
    for (Py_ssize_t j = from; j < to; j++) {
        if (int_kept(b, j, v[j])) n += int_attr_len(b->prefixes[j], v[j]);
    }
    return n;
}

static char *put_ints(char *o, const batch *b, const uint64_t *v, Py_ssize_t from, Py_ssize_t to) {
    for (Py_ssize_t j = from; j < to; j++) {
        if (int_kept(b, j, v[j])) o = put_int_attr(o, 0x4a, b->prefixes[j], v[j]);
    }
    return o;
}

/* An Event message's size: time, cached body, the waker id attribute if any. */
static inline Py_ssize_t event_len(const batch *b, piece body, uint64_t waker) {
    return 9 + body.n + (waker <= (uint64_t)INT64_MAX ? int_attr_len(b->waker_id_prefix, waker) : 0);
}

/* Event field (tag 11): time_unix_nano (fixed64, tag 1), then the cached body and the waker id. */
static char *put_event(char *o, const batch *b, uint64_t time_ns, piece body, uint64_t waker) {
    *o++ = 0x5a;
    o = put_varint(o, (uint64_t)event_len(b, body, waker));
    *o++ = 0x09;
    o = put_le64(o, time_ns);
    o = put(o, body);
    return waker <= (uint64_t)INT64_MAX ? put_int_attr(o, 0x1a, b->waker_id_prefix, waker) : o;
}

static inline Py_ssize_t link_body_len(piece attrs) { return 18 + 10 + attrs.n + 5; }

/* Link field (tag 13): trace_id 1, span_id 2, attributes 4, flags 6 (fixed32). */
static char *put_link(char *o, uint64_t trace_hi, uint64_t trace_lo, uint64_t span_id, piece attrs) {
    *o++ = 0x6a;
    o = put_varint(o, (uint64_t)link_body_len(attrs));
    memcpy(o, "\x0a\x10", 2);
    o = put_be64(put_be64(o + 2, trace_hi), trace_lo);
    memcpy(o, "\x12\x08", 2);
    o = put_be64(o + 2, span_id);
    o = put(o, attrs);
    *o++ = 0x35;
    memcpy(o, SPAN_FLAGS, 4);
    return o + 4;
}

static int piece_at(const batch *b, uint64_t index, piece *out) {
    if (index >= (uint64_t)b->npieces) {
        PyErr_Format(PyExc_IndexError, "piece index %llu out of range", (unsigned long long)index);
        return -1;
    }
    *out = b->pieces[index];
    return 0;
}

/* The Span message's size (without its own tag and length); -1 on a bad index. */
static Py_ssize_t span_len(const batch *b, Py_ssize_t i, const uint64_t *r, const uint64_t *v) {
    const int64_t *off = b->offsets.buf, *loff = b->link_offsets.buf;
    const uint64_t *ch = b->changes.buf;
    Py_ssize_t n = 18 + 10 + (r[PARENT_ID] ? 10 : 0) + 18 + 2 + 6;  /* ids, times, status, flags */
    piece pc;
    for (int c = HEAD; c <= END_BODY; c++) {
        if (piece_at(b, r[c], &pc) < 0) return -1;
        n += c == END_BODY ? field_len(9 + pc.n) : pc.n;
    }
    n += ints_len(b, v, 0, b->k);
    if (off[i] < 0 || off[i] > off[i + 1] || off[i + 1] > b->m) {
        PyErr_SetString(PyExc_ValueError, "offsets must rise from 0 to len(changes)");
        return -1;
    }
    for (int64_t j = off[i]; j < off[i + 1]; j++) {
        if (piece_at(b, ch[3 * j + 1], &pc) < 0) return -1;
        n += field_len(event_len(b, pc, ch[3 * j + 2]));
    }
    if (loff[i] < 0 || loff[i] > loff[i + 1] || loff[i + 1] > b->l) {
        PyErr_SetString(PyExc_ValueError, "link_offsets must rise from 0 to len(links)");
        return -1;
    }
    n += (loff[i + 1] - loff[i]) * field_len(link_body_len(b->waker_link_attrs));
    if (r[LINK_SPAN]) n += field_len(link_body_len(b->link_attrs));
    return n;
}

/* Writes row i's span, whose indices span_len has checked. */
static char *put_span(char *o, const batch *b, Py_ssize_t i, const uint64_t *r, const uint64_t *v, Py_ssize_t body_len) {
    const int64_t *off = b->offsets.buf, *loff = b->link_offsets.buf;
    const uint64_t *ch = b->changes.buf, *ln = b->links.buf;
    const piece *pcs = b->pieces;
    *o++ = 0x12;
    o = put_varint(o, (uint64_t)body_len);
    memcpy(o, "\x0a\x10", 2);
    o = put_be64(put_be64(o + 2, r[TRACE_HI]), r[TRACE_LO]);
    memcpy(o, "\x12\x08", 2);
    o = put_be64(o + 2, r[SPAN_ID]);
    if (r[PARENT_ID]) {
        memcpy(o, "\x22\x08", 2);
        o = put_be64(o + 2, r[PARENT_ID]);
    }
    o = put(o, pcs[r[HEAD]]);
    *o++ = 0x39;
    o = put_le64(o, r[START_NS]);
    *o++ = 0x41;
    o = put_le64(o, r[END_NS]);
    o = put_ints(o, b, v, 0, b->head_ints);
    o = put(put(put(o, pcs[r[FN]]), pcs[r[SITE]]), pcs[r[EXISTED]]);
    o = put_ints(o, b, v, b->head_ints, b->k);
    o = put(o, pcs[r[TAIL]]);
    for (int64_t j = off[i]; j < off[i + 1]; j++) o = put_event(o, b, ch[3 * j], pcs[ch[3 * j + 1]], ch[3 * j + 2]);
    o = put_event(o, b, r[END_NS], pcs[r[END_BODY]], UINT64_MAX);
    if (r[LINK_SPAN]) o = put_link(o, r[LINK_HI], r[LINK_LO], r[LINK_SPAN], b->link_attrs);
    for (int64_t j = loff[i]; j < loff[i + 1]; j++) o = put_link(o, ln[3 * j], ln[3 * j + 1], ln[3 * j + 2], b->waker_link_attrs);
    memcpy(o, "\x7a\x00\x85\x01", 4);  /* status {} (the SDK always sets it), flags (fixed32, tag 16) */
    memcpy(o + 4, SPAN_FLAGS, 4);
    return o + 8;
}

/* Row i's values, from column-major arrays (numpy fills whole columns fastest). */
static void gather(const Py_buffer *view, Py_ssize_t cols, Py_ssize_t n, Py_ssize_t i, uint64_t *out) {
    for (Py_ssize_t c = 0; c < cols; c++) out[c] = ((const uint64_t *)view->buf)[c * n + i];
}

static PyObject *encode_rows(const batch *b) {
    PyObject *out = PyList_New(b->n);
    uint64_t r[ROW_COLS], v[MAX_INTS];
    for (Py_ssize_t i = 0; out && i < b->n; i++) {
        gather(&b->rows, ROW_COLS, b->n, i, r);
        gather(&b->ints, b->k, b->n, i, v);
        Py_ssize_t body = span_len(b, i, r, v);
        if (body < 0) { Py_CLEAR(out); break; }
        Py_ssize_t total = field_len(body);
        PyObject *span = PyBytes_FromStringAndSize(NULL, total);
        if (!span) { Py_CLEAR(out); break; }
        char *start = PyBytes_AS_STRING(span);
        if (put_span(start, b, i, r, v, body) != start + total) {  /* a length rule out of step with its writer (one that wrote less) */
            Py_DECREF(span);
            Py_CLEAR(out);
            PyErr_SetString(PyExc_SystemError, "span length mismatch");
            break;
        }
        PyList_SET_ITEM(out, i, span);
    }
    return out;
}

/* A C-contiguous buffer of 8-byte items, ndim 1 (d0,) or 2 (d0, d1); a dimension < 0: any. */
static int get_array(PyObject *obj, Py_buffer *view, int ndim, Py_ssize_t d0, Py_ssize_t d1, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    if (view->itemsize != 8 || view->ndim != ndim || (d0 >= 0 && view->shape[0] != d0) ||
        (ndim == 2 && d1 >= 0 && view->shape[1] != d1)) {
        PyErr_Format(PyExc_ValueError, "%s: want 8-byte items of shape (%zd, %zd)", what, d0, d1);
        PyBuffer_Release(view);
        view->obj = NULL;
        return -1;
    }
    return 0;
}

static piece *bytes_tuple(PyObject *tuple, Py_ssize_t *count) {
    if (!PyTuple_Check(tuple)) { PyErr_SetString(PyExc_TypeError, "want a tuple of bytes"); return NULL; }
    *count = PyTuple_GET_SIZE(tuple);
    piece *out = PyMem_Malloc(sizeof(piece) * (size_t)(*count ? *count : 1));
    if (!out) { PyErr_NoMemory(); return NULL; }
    for (Py_ssize_t i = 0; i < *count; i++) {
        PyObject *item = PyTuple_GET_ITEM(tuple, i);
        if (!PyBytes_Check(item)) { PyMem_Free(out); PyErr_SetString(PyExc_TypeError, "want a tuple of bytes"); return NULL; }
        out[i] = (piece){PyBytes_AS_STRING(item), PyBytes_GET_SIZE(item)};
    }
    return out;
}

static void release(batch *b) {
    Py_buffer *views[] = {&b->rows, &b->ints, &b->offsets, &b->changes, &b->link_offsets, &b->links};
    for (int i = 0; i < 6; i++) {
        if (views[i]->obj) PyBuffer_Release(views[i]);
    }
    PyMem_Free(b->pieces);
    PyMem_Free(b->prefixes);
}

static int load(batch *b, PyObject *const *args) {
    /* args: rows, ints, offsets, changes, pieces, prefixes, skip_zero, head_ints, link_attrs, link_offsets,
       links, waker_link_attrs, waker_id_prefix */
    if (get_array(args[0], &b->rows, 2, ROW_COLS, -1, "rows") < 0) return -1;
    b->n = b->rows.shape[1];
    b->pieces = bytes_tuple(args[4], &b->npieces);
    b->prefixes = bytes_tuple(args[5], &b->k);
    if (!b->pieces || !b->prefixes) return -1;
    if (b->k > MAX_INTS) { PyErr_SetString(PyExc_ValueError, "too many integer attributes"); return -1; }
    if (get_array(args[1], &b->ints, 2, b->k, b->n, "ints") < 0) return -1;
    if (get_array(args[2], &b->offsets, 1, b->n + 1, -1, "offsets") < 0) return -1;
    if (get_array(args[3], &b->changes, 2, -1, 3, "changes") < 0) return -1;
    b->m = b->changes.shape[0];
    b->skip_zero = PyBytes_Check(args[6]) ? PyBytes_AS_STRING(args[6]) : NULL;
    b->head_ints = PyLong_AsSsize_t(args[7]);
    if (!b->skip_zero || PyBytes_GET_SIZE(args[6]) != b->k || b->head_ints < 0 || b->head_ints > b->k) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "skip_zero and head_ints must fit the prefixes");
        return -1;
    }
    if (get_array(args[9], &b->link_offsets, 1, b->n + 1, -1, "link_offsets") < 0) return -1;
    if (get_array(args[10], &b->links, 2, -1, 3, "links") < 0) return -1;
    b->l = b->links.shape[0];
    piece *attrs[] = {&b->link_attrs, &b->waker_link_attrs, &b->waker_id_prefix};
    for (int a = 0; a < 3; a++) {
        PyObject *arg = args[a == 0 ? 8 : 10 + a];
        if (!PyBytes_Check(arg)) { PyErr_SetString(PyExc_TypeError, "link_attrs, waker_link_attrs, waker_id_prefix: want bytes"); return -1; }
        *attrs[a] = (piece){PyBytes_AS_STRING(arg), PyBytes_GET_SIZE(arg)};
    }
    return 0;
}

static PyObject *encode(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 13) {
        PyErr_SetString(PyExc_TypeError, "encode takes 13 arguments");
        return NULL;
    }
    batch b = {0};
    PyObject *out = load(&b, args) < 0 ? NULL : encode_rows(&b);
    release(&b);
    return out;
}

/* lookup(keys, table_keys, table_values, out) -> misses: out[i] = the value of keys[i] in the table,
or UINT64_MAX where it has none. A hash table built per call: fastspans interns a few hundred pcs and
state pairs and looks up every row's; numpy's searchsorted took ~45 ns a row here, np.unique ~90. */
static int64_t *hash_table(const uint64_t *keys, Py_ssize_t count, uint64_t *mask) {
    uint64_t size = 2;
    while (size < 2 * (uint64_t)count) size <<= 1;
    int64_t *slots = PyMem_Malloc(size * sizeof(int64_t));
    if (!slots) { PyErr_NoMemory(); return NULL; }
    memset(slots, 0xFF, size * sizeof(int64_t));  /* -1: empty */
    *mask = size - 1;
    for (Py_ssize_t j = 0; j < count; j++) {
        uint64_t h = (keys[j] * 0x9E3779B97F4A7C15ULL) >> 17 & *mask;
        while (slots[h] >= 0) h = (h + 1) & *mask;
        slots[h] = j;
    }
    return slots;
}

static Py_ssize_t lookup_all(const Py_buffer *keys, const Py_buffer *tkeys, const Py_buffer *tvals, Py_buffer *out) {
    const uint64_t *k = keys->buf, *tk = tkeys->buf, *tv = tvals->buf;
    uint64_t *o = out->buf, mask;
    int64_t *slots = hash_table(tk, tkeys->shape[0], &mask);
    if (!slots) return -1;
    Py_ssize_t misses = 0;
    for (Py_ssize_t i = 0; i < keys->shape[0]; i++) {
        uint64_t h = (k[i] * 0x9E3779B97F4A7C15ULL) >> 17 & mask;
        while (slots[h] >= 0 && tk[slots[h]] != k[i]) h = (h + 1) & mask;
        o[i] = slots[h] >= 0 ? tv[slots[h]] : UINT64_MAX;
        misses += slots[h] < 0;
    }
    PyMem_Free(slots);
    return misses;
}

static PyObject *lookup(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer v[4] = {{0}};
    Py_ssize_t misses = -1;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "lookup takes 4 arguments");
    } else if (get_array(args[0], &v[0], 1, -1, -1, "keys") == 0 &&
               get_array(args[1], &v[1], 1, -1, -1, "table_keys") == 0 &&
               get_array(args[2], &v[2], 1, v[1].shape[0], -1, "table_values") == 0 &&
               get_array(args[3], &v[3], 1, v[0].shape[0], -1, "out") == 0) {
        misses = v[3].readonly ? (PyErr_SetString(PyExc_ValueError, "out is read-only"), -1) : lookup_all(&v[0], &v[1], &v[2], &v[3]);
    }
    for (int i = 0; i < 4; i++) {
        if (v[i].obj) PyBuffer_Release(&v[i]);
    }
    return misses < 0 ? NULL : PyLong_FromSsize_t(misses);
}

static PyMethodDef methods[] = {
    {"encode", (PyCFunction)(void (*)(void))encode, METH_FASTCALL, "Span fields for a batch of rows (see _spanenc.c)."},
    {"lookup", (PyCFunction)(void (*)(void))lookup, METH_FASTCALL, "Values of uint64 keys in a table (see _spanenc.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "_spanenc", .m_size = -1, .m_methods = methods};

/* The column numbers, for fastspans.py: the layout is written down here only. */
static const char *const ROW_NAMES[ROW_COLS + 1] = {
    "TRACE_HI", "TRACE_LO", "SPAN_ID", "PARENT_ID", "LINK_HI", "LINK_LO", "LINK_SPAN", "START_NS", "END_NS",
    "HEAD", "FN", "SITE", "EXISTED", "TAIL", "END_BODY", "ROW_COLS",
};

PyMODINIT_FUNC PyInit__spanenc(void) {
    PyObject *m = PyModule_Create(&module);
    for (int c = 0; m && c <= ROW_COLS; c++) {
        if (PyModule_AddIntConstant(m, ROW_NAMES[c], c) < 0) Py_CLEAR(m);
    }
    return m;
}
