"""Scenario 8: no reader sees a transaction in only some partitions
(invariant 6)."""
import io
import pickle
import threading

import ZODB
from persistent.mapping import PersistentMapping
from ZODB.utils import p64
from ZODB.utils import u64

from compositestorage import placement

from conftest import make_composite
from conftest import new_tm

COMMITS = 200


def value_of(data):
    """The 'v' of a PersistentMapping record."""
    u = pickle.Unpickler(io.BytesIO(data))
    u.load()
    return u.load()['data']['v']


def setup_counters(tmp_path):
    storage, paths = make_composite(tmp_path)
    db = ZODB.DB(storage)
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    root['x'] = PersistentMapping(v=0)                 # main
    tm.commit()
    for name in ('b', 'c'):
        with placement(conn, name):
            root[name] = PersistentMapping(v=0)
            tm.commit()
    oids = [root[k]._p_oid for k in ('x', 'b', 'c')]
    assert [o[0] for o in oids] == [0, 1, 2]
    conn.close()
    return storage, db, oids


def test_readers_never_see_half_a_transaction(tmp_path):
    storage, db, oids = setup_counters(tmp_path)
    done = threading.Event()
    problems = []
    reads = {'fresh': 0, 'sync': 0, 'storage': 0}

    def writer():
        try:
            tm = new_tm()
            conn = db.open(transaction_manager=tm)
            root = conn.root()
            for i in range(1, COMMITS + 1):
                for k in ('x', 'b', 'c'):
                    root[k]['v'] = i
                tm.commit()
            conn.close()
        except Exception as e:  # reported by the main thread
            problems.append(('writer', repr(e)))
        finally:
            done.set()

    def check(kind, values):
        if len(set(values)) != 1:
            problems.append((kind, values))
        reads[kind] += 1

    def fresh_reader():
        # a fresh connection and transaction manager for every read
        try:
            while not done.is_set() or reads['fresh'] < 50:
                tm = new_tm()
                conn = db.open(transaction_manager=tm)
                conn.cacheMinimize()
                root = conn.root()
                check('fresh', [root[k]['v'] for k in ('x', 'b', 'c')])
                tm.abort()
                conn.close()
        except Exception as e:
            problems.append(('fresh', repr(e)))

    def sync_reader():
        # one connection that starts a new snapshot for every read
        try:
            tm = new_tm()
            conn = db.open(transaction_manager=tm)
            root = conn.root()
            while not done.is_set() or reads['sync'] < 50:
                tm.begin()
                conn.cacheMinimize()
                check('sync', [root[k]['v'] for k in ('x', 'b', 'c')])
            tm.abort()
            conn.close()
        except Exception as e:
            problems.append(('sync', repr(e)))

    def storage_reader():
        # the storage API itself: one snapshot tid for three loads
        try:
            while not done.is_set() or reads['storage'] < 50:
                before = p64(u64(storage.lastTransaction()) + 1)
                check('storage', [value_of(storage.loadBefore(oid, before)[0])
                                  for oid in oids])
        except Exception as e:
            problems.append(('storage', repr(e)))

    threads = [threading.Thread(target=f) for f in
               (fresh_reader, sync_reader, storage_reader)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert problems == []
    assert min(reads.values()) >= 50
    tm = new_tm()
    root = db.open(transaction_manager=tm).root()
    assert [root[k]['v'] for k in ('x', 'b', 'c')] == [COMMITS] * 3
    db.close()


def test_snapshot_started_inside_the_finish_window(tmp_path):
    """A reader that starts a snapshot while a commit is finishing must see
    all of it or none of it, even with a cached object from before it and
    a ghost loaded after it.

    The interleaving is forced: a reader thread is started at the moment
    ZODB's invalidation callback for the writer's commit is entered, i.e.
    inside the storage's tpc_finish, after every child has finished.  The
    callback gives the reader up to READER_GRACE seconds to finish before
    it returns: a storage that makes such a reader wait until the commit is
    over (as FileStorage does) passes after that grace, and one that lets
    it read in the window must give it a consistent snapshot.  The
    assertion is about the values read, never about time."""
    READER_GRACE = 1.0
    storage, db, oids = setup_counters(tmp_path)

    rtm = new_tm()
    rconn = db.open(transaction_manager=rtm)
    rroot = rconn.root()
    assert rroot['x']['v'] == 0 and rroot['b']['v'] == 0
    rroot['b']._p_deactivate()             # b a ghost, x live in cache
    rtm.abort()

    wtm = new_tm()
    wconn = db.open(transaction_manager=wtm)
    wroot = wconn.root()
    wroot['x']['v'] = 1
    wroot['b']['v'] = 1

    mvcc = db._mvcc_storage
    original = mvcc._invalidate_finish
    seen = []
    reader_done = threading.Event()

    def reader():
        try:
            rtm.begin()                     # a new snapshot
            seen.append((rroot['x']['v'], rroot['b']['v']))
            rtm.abort()
        except Exception as e:
            seen.append(repr(e))
        finally:
            reader_done.set()

    threads = []

    def read_in_window(tid, oids, committing):
        t = threading.Thread(target=reader)
        threads.append(t)
        t.start()
        reader_done.wait(READER_GRACE)
        return original(tid, oids, committing)

    mvcc._invalidate_finish = read_in_window
    try:
        wtm.commit()
    finally:
        del mvcc._invalidate_finish
    for t in threads:
        t.join()
    assert len(threads) == 1 and len(seen) == 1
    # whatever snapshot the reader got, it must be consistent
    x, b = seen[0]
    assert x == b, 'reader saw x=%r b=%r' % (x, b)
    rtm.begin()
    assert (rroot['x']['v'], rroot['b']['v']) == (1, 1)
    db.close()


def test_zeo_clients_never_see_half_a_transaction(tmp_path):
    """Through ZEO: one client commits across two partitions while another
    keeps starting new transactions and reading both halves."""
    import transaction
    import ZEO
    from conftest import composite_xml
    from conftest import main_and_catalog
    conf = composite_xml(main_and_catalog(tmp_path),
                         'placement round-robin', section_name='1')
    addr, stop = ZEO.server(storage_conf=conf)
    try:
        writer_db = ZEO.DB(addr)
        # server_sync: each new transaction of the reader waits for the
        # invalidations the server has sent, so it starts from the latest
        reader_db = ZEO.DB(addr, server_sync=True)
        try:
            tm = transaction.TransactionManager()
            conn = writer_db.open(tm)
            root = conn.root()
            # the server places new objects round-robin: one in each
            root['a'] = a = PersistentMapping(n=0)
            root['b'] = b = PersistentMapping(n=0)
            tm.commit()
            assert {a._p_oid[0], b._p_oid[0]} == {0, 1}
            done = threading.Event()
            seen = []

            def read():
                rtm = transaction.TransactionManager()
                rconn = reader_db.open(rtm)
                while not done.is_set():
                    rtm.begin()
                    rroot = rconn.root()
                    seen.append((rroot['a']['n'], rroot['b']['n']))
                    rtm.abort()
                rconn.close()

            thread = threading.Thread(target=read)
            thread.start()
            try:
                for _ in range(COMMITS // 2):
                    a['n'] += 1
                    b['n'] += 1
                    tm.commit()
            finally:
                done.set()
                thread.join(60)
            assert len(seen) > 10
            assert all(x == y for x, y in seen), [
                s for s in seen if s[0] != s[1]][:5]
            assert len(set(seen)) > 1          # the reader did see commits
        finally:
            writer_db.close()
            reader_db.close()
    finally:
        stop()
