/* A __slots__ class's members, read and written from C by offset (receivers/_fastpath.c,
 * processors/protocols/_stage.c): the offsets come from the class's member descriptors once,
 * at setup, so a class whose slots change is refused there instead of misread later. */
#ifndef WIRESPAN_SLOTS_H
#define WIRESPAN_SLOTS_H

#include <Python.h>
#include <structmember.h>

#define SLOT(o, off) (*(PyObject **)((char *)(o) + (off)))

/* Replace a slot's value; steals ``v``. */
static inline void set_slot(PyObject *o, Py_ssize_t off, PyObject *v) {
    PyObject *old = SLOT(o, off);
    SLOT(o, off) = v;
    Py_XDECREF(old);
}

/* The offset of ``t``'s writable object slot ``name``; -1 with TypeError when it is none. */
static inline int slot_offset(PyTypeObject *t, const char *name, Py_ssize_t *out) {
    PyObject *d = PyObject_GetAttrString((PyObject *)t, name);
    if (d == NULL)
        return -1;
    int ok = Py_IS_TYPE(d, &PyMemberDescr_Type);
    if (ok) {
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        ok = m->type == T_OBJECT_EX && !(m->flags & READONLY);
        *out = m->offset;
    }
    Py_DECREF(d);
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not a writable __slots__ member", t->tp_name, name);
        return -1;
    }
    return 0;
}

#endif
