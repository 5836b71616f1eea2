"""ZODB's storage conformance mixins over RelStorage children.

The mixins RelStorage's own history-preserving tests combine
(``relstorage.tests.hptestbase.HistoryPreservingRelStorageTests`` and
``reltestbase.GenericRelStorageTests``: Basic, Packable, PackableUndo,
Synchronized, ConflictResolving, Persistent, MT, ReadOnly,
TransactionalUndo, Iterator, ExtendedIterator, Revision and History),
plus ConflictResolvingTransUndo, ZODB's MVCC tests and RecoveryStorage
(to and from FileStorage, as RelStorage's ``HistoryPreservingToFileStorage``
and ``...FromFileStorage``), run over:

* plain RelStorage (the reference), history-preserving, on SQLite and on
  PostgreSQL; these run only with ``COMPOSITE_CONFORMANCE_REFERENCE=1``,
  to keep CI short;
* a composite of three RelStorage partitions in round-robin placement
  (every reference crosses partitions), on the same engines.

The reference runs ZODB's threaded tests as RelStorage's own suite runs
them (an instance per client thread; the two BasicStorage tests that
share one storage between threads through a lock): a RelStorage instance
serves one thread.  The composite runs them as they are, since its
threads share it.

RelStorage alone fails a few of these tests; the composite may fail only
those.  They are listed in ``EXPECTED_TO_FAIL``, with the reason, and are
strict expected failures in the reference and the composite alike: a
composite that fails anything else, or a RelStorage that stops failing
one, turns the run red.  ``REFERENCE_ONLY_FAILS`` lists what plain
RelStorage fails and the composite passes.  conformance/README.rst gives
the counts.

The SQLite databases live in each test's temporary directory; the
PostgreSQL ones are created once per module and zapped by each test that
opens them, as RelStorage's own tests do.
"""
import os
import threading
import unittest

import pytest
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

from conformance.harness import POSTGRES
from conformance.harness import filestorage
from conformance.harness import relstorage
from conformance.harness import relstorage_composite

REFERENCE = os.environ.get('COMPOSITE_CONFORMANCE_REFERENCE') == '1'

_UNDO_COPIES = (
    'RelStorage keeps one row per oid and tid, and gives records in oid '
    'order: ')

#: What plain RelStorage fails on both engines, and why; strict expected
#: failures of the reference and the composite alike.  A name with a
#: class suffix ("FromFileStorage.") is the test in that class only.
RELSTORAGE_FAILS = {
    'testTransactionalUndoIterator':
        "RelStorage's iterator gives no data_txn for the records an undo "
        "copied; ZODB expects it to name the transaction whose state came "
        "back (RelStorage's own suite replaces the test: hptestbase."
        "checkTransactionalUndoIterator)",
    'testUndoConflictResolution':
        "RelStorage's undo resolves no conflicts: undoing a transaction "
        "whose objects changed since raises UndoError ('Some data were "
        "modified by a later transaction')",
    'testUndoMultipleConflictResolution':
        "the same: no conflict-resolving undo (RelStorage's suite skips "
        "it: 'conflict-resolving undo not supported')",
    'testUndoMultipleConflictResolutionReversed':
        "the same: no conflict-resolving undo",
    'FromFileStorage.testRestoreWithMultipleObjectsInUndoRedo':
        _UNDO_COPIES + 'the copy gives an undo transaction\'s two records '
        'in another order than the FileStorage it came from',
    'FromFileStorage.testRestoreWithMultipleUndoRedo':
        _UNDO_COPIES + 'a FileStorage transaction that undid two '
        'transactions at once holds two records of one oid, the copy one',
}

#: {engine: {test name: why}}: strict expected failures of the reference
#: and the composite on that engine
EXPECTED_TO_FAIL = {
    'sqlite': RELSTORAGE_FAILS,
    'postgresql': RELSTORAGE_FAILS,
}

#: {engine: {test name: why}}: what plain RelStorage alone fails, and the
#: composite passes; strict expected failures of the reference only
REFERENCE_ONLY_FAILS = {
    'sqlite': {},
    'postgresql': {
        'testPackUndoLog':
            "RelStorage on PostgreSQL takes its tids from the server's "
            "transaction clock, started before the test reads its pack "
            "time, so the second commit's tid falls before that time and "
            "the pack leaves no undo record (RelStorage's suite packs to "
            "its last tid instead: hptestbase.checkPackUndoLog); the "
            "composite chooses its tids itself, above the clock",
    },
}


@pytest.fixture(scope='module', autouse=True)
def _postgres_databases():
    """Drop the module's PostgreSQL databases when it is done."""
    yield
    POSTGRES.drop_all()


