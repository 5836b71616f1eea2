"""Checking a composite's children against the invariants, offline.

``verify(storage)`` walks every current record of every partition and
reports each problem with the partition, the oid, the record's class and,
for references, the referrer and its partition:

``dangling-reference``
    a record refers (strongly) to an object that does not exist;
``missing-stub``
    a record refers to an object of another partition, and its child holds
    no stub for it (the child is not self-contained); a secondary child
    without the root stub at ``z64`` too;
``stub-target-missing``
    a stub stands for an object that its home partition does not hold;
``orphan-stub``
    a stub that no record of its child refers to: garbage, left when a
    reference is dropped or its referrer deleted, until a pack (or
    ``repair``) removes it;
``corrupt-stub``
    a record at a foreign oid that is not a readable stub of the right home;
``foreign-object``
    a real object stored in a partition that is not its home (the object
    would live in two places);
``unknown-partition``
    a reference to an oid whose prefix no partition has;
``partition-map``
    a child whose partition map is missing or disagrees with the
    configuration or with the other children;
``partial-transaction``
    a transaction that spans several partitions is missing from one of
    them (a damaged or replaced file): each child's record of a transaction
    names every partition it spans, and every transaction of every
    FileStorage child is checked.

A child that holds no record at all has never been written: the composite
writes its partition map (and, in a secondary, the root stub) with the
first transaction that commits after it was opened, so a composite that was
opened but never written to (a server just started) is healthy, and so is
a partition added since the last commit.  Only an empty primary beside
children that record a map is a problem: it is not the file the composite
was created with.

Weak references that dangle are not problems (ZODB allows them), but a
weak reference to another partition needs its stub like any other.

Garbage is reported but is not an error: an orphan stub, and the missing
target of an orphan stub (its object was deleted, or its creation undone),
are what normal use leaves behind until the next pack, as garbage objects
are in any FileStorage.  Such problems have ``garbage`` set.
"""
from BTrees.QQBTree import QQTreeSet
from ZODB.fsIndex import fsIndex
from ZODB.POSException import POSKeyError
from ZODB.utils import p64
from ZODB.utils import u64
from ZODB.utils import z64

from compositestorage.errors import CorruptStubError
from compositestorage.errors import oid_hex
from compositestorage.partition import is_internal
from compositestorage.progress import quiet
from compositestorage.recovery import recent_transactions
from compositestorage.references import class_of
from compositestorage.references import strong_and_weak_oids
from compositestorage.stubs import read_stub


class Problem:
    """One thing wrong, as ``verify`` reports it."""

    def __init__(self, kind, partition, oid, klass=None, referrer=None,
                 referrer_partition=None, detail='', garbage=False):
        self.kind = kind
        self.garbage = garbage
        self.partition = partition
        self.oid = oid
        self.klass = klass
        self.referrer = referrer
        self.referrer_partition = referrer_partition
        self.detail = detail

    def as_dict(self):
        return {'kind': self.kind, 'partition': self.partition,
                'oid': oid_hex(self.oid) if self.oid is not None else None,
                'class': self.klass,
                'referrer': (oid_hex(self.referrer)
                             if self.referrer is not None else None),
                'referrer_partition': self.referrer_partition,
                'detail': self.detail, 'garbage': self.garbage}

    def __str__(self):
        text = '%s: partition %r, oid %s' % (
            self.kind, self.partition,
            oid_hex(self.oid) if self.oid is not None else '-')
        if self.klass:
            text += ' (%s)' % self.klass
        if self.referrer is not None:
            text += ', referred to by %s in partition %r' % (
                oid_hex(self.referrer), self.referrer_partition)
        if self.detail:
            text += ': ' + self.detail
        if self.garbage:
            text += ' (garbage: the next pack removes it)'
        return text


def current_records(storage, skips_deleted=None):
    """Yield ``(oid, tid, data)`` of every current record of ``storage``
    (a child), stepping over deleted objects (where ``skips_deleted``, the
    child's ``record_iternext`` raises for one; by default its adapter
    says; a record without data is one too)."""
    if skips_deleted is None:
        from compositestorage.children import adapter_for
        skips_deleted = adapter_for(storage).skips_deleted
    token = None
    while True:
        try:
            oid, tid, data, token = storage.record_iternext(token)
        except (ValueError, StopIteration):
            # an empty storage, or no key at/after token (RelStorage
            # raises StopIteration for an empty one)
            return
        except POSKeyError as e:
            # FileStorage raises for an oid whose current record has no
            # data (an undone creation or a deletion): step over it
            if not skips_deleted:
                raise
            token = p64(u64(e.args[0]) + 1)
            continue
        if data is not None:
            # RelStorage keeping history returns a deleted object's
            # current record with no data instead of raising: step over
            # it as over FileStorage's deletions
            yield oid, tid, data
        if token is None:
            return


