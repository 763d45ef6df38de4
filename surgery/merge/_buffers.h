/* Python buffers and floats for the kernels of _elementwise.c: their arguments, opened and released.
 * Included by _elementwise.c only (MAX_INPUTS is defined there). */

/* the buffers of out and of each input; returns the inputs' count, or -1 with an exception set */
static int get_buffers(PyObject *out_obj, PyObject *seq, Py_buffer *out, Py_buffer *in, const void **ptrs) {
    if (PyObject_GetBuffer(out_obj, out, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    const char *fmt = out->format ? out->format : "B";
    if (strcmp(fmt, "f") != 0 && strcmp(fmt, "H") != 0) {
        PyErr_SetString(PyExc_ValueError, "out must be a float32 or uint16 (bfloat16 bits) buffer");
        PyBuffer_Release(out);
        return -1;
    }
    PyObject *fast = PySequence_Fast(seq, "inputs must be a sequence of buffers");
    int m = fast ? (int)PySequence_Fast_GET_SIZE(fast) : -1;
    if (fast && (m < 1 || m > MAX_INPUTS)) {
        PyErr_Format(PyExc_ValueError, "between 1 and %d inputs, got %d", MAX_INPUTS, m);
        m = -1;
    }
    int got = 0;
    for (; m > 0 && got < m; got++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, got), &in[got], PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
            break;
        if (in[got].len != out->len || strcmp(in[got].format ? in[got].format : "B", fmt) != 0) {
            PyErr_SetString(PyExc_ValueError, "every input must be a buffer of the output's type and length");
            got++;
            break;
        }
        ptrs[got] = in[got].buf;
    }
    Py_XDECREF(fast);
    if (m > 0 && fmt[0] == 'H' && m > IO_MAX)
        PyErr_Format(PyExc_ValueError, "at most %d bfloat16 inputs, got %d", IO_MAX, m);
    if (PyErr_Occurred()) {
        for (int i = 0; i < got; i++)
            PyBuffer_Release(&in[i]);
        PyBuffer_Release(out);
        return -1;
    }
    return m;
}

static void release(Py_buffer *out, Py_buffer *in, int m) {
    for (int i = 0; i < m; i++)
        PyBuffer_Release(&in[i]);
    PyBuffer_Release(out);
}

/* a sequence of m Python floats as float32 */
static int get_floats(PyObject *seq, float *dst, int m, const char *what) {
    PyObject *fast = PySequence_Fast(seq, what);
    if (!fast)
        return -1;
    if (PySequence_Fast_GET_SIZE(fast) != m) {
        PyErr_Format(PyExc_ValueError, "%s: expected %d values", what, m);
        Py_DECREF(fast);
        return -1;
    }
    for (int i = 0; i < m; i++) {
        double v = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(fast, i));
        if (v == -1.0 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
        dst[i] = (float)v;
    }
    Py_DECREF(fast);
    return 0;
}

/* what task arithmetic and TIES take: out, the inputs, a base of out's type and length, one weight per input */
struct group {
    Py_buffer out, base, in[MAX_INPUTS];
    const void *ptrs[MAX_INPUTS];
    float w[MAX_INPUTS];
    int m; /* the inputs' count */
};

/* 0, or -1 with an exception set and every buffer released */
static int open_group(PyObject *out_obj, PyObject *base_obj, PyObject *inputs, PyObject *weights, struct group *g) {
    g->m = get_buffers(out_obj, inputs, &g->out, g->in, g->ptrs);
    if (g->m < 0)
        return -1;
    if (PyObject_GetBuffer(base_obj, &g->base, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        release(&g->out, g->in, g->m);
        return -1;
    }
    const char *bf = g->base.format ? g->base.format : "B", *of = g->out.format ? g->out.format : "B";
    if (g->base.len != g->out.len || strcmp(bf, of) != 0)
        PyErr_SetString(PyExc_ValueError, "base must be a buffer of the output's type and length");
    if (PyErr_Occurred() || get_floats(weights, g->w, g->m, "weights") < 0) {
        PyBuffer_Release(&g->base);
        release(&g->out, g->in, g->m);
        return -1;
    }
    return 0;
}

/* NULL (the exception set by the caller, or already set), after releasing every buffer of the group */
static PyObject *close_group(struct group *g) {
    PyBuffer_Release(&g->base);
    release(&g->out, g->in, g->m);
    return NULL;
}
