"""The coordinator: one tid per transaction, begun only where it is needed.

The composite holds its own commit lock from ``tpc_begin`` to
``tpc_finish``/``tpc_abort``, so children are only ever begun by the thread
that holds it: their own commit locks can never be taken in a different
order.  A child is begun, with the composite's tid, the first time the
transaction writes to it.  Stubs are written at vote, once every store is
known.  ``lastTransaction()`` moves, and ``func(tid)`` (ZODB's
invalidations) runs, only after every participant has finished, so a
reader never starts a snapshot that sees the transaction in only some
partitions (DESIGN.md, invariants 5 and 6).

A transaction with more than one participant writes its intent to the
journal before the first child finishes (see :mod:`compositestorage.journal`
and :mod:`compositestorage.recovery`); one with a single participant pays
nothing beyond that child's own commit.
"""
import contextlib
import logging
import threading

from ZODB._compat import dumps

from ZODB.POSException import POSKeyError
from ZODB.POSException import StorageTransactionError
from ZODB.Connection import TransactionMetaData
from ZODB.utils import newTid
from ZODB.utils import z64

from compositestorage import mvcc
from compositestorage.errors import CorruptStubError
from compositestorage.errors import JournalError
from compositestorage.errors import NotAtomicError
from compositestorage.faults import point as fault_point
from compositestorage.journal import Intent
from compositestorage.partition import is_internal
from compositestorage.recovery import has_transaction
from compositestorage.recovery import record_participants
from compositestorage.recovery import with_empty_span
from compositestorage.recovery import roll_back
from compositestorage.references import class_of
from compositestorage.stubs import read_stub
from compositestorage.stubs import stub_record

logger = logging.getLogger(__name__)

#: Extension key on a child's transaction that carries only internal
#: records (partition maps written when a child is first initialised).
#: Iteration and the undo log leave such child transactions out.
INTERNAL = 'compositestorage-internal'


def internal_metadata(transaction):
    """A copy of ``transaction``'s metadata, marked as internal."""
    extension = dict(transaction.extension)
    extension[INTERNAL] = True
    return TransactionMetaData(transaction.user, transaction.description,
                               with_empty_span(dumps(extension, 3)))


def children_metadata(transaction):
    """The composite's own copy of ``transaction``'s metadata, which the
    children are given: its extension has room for the partitions the
    transaction spans (see :func:`compositestorage.recovery.with_empty_span`),
    filled in before the children vote."""
    extension = getattr(transaction, 'extension_bytes', None)
    if extension is None:
        extension = getattr(transaction, 'extension', None)
        extension = dumps(extension, 3) if extension else b''
    return TransactionMetaData(transaction.user, transaction.description,
                               with_empty_span(extension))


def is_internal_transaction(extension):
    return bool(extension) and INTERNAL in extension


class TransactionState:
    """What one composite transaction has done so far."""

    def __init__(self, transaction, tid, status):
        self.transaction = transaction
        #: what the children are given: a copy of ``transaction``'s
        #: metadata with room for the span (see ``children_metadata``)
        self.metadata = children_metadata(transaction)
        self.tid = tid
        self.status = status
        self.begun = {}          # prefix -> Partition, in order begun
        self.child_txn = {}      # prefix -> the transaction that child sees
        self.stubs_needed = {}   # Partition -> set of foreign oids
        self.new_data = {}       # oid -> data of objects created here
        self.restored_data = {}  # oid -> data restored here
        self.hints = {}          # oid -> class named by a rewritten hint
        self.new_stubs = []      # (Partition, oid, klass) written at vote
        #: (prefix, oid) of overlay records written: they are the stubs
        #: of their objects in that child (see compositestorage.overlay)
        self.overlay_records = set()
        self.resolved = set()
        #: prefixes of children begun only for internal records
        self.internal_only = set()
        #: the participants finished so far, in order
        self.finished = []

    def finish_order(self):
        """``(parts, intent)``: the participants in the order they finish,
        and those the journal's intent names.

        A child that cannot take a finished transaction back
        (``rolls_back`` false) finishes after every other participant:
        until it has finished each of them can still be taken back, and
        once it has, they all have.  Such a child that only received
        internal records (its partition map) finishes first and is left
        out of the intent: those records are the same whatever happens to
        the transaction, so recovery neither needs nor could take them
        back.
        """
        parts = list(self.begun.values())
        fixed = [p for p in parts if not p.child.rolls_back]
        aside = [p for p in fixed if p.prefix in self.internal_only]
        last = [p for p in fixed if p not in aside]
        first = [p for p in parts if p.child.rolls_back]
        return aside + first + last, first + last

    def check_atomic(self):
        """Refuse a transaction that no order of finishing keeps all or
        nothing: one that writes to two children that cannot take a
        finished transaction back."""
        fixed = [p for p in self.begun.values()
                 if not p.child.rolls_back
                 and p.prefix not in self.internal_only]
        if len(fixed) > 1:
            raise NotAtomicError(
                'transaction %s writes to partitions %s, whose children '
                '(%s) cannot take back a finished transaction; a commit is '
                'all or nothing over at most one such partition.  Nothing '
                'was committed.  Keep history in those children (RelStorage '
                '"keep-history true"), or change their objects in separate '
                'transactions' % (
                    self.tid.hex(), ', '.join(repr(p.name) for p in fixed),
                    ', '.join(p.child.describe() for p in fixed)))

    def stored(self, oid, serial, data):
        """Note a store: a new object's data names its class for stubs."""
        if serial == z64 or serial is None:
            self.new_data[oid] = data

    def restored(self, oid, data):
        if data is not None:
            self.restored_data.setdefault(oid, data)

    def data_of(self, oid):
        """What this transaction stored or restored for ``oid``, if any."""
        data = self.new_data.get(oid)
        return self.restored_data.get(oid) if data is None else data


