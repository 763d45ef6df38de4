/* The exact TIES top-k (surgery.merge.topk) as a compiled kernel.
 *
 * Which k entries torch.argsort(keys, descending=True)[:k] puts first on CPU: torch sorts with libstdc++'s
 * std::sort (introsort), comparing values only, so ties between equal values are decided by its partitions.
 * Entries never cross a partition cut, so the first k positions depend only on the partitions containing
 * position k: this replays std::__introsort_loop on that segment alone (__move_median_to_first with torch's
 * descending comparator x > y, __unguarded_partition), then the final insertion sort (stable within a
 * segment of at most 16 entries). It reports "not exact" where introsort would heapsort (depth limit
 * 2 * floor(log2 n)) or where an unguarded scan would leave the segment.
 *
 * top_k(keys, k, mask[, depth]) -> bool
 *   keys: writable C-contiguous buffer of int16 ('h'), int32 ('i'/'l' of size 4) or float32 ('f'), no NaN;
 *         reordered in place as introsort's partitions on the path of position k leave it (the segments
 *         off that path are not sorted further).
 *   mask: writable buffer of len(keys) bytes; set to 1 at the original indices of the first k entries.
 *   depth: introsort's depth limit left (default 2 * floor(log2 n): a whole array); a segment that partitions
 *         streamed elsewhere have cut out (surgery.merge.ties_stream) continues with the depth they left.
 *   Returns True where the replay is exact (mask filled), False where it is not (mask undefined).
 * The GIL is released while it runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

#define THRESHOLD 16 /* libstdc++ _S_threshold */
#define BLOCK 256    /* entries scanned at a time by the block partition */

static int floor_log2(Py_ssize_t n) {
    int r = 0;
    while (n > 1) {
        n >>= 1;
        r++;
    }
    return r;
}

/* malloc, on huge pages where the kernel gives them on request (as numpy does for large arrays): the
   permutation is touched once per 4 KiB page otherwise, and those page faults cost as much as a partition */
static void *alloc_big(size_t bytes) {
#if defined(MADV_HUGEPAGE) && defined(_POSIX_C_SOURCE) && _POSIX_C_SOURCE >= 200112L
    if (bytes >= ((size_t)4 << 20)) {
        void *p = NULL;
        if (posix_memalign(&p, (size_t)2 << 20, bytes) != 0)
            return NULL;
        madvise(p, bytes, MADV_HUGEPAGE);
        return p;
    }
#endif
    return malloc(bytes);
}

/* swap positions x and y of the keys v and of the permutation perm */
#define SWAP(KEY, IDX, x, y)                                                                         \
    do {                                                                                             \
        Py_ssize_t x_ = (x), y_ = (y);                                                               \
        KEY tv_ = v[x_];                                                                             \
        v[x_] = v[y_];                                                                               \
        v[y_] = tv_;                                                                                 \
        IDX ti_ = perm[x_];                                                                          \
        perm[x_] = perm[y_];                                                                         \
        perm[y_] = ti_;                                                                              \
    } while (0)

