/* mergekit's linear and task arithmetic, one pass per block (surgery.merge.linear, .task_arithmetic, .ties).
 *
 * The same steps as the numpy backends of those modules, which document them, without a pass over memory per step:
 *
 * linear(out, inputs, coeffs, denominator, bf16) -> None
 *   acc = +0; acc = fmaf(x_i, c_i, acc) for each input (torch's addcmul_ is a fused multiply-add);
 *   acc /= denominator unless it is None; rounded to bfloat16 when bf16 is true.
 * task_arithmetic(out, base, inputs, weights, divisor, lam, bf16) -> None
 *   with r() rounding to bfloat16 when bf16 is true (identity otherwise): d_i = r(r(x_i - base) * w_i);
 *   mixed = r(+0 + d_0 + d_1 + ...); mixed = r(mixed / divisor) unless divisor is None; mixed = r(mixed * lam)
 *   unless lam == 1; out = r(base + mixed).
 *
 * ties(out, base, deltas, weights, normalize, lam, bf16) -> None
 *   the deltas already sparsified (kept entries, ±0 elsewhere): d_i = r(delta_i * w_i); the sign elected by
 *   r(+0 + sum d_i) (>= 0: +1, else -1); mixed = r(+0 + the d_i of that sign); divisor = r(+0 + their w_i),
 *   1 where 0; mixed = r(mixed / divisor) when normalize; r(mixed * lam) unless lam == 1; out = r(base + mixed).
 *
 * linear and task_arithmetic also take bfloat16 buffers (uint16 bit patterns, at most 8 inputs) for inputs, base and
 * out: the result is rounded to bfloat16 and written as such, and the call returns the number of non-finite
 * results (the float32 form returns None).
 *
 * Every buffer is C-contiguous float32 of one length (the inputs hold the exact values of their stored dtype;
 * out receives float32 values exact in the merge dtype). Compiled with -ffp-contract=off: the only fused step
 * is the explicit fmaf. The GIL is released while a kernel runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_INPUTS 64

/* float32 -> the nearest bfloat16, ties to even (torch's rounding), as a float32; branch-free, so the loops
   below vectorise. NaN stays NaN (the caller refuses non-finite results). */
static inline float round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    u = (u & 0x7fffffffu) > 0x7f800000u ? u : r;
    memcpy(&f, &u, 4);
    return f;
}

#define TILE 512 /* entries per tile: the loops over one input at a time stay in L1 */

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
/* one clone with the FMA instruction, chosen at load time where the CPU has it; the default clone calls
   libm's fmaf, which is the same correctly rounded fused operation */
#define FMA_CLONES __attribute__((target_clones("fma", "default")))
#else
#define FMA_CLONES
#endif

FMA_CLONES
static void linear_loop(float *restrict out, const float **in, const float *c, int m, Py_ssize_t n, int normalize,
                        float den, int bf16) {
    float acc[TILE];
    for (Py_ssize_t j0 = 0; j0 < n; j0 += TILE) {
        Py_ssize_t len = n - j0 < TILE ? n - j0 : TILE;
        for (Py_ssize_t j = 0; j < len; j++)
            acc[j] = 0.0f;
        for (int i = 0; i < m; i++) {
            const float *restrict x = in[i] + j0;
            float ci = c[i];
            for (Py_ssize_t j = 0; j < len; j++)
                acc[j] = fmaf(x[j], ci, acc[j]);
        }
        for (Py_ssize_t j = 0; j < len; j++) {
            float a = normalize ? acc[j] / den : acc[j];
            out[j0 + j] = bf16 ? round_bf16(a) : a;
        }
    }
}

