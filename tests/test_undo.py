"""Scenario 7: undo never removes a stub that later records still use."""
import pytest
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage

from compositestorage import PartitionStub
from compositestorage import placement

from conftest import THREE
from conftest import check_child_self_contained
from conftest import child_history
from conftest import child_records
from conftest import is_stub
from conftest import make_composite
from conftest import new_tm
from conftest import open_composite

HOMES = {prefix: name for name, prefix in THREE}


def setup_undo_case(tmp_path):
    """txn0: containers; txn1: a1 (main) -> x (b), creating the stub for x
    in main; txn2: a2 (main) -> x.  Returns what the tests need."""
    storage, paths = make_composite(tmp_path)
    db = ZODB.DB(storage)
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    root['c1'] = PersistentMapping()
    root['c2'] = PersistentMapping()
    tm.commit()
    with placement(conn, 'b'):
        root['bside'] = PersistentMapping()
        tm.commit()
        root['bside']['x'] = x = PersistentMapping(v='x')
        tm.commit()
    x_oid = x._p_oid
    assert x_oid[0] == 1
    assert x_oid not in child_records(paths['main'])

    root['c1']['a'] = a1 = PersistentMapping(ref=x)        # txn1
    tm.get().note('txn1')
    tm.commit()
    txn1 = storage.lastTransaction()
    assert is_stub(child_records(paths['main'])[x_oid])
    root['c2']['a'] = a2 = PersistentMapping(ref=x)        # txn2
    tm.get().note('txn2')
    tm.commit()
    return dict(storage=storage, paths=paths, db=db, tm=tm, conn=conn,
                x_oid=x_oid, a1=a1._p_oid, a2=a2._p_oid, txn1=txn1)


def test_undo_keeps_stub_used_by_later_records(tmp_path):
    case = setup_undo_case(tmp_path)
    storage, paths, db, tm, conn = (case[k] for k in
                                    ('storage', 'paths', 'db', 'tm', 'conn'))
    x_oid = case['x_oid']
    log = db.undoLog(0, 10)
    entry = [e for e in log if e['description'] == 'txn1']
    assert len(entry) == 1
    db.undo(entry[0]['id'], tm.get())
    tm.get().note('undo txn1')
    tm.commit()

    # the undo itself shows no internal record
    last = list(storage.iterator(storage.lastTransaction()))
    assert len(last) == 1
    undone = {r.oid for r in last[0]}
    assert x_oid not in undone
    assert case['a1'] in undone

    tm.begin()
    root = conn.root()
    assert 'a' not in root['c1']
    assert root['c2']['a']['ref'] is root['bside']['x']
    assert root['c2']['a']['ref']['v'] == 'x'
    db.close()

    # the stub is still in main's child, and main alone is consistent
    main = child_records(paths['main'])
    assert x_oid in main and is_stub(main[x_oid])
    check_child_self_contained(paths['main'], 0, HOMES)
    plain = ZODB.DB(FileStorage(paths['main'], read_only=True))
    try:
        a2 = plain.open().get(case['a2'])
        assert isinstance(a2['ref'], PartitionStub)
        a2['ref']._p_activate()
        assert a2['ref'].home == 'b'
    finally:
        plain.close()

    # and through a reopened composite
    db = ZODB.DB(open_composite(paths))
    try:
        root = db.open().root()
        assert root['c2']['a']['ref']['v'] == 'x'
        assert type(root['c2']['a']['ref']) is PersistentMapping
    finally:
        db.close()


def undo_txn1(case):
    db, tm = case['db'], case['tm']
    entry = [e for e in db.undoLog(0, 10) if e['description'] == 'txn1']
    assert len(entry) == 1
    db.undo(entry[0]['id'], tm.get())
    tm.get().note('undo txn1')
    tm.commit()


