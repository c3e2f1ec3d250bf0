/*
 * Rebuild little-endian elements from byte-grouped streams.
 *
 * A grouped chunk stores byte i of every element in stream i. Decoding
 * interleaves the streams again and, for the rotl1 transforms, rotates
 * each element right by one bit. numpy needs several passes over memory
 * for that, so this loop is the part of chunk decoding that is compiled.
 * It runs without the GIL, so several decoder threads run at once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

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

PyDoc_STRVAR(ungroup_doc,
"ungroup(out, streams, rotate)\n"
"--\n"
"\n"
"Interleave the byte streams into out, element by element.\n"
"\n"
"streams is a sequence of 2 or 4 buffers of equal length n, and out a\n"
"writable buffer of n * len(streams) bytes. Element j of out is built\n"
"little-endian from byte j of each stream, in order, and is rotated\n"
"right by one bit when rotate is true. Raises ValueError when the\n"
"lengths or the stream count are wrong.");

static PyObject *ungroup(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer out, views[MAX_ELEMENT_SIZE];
    PyObject *sequence, *streams;
    int rotate;
    Py_ssize_t size, acquired = 0;
    PyObject *result = NULL;

    if (!PyArg_ParseTuple(args, "w*Op:ungroup", &out, &sequence, &rotate)) {
        return NULL;
    }
    streams = PySequence_Fast(sequence, "streams must be a sequence of buffers");
    if (streams == NULL) {
        goto done;
    }
    size = PySequence_Fast_GET_SIZE(streams);
    if (size != 2 && size != 4) {
        PyErr_Format(PyExc_ValueError, "expected 2 or 4 streams, got %zd", size);
        goto done;
    }
    for (; acquired < size; acquired++) {
        PyObject *item = PySequence_Fast_GET_ITEM(streams, acquired);
        if (PyObject_GetBuffer(item, &views[acquired], PyBUF_C_CONTIGUOUS) < 0) {
            goto done;
        }
    }
    Py_ssize_t count = views[0].len;
    for (Py_ssize_t i = 1; i < size; i++) {
        if (views[i].len != count) {
            PyErr_Format(PyExc_ValueError,
                         "stream %zd has %zd bytes, stream 0 has %zd",
                         i, views[i].len, count);
            goto done;
        }
    }
    if (out.len != count * size) {
        PyErr_Format(PyExc_ValueError,
                     "output has %zd bytes, the streams need %zd",
                     out.len, count * size);
        goto done;
    }

    const uint8_t *pointers[MAX_ELEMENT_SIZE];
    for (Py_ssize_t i = 0; i < size; i++) {
        pointers[i] = views[i].buf;
    }
    Py_BEGIN_ALLOW_THREADS
    if (size == 2) {
        ungroup2(out.buf, pointers[0], pointers[1], count, rotate);
    } else {
        ungroup4(out.buf, pointers, count, rotate);
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);

done:
    for (Py_ssize_t i = 0; i < acquired; i++) {
        PyBuffer_Release(&views[i]);
    }
    Py_XDECREF(streams);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"ungroup", ungroup, METH_VARARGS, ungroup_doc},
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