def served_records(client):
    """:func:`current_records` through a ZEO ``client``.

    A storage with no record answers ``record_iternext`` with a
    ``ValueError``, which reaches a ZEO client as a ``ServerException``
    (after the server has logged its traceback).  A storage that has
    committed nothing is therefore not asked at all, and that
    ``ServerException`` ends the records like the ``ValueError`` it wraps.
    """
    from ZEO.Exceptions import ServerException
    if client.lastTransaction() in (None, z64):
        return
    try:
        yield from current_records(client)
    except ServerException as e:
        if not (e.args and e.args[0] == 'builtins.ValueError'):
            raise


def _klass(data):
    klass = class_of(data) if data else None
    return '%s.%s' % klass if klass else None


def estimate(storage):
    """How many records the children of ``storage`` hold, or ``None``."""
    total = 0
    for part in storage.partitions:
        try:
            total += len(part.base)
        except Exception:
            return None
    return total


def verify(storage, progress=None):
    """``(problems, counts)``: every :class:`Problem`, and how many records
    each partition holds (objects and stubs).

    Two passes over each child's current records keep memory bounded: the
    first notes every oid in ``fsIndex`` sets (compact B-trees, about ten
    bytes an oid) and checks each stub's own record; the second checks
    every reference against those sets.  Nothing else is kept per record.
    """
    progress = progress or quiet
    partitions = storage.partitions
    by_prefix = {p.prefix: p for p in partitions}
    problems = []
    counts = {}
    own = {}            # prefix -> fsIndex: the oids of its own objects
    stubs = {}          # prefix -> fsIndex: foreign oid -> 1 if stub is sound
    unwritten = set()   # prefixes of children that hold no record yet
    total = estimate(storage)
    overlay_parts = getattr(storage, 'overlay_parts', {})
    overlaid = {}       # prefix -> fsIndex: the overlay records it holds

    shown = progress('verify: records', total, 'records')
    try:
        for part in partitions:
            own[part.prefix] = mine = fsIndex()
            stubs[part.prefix] = foreign = fsIndex()
            n_own = n_stubs = n_internal = n_overlays = 0
            overlaid[part.prefix] = records = fsIndex()
            overlay = overlay_parts.get(part.prefix)
            for oid, _, data in current_records(part.base,
                                                part.child.skips_deleted):
                shown.update(1)
                if oid[0] == part.prefix:
                    if is_internal(oid, part.prefix):
                        n_internal += 1     # the partition map
                        continue
                    mine[oid] = 1
                    n_own += 1
                elif overlay is not None and overlay.shows(oid, data):
                    n_overlays += 1     # its object's stub here too
                    records[oid] = 1
                    foreign[oid] = 1
                else:
                    n_stubs += 1
                    found = list(_check_stub_record(part, oid, data,
                                                    by_prefix))
                    problems.extend(found)
                    foreign[oid] = 0 if found else 1
            counts[part.name] = {'objects': n_own, 'stubs': n_stubs}
            if overlay is not None:
                counts[part.name]['overlays'] = n_overlays
            if not (n_own or n_stubs or n_internal or n_overlays):
                unwritten.add(part.prefix)
    finally:
        shown.close()

    shown = progress('verify: references', total, 'records')
    try:
        for part in partitions:
            problems.extend(_check_references(
                part, by_prefix, own, stubs, shown,
                unwritten=part.prefix in unwritten,
                overlaid=overlaid[part.prefix]))
    finally:
        shown.close()
    problems.extend(_check_maps(storage, unwritten))
    problems.extend(check_spans(partitions, storage.packed_to()))
    return problems, counts


