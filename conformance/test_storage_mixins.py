"""ZODB's own storage conformance mixins, run on three storages.

The same mixins run against plain FileStorage (the reference count) and a
composite of three FileStorage partitions, once with ``placement
round-robin`` (every object in the next partition, so every reference
crosses) and once with ``placement default``.  Skips are listed, with
their reasons, in conformance/README.rst.
"""
import unittest

from ZODB.tests import BasicStorage
from ZODB.tests import ConflictResolution
from ZODB.tests import HistoryStorage
from ZODB.tests import IteratorStorage
from ZODB.tests import MTStorage
from ZODB.tests import PackableStorage
from ZODB.tests import PersistentStorage
from ZODB.tests import ReadOnlyStorage
from ZODB.tests import RecoveryStorage
from ZODB.tests import RevisionStorage
from ZODB.tests import StorageTestBase
from ZODB.tests import Synchronization
from ZODB.tests import TransactionalUndoStorage
from ZODB.tests import testMVCCMappingStorage

from conformance.harness import STORAGES
from conformance.harness import mapping_composite


class _Storage(
    StorageTestBase.StorageTestBase,
    BasicStorage.BasicStorage,
    TransactionalUndoStorage.TransactionalUndoStorage,
    RevisionStorage.RevisionStorage,
    PackableStorage.PackableStorageWithOptionalGC,
    PackableStorage.PackableUndoStorage,
    Synchronization.SynchronizedStorage,
    ConflictResolution.ConflictResolvingStorage,
    ConflictResolution.ConflictResolvingTransUndoStorage,
    HistoryStorage.HistoryStorage,
    IteratorStorage.IteratorStorage,
    IteratorStorage.ExtendedIteratorStorage,
    PersistentStorage.PersistentStorage,
    MTStorage.MTStorage,
    ReadOnlyStorage.ReadOnlyStorage,
    testMVCCMappingStorage.MVCCTests,
):
    __test__ = False
    factory = None
    use_extension_bytes = True

    def open(self, **kwargs):
        self._storage = self.factory('Data', **kwargs)

    def setUp(self):
        StorageTestBase.StorageTestBase.setUp(self)
        self.open(create=1)


class _Recovery(StorageTestBase.StorageTestBase,
                RecoveryStorage.RecoveryStorage):
    __test__ = False
    source = dest = None

    def setUp(self):
        StorageTestBase.StorageTestBase.setUp(self)
        self._storage = self.source('Source')
        self._dst = self.dest('Dest')

    def tearDown(self):
        self._dst.close()
        StorageTestBase.StorageTestBase.tearDown(self)

    def new_dest(self):
        return self.dest('Dest2')


def _make(base, name, **attrs):
    attrs = {k: staticmethod(v) for k, v in attrs.items()}
    attrs['__test__'] = True
    return type(name, (base, unittest.TestCase), attrs)


TestFileStorage = _make(_Storage, 'TestFileStorage',
                        factory=STORAGES['FileStorage'])
TestCompositeRoundRobin = _make(_Storage, 'TestCompositeRoundRobin',
                                factory=STORAGES['CompositeRoundRobin'])
TestCompositeDefault = _make(_Storage, 'TestCompositeDefault',
                             factory=STORAGES['CompositeDefault'])

TestRecoveryFileStorage = _make(
    _Recovery, 'TestRecoveryFileStorage',
    source=STORAGES['FileStorage'], dest=STORAGES['FileStorage'])
TestRecoveryCompositeRoundRobin = _make(
    _Recovery, 'TestRecoveryCompositeRoundRobin',
    source=STORAGES['CompositeRoundRobin'],
    dest=STORAGES['CompositeRoundRobin'])
TestRecoveryCompositeDefault = _make(
    _Recovery, 'TestRecoveryCompositeDefault',
    source=STORAGES['CompositeDefault'], dest=STORAGES['CompositeDefault'])
TestRecoveryCompositeToFileStorage = _make(
    _Recovery, 'TestRecoveryCompositeToFileStorage',
    source=STORAGES['CompositeRoundRobin'], dest=STORAGES['FileStorage'])
TestRecoveryFileStorageToComposite = _make(
    _Recovery, 'TestRecoveryFileStorageToComposite',
    source=STORAGES['FileStorage'], dest=STORAGES['CompositeRoundRobin'])


class _MappingStorage(
    StorageTestBase.StorageTestBase,
    BasicStorage.BasicStorage,
    HistoryStorage.HistoryStorage,
    IteratorStorage.ExtendedIteratorStorage,
    IteratorStorage.IteratorStorage,
    MTStorage.MTStorage,
    RevisionStorage.RevisionStorage,
    Synchronization.SynchronizedStorage,
):
    """The basic suites, as ZODB's testMappingStorage runs them, on
    MappingStorage children.  (MappingStorage has no undo; its children
    pack without GC, see README.rst.)"""
    __test__ = False
    factory = None

    def setUp(self):
        StorageTestBase.StorageTestBase.setUp(self)
        self._storage = self.factory()

    def testOversizeNote(self):
        # MappingStorage has no metadata size limit (as in ZODB's own
        # MappingStorageTests).
        pass

    def testLoadBeforeUndo(self):
        pass  # MappingStorage does not support undo

    testUndoZombie = testLoadBeforeUndo


TestMappingStorage = _make(_MappingStorage, 'TestMappingStorage',
                           factory=lambda: __import__(
                               'ZODB.MappingStorage').MappingStorage
                           .MappingStorage())
# The composite hands on the extension bytes its children's iterators
# give it, so its iterator keeps them even over MappingStorage children.
TestCompositeMappingRoundRobin = _make(
    _MappingStorage, 'TestCompositeMappingRoundRobin',
    factory=lambda: mapping_composite(placement='round-robin'))
TestCompositeMappingRoundRobin.use_extension_bytes = True
TestCompositeMappingDefault = _make(
    _MappingStorage, 'TestCompositeMappingDefault',
    factory=lambda: mapping_composite(placement='default'))
TestCompositeMappingDefault.use_extension_bytes = True
