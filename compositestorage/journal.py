"""The commit journal: the one durability point of a transaction that
touches more than one partition.

Before the first child of such a transaction finishes, the coordinator
writes an *intent* (the tid and the prefixes of every participant) and
fsyncs it.  After every participant has finished, it clears the journal
(no fsync: an intent left behind by a crash after that point describes a
transaction that every participant has, which recovery recognises).  A
transaction that touches one partition never writes here.

The file holds at most one intent, because the coordinator commits one
transaction at a time.  An intent is a fixed header, the tid, the
prefixes and a CRC, written in place; a torn, cleared or empty file holds
no intent (a torn intent was being written, so no participant had begun to
finish).

See ``docs/commit-protocol.rst`` for the protocol and the recovery rules.
"""
import os
import struct
import time
import zlib

import zc.lockfile
from ZODB.utils import z64

from compositestorage.errors import CompositeStorageError
from compositestorage.errors import JournalError
from compositestorage.errors import WriterLockedError

MAGIC = b'CSJ1'
_HEAD = struct.Struct('>4s8sB')
#: Where the tid of the last transaction over several partitions that
#: finished everywhere is kept (written when the intent is cleared).
FINISHED_AT = 256
FINISHED_MAGIC = b'CSJF'
#: Where the pack time of the last pack is kept (synced before its sweep):
#: a pack may drop a child's part of a transaction before it, so checks of
#: spans stop there.
PACKED_AT = 384
PACKED_MAGIC = b'CSJP'


class Intent:
    """A multi-partition transaction that had begun to finish."""

    def __init__(self, tid, prefixes):
        self.tid = tid
        self.prefixes = tuple(sorted(prefixes))

    def __eq__(self, other):
        return (isinstance(other, Intent) and self.tid == other.tid
                and self.prefixes == other.prefixes)

    def __repr__(self):
        return '<Intent tid=%s partitions=%s>' % (
            self.tid.hex(), ','.join(str(p) for p in self.prefixes))


def encode(intent):
    body = _HEAD.pack(MAGIC, intent.tid, len(intent.prefixes)) + bytes(
        intent.prefixes)
    return body + struct.pack('>I', zlib.crc32(body))


def decode(data):
    """The intent ``data`` holds, or ``None`` for an empty or torn file."""
    if len(data) < _HEAD.size + 4:
        return None
    magic, tid, count = _HEAD.unpack_from(data)
    end = _HEAD.size + count
    if magic != MAGIC or len(data) < end + 4:
        return None
    (crc,) = struct.unpack_from('>I', data, end)
    if crc != zlib.crc32(data[:end]):
        return None
    return Intent(tid, data[_HEAD.size:end])


#: The journal file's fixed size.  An intent is written in place at offset
#: 0 and cleared by zeroing its magic, so the file never changes size and
#: ``fdatasync`` has no metadata to flush.
SLOT = 512


