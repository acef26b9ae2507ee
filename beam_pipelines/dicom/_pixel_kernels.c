/* One-pass intensity mapping of stored DICOM pixels to float32.
 *
 * numpy needs five passes over a radiograph for what is one expression per
 * pixel: clean the stored value (byte swap, mask unused high bits or
 * sign-extend), convert to float32, multiply, add, clip. Each pass costs
 * about as much as decoding an uncompressed file, so the numpy version is
 * ~1.5-2.5x pydicom's own pixel_array. This kernel does it in one pass with
 * the GIL released.
 *
 * The arithmetic is float32 `(float)v * scale + offset`, then clip, with
 * floating-point contraction off (setup.py builds with -ffp-contract=off):
 * results are bit-identical to the numpy fallback in pixel_map.py.
 *
 * Plain C and the buffer protocol only: no numpy headers at build time.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* The mapping both kernels apply to each stored value. */
static inline float map_value(float value, float scale, float offset, float low, float high) {
    float m = value * scale + offset;
    m = m < low ? low : m;
    return m > high ? high : m;
}

/* A layout the kernels read: 1 or 2 bytes, swapped only if 2, 1..8*itemsize bits. */
static int layout_ok(int itemsize, int swap, int bits_stored) {
    return (itemsize == 1 || itemsize == 2) && !(swap && itemsize != 2) && bits_stored >= 1 &&
           bits_stored <= 8 * itemsize;
}

#define MAP_LOOP(TYPE, LOAD)                                                    \
    do {                                                                        \
        const TYPE *in = (const TYPE *)src.buf;                                 \
        for (Py_ssize_t i = 0; i < n; i++) {                                    \
            TYPE v = in[i];                                                     \
            out_f[i] = map_value((float)(LOAD), scale, offset, low, high);      \
        }                                                                       \
    } while (0)

#define SWAP16(v) ((uint16_t)(((uint16_t)(v) >> 8) | ((uint16_t)(v) << 8)))

/* Runs LOOP(TYPE, LOAD) with LOAD reading one stored value v of the layout:
 * 1 or 2 bytes, unsigned (unused high bits masked) or signed (sign-extended
 * from bit bits_stored), byte-swapped or not. One branch per call, none per
 * pixel, so each loop is a plain loop the compiler vectorizes. */
#define FOR_LAYOUT(LOOP)                                                          \
    do {                                                                          \
        if (itemsize == 1) {                                                      \
            const uint8_t mask = (uint8_t)(0xFFu >> unused);                      \
            if (is_signed)                                                        \
                LOOP(uint8_t, (int8_t)(uint8_t)(v << unused) >> unused);          \
            else                                                                  \
                LOOP(uint8_t, v & mask);                                          \
        } else {                                                                  \
            const uint16_t mask = (uint16_t)(0xFFFFu >> unused);                  \
            if (is_signed && swap)                                                \
                LOOP(uint16_t, (int16_t)(uint16_t)(SWAP16(v) << unused) >> unused); \
            else if (is_signed)                                                   \
                LOOP(uint16_t, (int16_t)(uint16_t)(v << unused) >> unused);       \
            else if (swap)                                                        \
                LOOP(uint16_t, SWAP16(v) & mask);                                 \
            else                                                                  \
                LOOP(uint16_t, v & mask);                                         \
        }                                                                         \
    } while (0)

static PyObject *affine_to_float32(PyObject *self, PyObject *args) {
    Py_buffer src, out;
    int itemsize, is_signed, swap, bits_stored;
    float scale, offset, low, high;
    if (!PyArg_ParseTuple(args, "y*w*iiiiffff", &src, &out, &itemsize, &is_signed, &swap,
                          &bits_stored, &scale, &offset, &low, &high))
        return NULL;
    PyObject *result = NULL;
    if (!layout_ok(itemsize, swap, bits_stored)) {
        PyErr_SetString(PyExc_ValueError, "unsupported stored pixel layout");
        goto done;
    }
    if (src.len % itemsize != 0 || out.len != (src.len / itemsize) * (Py_ssize_t)sizeof(float)) {
        PyErr_SetString(PyExc_ValueError, "output must hold one float32 per stored value");
        goto done;
    }
    const Py_ssize_t n = src.len / itemsize;
    float *out_f = (float *)out.buf;
    const int unused = 8 * itemsize - bits_stored;
    Py_BEGIN_ALLOW_THREADS
    FOR_LAYOUT(MAP_LOOP);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return result;
}

