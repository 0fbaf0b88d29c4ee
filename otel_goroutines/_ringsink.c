// RecordSink: where libbpf's ring-buffer consumer (inside libbcc) puts the kernel's records.
//
// Why compiled: bcc hands each record to a Python callback through ctypes, about 1 us a record,
// most of the agent's budget per goroutine. libbpf instead calls sink_sample() below, which
// copies each record into one growing buffer per record kind; Python then takes each buffer whole
// and reads it as a numpy array of the kind's fixed-size records (otel_goroutines/kernel_records.py).
// Nothing here parses a record beyond its kind, the first u32 (bpf/records.h).
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_KINDS 16

typedef struct {
    char *data;
    size_t len, cap;
} Buffer;

typedef struct {
    PyObject_HEAD
    Buffer kinds[MAX_KINDS];
    size_t record_size[MAX_KINDS];  // 0: a kind not expected
    unsigned long long malformed;   // records of an unknown kind or of the wrong size
    unsigned long long no_memory;   // records dropped because a buffer could not grow
} RecordSink;

// libbpf's ring_buffer_sample_fn. Runs with the GIL released (ctypes released it around the
// poll): it must not touch Python objects. Returning 0 keeps the consumer going.
static int sink_sample(void *ctx, void *data, size_t size) {
    RecordSink *sink = ctx;
    uint32_t kind;
    if (size < sizeof(kind)) {
        sink->malformed++;
        return 0;
    }
    memcpy(&kind, data, sizeof(kind));
    if (kind >= MAX_KINDS || sink->record_size[kind] != size) {
        sink->malformed++;
        return 0;
    }
    Buffer *b = &sink->kinds[kind];
    if (b->len + size > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 64 * size;
        while (cap < b->len + size)
            cap *= 2;
        char *grown = realloc(b->data, cap);
        if (!grown) {
            sink->no_memory++;
            return 0;
        }
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, size);
    b->len += size;
    return 0;
}

static int RecordSink_init(RecordSink *self, PyObject *args, PyObject *kwds) {
    PyObject *sizes;  // {kind: record size}
    if (!PyArg_ParseTuple(args, "O!", &PyDict_Type, &sizes))
        return -1;
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(sizes, &pos, &key, &value)) {
        long kind = PyLong_AsLong(key);
        size_t size = PyLong_AsSize_t(value);
        if (PyErr_Occurred())
            return -1;
        if (kind < 0 || kind >= MAX_KINDS || size == 0) {
            PyErr_SetString(PyExc_ValueError, "record kinds are 0..15 with a non-zero size");
            return -1;
        }
        self->record_size[kind] = size;
    }
    return 0;
}

static void RecordSink_dealloc(RecordSink *self) {
    for (int i = 0; i < MAX_KINDS; i++)
        free(self->kinds[i].data);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

// take(kind) -> bytes: the records of that kind received since the last take, and forget them.
// The buffer keeps its memory (up to 4x what it last held) for the next round.
static PyObject *RecordSink_take(RecordSink *self, PyObject *arg) {
    long kind = PyLong_AsLong(arg);
    if (PyErr_Occurred())
        return NULL;
    if (kind < 0 || kind >= MAX_KINDS) {
        PyErr_SetString(PyExc_ValueError, "record kinds are 0..15");
        return NULL;
    }
    Buffer *b = &self->kinds[kind];
    PyObject *out = PyBytes_FromStringAndSize(b->data, b->len);
    if (b->cap > 4 * b->len && b->cap > (1 << 20)) {  // a burst is over: give the memory back
        free(b->data);
        b->data = NULL;
        b->cap = 0;
    }
    b->len = 0;
    return out;
}

static PyObject *RecordSink_callback(RecordSink *self, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromVoidPtr((void *)sink_sample);
}

static PyObject *RecordSink_context(RecordSink *self, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromVoidPtr(self);
}

static PyObject *RecordSink_get_malformed(RecordSink *self, void *closure) {
    return PyLong_FromUnsignedLongLong(self->malformed);
}

static PyObject *RecordSink_get_no_memory(RecordSink *self, void *closure) {
    return PyLong_FromUnsignedLongLong(self->no_memory);
}

static PyMethodDef RecordSink_methods[] = {
    {"take", (PyCFunction)RecordSink_take, METH_O, "take(kind) -> bytes of that kind's records, then forget them"},
    {"callback_address", (PyCFunction)RecordSink_callback, METH_NOARGS,
     "address of the C sample callback (libbpf ring_buffer_sample_fn)"},
    {"context_address", (PyCFunction)RecordSink_context, METH_NOARGS,
     "the ctx pointer to pass with the callback (this object; keep it alive while the ring buffer lives)"},
    {NULL},
};

static PyGetSetDef RecordSink_getset[] = {
    {"malformed", (getter)RecordSink_get_malformed, NULL, "records of an unknown kind or size", NULL},
    {"no_memory", (getter)RecordSink_get_no_memory, NULL, "records dropped: no memory to keep them", NULL},
    {NULL},
};

static PyTypeObject RecordSinkType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "otel_goroutines._ringsink.RecordSink",
    .tp_doc = "RecordSink({kind: size}): collects fixed-size ring-buffer records by kind, from C",
    .tp_basicsize = sizeof(RecordSink),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)RecordSink_init,
    .tp_dealloc = (destructor)RecordSink_dealloc,
    .tp_methods = RecordSink_methods,
    .tp_getset = RecordSink_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ringsink", "Ring-buffer records collected in C, by kind.", -1, NULL,
};

PyMODINIT_FUNC PyInit__ringsink(void) {
    if (PyType_Ready(&RecordSinkType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&RecordSinkType);
    if (PyModule_AddObject(m, "RecordSink", (PyObject *)&RecordSinkType) < 0) {
        Py_DECREF(&RecordSinkType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
