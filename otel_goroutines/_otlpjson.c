/* OTLP ExportTraceServiceRequest protobuf bytes -> the OTLP/JSON line the file exporter writes.

Why C: protobuf's Python json_format is pure Python (MessageToDict walks every field through its
descriptor, tens of us a span, then json.dumps), and no well-kept library transcodes OTLP protobuf
to OTLP/JSON in C for Python. With it the file exporter takes the same encoded spans as OTLP
(fastspans/_spanenc) instead of GoroutineSpan objects through the SDK.

The output is byte for byte json.dumps(MessageToDict(request, use_integers_for_enums=True),
separators=(",", ":")) with trace and span ids turned from base64 into lowercase hex (OTLP/JSON's
ids): keys are json names in field-number order (as ListFields), a field at its default value is
left out unless it has presence (a message, a oneof member), 64-bit integers are strings, doubles
are Python's repr ("NaN", "Infinity" as strings), strings escaped as json.dumps(ensure_ascii=True),
bytes in base64, enums as integers.

The input must be canonical, as otlp_wire and _spanenc write it (and protobuf serializes): a
message's fields in ascending number, a repeated field's elements adjacent, a singular field once.
Anything else (unknown fields, other wire types, bad UTF-8, truncation, nesting deeper than
protobuf's limit of 100) raises ValueError instead of guessing.

transcode(request: bytes-like) -> bytes
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* --- the schema: the OTLP messages the agent's encoder emits ------------------------------ */

typedef enum { T_MSG, T_STRING, T_BYTES, T_ID /* bytes as hex */, T_BOOL, T_INT64, T_INT32, T_UINT32,
               T_ENUM, T_FIXED64, T_FIXED32, T_DOUBLE } ftype;

typedef struct message message;
typedef struct {
    uint32_t number;
    const char *key;        /* "\"jsonName\":" */
    size_t key_len;
    ftype type;
    char repeated, presence; /* presence: printed even at its default value */
    const message *sub;
} field;

struct message {
    const char *name;
    const field *fields;    /* ascending numbers */
    int count;
    int oneof;              /* every field in one oneof: at most one present */
};

#define F(num, name, type, rep, pres, sub) {num, "\"" name "\":", sizeof(name) + 2, type, rep, pres, sub}
#define MESSAGE(var, name, oneof) static const message var = {name, var##_f, sizeof var##_f / sizeof *var##_f, oneof}

static const message any_value, key_value;
static const field array_value_f[] = {F(1, "values", T_MSG, 1, 1, &any_value)};
MESSAGE(array_value, "ArrayValue", 0);
static const field kvlist_f[] = {F(1, "values", T_MSG, 1, 1, &key_value)};
MESSAGE(kvlist, "KeyValueList", 0);
static const field any_value_f[] = {
    F(1, "stringValue", T_STRING, 0, 1, NULL), F(2, "boolValue", T_BOOL, 0, 1, NULL),
    F(3, "intValue", T_INT64, 0, 1, NULL), F(4, "doubleValue", T_DOUBLE, 0, 1, NULL),
    F(5, "arrayValue", T_MSG, 0, 1, &array_value), F(6, "kvlistValue", T_MSG, 0, 1, &kvlist),
    F(7, "bytesValue", T_BYTES, 0, 1, NULL), F(8, "stringValueStrindex", T_INT32, 0, 1, NULL)};
MESSAGE(any_value, "AnyValue", 1);
static const field key_value_f[] = {
    F(1, "key", T_STRING, 0, 0, NULL), F(2, "value", T_MSG, 0, 1, &any_value), F(3, "keyStrindex", T_INT32, 0, 0, NULL)};
MESSAGE(key_value, "KeyValue", 0);

#define ATTRIBUTES(num) F(num, "attributes", T_MSG, 1, 1, &key_value)
#define DROPPED(num, name) F(num, name, T_UINT32, 0, 0, NULL)

static const field resource_f[] = {ATTRIBUTES(1), DROPPED(2, "droppedAttributesCount")};
MESSAGE(resource, "Resource", 0);
static const field scope_f[] = {
    F(1, "name", T_STRING, 0, 0, NULL), F(2, "version", T_STRING, 0, 0, NULL), ATTRIBUTES(3),
    DROPPED(4, "droppedAttributesCount")};
