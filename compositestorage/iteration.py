"""The children's histories seen as one: iteration, undo and copying.

Every child writes a composite transaction under the same tid, so merging
the children's iterators by tid gives the composite's transactions.
Internal records (stubs and partition maps) are left out everywhere, and
references come back in composite form.
"""
import base64
import heapq

from ZODB._compat import dumps
from ZODB.BaseStorage import DataRecord
from ZODB.BaseStorage import TransactionRecord
from ZODB.BaseStorage import copy as base_copy
from ZODB.interfaces import IBlobStorage
from ZODB.POSException import POSKeyError
from ZODB.utils import p64
from ZODB.utils import u64

from compositestorage.commit import is_internal_transaction
from compositestorage.partition import is_internal
from compositestorage.recovery import zodb_extension


class CompositeTransaction(TransactionRecord):
    """One composite transaction: the records of every child, merged."""

    def __init__(self, tid, status, user, description, extension, records):
        TransactionRecord.__init__(self, tid, status, user, description,
                                   extension)
        self._records = records

    def __iter__(self):
        return iter(self._records)


class CompositeIterator:
    """``iterator(start, stop)`` over all partitions, in tid order.

    It stops at the last tid every participant had finished when it was
    created (invariant 6): the children's iterators read their files as
    they go, and would otherwise show a transaction that is finishing, or
    one a read-only composite does not see, in some partitions only.
    """

    def __init__(self, storage, start=None, stop=None):
        self._storage = storage
        visible = storage.visible_tid()
        if stop is None or stop > visible:
            stop = visible
        self._iterators = []
        try:
            for part in storage.partitions:
                self._iterators.append(
                    (part, _child_iterator(storage, part, start, stop)))
        except BaseException:
            self.close()
            raise
        self._merged = self._merge()

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._merged)

    next = __next__

    def close(self):
        for _, it in self._iterators:
            close = getattr(it, 'close', None)
            if close is not None:
                close()

    def _stream(self, index, part, it):
        overlay = self._storage.overlay_parts.get(part.prefix)
        for txn in it:
            if is_internal_transaction(txn.extension):
                continue
            # Read the records now: the child's iterator moves on.
            records = [r for r in txn if not is_internal(r.oid, part.prefix)
                       or overlay is not None and overlay.shows(r.oid, r.data)]
            yield txn.tid, index, part, txn, records

    def _merge(self):
        streams = [self._stream(i, part, it)
                   for i, (part, it) in enumerate(self._iterators)]
        group = []
        for item in heapq.merge(*streams, key=lambda item: item[:2]):
            if group and group[0][0] != item[0]:
                yield self._transaction(group)
                group = []
            group.append(item)
        if group:
            yield self._transaction(group)
        self.close()

    def _transaction(self, group):
        storage = self._storage
        from_child = storage.from_child
        records = []
        merged = set()
        for tid, _, part, txn, child_records in group:
            for r in child_records:
                overlay = storage.overlay_of(r.oid)
                if overlay is None:
                    records.append(DataRecord(
                        r.oid, r.tid, from_child(part, r.data), r.data_txn))
                elif r.oid not in merged:
                    # both parts of an overlaid object: one record, merged
                    merged.add(r.oid)
                    records.append(DataRecord(
                        r.oid, r.tid, overlay.data_at(r.oid, tid), None))
        first = group[0][3]
        return CompositeTransaction(
            first.tid, first.status, first.user, first.description,
            zodb_extension(_extension_bytes(first)), records)


def _child_iterator(storage, part, start, stop):
    """``part``'s child's iterator from ``start`` to ``stop``.

    FileStorage's iterator, opened with a start tid while that child is
    writing a transaction, finds the file's last transaction incomplete
    and fails ("Can't find last transaction", or an AttributeError for a
    method ZODB misspells); opened again with commits held, it sees only
    whole transactions.  A thread that holds the commit lock itself is
    never in the middle of writing, so the first attempt succeeds there.
    """
    try:
        return part.storage.iterator(start, stop)
    except Exception:
        if start is None:
            raise
    with storage._coordinator.commits_held():
        return part.storage.iterator(start, stop)


def _extension_bytes(txn):
    """A child's transaction record's pickled extension."""
    extension = getattr(txn, 'extension_bytes', None)
    if extension is None:
        extension = txn.extension
        extension = dumps(extension, 3) if extension else b''
    return extension


def _find_own(storage, index, token):
    """The first own record at or after ``(index, token)``.

    Returns ``(index, token_used, record, token_after)`` or ``None``.
    """
    parts = storage.partitions
    while index < len(parts):
        part = parts[index]
        child = part.storage
        ordered = part.child.iterates_by_oid
        if token is None and ordered:
            token = bytes((part.prefix,)) + b'\0' * 7
        while True:
            try:
                record = child.record_iternext(token)
            except POSKeyError as e:
                # FileStorage raises for an oid whose creation was undone;
                # step past that oid, not past the rest of the partition.
                oid = e.args[0] if e.args else None
                if ordered and isinstance(oid, bytes) and len(oid) == 8:
                    token = p64(u64(oid) + 1)
                    continue
                break
            except (ValueError, KeyError, IndexError, StopIteration):
                # no (more) records; RelStorage raises StopIteration for
                # a child with none at all (never written)
                break
            oid, tid, data, after = record
            if ordered and oid[0] > part.prefix:
                break
            # data None: a deleted object, as RelStorage keeping history
            # returns it (FileStorage raises POSKeyError, above)
            if data is not None and not is_internal(oid, part.prefix):
                return index, token, record, after
            if after is None:
                break
            token = after
        index += 1
        token = None
    return None