def test_undo_log_after_undo(tmp_path):
    case = setup_undo_case(tmp_path)
    undo_txn1(case)
    storage = case['storage']
    log = storage.undoLog(0, 20)
    descriptions = [e['description'] for e in log]
    assert descriptions == [b'undo txn1', b'txn2', b'txn1', b'', b'', b'',
                            b'initial database creation']
    # one entry per composite transaction, newest first
    tids = [e['id'] for e in log]
    assert len(set(tids)) == len(tids)
    # the undo transaction touched main (a1, c1) only: b's x stays
    case['tm'].begin()
    root = case['conn'].root()
    assert root['bside']['x']['v'] == 'x'
    assert 'a' not in root['c1']
    case['db'].close()


def test_record_iternext_reaches_objects_after_an_undone_creation(
        tmp_path):
    """a1's creation is undone, so its current record in main has no
    data.  record_iternext over the composite must still reach every live
    object, including main objects whose oids come after a1's."""
    case = setup_undo_case(tmp_path)
    undo_txn1(case)
    storage, db = case['storage'], case['db']
    conn = db.open()
    root = conn.root()
    live = {root._p_oid, root['c1']._p_oid, root['c2']._p_oid,
            root['bside']._p_oid, case['x_oid'], case['a2']}
    assert case['a2'] > case['a1'] and case['a2'][0] == case['a1'][0] == 0
    seen = set()
    token = None
    while True:
        oid, tid, data, token = storage.record_iternext(token)
        seen.add(oid)
        if token is None:
            break
    assert live <= seen, sorted(o.hex() for o in live - seen)
    db.close()


def test_undo_of_a_transaction_across_three_partitions(composite_db):
    db, storage, paths = composite_db
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    root['m'] = PersistentMapping(v=0)
    tm.commit()
    for name in ('b', 'c'):
        with placement(conn, name):
            root[name] = PersistentMapping(v=0)
            tm.commit()
    for k in ('m', 'b', 'c'):
        root[k]['v'] = 1
    root['b']['to_c'] = root['c']          # a new stub in b
    tm.get().note('everywhere')
    tm.commit()
    tid = storage.lastTransaction()
    before_hist = {name: child_history(p) for name, p in paths.items()}
    assert all(before_hist[n][-1][0] == tid for n in ('main', 'b', 'c'))

    entry = [e for e in db.undoLog(0, 5) if e['description'] == 'everywhere']
    db.undo(entry[0]['id'], tm.get())
    tm.commit()
    tm.begin()
    assert [root[k]['v'] for k in ('m', 'b', 'c')] == [0, 0, 0]
    assert 'to_c' not in root['b']
    # the undo is one composite transaction in every partition it touched
    undo_tid = storage.lastTransaction()
    txns = list(storage.iterator(undo_tid))
    assert len(txns) == 1
    assert sorted(r.oid for r in txns[0]) == sorted(
        root[k]._p_oid for k in ('m', 'b', 'c'))
    db.close()
    for name, prefix in THREE:
        assert child_history(paths[name])[-1][0] == undo_tid
        check_child_self_contained(paths[name], prefix, HOMES)


def test_failed_undo_writes_nothing(composite_db):
    """Undoing txn1 fails in b (a later txn changed the same object there)
    after main was already undone: UndoError, and no child gets anything."""
    from ZODB.POSException import UndoError
    db, storage, paths = composite_db
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    root['m'] = PersistentMapping(v=0)
    tm.commit()
    with placement(conn, 'b'):
        root['bb'] = PersistentMapping(v=0)
        tm.commit()
    root['m']['v'] = 1
    root['bb']['v'] = 1
    tm.get().note('txn1')
    tm.commit()
    root['bb']['v'] = 2
    tm.commit()
    last = storage.lastTransaction()
    before = {name: child_history(p) for name, p in paths.items()}
    entry = [e for e in db.undoLog(0, 5) if e['description'] == 'txn1']
    db.undo(entry[0]['id'], tm.get())
    with pytest.raises(UndoError):
        tm.commit()
    tm.abort()
    assert storage.lastTransaction() == last
    assert {name: child_history(p) for name, p in paths.items()} == before
    tm.begin()
    assert (root['m']['v'], root['bb']['v']) == (1, 2)
    db.close()
