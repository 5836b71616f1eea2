"""``containment true`` in ``<compositestorage>`` (and ``containment=true``
in a ``composite:`` URI) switches containment on in every ``ZODB.DB``
opened from that config; ``containment(db)`` refuses a ZEO client (a real
server on 127.0.0.1) and any storage that is not a composite here."""
import pytest
import transaction
import ZODB
import ZODB.config
import zodburi
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage

from compositestorage import ConfigurationError
from compositestorage import containment
from compositestorage import placement
from compositestorage.placement import ContainmentConnection
from conftest import composite_xml
from conftest import main_and_catalog


def zodb_conf(tmp_path, top=''):
    return composite_xml(main_and_catalog(tmp_path), top=top, zodb=True)


def placed_beside_its_referrer(db):
    """Commit a catalog, then a new object reached only through it, on the
    first connection the DB hands out; the new object's prefix."""
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    with placement(conn, 'catalog'):
        conn.root()['catalog'] = PersistentMapping()
        tm.commit()
    conn.root()['catalog']['entry'] = entry = PersistentMapping(v=1)
    tm.commit()
    conn.close()
    return entry._p_oid[0]


@pytest.mark.parametrize('value, prefix', [('true', 1), ('false', 0),
                                           (None, 0)])
def test_the_containment_key_of_a_zodb_conf(tmp_path, value, prefix):
    top = 'containment %s' % value if value else ''
    db = ZODB.config.databaseFromString(zodb_conf(tmp_path, top))
    try:
        assert (db.klass is ContainmentConnection) == (prefix == 1)
        assert getattr(db.storage, 'containment', False) == (prefix == 1)
        assert placed_beside_its_referrer(db) == prefix
    finally:
        db.close()


def test_a_db_made_on_a_storage_from_a_config_gets_it(tmp_path):
    """A storage opened from a bare <compositestorage>, then a ZODB.DB."""
    storage = ZODB.config.storageFromString(
        composite_xml(main_and_catalog(tmp_path), top='containment on'))
    db = ZODB.DB(storage)
    assert db.klass is ContainmentConnection
    assert placed_beside_its_referrer(db) == 1
    db.close()


def test_the_containment_query_key_of_a_uri(tmp_path):
    uri = ('composite:(file://%s/main.fs)/catalog=1:(file://%s/catalog.fs)'
           '?containment=true' % (tmp_path, tmp_path))
    factory, dbkw = zodburi.resolve_uri(uri)
    db = ZODB.DB(factory(), **dbkw)
    try:
        assert placed_beside_its_referrer(db) == 1
    finally:
        db.close()


def test_containment_refuses_a_zeo_client(tmp_path, serving):
    import ZEO
    from test_cli import zeo_conf
    conf = tmp_path / 'zeo.conf'
    conf.write_text(zeo_conf(str(tmp_path)))
    served = serving(['--config', str(conf)], tmp_path, 3)
    db = ZEO.DB((served.host, served.port), server_sync=True)
    try:
        with pytest.raises(ConfigurationError) as exc:
            containment(db)
        text = str(exc.value)
        assert 'ClientStorage' in text and 'through ZEO' in text
        assert "server's placement policy" in text and '\n' not in text
        assert db.klass is not ContainmentConnection
    finally:
        db.close()


def test_containment_refuses_a_plain_storage(tmp_path):
    db = ZODB.DB(FileStorage(str(tmp_path / 'plain.fs')))
    try:
        with pytest.raises(ConfigurationError) as exc:
            containment(db)
        assert 'over a FileStorage' in str(exc.value)
    finally:
        db.close()


def test_the_key_in_a_served_config_is_said_to_do_nothing(tmp_path,
                                                         serving):
    from test_cli import zeo_conf
    conf = tmp_path / 'zeo.conf'
    conf.write_text(zeo_conf(str(tmp_path), top='containment true'))
    served = serving(['--config', str(conf)], tmp_path, 3)
    assert 'has no effect in a ZEO server' in served.stderr()
    assert served.proc.poll() is None       # and it goes on serving