def record_iternext(storage, next=None):
    """IStorageCurrentRecordIteration over every partition's own records,
    each as of the last tid every participant has finished."""
    index, token = next if next is not None else (0, None)
    while True:
        found = _find_own(storage, index, token)
        if found is None:
            raise ValueError('no more records')
        index, _, (oid, tid, data, after) = found[:3]
        part = storage.partitions[index]
        if tid > storage.visible_tid() or storage.overlay_of(oid):
            # a transaction that is finishing, or that this composite
            # does not see: its state before, or no such object yet;
            # an overlaid object: both parts, merged
            r = storage.loadBefore(oid, storage.visible_limit())
            record = None if r is None else (r[0], r[1])
        else:
            record = storage.from_child(part, data), tid
        if after is None:
            following = _find_own(storage, index + 1, None)
        else:
            following = _find_own(storage, index, after)
        nxt = None if following is None else following[:2]
        if record is not None:
            return oid, record[1], record[0], nxt
        if nxt is None:
            raise ValueError('no more records')
        index, token = nxt


# --- undo -----------------------------------------------------------------------

def tid_of(transaction_id):
    """The tid behind an undo id (FileStorage uses base64)."""
    if isinstance(transaction_id, str):
        transaction_id = transaction_id.encode('ascii')
    if len(transaction_id) == 8:
        return transaction_id
    return base64.decodebytes(transaction_id + b'\n')


def _touched(storage, part, tid):
    """Whether ``part``'s child holds visible records of transaction tid."""
    it = part.storage.iterator(tid, tid)
    try:
        overlay = storage.overlay_parts.get(part.prefix)
        for txn in it:
            if txn.tid == tid:
                return any(not is_internal(r.oid, part.prefix) or
                           overlay is not None and overlay.shows(r.oid, r.data)
                           for r in txn)
        return False
    finally:
        close = getattr(it, 'close', None)
        if close is not None:
            close()


def undo(storage, transaction_id, transaction):
    """Undo a composite transaction in every partition it touched.

    A child's undo may remove internal records its transaction created (a
    stub, a partition map), while later records still use them; those are
    written again, unchanged, in the same transaction.
    """
    coordinator = storage._coordinator
    state = coordinator.current(transaction)
    tid = tid_of(transaction_id)
    oids = []
    for part in storage.partitions:
        if not _touched(storage, part, tid):
            continue
        txn = coordinator.begin(state, part)
        oids.extend(part.child.undo(transaction_id, txn,
                                    _internal(storage, part, tid)))
    return state.tid, oids


def _internal(storage, part, tid):
    """``internal(oid)``: whether the record at ``oid`` in ``part``'s
    child is internal (an overlay's revision is the user's)."""
    overlay = storage.overlay_parts.get(part.prefix)

    def internal(oid):
        if overlay is not None and overlay.is_revision(oid, tid):
            return False
        return is_internal(oid, part.prefix)
    return internal


def _visible(storage, filter):
    """An undoLog filter that also leaves out internal child transactions,
    and those the composite does not see yet."""
    visible_tid = storage.visible_tid()

    def visible(entry):
        if is_internal_transaction(entry):
            return False
        if tid_of(entry['id']) > visible_tid:
            return False
        return filter is None or filter(entry)
    return visible


def undo_log(storage, first=0, last=-20, filter=None):
    if last < 0:
        last = first - last
    entries = {}
    for part in storage.partitions:
        for entry in part.storage.undoLog(0, last, _visible(storage, filter)):
            entries.setdefault(entry['id'], entry)
    merged = sorted(entries.values(), key=lambda e: tid_of(e['id']),
                    reverse=True)
    return merged[first:last]


def undo_info(storage, first=0, last=-20, specification=None):
    if specification:
        spec = list(specification.items())

        def filter(desc):
            return all(desc.get(k) == v for k, v in spec)
    else:
        filter = None
    return undo_log(storage, first, last, filter)


def last_invalidations(storage, count):
    """The last ``count`` transactions' ``(tid, oids)``, oldest first.

    A ZEO server fills its invalidation queue from this when it starts, so
    clients that were up to date before a restart keep their caches.  The
    tids come from the children's undo logs, read backwards; children
    without one are iterated.
    """
    tids = set()
    for part in storage.partitions:
        child = part.storage
        if getattr(child, 'supportsUndo', lambda: False)():
            entries = child.undoLog(0, count, _visible(storage, None))
            tids.update(tid_of(e['id']) for e in entries)
        else:
            it = child.iterator(None, storage.visible_tid())
            try:
                tids.update(t.tid for t in it
                            if not is_internal_transaction(t.extension))
            finally:
                getattr(it, 'close', lambda: None)()
    result = []
    for tid in sorted(tids)[-count:] if count > 0 else ():
        it = CompositeIterator(storage, tid, tid)
        try:
            for txn in it:
                result.append((txn.tid, [r.oid for r in txn]))
        finally:
            it.close()
    return result


def copy_transactions(source, destination):
    """``copyTransactionsFrom``: blobs included when the destination has
    them and the source can give them.

    As with FileStorage, the source need not declare IBlobStorage: it only
    has to answer ``loadBlob``, which is asked for blob records alone.  A
    wrapper that forwards attributes but declares only IStorageIteration,
    as zodbconvert's ``--incremental`` wraps its source, would otherwise
    have its blob records copied without their blob files.
    """
    if IBlobStorage.providedBy(destination) and (
            IBlobStorage.providedBy(source)
            or getattr(source, 'loadBlob', None) is not None):
        from ZODB.blob import copyTransactionsFromTo
        copyTransactionsFromTo(source, destination)
    else:
        base_copy(source, destination)


__all__ = ['CompositeIterator', 'record_iternext', 'undo', 'undo_log',
           'undo_info', 'last_invalidations', 'copy_transactions']
