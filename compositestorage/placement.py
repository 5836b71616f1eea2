"""Where new objects go.

``new_oid()`` gets no context and an oid is permanent once written, so
placement is decided when the oid is allocated.  Strongest rule first:

1. explicit: ``with placement(conn, 'catalog'): ...`` for one connection;
2. containment, once ``containment(db)`` is called: a new object goes to the
   partition of the object that first references it at commit;
3. the configured policy: the default partition, or round-robin.

Explicit placement shadows ``conn.new_oid``, which both ``conn.add()`` and
ZODB's ``ObjectWriter`` call for every new object.  Containment is a small
``Connection`` subclass, installed as ``db.klass``, that remembers which
object is being serialized.  Over ZEO only the server-side policy applies,
because the server allocates oids without any context.
"""
import contextlib
import itertools
import threading

from ZODB.Connection import Connection

from compositestorage.errors import ConfigurationError
from compositestorage.errors import ReadOnlyPartitionError

POLICIES = ('default', 'round-robin')


class DefaultPolicy:
    """Every new object goes to the default partition."""

    name = 'default'

    def __init__(self, storage):
        self._storage = storage

    def choose(self):
        return self._storage.default_partition


class RoundRobinPolicy:
    """Each new oid goes to the next writable partition in prefix order."""

    name = 'round-robin'

    def __init__(self, storage):
        writable = [p for p in storage.partitions if not p.read_only]
        self._cycle = itertools.cycle(writable) if writable else None
        self._storage = storage
        self._lock = threading.Lock()

    def choose(self):
        if self._cycle is None:
            return self._storage.default_partition
        with self._lock:
            return next(self._cycle)


def make_policy(name, storage):
    if name == 'default':
        return DefaultPolicy(storage)
    if name == 'round-robin':
        return RoundRobinPolicy(storage)
    raise ConfigurationError(
        'unknown placement %r: use one of %s' % (name, ', '.join(POLICIES)))


def _composite(conn):
    from compositestorage.storage import CompositeStorage
    storage = conn.db().storage
    if not isinstance(storage, CompositeStorage):
        raise TypeError(
            'placement() needs a connection to a CompositeStorage, not %r'
            % (storage,))
    return storage


@contextlib.contextmanager
def placement(conn, partition):
    """Place the new objects of ``conn`` in ``partition`` inside the block.

    This covers ``conn.add(obj)`` and every new object first reached by a
    commit (or savepoint) made inside the block.  Blocks nest.
    """
    storage = _composite(conn)
    part = storage.partition_named(partition)
    part.check_writable()
    missing = object()
    previous = conn.__dict__.get('new_oid', missing)
    conn.new_oid = part.new_oid
    try:
        yield part
    finally:
        if previous is missing:
            del conn.new_oid
        else:
            conn.new_oid = previous


class ContainmentConnection(Connection):
    """A connection that places a new object beside its first referrer."""

    _cs_referrer = None

    def _store_objects(self, writer, transaction):
        serialize = writer.serialize

        def serialize_tracking(obj):
            self._cs_referrer = obj
            try:
                return serialize(obj)
            finally:
                self._cs_referrer = None

        writer.serialize = serialize_tracking
        return Connection._store_objects(self, writer, transaction)

    def new_oid(self):
        referrer = self._cs_referrer
        oid = getattr(referrer, '_p_oid', None)
        if oid is not None:
            storage = self._db.storage
            choose = getattr(storage, 'new_oid_beside', None)
            if choose is not None:
                return choose(oid)
        return Connection.new_oid(self)


def containment(db):
    """Switch containment on for connections that ``db`` opens from now on.

    With it, a new object reached at commit through an object in partition
    X is placed in X, as mount-point users expect (a catalog's new BTree
    buckets stay in the catalog).  When two new objects in different
    partitions both reach one new object, the one serialized first wins.
    Connections already open keep their class until closed and dropped;
    idle pooled ones (``ZODB.DB`` pools one while creating the root) are
    dropped now.  Returns ``db``.
    """
    db.klass = ContainmentConnection
    with db._lock:
        while True:
            conn = db.pool.pop()
            if conn is None:
                break
            conn._release_resources()
    return db


__all__ = ['placement', 'containment', 'ContainmentConnection',
           'ReadOnlyPartitionError']