/* the same steps with and without the bfloat16 rounding, each a loop the compiler vectorises */
#define TA_LOOP(NAME, R)                                                                                     \
    static void NAME(float *restrict out, const float *restrict base, const float **in, const float *w, int m,    \
                     Py_ssize_t n, int normalize, float divisor, int scale, float lam) {                     \
        float acc[TILE];                                                                                     \
        for (Py_ssize_t j0 = 0; j0 < n; j0 += TILE) {                                                        \
            Py_ssize_t len = n - j0 < TILE ? n - j0 : TILE;                                                  \
            const float *restrict b = base + j0;                                                             \
            for (Py_ssize_t j = 0; j < len; j++)                                                             \
                acc[j] = 0.0f;                                                                               \
            for (int i = 0; i < m; i++) {                                                                    \
                const float *restrict x = in[i] + j0;                                                        \
                float wi = w[i];                                                                             \
                for (Py_ssize_t j = 0; j < len; j++)                                                         \
                    acc[j] += R(R(x[j] - b[j]) * wi);                                                        \
            }                                                                                                \
            for (Py_ssize_t j = 0; j < len; j++) {                                                           \
                float mixed = R(acc[j]);                                                                     \
                if (normalize)                                                                               \
                    mixed = R(mixed / divisor);                                                              \
                if (scale)                                                                                   \
                    mixed = R(mixed * lam);                                                                  \
                out[j0 + j] = R(b[j] + mixed);                                                               \
            }                                                                                                \
        }                                                                                                    \
    }

#define SAME(x) (x)
TA_LOOP(task_arithmetic_bf16, round_bf16)
TA_LOOP(task_arithmetic_f32, SAME)

/* TIES after sparsification: the deltas (kept entries, ±0 elsewhere) weighted, the sign elected by their sum,
   the deltas agreeing with it summed and divided by the sum of their weights */
#define TIES_MAX 8 /* models per TIES merge in the compiled kernel (each needs a tile of scratch) */
#define TIES_LOOP(NAME, R)                                                                                   \
    static void NAME(float *restrict out, const float *restrict base, const float **in, const float *w, int m,    \
                     Py_ssize_t n, int normalize, int scale, float lam) {                                    \
        float d[TIES_MAX][TILE], sw[TILE], mixed[TILE], div[TILE];                                           \
        int up[TILE];                                                                                        \
        for (Py_ssize_t j0 = 0; j0 < n; j0 += TILE) {                                                        \
            Py_ssize_t len = n - j0 < TILE ? n - j0 : TILE;                                                  \
            for (Py_ssize_t j = 0; j < len; j++)                                                             \
                sw[j] = mixed[j] = div[j] = 0.0f;                                                            \
            for (int i = 0; i < m; i++) {                                                                    \
                const float *restrict x = in[i] + j0;                                                        \
                float wi = w[i], *restrict di = d[i];                                                        \
                for (Py_ssize_t j = 0; j < len; j++) {                                                       \
                    di[j] = R(x[j] * wi);                                                                    \
                    sw[j] += di[j];                                                                          \
                }                                                                                            \
            }                                                                                                \
            for (Py_ssize_t j = 0; j < len; j++)                                                             \
                up[j] = R(sw[j]) >= 0.0f; /* the elected sign: + (also for NaN: - ) */                       \
            for (int i = 0; i < m; i++) {                                                                    \
                const float *restrict di = d[i];                                                             \
                float wi = w[i];                                                                             \
                for (Py_ssize_t j = 0; j < len; j++) {                                                       \
                    /* agree: 1.0 or 0.0; d * 0.0 is ±0, which changes no sum that starts from +0 (and NaN   \
                       stays NaN, as in mergekit's deltas * mask). Products, not branches: signs are random */ \
                    int pos = di[j] > 0.0f, neg = di[j] < 0.0f;                                              \
                    float agree = (float)((pos & up[j]) | (neg & (up[j] ^ 1)));                              \
                    mixed[j] += di[j] * agree;                                                               \
                    div[j] += wi * agree;                                                                    \
                }                                                                                            \
            }                                                                                                \
            if (normalize) /* a divisor of 0 becomes 1 */                                                    \
                for (Py_ssize_t j = 0; j < len; j++) {                                                       \
                    float dv = R(div[j]);                                                                    \
                    mixed[j] = R(R(mixed[j]) / (dv + (float)(dv == 0.0f)));                                  \
                }                                                                                            \
            else                                                                                             \
                for (Py_ssize_t j = 0; j < len; j++)                                                         \
                    mixed[j] = R(mixed[j]);                                                                  \
            if (scale)                                                                                       \
                for (Py_ssize_t j = 0; j < len; j++)                                                         \
                    mixed[j] = R(mixed[j] * lam);                                                            \
            for (Py_ssize_t j = 0; j < len; j++)                                                             \
                out[j0 + j] = R(base[j0 + j] + mixed[j]);                                                    \
        }                                                                                                    \
    }

