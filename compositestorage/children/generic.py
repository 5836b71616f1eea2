"""The adapter for a child of a kind the composite has no adapter for.

It answers what the public storage API allows (``lastTransaction``,
``iterator``, ``record_iternext``, ``loadBefore``, ``pack(gc=False)``) and
says plainly what it cannot do: list its oids cheaply, read the partitions
of its transactions, take a transaction back, or remove garbage.
"""
import logging

from ZODB.POSException import POSKeyError
from ZODB.serialize import referencesf

from compositestorage.errors import ConfigurationError
from compositestorage.errors import RecoveryError

logger = logging.getLogger(__name__)


class Child:
    """What the composite needs of a child, for any storage."""

    #: the kind's name in messages and ``info``
    kind = 'other'
    #: whether ``recent_transactions`` reads the partitions of each
    #: transaction (a child that keeps no transaction metadata cannot)
    reads_spans = False
    #: whether ``record_iternext`` walks oids in order, a token being an
    #: oid, and raises ``POSKeyError`` for an oid without current data
    iterates_by_oid = False
    #: whether ``record_iternext`` raises ``POSKeyError`` for an oid whose
    #: current record has no data, to be stepped over
    skips_deleted = False
    #: whether a pack removes this child's garbage (from the global mark)
    collects_garbage = False
    #: whether ``count_in`` and ``count_outside`` are cheap (no record read)
    counts_cheaply = False
    #: whether ``roll_back`` can take a finished transaction back.  A
    #: transaction may span at most one child that cannot: that one
    #: finishes last (see "What holds for each child kind" in
    #: docs/commit-protocol.rst).
    rolls_back = False
    #: whether the child's record of a transaction keeps its span, durable
    #: once ``tpc_finish`` returns and read back by
    #: ``recent_transactions``: then a transaction it finished first needs
    #: no synced intent (see "One sync fewer" in docs/commit-protocol.rst).
    records_spans = False

    def __init__(self, storage, base):
        self.storage = storage
        #: the child itself, or the storage under a BlobStorage proxy
        self.base = base

    def type_name(self):
        """The child's class name, as ``info`` and ``serve`` show it."""
        return type(self.storage).__name__

    def describe(self):
        """The kind of child, as messages name it."""
        return self.kind

    def __repr__(self):
        return '<%s adapter for %s>' % (self.kind, self.storage.getName())

    #: the file the child keeps its data in, if it is one file
    file_name = None
    #: where the child keeps its data, for ``info``, if not in one file
    location = None

    def prepare(self, read_only):
        """Called when the composite opens the child (see subclasses)."""

    def cluster_id(self):
        """The database cluster the child writes to, whose one log makes
        a later commit durable with it, or ``None`` (see RelStorage's)."""
        return None

    def commit_without_flush(self):
        """Nothing to do: only a child in a shared cluster can."""

    # --- oids -------------------------------------------------------------

    def oids_in(self, lo, hi):
        """The oids of the child's current records from ``lo`` to ``hi``
        (inclusive), an iterable."""
        child = self.storage
        if hasattr(child, 'record_iternext'):
            oids = []
            token = None
            while True:
                try:
                    oid, _, _, token = child.record_iternext(token)
                except (ValueError, KeyError):
                    break
                oids.append(oid)
                if token is None:
                    break
        elif hasattr(child, 'iterator'):
            oids = set()
            it = child.iterator()
            try:
                for txn in it:
                    oids.update(r.oid for r in txn)
            finally:
                getattr(it, 'close', lambda: None)()
        else:
            raise ConfigurationError(
                'its %s can neither list its current records '
                '(record_iternext) nor iterate its transactions, so the '
                'composite cannot tell which oids it has used; use another '
                'storage type for this partition' % type(child).__name__)
        return [oid for oid in oids if lo <= oid <= hi]

    def max_oid(self, lo, hi):
        """The highest oid from ``lo`` to ``hi`` the child holds, or
        ``None``."""
        return max(self.oids_in(lo, hi), default=None)

    def min_oid(self, lo, hi):
        return min(self.oids_in(lo, hi), default=None)

    def count_in(self, lo, hi):
        """How many oids from ``lo`` to ``hi`` the child holds."""
        return sum(1 for _ in self.oids_in(lo, hi))

    def count_outside(self, lo, hi):
        """How many oids outside ``lo`` to ``hi`` the child holds (its
        stubs); ``None`` where that cannot be counted cheaply."""
        return None

    def prefixes_held(self):
        """The first bytes of every oid the child holds; ``None`` where
        they cannot be listed cheaply."""
        return None

    def current_serial(self, oid):
        """The tid of ``oid``'s last record, deleted or not, or ``None``."""
        try:
            return self.storage.load(oid)[1]
        except POSKeyError:
            pass
        try:
            return self.storage.getTid(oid)
        except (POSKeyError, KeyError):
            return None

    def appended_serial(self, oid):
        """The tid of ``oid``'s newest record that another process wrote
        since the child was opened read-only, or ``None``."""
        return None

    # --- transactions -----------------------------------------------------

    def tpc_begin(self, transaction, tid, status=' '):
        """Begin the child in the composite's transaction, with its tid."""
        if status == ' ':
            # MappingStorage and others take no status
            self.storage.tpc_begin(transaction, tid)
        else:
            self.storage.tpc_begin(transaction, tid, status)

    def tpc_vote(self, transaction):
        """Vote the child; the oids whose conflicts were resolved."""
        return self.storage.tpc_vote(transaction)

    def tpc_abort(self, transaction):
        """Abort the child's part of the composite's transaction."""
        self.storage.tpc_abort(transaction)

    def settle(self):
        """Return once no commit of this child is running.  Recovery calls
        it before it asks which children hold a transaction: a child that
        commits in the coordinator's process stops committing when that
        process dies, so there is nothing to wait for."""

    def last_finished(self):
        """The tid of the last transaction the child finished."""
        return self.storage.lastTransaction()

    def has_transaction(self, tid):
        """Whether the child holds transaction ``tid``."""
        last = self.last_finished()
        if last <= tid:
            return last == tid
        it = self.storage.iterator(tid, tid)
        try:
            return any(t.tid == tid for t in it)
        finally:
            getattr(it, 'close', lambda: None)()

    def recent_transactions(self, floor, depth):
        """``(tid, pickled extension)`` of the child's transactions above
        ``floor``, newest first, at most ``depth`` (an empty extension for
        one a pack rewrote); none for a child that keeps no transaction
        metadata."""
        return ()

    def record_participants(self, extension):
        """Have the transaction being committed recorded with the pickled
        ``extension`` (the same length as the one it was begun with),
        before its vote.  A child that reads the metadata at finish needs
        nothing more."""

    def undo(self, transaction_id, transaction, internal):
        """Undo ``transaction_id`` in the child; the oids undone.

        An internal record (``internal(oid)``: a stub, a partition map)
        keeps its current state, written again unchanged, because later
        records may still use it; it is not among the oids returned.
        """
        _, oids = self.storage.undo(transaction_id, transaction)
        undone = []
        for oid in oids:
            if internal(oid):
                data, serial = self.storage.load(oid)
                self.storage.store(oid, serial, data, '', transaction)
            else:
                undone.append(oid)
        return undone

    def roll_back(self, tid, name):
        """Remove ``tid``, the child's last transaction."""
        raise RecoveryError(
            'partition %r: cannot remove transaction %s from a %s child; '
            'it cannot be rolled back' % (name, tid.hex(),
                                         type(self.base).__name__))

    # --- pack ---------------------------------------------------------------

    def reader(self, limit):
        """``reader(oid)``: the data of ``oid``'s revision before ``limit``,
        or ``None``; ``reader.close()`` when done."""
        return LoadingReader(self.storage, limit)

    def sweep(self, t, verdict, name):
        """Pack to time ``t``, keeping only the oids of ``verdict`` (a
        ``QQTreeSet`` of oids as integers) among the records before it."""
        if takes_gc(self.storage.pack):
            logger.info('pack: partition %r (%s) packs without GC; its '
                        'garbage stays', name, type(self.storage).__name__)
            self.storage.pack(t, referencesf, gc=False)
        else:
            # ZEO's ClientStorage cannot be told not to collect garbage,
            # and a child that does loses objects other partitions refer
            # to (DESIGN.md, invariant 7): leave it alone.
            logger.warning(
                'pack: partition %r (%s) was not packed: its pack cannot be '
                'told not to collect garbage on its own.  Pack it where it is '
                'served, with pack-gc false there', name,
                type(self.storage).__name__)

    def pack_without_gc(self, t):
        self.storage.pack(t, referencesf, gc=False)

    def delete_object(self, oid, serial, transaction):
        """``IExternalGC.deleteObject`` in the child."""
        self.storage.deleteObject(oid, serial, transaction)


def takes_gc(pack):
    import inspect
    try:
        return 'gc' in inspect.signature(pack).parameters
    except (TypeError, ValueError):
        return False


class LoadingReader:
    """``reader(oid)``: the data of ``oid``'s revision before ``limit`` in
    a child, or ``None`` (no such revision, or a deletion)."""

    def __init__(self, storage, limit):
        self._load_before = storage.loadBefore
        self._limit = limit

    def __call__(self, oid):
        try:
            found = self._load_before(oid, self._limit)
        except POSKeyError:
            return None
        return found[0] if found else None

    def close(self):
        pass
