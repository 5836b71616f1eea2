"""Completing or removing a multi-partition transaction that did not finish.

The journal (see :mod:`compositestorage.journal`) holds the intent of the
one transaction that may have finished in some participants and not in
others.  Recovery compares it with the children:

* every participant has the tid: the transaction is complete (the process
  died after the last child finished, before the journal was cleared);
* no participant has it: nothing to do (the process died before the first
  child finished);
* some have it: the coordinator's ``tpc_finish`` never returned, so the
  transaction was never acknowledged, and it is rolled back in the
  participants that have it.

A child has the tid as its last transaction, because the coordinator is the
only writer and commits one transaction at a time.  Rolling a FileStorage
child back cuts its file at the start of that transaction, removes the
transaction's blobs and rebuilds the index (:func:`cut_filestorage`, which
``compositestorage.backup`` uses too, to cut a restored child back to the
tid of a backup).  Each step is idempotent, and
the journal is cleared (durably) only after all of them, so a crash during
recovery is recovered by the next one.

See ``docs/commit-protocol.rst``.
"""
import logging
import os

from ZODB.FileStorage import FileStorage
from ZODB.FileStorage.FileStorage import read_index
from ZODB.FileStorage.format import TRANS_HDR_LEN
from ZODB.FileStorage.format import TxnHeaderFromString
from ZODB.MappingStorage import MappingStorage
from ZODB.TimeStamp import TimeStamp
from ZODB.utils import p64
from ZODB.utils import u64
from ZODB.utils import z64

from compositestorage.errors import RecoveryError
from compositestorage.faults import point as fault_point

logger = logging.getLogger(__name__)

COMPLETE = 'complete'
ABSENT = 'absent'
ROLLED_BACK = 'rolled back'


class Outcome:
    """What recovery found and did for one intent."""

    def __init__(self, intent, participants, action, present, rolled_back,
                 dry_run=False):
        self.intent = intent
        self.participants = participants  # names, from the intent
        self.action = action
        self.present = present            # names of those that had it
        self.rolled_back = rolled_back    # names of those rolled back
        self.dry_run = dry_run

    def as_dict(self):
        return {'tid': self.intent.tid.hex(), 'action': self.action,
                'dry_run': self.dry_run,
                'partitions': list(self.participants),
                'present': list(self.present),
                'rolled_back': list(self.rolled_back)}

    def __str__(self):
        action = self.action
        if self.dry_run and action == ROLLED_BACK:
            action = 'to be rolled back'
        text = 'transaction %s over %s: %s' % (
            self.intent.tid.hex(), ', '.join(self.participants), action)
        if self.rolled_back:
            text += ' in ' + ', '.join(self.rolled_back)
        return text


def recover(partitions, journal, dry_run=False):
    """Resolve the journal's intent, if any; returns an :class:`Outcome`
    or ``None``.  ``partitions`` maps prefix to partition."""
    intent = journal.read()
    if intent is None:
        return None
    parts = []
    for prefix in intent.prefixes:
        part = partitions.get(prefix)
        if part is None:
            raise RecoveryError(
                'the journal %s names partition prefix %d for transaction '
                '%s, which is not configured; configure that partition '
                'again and reopen' % (journal.path, prefix, intent.tid.hex()))
        parts.append(part)
    present = [p for p in parts if has_transaction(p, intent.tid)]
    if len(present) == len(parts):
        action, rolled_back = COMPLETE, []
    elif not present:
        action, rolled_back = ABSENT, []
    else:
        action, rolled_back = ROLLED_BACK, [p.name for p in present]
    outcome = Outcome(intent, [p.name for p in parts], action,
                      [p.name for p in present], rolled_back, dry_run)
    if dry_run:
        return outcome
    if action == ROLLED_BACK:
        for part in present:
            roll_back(part, intent.tid)
            fault_point('rolled-back', part.name)
    journal.clear_durably()
    fault_point('recovered')
    log = logger.warning if action == ROLLED_BACK else logger.info
    log('recovered %s', outcome)
    return outcome


def last_finished(part):
    """The tid of the last transaction ``part``'s child finished.

    Not ``lastTransaction()`` for a FileStorage: one that cut off a
    transaction it never finished, or that was opened read-only while its
    writer was between vote and finish, reports that transaction's tid.
    """
    child = part.base
    if isinstance(child, FileStorage):
        return _last_transaction(child)
    if isinstance(child, MappingStorage):
        return (child._transactions.maxKey() if child._transactions
                else z64)
    return child.lastTransaction()


def has_transaction(part, tid):
    """Whether ``part``'s child holds ``tid`` (as its last transaction)."""
    last = last_finished(part)
    if last > tid:
        raise RecoveryError(
            'partition %r holds transaction %s, later than %s which the '
            'journal says was being committed: something else wrote to its '
            'child; restore it from a backup' % (
                part.name, last.hex(), tid.hex()))
    return last == tid