TIES_LOOP(ties_bf16, round_bf16)
TIES_LOOP(ties_f32, SAME)

/* bfloat16 in and out (uint16 bit patterns): each tile is widened to float32 in the cache, computed by the
   loops above, and narrowed (the values are bfloat16 already: the high half); returns the non-finite count */
#define IO_MAX 8

static inline float widen(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static Py_ssize_t narrow(uint16_t *restrict out, const float *restrict x, Py_ssize_t len) {
    Py_ssize_t bad = 0;
    for (Py_ssize_t j = 0; j < len; j++) {
        uint32_t u;
        memcpy(&u, &x[j], 4);
        out[j] = (uint16_t)(u >> 16);
        bad += (u & 0x7f800000u) == 0x7f800000u;
    }
    return bad;
}

static void widen_tile(float *restrict dst, const uint16_t *restrict src, Py_ssize_t len) {
    for (Py_ssize_t j = 0; j < len; j++)
        dst[j] = widen(src[j]);
}

/* what a tile of a merge needs besides its inputs */
struct merge_args {
    const float *w; /* coefficients (linear) or weights (task arithmetic), one per input */
    int m, normalize, scale;
    float div, lam; /* linear's denominator or task arithmetic's divisor; lambda */
};

static void linear_tile(float *r, const float **t, Py_ssize_t len, const struct merge_args *a) {
    linear_loop(r, t, a->w, a->m, len, a->normalize, a->div, 1);
}

static void task_arithmetic_tile(float *r, const float **t, Py_ssize_t len, const struct merge_args *a) {
    task_arithmetic_bf16(r, t[a->m], t, a->w, a->m, len, a->normalize, a->div, a->scale, a->lam); /* base: last */
}

/* k bfloat16 arrays widened one tile at a time, the tile computed, the result narrowed into out */
static Py_ssize_t io_tiles(uint16_t *out, const uint16_t **in, int k, Py_ssize_t n,
                           void (*tile)(float *, const float **, Py_ssize_t, const struct merge_args *),
                           const struct merge_args *a) {
    float t[IO_MAX + 1][TILE], r[TILE];
    const float *tp[IO_MAX + 1];
    Py_ssize_t bad = 0;
    for (int i = 0; i < k; i++)
        tp[i] = t[i];
    for (Py_ssize_t j0 = 0; j0 < n; j0 += TILE) {
        Py_ssize_t len = n - j0 < TILE ? n - j0 : TILE;
        for (int i = 0; i < k; i++)
            widen_tile(t[i], in[i] + j0, len);
        tile(r, tp, len, a);
        bad += narrow(out + j0, r, len);
    }
    return bad;
}

#include "_buffers.h"

static PyObject *linear(PyObject *self, PyObject *args) {
    PyObject *out_obj, *inputs, *coeffs, *den_obj;
    int bf16;
    if (!PyArg_ParseTuple(args, "OOOOp:linear", &out_obj, &inputs, &coeffs, &den_obj, &bf16))
        return NULL;
    Py_buffer out, in[MAX_INPUTS];
    const void *ptrs[MAX_INPUTS];
    float c[MAX_INPUTS];
    int m = get_buffers(out_obj, inputs, &out, in, ptrs);
    if (m < 0)
        return NULL;
    double den = den_obj == Py_None ? 1.0 : PyFloat_AsDouble(den_obj);
    if (get_floats(coeffs, c, m, "coeffs") < 0 || (den == -1.0 && PyErr_Occurred())) {
        release(&out, in, m);
        return NULL;
    }
    int io = out.itemsize == 2;
    Py_ssize_t n = out.len / out.itemsize, bad = 0;
    Py_BEGIN_ALLOW_THREADS;
    if (io) {
        struct merge_args a = {c, m, den_obj != Py_None, 0, (float)den, 1.0f};
        bad = io_tiles((uint16_t *)out.buf, (const uint16_t **)ptrs, m, n, linear_tile, &a);
    } else
        linear_loop((float *)out.buf, (const float **)ptrs, c, m, n, den_obj != Py_None, (float)den, bf16);
    Py_END_ALLOW_THREADS;
    release(&out, in, m);
    if (io)
        return PyLong_FromSsize_t(bad);
    Py_RETURN_NONE;
}

static PyObject *task_arithmetic(PyObject *self, PyObject *args) {
    PyObject *out_obj, *base_obj, *inputs, *weights, *div_obj;
    double lam;
    int bf16;
    struct group g;
    if (!PyArg_ParseTuple(args, "OOOOOdp:task_arithmetic", &out_obj, &base_obj, &inputs, &weights, &div_obj, &lam,
                          &bf16) ||
        open_group(out_obj, base_obj, inputs, weights, &g) < 0)
        return NULL;
    double divisor = div_obj == Py_None ? 1.0 : PyFloat_AsDouble(div_obj);
    if (divisor == -1.0 && PyErr_Occurred())
        return close_group(&g);
    int m = g.m, io = g.out.itemsize == 2, normalize = div_obj != Py_None;
    Py_ssize_t n = g.out.len / g.out.itemsize, bad = 0;
    Py_BEGIN_ALLOW_THREADS;
    if (io) {
        const uint16_t *all[IO_MAX + 1];
        memcpy(all, g.ptrs, m * sizeof(*all));
        all[m] = (const uint16_t *)g.base.buf;
        struct merge_args a = {g.w, m, normalize, lam != 1.0, (float)divisor, (float)lam};
        bad = io_tiles((uint16_t *)g.out.buf, all, m + 1, n, task_arithmetic_tile, &a);
    } else
        (bf16 ? task_arithmetic_bf16 : task_arithmetic_f32)((float *)g.out.buf, (const float *)g.base.buf,
                                                            (const float **)g.ptrs, g.w, m, n, normalize,
                                                            (float)divisor, lam != 1.0, (float)lam);
    Py_END_ALLOW_THREADS;
    close_group(&g);
    if (io)
        return PyLong_FromSsize_t(bad);
    Py_RETURN_NONE;
}

static PyObject *ties(PyObject *self, PyObject *args) {
    PyObject *out_obj, *base_obj, *inputs, *weights;
    int normalize, bf16;
    double lam;
    struct group g;
    if (!PyArg_ParseTuple(args, "OOOOpdp:ties", &out_obj, &base_obj, &inputs, &weights, &normalize, &lam, &bf16) ||
        open_group(out_obj, base_obj, inputs, weights, &g) < 0)
        return NULL;
    if (g.out.itemsize != 4) {
        PyErr_SetString(PyExc_ValueError, "ties: out must be a float32 buffer");
        return close_group(&g);
    }
    if (g.m > TIES_MAX) {
        PyErr_Format(PyExc_ValueError, "at most %d deltas, got %d", TIES_MAX, g.m);
        return close_group(&g);
    }
    Py_ssize_t n = g.out.len / 4;
    Py_BEGIN_ALLOW_THREADS;
    (bf16 ? ties_bf16 : ties_f32)((float *)g.out.buf, (const float *)g.base.buf, (const float **)g.ptrs, g.w, g.m, n,
                                  normalize, lam != 1.0, (float)lam);
    Py_END_ALLOW_THREADS;
    close_group(&g);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"ties", ties, METH_VARARGS,
     "ties(out, base, deltas, weights, normalize, lam, bf16): TIES after sparsification (see the module)."},
    {"linear", linear, METH_VARARGS,
     "linear(out, inputs, coeffs, denominator, bf16): mergekit's linear on float32 buffers (see the module)."},
    {"task_arithmetic", task_arithmetic, METH_VARARGS,
     "task_arithmetic(out, base, inputs, weights, divisor, lam, bf16): mergekit's task arithmetic (see the "
     "module)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_elementwise",
                                    "Compiled kernels of surgery.merge.", -1, methods};

PyMODINIT_FUNC PyInit__elementwise(void) { return PyModule_Create(&module); }
