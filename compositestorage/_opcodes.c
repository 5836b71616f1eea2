/* The opcode walk of compositestorage.opcodes, in C.
 *
 * walk(data, pickles, memo_limit, layouts, want_starts[, census]) reads the
 * opcodes of the first `pickles` pickles of `data` as opcodes.walk does and
 * returns where the last one ends (with want_starts, a pair of that and the
 * list of offsets where opcodes.walk would try its reference pattern; with
 * census, also the count of BINPERSIDs, -1 for a text PERSID, and one more
 * than the highest memo index named, as opcodes._census counts them).  It
 * returns None for anything else: an error, or a case it leaves to the
 * Python walk (a text PUT, with census a text GET, a LONG_BINPUT beyond
 * memo_limit), which then decides and raises exactly as it always has.  So this module only ever answers for a
 * record the Python walk accepts, with the Python walk's own answer.
 *
 * `layouts` is 512 bytes made by opcodes.py from pickletools: for each
 * opcode byte, its kind (0 unknown, 1 no argument, 2 fixed, 3 counted,
 * 4 lines) and n (the fixed size, the size of the count, the lines).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define K_UNKNOWN 0
#define K_NONE 1
#define K_FIXED 2
#define K_COUNTED 3
#define K_LINES 4

/* A BINGET or LONG_BINGET followed by one of these may begin a
 * reference (opcodes._run_pattern's lookahead). */
static int
ref_follows(unsigned char c)
{
    return c == 'c' || c == 'h' || c == 'j';
}

static PyObject *
walk(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t pickles, memo_limit;
    const char *layouts;
    Py_ssize_t layouts_len;
    int want_starts;
    int census = 0;
    PyObject *starts = NULL;
    PyObject *result = NULL;
    Py_ssize_t persids = 0;
    int text_persid = 0;
    unsigned long long top = 0;

    if (!PyArg_ParseTuple(args, "y*nny#p|p", &view, &pickles, &memo_limit,
                          &layouts, &layouts_len, &want_starts, &census))
        return NULL;
    if (layouts_len != 512) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "layouts must be 512 bytes");
        return NULL;
    }
    if (want_starts) {
        starts = PyList_New(0);
        if (starts == NULL) {
            PyBuffer_Release(&view);
            return NULL;
        }
    }

    const unsigned char *data = (const unsigned char *)view.buf;
    const Py_ssize_t size = view.len;
    Py_ssize_t pos = 0;
    Py_ssize_t stops = 0;

    for (;;) {
        if (pos >= size)
            goto fallback;              /* truncated */
        unsigned char code = data[pos];
        int kind = (unsigned char)layouts[2 * code];
        Py_ssize_t n = (unsigned char)layouts[2 * code + 1];
        Py_ssize_t start = pos;
        if (kind == K_UNKNOWN)
            goto fallback;
        pos += 1;
        if (kind == K_NONE) {
            if (code == '.') {
                stops += 1;
                if (stops == pickles)
                    break;
            }
            else if (code == 'Q')
                persids += 1;
            continue;
        }
        if (kind == K_FIXED) {
            if (pos + n > size)
                goto fallback;
            if (code == 'r' || code == 'j') {   /* LONG_BINPUT, LONG_BINGET */
                unsigned long index = (unsigned long)data[pos]
                    | (unsigned long)data[pos + 1] << 8
                    | (unsigned long)data[pos + 2] << 16
                    | (unsigned long)data[pos + 3] << 24;
                if (code == 'r' && index > (unsigned long)memo_limit)
                    goto fallback;      /* the Python walk refuses it */
                if (index + 1ULL > top)
                    top = index + 1ULL;
            }
            else if (code == 'q' || code == 'h') {
                if (data[pos] + 1ULL > top)
                    top = data[pos] + 1ULL;
            }
            if (starts != NULL && (code == 'h' || code == 'j')) {
                Py_ssize_t next = pos + n;
                if (next < size && ref_follows(data[next])) {
                    PyObject *at = PyLong_FromSsize_t(start);
                    if (at == NULL || PyList_Append(starts, at) < 0) {
                        Py_XDECREF(at);
                        goto error;
                    }
                    Py_DECREF(at);
                }
            }
            pos += n;
            continue;
        }
        if (kind == K_COUNTED) {
            unsigned long long length = 0;
            Py_ssize_t i;
            if (pos + n > size)
                goto fallback;
            for (i = n - 1; i >= 0; i--)
                length = length << 8 | data[pos + i];
            if (length > (unsigned long long)(size - pos - n))
                goto fallback;
            if (starts != NULL && code == 'C' && (length == 8
                                                  || length > 48)) {
                /* an oid, or a run-stopping long value: the Python walk
                 * tries its pattern there */
                PyObject *at = PyLong_FromSsize_t(start);
                if (at == NULL || PyList_Append(starts, at) < 0) {
                    Py_XDECREF(at);
                    goto error;
                }
                Py_DECREF(at);
            }
            pos += n + (Py_ssize_t)length;
            continue;
        }
        if (kind == K_LINES) {
            Py_ssize_t i;
            if (code == 'p' || (census && code == 'g'))
                goto fallback;          /* text PUT, GET: the Python walk */
            if (code == 'P')
                text_persid = 1;
            for (i = 0; i < n; i++) {
                const unsigned char *nl = memchr(data + pos, '\n',
                                                 size - pos);
                if (nl == NULL)
                    goto fallback;
                pos = (nl - data) + 1;
            }
            continue;
        }
        goto fallback;
    }

    PyBuffer_Release(&view);
    if (census) {
        if (starts == NULL) {
            starts = Py_None;
            Py_INCREF(starts);
        }
        return Py_BuildValue("(nNnK)", pos, starts,
                             text_persid ? (Py_ssize_t)-1 : persids,
                             text_persid ? (1ULL << 32) : top);
    }
    if (starts == NULL)
        return PyLong_FromSsize_t(pos);
    result = Py_BuildValue("(nN)", pos, starts);
    return result;

fallback:
    PyBuffer_Release(&view);
    Py_XDECREF(starts);
    Py_RETURN_NONE;

error:
    PyBuffer_Release(&view);
    Py_XDECREF(starts);
    return NULL;
}

static PyMethodDef methods[] = {
    {"walk", walk, METH_VARARGS,
     "walk(data, pickles, memo_limit, layouts, want_starts[, census]): "
     "where the pickles end (and the offsets where a reference may begin, "
     "and the census), or None to leave the record to the Python walk."},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "compositestorage._opcodes",
    "The opcode walk of compositestorage.opcodes, in C.", -1, methods
};

PyMODINIT_FUNC
PyInit__opcodes(void)
{
    return PyModule_Create(&module);
}
