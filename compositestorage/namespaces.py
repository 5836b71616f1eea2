"""Keyed namespaces: oid factories for integers, UUIDs and distinguished
names (the PEAK post's second scenario, ``docs/keyed.rst``).

``keyed(conn, 'users', key, factory)`` gets or creates the object for a
key in the partition called ``users``; ``storage.lookup('users', key)``
returns its oid or ``None``.  Any partition can hold keyed objects beside
its ordinary ones: they live in the top half of its oid range, which the
allocator never enters (layout in :mod:`compositestorage.keys`).

The oid of a key is computed, not looked up in a shared counter, so two
processes that ask for the same new key pick the same oid without
talking to each other.  Both create an object there; the second commit
finds the first's record and fails with ZODB's ``ConflictError``, a
transient error, and its retry (``transaction.manager.attempts()``, or
Zope's publisher) finds the first's object.  Nothing is duplicated.

* An integer ``n`` is suffix ``0x80 << 48 | n``: no table, no hash.
* A UUID or a DN hashes to a home slot.  The key table that covers the
  slot (a small persistent record at a fixed oid of the partition)
  records which key holds each slot; a key whose home slot another key
  holds takes the next free slot the table covers, and the table is
  where ``lookup`` finds it.  Each table covers 1/65536 of the slots, so
  concurrent creations of different keys rarely touch one table, and when
  they do its conflict resolution merges them; only two keys claiming one
  slot, or the same key claimed twice, conflict, and the retry sorts them.

A keyed object is an ordinary object of its partition: counted, iterated,
packed like any other.  Nothing references it but what the application
makes reference it, so one that nothing references is garbage at the
next pack, like any object.  Its key keeps its oid all the same (the
table entry stays; tables are kept by every pack), so asking for the key
again re-creates the object at the same oid.
"""
import weakref

import persistent
from ZODB.POSException import ConflictError
from ZODB.POSException import POSKeyError

from compositestorage.errors import KeyedError
from compositestorage.errors import ReadOnlyPartitionError
from compositestorage.errors import oid_hex
from compositestorage.keys import canonical_key
from compositestorage.keys import home_slot
from compositestorage.keys import int_oid
from compositestorage.keys import probe
from compositestorage.keys import slot_oid
from compositestorage.keys import table_oid
from compositestorage.stubs import load_internal_record


class KeyTable(persistent.Persistent):
    """Which hashed key holds which slot, among the slots one table covers.

    ``keys`` maps a key's canonical text to its slot.  Entries are never
    changed or removed, so two transactions that each added keys merge,
    unless they gave one slot to two keys or one key two slots.
    """

    def __init__(self, namespace):
        self.namespace = namespace
        self.keys = {}

    def free_slot(self, home):
        """Slot ``home`` if no key holds it, else the first free one after."""
        taken = set(self.keys.values())
        slot = home
        i = 0
        while slot in taken:
            i += 1
            slot = probe(home, i)
        return slot

    def record(self, canonical, slot):
        self.keys[canonical] = slot
        self._p_changed = True

    def _p_resolveConflict(self, old, committed, new):
        keys = dict(committed['keys'])
        holders = {slot: key for key, slot in keys.items()}
        for key, slot in new['keys'].items():
            if key in old['keys']:
                continue
            if keys.get(key, slot) != slot or holders.get(slot, key) != key:
                raise ConflictError('key table of namespace %r: two '
                                    'transactions claimed one slot or one '
                                    'key' % new.get('namespace'))
            keys[key] = slot
            holders[slot] = key
        return dict(committed, keys=keys)

    def __repr__(self):
        return '<KeyTable of namespace %r, %d keys>' % (
            getattr(self, 'namespace', None), len(getattr(self, 'keys', ())))


#: ``{ZODB.DB: {namespace: prefix}}`` declared for storages that are not
#: composites (ZEO clients).
_declared = weakref.WeakKeyDictionary()


def declare_namespaces(db, prefixes):
    """Tell ``keyed`` on ``db`` the prefixes of the server's partitions.

    Only needed where ``db``'s storage is not the composite itself (a ZEO
    client): ZEO 6 serves no call that could ask the server's config.
    ``prefixes`` is ``{partition name: prefix}`` as in that config.  A key
    table records its partition's name, and a declaration that contradicts
    one is refused when the table is read.
    """
    _declared.setdefault(db, {}).update(prefixes)


def keyed(conn, namespace, key, factory):
    """The object for ``key`` in partition ``namespace``; created by
    calling ``factory()`` only if the key is new.

    A new object is added to ``conn`` at the key's oid, and a hashed key
    is recorded in its key table; the caller commits.  If another
    connection or process committed the same key meanwhile, the commit
    raises ``ConflictError`` and a retry returns that object.  ``key`` is
    an ``int`` (0 to 2**54 - 1), a ``uuid.UUID`` (or its ``str``) or a
    distinguished name (``str``, see :func:`compositestorage.keys.
    normalize_dn`).
    """
    prefix, read_only = _namespace(conn, namespace)
    canonical = canonical_key(key, namespace)
    if isinstance(canonical, int):
        oid = int_oid(prefix, canonical)
        obj = _get(conn, oid)
        if obj is None:
            obj = _create(conn, namespace, read_only, oid, factory, key)
        return obj
    home = home_slot(canonical)
    table = _table(conn, namespace, table_oid(prefix, home))
    slot = table.keys.get(canonical) if table is not None else None
    if slot is not None:
        oid = slot_oid(prefix, slot)
        obj = _get(conn, oid)
        if obj is None:     # collected by a pack: the key keeps its oid
            obj = _create(conn, namespace, read_only, oid, factory, key)
        return obj
    if read_only:
        raise ReadOnlyPartitionError(namespace, prefix, slot_oid(prefix, home))
    obj = _new(factory, namespace, key)
    new_table = table is None
    if new_table:
        table = KeyTable(namespace)
    slot = table.free_slot(home)
    oid = slot_oid(prefix, slot)
    _check_free(conn, namespace, oid, key)
    if new_table:
        conn._add(table, table_oid(prefix, home))
    table.record(canonical, slot)
    conn._add(obj, oid)
    return obj


