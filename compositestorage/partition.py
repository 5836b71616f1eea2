"""A partition: a name, a prefix byte and a child storage.

The partition allocates its own oids (DESIGN.md, invariant 1): the child's
``new_oid`` is never asked, because a child that holds stubs for foreign
oids would hand out oids in other partitions' ranges.  The next oid is
derived from the child when the partition opens.

Each child keeps one internal record of its own, the partition map, at the
top oid of its prefix range.  It says which partition of which composite
the child belongs to, so a renamed, renumbered or doubly used child is
refused.

The top half of the range is kept for keyed objects
(:mod:`compositestorage.namespaces`, layout in :mod:`compositestorage.keys`):
the allocator hands out oids from the bottom half only, so a keyed oid
never meets an allocated one.
"""
import threading
import uuid

import persistent
from ZODB.POSException import POSKeyError
from ZODB.POSException import ReadConflictError
from ZODB.utils import p64
from ZODB.utils import u64
from ZODB.utils import z64

from compositestorage.children import adapter_for
from compositestorage.errors import ConfigurationError
from compositestorage.errors import CorruptRecordError
from compositestorage.errors import ForeignRecordError
from compositestorage.errors import PartitionFullError
from compositestorage.errors import PartitionMapError
from compositestorage.errors import ReadOnlyPartitionError
from compositestorage.errors import oid_hex
from compositestorage.keys import KEYED_SUFFIX
from compositestorage.keys import TABLE_HEAD
from compositestorage.references import class_of
from compositestorage.references import quick_check
from compositestorage.stubs import internal_record
from compositestorage.stubs import load_internal_record
from compositestorage.stubs import stub_record

MAX_PREFIX = 0x7f
MAP_SUFFIX = b'\xff' * 7


def map_oid(prefix):
    """The oid of the partition-map record in partition ``prefix``."""
    return bytes((prefix,)) + MAP_SUFFIX


def is_internal(oid, prefix):
    """Whether ``oid`` in the child of partition ``prefix`` is internal.

    Stubs sit at foreign oids and the map at the top of the own range.
    """
    return oid[0] != prefix or oid[1:] == MAP_SUFFIX


def check_partition(name, prefix, storage):
    """Refuse one partition that can never be valid."""
    if not isinstance(prefix, int) or not 0 <= prefix <= MAX_PREFIX:
        raise ConfigurationError(
            'partition %r has prefix %r; prefixes run from 0 to %d '
            '(the top bit stays clear for RelStorage)'
            % (name, prefix, MAX_PREFIX))
    if storage is None:
        raise ConfigurationError(
            'partition %r has no storage; give it exactly one storage '
            'section (<filestorage>, <mappingstorage>, <zeoclient>, ...)'
            % name)


def check_layout(partitions, default_partition=None):
    """Refuse partitions that cannot form one composite.

    ``partitions`` are ``(name, prefix, storage, key)`` tuples, where
    ``key`` is equal for two handles on one child storage (its real path,
    for files).  The config checks them before any child is opened, the
    storage again when it is built from Python.
    """
    if not partitions:
        raise ConfigurationError('a composite needs at least one partition')
    names = {}
    prefixes = {}
    keys = {}
    for name, prefix, storage, key in partitions:
        check_partition(name, prefix, storage)
        if name in names:
            raise ConfigurationError(
                'two partitions are called %r; names must be unique' % name)
        if prefix in prefixes:
            raise ConfigurationError(
                'partitions %r and %r both have prefix %d; each partition '
                'needs its own' % (prefixes[prefix], name, prefix))
        if key is not None and key in keys:
            raise ConfigurationError(
                'partitions %r and %r use the same storage %s; each '
                'partition needs a child of its own'
                % (keys[key], name, key[-1]))
        names[name] = prefix
        prefixes[prefix] = name
        if key is not None:
            keys[key] = name
    if 0 not in prefixes:
        raise ConfigurationError(
            'no partition has prefix 0; exactly one partition, the primary, '
            'must have prefix 0 (configured: %s)'
            % ', '.join('%s=%d' % (p[0], p[1]) for p in partitions))
    if default_partition is not None and default_partition not in names:
        raise ConfigurationError(
            'default-partition %r is not a configured partition '
            '(configured: %s)' % (default_partition, ', '.join(
                '%s=%d' % item for item in names.items())))


class PartitionMap(persistent.Persistent):
    """The partition map a child records, as a plain ZODB sees it."""

    def __repr__(self):
        return '<PartitionMap %r of composite %r>' % (
            getattr(self, 'partition', None), getattr(self, 'composite', None))


def map_record(state):
    return internal_record(PartitionMap, state)


def read_map_record(data):
    return load_internal_record(data, PartitionMap)