def check_spans(partitions, packed_to=z64):
    """A ``partial-transaction`` problem for each partition that lacks a
    transaction which another child records as spanning it, after the
    last pack's time (a pack may drop a part that was garbage)."""
    by_prefix = {p.prefix: p for p in partitions}
    held = {}       # prefix -> QQTreeSet of the tids its child holds
    spans = {}      # tid -> prefixes, for transactions over several
    for part in partitions:
        if not part.child.reads_spans:
            continue            # its history is not read (see recovery)
        held[part.prefix] = tids = QQTreeSet()
        for tid, prefixes in recent_transactions(part, z64, float('inf')):
            tids.add(u64(tid))
            if len(prefixes) > 1 and tid > packed_to:
                spans[tid] = prefixes
    problems = []
    for tid in sorted(spans):
        prefixes = spans[tid]
        names = ', '.join(by_prefix[q].name if q in by_prefix
                          else 'prefix %d' % q for q in prefixes)
        for prefix in prefixes:
            tids = held.get(prefix)
            if tids is None and prefix in by_prefix:
                continue        # a child whose history is not read
            if tids is not None and u64(tid) in tids:
                continue
            name = by_prefix[prefix].name if prefix in by_prefix \
                else 'prefix %d (not configured)' % prefix
            problems.append(Problem(
                'partial-transaction', name, None,
                detail='transaction %s spans %s, and this partition lacks '
                'it (a damaged or replaced file?); opening the composite '
                'for writing takes it back from the others where it is '
                'their last transaction, else restore from a backup'
                % (tid.hex(), names)))
    return problems


def _check_references(part, by_prefix, own, stubs, shown, unwritten=False,
                      overlaid=()):
    """``overlaid``: the overlay records ``part`` holds; each needs its
    object in the home partition, and what it refers to is checked as an
    object's references are."""
    prefix = part.prefix
    foreign = stubs[prefix]
    referred = fsIndex()
    for referrer, _, data in current_records(part.base,
                                             part.child.skips_deleted):
        shown.update(1)
        if referrer in overlaid:
            referred[referrer] = 1  # kept by its object, not by referrers
            home = by_prefix[referrer[0]]
            if referrer not in own[home.prefix]:
                yield Problem('orphan-overlay', part.name, referrer, None,
                              detail='%r holds no such object' % home.name,
                              garbage=True)
        elif is_internal(referrer, prefix):
            continue
        strong, weak = strong_and_weak_oids(data)
        for oid, is_weak in [(o, False) for o in strong] + \
                [(o, True) for o in weak]:
            home = by_prefix.get(oid[0])
            if home is None:
                yield Problem(
                    'unknown-partition', part.name, oid, None, referrer,
                    part.name, 'no partition has prefix %d' % oid[0])
                continue
            if home is part:
                if not is_weak and oid not in own[prefix]:
                    yield Problem('dangling-reference', part.name, oid,
                                  None, referrer, part.name,
                                  'no such object')
                continue
            referred[oid] = 1
            if oid not in foreign:
                yield Problem('missing-stub', part.name, oid, None,
                              referrer, part.name,
                              'the object lives in %r' % home.name)
            if not is_weak and oid not in own[home.prefix]:
                yield Problem('dangling-reference', home.name, oid, None,
                              referrer, part.name,
                              'no such object in its home partition')
    if prefix != 0:
        referred[z64] = 1               # the root stub is always needed
        # ... once the child is written: it comes with the first commit
        if z64 not in foreign and not unwritten:
            yield Problem('missing-stub', part.name, z64, None, None, None,
                          'a secondary child needs the root stub at z64')
    for oid, sound in foreign.items():
        if not sound:
            continue                    # reported in the first pass
        home = by_prefix[oid[0]]
        orphan = oid not in referred
        if oid not in own[home.prefix]:
            yield Problem('stub-target-missing', part.name, oid,
                          _stub_class(part, oid),
                          detail='%r holds no such object' % home.name,
                          garbage=orphan)
        if orphan:
            yield Problem('orphan-stub', part.name, oid,
                          _stub_class(part, oid),
                          detail='no record of %r refers to it' % part.name,
                          garbage=True)


def _stub_class(part, oid):
    try:
        data = part.base.load(oid)[0]
        klass = read_stub(data, part.name, oid)[1]
    except Exception:
        return None
    return '%s.%s' % klass if klass else None