class _Storage(
    StorageTestBase.StorageTestBase,
    BasicStorage.BasicStorage,
    TransactionalUndoStorage.TransactionalUndoStorage,
    RevisionStorage.RevisionStorage,
    PackableStorage.PackableStorage,
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
    engine = factory = None
    use_extension_bytes = True

    def open(self, **kwargs):
        self._storage = self.factory(self.engine, 'Data', **kwargs)

    def setUp(self):
        StorageTestBase.StorageTestBase.setUp(self)
        self.open(create=True)


class _ClientThread(MTStorage.StorageClientThread):
    """A client thread with a RelStorage instance of its own, as
    RelStorage's suite runs MTStorage (``reltestbase.StorageClientThread``):
    one RelStorage instance serves one thread."""

    def __init__(self, storage, *args, **kwargs):
        super().__init__(storage.new_instance(), *args, **kwargs)

    def runtest(self):
        try:
            super().runtest()
        finally:
            self.storage.release()


class _ExtClientThread(_ClientThread, MTStorage.ExtStorageClientThread):
    pass


class _ThreadWrapper:
    """One RelStorage instance used by several threads in turn, as
    RelStorage's suite runs the two BasicStorage tests that share the
    storage between threads (``reltestbase.ThreadWrapper``): the commit
    lock is held from ``tpc_begin`` to ``tpc_finish``/``tpc_abort``, and
    reads wait for a commit's phases to end."""

    def __init__(self, storage):
        self._wrapped = storage
        # plain locks: the tests begin and finish in different threads
        self._commit = threading.Lock()
        self._read = threading.Lock()
        for name in ('loadBefore', 'load', 'store', 'getTid',
                     'lastTransaction'):
            setattr(self, name, self._locked(getattr(storage, name)))

    def _locked(self, method):
        def call(*args, **kwargs):
            with self._read:
                return method(*args, **kwargs)
        return call

    def __getattr__(self, name):
        return getattr(self._wrapped, name)

    def tpc_begin(self, transaction):
        self._commit.acquire()
        return self._wrapped.tpc_begin(transaction)

    def tpc_finish(self, transaction, func=None):
        with self._read:
            try:
                return self._wrapped.tpc_finish(transaction, func)
            finally:
                self._commit.release()

    def tpc_abort(self, transaction):
        with self._read:
            try:
                return self._wrapped.tpc_abort(transaction)
            finally:
                self._commit.release()


class _AsRelStorageRunsIt:
    """How RelStorage's own suite adapts ZODB's threaded tests to an
    IMVCCStorage, whose instances each serve one thread; for the plain
    RelStorage reference only.  (The composite is no IMVCCStorage: its
    threads share it, as ZODB's mixins expect, with no adaptation.)"""

    def setUp(self):
        super().setUp()
        for name, cls in (('StorageClientThread', _ClientThread),
                          ('ExtStorageClientThread', _ExtClientThread)):
            self.addCleanup(setattr, MTStorage, name,
                            getattr(MTStorage, name))
            setattr(MTStorage, name, cls)

    def _shared_by_threads(self, test):
        storage = self._storage
        self._storage = _ThreadWrapper(storage)
        try:
            test(self)
        finally:
            self._storage = storage

    def test_checkCurrentSerialInTransaction(self):
        self._shared_by_threads(
            BasicStorage.BasicStorage.test_checkCurrentSerialInTransaction)

    def test_tid_ordering_w_commit(self):
        self._shared_by_threads(
            BasicStorage.BasicStorage.test_tid_ordering_w_commit)


class _ToFileStorage(StorageTestBase.StorageTestBase,
                     RecoveryStorage.RecoveryStorage):
    """Copy from the storage under test into a FileStorage."""
    __test__ = False
    engine = factory = None

    def setUp(self):
        StorageTestBase.StorageTestBase.setUp(self)
        self._storage = self.factory(self.engine, 'Source', create=True)
        self._dst = filestorage('Dest')

    def tearDown(self):
        self._dst.close()
        StorageTestBase.StorageTestBase.tearDown(self)


class _FromFileStorage(_ToFileStorage):
    """Copy from a FileStorage into the storage under test."""

    def setUp(self):
        StorageTestBase.StorageTestBase.setUp(self)
        self._storage = filestorage('Source')
        self._dst = self.factory(self.engine, 'Dest', create=True)


def _wrapped(method):
    """A new function calling ``method``: unittest's decorators mark the
    function they are given, which the other classes share."""
    def test(self):
        return method(self)
    test.__name__ = method.__name__
    test.__doc__ = method.__doc__
    return test


def _make(base, name, suffix, engine, factory, reference):
    bases = (base, unittest.TestCase)
    if reference and base is _Storage:
        bases = (_AsRelStorageRunsIt,) + bases
    cls = type(name, bases, {'__test__': True, 'engine': engine,
                             'factory': staticmethod(factory)})
    failing = dict(EXPECTED_TO_FAIL[engine])
    if reference:
        failing.update(REFERENCE_ONLY_FAILS[engine])
    for key in failing:
        where, _, test = key.rpartition('.')
        if where == suffix:
            assert hasattr(cls, test), key
            setattr(cls, test,
                    unittest.expectedFailure(_wrapped(getattr(cls, test))))
    return cls


_KINDS = (('RelStorage', relstorage, True),
          ('CompositeRelStorage', relstorage_composite, False))
_ENGINES = (('SQLite', 'sqlite'), ('PostgreSQL', 'postgresql'))
_BASES = (('', _Storage), ('ToFileStorage', _ToFileStorage),
          ('FromFileStorage', _FromFileStorage))

for _kind, _factory, _reference in _KINDS:
    if _reference and not REFERENCE:
        continue        # not collected: the run shows no skips for it
    for _label, _engine in _ENGINES:
        for _suffix, _base in _BASES:
            _name = 'Test%s%s%s' % (_kind, _label, _suffix)
            globals()[_name] = _make(_base, _name, _suffix, _engine,
                                     _factory, _reference)