class Partition:
    """One child storage of a composite, and what the composite knows of it.

    ``stubs`` caches the class hint of every committed stub seen in this
    child; stubs are immutable, so the cache never needs invalidating
    except when a pack removes them.
    """

    def __init__(self, name, prefix, storage, read_only=False):
        check_partition(name, prefix, storage)
        self.name = name
        self.prefix = prefix
        #: what the composite needs of the child beyond the storage API
        self.child = adapter_for(storage)
        #: the child as the composite calls it: the adapter may wrap it
        #: (a RelStorage child is called by one thread at a time)
        self.storage = self.child.storage
        #: the child itself, or the FileStorage under a BlobStorage proxy
        self.base = self.child.base
        self.read_only = bool(read_only or storage.isReadOnly())
        self.child.prepare(self.read_only)
        self.map_oid = map_oid(prefix)
        self._base = prefix << 56
        self._limit = self._base + KEYED_SUFFIX
        self._next = None
        self._allocated = None   # the last oid handed out, once _next is set
        self._block_end = 0
        self._oid_lock = threading.Lock()
        self.stubs = {}
        #: finds nothing in a record this child can store as it is
        self.quick_check = quick_check(prefix)

    def __repr__(self):
        return '<Partition %s prefix=%d %s>' % (
            self.name, self.prefix, self.storage.getName())

    def owns(self, oid):
        return oid[0] == self.prefix

    def check_writable(self, oid=None):
        if self.read_only:
            raise ReadOnlyPartitionError(self.name, self.prefix, oid)

    # --- oid allocation ---------------------------------------------------

    #: ``reserve(prefix, floor, count)``: the first of ``count`` oids (as
    #: integers, none below ``floor``) that no other process is given; set
    #: for the partitions of a shared composite (see compositestorage.mvcc)
    oid_blocks = None
    #: how many oids a process takes from the shared counter at a time
    OID_BLOCK = 32

    def new_oid(self):
        with self._oid_lock:
            if self._next is None or self._next >= self._block_end:
                self._next = self._next_block()
            if self._next >= self._limit:
                raise PartitionFullError(self.name, self.prefix)
            oid = self._allocated = p64(self._next)
            self._next += 1
            return oid

    def _next_block(self):
        """Where allocation goes on: above the child's highest own oid at
        first, then in the next block of the shared counter, if any."""
        if self._next is None:
            top = self.max_own_oid()
            floor = max(u64(top) + 1 if top else 0, self._base + 1)
        else:
            floor = self._next
        if self.oid_blocks is None or floor >= self._limit:
            self._block_end = self._limit
            return floor
        first = self.oid_blocks(self.prefix, floor, self.OID_BLOCK)
        self._block_end = first + self.OID_BLOCK
        return first

    def saw_oid(self, oid):
        """Keep allocation above an oid stored by a caller (restore, copy)."""
        if self._next is None or oid <= self._allocated:
            return      # the common case: one of ours, or nothing allocated
        n = u64(oid)
        if n < self._limit:
            with self._oid_lock:
                if n >= self._next:
                    self._next = n + 1
                    self._allocated = oid

    def _own_range(self):
        """The first and last oid of this partition's own range."""
        return (bytes((self.prefix,)) + b'\0' * 7,
                bytes((self.prefix,)) + b'\xff' * 7)

    def max_own_oid(self):
        """The highest oid the allocator has handed out, or ``None``.

        Keyed objects sit above the allocator's range, and never count.
        """
        try:
            return self.child.max_oid(self._own_range()[0],
                                      p64(self._limit - 1))
        except ConfigurationError as e:
            raise ConfigurationError('partition %r: %s' % (self.name, e))

    def own_oids(self):
        """The oids of this partition's own current records (not the map),
        an iterable; for a FileStorage one that reads its index lazily."""
        try:
            oids = self.child.oids_in(*self._own_range())
        except ConfigurationError as e:
            raise ConfigurationError('partition %r: %s' % (self.name, e))
        return (oid for oid in oids if oid != self.map_oid)

    def key_table_oids(self):
        """The oids of the key tables this child holds (see
        :mod:`compositestorage.namespaces`); a pack keeps them all."""
        head = bytes((self.prefix,)) + TABLE_HEAD
        return list(self.child.oids_in(head + b'\0\0', head + b'\xff\xff'))

    def prefixes_held(self):
        """The first bytes of every oid this child holds, where cheap.

        ``None`` for child types whose oids cannot be listed cheaply.
        """
        return self.child.prefixes_held()

    def count_stubs(self):
        """How many stubs this child holds: its records at foreign oids.

        The root stub at ``z64`` of a secondary counts too.  ``None`` for
        children whose oids cannot be listed cheaply.
        """
        return self.child.count_outside(*self._own_range())

    def describe_records(self):
        """What a child without a map holds, in words, or ``None`` if empty.

        How many records and the class of its root (``z64``) where the
        child can count cheaply; else whether it has committed anything.
        """
        stubs = self.count_stubs()
        if stubs is not None:
            count = stubs + self.count_own()
            if not count:
                return None
            held = 'holds %d record%s' % (count, '' if count == 1 else 's')
        elif self.storage.lastTransaction() != z64:
            held = 'has committed transactions (the last %s)' % (
                oid_hex(self.storage.lastTransaction()))
        else:
            return None
        try:
            root = class_of(self.storage.load(z64)[0])
        except POSKeyError:
            root = None
        if root:
            held += ' (its root, oid %s, is a %s.%s)' % (oid_hex(z64), *root)
        return held

    def first_oid_with_prefix(self, prefix):
        return self.child.min_oid(bytes((prefix,)) + b'\0' * 7,
                                  bytes((prefix,)) + b'\xff' * 7)

    def count_own(self):
        """The number of this partition's own objects (no internal ones)."""
        n = self.child.count_in(*self._own_range())
        if n and self.child.current_serial(self.map_oid) is not None:
            n -= 1
        return n

    # --- the partition map ------------------------------------------------

    def read_map(self):
        """The partition map this child records, or ``None``.

        The map is looked for under every prefix the child holds, not only
        the configured one, so a child configured under another prefix is
        recognised rather than taken for a new one.
        """
        held = self.prefixes_held()
        candidates = range(MAX_PREFIX + 1) if held is None else sorted(held)
        found = []
        for prefix in candidates:
            oid = map_oid(prefix)
            try:
                data, _ = self.storage.load(oid)
            except POSKeyError:
                continue
            try:
                found.append(read_map_record(data))
            except Exception as e:
                raise CorruptRecordError(
                    'partition %r: the record at %s is not a readable '
                    'partition map (%s); this child was not written by '
                    'compositestorage or is damaged'
                    % (self.name, oid_hex(oid), e))
        if len(found) > 1:
            raise PartitionMapError(
                'partition %r (%s) records %d partition maps (%s); it has '
                'been written as more than one partition: run '
                '"compositestorage verify"' % (
                    self.name, self.storage.getName(), len(found),
                    ', '.join('%s=%s' % (m.get('partition'), m.get('prefix'))
                              for m in found)))
        return found[0] if found else None

    def current_serial(self, oid):
        """The tid of ``oid``'s last record in this child, deleted or not.

        A store over a deleted record must name that record's tid.
        """
        return self.child.current_serial(oid)

    def check_current_serial(self, oid, serial):
        """``checkCurrentSerialInTransaction`` for a read-only partition.

        A read-only child is never begun: it takes no part in the commit,
        and a read-only FileStorage refuses ``tpc_begin``.  So the serial
        is checked here, against the child's current record, and a stale
        one raises ZODB's ``ReadConflictError`` with the oid and both
        serials, as the child itself would.

        ZODB's contract is that the serial is still current when the
        transaction commits.  The check runs when ZODB asks, inside the
        transaction, not at vote.  For a partition only this composite can
        write that is the same thing: the composite never writes a
        read-only partition, and a child opened for writing holds its lock
        against every other process.  A child opened read-only can be
        written by another process meanwhile (the archive's own
        application, say).  Its FileStorage does not read what that
        process appends after it opened, so the appended tail of the file
        is read too.  No lock is shared with that process, so there is a
        window until the commit finishes whenever the check runs, and
        checking at vote would narrow it without closing it.
        """
        committed = self.current_serial(oid)
        if committed is None:
            raise POSKeyError(oid)
        if committed != serial:
            raise ReadConflictError(oid=oid, serials=(committed, serial))
        elsewhere = self.serial_written_elsewhere(oid)
        if elsewhere is not None:
            raise ReadConflictError(
                'partition %r is read-only here and oid %s was changed by '
                'another process writing %s since this composite opened '
                'it; reopen the composite to read the change'
                % (self.name, oid_hex(oid), self.storage.getName()),
                oid=oid, serials=(elsewhere, serial))

    def serial_written_elsewhere(self, oid):
        """The tid of ``oid``'s newest record that another process has
        written to this child since it was opened, or ``None`` (see the
        child's adapter: only a FileStorage opened read-only can tell)."""
        return self.child.appended_serial(oid)


