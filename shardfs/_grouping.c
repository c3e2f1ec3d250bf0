/*
 * Rebuild little-endian elements from byte-grouped streams.
 *
 * A grouped chunk stores byte i of every element in stream i. Decoding
 * interleaves the streams again and, for the rotl1 transforms, rotates
 * each element right by one bit. numpy needs several passes over memory
 * for that, so this loop is the part of chunk decoding that is compiled.
 * The output is a bytes object written once, with no zero fill, and the
 * loops run without the GIL, so several decoder threads run at once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MAX_ELEMENT_SIZE 4

static void ungroup2(uint8_t *out, const uint8_t *low, const uint8_t *high,
                     Py_ssize_t count, int rotate)
{
    for (Py_ssize_t i = 0; i < count; i++) {
        uint16_t value = (uint16_t)(low[i] | (high[i] << 8));
        if (rotate) {
            value = (uint16_t)((value >> 1) | (value << 15));
        }
        out[2 * i] = (uint8_t)value;
        out[2 * i + 1] = (uint8_t)(value >> 8);
    }
}

static void ungroup4(uint8_t *out, const uint8_t *const *streams,
                     Py_ssize_t count, int rotate)
{
    const uint8_t *s0 = streams[0], *s1 = streams[1];
    const uint8_t *s2 = streams[2], *s3 = streams[3];
    for (Py_ssize_t i = 0; i < count; i++) {
        uint32_t value = (uint32_t)s0[i] | ((uint32_t)s1[i] << 8)
                         | ((uint32_t)s2[i] << 16) | ((uint32_t)s3[i] << 24);
        if (rotate) {
            value = (value >> 1) | (value << 31);
        }
        out[4 * i] = (uint8_t)value;
        out[4 * i + 1] = (uint8_t)(value >> 8);
        out[4 * i + 2] = (uint8_t)(value >> 16);
        out[4 * i + 3] = (uint8_t)(value >> 24);
    }
}

/* Fault in the pages of a fresh output buffer with one call. A chunk-sized
 * buffer is a new mapping, and faulting it in page by page as the loop
 * writes costs more than the interleaving. Errors are ignored: a kernel
 * before 5.14 lacks MADV_POPULATE_WRITE, and the writes fault the pages in
 * anyway. Asking for huge pages as well (MADV_HUGEPAGE) sped up decoding
 * alone but cost the daemon a third more CPU time in a cold load, so it is
 * not done. */
static void prefault(uint8_t *buffer, Py_ssize_t length)
{
#ifdef MADV_POPULATE_WRITE
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t start = ((uintptr_t)buffer + page - 1) & ~(page - 1);
    uintptr_t end = ((uintptr_t)buffer + (uintptr_t)length) & ~(page - 1);
    if (end > start) {
        (void)madvise((void *)start, end - start, MADV_POPULATE_WRITE);
    }
#else
    (void)buffer;
    (void)length;
#endif
}

/* Elements rebuilt per step. A block of every stream and of the output,
 * at most 1 MiB in all, stays in cache between decompressing and
 * interleaving it. */
#define BLOCK_ELEMENTS (1 << 17)

/* Fill buffer[0:length] from reader.readinto, or raise ValueError if the
 * reader ends first. Called with the GIL held. */
static int read_block(PyObject *reader, Py_ssize_t index, uint8_t *buffer,
                      Py_ssize_t length)
{
    Py_ssize_t filled = 0;
    while (filled < length) {
        PyObject *view = PyMemoryView_FromMemory((char *)buffer + filled,
                                                 length - filled, PyBUF_WRITE);
        if (view == NULL) {
            return -1;
        }
        PyObject *got = PyObject_CallMethod(reader, "readinto", "O", view);
        Py_DECREF(view);
        if (got == NULL) {
            return -1;
        }
        Py_ssize_t count = PyLong_AsSsize_t(got);
        Py_DECREF(got);
        if (count < 0) {
            if (!PyErr_Occurred()) {
                PyErr_Format(PyExc_ValueError,
                             "stream %zd: readinto returned %zd", index, count);
            }
            return -1;
        }
        if (count == 0) {
            PyErr_Format(PyExc_ValueError, "stream %zd ends early", index);
            return -1;
        }
        filled += count;
    }
    return 0;
}

PyDoc_STRVAR(assemble_doc,
"assemble(length, prefix, streams, tail, rotate)\n"
"--\n"
"\n"
"Return length bytes: prefix, then the elements rebuilt from streams, tail.\n"
"\n"
"streams has 1, 2 or 4 items, one per byte of an element. Each is a\n"
"buffer of exactly n bytes or a reader whose readinto() yields them,\n"
"where n = (length - len(prefix) - len(tail)) / len(streams). Element j\n"
"is built little-endian from byte j of each stream, and with 2 or 4\n"
"streams it is rotated right by one bit when rotate is true. One stream\n"
"is a plain copy. Readers are not checked for bytes past n. Raises\n"
"ValueError when a length does not fit or a reader ends early.");