/* The same mapping, box-averaged over factor x factor blocks on the fly (as
 * Pillow's Image.reduce averages a float image, edge blocks over the pixels
 * they have): the full-size float image is never written. */
#define REDUCE_LOOP(TYPE, LOAD)                                                   \
    do {                                                                          \
        for (Py_ssize_t oy = 0; oy < out_rows; oy++) {                            \
            const Py_ssize_t y0 = oy * factor;                                    \
            const Py_ssize_t y1 = y0 + factor < rows ? y0 + factor : rows;        \
            memset(column_sums, 0, (size_t)cols * sizeof(float));                \
            for (Py_ssize_t y = y0; y < y1; y++) {                                \
                const TYPE *in = (const TYPE *)src.buf + y * cols;                \
                /* Two simple loops the compiler vectorizes: map, then sum. */    \
                for (Py_ssize_t x = 0; x < cols; x++) {                           \
                    TYPE v = in[x];                                               \
                    row[x] = map_value((float)(LOAD), scale, offset, low, high);  \
                }                                                                 \
                for (Py_ssize_t x = 0; x < cols; x++)                             \
                    column_sums[x] += row[x];                                     \
            }                                                                     \
            for (Py_ssize_t ox = 0; ox < out_cols; ox++) {                        \
                const Py_ssize_t x0 = ox * factor;                                \
                const Py_ssize_t x1 = x0 + factor < cols ? x0 + factor : cols;    \
                double sum = 0.0;                                                 \
                for (Py_ssize_t x = x0; x < x1; x++)                              \
                    sum += column_sums[x];                                        \
                out_f[oy * out_cols + ox] = (float)(sum / (double)((y1 - y0) * (x1 - x0))); \
            }                                                                     \
        }                                                                         \
    } while (0)

static PyObject *affine_reduce_to_float32(PyObject *self, PyObject *args) {
    Py_buffer src, out;
    int itemsize, is_signed, swap, bits_stored;
    float scale, offset, low, high;
    Py_ssize_t rows, cols, factor;
    if (!PyArg_ParseTuple(args, "y*w*iiiiffffnnn", &src, &out, &itemsize, &is_signed, &swap,
                          &bits_stored, &scale, &offset, &low, &high, &rows, &cols, &factor))
        return NULL;
    PyObject *result = NULL;
    float *column_sums = NULL;
    float *row = NULL;
    if (!layout_ok(itemsize, swap, bits_stored) || rows < 1 || cols < 1 || factor < 1) {
        PyErr_SetString(PyExc_ValueError, "unsupported stored pixel layout");
        goto done;
    }
    const Py_ssize_t out_rows = (rows + factor - 1) / factor;
    const Py_ssize_t out_cols = (cols + factor - 1) / factor;
    if (src.len != rows * cols * itemsize ||
        out.len != out_rows * out_cols * (Py_ssize_t)sizeof(float)) {
        PyErr_SetString(PyExc_ValueError, "buffers do not match rows, cols and factor");
        goto done;
    }
    column_sums = PyMem_RawMalloc((size_t)cols * sizeof(float));
    row = PyMem_RawMalloc((size_t)cols * sizeof(float));
    if (column_sums == NULL || row == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    float *out_f = (float *)out.buf;
    const int unused = 8 * itemsize - bits_stored;
    Py_BEGIN_ALLOW_THREADS
    FOR_LAYOUT(REDUCE_LOOP);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_RawFree(column_sums);
    PyMem_RawFree(row);
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"affine_to_float32", affine_to_float32, METH_VARARGS,
     "affine_to_float32(src, out, itemsize, signed, swap, bits_stored, scale, offset, low, high)\n"
     "Writes clip(float32(stored) * scale + offset, low, high) for each stored value of src\n"
     "(1- or 2-byte integers, optionally byte-swapped, masked/sign-extended to bits_stored)\n"
     "into the float32 buffer out."},
    {"affine_reduce_to_float32", affine_reduce_to_float32, METH_VARARGS,
     "affine_reduce_to_float32(src, out, itemsize, signed, swap, bits_stored, scale, offset,\n"
     "low, high, rows, cols, factor)\n"
     "The same mapping of a rows x cols image, averaged over factor x factor blocks (edge\n"
     "blocks over the pixels they hold) into out: ceil(rows/factor) x ceil(cols/factor)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pixel_kernels", "One-pass stored-pixel to float32 mapping.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__pixel_kernels(void) { return PyModule_Create(&module); }