/* 1: exact, 0: not exact, -1: out of memory */
#define DEFINE_TOPK(NAME, KEY, IDX)                                                                  \
    static int NAME(KEY *v, Py_ssize_t n, Py_ssize_t k, int depth, unsigned char *mask) {           \
        IDX *perm = (IDX *)alloc_big((size_t)(n > 0 ? n : 1) * sizeof(IDX));                            \
        if (perm == NULL)                                                                           \
            return -1;                                                                              \
        for (Py_ssize_t i = 0; i < n; i++)                                                          \
            perm[i] = (IDX)i;                                                                       \
        Py_ssize_t lo = 0, hi = n;                                                                  \
        unsigned short offl[BLOCK], offr[BLOCK];                                                    \
        if (depth < 0)                                                                              \
            depth = 2 * floor_log2(n); /* a whole array; else the depth left on the way to it */    \
        while (hi - lo > THRESHOLD && lo < k && k < hi) {                                           \
            if (depth == 0)                                                                         \
                goto not_exact; /* introsort would heapsort this segment */                         \
            depth--;                                                                                \
            /* __move_median_to_first(lo, lo + 1, mid, hi - 1) with comp(x, y) = x > y */          \
            Py_ssize_t a = lo + 1, b = lo + (hi - lo) / 2, c = hi - 1, m;                           \
            KEY va = v[a], vb = v[b], vc = v[c];                                                    \
            if (va > vb)                                                                            \
                m = vb > vc ? b : va > vc ? c : a;                                                  \
            else                                                                                    \
                m = va > vc ? a : vb > vc ? c : b;                                                  \
            SWAP(KEY, IDX, lo, m);                                                                  \
            KEY p = v[lo];                                                                          \
            /* __unguarded_partition(lo + 1, hi, lo): Hoare's scans pair the t-th entry <= p from the      \
               left with the t-th entry >= p from the right; far from the crossing, find them a block at a   \
               time without branches (BlockQuicksort), then finish with the scalar scans */                 \
            Py_ssize_t f = lo + 1, l = hi, bl = 0, br = 0;                                              \
            int nl = 0, il = 0, nr = 0, ir = 0;                                                         \
            for (;;) {                                                                                  \
                if (il == nl) {                                                                         \
                    if (l - f < BLOCK)                                                                  \
                        break;                                                                          \
                    bl = f;                                                                             \
                    il = nl = 0;                                                                        \
                    for (int i = 0; i < BLOCK; i++) {                                                   \
                        offl[nl] = (unsigned short)i;                                                   \
                        nl += !(v[bl + i] > p);                                                         \
                    }                                                                                   \
                    f += BLOCK;                                                                         \
                }                                                                                       \
                if (ir == nr) {                                                                         \
                    if (l - f < BLOCK)                                                                  \
                        break;                                                                          \
                    br = l - 1;                                                                         \
                    ir = nr = 0;                                                                        \
                    for (int i = 0; i < BLOCK; i++) {                                                   \
                        offr[nr] = (unsigned short)i;                                                   \
                        nr += !(p > v[br - i]);                                                         \
                    }                                                                                   \
                    l -= BLOCK;                                                                         \
                }                                                                                       \
                int pairs = nl - il < nr - ir ? nl - il : nr - ir;                                      \
                for (int t = 0; t < pairs; t++) {                                                       \
                    SWAP(KEY, IDX, bl + offl[il + t], br - offr[ir + t]);                           \
                }                                                                                       \
                il += pairs;                                                                            \
                ir += pairs;                                                                            \
            }                                                                                           \
            if (il < nl) /* resume the scalar scans at the first stop not yet swapped */                \
                f = bl + offl[il];                                                                      \
            if (ir < nr)                                                                                \
                l = br - offr[ir] + 1;                                                                  \
            for (;;) {                                                                                  \
                while (v[f] > p)                                                                        \
                    if (++f == hi)                                                                      \
                        goto not_exact; /* would run off the segment */                                 \
                --l;                                                                                    \
                while (p > v[l])                                                                        \
                    --l;                                                                                \
                if (!(f < l))                                                                           \
                    break;                                                                              \
                SWAP(KEY, IDX, f, l);                                                               \
                ++f;                                                                                    \
            }                                                                                           \
            if (k <= f) /* everything from the cut on sorts after position k */                     \
                hi = f;                                                                             \
            else /* everything before the cut sorts before position k */                            \
                lo = f;                                                                             \
        }                                                                                           \
        int inside = lo < k && k < hi;                                                              \
        Py_ssize_t all = inside ? lo : (k < hi ? k : hi);                                           \
        memset(mask, 0, (size_t)n);                                                                 \
        for (Py_ssize_t i = 0; i < all; i++)                                                        \
            mask[perm[i]] = 1;                                                                      \
        if (inside) { /* std::__insertion_sort on [lo, hi): stable within the segment */            \
            for (Py_ssize_t i = lo + 1; i < hi; i++) {                                              \
                KEY x = v[i];                                                                       \
                IDX xi = perm[i];                                                                   \
                Py_ssize_t j = i;                                                                   \
                for (; j > lo && x > v[j - 1]; j--) {                                               \
                    v[j] = v[j - 1];                                                                \
                    perm[j] = perm[j - 1];                                                          \
                }                                                                                   \
                v[j] = x;                                                                           \
                perm[j] = xi;                                                                       \
            }                                                                                       \
            for (Py_ssize_t i = lo; i < k; i++)                                                     \
                mask[perm[i]] = 1;                                                                  \
        }                                                                                           \
        free(perm);                                                                                 \
        return 1;                                                                                   \
    not_exact:                                                                                      \
        free(perm);                                                                                 \
        return 0;                                                                                   \
    }

