"""ZODB's conformance mixins over a *shared* composite (IMVCCStorage).

A composite whose children are all RelStorage on PostgreSQL, with no
``journal`` key, is shared (``shared auto``; see compositestorage/mvcc.py):
it provides ``IMVCCStorage`` as RelStorage does, ZODB gives each
connection an instance of its own (``new_instance``) that polls at every
transaction boundary, and many processes may open it at once.

This module runs, over a composite of three history-preserving RelStorage
partitions on PostgreSQL in round-robin placement, opened shared:

(a) the IStorage mixin combination of ``test_relstorage_mixins.py``
    (imported from there, with its expected failures), with ZODB's
    threaded tests run as RelStorage's suite runs them on an
    IMVCCStorage: an instance per MTStorage client thread, and the two
    BasicStorage tests that share one storage between threads through a
    lock;
(b) the tests of an IMVCCStorage: ZODB's ``MVCCTests`` (connections of
    one DB see each other's commits at transaction boundaries and not
    before), ZODB's racetest of local invalidations, a second client
    (a second composite opened on the same databases, as a second
    process would) seeing commits and conflicting, and RelStorage's own
    tests of ``new_instance`` and
    polling (``reltestbase.GenericRelStorageTests``), in the form that
    uses only ZODB's interfaces: conflict resolution between two
    instances, a read by one process while another instance holds its
    vote, oids from many instances in many threads, ``record_iternext``
    checked against another instance, invalidations from
    ``poll_invalidations`` and ``sync``.

Plain RelStorage on PostgreSQL (the reference) runs the same tests with
``COMPOSITE_CONFORMANCE_REFERENCE=1``.  What it fails, the composite may
fail (strict expected failures of both, from ``EXPECTED_TO_FAIL``);
anything else the composite fails turns the run red.
"""
import threading
import unittest
from itertools import combinations

import pytest
import transaction
from persistent.mapping import PersistentMapping
from ZODB.Connection import TransactionMetaData
from ZODB.DB import DB
from ZODB.interfaces import IMVCCStorage
from ZODB.tests import ConflictResolution
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle
from ZODB.tests.StorageTestBase import zodb_unpickle
from ZODB.utils import p64
from ZODB.utils import u64

from compositestorage import CompositeStorage
from compositestorage.shared import OIDS
from compositestorage.shared import STATE
from conformance import test_relstorage_mixins as base
from conformance.harness import PARTITIONS
from conformance.harness import POSTGRES
from conformance.harness import relstorage

ENGINE = 'postgresql'


@pytest.fixture(scope='module', autouse=True)
def _postgres_databases():
    """Drop the module's PostgreSQL databases when it is done."""
    yield
    POSTGRES.drop_all()


def _forget_shared_state():
    """Drop what the processes of a shared composite share from the
    primary's database: zapping the children (RelStorage's ``zap_all``)
    empties RelStorage's tables only, and each test starts from fresh
    databases."""
    import psycopg2
    from tests.relstorage_engines import PG_HOST
    from tests.relstorage_engines import PG_PORT
    from tests.relstorage_engines import PG_USER
    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER,
                            dbname=POSTGRES.name(0))
    try:
        with conn.cursor() as cursor:
            cursor.execute('DROP TABLE IF EXISTS %s, %s' % (STATE, OIDS))
        conn.commit()
    finally:
        conn.close()


def shared_composite(engine, name='Data', placement='round-robin',
                     create=False, read_only=False, **kwargs):
    """A composite of three RelStorage partitions on PostgreSQL, with no
    journal key: shared (``shared auto``), an IMVCCStorage."""
    assert engine == ENGINE, engine
    # ``name`` picks no database: the pool's three serve every name, as
    # the composite RecoveryStorage tests open one storage at a time
    if create and not read_only:
        _forget_shared_state()
    children = [(pname, prefix, relstorage(engine, name, prefix, create,
                                           read_only))
                for pname, prefix in PARTITIONS]
    storage = CompositeStorage(children, placement=placement,
                               read_only=read_only)
    assert IMVCCStorage.providedBy(storage), storage
    return storage


