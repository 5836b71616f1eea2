"""RelStorage children, configured as RelStorage users write them: a
``<relstorage>`` section inside ``<partition>``, history-preserving and
history-free, on SQLite (embedded) and PostgreSQL (a real server; these
skip without one, and fail under ``CI=true``)."""
import time

import persistent.mapping
import pytest
import transaction
import ZODB
from ZODB.POSException import POSKeyError
from ZODB.Connection import TransactionMetaData
from ZODB.utils import z64

from compositestorage import placement
from compositestorage.errors import RecoveryError
from compositestorage.recovery import recent_transactions
from compositestorage.recovery import roll_back
from compositestorage.stats import stats
from compositestorage.verify import verify

from relstorage_engines import child_section
from relstorage_engines import composite_config
from relstorage_engines import databases
from relstorage_engines import open_child
from relstorage_engines import open_config

KINDS = [('sqlite', True), ('sqlite', False),
         ('postgresql', True), ('postgresql', False)]
IDS = ['sqlite-hp', 'sqlite-hf', 'pg-hp', 'pg-hf']


@pytest.fixture(params=KINDS, ids=IDS)
def kind(request):
    return request.param


@pytest.fixture
def mixed(kind, tmp_path):
    """``(open, where)``: opens a composite of a FileStorage primary and a
    RelStorage child ``cat`` (prefix 1) of the kind under test."""
    engine, keep_history = kind
    with databases(engine, tmp_path, ['cat']) as where:
        text = composite_config(tmp_path, [
            ('cat', 1, child_section(engine, where['cat'], keep_history))])
        storages = []

        def open_():
            storages.append(open_config(text))
            return storages[-1]
        yield open_, where['cat']
        for s in storages:
            s.close()


def cat_of(storage):
    return next(p for p in storage.partitions if p.name == 'cat')


def PM(**kw):
    return persistent.mapping.PersistentMapping(**kw)


def fill(db):
    """main's root refers to X in cat, X to Y in cat; G in cat is
    referenced once, then dropped (garbage)."""
    conn = db.open()
    root = conn.root()
    with placement(conn, 'cat'):
        root['x'] = PM(name='x', y=PM(name='y'))
        root['g'] = PM(name='g')
        root['m'] = None
        transaction.commit()
    root['m'] = PM(name='m', x=root['x'])      # main, refers into cat
    transaction.commit()
    oids = {k: root[k]._p_oid for k in ('x', 'g', 'm')}
    oids['y'] = root['x']['y']._p_oid
    conn.close()
    return oids


def test_configured_child_stores_counts_and_never_gcs_alone(mixed, kind):
    open_, where = mixed
    storage = open_()
    cat = cat_of(storage)
    assert cat.child.kind == 'RelStorage'
    assert cat.base._options.pack_gc is False     # switched off at open
    db = ZODB.DB(storage)
    oids = fill(db)
    assert oids['x'][0] == oids['y'][0] == oids['g'][0] == 1
    assert oids['m'][0] == 0
    assert cat.count_own() == 3                   # x, y, g (not the map)
    assert cat.count_stubs() == 1                 # the root stub at z64
    assert cat.max_own_oid() == max(oids['x'], oids['y'], oids['g'])
    assert cat.prefixes_held() == {0, 1}
    report = stats(storage)
    row = report['partitions']['cat']
    assert (row['objects'], row['stubs']) == (3, 1)
    db.close()
    storage = open_()                             # reopened: data kept
    db = ZODB.DB(storage)
    conn = db.open()
    assert conn.root()['m']['x']['y']['name'] == 'y'
    # a new oid is allocated above the ones the child holds
    with placement(conn, 'cat'):
        conn.root()['n'] = PM()
        transaction.commit()
    assert conn.root()['n']._p_oid > oids['g']
    db.close()


def change_x_and_m(mixed):
    """A filled composite whose x (in cat) and m (in main) are changed in
    a transaction not committed yet: ``(storage, db, oids, conn, root)``."""
    open_, _ = mixed
    storage = open_()
    db = ZODB.DB(storage)
    oids = fill(db)
    conn = db.open()
    root = conn.root()
    root['x']['name'] = 'x2'                      # cat
    root['m']['name'] = 'm2'                      # main
    return storage, db, oids, conn, root


def test_span_is_recorded_in_a_history_preserving_child(mixed, kind):
    if not kind[1]:
        pytest.skip('a history-free RelStorage keeps no transaction row')
    storage, db, oids, conn, root = change_x_and_m(mixed)
    transaction.commit()
    tid = storage.lastTransaction()
    cat = cat_of(storage)
    found = dict(recent_transactions(cat, z64, 10))
    assert found[tid] == (0, 1)
    # a one-partition transaction records an empty span
    root['x']['name'] = 'x3'
    transaction.commit()
    assert dict(recent_transactions(cat, z64, 10))[
        storage.lastTransaction()] == ()
    assert oids
    db.close()


