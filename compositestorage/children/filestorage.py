"""The adapter for FileStorage children (and a BlobStorage over one).

Everything the composite reads of a FileStorage beyond the storage API
is here: its index (``fsIndex``) for oids and counts, its file for the
transactions it holds and the partitions each spans, cutting the file
back to take a transaction back, and its packer, whose GC is given the
composite's global mark.
"""
import os

from ZODB.FileStorage import FileIterator
from ZODB.FileStorage import FileStorage
from ZODB.FileStorage import fspack
from ZODB.FileStorage.FileStorage import read_index
from ZODB.FileStorage.format import TRANS_HDR_LEN
from ZODB.FileStorage.format import TxnHeaderFromString
from ZODB.POSException import POSKeyError
from ZODB.TimeStamp import TimeStamp
from ZODB.serialize import referencesf
from ZODB.utils import p64
from ZODB.utils import u64
from ZODB.utils import z64

from compositestorage.children.generic import Child
from compositestorage.errors import RecoveryError

#: The magic a FileStorage file begins with, before its first transaction.
FILE_HEADER_LEN = 4


def handles(base):
    return isinstance(base, FileStorage)


def adapter(storage, base):
    return FileStorageChild(storage, base)


def _bucket_range(lo, hi):
    """fsIndex keeps a bucket of 2-byte suffixes per 6-byte prefix."""
    return lo[:6], hi[:6]


class FileStorageChild(Child):

    kind = 'FileStorage'
    rolls_back = True
    records_spans = True
    reads_spans = True
    iterates_by_oid = True
    skips_deleted = True
    collects_garbage = True
    counts_cheaply = True

    @property
    def file_name(self):
        return self.base._file_name

    def opened_file_stat(self):
        """``os.fstat`` of the file the child has open."""
        return os.fstat(self.base._file.fileno())

    # --- oids -------------------------------------------------------------

    def oids_in(self, lo, hi):
        index = self.base._index
        blo, bhi = _bucket_range(lo, hi)
        return (head + tail
                for head, bucket in index._data.items(blo, bhi)
                for tail in bucket.keys()
                if lo <= head + tail <= hi)

    def max_oid(self, lo, hi):
        try:
            oid = self.base._index.maxKey(hi)
        except ValueError:
            return None
        return oid if oid >= lo else None

    def min_oid(self, lo, hi):
        try:
            oid = self.base._index.minKey(lo)
        except ValueError:
            return None
        return oid if oid <= hi else None

    def count_in(self, lo, hi):
        index = self.base._index
        blo, bhi = _bucket_range(lo, hi)
        if lo[6:] == b'\0\0' and hi[6:] == b'\xff\xff':
            return sum(len(tree) for tree in index._data.values(blo, bhi))
        return sum(1 for _ in self.oids_in(lo, hi))

    def count_outside(self, lo, hi):
        # only whole prefix ranges are asked for: count by bucket
        return sum(len(bucket) for key, bucket in self.base._index._data.items()
                   if not lo[:6] <= key <= hi[:6])

    def prefixes_held(self):
        return {key[0] for key in self.base._index._data.keys()}

    def current_serial(self, oid):
        # One index lookup, deleted records included, no exceptions.
        base = self.base
        with base._lock:
            pos = base._index.get(oid)
            return base._read_data_header(pos, oid).tid if pos else None

    def appended_serial(self, oid):
        """Only a FileStorage opened read-only can be written by another
        process (a writable one holds its lock), and it reads only what its
        index covered when it opened.  Only the appended tail is read.  A
        file another process has packed (replaced) since cannot be checked,
        and counts as changed."""
        base = self.base
        if not base.isReadOnly():
            return None
        try:
            on_disk = os.stat(base._file_name)
        except OSError:
            return None
        if on_disk.st_ino != os.fstat(base._file.fileno()).st_ino:
            return base._ltid       # a tid newer than ours is unknowable
        if on_disk.st_size <= base._pos:
            return None
        found = None
        tail = FileIterator(base._file_name, pos=base._pos)
        try:
            for txn in tail:
                if any(r.oid == oid for r in txn):
                    found = txn.tid
        finally:
            tail.close()
        return found

    # --- transactions -----------------------------------------------------

    def last_finished(self):
        """Read from the file, not ``lastTransaction()``: a FileStorage that
        cut off a transaction it never finished, or that was opened
        read-only while its writer was between vote and finish, reports
        that transaction's tid."""
        fs = self.base
        with fs._lock:
            return last_tid_before(fs._file, fs._pos, fs._file_name)

    def has_transaction(self, tid):
        last = self.last_finished()
        if last <= tid:
            return last == tid
        fs = self.base
        with fs._lock:
            _, tids = transactions_after(fs._file, fs._pos, p64(u64(tid) - 1),
                                         fs._file_name)
        return bool(tids) and tids[0] == tid

    def recent_transactions(self, floor, depth):
        fs = self.base
        result = []
        with fs._lock:
            f, pos = fs._file, fs._pos
            while pos > FILE_HEADER_LEN and len(result) < depth:
                start, tid = transaction_before(f, pos, fs._file_name)
                if tid <= floor:
                    break
                f.seek(start)
                header = TxnHeaderFromString(f.read(TRANS_HDR_LEN))
                f.seek(start + TRANS_HDR_LEN + header.ulen + header.dlen)
                extension = f.read(header.elen)
                # a transaction a pack rewrote may have lost parts
                result.append((tid, b'' if header.status == 'p'
                               else extension))
                pos = start
        return result

    def record_participants(self, extension):
        # FileStorage took the metadata at tpc_begin and writes it at vote
        fs = self.base
        if fs._ude is not None:
            user, description, _ = fs._ude
            fs._ude = (user, description, extension)

    def roll_back(self, tid, name):
        fs = self.base
        with fs._lock:
            last = self.last_finished()
            if last != tid:
                raise RecoveryError(
                    'partition file %s: its last transaction is %s, not %s; '
                    'it cannot be rolled back' % (
                        fs._file_name, last.hex(), tid.hex()))
            # tids only grow along the file: this removes ``tid`` alone
            cut_filestorage(fs, p64(u64(tid) - 1))

    # --- pack ---------------------------------------------------------------

    def reader(self, limit):
        return _FileReader(self.base, limit)

    def sweep(self, t, verdict, name):
        """FileStorage's own packer, whose GC takes the verdict as its
        reachable set instead of walking the child again (the walk would
        find the same records and cost as much as the mark).  It removes
        the rest, unreferenced stubs included, and their blobs."""
        child, base = self.storage, self.base
        missing = object()
        previous = base.__dict__.get('packer', missing)
        base.packer = _marked_packer(verdict)
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