MESSAGE(scope, "InstrumentationScope", 0);
static const field span_status_f[] = {F(2, "message", T_STRING, 0, 0, NULL), F(3, "code", T_ENUM, 0, 0, NULL)};
MESSAGE(span_status, "Status", 0);
static const field span_event_f[] = {
    F(1, "timeUnixNano", T_FIXED64, 0, 0, NULL), F(2, "name", T_STRING, 0, 0, NULL), ATTRIBUTES(3),
    DROPPED(4, "droppedAttributesCount")};
MESSAGE(span_event, "Span.Event", 0);
static const field span_link_f[] = {
    F(1, "traceId", T_ID, 0, 0, NULL), F(2, "spanId", T_ID, 0, 0, NULL), F(3, "traceState", T_STRING, 0, 0, NULL),
    ATTRIBUTES(4), DROPPED(5, "droppedAttributesCount"), F(6, "flags", T_FIXED32, 0, 0, NULL)};
MESSAGE(span_link, "Span.Link", 0);
static const field span_f[] = {
    F(1, "traceId", T_ID, 0, 0, NULL), F(2, "spanId", T_ID, 0, 0, NULL), F(3, "traceState", T_STRING, 0, 0, NULL),
    F(4, "parentSpanId", T_ID, 0, 0, NULL), F(5, "name", T_STRING, 0, 0, NULL), F(6, "kind", T_ENUM, 0, 0, NULL),
    F(7, "startTimeUnixNano", T_FIXED64, 0, 0, NULL), F(8, "endTimeUnixNano", T_FIXED64, 0, 0, NULL),
    ATTRIBUTES(9), DROPPED(10, "droppedAttributesCount"), F(11, "events", T_MSG, 1, 1, &span_event),
    DROPPED(12, "droppedEventsCount"), F(13, "links", T_MSG, 1, 1, &span_link), DROPPED(14, "droppedLinksCount"),
    F(15, "status", T_MSG, 0, 1, &span_status), F(16, "flags", T_FIXED32, 0, 0, NULL)};
MESSAGE(span, "Span", 0);
static const field scope_spans_f[] = {
    F(1, "scope", T_MSG, 0, 1, &scope), F(2, "spans", T_MSG, 1, 1, &span), F(3, "schemaUrl", T_STRING, 0, 0, NULL)};
MESSAGE(scope_spans, "ScopeSpans", 0);
static const field resource_spans_f[] = {
    F(1, "resource", T_MSG, 0, 1, &resource), F(2, "scopeSpans", T_MSG, 1, 1, &scope_spans),
    F(3, "schemaUrl", T_STRING, 0, 0, NULL)};
MESSAGE(resource_spans, "ResourceSpans", 0);
static const field request_f[] = {F(1, "resourceSpans", T_MSG, 1, 1, &resource_spans)};
MESSAGE(request, "ExportTraceServiceRequest", 0);

/* --- output ------------------------------------------------------------------------------- */

#define MAX_DEPTH 100  /* protobuf's default recursion limit */

typedef struct { char *buf; size_t n, cap; } out;

static int fail(const message *m, const char *what, uint64_t number) {
    PyErr_Format(PyExc_ValueError, "%s: %s (field %llu)", m->name, what, (unsigned long long)number);
    return -1;
}

/* Room for `more` bytes at o->buf + o->n. */
static int reserve(out *o, size_t more) {
    if (o->n + more <= o->cap) return 0;
    size_t cap = o->cap * 2 > o->n + more ? o->cap * 2 : o->n + more;
    char *buf = PyMem_Realloc(o->buf, cap);
    if (buf == NULL) { PyErr_NoMemory(); return -1; }
    o->buf = buf, o->cap = cap;
    return 0;
}

/* Writers take and return the write position: stores through o->buf (a char *) would alias o->n
and force a reload a byte. The caller has reserved room for the longest form. */
static inline char *put(char *w, const char *s, size_t n) { memcpy(w, s, n); return w + n; }

