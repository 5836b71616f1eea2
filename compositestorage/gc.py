"""Global garbage collection: one mark from the root across all partitions.

A child must never garbage-collect on its own (DESIGN.md, invariant 7): an
object in B that only A references looks like garbage to B alone.  So the
composite marks first, from the root and across stubs, with FileStorage's
semantics for the pack time: keep what is reachable at the pack time, plus
everything written later and what that references.  The mark's verdict is,
for each child, the complete set of oids it keeps: its own reachable
objects, the stubs their references go through, the root stub, the
partition map and the key tables of keyed objects.  Then each child packs
with that verdict:

* a FileStorage child runs its own packer, whose GC takes the verdict as
  its reachable set instead of walking the child again (the walk would
  find the same records and cost as much as the mark).  It removes the
  rest, unreferenced stubs included, and the blobs that go with them;
* a RelStorage child has the rows of every object the verdict does not
  keep deleted, then packs without GC (RelStorage's own GC is switched
  off when the composite opens it);
* any other child packs with ``gc=False``: old revisions go, but garbage
  stays until that child type learns to take roots (documented).

Each kind's way is in its adapter (:mod:`compositestorage.children`).

Memory stays bounded: the verdicts are BTrees' ``QQTreeSet`` objects
(unsigned 64-bit integers in compact buckets, under 20 bytes an oid),
never Python sets or lists of every oid, and the walk's work list holds
only the frontier.

Commits go on while a pack runs.  Records written after the pack time are
copied by the children's packers, so what a commit writes is never lost;
what it refers to was reachable at the pack time or is new.  The one gap is
a stub: a commit may refer through a stub that the verdict, taken earlier,
did not keep.  So while a pack runs, the commit coordinator writes such
stubs again in the committing transaction (see ``Coordinator.packing``).

A read-only partition (``read-only true``, or a child opened read-only) is
never packed: the sweep leaves its file as it is, and the report says so.
All it holds therefore stays, so its current records are roots of the
mark, and what they reference in other partitions is kept alive
(DESIGN.md, invariant 7).

A Ctrl-C (``KeyboardInterrupt``) during the mark leaves every child as it
was.  Once the sweep has begun, the partitions must all be swept, or the
garbage of one would refer to the collected garbage of another: an
interrupt there is held back until the last child is packed, then raised.
"""
import itertools
import logging
import time

from persistent.TimeStamp import TimeStamp
from BTrees.QQBTree import QQTreeSet
from ZODB.POSException import StorageError
from ZODB.utils import p64
from ZODB.utils import u64
from ZODB.utils import z64

from compositestorage.errors import oid_hex
from compositestorage.faults import point as fault_point
from compositestorage.interrupts import interrupts_held_back
from compositestorage.overlay import is_overlay_record
from compositestorage.progress import quiet
from compositestorage.references import strong_and_weak_oids
from compositestorage.verify import estimate

logger = logging.getLogger(__name__)

#: What the pack's report says of a read-only partition.
UNTOUCHED = ('left untouched, it is read-only (what it references was '
             'kept)')


def pack_tid(t):
    return TimeStamp(*time.gmtime(t)[:5] + (t % 60,)).raw()


def pack(storage, t, gc=True, progress=None):
    """Pack every partition to time ``t``, collecting garbage globally.

    ``progress``, if given, is a factory as :func:`compositestorage.progress.
    reporter` returns: called with a stage, a total and a unit, it returns
    an object with ``update(n)`` and ``close()``.  The stages are the mark
    (objects, out of about the number of records) and the sweep
    (partitions).  Returns what each partition lost (see ``_removed``).
    """
    progress = progress or quiet
    writable = [part for part in storage.partitions if not part.read_only]
    before = {part: _sizes(part) for part in writable}
    if not gc:
        if storage.journal is not None:
            storage.journal.note_pack(pack_tid(t))
        for part in writable:
            part.child.pack_without_gc(t)
        return _removed(storage, before)
    with storage._coordinator.packing():
        if storage._shared is not None:
            # A new snapshot, taken now that every commit begun before the
            # pack has finished (``packing`` waited for them): they decided
            # on their stubs without it, so the mark must see them.  Those
            # that begin later write their stubs again.
            from compositestorage import mvcc
            mvcc.sync(storage)
        keep = mark(storage, pack_tid(t), progress)
        if storage.journal is not None:
            # the sweep may drop a child's part of a transaction before t
            storage.journal.note_pack(pack_tid(t))
        shown = progress('pack: sweep', len(writable), 'partitions')
        try:
            with interrupts_held_back(
                    'pack: finishing the sweep of every partition first, so '
                    'that they agree',
                    'the pack finished sweeping every partition before it '
                    'stopped'):
                for part in writable:
                    sweep(part, t, keep.pop(part))
                    part.stubs.clear()
                    shown.update(1)
                    fault_point('pack', 'swept', part.name)
        finally:
            shown.close()
    return _removed(storage, before)


def _sizes(part):
    """Counts that cost an index walk at most; other children's counts
    would mean reading every record, so they are not taken (``None``)."""
    cheap = part.child.counts_cheaply
    return {'objects': part.count_own() if cheap else None,
            'stubs': part.count_stubs() if cheap else None,
            'bytes': part.storage.getSize()}