DEFINE_TOPK(topk_i16_32, int16_t, int32_t)
DEFINE_TOPK(topk_i16_64, int16_t, int64_t)
DEFINE_TOPK(topk_i32_32, int32_t, int32_t)
DEFINE_TOPK(topk_i32_64, int32_t, int64_t)
DEFINE_TOPK(topk_f32_32, float, int32_t)
DEFINE_TOPK(topk_f32_64, float, int64_t)

/* 'h', 'i' or 'f' for the key buffer's element type, 0 for an unsupported one */
static char key_kind(const Py_buffer *b) {
    const char *f = b->format ? b->format : "B";
    if (*f == '@' || *f == '=' || *f == '<')
        f++;
    if (f[0] == '\0' || f[1] != '\0')
        return 0;
    switch (f[0]) {
    case 'h':
        return b->itemsize == 2 ? 'h' : 0;
    case 'i':
    case 'l':
        return b->itemsize == 4 ? 'i' : 0;
    case 'f':
        return b->itemsize == 4 ? 'f' : 0;
    default:
        return 0;
    }
}

static PyObject *top_k(PyObject *self, PyObject *args) {
    PyObject *keys_obj, *mask_obj;
    Py_ssize_t k;
    int depth = -1;
    if (!PyArg_ParseTuple(args, "OnO|i:top_k", &keys_obj, &k, &mask_obj, &depth))
        return NULL;
    Py_buffer keys, mask;
    if (PyObject_GetBuffer(keys_obj, &keys, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (PyObject_GetBuffer(mask_obj, &mask, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&keys);
        return NULL;
    }
    PyObject *result = NULL;
    char kind = key_kind(&keys);
    Py_ssize_t n = kind ? keys.len / keys.itemsize : 0;
    if (!kind)
        PyErr_Format(PyExc_TypeError, "top_k: keys must be int16, int32 or float32, not format '%s'",
                     keys.format ? keys.format : "B");
    else if (mask.len != n)
        PyErr_Format(PyExc_ValueError, "top_k: mask has %zd bytes for %zd keys", mask.len, n);
    else if (k < 0 || k > n)
        PyErr_Format(PyExc_ValueError, "top_k: k=%zd outside [0, %zd]", k, n);
    else {
        int rc;
        int wide = n > INT32_MAX;
        unsigned char *m = (unsigned char *)mask.buf;
        Py_BEGIN_ALLOW_THREADS;
        if (kind == 'h')
            rc = wide ? topk_i16_64((int16_t *)keys.buf, n, k, depth, m) : topk_i16_32((int16_t *)keys.buf, n, k, depth, m);
        else if (kind == 'i')
            rc = wide ? topk_i32_64((int32_t *)keys.buf, n, k, depth, m) : topk_i32_32((int32_t *)keys.buf, n, k, depth, m);
        else
            rc = wide ? topk_f32_64((float *)keys.buf, n, k, depth, m) : topk_f32_32((float *)keys.buf, n, k, depth, m);
        Py_END_ALLOW_THREADS;
        if (rc < 0)
            PyErr_NoMemory();
        else
            result = PyBool_FromLong(rc);
    }
    PyBuffer_Release(&mask);
    PyBuffer_Release(&keys);
    return result;
}

static PyMethodDef methods[] = {
    {"top_k", top_k, METH_VARARGS,
     "top_k(keys, k, mask[, depth]) -> bool\n\nMark in mask the first k entries of torch.argsort(keys, descending=True), "
     "replaying libstdc++'s introsort on the segment containing position k; keys is reordered in place. False "
     "where the replay is not exact (introsort would heapsort)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_introsort",
                                    "Compiled kernel of surgery.merge.topk.", -1, methods};

PyMODINIT_FUNC PyInit__introsort(void) { return PyModule_Create(&module); }