def plain_relstorage(engine, name='Data', create=False, read_only=False,
                     **kwargs):
    return relstorage(engine, name, 0, create, read_only)


class _MVCC:
    """The tests of an IMVCCStorage: instances, polling, and a second
    client of the same databases (``self.factory`` opens one more)."""

    def _new_storage_client(self):
        """Another client of the same databases, as another process
        opens it."""
        return self.factory(self.engine, 'Data')

    # ZODB's two racetests with external clients open 8 and 64 clients at
    # once (``nwork``), each a DB over a new client of the storage.  A
    # shared composite client with one connection holds about 15
    # PostgreSQL sessions (a load and a store session per RelStorage
    # child, for the root and for the connection's instance, and the
    # shared-state sessions): the server's max_connections (100 here) runs
    # out.  They are not run, and say so.
    _RACE_CLIENTS = {'test_race_load_vs_external_invalidate': 8,
                     'test_race_external_invalidate_vs_disconnect': 64}

    def _race_skip(self, name):
        self.skipTest(
            '%s opens %d clients at once, each ~15 PostgreSQL sessions for '
            'a shared composite: more than the server\'s max_connections'
            % (name, self._RACE_CLIENTS[name]))

    def test_race_load_vs_external_invalidate(self):
        self._race_skip('test_race_load_vs_external_invalidate')

    def test_race_external_invalidate_vs_disconnect(self):
        self._race_skip('test_race_external_invalidate_vs_disconnect')

    def _instance(self):
        inst = self._storage.new_instance()
        self.addCleanup(inst.release)
        return inst

    def _commit_new(self, storage, data):
        t = TransactionMetaData()
        storage.tpc_begin(t)
        oid = storage.new_oid()
        storage.store(oid, None, data, '', t)
        storage.tpc_vote(t)
        return oid, storage.tpc_finish(t)

    def test_provides_imvccstorage(self):
        self.assertTrue(IMVCCStorage.providedBy(self._storage))
        inst = self._instance()
        self.assertTrue(IMVCCStorage.providedBy(inst))
        self.assertIsNot(inst, self._storage)

    def _first_polls(self, *instances):
        """A first transaction, and a first poll of each instance: the
        first poll of an instance, or the first after an empty database,
        may name no oids (``None``: ZODB drops its whole cache)."""
        self._commit_new(self._storage, zodb_pickle(MinPO(0)))
        for inst in instances:
            inst.poll_invalidations()

    def test_instances_poll(self):
        # An instance sees another's commit only once it polls, and the
        # poll names the changed oid (RelStorage: its instances' view).
        s1 = self._instance()
        s2 = self._instance()
        self._first_polls(s1, s2)
        oid, tid1 = self._commit_new(s1, zodb_pickle(MinPO(1)))
        self.assertEqual(list(s2.poll_invalidations()), [oid])
        self.assertEqual(s2.load(oid), (zodb_pickle(MinPO(1)), tid1))
        self.assertEqual(s2.lastTransaction(), tid1)

    def test_instance_snapshot(self):
        # A second instance's snapshot does not move until it polls: a
        # load at its last transaction gives the old state, and the poll
        # then names the oid another instance changed.
        s1 = self._instance()
        oid, tid1 = self._commit_new(s1, zodb_pickle(MinPO(1)))
        s2 = self._instance()
        s2.poll_invalidations()     # a first poll names no oids
        self.assertEqual(s2.lastTransaction(), tid1)
        t = TransactionMetaData()
        s1.tpc_begin(t)
        s1.store(oid, tid1, zodb_pickle(MinPO(2)), '', t)
        s1.tpc_vote(t)
        tid2 = s1.tpc_finish(t)
        self.assertGreater(tid2, tid1)
        self.assertEqual(s2.lastTransaction(), tid1)
        self.assertEqual(s2.loadBefore(oid, p64(u64(tid1) + 1))[:2],
                         (zodb_pickle(MinPO(1)), tid1))
        changed = s2.poll_invalidations()
        self.assertIsNotNone(changed)
        self.assertIn(oid, set(changed))
        self.assertEqual(s2.lastTransaction(), tid2)
        self.assertEqual(s2.load(oid), (zodb_pickle(MinPO(2)), tid2))
        # nothing changed since: the next poll is empty
        self.assertEqual(list(s2.poll_invalidations()), [])

    def test_sync_then_poll(self):
        # sync() takes the new snapshot now; poll_invalidations() then
        # names what changed (ZODB's Connection calls both in turn).
        s1 = self._instance()
        s2 = self._instance()
        self._first_polls(s1, s2)
        oid, tid1 = self._commit_new(s1, zodb_pickle(MinPO(7)))
        s2.sync()
        self.assertIn(oid, set(s2.poll_invalidations()))
        self.assertEqual(s2.load(oid), (zodb_pickle(MinPO(7)), tid1))
        self.assertEqual(s2.lastTransaction(), tid1)

    def test_second_client_sees_commits(self):
        # Another client of the same databases (another process) sees a
        # DB's commit at its next transaction boundary, and the other way.
        db1 = DB(self._storage)
        self.addCleanup(db1.close)
        db2 = DB(self._new_storage_client())
        self.addCleanup(db2.close)
        tm1 = transaction.TransactionManager()
        tm2 = transaction.TransactionManager()
        c1 = db1.open(tm1)
        c2 = db2.open(tm2)
        r1 = c1.root()
        r2 = c2.root()
        r1['a'] = PersistentMapping({'x': 1})
        r1['b'] = PersistentMapping({'y': 2})
        tm1.commit()
        self.assertNotIn('a', r2)
        tm2.begin()
        self.assertEqual(r2['a']['x'], 1)
        self.assertEqual(r2['b']['y'], 2)
        r2['a']['x'] = 3
        tm2.commit()
        self.assertEqual(r1['a']['x'], 1)
        tm1.begin()
        self.assertEqual(r1['a']['x'], 3)
        self.assertEqual(r1['b']['y'], 2)
        # a conflict between the two clients is resolved or raised as in
        # one process: here both change one mapping
        r1['a']['x'] = 4
        r2['a']['x'] = 5
        tm2.commit()
        from ZODB.POSException import ConflictError
        with self.assertRaises(ConflictError):
            tm1.commit()
        tm1.abort()
        tm1.begin()
        self.assertEqual(r1['a']['x'], 5)

    def test_resolve_conflict_between_instances(self):
        # RelStorage's checkResolveConflictBetweenConnections, through
        # ZODB's interfaces (no cache statistics): two instances at one
        # revision both commit a PCounter change; the second resolves.
        obj = ConflictResolution.PCounter()
        obj.inc()
        self._storage.poll_invalidations()
        oid = self._storage.new_oid()
        revid1 = self._dostoreNP(oid, data=zodb_pickle(obj))
        self._storage.poll_invalidations()
        storage1 = self._instance()
        storage1.load(oid, '')
        storage2 = self._instance()
        storage2.load(oid, '')
        obj.inc()
        obj.inc()
        root_storage = self._storage
        try:
            self._storage = storage1
            self._dostoreNP(oid, revid=revid1, data=zodb_pickle(obj))
            self._storage = storage2
            self._dostoreNP(oid, revid=revid1, data=zodb_pickle(obj))
            data, _ = self._storage.load(oid, '')
            self.assertEqual(zodb_unpickle(data)._value, 5)
        finally:
            self._storage = root_storage

    def test_load_while_another_votes(self):
        # RelStorage's checkCanLoadObjectStateWhileBeingModified: one
        # instance has voted a change (and holds its locks); another
        # client, with nothing shared, still reads the committed state
        # without waiting.
        storage1 = self._instance()
        data = zodb_pickle(MinPO('state'))
        oid, initial_tid = self._commit_new(storage1, data)
        storage2 = self._new_storage_client()
        self.addCleanup(storage2.close)
        t = TransactionMetaData()
        storage1.tpc_begin(t)
        storage1.store(oid, initial_tid, zodb_pickle(MinPO('new')), '', t)
        storage1.tpc_vote(t)
        self.assertEqual(storage2.load(oid), (data, initial_tid))
        tid2 = storage1.tpc_finish(t)
        self.assertGreater(tid2, initial_tid)
        storage2.sync()
        self.assertEqual(storage2.load(oid),
                         (zodb_pickle(MinPO('new')), tid2))

    def test_no_duplicate_oids_many_threads(self):
        # RelStorage's checkNoDuplicateOIDsManyThreads, through ZODB's
        # interfaces: many instances in many threads allocate oids with
        # no duplicate, each thread's increasing in each partition.
        thread_count = 6
        per_thread = 400
        oids = [[] for _ in range(thread_count)]
        errors = []

        def allocate(inst, mine):
            try:
                for _ in range(per_thread):
                    mine.append(inst.new_oid())
            except BaseException as e:   # reported below
                errors.append(e)
            finally:
                inst.release()

        threads = [threading.Thread(target=allocate,
                                    args=(self._storage.new_instance(), o))
                   for o in oids]
        for t in threads:
            t.start()
        for t in threads:
            t.join(99)
        self.assertEqual(errors, [])
        self.assertEqual([len(s) for s in oids], [per_thread] * thread_count)
        self.assertEqual([len(set(s)) for s in oids],
                         [per_thread] * thread_count)
        for a, b in combinations(oids, 2):
            self.assertTrue(set(a).isdisjoint(b))
        for s in oids:
            by_home = {}
            for oid in s:
                by_home.setdefault(oid[:1], []).append(oid)
            for home in by_home.values():
                self.assertEqual(home, sorted(home))

    def test_record_iternext_against_instance(self):
        # RelStorage's check_record_iternext_basic: each current record
        # record_iternext gives is what another instance loads.
        db = DB(self._storage)
        self.addCleanup(db.close)
        conn = db.open()
        conn.root()['abc'] = MinPO('abc')
        conn.root()['xyz'] = MinPO('xyz')
        transaction.commit()
        conn.root()['abc'].value = 'def'
        conn.root()['xyz'].value = 'ghi'
        transaction.commit()
        expected = {conn.root()._p_oid, conn.root()['abc']._p_oid,
                    conn.root()['xyz']._p_oid}
        conn.close()
        storage2 = self._instance()
        seen = set()
        token = None
        while True:
            oid, tid, data, token = self._storage.record_iternext(token)
            seen.add(oid)
            self.assertEqual(storage2.load(oid), (data, tid))
            if token is None:
                break
        self.assertEqual(seen, expected)