class Coordinator:
    """Two-phase commit over the partitions of one composite."""

    def __init__(self, storage, like=None):
        self._storage = storage
        self._commit_lock = threading.Lock()
        self._lock = threading.Lock()
        self.state = None
        #: internal records a child still needs: {Partition: [(oid, data)]}
        #: (an instance of a shared composite shares its root's)
        self.pending_init = {} if like is None else like.pending_init
        #: new tids go above this one too: a tid taken back is not reused
        self.tid_floor = z64
        #: how many packs are running (see ``packing``); in a shared
        #: composite, in any process, as read at ``tpc_begin``
        self.packs = 0
        #: how many packs had swept, in any process, at the last tpc_begin
        self.packs_done = None

    @contextlib.contextmanager
    def commits_held(self):
        """No transaction commits while the block runs.

        FileStorage's iterator, opened with a start tid while a child is
        writing a transaction, finds the file's last transaction
        incomplete and fails ("Can't find last transaction in large
        file"); opened here, it sees only whole transactions.
        """
        with self._commit_lock:
            yield

    @contextlib.contextmanager
    def packing(self):
        """Mark a pack as running, for as long as the block lasts.

        A pack's mark decides which stubs each child keeps; a commit that
        refers through a stub afterwards could lose it to the sweep.  So
        while a pack runs, ``write_stubs`` writes every stub a transaction
        refers through again, after the pack time, where the children's
        packers copy it.  On entry this waits for the transaction being
        committed, if any: it decided on its stubs before the pack began.
        """
        shared = self._storage._shared
        with self._lock:
            self.packs += 1
        try:
            with self.commits_held():
                if shared is not None:
                    shared.pack_started()
            try:
                yield
            finally:
                if shared is not None:
                    shared.pack_ended()
        finally:
            with self._lock:
                self.packs -= 1

    # --- phase one ----------------------------------------------------------

    def tpc_begin(self, transaction, tid=None, status=' '):
        with self._lock:
            if self.state is not None and \
                    self.state.transaction is transaction:
                raise StorageTransactionError(
                    "Duplicate tpc_begin calls for same transaction")
        self._commit_lock.acquire()
        storage = self._storage
        shared = storage._shared
        try:
            floor = max(storage._ltid, self.tid_floor)
            if shared is not None:
                tid = self._begin_shared(shared, newTid(floor), tid)
            elif tid is None:
                tid = newTid(floor)
            state = TransactionState(transaction, tid, status)
            with self._lock:
                self.state = state
        except BaseException:
            try:
                if shared is not None:
                    shared.end_commit()
            finally:
                self._commit_lock.release()
            raise

    def _begin_shared(self, shared, proposed, given):
        """Take the commit lock every process takes; the tid, chosen above
        the last one any process chose (``proposed`` if it is), or
        ``given``.

        An intent found under it was left by a process that died (a live
        one clears its intent before it lets go): it is recovered first.
        A pack that ran or runs in any process is noted for
        ``write_stubs``.
        """
        found = shared.begin_commit(None if given else proposed, given)
        if found.intent is not None:
            self._storage.recover_shared()
        self.packs = found.packs_running
        if shared.snapshot_packs_done not in (None, found.packs_done):
            # A pack swept after the snapshot this transaction read (its
            # loads, and the stubs ``committed_stub`` finds there): a stub
            # found there may be gone.  Write them all again, as while a
            # pack runs.
            self.packs = max(self.packs, 1)
        if self.packs_done != found.packs_done:
            if self.packs_done is not None:
                # a pack swept stubs this process may have cached
                for part in self._storage.partitions:
                    part.stubs.clear()
            self.packs_done = found.packs_done
        return found.tid

    def current(self, transaction):
        """The state of ``transaction``, which must be the one begun."""
        state = self.state
        if state is None or state.transaction is not transaction:
            raise StorageTransactionError(
                "%r is not the transaction in progress" % (transaction,))
        return state

    def begin(self, state, part, internal=False):
        """Begin ``part``'s child in this transaction, once.

        Returns the transaction object to pass to that child.  A child that
        only receives internal records sees a copy marked as internal.
        """
        if part.prefix not in state.begun:
            part.check_writable()
            txn = state.metadata
            if internal:
                txn = internal_metadata(txn)
            part.child.tpc_begin(txn, state.tid, state.status)
            state.begun[part.prefix] = part
            if internal:
                state.internal_only.add(part.prefix)
            state.child_txn[part.prefix] = txn
        return state.child_txn[part.prefix]

    def write_stubs(self, state):
        """Store every stub the transaction needs and its child lacks; while
        a pack runs, also those it has (see ``packing``).

        A new target needs no look at its child (no stub for it can exist
        yet) and usually names its class through the hint its reference
        had; so for the common stub the loop does dictionary lookups and
        one child store, with the child begun and each home partition
        found once per transaction.
        """
        storage = self._storage
        new_data = state.new_data
        hints = state.hints
        overlays = state.overlay_records
        new_stubs = state.new_stubs
        packing = self.packs
        homes = {}
        for part, oids in state.stubs_needed.items():
            known = part.stubs
            store = part.storage.store
            txn = None
            for oid in sorted(oids):
                if oid in known and not packing or \
                        overlays and (part.prefix, oid) in overlays:
                    continue
                committed = None
                if oid in new_data:
                    # a new object: no stub for it can exist yet
                    serial = z64
                else:
                    committed = self.committed_stub(part, oid)
                    if committed is not None and not packing:
                        continue
                    serial = part.current_serial(oid) or z64
                home = homes.get(oid[0])
                if home is None:
                    home = homes[oid[0]] = storage.partition_for(
                        oid, 'reference')
                if committed is not None:
                    # written again during a pack: the very same record
                    klass = committed[0]
                else:
                    klass = hints.get(oid) or self._class_of(
                        home, oid, state.data_of(oid))
                if txn is None:
                    txn = self.begin(state, part)
                store(oid, serial, stub_record(home.name, klass), '', txn)
                new_stubs.append((part, oid, klass))

    @staticmethod
    def _class_of(home, oid, data):
        if data is None:
            try:
                data = home.storage.load(oid)[0]
            except POSKeyError:
                return None
        return class_of(data) if data else None

    def committed_stub(self, part, oid):
        """``(klass,)`` of the committed stub for ``oid`` in ``part``.

        ``None`` when the child holds no such stub.  The result is cached:
        stubs are immutable.
        """
        try:
            return (part.stubs[oid],)
        except KeyError:
            pass
        try:
            data = part.storage.load(oid)[0]
        except POSKeyError:
            return None
        home, klass = read_stub(data, part.name, oid)
        expected = self._storage.partition_for(oid)
        if home != expected.name:
            raise CorruptStubError(
                part.name, oid, 'it names %r as the home partition, but the '
                'oid belongs to %r' % (home, expected.name))
        part.stubs[oid] = klass
        return (klass,)

    def write_pending_init(self, state):
        by_prefix = self._storage._by_prefix
        for part, records in list(self.pending_init.items()):
            if part.read_only:
                continue
            part = by_prefix[part.prefix]   # an instance's own
            txn = self.begin(state, part, internal=True)
            for oid, data in records:
                part.storage.store(oid, part.current_serial(oid) or z64,
                                   data, '', txn)

    def tpc_vote(self, transaction):
        state = self.current(transaction)
        self.write_stubs(state)
        if self.pending_init:
            self.write_pending_init(state)
        if not state.begun:
            # Invariant 5: even an empty transaction leaves its tid durable,
            # in the primary unless that one is read-only.
            writable = [p for p in self._storage.partitions
                        if not p.read_only]
            self.begin(state, writable[0] if writable
                       else self._storage.primary)
        if len(state.begun) > 1:
            state.check_atomic()
            for part in state.begun.values():
                record_participants(part, state.child_txn[part.prefix],
                                    state.begun)
        for part in list(state.begun.values()):
            fault_point('vote', part.name)
            resolved = part.child.tpc_vote(state.child_txn[part.prefix])
            fault_point('voted', part.name)
            if resolved:
                state.resolved.update(
                    oid for oid in resolved
                    if not is_internal(oid, part.prefix))
        return list(state.resolved)

    # --- phase two ----------------------------------------------------------

    def tpc_finish(self, transaction, func=None):
        state = self.current(transaction)
        storage = self._storage
        try:
            with storage._finish_lock:
                return self._finish(state, func)
        except BaseException as e:
            if not isinstance(e, Exception):
                self._abandon(state)
            raise
        finally:
            self._end()

    def _abandon(self, state):
        """Leave the transaction as a process that died here would, after
        an interruption (``KeyboardInterrupt``, ``SystemExit``) between
        two finishes: the participants not finished are aborted (a
        database server rolls back a dead client's transaction), and the
        intent stays for recovery.  Left voted, they would keep their
        commit locks, and the next commit, or the recovery of the intent
        in this very process, would wait for them for ever."""
        for prefix, part in state.begun.items():
            if part in state.finished:
                continue
            try:
                part.child.tpc_abort(state.child_txn[prefix])
            except Exception:
                logger.exception('partition %r failed in tpc_abort',
                                 part.name)

    def _finish(self, state, func):
        """Finish every participant, then tell ZODB, then move the tid.

        A transaction with more than one participant first makes its
        intent durable in the journal; see ``docs/commit-protocol.rst``.
        Runs under the storage's finish lock, which ``lastTransaction()``
        also takes: as with FileStorage, a caller asking for the last tid
        while a commit finishes waits and gets the new one, after ZODB's
        invalidations (``func``) have gone out.
        """
        storage = self._storage
        parts, named = state.finish_order()
        journal = storage.journal if len(parts) > 1 else None
        if storage._shared is not None and journal is None:
            # no poll of any process takes a snapshot until every
            # participant has finished (let go of in ``_end``); with an
            # intent, writing it takes this lock
            storage._shared.hold_finish()
        if journal is not None:
            # an open can recover from the first participant's span alone
            self._write_intent(state, named, journal,
                               durable=not parts[0].child.records_spans)
        finished, error = self._finish_children(state, parts)
        if error is not None and not self._finished_anyway(state, named,
                                                           finished):
            self._remove_partial(state, parts, named, finished, journal)
            raise error
        if journal is not None:
            try:
                journal.clear(state.tid)
            except Exception:
                # Every participant has finished: the transaction is
                # complete, and recovery will find it so in every one.
                logger.exception('could not clear the journal %s after '
                                 'transaction %s; it finished in every '
                                 'partition', journal.path, state.tid.hex())
            fault_point('journal-cleared')
        for part, oid, klass in state.new_stubs:
            part.stubs[oid] = klass
        for part in parts:
            self.pending_init.pop(getattr(part, 'root', part), None)
        # The commit point: every participant has finished.  Loads may
        # now see the tid.
        storage.advance_visible(state.tid)
        try:
            if func is not None:
                func(state.tid)
        finally:
            storage._ltid = state.tid
            if storage._shared is not None:
                mvcc.seen(storage, state.tid)
        return state.tid

    def _write_intent(self, state, parts, journal, durable=True):
        """Write the intent (durable, unless ``durable`` is false), or
        abort every participant.

        Before the intent is written no child has finished, so a failure
        here (a full disk, no file descriptor left) takes the transaction
        back whole: each child is aborted, which also frees its commit
        lock for the next transaction.
        """
        try:
            fault_point('write-intent')
            journal.write_intent(Intent(state.tid,
                                        [p.prefix for p in parts]),
                                 durable)
        except Exception as e:
            logger.error('could not write the commit journal %s for '
                         'transaction %s', journal.path, state.tid.hex(),
                         exc_info=True)
            self._abort_children(state)
            # An intent that reached the disk names this tid: never reuse it
            self.tid_floor = max(self.tid_floor, state.tid)
            raise JournalError(
                'could not write the commit journal %s (%s); transaction %s '
                'was aborted in every partition it touched (%s) and nothing '
                'of it was committed: free disk space or file descriptors, '
                'and commit again' % (
                    journal.path, e, state.tid.hex(),
                    ', '.join(p.name for p in parts))) from e
        fault_point('intent-written')

    def _abort_children(self, state):
        for part in state.begun.values():
            try:
                part.child.tpc_abort(state.child_txn[part.prefix])
            except Exception:
                logger.exception('partition %r failed in tpc_abort',
                                 part.name)
        state.begun.clear()

    def _finish_children(self, state, parts):
        """``(finished, error)``: finish the participants one after the
        other, stopping at the first failure.

        Finishing FileStorage children side by side was tried: on the CI's
        disk their fsyncs do not overlap (two fsyncs take 0.48 ms one after
        the other and 0.54 ms from two threads), so it only added the cost
        of the threads.
        """
        finished = state.finished
        shared = self._storage._shared
        unflushed = parts[:-1] if shared is not None and \
            shared.same_cluster else ()
        for part in parts:
            try:
                if part in unflushed:
                    # the last participant's commit flushes this one's
                    part.child.commit_without_flush()
                part.storage.tpc_finish(state.child_txn[part.prefix])
            except Exception as e:
                logger.critical('partition %r failed in tpc_finish of %s',
                                part.name, state.tid.hex(), exc_info=True)
                return finished, e
            finished.append(part)
            fault_point('finished', part.name)
        return finished, None

    def _finished_anyway(self, state, named, finished):
        """Whether the transaction is whole although the last child raised
        in ``tpc_finish``: a child that cannot roll back finishes last, and
        may have committed before it raised (a failure while updating its
        caches, say)."""
        missing = [p for p in named if p not in finished]
        if len(missing) != 1 or missing[0].child.rolls_back:
            return False
        try:
            whole = has_transaction(missing[0], state.tid)
        except Exception:
            logger.exception('partition %r: could not tell whether it holds '
                             '%s', missing[0].name, state.tid.hex())
            return False
        if whole:
            logger.critical('partition %r raised in tpc_finish of %s, but it '
                            'holds it, as every other partition does: the '
                            'transaction is complete', missing[0].name,
                            state.tid.hex())
        return whole

    def _remove_partial(self, state, parts, named, finished, journal):
        """A participant failed to finish: take the transaction out of the
        ones that have it and abort the rest, so that no partition holds
        it.  If that fails too, the storage refuses writes until it is
        reopened, which recovers from the journal.  A child left out of
        the intent (see ``finish_order``) keeps what it finished."""
        failed = []
        for part in parts:
            txn = state.child_txn[part.prefix]
            try:
                if part not in named:
                    if part not in finished:
                        part.child.tpc_abort(txn)
                elif part in finished or has_transaction(part, state.tid):
                    roll_back(part, state.tid)
                else:
                    part.child.tpc_abort(txn)
            except Exception:
                logger.critical(
                    'partition %r: could not take back transaction %s',
                    part.name, state.tid.hex(), exc_info=True)
                failed.append(part.name)
        if failed:
            self._storage.refuse_writes(
                'transaction %s failed to finish and could not be taken '
                'back from partition(s) %s; %s' % (
                    state.tid.hex(), ', '.join(failed),
                    'reopen the storage (or run "compositestorage recover")'
                    ' to recover it from the journal' if journal is not None
                    else 'reopen the storage'))
        elif journal is not None:
            journal.clear_durably()
        self.tid_floor = state.tid

    def tpc_abort(self, transaction):
        with self._lock:
            state = self.state
            if state is None or state.transaction is not transaction:
                return
        try:
            self._abort_children(state)
        finally:
            self._end()

    def _end(self):
        with self._lock:
            self.state = None
        try:
            shared = self._storage._shared
            if shared is not None:
                shared.end_commit()
        finally:
            self._commit_lock.release()