def roll_back(part, tid):
    """Remove transaction ``tid``, the last one, from ``part``'s child."""
    child = part.base
    if isinstance(child, FileStorage):
        _truncate(child, tid)
    elif isinstance(child, MappingStorage):
        _drop_mapping_transaction(child, tid)
    else:
        raise RecoveryError(
            'partition %r: cannot remove transaction %s from a %s child; '
            'only FileStorage and MappingStorage children can be rolled back'
            % (part.name, tid.hex(), type(child).__name__))
    logger.warning('partition %r: removed unfinished transaction %s',
                   part.name, tid.hex())


def _last_transaction(fs):
    """The tid of the last committed transaction of a FileStorage; ``z64``
    for an empty one."""
    with fs._lock:
        return last_tid_before(fs._file, fs._pos, fs._file_name)


def _truncate(fs, tid):
    with fs._lock:
        last = _last_transaction(fs)
        if last != tid:
            raise RecoveryError(
                'partition file %s: its last transaction is %s, not %s; '
                'it cannot be rolled back' % (
                    fs._file_name, last.hex(), tid.hex()))
        # tids only grow along the file: this removes ``tid`` alone
        cut_filestorage(fs, p64(u64(tid) - 1))


# --- cutting a FileStorage back (shared with compositestorage.backup) ---------

#: The magic a FileStorage file begins with, before its first transaction.
FILE_HEADER_LEN = 4


def transaction_before(f, end, name='FileStorage data'):
    """``(start, tid)`` of the transaction that ends at ``end`` in the
    FileStorage data ``f`` (a file-like object with ``seek`` and ``read``):
    each transaction repeats its length after itself, so the walk goes
    back without reading the data in between."""
    f.seek(end - 8)
    tlen = u64(f.read(8))
    start = end - 8 - tlen
    if start < FILE_HEADER_LEN:
        raise RecoveryError(
            '%s is damaged: the transaction that ends at %d claims %d bytes'
            % (name, end, tlen))
    f.seek(start)
    header = TxnHeaderFromString(f.read(TRANS_HDR_LEN))
    if header.tlen != tlen:
        raise RecoveryError(
            '%s is damaged: the transaction at %d does not end at %d'
            % (name, start, end))
    return start, header.tid


def last_tid_before(f, pos, name='FileStorage data'):
    """The tid of the transaction that ends at ``pos`` in the FileStorage
    data ``f``; ``z64`` at the file's start."""
    if pos <= FILE_HEADER_LEN:
        return z64
    return transaction_before(f, pos, name)[1]


def transactions_after(f, end, tid, name='FileStorage data'):
    """``(start, tids)``: where the first transaction with a tid greater
    than ``tid`` begins in the FileStorage data ``f`` that ends at ``end``
    (``end`` when there is none), and the tids of those transactions,
    oldest first.  Only their headers are read, from the end back."""
    tids = []
    pos = end
    while pos > FILE_HEADER_LEN:
        start, found = transaction_before(f, pos, name)
        if found <= tid:
            break
        tids.append(found)
        pos = start
    tids.reverse()
    return pos, tids


def cut_filestorage(fs, tid):
    """Cut the open, writable FileStorage ``fs`` back so that it holds only
    the transactions whose tid is at most ``tid``.

    The file is truncated where the first later transaction begins (and
    fsynced), the blob files those transactions added are removed, and the
    index is rebuilt from the file and saved over the old one.  Returns
    the tids removed, oldest first; none when there was nothing to do.
    Idempotent: a second call finds nothing to remove.
    """
    with fs._lock:
        f = fs._file
        start, removed = transactions_after(f, fs._pos, tid, fs._file_name)
        if not removed:
            return []
        blobs = _blob_files(fs, removed[0], removed[-1])
        f.truncate(start)
        f.flush()
        os.fsync(f.fileno())
        for path in blobs:
            if os.path.exists(path):
                os.remove(path)
        fs._clear_index()
        index, tindex = fs._newIndexes()
        fs._initIndex(index, tindex)
        fs._pos, fs._oid, last = read_index(
            f, fs._file_name, index, tindex, read_only=False)
        # As FileStorage does when it cuts off a transaction itself: later
        # tids stay above the ones taken back.
        fs._ltid = max(last, removed[-1])
        fs._ts = TimeStamp(fs._ltid)
        fs._save_index()
        return removed


def _blob_files(fs, first, last):
    """The blob files the transactions from ``first`` to ``last`` added."""
    if not getattr(fs, 'blob_dir', None):
        return []
    paths = []
    it = fs.iterator(first, last)
    try:
        for txn in it:
            for record in txn:
                paths.append(fs.fshelper.getBlobFilename(record.oid,
                                                         txn.tid))
    finally:
        it.close()
    return paths


def _drop_mapping_transaction(storage, tid):
    with storage._lock:
        transactions = storage._transactions
        if not transactions or transactions.maxKey() != tid:
            raise RecoveryError(
                'MappingStorage %s: its last transaction is not %s'
                % (storage.getName(), tid.hex()))
        for record in transactions[tid]:
            revisions = storage._data.get(record.oid)
            if revisions is not None and tid in revisions:
                del revisions[tid]
                if not revisions:
                    del storage._data[record.oid]
        del transactions[tid]       # _ltid stays: later tids stay above
