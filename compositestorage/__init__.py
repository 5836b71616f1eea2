"""compositestorage: one ZODB storage made of several child storages.

Each object lives in one partition, chosen when its oid is allocated; the
oid's first byte is its partition's prefix.  References that cross
partitions go through stub records, so every child stays a valid ZODB on
its own while ZODB sees one database with one root.
"""
from compositestorage.errors import CompositeStorageError
from compositestorage.errors import ConfigurationError
from compositestorage.errors import CorruptStubError
from compositestorage.errors import KeyedError
from compositestorage.errors import PartitionFullError
from compositestorage.errors import PartitionMapError
from compositestorage.errors import ReadOnlyPartitionError
from compositestorage.errors import UnknownPartitionError
from compositestorage.namespaces import keyed
from compositestorage.partition import Partition
from compositestorage.placement import containment
from compositestorage.placement import placement
from compositestorage.storage import CompositeStorage
from compositestorage.stubs import PartitionStub

__all__ = [
    'CompositeStorage', 'Partition', 'PartitionStub', 'placement',
    'containment', 'keyed', 'CompositeStorageError', 'ConfigurationError',
    'CorruptStubError', 'KeyedError', 'PartitionFullError',
    'PartitionMapError',
    'ReadOnlyPartitionError', 'UnknownPartitionError',
]
