/*
 * The compiled half of luafcgid/protocol.py's PARAMS decoding (docs/design.rst, "Compiled
 * speed-ups"): decode_pairs(data, pos, end) does what protocol._decode_pairs does, with the
 * same answers and the same messages. protocol.py uses it when it was built (setup.py) and
 * LUAFCGID_PURE is not set; otherwise its own Python loop.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* A pair length: 1 byte below 128, else 4 bytes big-endian with the high bit set. */
static int read_length(const unsigned char *data, Py_ssize_t *pos, Py_ssize_t end,
                       Py_ssize_t *length) {
    Py_ssize_t p = *pos;
    if (p >= end)
        return 0;
    if (data[p] < 128) {
        *length = data[p];
        *pos = p + 1;
        return 1;
    }
    if (end - p < 4)
        return 0;
    *length = ((Py_ssize_t)(data[p] & 0x7F) << 24) | ((Py_ssize_t)data[p + 1] << 16)
              | ((Py_ssize_t)data[p + 2] << 8) | (Py_ssize_t)data[p + 3];
    *pos = p + 4;
    return 1;
}

static PyObject *decode_pairs(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "decode_pairs(data: bytes, pos: int, end: int)");
        return NULL;
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]), end = PyLong_AsSsize_t(args[2]);
    if ((pos == -1 || end == -1) && PyErr_Occurred())
        return NULL;
    if (pos < 0 || end > size || pos > end) {
        PyErr_SetString(PyExc_ValueError, "decode_pairs: pos and end must lie within data");
        return NULL;
    }
    PyObject *pairs = PyDict_New();
    if (pairs == NULL)
        return NULL;
    while (pos < end) {
        Py_ssize_t name_length, value_length;
        /* Python reads past ``end`` up to the data's size, as protocol._decode_pairs does */
        if (!read_length(data, &pos, size, &name_length)
                || !read_length(data, &pos, size, &value_length)) {
            PyErr_SetString(PyExc_ValueError,
                            "truncated name-value pair: the data ends inside a length");
            goto fail;
        }
        Py_ssize_t value_start = pos + name_length, value_end = value_start + value_length;
        if (value_end > end) {
            PyErr_Format(PyExc_ValueError,
                         "truncated name-value pair: lengths %zd and %zd run %zd bytes past "
                         "the end of the data", name_length, value_length, value_end - end);
            goto fail;
        }
        PyObject *name = PyBytes_FromStringAndSize((const char *)data + pos, name_length);
        PyObject *value = name == NULL ? NULL
            : PyBytes_FromStringAndSize((const char *)data + value_start, value_length);
        int failed = value == NULL || PyDict_SetItem(pairs, name, value) < 0;
        Py_XDECREF(name);
        Py_XDECREF(value);
        if (failed)
            goto fail;
        pos = value_end;
    }
    return pairs;
fail:
    Py_DECREF(pairs);
    return NULL;
}

static PyMethodDef methods[] = {
    {"decode_pairs", (PyCFunction)(void (*)(void))decode_pairs, METH_FASTCALL,
     "decode_pairs(data, pos, end) -> dict: FastCGI name-value pairs in data[pos:end]; "
     "ValueError (with protocol._decode_pairs's message) when they are truncated."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT, "luafcgid._speedups",
    "Compiled speed-ups for luafcgid.protocol (optional: see setup.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    return PyModule_Create(&speedups_module);
}
