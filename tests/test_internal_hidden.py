"""Scenario 9: stubs and partition maps never show through the composite
(invariant 8), while the children do hold them."""
import pytest
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.POSException import POSKeyError
from ZODB.utils import z64

from compositestorage import placement

from conftest import THREE
from conftest import child_history
from conftest import child_records
from conftest import is_stub
from conftest import map_oid
from conftest import new_tm
from conftest import pickle_class

MAPS = {map_oid(prefix) for _, prefix in THREE}


@pytest.fixture
def populated(composite_db):
    """Objects in every partition, referring to each other."""
    db, storage, paths = composite_db
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    root['m'] = PersistentMapping(v='m')
    tm.get().note('main only')
    tm.commit()
    made = [root._p_oid, root['m']._p_oid]
    for name in ('b', 'c'):
        with placement(conn, name):
            root[name] = PersistentMapping(v=name)
            tm.get().note('into ' + name)
            tm.commit()
        made.append(root[name]._p_oid)
    root['b']['to_c'] = root['c']
    root['c']['to_m'] = root['m']
    root['c']['to_b'] = root['b']
    tm.get().note('cross')
    tm.commit()
    root['m']['v'] = 'm2'
    tm.commit()
    conn.close()
    return db, storage, paths, set(made)


def test_children_hold_internal_records(populated):
    db, storage, paths, made = populated
    for name, prefix in THREE:
        records = child_records(paths[name])
        assert pickle_class(records[map_oid(prefix)])[1] == 'PartitionMap'
        stubs = {oid for oid, data in records.items() if is_stub(data)}
        assert stubs, name
        assert all(oid[0] != prefix for oid in stubs)
    # the stubs are where the references cross
    assert {o for o, d in child_records(paths['c']).items() if is_stub(d)} \
        >= {oid for oid in made if oid[0] in (0, 1)}


def test_len_counts_objects_only(populated):
    db, storage, paths, made = populated
    assert len(storage) == len(made) == 4
    children = sum(len(child_records(p)) for p in paths.values())
    assert children > len(made)


def test_record_iternext_shows_no_internal_record(populated):
    db, storage, paths, made = populated
    seen = []
    token = None
    while True:
        oid, tid, data, token = storage.record_iternext(token)
        seen.append(oid)
        assert not is_stub(data)
        assert b'compositestorage' not in data
        if token is None:
            break
    assert sorted(seen) == sorted(made)
    assert not MAPS & set(seen)


def test_iterator_shows_no_internal_record(populated):
    db, storage, paths, made = populated
    txns = list(storage.iterator())
    records = [(r.oid, r.data) for t in txns for r in t]
    assert {oid for oid, _ in records} == made
    assert not any(is_stub(data) or b'compositestorage' in data
                   for _, data in records)
    # each transaction shows exactly the user's records: the first txn
    # (root creation) carries the maps and root stubs in the children
    # but shows the root only
    assert [sorted(r.oid for r in t) for t in txns][0] == [z64]
    tids = [t.tid for t in txns]
    assert tids == sorted(set(tids))
    # as many transactions as the primary and secondaries together hold
    all_tids = set()
    for path in paths.values():
        all_tids |= {tid for tid, _ in child_history(path)}
    assert set(tids) == all_tids


def test_history_and_load_refuse_internal_oids(populated):
    db, storage, paths, made = populated
    for oid in MAPS:
        for call in (storage.load, storage.history, storage.getTid):
            with pytest.raises(POSKeyError):
                call(oid)
    # the history of an object is its own, in its home partition, even
    # though other children hold a stub at its oid
    m = sorted(made)[1]
    assert m[0] == 0
    hist = storage.history(m, 10)
    assert len(hist) == 2
    for h in hist:
        assert not is_stub(storage.loadSerial(m, h['tid']))
    b_oid = [o for o in made if o[0] == 1][0]
    assert is_stub(child_records(paths['c'])[b_oid])
    assert len(storage.history(b_oid, 10)) == 2
    # b's record refers to c's object through a stub hint in its child;
    # the composite gives the original class hint back
    assert b'compositestorage.stubs' in child_records(paths['b'])[b_oid]
    assert b'compositestorage.stubs' not in storage.load(b_oid)[0]


def test_undo_log_shows_user_transactions_only(populated):
    db, storage, paths, made = populated
    log = storage.undoLog(0, 100)
    assert [e['description'] for e in log] == [
        b'', b'cross', b'into c', b'into b', b'main only',
        b'initial database creation']
    assert len({e['id'] for e in log}) == len(log)
    assert storage.undoLog(1, 3) == log[1:3]


def test_adding_a_partition_shows_nothing_internal(tmp_path):
    """A partition added later gets its map and root stub in the next
    transaction; neither that nor the maps rewritten in the other children
    shows in iteration, undoLog or len()."""
    from conftest import TWO
    from conftest import open_composite
    from conftest import paths_for
    paths = paths_for(tmp_path)
    storage = open_composite(paths, TWO)
    db = ZODB.DB(storage)
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    conn.root()['m'] = PersistentMapping()
    tm.commit()
    db.close()

    storage = open_composite(paths, TWO)
    user_tids = [t.tid for t in storage.iterator()]
    log_ids = [e['id'] for e in storage.undoLog(0, 100)]
    n = len(storage)
    storage.close()

    storage = open_composite(paths, THREE)       # c is new
    db = ZODB.DB(storage)
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    conn.root()['m']['v'] = 1                    # touches main only
    tm.get().note('after adding c')
    tm.commit()
    tid = storage.lastTransaction()
    assert [t.tid for t in storage.iterator()] == user_tids + [tid]
    log = storage.undoLog(0, 100)
    assert [e['id'] for e in log[1:]] == log_ids
    assert log[0]['description'] == b'after adding c'
    assert len(storage) == n
    txns = list(storage.iterator(tid))
    assert [r.oid for r in txns[0]] == [conn.root()['m']._p_oid]
    db.close()
    c = child_records(paths['c'])
    assert set(c) == {z64, map_oid(2)}
    assert is_stub(c[z64])