def find(conn, namespace, key):
    """The object for ``key`` in partition ``namespace`` as ``conn`` sees
    it, or ``None``; creates nothing.  Works through ZEO too."""
    prefix, _ = _namespace(conn, namespace)
    canonical = canonical_key(key, namespace)
    if isinstance(canonical, int):
        return _get(conn, int_oid(prefix, canonical))
    table = _table(conn, namespace, table_oid(prefix, home_slot(canonical)))
    slot = table.keys.get(canonical) if table is not None else None
    return None if slot is None else _get(conn, slot_oid(prefix, slot))


def lookup(storage, namespace, key):
    """``storage.lookup``: the oid of ``key`` in partition ``namespace`` of
    composite ``storage``, from its last committed state, or ``None``."""
    part = storage.partition_named(namespace)
    canonical = canonical_key(key, namespace)
    if isinstance(canonical, int):
        oid = int_oid(part.prefix, canonical)
    else:
        home = home_slot(canonical)
        toid = table_oid(part.prefix, home)
        try:
            data = storage.load(toid)[0]
        except POSKeyError:
            return None
        try:
            state = load_internal_record(data, KeyTable)
        except Exception as e:
            raise KeyedError(
                'partition %r: the record at %s is not a readable key table '
                '(%s); run "compositestorage verify"'
                % (namespace, oid_hex(toid), e)) from e
        slot = state['keys'].get(canonical)
        if slot is None:
            return None
        oid = slot_oid(part.prefix, slot)
    try:
        storage.load(oid)
    except POSKeyError:
        return None
    return oid


# --- helpers -------------------------------------------------------------


def _namespace(conn, namespace):
    """``(prefix, read_only)`` of the partition called ``namespace``."""
    db = conn.db()
    storage = db.storage
    if getattr(storage, 'partition_named', None) is not None:
        part = storage.partition_named(namespace)
        return part.prefix, part.read_only
    declared = _declared.get(db, {})
    if namespace in declared:
        return declared[namespace], storage.isReadOnly()
    raise KeyedError(
        'namespace %r: %s is not a composite storage, so its partitions '
        'are unknown here; declare them once with compositestorage.namespaces.'
        'declare_namespaces(db, {%r: PREFIX}), the prefix as the server\'s '
        'config gives it' % (namespace, storage.getName(), namespace))


def _get(conn, oid):
    """The object at ``oid`` as ``conn`` sees it (added or committed), or
    ``None``."""
    try:
        return conn.get(oid)
    except POSKeyError:
        return None


def _table(conn, namespace, oid):
    table = _get(conn, oid)
    if table is None:
        return None
    if not isinstance(table, KeyTable) or table.namespace != namespace:
        raise KeyedError(
            'namespace %r: oid %s holds %r, not this namespace\'s key table; '
            'the prefix declared for %r is wrong (check it against the '
            'server\'s config)' % (namespace, oid_hex(oid), table, namespace))
    return table


def _new(factory, namespace, key):
    obj = factory()
    if not isinstance(obj, persistent.Persistent):
        raise KeyedError('namespace %r, key %r: the factory returned %r, '
                         'which is not a persistent object'
                         % (namespace, key, obj))
    if obj._p_jar is not None or obj._p_oid is not None:
        raise KeyedError('namespace %r, key %r: the factory returned %r, '
                         'which already has an oid; return a new object'
                         % (namespace, key, obj))
    return obj


def _create(conn, namespace, read_only, oid, factory, key):
    if read_only:
        raise ReadOnlyPartitionError(namespace, oid[0], oid)
    obj = _new(factory, namespace, key)
    _check_free(conn, namespace, oid, key)
    conn._add(obj, oid)
    return obj


def _check_free(conn, namespace, oid, key):
    """Refuse an oid whose record an undo deleted: creating an object
    there would conflict in every retry.  Only a composite in this process
    can tell; a pack frees the oid.  (A record committed after ``conn``'s
    snapshot began is no such case: the commit conflicts, and the retry
    finds it.)"""
    storage = conn.db().storage
    part_for = getattr(storage, 'partition_for', None)
    if part_for is None or part_for(oid).current_serial(oid) is None:
        return
    try:
        storage.load(oid)
        return
    except POSKeyError:
        pass
    raise KeyedError(
        'namespace %r, key %r: oid %s holds a deleted record (an undo '
        'removed the object); pack the storage to free the oid, then ask '
        'again' % (namespace, key, oid_hex(oid)))
