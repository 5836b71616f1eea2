"""Scenario 12: one tid sequence that never goes backwards (invariant 5)."""
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage

from compositestorage import placement

from conftest import THREE
from conftest import child_history
from conftest import make_composite
from conftest import new_tm
from conftest import open_composite


def child_last(paths):
    out = {}
    for name, path in paths.items():
        fs = FileStorage(path, read_only=True)
        out[name] = fs.lastTransaction()
        fs.close()
    return out


def test_last_transaction_survives_restart(tmp_path):
    storage, paths = make_composite(tmp_path)
    db = ZODB.DB(storage)
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    tids = [storage.lastTransaction()]
    root['m'] = PersistentMapping()
    tm.commit()
    tids.append(storage.lastTransaction())
    with placement(conn, 'c'):
        root['cside'] = PersistentMapping()
        tm.commit()
    tids.append(storage.lastTransaction())
    # the last transaction touches c only: main and b stay behind
    root['cside']['v'] = 1
    tm.commit()
    tids.append(storage.lastTransaction())
    assert tids == sorted(tids) and len(set(tids)) == len(tids)
    last = storage.lastTransaction()
    lasts = child_last(paths)
    assert lasts['c'] == last
    assert lasts['main'] < last and lasts['b'] < last
    db.close()

    for _ in range(2):
        storage = open_composite(paths)
        try:
            assert storage.lastTransaction() == last
            for name, child_tid in child_last(paths).items():
                assert child_tid <= storage.lastTransaction()
        finally:
            storage.close()

    # a new commit after the restart goes above the old last tid
    db = ZODB.DB(open_composite(paths))
    try:
        tm = new_tm()
        conn = db.open(transaction_manager=tm)
        conn.root()['after'] = 1
        tm.commit()
        assert db.storage.lastTransaction() > last
    finally:
        db.close()


def test_empty_transaction_is_durable(tmp_path):
    storage, paths = make_composite(tmp_path)
    db = ZODB.DB(storage)          # writes the root (and the maps)
    db.close()
    storage = open_composite(paths)
    before = storage.lastTransaction()
    history = {name: len(child_history(p)) for name, p in paths.items()}

    seen = []
    txn = TransactionMetaData(description='nothing at all')
    storage.tpc_begin(txn)
    storage.tpc_vote(txn)
    tid = storage.tpc_finish(txn, seen.append)
    assert tid > before
    assert storage.lastTransaction() == tid
    assert seen == [tid]
    storage.close()

    # the tid is durable: some child recorded the empty transaction
    grown = {name: len(child_history(p)) - history[name]
             for name, p in paths.items()}
    assert sum(grown.values()) >= 1
    storage = open_composite(paths)
    try:
        assert storage.lastTransaction() == tid
        txns = list(storage.iterator(tid))
        assert [t.tid for t in txns] == [tid]
        assert list(txns[0]) == []
    finally:
        storage.close()


def test_func_runs_once_every_child_has_finished(tmp_path):
    """func(tid) in tpc_finish runs after the commit point: every
    participating child already has the transaction."""
    storage, paths = make_composite(tmp_path)
    db = ZODB.DB(storage)
    db.close()
    storage = open_composite(paths)
    try:
        oids = [storage.new_oid_in(name) for name, _ in THREE]
        from conftest import pm_record
        from ZODB.utils import z64
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        for oid in oids:
            storage.store(oid, z64, pm_record(v=1), '', txn)
        storage.tpc_vote(txn)
        found = []

        def func(tid):
            for part in storage.partitions:
                found.append(part.storage.lastTransaction() == tid)

        tid = storage.tpc_finish(txn, func)
        assert found == [True, True, True]
        assert storage.lastTransaction() == tid
        assert all(storage.load(oid)[1] == tid for oid in oids)
    finally:
        storage.close()