class _FileReader:
    """A FileStorage child read as its ``loadBefore`` reads, with its own
    index and record readers, from a file of the mark's own: the mark reads
    every reachable object once, and ``loadBefore``'s file pool, context
    managers and tuple cost a third of the mark."""

    def __init__(self, base, limit):
        self._base = base
        self._file = open(base._file_name, 'rb')
        self._limit = limit

    def __call__(self, oid):
        base = self._base
        f = self._file
        pos = base._index.get(oid)
        while pos:
            h = base._read_data_header(pos, oid, f)
            if h.tid < self._limit:
                if h.plen:
                    return f.read(h.plen)
                if h.back:
                    try:
                        return base._loadBack_impl(oid, h.back, _file=f)[0]
                    except POSKeyError:
                        return None     # an undone creation
                return None             # deleted
            pos = h.prev
        return None

    def close(self):
        self._file.close()


class _MarkedGC(fspack.GC):
    """FileStorage's GC, taking the composite's mark as its reachable set.

    Its first walk (from the root, at the pack time) is replaced by the
    verdict; later walks, from revisions that records after the pack time
    point back to, run as FileStorage runs them.
    """

    verdict = None

    def findReachableAtPacktime(self, roots):
        verdict, self.verdict = self.verdict, None
        if verdict is None:
            return fspack.GC.findReachableAtPacktime(self, roots)
        reachable = self.reachable
        current = self.oid2curpos
        for key in verdict:
            oid = key.to_bytes(8, 'big')
            pos = current.get(oid)
            if pos is not None:
                reachable[oid] = pos


def _marked_packer(verdict):
    def packer(storage, referencesf, stop, gc):
        p = fspack.FileStoragePacker(storage, referencesf, stop, gc)
        try:
            p.gc.__class__ = _MarkedGC
            p.gc.verdict = verdict
            opos = p.pack()
            if opos is None:
                return None
            return opos, p.index
        finally:
            p.close()
    return packer


# --- cutting a FileStorage back (shared with compositestorage.backup) ---------

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
