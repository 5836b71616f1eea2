"""Scenario 6: copyTransactionsFrom into and out of a composite."""
import ZODB
from persistent.list import PersistentList
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage
from ZODB.utils import z64

from compositestorage import placement

from conftest import THREE
from conftest import check_child_self_contained
from conftest import child_records
from conftest import is_stub
from conftest import iter_current
from conftest import make_composite
from conftest import new_tm
from conftest import open_composite
from conftest import paths_for

HOMES = {prefix: name for name, prefix in THREE}


def transactions(storage):
    """Every transaction as (tid, status, user, description, extension,
    [(oid, data), ...] sorted by oid)."""
    out = []
    it = storage.iterator()
    try:
        for txn in it:
            out.append((txn.tid, txn.status, txn.user, txn.description,
                        txn.extension,
                        sorted((r.oid, r.data) for r in txn)))
    finally:
        getattr(it, 'close', lambda: None)()
    return out


def loads(storage):
    """``{oid: (data, tid)}`` of every current record, by load()."""
    return {oid: storage.load(oid) for oid, _, _ in iter_current(storage)}


def fill(db, composite):
    """A few transactions with metadata, modifications and, in a
    composite, references across all three partitions."""
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    root['a'] = PersistentMapping(v=1)
    txn = tm.get()
    txn.note('first')
    txn.setUser('alice')
    txn.setExtendedInfo('x', 1)
    tm.commit()
    for name in ('b', 'c') if composite else ('b',):
        if composite:
            with placement(conn, name):
                root[name] = PersistentMapping(v=name)
                tm.commit()
        else:
            root[name] = PersistentMapping(v=name)
            tm.commit()
    root['a']['v'] = 2
    root['list'] = PersistentList([root['a']])
    root['b']['back'] = root['a']
    if composite:
        root['c']['tob'] = root['b']
    tm.get().note('second')
    tm.commit()
    conn.close()


def test_filestorage_into_composite(tmp_path, closing):
    source = FileStorage(str(tmp_path / 'source.fs'))
    closing(source)
    db = ZODB.DB(source)
    fill(db, composite=False)
    expected = transactions(source)
    expected_loads = loads(source)

    storage, paths = make_composite(tmp_path)
    closing(storage)
    storage.copyTransactionsFrom(source)
    assert transactions(storage) == expected
    assert loads(storage) == expected_loads
    assert storage.lastTransaction() == source.lastTransaction()
    assert len(storage) == len(source)
    # all of it landed in the primary: a plain FileStorage uses prefix 0
    assert all(oid[0] == 0 for oid in expected_loads)
    db.close()

    # the composite keeps working after the copy, above the copied oids
    db = ZODB.DB(storage)
    conn = db.open()
    root = conn.root()
    assert root['a']['v'] == 2 and root['b']['back'] is root['a']
    root['new'] = PersistentMapping()
    conn.transaction_manager.commit()
    assert root['new']._p_oid not in expected_loads
    assert storage.lastTransaction() > source.lastTransaction()
    db.close()


def test_composite_into_filestorage_and_back(tmp_path, closing):
    storage, paths = make_composite(tmp_path)
    closing(storage)
    db = ZODB.DB(storage)
    fill(db, composite=True)
    expected = transactions(storage)
    expected_loads = loads(storage)
    assert {oid[0] for oid in expected_loads} == {0, 1, 2}
    # the composite shows no internal record while copying out
    for *_, records in expected:
        for oid, data in records:
            assert not is_stub(data)
            assert oid[1:] != b'\xff' * 7

    dest = FileStorage(str(tmp_path / 'dest.fs'))
    closing(dest)
    dest.copyTransactionsFrom(storage)
    assert transactions(dest) == expected
    assert loads(dest) == expected_loads
    assert dest.lastTransaction() == storage.lastTransaction()
    db.close()
    # the copy is a plain database with real objects, no stubs
    plain = ZODB.DB(dest)
    root = plain.open().root()
    assert root['c']['tob'] is root['b']
    assert root['b']['back'] is root['a']
    assert type(root['b']) is PersistentMapping
    assert root['list'][0]['v'] == 2
    plain.close()

    # and back into a new composite with the same partitions: each
    # record goes home by its prefix, and the stubs are made again
    dest = FileStorage(str(tmp_path / 'dest.fs'), read_only=True)
    closing(dest)
    (tmp_path / 'again').mkdir()
    again_paths = paths_for(tmp_path / 'again')
    again = open_composite(again_paths)
    closing(again)
    again.copyTransactionsFrom(dest)
    assert transactions(again) == expected
    assert loads(again) == expected_loads
    again.close()
    for name, prefix in THREE:
        records = child_records(again_paths[name])
        own = {oid for oid in records
               if oid[0] == prefix and oid[1:] != b'\xff' * 7}
        assert own == {oid for oid in expected_loads if oid[0] == prefix}
        assert child_records(paths[name]).keys() == records.keys()
        if prefix:
            assert is_stub(records[z64])
        check_child_self_contained(again_paths[name], prefix, HOMES)


def test_composite_into_composite(tmp_path, closing):
    storage, paths = make_composite(tmp_path)
    closing(storage)
    db = ZODB.DB(storage)
    fill(db, composite=True)
    expected = transactions(storage)
    expected_loads = loads(storage)
    (tmp_path / 'copy').mkdir()
    copy_paths = paths_for(tmp_path / 'copy')
    copy = open_composite(copy_paths)
    closing(copy)
    copy.copyTransactionsFrom(storage)
    assert transactions(copy) == expected
    assert loads(copy) == expected_loads
    assert copy.lastTransaction() == storage.lastTransaction()
    assert len(copy) == len(storage)
    db.close()
    copy.close()
    for name, prefix in THREE:
        # the children match record for record, stubs included
        assert child_records(copy_paths[name]).keys() == \
            child_records(paths[name]).keys()
        check_child_self_contained(copy_paths[name], prefix, HOMES)