static PyObject *assemble(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_ssize_t length;
    Py_buffer prefix, tail, views[MAX_ELEMENT_SIZE];
    PyObject *sequence, *streams = NULL, *result = NULL;
    PyObject *readers[MAX_ELEMENT_SIZE] = {NULL};
    uint8_t *scratch = NULL;
    int rotate, is_buffer[MAX_ELEMENT_SIZE] = {0};
    Py_ssize_t size = 0;

    if (!PyArg_ParseTuple(args, "ny*Oy*p:assemble", &length, &prefix,
                          &sequence, &tail, &rotate)) {
        return NULL;
    }
    streams = PySequence_Fast(sequence, "streams must be a sequence");
    if (streams == NULL) {
        goto done;
    }
    size = PySequence_Fast_GET_SIZE(streams);
    if (size != 1 && size != 2 && size != 4) {
        PyErr_Format(PyExc_ValueError, "expected 1, 2 or 4 streams, got %zd", size);
        size = 0;
        goto done;
    }
    Py_ssize_t body = length - prefix.len - tail.len;
    if (body < 0) {
        PyErr_Format(PyExc_ValueError,
                     "prefix and tail of %zd bytes exceed the length %zd",
                     prefix.len + tail.len, length);
        size = 0;
        goto done;
    }
    if (body % size != 0) {
        PyErr_Format(PyExc_ValueError,
                     "%zd bytes of elements are not a whole number of %zd-byte elements",
                     body, size);
        size = 0;
        goto done;
    }
    Py_ssize_t count = body / size;
    for (Py_ssize_t i = 0; i < size; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(streams, i);
        if (PyObject_CheckBuffer(item)) {
            if (PyObject_GetBuffer(item, &views[i], PyBUF_C_CONTIGUOUS) < 0) {
                goto done;
            }
            is_buffer[i] = 1;
            if (views[i].len != count) {
                PyErr_Format(PyExc_ValueError,
                             "stream %zd has %zd bytes, expected %zd",
                             i, views[i].len, count);
                goto done;
            }
        } else {
            readers[i] = item;
        }
    }

    scratch = PyMem_Malloc((size_t)size * BLOCK_ELEMENTS);
    result = PyBytes_FromStringAndSize(NULL, length);
    if (scratch == NULL || result == NULL) {
        Py_CLEAR(result);
        if (!PyErr_Occurred()) {
            PyErr_NoMemory();
        }
        goto done;
    }
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(result);
    prefault(out, length);
    memcpy(out, prefix.buf, prefix.len);
    memcpy(out + length - tail.len, tail.buf, tail.len);
    uint8_t *elements = out + prefix.len;

    if (size == 1) {
        /* A plain copy: a reader fills the result itself, in as few calls
         * as it needs, and a buffer is copied. */
        if (!is_buffer[0]) {
            if (read_block(readers[0], 0, elements, count) < 0) {
                Py_CLEAR(result);
            }
            goto done;
        }
        Py_BEGIN_ALLOW_THREADS
        memcpy(elements, views[0].buf, count);
        Py_END_ALLOW_THREADS
        goto done;
    }

    for (Py_ssize_t start = 0; start < count; start += BLOCK_ELEMENTS) {
        Py_ssize_t step = count - start < BLOCK_ELEMENTS ? count - start : BLOCK_ELEMENTS;
        const uint8_t *pointers[MAX_ELEMENT_SIZE];
        for (Py_ssize_t i = 0; i < size; i++) {
            if (is_buffer[i]) {
                pointers[i] = (const uint8_t *)views[i].buf + start;
            } else {
                uint8_t *block = scratch + i * BLOCK_ELEMENTS;
                if (read_block(readers[i], i, block, step) < 0) {
                    Py_CLEAR(result);
                    goto done;
                }
                pointers[i] = block;
            }
        }
        Py_BEGIN_ALLOW_THREADS
        if (size == 2) {
            ungroup2(elements + 2 * start, pointers[0], pointers[1], step, rotate);
        } else {
            ungroup4(elements + 4 * start, pointers, step, rotate);
        }
        Py_END_ALLOW_THREADS
    }

done:
    for (Py_ssize_t i = 0; i < size; i++) {
        if (is_buffer[i]) {
            PyBuffer_Release(&views[i]);
        }
    }
    PyMem_Free(scratch);
    Py_XDECREF(streams);
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&tail);
    return result;
}

static PyMethodDef methods[] = {
    {"assemble", assemble, METH_VARARGS, assemble_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shardfs._grouping",
    .m_doc = "Compiled byte regrouping for chunk decoding.",
    .m_size = 0,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__grouping(void)
{
    return PyModule_Create(&module);
}
