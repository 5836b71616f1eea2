"""Reading and writing ZODB records without importing their classes.

An overlay splits an object's state by attribute name (see
:mod:`compositestorage.overlay`), in the coordinator, which usually lacks
the application's code.  So a record is unpickled here with stand-ins:
every global becomes a :class:`Global` type named like it, every object
built from one (``REDUCE``, ``NEWOBJ``, ``BUILD``, items added to it) an
:class:`Opaque` that remembers how it was built, and every persistent
reference a :class:`Ref` that keeps its persistent id.  Written back, the
stand-ins give the same opcodes, so the state means what it meant; only
the memo and framing may differ from the original bytes.  Stand-ins
compare equal when they were built the same way, which is how a store
finds the part of a state that did not change.
"""
import copyreg
import io
import pickle

from zodbpickle.pickle import Unpickler as _CUnpickler

from compositestorage.opcodes import walk


class _GlobalMeta(type):
    """The type of every stand-in class: calling one (``REDUCE``) records
    the call instead of running anything."""

    def __call__(cls, *args):
        return Opaque._reduced(cls, args)

    def __repr__(cls):
        return '<global %s.%s>' % cls.opaque_global


class Opaque(metaclass=_GlobalMeta):
    """An object a record builds from a global: how it was built, nothing
    run.  ``NEWOBJ`` makes an instance of the stand-in class itself."""

    opaque_global = ('compositestorage.opaque', 'Opaque')
    _func = None

    def __new__(cls, *args):
        self = object.__new__(cls)
        self._args = args
        self._state = None
        self._items = []
        self._dictitems = []
        return self

    @classmethod
    def _reduced(cls, func, args):
        self = object.__new__(Opaque)
        self._func = func
        self._args = args
        self._state = None
        self._items = []
        self._dictitems = []
        return self

    # What the unpickler does to an object after building it.
    def __setstate__(self, state):
        self._state = state

    def append(self, item):
        self._items.append(item)

    def extend(self, items):
        self._items.extend(items)

    def __setitem__(self, key, value):
        self._dictitems.append((key, value))

    def __reduce_ex__(self, protocol):
        items = iter(self._items) if self._items else None
        dictitems = iter(self._dictitems) if self._dictitems else None
        if self._func is None:
            return (copyreg.__newobj__, (type(self),) + self._args,
                    self._state, items, dictitems)
        return self._func, self._args, self._state, items, dictitems

    def _key(self):
        return (self._func, type(self), self._args, self._state, self._items,
                self._dictitems)

    def __eq__(self, other):
        if not isinstance(other, Opaque):
            return NotImplemented
        try:
            return self._key() == other._key()
        except RecursionError:
            return False

    def __hash__(self):
        try:
            return hash((self._func, type(self), self._args))
        except TypeError:
            return id(self)

    def __repr__(self):
        func = self._func if self._func is not None else type(self)
        return '<opaque %s.%s%r>' % (func.opaque_global + (self._args,))


_globals = {}


def global_type(module, name):
    """The stand-in for the global ``module.name`` (one per name, so that
    two records naming one class compare equal)."""
    key = (module, name)
    found = _globals.get(key)
    if found is None:
        if len(_globals) > 10000:
            _globals.clear()
        found = _globals[key] = _GlobalMeta(
            name if name.isidentifier() else 'Global', (Opaque,),
            {'opaque_global': key, '__module__': __name__,
             '__qualname__': name})
    return found


class Ref:
    """A persistent reference: its persistent id, as the record holds it."""

    __slots__ = ('pid',)

    def __init__(self, pid):
        self.pid = pid

    def __eq__(self, other):
        return isinstance(other, Ref) and self.pid == other.pid

    def __hash__(self):
        try:
            return hash(self.pid)
        except TypeError:       # a weak reference's list
            return hash(repr(self.pid))

    def __repr__(self):
        return '<ref %r>' % (self.pid,)


class _Unpickler(_CUnpickler):

    def find_class(self, module, name):
        return global_type(module, name)

    def persistent_load(self, pid):
        return Ref(pid)


def loads_record(data):
    """``(meta, state, state_start, state_end)`` of a ZODB record: its two
    pickles as stand-ins, and where the state pickle lies in ``data``.

    The record is walked first (:func:`compositestorage.opcodes.walk`), so
    a hostile one is refused before the C unpickler sees it.
    """
    walk(data)
    f = io.BytesIO(data)
    u = _Unpickler(f, encoding='ASCII', errors='bytes')
    meta = u.load()
    start = f.tell()
    state = u.load()
    return meta, state, start, f.tell()


class _Pickler(pickle._Pickler):
    """Writes stand-ins back as the opcodes they came from; refuses any
    real global, so no class is ever looked up."""

    def save_global(self, obj, name=None):
        key = getattr(obj, 'opaque_global', None)
        if key is None or '\n' in key[0] or '\n' in key[1]:
            raise pickle.PicklingError('not a stand-in: %r' % (obj,))
        self.write(pickle.GLOBAL + ('%s\n%s\n' % key).encode('utf-8'))
        self.memoize(obj)

    def persistent_id(self, obj):
        return obj.pid if type(obj) is Ref else None


def dumps_record(meta, state):
    """A ZODB record of ``meta`` and ``state`` (stand-ins), one memo for
    both pickles, as ZODB writes them."""
    f = io.BytesIO()
    p = _Pickler(f, 3)
    p.dump(meta)
    p.dump(state)
    return f.getvalue()


def dumps_items(items):
    """The opcodes of ``items`` (``(key, value)`` pairs) one after the
    other, with no memo, so that they can be spliced into any pickle
    between a MARK and a SETITEMS.  A cyclic value cannot be written so
    and raises ``ValueError``."""
    f = io.BytesIO()
    p = _Pickler(f, 3)
    p.fast = True
    try:
        for key, value in items:
            p.save(key)
            p.save(value)
    except RecursionError:
        raise ValueError('a value refers to itself')
    return f.getvalue()
