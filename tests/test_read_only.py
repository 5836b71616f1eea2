"""``read-only true`` on the composite and on single partitions."""
import os

import pytest
import transaction
import ZEO
import ZODB.config
from persistent.mapping import PersistentMapping
from ZODB.POSException import ReadOnlyError

from compositestorage import ReadOnlyPartitionError
from compositestorage import placement
from conftest import composite_xml
from conftest import main_and_catalog

def config(directory, top='', catalog=''):
    return composite_xml(main_and_catalog(directory, catalog), top,
                         zodb=True)


def sizes(tmp_path):
    return {name: os.path.getsize(tmp_path / name)
            for name in ('main.fs', 'catalog.fs')}


@pytest.fixture
def existing(tmp_path):
    db = ZODB.config.databaseFromString(
        config(tmp_path))
    conn = db.open()
    with placement(conn, 'catalog'):
        conn.root()['c'] = PersistentMapping(v=1)
        transaction.commit()
    conn.root()['m'] = PersistentMapping(v=2)
    transaction.commit()
    db.close()
    return tmp_path


def test_read_only_composite(existing):
    before = sizes(existing)
    db = ZODB.config.databaseFromString(
        config(existing, top='read-only true'))
    try:
        assert db.storage.isReadOnly()
        conn = db.open()
        root = conn.root()
        assert (root['c']['v'], root['m']['v']) == (1, 2)
        root['m']['v'] = 3
        with pytest.raises(ReadOnlyError):
            transaction.commit()
        transaction.abort()
        with pytest.raises(ReadOnlyError):
            db.storage.new_oid()
    finally:
        db.close()
    assert sizes(existing) == before


def test_read_only_partition_refuses_writes_and_writes_nothing(existing):
    before = sizes(existing)
    db = ZODB.config.databaseFromString(
        config(existing, catalog='read-only true'))
    try:
        conn = db.open()
        root = conn.root()
        assert root['c']['v'] == 1               # reads work
        root['m']['v'] = 3                       # main: writable
        root['c']['v'] = 4                       # catalog: read-only
        with pytest.raises(ReadOnlyPartitionError) as exc:
            transaction.commit()
        transaction.abort()
        assert "'catalog'" in str(exc.value)
        assert '0x01' in str(exc.value)          # the oid, in hex
        assert isinstance(exc.value, ReadOnlyError)
        with pytest.raises(ReadOnlyPartitionError):
            with placement(conn, 'catalog'):
                pass
        # writes that stay out of the read-only partition go through
        root['m']['v'] = 5
        transaction.commit()
    finally:
        db.close()
    after = sizes(existing)
    assert after['catalog.fs'] == before['catalog.fs']
    assert after['main.fs'] > before['main.fs']


def test_read_only_composite_through_zeo(existing):
    before = sizes(existing)
    addr, stop = ZEO.server(storage_conf=composite_xml(
        main_and_catalog(existing), 'read-only true', section_name='1'))
    try:
        # a read-only server takes read-only clients (ZEO's rule)
        db = ZEO.DB(addr, read_only=True)
        try:
            assert db.storage.isReadOnly()
            conn = db.open()
            assert conn.root()['c']['v'] == 1
            conn.root()['m']['v'] = 9
            with pytest.raises(ReadOnlyError):
                transaction.commit()
            transaction.abort()
        finally:
            db.close()
    finally:
        stop()
    assert sizes(existing) == before
