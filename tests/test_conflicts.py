"""Scenario 4: conflict resolution works across partitions (invariant 8)."""
import pytest
import ZODB
from BTrees.Length import Length
from BTrees.OOBTree import OOBucket
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ConflictError

from compositestorage import placement

from conftest import TWO
from conftest import check_child_self_contained
from conftest import child_history
from conftest import child_records
from conftest import is_stub
from conftest import make_composite
from conftest import new_tm
from conftest import open_composite


def concurrent_inserts(db, composite):
    """Two connections insert different keys into one OOBucket (in main)
    whose values are new persistent objects (in b, for a composite).
    Returns the bucket's oid and the values' oids."""
    tm0 = new_tm()
    c0 = db.open(transaction_manager=tm0)
    bucket = OOBucket()
    bucket['base'] = PersistentMapping(v='base')
    c0.root()['bucket'] = bucket
    c0.root()['length'] = Length()
    tm0.commit()

    tm1, tm2 = new_tm(), new_tm()
    c1 = db.open(transaction_manager=tm1)
    c2 = db.open(transaction_manager=tm2)
    b1, b2 = c1.root()['bucket'], c2.root()['bucket']
    assert list(b1.keys()) == list(b2.keys()) == ['base']

    def insert(conn, bucket, key):
        value = PersistentMapping(v=key)
        if composite:
            with placement(conn, 'b'):
                conn.add(value)
        bucket[key] = value
        conn.root()['length'].change(1)
        return value

    v1 = insert(c1, b1, 'one')
    v2 = insert(c2, b2, 'two')
    tm1.commit()
    tm2.commit()             # must resolve, not raise ConflictError
    tm0.begin()
    bucket = c0.root()['bucket']
    assert sorted(bucket.keys()) == ['base', 'one', 'two']
    assert bucket['one']['v'] == 'one'
    assert bucket['two']['v'] == 'two'
    assert type(bucket['two']) is PersistentMapping
    assert c0.root()['length']() == 2
    return bucket._p_oid, v1._p_oid, v2._p_oid


def test_plain_filestorage_resolves(tmp_path):
    """The control: the same steps on a plain FileStorage resolve."""
    db = ZODB.DB(FileStorage(str(tmp_path / 'plain.fs')))
    try:
        concurrent_inserts(db, composite=False)
    finally:
        db.close()


def test_bucket_conflict_resolves_across_partitions(tmp_path):
    storage, paths = make_composite(tmp_path, TWO)
    db = ZODB.DB(storage)
    bucket_oid, v1, v2 = concurrent_inserts(db, composite=True)
    assert bucket_oid[0] == 0 and v1[0] == 1 and v2[0] == 1
    db.close()

    # the resolved record went through the stubs, and both values have one
    main = child_records(paths['main'])
    assert is_stub(main[v1]) and is_stub(main[v2])
    check_child_self_contained(paths['main'], 0, {0: 'main', 1: 'b'})
    # exactly one stub record each: the resolution did not write two
    for v in (v1, v2):
        writes = [1 for _, recs in child_history(paths['main'])
                  for oid, _ in recs if oid == v]
        assert len(writes) == 1

    db = ZODB.DB(open_composite(paths, TWO))
    try:
        bucket = db.open().root()['bucket']
        assert sorted(bucket.keys()) == ['base', 'one', 'two']
        assert [bucket[k]['v'] for k in ('one', 'two')] == ['one', 'two']
        assert bucket['one']._p_oid == v1
    finally:
        db.close()


def test_unresolvable_conflict_writes_nothing(tmp_path):
    """A real conflict in main, in a transaction that also writes b:
    ConflictError names the oid, and b's child gets nothing."""
    storage, paths = make_composite(tmp_path, TWO)
    db = ZODB.DB(storage)
    tm0 = new_tm()
    c0 = db.open(transaction_manager=tm0)
    c0.root()['m'] = PersistentMapping(v=0)
    with placement(c0, 'b'):
        c0.root()['inb'] = PersistentMapping(v=0)
        tm0.commit()
    m_oid = c0.root()['m']._p_oid
    assert c0.root()['inb']._p_oid[0] == 1

    tm1, tm2 = new_tm(), new_tm()
    c1 = db.open(transaction_manager=tm1)
    c2 = db.open(transaction_manager=tm2)
    c1.root()['m']['v'] = 1
    tm1.commit()
    before = {name: len(child_history(p)) for name, p in paths.items()}
    last = storage.lastTransaction()
    c2.root()['inb']['v'] = 2          # b is written first ...
    c2.root()['m']['v'] = 2            # ... then main conflicts
    with pytest.raises(ConflictError) as exc:
        tm2.commit()
    tm2.abort()
    assert exc.value.oid == m_oid
    assert storage.lastTransaction() == last
    assert {name: len(child_history(p)) for name, p in paths.items()} == \
        before
    tm0.begin()
    assert c0.root()['inb']['v'] == 0
    assert c0.root()['m']['v'] == 1
    db.close()