def test_delete_object_through_the_composite(mixed):
    """The composite begins children in RelStorage's restore mode, where
    4.3 lacks deleteObject (it spells it deletObject)."""
    open_, _ = mixed
    storage = open_()
    db = ZODB.DB(storage)
    oids = fill(db)
    serial = storage.load(oids['g'])[1]
    txn = TransactionMetaData()
    storage.tpc_begin(txn)
    storage.deleteObject(oids['g'], serial, txn)
    storage.tpc_vote(txn)
    storage.tpc_finish(txn)
    with pytest.raises(POSKeyError):
        storage.load(oids['g'])
    assert storage.load(oids['x'])
    db.close()


def test_pack_removes_garbage_and_keeps_what_others_reference(mixed, kind):
    engine, keep_history = kind
    open_, where = mixed
    storage = open_()
    db = ZODB.DB(storage)
    oids = fill(db)
    old_x = storage.load(oids['x'])[1]
    conn = db.open()
    del conn.root()['g']
    conn.root()['x']['name'] = 'x-new'            # an old revision to pack
    transaction.commit()
    conn.close()
    time.sleep(0.05)
    db.pack(time.time())
    cat = cat_of(storage)
    assert cat.child.current_serial(oids['g']) is None
    with pytest.raises(POSKeyError):
        storage.load(oids['g'])
    for key in ('x', 'y', 'm'):
        storage.load(oids[key])
    assert cat.count_own() == 2
    if keep_history:                              # the old revision went
        with pytest.raises(POSKeyError):
            cat.storage.loadSerial(oids['x'], old_x)
    problems = verify(storage)[0]
    assert problems == []
    db.close()
    # each child opens alone, and every record in it loads
    alone = open_child(engine, where, keep_history)
    try:
        db = ZODB.DB(alone)
        conn = db.open()
        assert 'PartitionStub' in repr(conn.root())
        assert conn.get(oids['x'])['y']['name'] == 'y'
        db.close()
    finally:
        alone.close()


def test_roll_back_takes_a_finished_transaction_back(mixed, kind):
    open_, _ = mixed
    storage = open_()
    db = ZODB.DB(storage)
    oids = fill(db)
    cat = cat_of(storage)
    before = cat.child.last_finished()
    conn = db.open()
    conn.root()['x']['name'] = 'x2'
    conn.root()['x']['z'] = PM(name='z')          # a new object in cat
    transaction.commit()
    tid = storage.lastTransaction()
    assert cat.child.has_transaction(tid)
    if not kind[1]:
        with pytest.raises(RecoveryError, match="'cat'.*history-free"):
            roll_back(cat, tid)
        db.close()
        return
    roll_back(cat, tid)
    assert cat.child.last_finished() == before
    assert not cat.child.has_transaction(tid)
    data, serial = cat.storage.load(oids['x'])
    assert serial < tid and b'x2' not in data
    assert cat.count_own() == 3
    db.close()


def test_undo_is_seen_by_a_load_and_a_new_connection(mixed, kind):
    """An undo through the composite undoes its transaction in a
    history-preserving RelStorage child too, at the composite's tid, with
    the oids it touched; a load and a new connection then see the undone
    state, not what the child cached of the state before.  The stub the
    undone transaction wrote stays (later records may use it)."""
    if not kind[1]:
        pytest.skip('a history-free RelStorage keeps no revisions to undo')
    storage, db, oids, conn, root = change_x_and_m(mixed)
    root['x']['w'] = new = PM(name='w')           # in main: a stub in cat
    conn.add(new)                                 # oids are placed now
    root['x']['z'] = new = PM(name='z')           # a new object in cat
    with placement(conn, 'cat'):
        conn.add(new)
    transaction.commit()
    z, w = root['x']['z']._p_oid, root['x']['w']._p_oid
    assert (z[0], w[0]) == (1, 0)
    assert b'x2' in storage.load(oids['x'])[0]    # the child cached it
    cat = cat_of(storage)
    stub_serial = cat.child.current_serial(w)
    assert stub_serial == storage.lastTransaction()
    db.undo(db.undoLog(0, 1)[0]['id'])
    transaction.commit()
    tid = storage.lastTransaction()
    data, serial = storage.load(oids['x'])
    assert serial == tid and b'x2' not in data
    assert cat.storage.load(oids['x'])[1] == tid  # the composite's tid
    assert b'm2' not in storage.load(oids['m'])[0]
    for oid in (z, w):                            # creations undone
        with pytest.raises(POSKeyError):
            storage.load(oid)
    assert cat.child.current_serial(w) == stub_serial
    fresh = db.open(transaction.TransactionManager())
    x = fresh.root()['x']
    assert (x['name'], 'z' in x, 'w' in x) == ('x', False, False)
    assert fresh.root()['m']['name'] == 'm'
    transaction.begin()                           # the old one, synced
    assert (root['x']['name'], 'z' in root['x']) == ('x', False)
    # only the kept stub, garbage that the next pack removes
    assert {(p.kind, p.oid, p.garbage) for p in verify(storage)[0]} == {
        ('stub-target-missing', w, True), ('orphan-stub', w, True)}
    db.close()
