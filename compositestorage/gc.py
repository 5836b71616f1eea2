"""Global garbage collection: one mark from the root across all partitions.

A child must never garbage-collect on its own (DESIGN.md, invariant 7): an
object in B that only A references looks like garbage to B alone.  So the
composite marks first, from the root and across stubs, with FileStorage's
semantics for the pack time: keep what is reachable at the pack time, plus
everything written later and what that references.  Then each child packs
with the mark's verdict:

* a FileStorage child runs its own packer, with every globally reachable
  oid of its partition added to its GC roots.  It removes the rest,
  unreferenced stubs included, and the blobs that go with them;
* any other child packs with ``gc=False``: old revisions go, but garbage
  stays until that child type learns to take roots (documented).

The mark keeps oids in an ``fsIndex``, not a Python set, so its memory stays
near 8 bytes an oid.
"""
import inspect
import logging
import time

from persistent.TimeStamp import TimeStamp
from ZODB.FileStorage import FileStorage
from ZODB.FileStorage import fspack
from ZODB.fsIndex import fsIndex
from ZODB.POSException import POSKeyError
from ZODB.serialize import referencesf
from ZODB.utils import p64
from ZODB.utils import u64
from ZODB.utils import z64

from compositestorage.references import strong_and_weak_oids

logger = logging.getLogger(__name__)


def pack_tid(t):
    return TimeStamp(*time.gmtime(t)[:5] + (t % 60,)).raw()


def pack(storage, t, gc=True):
    """Pack every partition to time ``t``, collecting garbage globally."""
    if not gc:
        for part in storage.partitions:
            part.storage.pack(t, referencesf, gc=False)
        return
    roots = mark(storage, pack_tid(t))
    for part in storage.partitions:
        sweep(part, t, roots[part])
        part.stubs.clear()


def mark(storage, stop):
    """The GC roots each child needs so that it keeps what is reachable."""
    limit = p64(u64(stop) + 1)
    by_prefix = {p.prefix: p for p in storage.partitions}
    roots = {p: [z64, p.map_oid] for p in storage.partitions}
    reachable = fsIndex()
    todo = [z64]

    # Records written after the pack time stay (the child's packer copies
    # them).  As in FileStorage, that does not keep their own oid's older
    # revision; unlike FileStorage, what they refer to stays too, so a
    # late reference into another partition never dangles.
    for part in storage.partitions:
        it = part.storage.iterator(limit)
        try:
            for txn in it:
                for r in txn:
                    if not r.data:
                        continue
                    strong, weak = strong_and_weak_oids(r.data)
                    todo.extend(strong)
                    roots[part].extend(
                        oid for oid in strong + weak
                        if oid[0] != part.prefix)
        finally:
            getattr(it, 'close', lambda: None)()

    weak_stubs = {p: [] for p in storage.partitions}
    while todo:
        oid = todo.pop()
        if oid in reachable:
            continue
        part = by_prefix.get(oid[0])
        if part is None:
            logger.warning('pack: oid %s has no partition; skipped',
                           oid.hex())
            continue
        reachable[oid] = 1
        roots[part].append(oid)
        try:
            r = part.storage.loadBefore(oid, limit)
        except POSKeyError:
            continue
        if not r or not r[0]:
            continue
        strong, weak = strong_and_weak_oids(r[0])
        todo.extend(o for o in strong if o not in reachable)
        weak_stubs[part].extend(o for o in weak if o[0] != part.prefix)

    # A weak reference keeps nothing alive, but while its target lives, the
    # stub it goes through stays, so the child remains self-contained.
    for part, oids in weak_stubs.items():
        roots[part].extend(oid for oid in oids if oid in reachable)
    return roots


class _RootedGC(fspack.GC):
    """FileStorage's GC, with the composite's mark as extra roots."""

    extra_roots = ()

    def findReachableAtPacktime(self, roots):
        extra, self.extra_roots = self.extra_roots, ()
        if extra:
            known = self.oid2curpos
            roots = list(roots) + [oid for oid in extra if oid in known]
        fspack.GC.findReachableAtPacktime(self, roots)


def _rooted_packer(extra_roots):
    def packer(storage, referencesf, stop, gc):
        p = fspack.FileStoragePacker(storage, referencesf, stop, gc)
        try:
            p.gc.__class__ = _RootedGC
            p.gc.extra_roots = extra_roots
            opos = p.pack()
            if opos is None:
                return None
            return opos, p.index
        finally:
            p.close()
    return packer


def _takes_gc(pack):
    try:
        return 'gc' in inspect.signature(pack).parameters
    except (TypeError, ValueError):
        return False


def sweep(part, t, roots):
    child = part.storage
    base = part.base
    if isinstance(base, FileStorage):
        missing = object()
        previous = base.__dict__.get('packer', missing)
        base.packer = _rooted_packer(roots)
        try:
            if base is child:
                child.pack(t, referencesf, gc=True)
            else:
                # ZODB's BlobStorage proxy packs its blobs too, and lets
                # the FileStorage's own pack-gc setting decide on GC.
                child.pack(t, referencesf)
        finally:
            if previous is missing:
                del base.packer
            else:
                base.packer = previous
    elif _takes_gc(child.pack):
        logger.info('pack: partition %r (%s) packs without GC; its garbage '
                    'stays', part.name, type(child).__name__)
        child.pack(t, referencesf, gc=False)
    else:
        # ZEO's ClientStorage and RelStorage cannot be told not to collect
        # garbage, and a child that does loses objects other partitions
        # refer to (DESIGN.md, invariant 7): leave it alone.
        logger.warning(
            'pack: partition %r (%s) was not packed: its pack cannot be told '
            'not to collect garbage on its own.  Pack it where it is served, '
            'with pack-gc false there', part.name, type(child).__name__)
