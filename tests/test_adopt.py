"""Scenario 5: an existing Data.fs becomes the primary without rewriting."""
import pytest
import transaction
import ZODB
from BTrees.OOBTree import OOBTree
from persistent.list import PersistentList
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage
from ZODB.utils import z64

from compositestorage import CompositeStorage
from compositestorage import PartitionStub
from compositestorage.errors import PartitionMapError
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


# --- an existing database configured as a secondary (issue 11, case 6) ------

def make_tenant_fs(path):
    """A plain ZODB database with a root and one object in it."""
    db = ZODB.DB(FileStorage(path))
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    conn.root()['customers'] = PersistentMapping(acme='Acme Ltd')
    tm.commit()
    db.close()


def tenant_config(tmp_path, top=''):
    from conftest import composite_xml
    from conftest import partition_xml
    return composite_xml([
        partition_xml('main', 0, tmp_path / 'main.fs'),
        partition_xml('tenant', 1, tmp_path / 'tenant.fs')], top)


@pytest.mark.parametrize('read_only', [False, True])
def test_existing_database_refused_as_secondary(tmp_path, read_only):
    """A plain tenant.fs configured as partition 1 would have its root
    overwritten by a stub and every record packed away: it is refused at
    open, before anything is written, saying what it holds and what to do."""
    import ZODB.config
    tenant_fs = tmp_path / 'tenant.fs'
    make_tenant_fs(str(tenant_fs))
    FileStorage(str(tmp_path / 'main.fs')).close()
    before = tenant_fs.read_bytes()
    with pytest.raises(PartitionMapError) as exc:
        ZODB.config.storageFromString(tenant_config(
            tmp_path, 'read-only true' if read_only else ''))
    message = str(exc.value)
    for part in ("'tenant'", 'prefix 1', str(tenant_fs), 'holds 2 records',
                 'persistent.mapping.PersistentMapping', 'no partition map',
                 'Nothing was written', 'primary (prefix 0)',
                 'exportFile', 'default-partition tenant'):
        assert part in message, (part, message)
    assert tenant_fs.read_bytes() == before
    # the children were closed again: tenant.fs opens for writing
    FileStorage(str(tenant_fs)).close()
    assert tenant_fs.read_bytes() == before


def test_existing_database_refused_as_secondary_from_python(tmp_path):
    tenant_fs = str(tmp_path / 'tenant.fs')
    make_tenant_fs(tenant_fs)
    with open(tenant_fs, 'rb') as f:
        before = f.read()
    children = [FileStorage(str(tmp_path / 'main.fs')),
                FileStorage(tenant_fs)]
    try:
        with pytest.raises(PartitionMapError, match='holds 2 records'):
            CompositeStorage([('main', 0, children[0]),
                              ('tenant', 1, children[1])])
    finally:
        for child in children:
            child.close()
    with open(tenant_fs, 'rb') as f:
        assert f.read() == before


def test_existing_mapping_storage_refused_as_secondary(tmp_path):
    """The class of the bug, for another child type."""
    from ZODB.MappingStorage import MappingStorage
    other = MappingStorage()
    db = ZODB.DB(other)
    with db.transaction() as conn:
        conn.root()['x'] = PersistentList([1])
    with pytest.raises(PartitionMapError, match='holds 2 records'):
        CompositeStorage([('main', 0, MappingStorage()),
                          ('tenant', 1, other)])
    assert len(other._data) == 2
    db.close()


def test_secondaries_the_composite_made_still_open(tmp_path):
    """A fresh secondary, read-only or not, and one the composite has
    written (its map came with its first records) are not refused."""
    import ZODB.config
    config = tenant_config(tmp_path)
    read_only = tenant_config(tmp_path, 'read-only true')
    FileStorage(str(tmp_path / 'main.fs')).close()
    FileStorage(str(tmp_path / 'tenant.fs')).close()
    ZODB.config.storageFromString(read_only).close()
    db = ZODB.DB(ZODB.config.storageFromString(config))
    conn = db.open()
    with placement(conn, 'tenant'):
        conn.root()['t'] = PersistentMapping(v=1)
        transaction.commit()
    db.close()
    for text in (config, read_only):
        db = ZODB.DB(ZODB.config.storageFromString(text))
        assert db.open().root()['t']['v'] == 1
        db.close()


def test_merging_a_database_as_the_refusal_says(tmp_path):
    """The way the refusal points to works: export the database's root,
    import it with default-partition set to a new partition, and its
    objects live there and survive a pack."""
    import time
    import ZODB.config
    old_fs = str(tmp_path / 'old-tenant.fs')
    make_tenant_fs(old_fs)
    export = str(tmp_path / 'tenant.export')
    db = ZODB.DB(FileStorage(old_fs, read_only=True))
    db.open().exportFile(z64, export)
    db.close()

    db = ZODB.DB(ZODB.config.storageFromString(tenant_config(
        tmp_path, 'default-partition tenant')))
    try:
        conn = db.open()
        conn.root()['tenant'] = imported = conn.importFile(export)
        transaction.commit()
        assert imported._p_oid[0] == 1
        assert imported['customers']._p_oid[0] == 1
        db.storage.pack(time.time() + 1)
        conn.cacheMinimize()
        assert conn.root()['tenant']['customers']['acme'] == 'Acme Ltd'
    finally:
        db.close()