class _Shared(_MVCC, base._AsRelStorageRunsIt, base._Storage):
    """(a) and (b) over the storage ``factory`` opens."""
    __test__ = False


def _make(bases, name, suffix, factory, failing):
    cls = type(name, bases + (unittest.TestCase,),
               {'__test__': True, 'engine': ENGINE,
                'factory': staticmethod(factory)})
    for key, why in failing.items():
        where, _, test = key.rpartition('.')
        if where == suffix:
            assert hasattr(cls, test), key
            setattr(cls, test,
                    unittest.expectedFailure(base._wrapped(getattr(cls,
                                                                   test))))
    return cls


_BASES = (('', (_Shared,)),
          ('ToFileStorage', (base._ToFileStorage,)),
          ('FromFileStorage', (base._FromFileStorage,)))

#: {test name: why}: strict expected failures of the reference and the
#: shared composite alike (RelStorage's own, on PostgreSQL)
EXPECTED_TO_FAIL = dict(base.EXPECTED_TO_FAIL[ENGINE])

#: {test name: why}: what plain RelStorage alone fails (the reference's
#: strict expected failures)
REFERENCE_ONLY_FAILS = dict(base.REFERENCE_ONLY_FAILS[ENGINE])

_KINDS = (('Reference', plain_relstorage, True),
          ('SharedComposite', shared_composite, False))

for _kind, _factory, _reference in _KINDS:
    if _reference and not base.REFERENCE:
        continue        # not collected: the run shows no skips for it
    _failing = dict(EXPECTED_TO_FAIL)
    if _reference:
        _failing.update(REFERENCE_ONLY_FAILS)
    for _suffix, _bases in _BASES:
        _name = 'Test%sRelStoragePostgreSQL%s' % (_kind, _suffix)
        globals()[_name] = _make(_bases, _name, _suffix, _factory,
                                 _failing)
