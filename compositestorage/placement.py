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

    ``db`` must be a database over a composite in this process: a ZEO
    client (or any other storage) is refused, because through ZEO the
    server allocates every oid without knowing the referrer.

    With it, a new object reached at commit through an object in partition
    X is placed in X, as mount-point users expect (a catalog's new BTree
    buckets stay in the catalog).  When two new objects in different
    partitions both reach one new object, the one serialized first wins.
    Connections already open keep their class until closed and dropped;
    idle pooled ones (``ZODB.DB`` pools one while creating the root) are
    dropped now.  Returns ``db``.
    """
    from compositestorage.errors import ConfigurationError
    from compositestorage.storage import CompositeStorage
    storage = db.storage
    if not isinstance(storage, CompositeStorage):
        through_zeo = type(storage).__name__ == 'ClientStorage'
        raise ConfigurationError(
            'containment(db) needs a database over a CompositeStorage opened '
            'in this process, and this one is over a %s%s' % (
                type(storage).__name__,
                ': through ZEO the server allocates every oid without '
                'knowing the referrer, so containment cannot apply there; '
                'use the server\'s placement policy, or open the composite '
                'in this process' if through_zeo else ''))
    db.klass = ContainmentConnection
    with db._lock:
        while True:
            conn = db.pool.pop()
            if conn is None:
                break
            conn._release_resources()
    return db


def contain_every_db(storage):
    """Switch containment on for every ``ZODB.DB`` opened on ``storage``:
    what ``containment true`` in ``<compositestorage>`` does.

    A config opens the storage, and ZODB's own factories (``<zodb>``,
    Zope's ``<zodb_db>``, zodburi's callers) then make the ``ZODB.DB``,
    with no hook of ours in between.  The one call a ``ZODB.DB`` makes
    on its storage while it is being made is ``registerDB`` (through its
    ``MVCCAdapter``), before it creates the root; so the storage's
    ``registerDB`` is wrapped to find that DB, the caller a few frames up,
    and set its connection class, so that every connection it opens,
    the first included, places by containment.  A DB that cannot be found
    so (a ZODB that no longer calls ``registerDB`` from ``DB.__init__``) is
    logged as a warning: call :func:`containment` on it.
    """
    storage.containment = True
    registered = storage.registerDB

    def registerDB(db_or_adapter):
        registered(db_or_adapter)
        db = _db_being_made(db_or_adapter)
        if db is not None:
            db.klass = ContainmentConnection
            return
        import logging
        if type(db_or_adapter).__module__.startswith('ZEO.'):
            why = ('has no effect in a ZEO server, which allocates oids '
                   'without knowing the referrer: its placement applies')
        else:
            why = ('found no ZODB.DB being opened on it: call '
                   'compositestorage.containment(db)')
        logging.getLogger(__name__).warning(
            'containment true in %s %s', storage.getName(), why)

    storage.registerDB = registerDB
    return storage


def _db_being_made(db_or_adapter):
    """The ``ZODB.DB`` whose ``__init__`` calls ``registerDB``."""
    import sys

    from ZODB.DB import DB
    if isinstance(db_or_adapter, DB):
        return db_or_adapter
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            break
        candidate = frame.f_locals.get('self')
        if isinstance(candidate, DB) and frame.f_code.co_name == '__init__':
            return candidate
        frame = frame.f_back
    return None


__all__ = ['placement', 'containment', 'contain_every_db',
           'ContainmentConnection', 'ReadOnlyPartitionError']
