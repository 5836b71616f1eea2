"""The adapter for MappingStorage children: its dict of revisions and its
BTree of transactions, in memory."""
from ZODB.MappingStorage import MappingStorage
from ZODB.utils import z64

from compositestorage.children.generic import Child
from compositestorage.errors import RecoveryError


def handles(base):
    return isinstance(base, MappingStorage)


def adapter(storage, base):
    return MappingChild(storage, base)


class MappingChild(Child):

    kind = 'MappingStorage'
    rolls_back = True
    counts_cheaply = True
    #: its record_iternext raises POSKeyError for a deleted object too
    skips_deleted = True

    def oids_in(self, lo, hi):
        return [oid for oid in list(self.base._data) if lo <= oid <= hi]

    def min_oid(self, lo, hi):
        return min(self.oids_in(lo, hi), default=None)

    def count_outside(self, lo, hi):
        return sum(1 for oid in list(self.base._data)
                   if not lo <= oid <= hi)

    def prefixes_held(self):
        return {oid[0] for oid in list(self.base._data)}

    def last_finished(self):
        transactions = self.base._transactions
        return transactions.maxKey() if transactions else z64

    def has_transaction(self, tid):
        last = self.last_finished()
        if last <= tid:
            return last == tid
        return tid in self.base._transactions

    def record_participants(self, extension):
        """A MappingStorage reads the metadata when it finishes: nothing
        to do (the composite's copy was changed)."""

    def roll_back(self, tid, name):
        storage = self.base
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
            del transactions[tid]   # _ltid stays: later tids stay above
