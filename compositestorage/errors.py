"""Errors that name the partition, the oid in hex and what to do.

Each one subclasses the ZODB exception that ZODB code already handles, so a
composite fails the way a plain storage would, only more helpfully.
"""
from ZODB.POSException import POSKeyError
from ZODB.POSException import ReadOnlyError
from ZODB.POSException import StorageError
from ZODB.POSException import StorageTransactionError


def oid_hex(oid):
    return '0x%s' % oid.hex()


class CompositeStorageError(StorageError):
    """Base class for the errors this package raises itself."""


class ConfigurationError(CompositeStorageError, ValueError):
    """The configured partitions cannot be opened as one composite."""


class PartitionMapError(ConfigurationError):
    """A child records a partition map that disagrees with the config."""


class UnknownPartitionError(POSKeyError):
    """An oid whose first byte is the prefix of no configured partition."""

    def __init__(self, oid, partitions, what='load'):
        POSKeyError.__init__(self, oid)
        self.oid = oid
        self.partitions = partitions
        self.what = what

    def __str__(self):
        known = ', '.join('%s=%d' % (p.name, p.prefix)
                          for p in self.partitions)
        oid = self.oid
        if not isinstance(oid, bytes) or len(oid) != 8:
            # load(b''), load(None): not an oid at all, so no prefix
            return ('cannot %s %r: an oid is 8 bytes, and its first byte '
                    'is the prefix of its partition (configured: %s); '
                    'check where the value came from' % (self.what, oid,
                                                          known))
        return ('cannot %s oid %s: no partition has prefix %d '
                '(configured: %s); add a partition with that prefix '
                'or check where the oid came from'
                % (self.what, oid_hex(oid), oid[0], known))


class ReadOnlyPartitionError(ReadOnlyError):
    """A write to a partition whose child is read-only."""

    def __init__(self, partition, prefix, oid=None):
        ReadOnlyError.__init__(self, partition, oid)
        self.partition = partition
        self.prefix = prefix
        self.oid = oid

    def __str__(self):
        what = 'oid %s' % oid_hex(self.oid) if self.oid else 'a transaction'
        return ('partition %r (prefix %d) is read-only: cannot write %s; '
                'nothing was written. Open the partition read-write or '
                'place the object elsewhere'
                % (self.partition, self.prefix, what))


class PartitionFullError(CompositeStorageError):
    """A partition has allocated every oid its prefix allows."""

    def __init__(self, name, prefix):
        CompositeStorageError.__init__(self, name, prefix)
        self.name = name
        self.prefix = prefix

    def __str__(self):
        return ('partition %r (prefix %d) has run out of oids: its range '
                '0x%02x00000000000001..0x%02x7fffffffffffff is used up (the '
                'rest is kept for keyed objects); place new objects in '
                'another partition'
                % (self.name, self.prefix, self.prefix, self.prefix))


class KeyedError(CompositeStorageError, ValueError):
    """A key or a keyed namespace that cannot be used (see
    :mod:`compositestorage.namespaces`)."""


class CorruptRecordError(CompositeStorageError):
    """A record that the composite cannot parse."""


class CorruptStubError(CompositeStorageError):
    """A child holds something other than a valid stub where one belongs."""

    def __init__(self, partition, oid, reason):
        CompositeStorageError.__init__(self, partition, oid, reason)
        self.partition = partition
        self.oid = oid
        self.reason = reason

    def __str__(self):
        return ('corrupt stub at oid %s in partition %r: %s; run '
                '"compositestorage verify" and "compositestorage repair"'
                % (oid_hex(self.oid), self.partition, self.reason))


class ForeignRecordError(CompositeStorageError):
    """A child holds a home record whose oid belongs to no partition."""


class RecoveryError(CompositeStorageError):
    """A half-finished transaction cannot be completed or removed."""


class JournalError(CompositeStorageError):
    """The commit journal could not be written; nothing was committed."""


class WriterLockedError(CompositeStorageError):
    """Another coordinator is writing to these partitions."""


class WritesRefusedError(CompositeStorageError):
    """The storage refuses writes until it is reopened and recovered."""


class NotAtomicError(CompositeStorageError, StorageTransactionError):
    """A transaction would span two or more partitions whose children
    cannot take a finished transaction back, so no order of finishing
    keeps it all or nothing (see "What holds for each child kind" in
    docs/commit-protocol.rst)."""


class CommitLockTimeout(CompositeStorageError):
    """A lock of a shared composite was not granted in time: another
    process holds it (see compositestorage.shared)."""
