"""The ZConfig path: ``%import compositestorage`` inside a ``<zodb>``."""
import importlib.resources

import transaction
import ZODB.config
from persistent.mapping import PersistentMapping

from compositestorage import CompositeStorage
from compositestorage import placement

CONFIG = """
%%import compositestorage
<zodb>
  <compositestorage>
    name shop
    placement round-robin
    default-partition catalog
    pack-gc false
    blob-dir %(dir)s/blobs
    <partition main>
      prefix 0
      <filestorage>
        path %(dir)s/main.fs
      </filestorage>
    </partition>
    <partition Catalog>
      prefix 1
      <filestorage>
        path %(dir)s/catalog.fs
      </filestorage>
    </partition>
    <partition archive>
      prefix 9
      read-only true
      <filestorage>
        path %(dir)s/archive.fs
      </filestorage>
    </partition>
  </compositestorage>
</zodb>
"""


def test_component_xml_ships_in_the_package():
    xml = importlib.resources.files('compositestorage') / 'component.xml'
    assert xml.is_file()
    assert '<sectiontype name="compositestorage"' in xml.read_text()


def test_database_from_zconfig(tmp_path):
    db = ZODB.config.databaseFromString(CONFIG % {'dir': tmp_path})
    try:
        storage = db.storage
        assert isinstance(storage, CompositeStorage)
        assert storage.getName() == 'shop'
        # ZConfig lower-cases section names
        assert [(p.name, p.prefix) for p in storage.partitions] == [
            ('main', 0), ('catalog', 1), ('archive', 9)]
        assert storage.default_partition.name == 'catalog'
        assert storage.partition_named('archive').read_only
        assert storage._pack_gc is False
        # blob-dir reaches every FileStorage child without one of its own
        assert {p.storage.blob_dir for p in storage.partitions} == {
            str(tmp_path / 'blobs')}
        conn = db.open()
        root = conn.root()
        for i in range(4):
            root[i] = PersistentMapping(i=i)
        transaction.commit()
        with placement(conn, 'main'):
            root['m'] = PersistentMapping()
            transaction.commit()
        # round-robin skips the read-only partition
        assert {root[i]._p_oid[0] for i in range(4)} == {0, 1}
        assert root['m']._p_oid[0] == 0
        conn.close()
    finally:
        db.close()
    db = ZODB.config.databaseFromString(CONFIG % {'dir': tmp_path})
    try:
        root = db.open().root()
        assert [root[i]['i'] for i in range(4)] == [0, 1, 2, 3]
    finally:
        db.close()
