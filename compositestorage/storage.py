"""The IStorage surface of a composite, delegating to the modules beside it.

Routing is by the oid's first byte: the prefix of the oid's home partition
(DESIGN.md, invariant 1).  ``references`` rewrites class hints, ``commit``
coordinates the children, ``iteration`` merges them, ``gc`` packs them and
``blobs`` routes blobs.
"""
import contextlib
import logging
import os
import re
import threading
import weakref

import zope.interface
from ZEO.interfaces import IServeable
from ZODB import POSException
from ZODB.interfaces import IBlobStorage
from ZODB.interfaces import IBlobStorageRestoreable
from ZODB.interfaces import IExternalGC
from ZODB.interfaces import IMultiCommitStorage
from ZODB.interfaces import IMVCCStorage
from ZODB.interfaces import IStorage
from ZODB.interfaces import IStorageCurrentRecordIteration
from ZODB.interfaces import IStorageIteration
from ZODB.interfaces import IStorageRestoreable
from ZODB.interfaces import IStorageUndoable
from ZODB.utils import p64
from ZODB.utils import u64
from ZODB.utils import z64

from compositestorage import blobs
from compositestorage import gc as global_gc
from compositestorage import iteration
from compositestorage import mvcc
from compositestorage import namespaces
from compositestorage.children import file_name
from compositestorage.commit import Coordinator
from compositestorage.errors import ConfigurationError
from compositestorage.errors import JournalError
from compositestorage.errors import UnknownPartitionError
from compositestorage.errors import WriterLockedError
from compositestorage.errors import WritesRefusedError
from compositestorage.journal import decode
from compositestorage.journal import lock_writer
from compositestorage.journal import open_journal
from compositestorage.overlay import make_overlays
from compositestorage.errors import oid_hex
from compositestorage.partition import MAP_SUFFIX
from compositestorage.interfaces import ICompositeStorage
from compositestorage.partition import Partition
from compositestorage.partition import is_internal
from compositestorage.partition import check_foreign_records
from compositestorage.partition import check_layout
from compositestorage.partition import check_maps
from compositestorage.placement import make_policy
from compositestorage.recovery import has_transaction
from compositestorage.recovery import last_finished
from compositestorage.recovery import partial_transactions
from compositestorage.recovery import recover
from compositestorage.recovery import remove_partial
from compositestorage.references import STUB_MARK
from compositestorage.references import class_of
from compositestorage.references import hints_to_classes
from compositestorage.references import resolver_keeping_tags
from compositestorage.references import to_child_record
from compositestorage.shared import TableJournal

logger = logging.getLogger(__name__)

#: Finds the stub class's name: records without it come back unparsed.
_stub_search = re.compile(re.escape(STUB_MARK)).search

#: Root class a fresh ZODB.DB creates; the root stub names it until the
#: primary holds a root.
ROOT_CLASS = ('persistent.mapping', 'PersistentMapping')


