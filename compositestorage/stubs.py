"""The stub record a child sees for an object whose home is elsewhere.

The stub for target ``T`` in partition ``A`` is stored in ``A``'s child at
oid ``T`` itself (DESIGN.md, invariant 3).  Its bytes depend only on the
target's home partition and class, so every process that needs it writes
the same record.  Stubs are immutable.
"""
import functools
import io

import persistent
from zodbpickle.pickle import Pickler
from zodbpickle.pickle import Unpickler

from compositestorage.errors import CorruptStubError
from compositestorage.errors import oid_hex


class PartitionStub(persistent.Persistent):
    """What a plain ZODB, opening one child alone, sees of a foreign object.

    The composite never hands these to ZODB: it resolves references to
    stubs back to the objects they stand for.
    """

    home = None
    module = None
    name = None

    def __repr__(self):
        oid = self._p_oid
        try:
            klass = '%s.%s ' % (self.module, self.name) if self.name else ''
            home = self.home
        except Exception:  # a stub whose state cannot be loaded
            klass, home = '', '?'
        return '<PartitionStub for %s%s in partition %r>' % (
            klass, oid_hex(oid) if oid else '?', home)


def __getattr__(name):
    """``PartitionStub:module:name`` is the stub class too.

    A child's class hint for a reference to another partition names the
    class it stands for (see :mod:`compositestorage.references`); a plain
    ZODB opening the child alone resolves it here, to the stub class.
    """
    if name.startswith('PartitionStub:'):
        return PartitionStub
    raise AttributeError('module %r has no attribute %r' % (__name__, name))


@functools.lru_cache(maxsize=4096)
def stub_record(home, klass):
    """The record of a stub for an object of class ``klass`` in ``home``.

    ``klass`` is ``(module, name)``, or ``None`` when the target's class is
    not known (a dangling reference) or is itself persistent.
    """
    module, name = klass if klass else (None, None)
    return internal_record(PartitionStub,
                           {'home': home, 'module': module, 'name': name},
                           memo=False)


def internal_record(klass, state, memo=True):
    """The record of an internal object (a stub, a partition map): its
    class and state pickled as ZODB pickles a record, so the bytes are the
    same in every process.

    Without ``memo`` nothing is memoized: a stub's strings each appear
    once, so its PUTs would be 16 of its bytes, in a record written for
    every target that a partition refers to.
    """
    f = io.BytesIO()
    p = Pickler(f, 3)
    p.fast = not memo
    p.dump(klass)
    p.dump(state)
    return f.getvalue()


#: How an overlay record begins (see compositestorage.overlay).
OVERLAY_MARK = b'\x80\x03ccompositestorage.overlay\nOverlayRecord\n'


class WrongClass(Exception):
    """An internal record holds a class other than the one expected."""


class _InternalUnpickler(Unpickler):
    """Loads an internal record, refusing every global but one class."""

    def __init__(self, data, klass):
        Unpickler.__init__(self, io.BytesIO(data))
        self._klass = klass

    def find_class(self, module, name):
        klass = self._klass
        if (module, name) == (klass.__module__, klass.__name__):
            return klass
        raise WrongClass('%s.%s' % (module, name))


def load_internal_record(data, klass):
    """The state dict of an internal record whose class must be ``klass``.

    No other class is ever imported.
    """
    u = _InternalUnpickler(data, klass)
    meta = u.load()
    state = u.load()
    if meta is not klass or not isinstance(state, dict):
        raise WrongClass('not a %s record' % klass.__name__)
    return state


def read_stub(data, partition, oid):
    """The ``(home, klass)`` a stub record holds.

    Raises :class:`CorruptStubError`, naming the partition and the oid, for
    anything else.
    """
    if data[:len(OVERLAY_MARK)] == OVERLAY_MARK:
        # An overlay record is its object's stub in that child too.
        from compositestorage.overlay import read_overlay_meta
        try:
            return read_overlay_meta(data)
        except Exception as e:
            raise CorruptStubError(
                partition, oid, 'unreadable overlay record (%s)' % e)
    try:
        state = load_internal_record(data, PartitionStub)
    except WrongClass as e:
        raise CorruptStubError(
            partition, oid, 'it holds a record of class %s' % e)
    except Exception as e:
        raise CorruptStubError(partition, oid, 'unreadable record (%s)' % e)
    if 'home' not in state:
        raise CorruptStubError(partition, oid, 'not a PartitionStub record')
    module, name = state.get('module'), state.get('name')
    return state['home'], ((module, name) if name else None)


__all__ = ['PartitionStub', 'stub_record', 'read_stub', 'oid_hex']