static char *put_u64(char *w, uint64_t v) {
    char tmp[20];
    int i = 20;
    do { tmp[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    return put(w, tmp + i, (size_t)(20 - i));
}

static char *put_i64(char *w, int64_t v) {
    if (v >= 0) return put_u64(w, (uint64_t)v);
    *w++ = '-';
    return put_u64(w, 0 - (uint64_t)v);
}

static const char HEX[] = "0123456789abcdef";

static char *put_hex(char *w, const uint8_t *p, size_t n) {
    *w++ = '"';
    for (size_t i = 0; i < n; i++) { *w++ = HEX[p[i] >> 4]; *w++ = HEX[p[i] & 15]; }
    *w++ = '"';
    return w;
}

static char *put_base64(char *w, const uint8_t *p, size_t n) {
    static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    *w++ = '"';
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (i + 1 < n ? (uint32_t)p[i + 1] << 8 : 0) | (i + 2 < n ? p[i + 2] : 0);
        *w++ = B64[v >> 18];
        *w++ = B64[v >> 12 & 63];
        *w++ = i + 1 < n ? B64[v >> 6 & 63] : '=';
        *w++ = i + 2 < n ? B64[v & 63] : '=';
    }
    *w++ = '"';
    return w;
}

static char *put_u16_escape(char *w, uint32_t u) {
    char q[6] = {'\\', 'u', HEX[u >> 12 & 15], HEX[u >> 8 & 15], HEX[u >> 4 & 15], HEX[u & 15]};
    return put(w, q, 6);
}

/* An ASCII character json.dumps escapes: quote, backslash, control characters and DEL. */
static char *put_ascii_escape(char *w, uint8_t c) {
    static const char SHORT[32] = {[8] = 'b', [9] = 't', [10] = 'n', [12] = 'f', [13] = 'r'};
    if (c == '"' || c == '\\') { *w++ = '\\'; *w++ = (char)c; return w; }
    if (c < 32 && SHORT[c]) { *w++ = '\\'; *w++ = SHORT[c]; return w; }
    return put_u16_escape(w, c);
}

/* The code point of the UTF-8 sequence at s[*i] (advancing *i), or -1 if it is not strict UTF-8. */
static int32_t utf8_next(const uint8_t *s, size_t n, size_t *i) {
    static const uint32_t MIN[4] = {0, 0x80, 0x800, 0x10000};
    uint8_t c = s[*i];
    int more = c >= 0xF0 ? 3 : c >= 0xE0 ? 2 : c >= 0xC0 ? 1 : -1;
    if (more < 0 || c >= 0xF8 || *i + (size_t)more >= n) return -1;
    uint32_t cp = c & (0x3F >> more);
    for (int k = 1; k <= more; k++) {
        if ((s[*i + k] & 0xC0) != 0x80) return -1;
        cp = cp << 6 | (s[*i + k] & 0x3F);
    }
    if (cp < MIN[more] || cp > 0x10FFFF || (cp >= 0xD800 && cp < 0xE000)) return -1;
    *i += (size_t)more + 1;
    return (int32_t)cp;
}

static inline int plain(uint8_t c) { return c >= 0x20 && c < 0x7f && c != '"' && c != '\\'; }

/* A string as json.dumps(ensure_ascii=True) writes it (at most 6 bytes out per byte in); NULL if
it is not UTF-8. Runs of printable ASCII, the common case, are copied whole. */
static char *put_string(char *w, const uint8_t *s, size_t n) {
    *w++ = '"';
    for (size_t i = 0; i < n;) {
        size_t run = i;
        while (run < n && plain(s[run])) run++;
        w = put(w, (const char *)s + i, run - i);
        if ((i = run) == n) break;
        if (s[i] < 0x80) { w = put_ascii_escape(w, s[i++]); continue; }
        int32_t cp = utf8_next(s, n, &i);
        if (cp < 0) return NULL;
        if (cp >= 0x10000) {  /* a surrogate pair, as Python's json */
            w = put_u16_escape(w, 0xD800 | (uint32_t)(cp - 0x10000) >> 10);
            w = put_u16_escape(w, 0xDC00 | ((uint32_t)cp & 0x3FF));
        } else w = put_u16_escape(w, (uint32_t)cp);
    }
    *w++ = '"';
    return w;
}

#define DOUBLE_MAX_CHARS 32  /* repr: sign, 17 digits, point, e-308 */

/* A double as MessageToDict then json.dumps write it: repr, or a string for what JSON lacks. NULL
on error (no memory). */
static char *put_double(char *w, uint64_t bits) {
    double v;
    memcpy(&v, &bits, 8);
    const char *special = v != v ? "\"NaN\"" : v == HUGE_VAL ? "\"Infinity\"" : v == -HUGE_VAL ? "\"-Infinity\"" : NULL;
    if (special) return put(w, special, strlen(special));
    char *s = PyOS_double_to_string(v, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);  /* float.__repr__ */
    if (s == NULL) return NULL;
    size_t n = strlen(s);
    w = n <= DOUBLE_MAX_CHARS ? put(w, s, n) : NULL;
    PyMem_Free(s);
    return w;
}

/* --- input -------------------------------------------------------------------------------- */

typedef struct { const uint8_t *p, *end; } reader;

static int read_varint(reader *r, uint64_t *v) {
    uint64_t x = 0;
    for (int shift = 0; shift < 64 && r->p < r->end; shift += 7) {
        uint8_t b = *r->p++;
        x |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) { *v = x; return 0; }
    }
    return -1;
}