def _names(partitions):
    return ', '.join('%s=%d' % (p.name, p.prefix) for p in partitions)


def check_foreign_records(partitions):
    """Refuse a child holding oids of no configured partition."""
    prefixes = {p.prefix for p in partitions}
    for part in partitions:
        unknown = sorted(set(part.prefixes_held() or ()) - prefixes)
        if unknown:
            raise ForeignRecordError(
                'partition %r (%s) holds records whose oids start with '
                'byte %s, which is the prefix of no configured partition '
                '(configured: %s); the first is %s. Configure the '
                'partition those oids belong to, or check that this is '
                'the right file' % (
                    part.name, part.storage.getName(),
                    ', '.join('0x%02x' % b for b in unknown),
                    _names(partitions),
                    oid_hex(part.first_oid_with_prefix(unknown[0]))))


def check_maps(partitions, primary, root_class):
    """Check the partition maps the children record against the config.

    Returns the composite's identity and, for each writable child whose map
    is missing or out of date, the internal records it still needs:
    ``{Partition: [(oid, data)]}``.  Raises :class:`PartitionMapError`,
    naming both sides, for a child that belongs to another partition or
    another composite, or that records a partition the config lacks.
    """
    maps = {p: p.read_map() for p in partitions}
    for part, recorded in maps.items():
        if recorded is None and part is not primary:
            check_no_records(part)
    configured = {p.name: p.prefix for p in partitions}
    mapped = [p for p, m in maps.items() if m]
    if maps[primary]:
        identity = maps[primary]['composite']
    elif mapped and not primary.read_only:
        raise PartitionMapError(
            'primary partition %r (%s) records no partition map, but '
            'partition %r records composite %s; the primary is not the '
            'file this composite was created with: point %r at it'
            % (primary.name, primary.storage.getName(), mapped[0].name,
               maps[mapped[0]]['composite'], primary.name))
    elif mapped:
        identity = maps[mapped[0]]['composite']
    else:
        identity = uuid.uuid4().hex
    for part, recorded in maps.items():
        if recorded and (recorded.get('partition'), recorded.get('prefix')) \
                != (part.name, part.prefix):
            raise PartitionMapError(
                'partition %r (prefix %d) is configured on %s, but that '
                'child records itself as partition %r (prefix %s) of '
                'composite %s; sections must not be renamed, renumbered '
                'or pointed at another partition\'s storage'
                % (part.name, part.prefix, part.storage.getName(),
                   recorded.get('partition'), recorded.get('prefix'),
                   recorded.get('composite')))
    for part, recorded in maps.items():
        if not recorded:
            continue
        if recorded.get('composite') != identity:
            raise PartitionMapError(
                'partition %r (%s) belongs to composite %s, but partition '
                '%r belongs to composite %s; a child cannot be moved '
                'between composites'
                % (part.name, part.storage.getName(),
                   recorded.get('composite'), primary.name, identity))
        for other, prefix in recorded.get('partitions', {}).items():
            if other not in configured:
                raise PartitionMapError(
                    'partition %r (prefix %d), recorded by partition %r, '
                    'is not configured; objects in it would be '
                    'unreachable: add its section back'
                    % (other, prefix, part.name))
            if configured[other] != prefix:
                raise PartitionMapError(
                    'partition %r is configured with prefix %d, but %r '
                    'records it with prefix %d; renumbering would remap '
                    'data' % (other, configured[other], part.name, prefix))
    pending = {}
    for part, recorded in maps.items():
        state = {'composite': identity, 'partition': part.name,
                 'prefix': part.prefix, 'partitions': configured,
                 'format': 1}
        if recorded == state or part.read_only:
            continue
        records = [(part.map_oid, map_record(state))]
        if recorded is None and part is not primary:
            # Invariant 2: the secondary's z64 is the composite root's stub.
            records.append((z64, stub_record(primary.name, root_class)))
        pending[part] = records
    return identity, pending


def check_no_records(part):
    """Refuse a secondary whose child is a database of its own.

    The composite writes a child's partition map in the first transaction
    that writes to it, so a secondary without a map has never been written
    by a composite.  If it holds records anyway, it is some other database
    (a ``tenant.fs`` configured as a partition to merge it, say): its
    records would be taken for stubs, its root overwritten by the root stub
    in the next commit and everything else removed by the next pack.  It is
    refused before anything is written.  Only the primary adopts an
    existing database, because its oids and root are the composite's.
    """
    held = part.describe_records()
    if held is None:
        return
    raise PartitionMapError(
        'partition %r (prefix %d) is configured on %s, which %s but no '
        'partition map: it is a database of its own, not a partition of '
        'this composite, and as a secondary it would lose every record '
        '(its root overwritten by a stub, the rest removed by the next '
        'pack).  Nothing was written.  An existing database can be adopted '
        'only as the primary (prefix 0) of a composite; to merge its '
        'objects into this one, give partition %r a new file, export them '
        'from this one with ZODB\'s Connection.exportFile and import them '
        'with default-partition %s (README: "Adopting an existing '
        'database")' % (part.name, part.prefix, part.storage.getName(),
                        held, part.name, part.name))