def _removed(storage, before):
    """``{partition name: {'objects', 'stubs', 'bytes'}}`` removed (``None``
    where not counted), each partition's also logged: a pack through ZEO
    runs in the server, whose log is where an operator finds it.  A
    read-only partition, left untouched, gets ``{'read_only': True}``."""
    removed = {}
    for part in storage.partitions:
        if part not in before:
            removed[part.name] = {'read_only': True}
            logger.info('pack: partition %r: %s', part.name, UNTOUCHED)
            continue
        was = before[part]
        now = _sizes(part)
        removed[part.name] = lost = {
            key: None if was[key] is None or now[key] is None
            else was[key] - now[key] for key in was}
        logger.info('pack: partition %r: removed %s objects, %s stubs, '
                    '%s bytes', part.name, *[
                        '?' if lost[key] is None else lost[key]
                        for key in ('objects', 'stubs', 'bytes')])
    return removed


def _references(part, oid, data):
    """A record's references; a record that cannot be read stops the pack
    before anything is removed, since what it refers to is unknown."""
    try:
        return strong_and_weak_oids(data, strict=True)
    except Exception as e:
        raise StorageError(
            'pack: cannot read the references of oid %s in partition %r '
            '(%s: %s); nothing was packed.  Run "compositestorage verify" '
            'and repair or remove that record first'
            % (oid_hex(oid), part.name, type(e).__name__, e)) from e


def mark(storage, stop, progress=None):
    """``{partition: QQTreeSet}``: every oid each child must keep, as an
    integer (``int.from_bytes(oid, 'big')``)."""
    progress = progress or quiet
    limit = p64(u64(stop) + 1)
    by_prefix = {p.prefix: p for p in storage.partitions}
    as_int = int.from_bytes
    keep = {}
    for p in storage.partitions:
        keep[p] = verdict = QQTreeSet()
        verdict.insert(as_int(p.map_oid, 'big'))
        for oid in p.key_table_oids():  # they reference nothing
            verdict.insert(as_int(oid, 'big'))
        if p.prefix != 0:
            verdict.insert(0)       # a secondary's root stub, at z64
    todo = [z64]
    # A read-only partition is never swept, so all it holds stays, and
    # everything its current records reference must stay with it: they
    # are roots too, fed to the walk a batch at a time.
    roots = itertools.chain.from_iterable(
        p.own_oids() for p in storage.partitions if p.read_only)

    # Records written after the pack time stay (the child's packer copies
    # them).  As in FileStorage, that does not keep their own oid's older
    # revision; unlike FileStorage, what they refer to stays too, so a
    # late reference into another partition never dangles.
    with storage._coordinator.commits_held():
        iterators = [(part, part.storage.iterator(limit))
                     for part in storage.partitions]
    try:
        for part, it in iterators:
            verdict = keep[part]
            for txn in it:
                for r in txn:
                    if not r.data:
                        continue
                    strong, weak = _references(part, r.oid, r.data)
                    todo.extend(strong)
                    for oid in strong + weak:
                        if oid[0] != part.prefix:
                            verdict.insert(as_int(oid, 'big'))
    finally:
        for _, it in iterators:
            getattr(it, 'close', lambda: None)()

    # Weak references to other partitions, kept while their target lives.
    weak_stubs = {p: QQTreeSet() for p in storage.partitions}
    shown = progress('pack: mark', estimate(storage), 'objects')
    marked = 0
    fault_point('pack', 'marking')
    overlays = getattr(storage, '_overlays', {})

    def follow(part, oid, data):
        """Mark what ``data``, ``oid``'s record in ``part``, refers to."""
        own = keep[part]
        strong, weak = _references(part, oid, data)
        prefix = part.prefix
        for ref in strong:
            key = as_int(ref, 'big')
            if ref[0] != prefix:
                own.insert(key)             # its stub in this child
            home = by_prefix.get(ref[0])
            if home is None or key not in keep[home]:
                todo.append(ref)
        for ref in weak:
            if ref[0] != prefix:
                weak_stubs[part].insert(as_int(ref, 'big'))

    readers = {}
    try:
        for part in storage.partitions:
            readers[part] = part.child.reader(limit)
        while True:
            if not todo:
                todo.extend(itertools.islice(roots, 1000))
                if not todo:
                    break
            oid = todo.pop()
            part = by_prefix.get(oid[0])
            if part is None:
                logger.warning('pack: oid %s has no partition; skipped',
                               oid.hex())
                continue
            own = keep[part]
            if not own.insert(as_int(oid, 'big')):
                continue                        # marked already
            marked += 1
            if not marked % 1000:
                shown.update(1000)
            overlay = overlays.get(part.prefix)
            if overlay is not None:
                # An overlay record lives exactly as long as its object,
                # and what it refers to lives with it.
                opart = overlay.part
                keep[opart].insert(as_int(oid, 'big'))
                odata = readers[opart](oid)
                if is_overlay_record(odata):
                    follow(opart, oid, odata)
            data = readers[part](oid)
            if not data:
                continue
            follow(part, oid, data)
        shown.update(marked % 1000)
    finally:
        shown.close()
        for reader in readers.values():
            reader.close()

    # A weak reference keeps nothing alive, but while its target lives, the
    # stub it goes through stays, so the child remains self-contained.
    for part, keys in weak_stubs.items():
        own = keep[part]
        for key in keys:
            home = by_prefix.get(key >> 56)
            if home is not None and key in keep[home]:
                own.insert(key)
    return keep


def sweep(part, t, verdict):
    """Pack ``part``'s child to ``t``, keeping of what precedes ``t`` only
    what ``verdict`` names: the child's adapter knows how (FileStorage's
    packer given the verdict, RelStorage's rows deleted then a pack without
    GC; a child that cannot be told packs without GC, or not at all)."""
    part.child.sweep(t, verdict, part.name)