static int wire_type(ftype t) {
    switch (t) {
    case T_MSG: case T_STRING: case T_BYTES: case T_ID: return 2;
    case T_FIXED64: case T_DOUBLE: return 1;
    case T_FIXED32: return 5;
    default: return 0;
    }
}

/* One field's value: a number (wire types 0, 1, 5) or a length-delimited payload. */
typedef struct { uint64_t num; const uint8_t *p; size_t n; } value;

static int read_value(reader *r, int wt, value *v) {
    size_t width = wt == 1 ? 8 : wt == 5 ? 4 : 0;
    if (wt == 0) return read_varint(r, &v->num);
    if (wt == 2) {
        if (read_varint(r, &v->num) || v->num > (uint64_t)(r->end - r->p)) return -1;
        v->p = r->p, v->n = (size_t)v->num;
        r->p += v->n;
        return 0;
    }
    if ((size_t)(r->end - r->p) < width) return -1;
    v->num = 0;
    for (size_t i = 0; i < width; i++) v->num |= (uint64_t)r->p[i] << (8 * i);
    r->p += width;
    return 0;
}

/* The field numbered `number` at or after `from`: fields must come in ascending order. */
static const field *find(const message *m, const field *from, uint64_t number) {
    for (const field *f = from; f < m->fields + m->count; f++) {
        if (f->number == number) return f;
    }
    return NULL;
}

/* --- transcoding -------------------------------------------------------------------------- */

static int message_json(out *o, const message *m, const uint8_t *p, size_t n, int depth);

static int is_default(const field *f, const value *v) {
    return !f->presence && (wire_type(f->type) == 2 ? v->n == 0 : v->num == 0);
}

/* Room for the key, its separators and the value's longest JSON form (a message reserves its own). */
static size_t worst_case(const field *f, const value *v) {
    size_t text = f->type == T_MSG ? 0 : wire_type(f->type) == 2 ? 6 * v->n : DOUBLE_MAX_CHARS;
    return f->key_len + text + 8;
}

/* A scalar field's value at w; NULL on error (bad UTF-8, no memory). */
static char *scalar_json(char *w, const field *f, const value *v) {
    switch (f->type) {
    case T_STRING: return put_string(w, v->p, v->n);
    case T_BYTES: return put_base64(w, v->p, v->n);
    case T_ID: return put_hex(w, v->p, v->n);
    case T_BOOL: return v->num ? put(w, "true", 4) : put(w, "false", 5);
    case T_INT64: *w++ = '"'; w = put_i64(w, (int64_t)v->num); *w++ = '"'; return w;
    case T_FIXED64: *w++ = '"'; w = put_u64(w, v->num); *w++ = '"'; return w;
    case T_INT32: case T_ENUM: return put_i64(w, (int32_t)(uint32_t)v->num);
    case T_UINT32: case T_FIXED32: return put_u64(w, (uint32_t)v->num);
    case T_DOUBLE: return put_double(w, v->num);
    default: return NULL;
    }
}

