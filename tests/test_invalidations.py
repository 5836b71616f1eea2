"""lastInvalidations, and what it buys ZEO clients across a server restart."""
import os

import transaction
import ZEO
import ZODB
from persistent.mapping import PersistentMapping

from conftest import composite_xml
from conftest import main_and_catalog
from conftest import make_composite
from conftest import new_tm


def _fill(db, n):
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    tids = []
    for i in range(n):
        root[i] = PersistentMapping(i=i)
        tm.commit()
        tids.append(root._p_serial)
    conn.close()
    return tids


def test_last_invalidations_oldest_first_without_internal_records(tmp_path):
    storage, _ = make_composite(tmp_path, placement='round-robin')
    db = ZODB.DB(storage)
    try:
        tids = _fill(db, 6)
        last = storage.lastInvalidations(4)
        # chronological, as ZEO's IServeable asks
        assert [tid for tid, _ in last] == tids[-4:]
        for tid, oids in last:
            # each commit changed the root (main) and added one object,
            # wherever round-robin put it; no stub or map shows
            assert oids[0] == b'\0' * 8 or b'\0' * 8 in oids
            assert len(oids) == 2
            for oid in oids:
                part = storage.partition_for(oid)
                assert oid[1:] != b'\xff' * 7
                assert part.owns(oid)
        prefixes = {oid[0] for _, oids in last for oid in oids}
        assert storage.lastInvalidations(0) == []
        assert len(prefixes) > 1           # the commits crossed partitions
        # the very first transaction (root creation) is there too
        assert len(storage.lastInvalidations(100)) == 7
    finally:
        db.close()


def test_client_cache_survives_a_server_restart(tmp_path):
    """A client that was behind when the server restarted gets the
    invalidations it missed instead of dropping its whole cache."""
    conf = composite_xml(main_and_catalog(tmp_path), 'placement round-robin',
                         section_name='1')
    var = str(tmp_path / 'client')
    os.mkdir(var)
    addr, stop = ZEO.server(storage_conf=conf)
    try:
        db = ZEO.DB(addr, client='a', var=var)
        conn = db.open()
        root = conn.root()
        for i in range(6):
            root[i] = PersistentMapping(i=i)
        transaction.commit()
        oids = {i: root[i]._p_oid for i in range(6)}
        assert len({oid[0] for oid in oids.values()}) == 2
        conn.close()
        db.close()                       # the persistent cache is saved

        other = ZEO.DB(addr)             # another client moves on
        oconn = other.open()
        oconn.root()[0]['i'] = 'changed'
        transaction.commit()
        oconn.close()
        other.close()
    finally:
        stop()

    addr, stop = ZEO.server(storage_conf=conf, port=addr[1])
    try:
        client = ZEO.client(addr, client='a', var=var)
        try:
            cache = client._cache
            # the object changed while the client was away is invalidated,
            # the others are still cached
            assert cache.load(oids[0]) is None
            kept = [i for i in range(1, 6) if cache.load(oids[i])]
            assert kept == [1, 2, 3, 4, 5]
            db = ZODB.DB(client)
            assert db.open().root()[0]['i'] == 'changed'
            db.close()
        finally:
            client.close()
    finally:
        stop()
