"""Scenario 5: an existing Data.fs becomes the primary without rewriting."""
import transaction
import ZODB
from BTrees.OOBTree import OOBTree
from persistent.list import PersistentList
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage
from ZODB.utils import z64

from compositestorage import CompositeStorage
from compositestorage import PartitionStub
from compositestorage import placement

from conftest import check_child_self_contained
from conftest import child_history
from conftest import child_records
from conftest import new_tm


def make_plain_data_fs(path):
    db = ZODB.DB(FileStorage(path))
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    root['people'] = OOBTree()
    for i in range(50):
        root['people']['p%03d' % i] = PersistentMapping(name='p%d' % i)
    root['list'] = PersistentList([1, 2, 3])
    root['untouched'] = PersistentMapping(note='never modified')
    tm.commit()
    root['list'].append(4)
    tm.commit()
    db.close()


def test_adopt_existing_data_fs(tmp_path):
    data_fs = str(tmp_path / 'Data.fs')
    extra_fs = str(tmp_path / 'extra.fs')
    make_plain_data_fs(data_fs)
    with open(data_fs, 'rb') as f:
        old_bytes = f.read()
    old_history = child_history(data_fs)
    old_current = child_records(data_fs)
    max_old = max(old_current)

    storage = CompositeStorage([
        ('main', 0, FileStorage(data_fs)),
        ('extra', 5, FileStorage(extra_fs)),
    ])
    assert len(storage) == len(old_current)
    db = ZODB.DB(storage)
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    # every old object loads, with the right class and state
    for oid in old_current:
        obj = conn.get(oid)
        obj._p_activate()
        assert not isinstance(obj, PartitionStub)
    assert list(root['list']) == [1, 2, 3, 4]
    assert root['people']['p042']['name'] == 'p42'
    assert root['untouched']['note'] == 'never modified'

    # new objects in the secondary, referenced from old objects
    with placement(conn, 'extra'):
        archive = PersistentMapping(kind='archive')
        conn.add(archive)
        archive['first'] = PersistentList(['a'])
        conn.add(archive['first'])
    root['archive'] = archive                       # old root -> extra
    root['people']['p007']['archive'] = archive     # old object -> extra
    here = PersistentMapping(kind='new in main')
    root['here'] = here
    tm.commit()
    assert archive._p_oid[0] == 5
    assert archive['first']._p_oid[0] == 5
    # the primary's new oids start above every oid Data.fs used
    assert here._p_oid[0] == 0 and here._p_oid > max_old
    new_oids = {archive._p_oid, here._p_oid, archive['first']._p_oid}
    db.close()

    # Data.fs was only appended to: the old transactions are intact
    with open(data_fs, 'rb') as f:
        now = f.read()
    assert now[:len(old_bytes)] == old_bytes
    assert child_history(data_fs)[:len(old_history)] == old_history
    # records of objects the new transaction did not modify are unchanged
    modified = {z64, root['people']['p007']._p_oid}
    current = child_records(data_fs)
    for oid, data in old_current.items():
        if oid not in modified:
            assert current[oid] == data, oid.hex()
    assert check_child_self_contained(
        data_fs, 0, {0: 'main', 5: 'extra'})
    check_child_self_contained(extra_fs, 5, {0: 'main', 5: 'extra'})

    # reopened, the old and new objects are all there
    storage = CompositeStorage([
        ('main', 0, FileStorage(data_fs)),
        ('extra', 5, FileStorage(extra_fs)),
    ])
    db = ZODB.DB(storage)
    try:
        conn = db.open()
        root = conn.root()
        assert root['people']['p007']['archive'] is root['archive']
        assert root['archive']['first'][0] == 'a'
        assert root['here']['kind'] == 'new in main'
        assert len(storage) == len(old_current) + len(new_oids)
        transaction.abort()
    finally:
        db.close()


def test_adopted_data_fs_still_opens_plainly(tmp_path):
    """After adoption the Data.fs remains a plain ZODB database whose old
    objects load as themselves and whose new references are stubs."""
    data_fs = str(tmp_path / 'Data.fs')
    extra_fs = str(tmp_path / 'extra.fs')
    make_plain_data_fs(data_fs)
    storage = CompositeStorage([
        ('main', 0, FileStorage(data_fs)),
        ('extra', 5, FileStorage(extra_fs)),
    ])
    db = ZODB.DB(storage)
    conn = db.open()
    with placement(conn, 'extra'):
        conn.root()['archive'] = PersistentMapping()
        transaction.commit()
    db.close()

    db = ZODB.DB(FileStorage(data_fs, read_only=True))
    try:
        root = db.open().root()
        assert root['people']['p001']['name'] == 'p1'
        assert isinstance(root['archive'], PartitionStub)
        assert root['archive'].home == 'extra'
    finally:
        db.close()