class Journal:
    """The journal file at ``path``."""

    def __init__(self, path):
        self.path = path
        self._fd = None

    def read(self):
        try:
            with open(self.path, 'rb') as f:
                return decode(f.read(SLOT))
        except FileNotFoundError:
            return None

    def open(self):
        """The file, created at its fixed size (durably) the first time.

        A writer opens it when the composite opens, so that a full disk or
        a process out of file descriptors is an error then, not in the
        middle of a commit.  Its blocks are allocated, not left as a hole,
        so writing an intent in place needs no new space.
        """
        if self._fd is None:
            new = not os.path.exists(self.path)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                st = os.fstat(fd)
                if st.st_size < SLOT or st.st_blocks * 512 < SLOT:
                    os.posix_fallocate(fd, 0, SLOT)
                    os.fsync(fd)
                if new:
                    self._fsync_directory()
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        return self._fd

    def write_intent(self, intent, durable=True):
        """Write ``intent`` before any participant finishes; make it
        durable unless the first participant's own record of the
        transaction names them all (``durable`` false: see "One sync
        fewer" in docs/commit-protocol.rst).

        On failure the file is closed, to be opened afresh next time."""
        try:
            fd = self.open()
            os.pwrite(fd, encode(intent), 0)
            if durable:
                os.fdatasync(fd)
        except BaseException:
            self.close()
            raise

    def clear(self, finished=None):
        """Forget the intent, and note ``finished`` as the last transaction
        over several partitions that every participant finished.  Not
        synced: see the module docstring."""
        fd = self.open()
        os.pwrite(fd, b'\0' * len(MAGIC), 0)
        if finished is not None:
            record = FINISHED_MAGIC + finished
            os.pwrite(fd, record + struct.pack('>I', zlib.crc32(record)),
                      FINISHED_AT)

    def note_pack(self, tid):
        """Make ``tid``, a pack's time, durable before the pack sweeps any
        child; it only ever moves forward."""
        if tid <= self.packed_to():
            return
        fd = self.open()
        record = PACKED_MAGIC + tid
        os.pwrite(fd, record + struct.pack('>I', zlib.crc32(record)),
                  PACKED_AT)
        os.fdatasync(fd)

    def packed_to(self):
        """The time of the last pack noted, as a tid (``z64``: none)."""
        try:
            with open(self.path, 'rb') as f:
                f.seek(PACKED_AT)
                record = f.read(len(PACKED_MAGIC) + 12)
        except FileNotFoundError:
            return z64
        if len(record) < len(PACKED_MAGIC) + 12 or \
                not record.startswith(PACKED_MAGIC):
            return z64
        (crc,) = struct.unpack('>I', record[-4:])
        if crc != zlib.crc32(record[:-4]):
            return z64
        return record[len(PACKED_MAGIC):-4]

    def snapshot(self):
        """The journal's bytes: a reader compares two snapshots to learn
        whether a transaction over several partitions began or finished in
        between."""
        try:
            with open(self.path, 'rb') as f:
                return f.read(SLOT)
        except FileNotFoundError:
            return b''

    def clear_durably(self):
        """Forget the intent for good (recovery, before it reports done)."""
        fd = self.open()
        os.pwrite(fd, b'\0' * len(MAGIC), 0)
        os.fdatasync(fd)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _fsync_directory(self):
        directory = os.path.dirname(os.path.abspath(self.path))
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def open_journal(path, partitions):
    """The journal at ``path``, or beside the file of the first FileStorage
    child in prefix order (the primary's, when it is one); ``None`` when
    there is neither.  A read-only composite finds the writer's journal by
    the same rule."""
    if path is None:
        for part in partitions:
            file_name = part.child.file_name
            if file_name:
                path = file_name + '.journal'
                break
        else:
            return None
    return Journal(path)


class _WriterLock(zc.lockfile.LockFile):
    """zc.lockfile's lock file, let go when its pid cannot be written (a
    full disk): zc.lockfile would keep the lock in a file object it drops."""

    def _on_lock(self):
        try:
            super()._on_lock()
            self._fp.flush()
        except OSError:
            self.close()
            raise


def lock_writer(journal):
    """The lock that makes this process the one writer of the partitions."""
    path = journal.path + '.lock'
    try:
        return _WriterLock(path)
    except zc.lockfile.LockError:
        raise WriterLockedError(
            'another process is writing to these partitions (it holds %s); '
            'stop it, or open this composite read-only' % path)
    except OSError as e:
        raise JournalError(
            'could not take the writer lock %s (%s); nothing was written: '
            'free disk space or file descriptors (ulimit -n), and open the '
            'storage again' % (path, e)) from e


#: How often a read-only composite opens its children before giving up on
#: a writer that keeps committing across partitions meanwhile.
READ_ONLY_ATTEMPTS = 20


def open_children_consistently(open_children, close_children, journal_path):
    """Open a read-only composite's children so that they show one state.

    The children are opened one after the other; a writer that commits
    across partitions in between would show in some and not in others.
    Every such commit changes the journal (an intent before any child
    finishes, the finished tid after the last), so the journal is read
    before and after ``open_children()``, which is called again until the
    two agree.  ``close_children(opened)`` closes a spoiled attempt.

    Returns ``(opened, seen)``: ``seen`` is the journal as it was while
    the children opened (``None`` without a journal).  The composite must
    decide what to hide from ``seen``, not from a later read: a
    transaction that was being finished then may have finished since, in
    the children opened after it finished but not in those opened before.
    """
    journal = Journal(journal_path) if journal_path else None
    for attempt in range(READ_ONLY_ATTEMPTS):
        before = journal.snapshot() if journal else None
        opened = open_children()
        if journal is None:
            return opened, None
        if journal.snapshot() == before:
            return opened, before
        close_children(opened)
        time.sleep(0.01 * (attempt + 1))
    raise CompositeStorageError(
        'the writer committed across partitions each of the %d times this '
        'read-only composite opened its children; try again when it is '
        'less busy' % READ_ONLY_ATTEMPTS)
