/*
 * Compiled halves of luafcgid/protocol.py (docs/design.rst, "Compiled speed-ups"), used when
 * built (setup.py) and LUAFCGID_PURE is not set; otherwise protocol.py's own Python:
 *
 * - decode_pairs(data, pos, end) does what protocol._decode_pairs does, with the same
 *   answers and the same messages;
 * - whole_request(data, maxpost, max_params) reads the common case, one whole request in
 *   one input, in one call, and declines everything else;
 * - response_records(request_id, data) frames a whole answer in one allocation.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

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

static PyObject *decode_range(const unsigned char *data, Py_ssize_t size, Py_ssize_t pos,
                              Py_ssize_t end);

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
    return decode_range(data, size, pos, end);
}

/* The pairs in data[pos:end] (data holds size bytes) as a dict; ValueError when cut. */
static PyObject *decode_range(const unsigned char *data, Py_ssize_t size, Py_ssize_t pos,
                              Py_ssize_t end) {
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

/* One record header at data[pos]: its type, request id and where its content lies. */
typedef struct {
    int type, request_id;
    Py_ssize_t start, end, next;
} Record;

static int record_at(const unsigned char *data, Py_ssize_t size, Py_ssize_t pos, Record *r) {
    if (size - pos < 8 || data[pos] != 1)
        return 0;
    Py_ssize_t length = ((Py_ssize_t)data[pos + 4] << 8) | data[pos + 5];
    r->type = data[pos + 1];
    r->request_id = (data[pos + 2] << 8) | data[pos + 3];
    r->start = pos + 8;
    r->end = r->start + length;
    r->next = r->end + data[pos + 6];
    return r->next <= size;
}

/* CONTENT_LENGTH over maxpost: 1; not over: 0; not plain digits (Python decides): -1. */
static PyObject *content_length;  /* b"CONTENT_LENGTH", made at import */

static int announced_over(PyObject *params, long long maxpost) {
    PyObject *value = PyDict_GetItemWithError(params, content_length);  /* borrowed */
    if (value == NULL && PyErr_Occurred())
        return -1;
    if (value == NULL || !PyBytes_Check(value) || PyBytes_GET_SIZE(value) == 0)
        return 0;
    Py_ssize_t n = PyBytes_GET_SIZE(value);
    const char *digits = PyBytes_AS_STRING(value);
    if (n > 18)
        return -1;
    long long number = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (digits[i] < '0' || digits[i] > '9')
            return -1;
        number = number * 10 + (digits[i] - '0');
    }
    return number > maxpost;
}

/*
 * whole_request(data, maxpost, max_params) -> (request_id, keep_conn, params, raw_params,
 * body) or None. The common case read in one go: data is exactly one RESPONDER request,
 * BEGIN_REQUEST, at most one PARAMS record with content, the empty one, STDIN records,
 * the empty one, within the limits. Anything else is None: protocol.Connection then reads
 * it record by record, as it reads everything when this is not built.
 */