/* Where a field goes in the message's JSON object: after a comma, under its key, in its array. */
typedef struct { const field *last, *open; int keys; } cursor;

static char *open_field(char *w, cursor *c, const field *f) {
    if (c->open && c->open != f) { *w++ = ']'; c->open = NULL; }
    if (c->open == f) { *w++ = ','; return w; }
    if (c->keys++) *w++ = ',';
    w = put(w, f->key, f->key_len);
    if (f->repeated) { *w++ = '['; c->open = f; }
    return w;
}

/* One field of message m: its key (and array), then its value. */
static int field_json(out *o, const message *m, cursor *c, const field *f, const value *v, int depth) {
    if (reserve(o, worst_case(f, v))) return -1;
    char *w = open_field(o->buf + o->n, c, f);
    o->n = (size_t)(w - o->buf);
    if (f->type == T_MSG) return message_json(o, f->sub, v->p, v->n, depth + 1);
    if ((w = scalar_json(w, f, v)) == NULL) return PyErr_Occurred() ? -1 : fail(m, "invalid UTF-8", f->number);
    o->n = (size_t)(w - o->buf);
    return 0;
}

/* The next field of a message; 1 at its end, -1 on error. */
static int next_field(reader *r, const message *m, cursor *c, const field **f, value *v) {
    uint64_t tag;
    if (r->p >= r->end) return 1;
    if (read_varint(r, &tag)) return fail(m, "truncated tag", 0);
    *f = find(m, c->last ? c->last : m->fields, tag >> 3);
    if (*f == NULL) return fail(m, find(m, m->fields, tag >> 3) ? "field out of order" : "unknown field", tag >> 3);
    if ((int)(tag & 7) != wire_type((*f)->type)) return fail(m, "unexpected wire type", tag >> 3);
    if (*f == c->last && !(*f)->repeated) return fail(m, "singular field repeated", tag >> 3);
    if (m->oneof && c->last) return fail(m, "second member of a oneof", tag >> 3);
    if (read_value(r, (int)(tag & 7), v)) return fail(m, "truncated value", tag >> 3);
    c->last = *f;
    return 0;
}

static int message_json(out *o, const message *m, const uint8_t *p, size_t n, int depth) {
    if (depth > MAX_DEPTH) return fail(m, "nested too deep", 0);
    reader r = {p, p + n};
    cursor c = {NULL, NULL, 0};
    const field *f;
    value v = {0, NULL, 0};
    int rc;
    if (reserve(o, 1)) return -1;
    o->buf[o->n++] = '{';
    while ((rc = next_field(&r, m, &c, &f, &v)) == 0) {
        if (!is_default(f, &v) && field_json(o, m, &c, f, &v, depth)) return -1;
    }
    if (rc < 0 || reserve(o, 2)) return -1;
    if (c.open) o->buf[o->n++] = ']';
    o->buf[o->n++] = '}';
    return 0;
}

static PyObject *transcode(PyObject *self, PyObject *arg) {
    Py_buffer in;
    if (PyObject_GetBuffer(arg, &in, PyBUF_SIMPLE)) return NULL;
    out o = {NULL, 0, 0};
    PyObject *res = NULL;
    /* OTLP/JSON of the agent's spans is 2.2-2.4 times their protobuf: room enough, no realloc */
    if (reserve(&o, (size_t)in.len * 5 / 2 + 64) == 0 && message_json(&o, &request, in.buf, (size_t)in.len, 0) == 0)
        res = PyBytes_FromStringAndSize(o.buf, (Py_ssize_t)o.n);
    PyMem_Free(o.buf);
    PyBuffer_Release(&in);
    return res;
}

static PyMethodDef methods[] = {
    {"transcode", transcode, METH_O, "ExportTraceServiceRequest bytes -> its OTLP/JSON line (bytes, no newline)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_otlpjson", NULL, -1, methods};

PyMODINIT_FUNC PyInit__otlpjson(void) { return PyModule_Create(&module); }
