// A place to measure what one uprobe trap costs on this machine (the overhead budget, shedding.py).
//
// Why compiled: the probed instruction must be one the kernel emulates, as the agent's own probe
// points are (PUSH on x86-64, B on arm64: one trap, no single step), and the calls must be timed
// without Python's own time per call. og_trap_site is written in assembly so that its first
// instruction is known; calls(n) times n calls to it and returns the CPU time (this thread's: a
// trap is system time; time preempted is not counted) per call, in nanoseconds.
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <time.h>

#if defined(__x86_64__)
__asm__(".text\n.globl og_trap_site\n.type og_trap_site,@function\n"
        "og_trap_site:\n\tpush %rbp\n\tpop %rbp\n\tret\n.size og_trap_site, .-og_trap_site\n");
#elif defined(__aarch64__)
__asm__(".text\n.globl og_trap_site\n.type og_trap_site,@function\n"
        "og_trap_site:\n\tb 1f\n1:\tret\n.size og_trap_site, .-og_trap_site\n");
#else
#error "og_trap_site: x86-64 and arm64 only"
#endif
void og_trap_site(void);

static PyObject *calls(PyObject *self, PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if (n <= 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "calls(n): n must be positive");
        return NULL;
    }
    struct timespec a, b;
    Py_BEGIN_ALLOW_THREADS
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
    for (long i = 0; i < n; i++)
        og_trap_site();
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
}

static PyMethodDef methods[] = {
    {"calls", calls, METH_O, "calls(n) -> ns per call of og_trap_site, over n calls"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_trapsite", "A uprobe site for measuring the trap.", -1, methods};

PyMODINIT_FUNC PyInit__trapsite(void) { return PyModule_Create(&module); }