@zope.interface.implementer(ICompositeStorage)
class CompositeStorage(blobs.BlobMethods):
    """One ZODB storage made of several child storages, called partitions.

    ``partitions`` is a sequence of :class:`Partition` objects or of
    ``(name, prefix, storage)`` tuples.  Exactly one has prefix 0: the
    primary, which holds the root.
    """

    def __init__(self, partitions, name=None, placement='default',
                 default_partition=None, read_only=False, pack_gc=True,
                 journal=None, journal_seen=None, overlays=None,
                 shared='auto'):
        check_layout([
            (p.name, p.prefix, p.storage, storage_identity(p.storage))
            if isinstance(p, Partition) else
            (p[0], p[1], p[2],
             None if p[2] is None else storage_identity(p[2]))
            for p in partitions], default_partition)
        parts = [p if isinstance(p, Partition) else Partition(*p)
                 for p in partitions]
        self._read_only = bool(read_only)
        if self._read_only:
            for p in parts:
                p.read_only = True
        self._index(parts)
        self.default_partition = self._by_name.get(default_partition,
                                                   self.primary)
        self._pack_gc = pack_gc
        self.__name__ = name or 'Composite(%s)' % ', '.join(
            '%s=%s' % (p.name, p.storage.getName()) for p in self.partitions)
        self._refused = None
        self._opened = True
        #: what each partition lost in this process's last pack
        self.last_pack = None
        #: the session on the primary's database of a shared composite
        #: (see compositestorage.mvcc), else None
        self._shared = None
        #: a shared composite's invalidations that ``sync`` found and the
        #: next ``poll_invalidations`` gives (see compositestorage.mvcc):
        #: the root polls too, as RelStorage's does, not only its instances
        self._queued = {}
        self._synced = False
        if mvcc.decide(shared, self.partitions, journal, overlays):
            self._shared = mvcc.shared_state(self.primary)
            self.journal = TableJournal(self._shared)
        else:
            self.journal = open_journal(journal, self.partitions)
        self._writer_lock = None
        try:
            if self._shared is not None:
                self._share_children()
            self._become_writer()
            self._finish_lock = threading.RLock()
            self._coordinator = Coordinator(self)
            self._policy = make_policy(placement, self)
            #: base prefix -> Overlay; the overlaid bases leave the fast
            #: paths' tables, so other partitions pay nothing for them
            self._overlays = make_overlays(self, overlays)
            #: overlay prefix -> Overlay
            self.overlay_parts = {o.part.prefix: o
                                  for o in self._overlays.values()}
            for prefix in self._overlays:
                self._load_before.pop(prefix)
                self._writable_by_prefix.pop(prefix, None)
            self._wrap_resolvers()
            self.identity = None
            # The children must be the right ones before recovery may cut
            # any of them: a swapped or foreign child is refused first.
            self._check_maps()
            if self._recover(journal_seen):
                self._coordinator.pending_init.clear()
                self._check_maps()
            self._declare_interfaces()
            if self._shared is not None:
                mvcc.poll(self, opening=True)
        except BaseException:
            self._release_writer_lock()
            raise

    def _index(self, parts):
        """Route by prefix and name to ``parts``."""
        self.partitions = sorted(parts, key=lambda p: p.prefix)
        self._by_prefix = {p.prefix: p for p in self.partitions}
        self._by_name = {p.name: p for p in self.partitions}
        self._load_before = {p.prefix: p.storage.loadBefore
                             for p in self.partitions}
        self.primary = self._by_prefix[0]
        self._writable_by_prefix = {p.prefix: p for p in self.partitions
                                    if not p.read_only}

    def _wrap_resolvers(self):
        """Have each child's conflict resolver keep the tag rule."""
        for p in self.partitions:
            resolve = getattr(p.storage, 'tryToResolveConflict', None)
            if resolve is not None:
                p.storage.tryToResolveConflict = resolver_keeping_tags(
                    resolve)

    def _share_children(self):
        """Make the tables every process shares, and take each
        partition's oids in blocks from them."""
        self._shared.install()
        self._shared.same_cluster = mvcc.one_cluster(self.partitions)
        blocks = mvcc.shared_state(self.primary)
        lock = threading.Lock()

        def reserve(prefix, floor, count):
            with lock:
                return blocks.reserve_oids(prefix, floor, count)
        self._oid_blocks = blocks
        for p in self.partitions:
            p.oid_blocks = reserve

    def _become_writer(self):
        """Take the writer lock beside the journal, open the journal, and
        mark the children as this composite's; a read-only composite does
        none of it."""
        journal = self.journal
        if self._read_only:
            return
        if self._shared is not None:
            pass    # every process writes; the primary's database locks
        elif journal is not None:
            self._writer_lock = lock_writer(journal)
            try:
                journal.open()
            except OSError as e:
                raise JournalError(
                    'could not open the commit journal %s (%s); nothing '
                    'was written: free disk space or file descriptors '
                    '(ulimit -n), and open the storage again'
                    % (journal.path, e)) from e
        elif len(self.partitions) > 1:
            logger.warning(
                '%s: no journal (no partition is a FileStorage and '
                'no journal path is configured), so a transaction over '
                'several partitions is not crash-safe, and no lock keeps a '
                'second process from writing', self.__name__)
        self._guard_children()

    def _recover(self, seen=None):
        """Recover, and find what every reader may see; returns whether a
        child was changed.

        A writer completes or removes a transaction the journal says had
        begun to finish, and takes back a transaction that a damaged child
        lost from the others (:func:`~compositestorage.recovery.remove_partial`).
        A read-only composite changes nothing: it does not see a
        transaction that some of its partitions lack, whether the
        journal's intent names it (as the journal was while its children
        opened: ``seen``, when the opener read it; else read now) or the
        children's own records do.
        """
        journal = self.journal
        self.recovered = None
        self.partial = []
        hide = None
        if self._read_only:
            if journal is not None:
                intent = journal.read() if seen is None else decode(seen)
                hide = self._unfinished(intent)
            for entry in partial_transactions(self._by_prefix,
                                              packed_to=self.packed_to()):
                hide = entry.tid if hide is None else min(hide, entry.tid)
        else:
            with self._exclusive():
                if journal is not None:
                    self.recovered = recover(self._by_prefix, journal)
                self.partial = remove_partial(self._by_prefix,
                                              packed_to=self.packed_to())
        last = z64
        for p in self.partitions:
            tid = (last_finished(p) if self._read_only
                   else p.storage.lastTransaction())
            if hide is not None and tid >= hide:
                tid = p64(u64(hide) - 1)
            last = max(last, tid)
        self._ltid = last
        #: The last tid every participant has finished: what loads may see.
        self.advance_visible(self._ltid)
        return bool(self.partial) or (
            self.recovered is not None and bool(self.recovered.rolled_back))

    def _exclusive(self):
        """No other process commits or polls in the block (a shared
        composite); nothing to hold otherwise."""
        if self._shared is None:
            return contextlib.nullcontext()
        return self._shared.exclusive()

    def recover_shared(self):
        """Recover the intent a process that died left in the primary's
        database (see :func:`compositestorage.mvcc.poll`)."""
        with self._exclusive():
            outcome = recover(self._by_prefix, self.journal)
        if outcome is not None:
            logger.warning('%s: recovered %s, left by a process that died',
                           self.__name__, outcome)
        return outcome

    def packed_to(self):
        """The time of the last pack, as a tid: checks of the partitions a
        transaction spans stop there (see ``partial_transactions``)."""
        return self.journal.packed_to() if self.journal is not None else z64

    def _unfinished(self, intent):
        """``intent``'s tid, unless every partition it names holds it."""
        if intent is None:
            return None
        parts = [self._by_prefix.get(prefix) for prefix in intent.prefixes]
        if all(p is not None and has_transaction(p, intent.tid)
               for p in parts):
            return None
        return intent.tid

    def _guard_children(self):
        """Refuse a child another writable composite of this process uses.

        Across processes the writer lock beside the journal guards the
        composite, and FileStorage locks its own files; see "One writer"
        in docs/commit-protocol.rst for each kind of child.
        """
        for p in self.partitions:
            if p.read_only:
                continue
            owner = getattr(p.base, '_compositestorage_writer', None)
            owner = owner() if owner is not None else None
            if owner is not None and owner is not self and owner._opened:
                raise WriterLockedError(
                    'partition %r: its child %s is already written by %r in '
                    'this process; close that one first, or open this '
                    'composite read-only' % (p.name, p.storage.getName(),
                                             owner))
        for p in self.partitions:
            if not p.read_only:
                p.base._compositestorage_writer = weakref.ref(self)

    def _release_writer_lock(self):
        if self.journal is not None:
            self.journal.close()
        if self._writer_lock is not None:
            self._writer_lock.close()
            self._writer_lock = None

    def refuse_writes(self, reason):
        """Refuse every later ``tpc_begin``, saying ``reason``."""
        self._refused = reason

    # --- set-up ---------------------------------------------------------------

    def _names(self):
        return ', '.join('%s=%d' % (p.name, p.prefix)
                         for p in self.partitions)

    def _check_maps(self):
        """Refuse children that belong elsewhere; plan maps for new ones.

        Records for children that lack them are written inside the next
        transaction, so a fresh composite has written nothing at all.
        """
        self.identity, pending = check_maps(
            self.partitions, self.primary, self._root_class())
        check_foreign_records(self.partitions)
        if not self._read_only:
            self._coordinator.pending_init.update(pending)

    def _root_class(self):
        try:
            data = self.primary.storage.load(z64)[0]
        except POSException.POSKeyError:
            return ROOT_CLASS
        return class_of(data) or ROOT_CLASS

    def _declare_interfaces(self):
        children = [p.storage for p in self.partitions]
        provided = [IStorage, IMultiCommitStorage]
        if self._shared is None:
            provided.append(IServeable)     # a shared one refuses ZEO
        if all(IStorageIteration.providedBy(c) for c in children):
            provided.append(IStorageIteration)
        if all(IStorageRestoreable.providedBy(c) for c in children):
            provided.append(IStorageRestoreable)
        if all(IStorageCurrentRecordIteration.providedBy(c)
               for c in children):
            provided.append(IStorageCurrentRecordIteration)
        if all(IExternalGC.providedBy(c) for c in children):
            provided.append(IExternalGC)
        if self.supportsUndo():
            provided.append(IStorageUndoable)
        if self._shared is not None:
            provided.append(IMVCCStorage)
        if all(IBlobStorage.providedBy(c) for c in children):
            provided.append(IBlobStorage)
            if all(IBlobStorageRestoreable.providedBy(c) for c in children):
                provided.append(IBlobStorageRestoreable)
        zope.interface.alsoProvides(self, *provided)

    # --- routing --------------------------------------------------------------

    def partition_for(self, oid, what='load'):
        """The home partition of ``oid``."""
        try:
            return self._by_prefix[oid[0]]
        except (KeyError, IndexError, TypeError):
            raise UnknownPartitionError(oid, self.partitions, what)

    def _home(self, oid):
        """The home partition of ``oid``, which ZODB may read.

        Routed by prefix, a home oid can only be internal if it is the
        partition's map record: that one is not ZODB's to read.
        """
        try:
            part = self._by_prefix[oid[0]]
        except (KeyError, IndexError, TypeError):
            part = self.partition_for(oid)
        if oid[1:] == MAP_SUFFIX:
            raise POSException.POSKeyError(oid)
        return part

    def partition_named(self, name):
        try:
            return self._by_name[name]
        except KeyError:
            raise ConfigurationError(
                'no partition named %r (configured: %s)'
                % (name, self._names()))

    def to_child(self, part, oid, data, state):
        """The record ``part``'s child stores for ``data``; notes stubs."""
        record, foreign, hints = to_child_record(data, part.prefix, oid,
                                                 part.name)
        if foreign:
            for ref in foreign:
                if ref[0] not in self._by_prefix:
                    raise UnknownPartitionError(
                        ref, self.partitions,
                        'store a reference from oid %s to' % oid_hex(oid))
            state.stubs_needed.setdefault(part, set()).update(foreign)
            state.hints.update(hints)
        return record

    def from_child(self, part, data):
        """The record ZODB sees for ``data`` from ``part``'s child."""
        if not data or not _stub_search(data):
            return data
        return self._with_classes(part, data)

    def _with_classes(self, part, data):
        """``data``, which holds stub hints, as ZODB stored it."""
        return hints_to_classes(data, part.prefix,
                                lambda ref: self._class_of_target(part, ref))

    def _class_of_target(self, part, ref):
        """The class of ``ref``, for a stub hint in ``part`` naming none."""
        found = self._coordinator.committed_stub(part, ref)
        if found is not None:
            return found[0]
        # A historical record whose stub a pack has since removed: the
        # target's own record still names its class.
        home = self._by_prefix.get(ref[0])
        try:
            return class_of(home.storage.load(ref)[0]) if home else None
        except POSException.POSKeyError:
            return None

    # --- identity and size -----------------------------------------------------

    def getName(self):
        return self.__name__

    def sortKey(self):
        return 'composite:' + ','.join(
            p.storage.sortKey() for p in self.partitions)

    def getSize(self):
        return sum(p.storage.getSize() for p in self.partitions)

    def __len__(self):
        return sum(p.count_own() for p in self.partitions)

    def isReadOnly(self):
        return self._read_only

    def advance_visible(self, tid):
        """Let loads see ``tid``: every participant has finished it."""
        self._visible_limit = p64(u64(tid) + 1)
        self._visible_tid = tid

    def visible_tid(self):
        """The last tid every participant has finished: what every reader
        may see (invariant 6)."""
        return self._visible_tid

    def visible_limit(self):
        """The tid a ``loadBefore`` for the visible state asks with."""
        return self._visible_limit

    def lastTransaction(self):
        with self._finish_lock:
            return self._ltid

    def _current_view(self):
        """Bring a shared composite's own snapshot up to date first.

        ``IMVCCStorage`` has the storage that ZODB.DB holds (not the
        instances its connections use) answer ``undoLog``, ``iterator``,
        ``history``, ``pack`` and the like from the current state of the
        database; its snapshot moves nowhere else (its
        ``lastTransaction`` follows its instances': ``mvcc.seen``).  An
        instance keeps the snapshot of its last poll."""
        if self._shared is not None and '_root' not in self.__dict__ \
                and self._coordinator.state is None:
            mvcc.sync(self)

    def registerDB(self, db):
        """Nothing to do: invalidations reach ZODB through tpc_finish, or
        by polling (a shared composite).

        A ZEO server registers itself here.  It reads the composite itself,
        never an instance, and nothing tells it of other processes'
        commits, so a shared composite refuses it."""
        if self._shared is not None and \
                type(db).__name__ == 'StorageServerDB':
            raise ConfigurationError(
                '%s is shared (its children are all RelStorage on '
                'PostgreSQL): every process opens it directly, and a ZEO '
                'server would not hear of their commits.  Set shared false '
                'to serve it with ZEO as its one writer' % self.__name__)

    # --- many processes (IMVCCStorage, a shared composite) --------------------

    def new_instance(self):
        """An instance for one ZODB connection, with a snapshot of its own
        (IMVCCStorage; see :mod:`compositestorage.mvcc`)."""
        if self._shared is None:
            raise POSException.Unsupported(
                'only a shared composite has instances (its children all '
                'RelStorage on PostgreSQL); ZODB wraps this one in its '
                'MVCCAdapter')
        return mvcc.new_instance(getattr(self, '_root', self))

    def poll_invalidations(self):
        return mvcc.poll_invalidations(self)

    def sync(self, force=True):
        if self._shared is not None:
            mvcc.sync(self, force)

    def release(self):
        if self._shared is not None and hasattr(self, '_root'):
            mvcc.release(self)

    def close(self):
        if hasattr(self, '_root'):
            # an instance: the root closes the children
            self.release()
            return
        self._opened = False
        if self._shared is not None:
            self._shared.close()
            self._oid_blocks.close()
        try:
            for p in self.partitions:
                p.storage.close()
        finally:
            self._release_writer_lock()

    def cleanup(self):
        for p in self.partitions:
            cleanup = getattr(p.storage, 'cleanup', None)
            if cleanup is not None:
                cleanup()

    def supportsUndo(self):
        return all(getattr(p.storage, 'supportsUndo', lambda: False)()
                   for p in self.partitions)

    # --- conflict resolution ------------------------------------------------------

    @property
    def tryToResolveConflict(self):
        """The children resolve conflicts, each in its own records.

        A ZEO server with ``client-conflict-resolution`` assigns its own
        resolver here; it must reach every child, because the children
        are the ones that call it.
        """
        resolve = self.primary.storage.tryToResolveConflict
        return getattr(resolve, 'resolve', resolve)

    @tryToResolveConflict.setter
    def tryToResolveConflict(self, resolve):
        for p in self.partitions:
            p.storage.tryToResolveConflict = resolver_keeping_tags(resolve)

    # --- oids -------------------------------------------------------------------

    def new_oid(self):
        part = self._policy.choose()
        if part.read_only:
            if self._read_only:
                raise POSException.ReadOnlyError()
            part.check_writable()
        return part.new_oid()

    def new_oid_in(self, name):
        """A new oid in the partition called ``name``."""
        part = self.partition_named(name)
        part.check_writable()
        return part.new_oid()

    def new_oid_beside(self, oid):
        """A new oid in ``oid``'s partition (containment), or by policy."""
        part = self._by_prefix.get(oid[0])
        if part is None or part.read_only:
            return self.new_oid()
        return part.new_oid()

    def lookup(self, namespace, key):
        """The oid of ``key`` among the keyed objects of the partition
        called ``namespace``, or ``None``; see
        :mod:`compositestorage.namespaces`."""
        return namespaces.lookup(self, namespace, key)

    # --- reading ----------------------------------------------------------------

    def overlay_of(self, oid):
        """The :class:`~compositestorage.overlay.Overlay` of ``oid``'s
        home partition, or ``None``."""
        try:
            return self._overlays.get(oid[0])
        except (IndexError, TypeError):
            return None

    def load(self, oid, version=''):
        part = self._home(oid)
        if oid[0] in self._overlays:
            r = self.loadBefore(oid, self._visible_limit)
            if r is None:
                raise POSException.POSKeyError(oid)
            return r[0], r[1]
        data, serial = part.storage.load(oid)
        if serial > self._visible_tid:
            # A commit is finishing: answer from the last finished snapshot.
            r = self.loadBefore(oid, self._visible_limit)
            if r is None:
                raise POSException.POSKeyError(oid)
            return r[0], r[1]
        return self.from_child(part, data), serial

    def loadBefore(self, oid, tid):
        # The hot path of every read, so _home and from_child are inline:
        # most records come back from the child as they are.
        limit = self._visible_limit
        if tid > limit:
            tid = limit
        try:
            load_before = self._load_before[oid[0]]
        except (KeyError, IndexError, TypeError):
            # _home refuses the map record of any partition, overlaid too
            load_before = self._home(oid).storage.loadBefore
            overlay = self.overlay_of(oid)
            if overlay is not None:
                r = overlay.load_before(oid, tid)
                if r is not None and r[2] is not None and r[2] >= limit:
                    r = r[0], r[1], None
                return r
        if oid[-1] == 255 and oid[1:] == MAP_SUFFIX:
            raise POSException.POSKeyError(oid)
        r = load_before(oid, tid)
        if r is None:
            return None
        data, start, end = r
        if end is not None and end >= limit:
            r = data, start, None
        if data and _stub_search(data):
            r = (self._with_classes(self._by_prefix[oid[0]], data), start,
                 r[2])
        return r

    def loadSerial(self, oid, serial):
        part = self._home(oid)
        if serial > self._visible_tid:
            raise POSException.POSKeyError(oid, serial)
        overlay = self.overlay_of(oid)
        if overlay is not None:
            return overlay.load_serial(oid, serial)
        return self.from_child(part, part.storage.loadSerial(oid, serial))

    def getTid(self, oid):
        part = self._home(oid)
        if self.overlay_of(oid) is not None:
            return self.load(oid)[1]
        tid = part.storage.getTid(oid)
        if tid > self._visible_tid:
            r = self.loadBefore(oid, self._visible_limit)
            if r is None:
                raise POSException.POSKeyError(oid)
            tid = r[1]
        return tid

    def history(self, oid, size=1):
        """The child's history of ``oid``, without revisions the composite
        does not see yet."""
        self._current_view()
        part = self._home(oid)
        overlay = self.overlay_of(oid)
        if overlay is not None:
            return overlay.history(oid, size, self._visible_tid)
        visible = self._visible_tid
        want = size
        while True:
            # size by name: RelStorage's history is (oid, version, size)
            found = part.storage.history(oid, size=want)
            entries = [d for d in found if d['tid'] <= visible]
            if len(entries) >= size or len(found) < want:
                break
            want += size - len(entries)
        if not entries:
            raise POSException.POSKeyError(oid)
        return entries[:size]

    # --- writing ----------------------------------------------------------------

    def tpc_begin(self, transaction, tid=None, status=' '):
        if self._read_only:
            raise POSException.ReadOnlyError()
        if self._refused is not None:
            raise WritesRefusedError(self._refused)
        self._coordinator.tpc_begin(transaction, tid, status)

    def tpc_transaction(self):
        state = self._coordinator.state
        return state.transaction if state is not None else None

    def _writable(self, oid, transaction, what):
        if self._read_only:
            raise POSException.ReadOnlyError()
        state = self._coordinator.current(transaction)
        part = self.partition_for(oid, what)
        part.check_writable(oid)
        if is_internal(oid, part.prefix):
            raise POSException.StorageError(
                'oid %s is reserved for the partition map of %r'
                % (oid_hex(oid), part.name))
        return state, part

    def store(self, oid, serial, data, version, transaction):
        # The hot path of every commit: the checks of _writable, inline.
        state = self._coordinator.state
        try:
            part = self._writable_by_prefix[oid[0]]
        except (KeyError, IndexError, TypeError):
            part = None
        if (part is None or version or state is None
                or state.transaction is not transaction
                or oid[-1] == 255 and oid[1:] == MAP_SUFFIX):
            if version:
                raise POSException.Unsupported("Versions aren't supported")
            overlay = self.overlay_of(oid)
            if overlay is not None and oid[1:] != MAP_SUFFIX:
                return overlay.store(oid, serial, data, transaction)
            state, part = self._writable(oid, transaction, 'store')
        if serial == z64 or serial is None:
            state.new_data[oid] = data
        if data[:2] != b'\x80\x03' or part.quick_check(data):
            data = self.to_child(part, oid, data, state)
        txn = state.child_txn.get(part.prefix)
        if txn is None:
            txn = self._coordinator.begin(state, part)
        part.storage.store(oid, serial, data, '', txn)
        part.saw_oid(oid)

    def restore(self, oid, serial, data, version, prev_txn, transaction):
        if version:
            raise POSException.Unsupported("Versions aren't supported")
        state, part = self._writable(oid, transaction, 'restore')
        if data is not None:
            state.restored(oid, data)
            data = self.to_child(part, oid, data, state)
        txn = self._coordinator.begin(state, part)
        part.storage.restore(oid, serial, data, '', prev_txn, txn)
        part.saw_oid(oid)

    def deleteObject(self, oid, serial, transaction):
        state, part = self._writable(oid, transaction, 'delete')
        txn = self._coordinator.begin(state, part)
        part.child.delete_object(oid, serial, txn)

    def checkCurrentSerialInTransaction(self, oid, serial, transaction):
        """A read-only partition is checked without beginning its child
        (see :meth:`Partition.check_current_serial`); an overlaid object
        in both its children (see :meth:`Overlay.check_current`)."""
        state = self._coordinator.current(transaction)
        part = self.partition_for(oid, 'check the serial of')
        overlay = self.overlay_of(oid)
        if overlay is not None:
            overlay.check_current(oid, serial, state)
            return
        if part.read_only:
            part.check_current_serial(oid, serial)
            return
        txn = self._coordinator.begin(state, part)
        part.storage.checkCurrentSerialInTransaction(oid, serial, txn)

    def tpc_vote(self, transaction):
        return self._coordinator.tpc_vote(transaction)

    def tpc_finish(self, transaction, func=lambda tid: None):
        return self._coordinator.tpc_finish(transaction, func)

    def tpc_abort(self, transaction):
        self._coordinator.tpc_abort(transaction)

    # --- undo, iteration, copying and packing ---------------------------------

    def undo(self, transaction_id, transaction):
        if self._read_only:
            raise POSException.ReadOnlyError()
        return iteration.undo(self, transaction_id, transaction)

    def undoLog(self, first=0, last=-20, filter=None):
        self._current_view()
        return iteration.undo_log(self, first, last, filter)

    def undoInfo(self, first=0, last=-20, specification=None):
        self._current_view()
        return iteration.undo_info(self, first, last, specification)

    def iterator(self, start=None, stop=None):
        self._current_view()
        return iteration.CompositeIterator(self, start, stop)

    def record_iternext(self, next=None):
        if next is None:
            self._current_view()
        return iteration.record_iternext(self, next)

    def lastInvalidations(self, size):
        """ZEO's IServeable: the last ``size`` transactions' oids, oldest
        first, so that a restarted server can still update its clients'
        caches instead of making them drop everything."""
        return iteration.last_invalidations(self, size)

    def copyTransactionsFrom(self, other):
        iteration.copy_transactions(other, self)

    def pack(self, t, referencesf=None, gc=None, progress=None):
        """Pack every partition to ``t``; see :mod:`compositestorage.gc`.

        ``referencesf`` is ignored: the composite finds references itself.
        ``progress`` is a progress factory (:mod:`compositestorage.progress`).
        What each partition lost is kept in ``last_pack``, as
        ``{partition name: {'objects': n, 'stubs': n, 'bytes': n}}``, or
        ``{'read_only': True}`` for a read-only partition, never packed
        (IStorage's ``pack`` returns nothing; the pack command prints it).
        """
        if self._read_only:
            raise POSException.ReadOnlyError()
        self.last_pack = global_gc.pack(
            self, t, self._pack_gc if gc is None else gc, progress)

    def __repr__(self):
        return '<CompositeStorage %s>' % self.__name__



def storage_identity(storage):
    """Something equal for two handles on the same child storage."""
    path = file_name(storage)
    if path:
        return ('file', os.path.realpath(path))
    return ('object', id(storage), storage.getName())