static PyObject *whole_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "whole_request(data: bytes, maxpost, max_params)");
        return NULL;
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    long long maxpost = PyLong_AsLongLong(args[1]), max_params = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    Record r;
    if (!record_at(data, size, 0, &r) || r.type != 1 || r.request_id == 0
            || r.end - r.start != 8 || data[r.start] != 0 || data[r.start + 1] != 1)
        Py_RETURN_NONE;
    int request_id = r.request_id, keep_conn = data[r.start + 2] & 1;
    Py_ssize_t pos = r.next, params_start = 0, params_end = 0;
    int params_records = 0;
    for (;;) {  /* PARAMS: one with content at most, then the empty one */
        if (!record_at(data, size, pos, &r) || r.type != 4 || r.request_id != request_id)
            Py_RETURN_NONE;
        pos = r.next;
        if (r.start == r.end)
            break;
        if (++params_records > 1 || r.end - r.start > max_params)
            Py_RETURN_NONE;
        params_start = r.start;
        params_end = r.end;
    }
    Py_ssize_t body_size = 0, body_from = pos;
    int body_records = 0;
    for (;;) {  /* STDIN, then the empty one, which must end the data */
        if (!record_at(data, size, pos, &r) || r.type != 5 || r.request_id != request_id)
            Py_RETURN_NONE;
        pos = r.next;
        if (r.start == r.end)
            break;
        body_size += r.end - r.start;
        body_records++;
        if (body_size > maxpost)
            Py_RETURN_NONE;
    }
    if (pos != size)
        Py_RETURN_NONE;
    PyObject *params = decode_range(data, size, params_start, params_end);
    if (params == NULL) {  /* malformed pairs: Python reads them and says so */
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    int over = announced_over(params, maxpost);
    if (over != 0) {  /* announced over maxpost, or Python must read the number */
        PyErr_Clear();
        Py_DECREF(params);
        Py_RETURN_NONE;
    }
    PyObject *raw = PyBytes_FromStringAndSize((const char *)data + params_start,
                                              params_end - params_start);
    PyObject *body = PyBytes_FromStringAndSize(NULL, body_size);
    if (raw == NULL || body == NULL) {
        Py_DECREF(params);
        Py_XDECREF(raw);
        Py_XDECREF(body);
        return NULL;
    }
    char *out = PyBytes_AS_STRING(body);
    for (pos = body_from; body_records > 0; pos = r.next) {
        record_at(data, size, pos, &r);
        memcpy(out, data + r.start, (size_t)(r.end - r.start));
        out += r.end - r.start;
        body_records--;
    }
    return Py_BuildValue("(iONNN)", request_id, keep_conn ? Py_True : Py_False, params, raw,
                         body);
}

/*
 * response_records(request_id, data) -> bytes: data as STDOUT records of at most 65535
 * bytes, each padded to a multiple of 8, then the empty STDOUT record and END_REQUEST
 * (app status 0, REQUEST_COMPLETE): protocol.response_records in one allocation.
 */
static PyObject *response_records(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    Py_buffer data;
    if (nargs != 2 || PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE) < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "response_records(request_id: int, data: bytes)");
        return NULL;
    }
    long request_id = PyLong_AsLong(args[0]);
    if (request_id == -1 && PyErr_Occurred()) {
        PyBuffer_Release(&data);
        return NULL;
    }
    Py_ssize_t length = data.len, records = (length + 65534) / 65535, size = 24;
    size += records * 8 + length;
    for (Py_ssize_t left = length; left > 0; left -= 65535)
        size += (8 - (left > 65535 ? 65535 : left) % 8) % 8;
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL) {
        PyBuffer_Release(&data);
        return NULL;
    }
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
    const unsigned char *from = data.buf;
    unsigned char hi = (unsigned char)(request_id >> 8), lo = (unsigned char)request_id;
    for (Py_ssize_t left = length; left > 0;) {
        Py_ssize_t chunk = left > 65535 ? 65535 : left, padding = (8 - chunk % 8) % 8;
        unsigned char header[8] = {1, 6, hi, lo, (unsigned char)(chunk >> 8),
                                   (unsigned char)chunk, (unsigned char)padding, 0};
        memcpy(p, header, 8);
        memcpy(p + 8, from, (size_t)chunk);
        memset(p + 8 + chunk, 0, (size_t)padding);
        p += 8 + chunk + padding;
        from += chunk;
        left -= chunk;
    }
    unsigned char end[24] = {1, 6, hi, lo, 0, 0, 0, 0, 1, 3, hi, lo, 0, 8, 0, 0,
                             0, 0, 0, 0, 0, 0, 0, 0};
    memcpy(p, end, 24);
    PyBuffer_Release(&data);
    return out;
}

static PyMethodDef methods[] = {
    {"response_records", (PyCFunction)(void (*)(void))response_records, METH_FASTCALL,
     "response_records(request_id, data) -> bytes: data as STDOUT records, then the "
     "stream's end and END_REQUEST."},
    {"whole_request", (PyCFunction)(void (*)(void))whole_request, METH_FASTCALL,
     "whole_request(data, maxpost, max_params) -> (request_id, keep_conn, params, "
     "raw_params, body), or None when data is not exactly one simple request."},
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
    content_length = PyBytes_FromString("CONTENT_LENGTH");
    if (content_length == NULL)
        return NULL;
    return PyModule_Create(&speedups_module);
}