def _check_stub_record(part, oid, data, by_prefix):
    """The problems of the record at foreign ``oid`` itself."""
    home = by_prefix.get(oid[0])
    try:
        home_name, klass = read_stub(data, part.name, oid)
    except CorruptStubError as e:
        if home is not None and _klass(data) and \
                'PartitionStub' not in (_klass(data) or ''):
            yield Problem('foreign-object', part.name, oid, _klass(data),
                          detail='a real object, whose home is %r'
                          % (home.name,))
        else:
            yield Problem('corrupt-stub', part.name, oid, _klass(data),
                          detail=str(e))
        return
    if home is None or home_name != home.name:
        yield Problem('corrupt-stub', part.name, oid,
                      '%s.%s' % klass if klass else None,
                      detail='it names %r as the home partition' % home_name)


def served_name(prefix):
    """How a partition is named where only its prefix is known: a ZEO
    client sees the composite's objects, not its configuration."""
    return 'prefix %d' % prefix


def verify_served(client, progress=None):
    """``(problems, counts)`` for the composite a ZEO ``client`` reads.

    A client sees objects, not the children's records, so this checks what
    ZODB sees: that every object's strong references resolve, and that no
    stub shows through as an object.  Stubs, maps and self-containment are
    checked by :func:`verify` on the configuration, beside the server (read
    only) or offline.  Partitions are named by prefix.

    Each record costs a round trip to the server, so a sound database is
    read once: references to objects not seen yet wait in an ``fsIndex``
    until the end.  Only when some never turn up is the database read a
    second time, to name their referrers.
    """
    progress = progress or quiet
    total = len(client) or None
    own = {}
    counts = {}
    problems = []
    waiting = fsIndex()
    shown = progress('verify', total, 'objects')
    try:
        for oid, _, data in served_records(client):
            shown.update(1)
            prefix = oid[0]
            if prefix not in own:
                own[prefix] = fsIndex()
                counts[served_name(prefix)] = {'objects': 0, 'stubs': None}
            own[prefix][oid] = 1
            counts[served_name(prefix)]['objects'] += 1
            klass = _klass(data)
            if klass and 'PartitionStub' in klass:
                problems.append(Problem(
                    'corrupt-stub', served_name(prefix), oid, klass,
                    detail='a stub shows through as an object'))
            for ref in strong_and_weak_oids(data)[0]:
                if ref not in own.get(ref[0], ()):
                    waiting[ref] = 1
    finally:
        shown.close()
    missing = fsIndex()
    for oid in waiting.keys():
        if oid not in own.get(oid[0], ()):
            missing[oid] = 1
    if len(missing):
        shown = progress('verify: referrers', total, 'objects')
        try:
            for referrer, _, data in served_records(client):
                shown.update(1)
                for oid in strong_and_weak_oids(data)[0]:
                    if oid in missing:
                        problems.append(Problem(
                            'dangling-reference', served_name(oid[0]), oid,
                            None, referrer, served_name(referrer[0]),
                            'no such object'))
        finally:
            shown.close()
    return problems, {served_name(p): counts[served_name(p)]
                      for p in sorted(own)}


def _check_maps(storage, unwritten=()):
    """Partition-map problems; a child in ``unwritten`` (prefixes of
    children that hold no record) gets its map with the first commit."""
    identities = set()
    written = [p.name for p in storage.partitions
               if p.prefix not in unwritten]
    for part in storage.partitions:
        try:
            recorded = part.read_map()
        except Exception as e:
            yield Problem('partition-map', part.name, part.map_oid,
                          detail='unreadable (%s)' % e)
            continue
        if recorded is None:
            if part.prefix in unwritten and (part.prefix != 0
                                             or not written):
                continue        # never written: healthy
            if part.prefix in unwritten:
                yield Problem(
                    'partition-map', part.name, part.map_oid,
                    detail='the primary holds no record, while partition '
                    '%r does: it is not the file this composite was created '
                    'with; point %r at that file' % (written[0], part.name))
                continue
            yield Problem('partition-map', part.name, part.map_oid,
                          detail='the child records no partition map')
            continue
        name = recorded.get('partition')
        prefix = recorded.get('prefix')
        if (name, prefix) != (part.name, part.prefix):
            yield Problem('partition-map', part.name, part.map_oid,
                          detail='it records %r with prefix %r' % (
                              name, prefix))
        identities.add(recorded.get('composite'))
    if len(identities) > 1:
        yield Problem('partition-map', None, None,
                      detail='the children belong to different composites: '
                      + ', '.join(sorted(map(str, identities))))
