"""Keyed namespaces (issue 15): ``keyed(conn, namespace, key, factory)``
and ``storage.lookup(namespace, key)``, with real FileStorage children, real
processes and a real ZEO server (``compositestorage serve``)."""
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.POSException import ConflictError

import compositestorage.keys
from compositestorage import KeyedError
from compositestorage import ReadOnlyPartitionError
from compositestorage import keyed
from compositestorage.keys import table_oid
from compositestorage.namespaces import KeyTable
from compositestorage.namespaces import find
from compositestorage.verify import verify

from conftest import TIMEOUT
from conftest import TWO
from conftest import make_composite
from conftest import new_tm
from conftest import open_composite

DN = 'cn=Alice Smith,ou=People,dc=example,dc=com'
UUID = uuid.UUID('1b4e28ba-2fa1-11d2-883f-0016d3cca427')


class Counting:
    """A factory that counts its calls."""

    def __init__(self, **state):
        self.calls = 0
        self.state = state

    def __call__(self):
        self.calls += 1
        return PersistentMapping(self.state)


@pytest.fixture
def db(tmp_path, closing):
    storage, paths = make_composite(tmp_path, TWO)
    db = ZODB.DB(storage)
    closing(db)
    db.paths = paths
    return db


def reopen(db, closing, **kw):
    db.close()
    storage = open_composite(db.paths, TWO, **kw)
    new = ZODB.DB(storage)
    closing(new)
    new.paths = db.paths
    return new


def keyed_oids(storage, prefix):
    """The keyed objects' oids in partition ``prefix`` (no key tables)."""
    part = storage.partitions[prefix]
    return sorted(oid for oid in part.own_oids()
                  if 0x80 <= oid[1] < 0xe0)


# --- the three kinds of key --------------------------------------------------

def test_integer_keys_map_directly(db):
    conn = db.open()
    make = Counting()
    obj = keyed(conn, 'b', 42, make)
    assert obj._p_oid == bytes([1, 0x80, 0, 0, 0, 0, 0, 42])
    assert keyed(conn, 'b', 42, make) is obj        # same transaction
    conn.root()['x'] = obj
    transaction.commit()
    assert db.storage.lookup('b', 42) == obj._p_oid
    assert db.storage.lookup('b', 43) is None
    assert db.storage.lookup('main', 42) is None
    other = db.open(new_tm())
    assert keyed(other, 'b', 42, make) is not obj
    assert keyed(other, 'b', 42, make)._p_oid == obj._p_oid
    assert make.calls == 1
    # the top of the integer range, and beyond it
    top = keyed(conn, 'b', 2**54 - 1, make)
    assert top._p_oid == bytes([1, 0xbf]) + b'\xff' * 6
    for bad in (-1, 2**54, True, 1.5, b'cn=x'):
        with pytest.raises(KeyedError) as exc:
            keyed(conn, 'b', bad, make)
        assert "namespace 'b'" in str(exc.value)
    transaction.abort()


def test_uuid_keys_in_every_spelling(db):
    conn = db.open()
    make = Counting()
    obj = keyed(conn, 'b', UUID, make)
    conn.root()['x'] = obj
    transaction.commit()
    assert obj._p_oid[0] == 1 and 0xc0 <= obj._p_oid[1] < 0xe0
    for spelling in (str(UUID), str(UUID).upper(), UUID.hex, UUID.urn,
                     '{%s}' % UUID):
        assert keyed(conn, 'b', spelling, make) is obj
        assert db.storage.lookup('b', spelling) == obj._p_oid
    assert make.calls == 1
    assert db.storage.lookup('b', uuid.uuid4()) is None


def test_dn_keys_normalized_as_ldap_compares_them(db):
    conn = db.open()
    make = Counting()
    obj = keyed(conn, 'b', DN, make)
    conn.root()['x'] = obj
    transaction.commit()
    for spelling in ('CN=alice smith , OU=People;DC=Example,dc=COM',
                     'cn = Alice Smith,ou=people,dc=example,dc=com',
                     'cn=Alice\\20Smith,ou=People,dc=example,dc=com'):
        assert keyed(conn, 'b', spelling, make) is obj
        assert db.storage.lookup('b', spelling) == obj._p_oid
    assert make.calls == 1
    # escapes and multi-valued RDNs are part of the key, in any order
    a = keyed(conn, 'b', 'cn=a\\,b+uid=1,dc=x', make)
    assert keyed(conn, 'b', 'UID=1+cn=A\\2Cb,dc=x', make) is a
    assert keyed(conn, 'b', 'cn=a+uid=1,dc=x', make) is not a
    for bad in ('alice', '', 'cn=x,', '=x', 'cn=x\\'):
        with pytest.raises(KeyedError) as exc:
            keyed(conn, 'b', bad, make)
        assert 'not a distinguished name' in str(exc.value)
    transaction.abort()


def test_unknown_namespace_and_bad_factory(db):
    conn = db.open()
    with pytest.raises(Exception) as exc:
        keyed(conn, 'nowhere', 1, PersistentMapping)
    assert "'nowhere'" in str(exc.value) and 'configured' in str(exc.value)
    with pytest.raises(KeyedError) as exc:
        keyed(conn, 'b', 1, dict)
    assert 'not a persistent object' in str(exc.value)
    used = conn.root()
    with pytest.raises(KeyedError) as exc:
        keyed(conn, 'b', 2, lambda: used)
    assert 'already has an oid' in str(exc.value)
    transaction.abort()


# --- keyed oids beside allocated ones ----------------------------------------

def test_keyed_and_allocated_oids_never_meet(db, closing):
    conn = db.open()
    with compositestorage.placement(conn, 'b'):
        conn.root()['plain'] = plain = PersistentMapping()
        transaction.commit()
    conn.root()['k'] = [keyed(conn, 'b', n, PersistentMapping)
                        for n in (0, 1, 2**54 - 1)]
    conn.root()['h'] = keyed(conn, 'b', DN, PersistentMapping)
    transaction.commit()
    # after a restart the allocator derives its next oid from the child:
    # keyed oids above its range must not move it
    db = reopen(db, closing)
    new = db.storage.new_oid_in('b')
    assert new[0] == 1 and new[1] < 0x80
    assert new == (int.from_bytes(plain._p_oid, 'big') + 1).to_bytes(8, 'big')


def test_keyed_objects_are_ordinary_objects(db):
    conn = db.open()
    before = len(db.storage)
    conn.root()['k'] = [keyed(conn, 'b', 7, PersistentMapping),
                        keyed(conn, 'b', DN, PersistentMapping)]
    transaction.commit()
    storage = db.storage
    oids = set(keyed_oids(storage, 1))
    assert len(oids) == 2
    # and the DN's key table: all count, and iteration shows them
    assert len(storage) == before + 2 + 1
    last = list(storage.iterator())[-1]
    assert oids <= {r.oid for r in last}
    seen, token = set(), None
    while True:
        oid, _, _, token = storage.record_iternext(token)
        seen.add(oid)
        if token is None:
            break
    assert oids <= seen
    problems, counts = verify(storage)
    assert problems == [] and counts['b']['objects'] == 3


# --- collisions --------------------------------------------------------------

@pytest.fixture
def weak_hash(monkeypatch):
    """Every key hashes to slot 7 of one table."""
    monkeypatch.setattr(compositestorage.keys, 'hash_key', lambda data: 7)


def test_forced_collisions_give_each_key_its_own_oid(db, closing, weak_hash):
    conn = db.open()
    dns = ['cn=user%d,dc=example,dc=com' % i for i in range(6)]
    make = Counting()
    objs = [keyed(conn, 'b', dn, make) for dn in dns]
    objs.append(keyed(conn, 'b', UUID, make))
    for obj, key in zip(objs, dns + [UUID]):
        obj['key'] = str(key)
    conn.root()['all'] = objs
    transaction.commit()
    oids = [o._p_oid for o in objs]
    assert len(set(oids)) == 7 and make.calls == 7
    assert oids[0] == bytes([1, 0xc0, 0, 0, 0, 0, 0, 7])    # the home slot
    # every probe stays in the one table that covers the home slot
    assert {o[-2:] for o in oids} == {b'\x00\x07'}
    db = reopen(db, closing)
    conn = db.open()
    for key, oid in zip(dns + [UUID], oids):
        assert db.storage.lookup('b', key) == oid
        assert keyed(conn, 'b', key, make)['key'] == str(key)
        assert find(conn, 'b', key)._p_oid == oid
    assert make.calls == 7
    assert db.storage.lookup('b', 'cn=nobody') is None
    assert find(conn, 'b', 'cn=nobody') is None
    table = conn.get(table_oid(1, 7))
    assert isinstance(table, KeyTable) and len(table.keys) == 7


def test_colliding_keys_created_at_once_both_survive(db, weak_hash):
    """Two connections create different keys with one home slot: the
    second commit conflicts, and its retry takes the next slot."""
    tm1, tm2 = new_tm(), new_tm()
    c1, c2 = db.open(tm1), db.open(tm2)
    a = keyed(c1, 'b', 'cn=a', PersistentMapping)
    c1.root()['a'] = a
    b = keyed(c2, 'b', 'cn=b', PersistentMapping)
    assert a._p_oid == b._p_oid                 # neither knows the other
    tm1.commit()
    with pytest.raises(ConflictError):
        c2.root()['b'] = b
        tm2.commit()
    tm2.abort()
    for attempt in tm2.attempts():
        with attempt:
            b = keyed(c2, 'b', 'cn=b', PersistentMapping)
            c2.root()['b'] = b
    assert b._p_oid != a._p_oid
    assert db.storage.lookup('b', 'cn=a') == a._p_oid
    assert db.storage.lookup('b', 'cn=b') == b._p_oid


def test_new_keys_in_one_table_merge_without_conflict(db, monkeypatch):
    """Different keys that one key table covers, created at once by two
    connections: the table's conflict resolution merges them."""
    monkeypatch.setattr(compositestorage.keys, 'hash_key',
                        lambda data: (len(data) << 16) | 5)
    conn = db.open()
    conn.root()['first'] = keyed(conn, 'b', 'cn=x', PersistentMapping)
    transaction.commit()                        # the table exists
    tm1, tm2 = new_tm(), new_tm()
    c1, c2 = db.open(tm1), db.open(tm2)
    a = keyed(c1, 'b', 'cn=aa', PersistentMapping)
    b = keyed(c2, 'b', 'cn=bbb', PersistentMapping)
    assert a._p_oid != b._p_oid and a._p_oid[-2:] == b._p_oid[-2:]
    tm1.commit()
    tm2.commit()                                # no ConflictError
    for key, obj in (('cn=x', conn.root()['first']), ('cn=aa', a),
                     ('cn=bbb', b)):
        assert db.storage.lookup('b', key) == obj._p_oid


# --- the same key twice at once ----------------------------------------------

def test_same_key_from_two_connections_is_created_once(db):
    tm1, tm2 = new_tm(), new_tm()
    c1, c2 = db.open(tm1), db.open(tm2)
    for key in (5, DN, UUID):
        a = keyed(c1, 'b', key, lambda: PersistentMapping(by='c1'))
        b = keyed(c2, 'b', key, lambda: PersistentMapping(by='c2'))
        assert a._p_oid == b._p_oid
        tm1.commit()
        made = Counting(by='retry')
        for attempt in tm2.attempts():
            with attempt:
                b = keyed(c2, 'b', key, made)
                b['seen'] = True
        assert b._p_oid == a._p_oid and b['by'] == 'c1'
        assert made.calls == 0
    assert len(keyed_oids(db.storage, 1)) == 3


# --- pack -------------------------------------------------------------------

def test_pack_keeps_referenced_keyed_objects_and_every_key_table(db):
    conn = db.open()
    kept = keyed(conn, 'b', DN, PersistentMapping)
    conn.root()['kept'] = kept
    dropped = keyed(conn, 'b', 'cn=temporary', PersistentMapping)
    number = keyed(conn, 'b', 3, PersistentMapping)
    transaction.commit()
    dropped_oid = dropped._p_oid
    db.pack(time.time() + 1)
    storage = db.storage
    assert storage.lookup('b', DN) == kept._p_oid
    # nothing referenced them: garbage, like any object
    assert storage.lookup('b', 'cn=temporary') is None
    assert storage.lookup('b', 3) is None
    part = storage.partitions[1]
    assert table_oid(1, compositestorage.keys.home_slot(
        'dn:cn=temporary')) in part.key_table_oids()
    # the key keeps its oid: asking again re-creates it there
    conn2 = db.open(new_tm())
    again = keyed(conn2, 'b', 'cn=temporary', PersistentMapping)
    assert again._p_oid == dropped_oid
    assert keyed(conn2, 'b', 3, PersistentMapping)._p_oid == number._p_oid
    conn2.root()['again'] = again
    conn2.transaction_manager.commit()
    assert storage.lookup('b', 'cn=temporary') == dropped_oid
    assert verify(storage)[0] == []


def test_undone_creation_is_a_clear_error(db):
    conn = db.open()
    conn.root()['x'] = keyed(conn, 'b', 9, PersistentMapping)
    transaction.commit()
    oid = conn.root()['x']._p_oid
    db.undo(db.undoLog(0, 1)[0]['id'])
    transaction.commit()
    conn2 = db.open(new_tm())
    with pytest.raises(KeyedError) as exc:
        keyed(conn2, 'b', 9, PersistentMapping)
    text = str(exc.value)
    assert oid.hex() in text and 'pack' in text


def test_read_only_partition(db, closing):
    conn = db.open()
    conn.root()['x'] = keyed(conn, 'b', 1, PersistentMapping)
    transaction.commit()
    db = reopen(db, closing, read_only_partitions=('b',))
    conn = db.open()
    assert keyed(conn, 'b', 1, PersistentMapping)._p_oid[0] == 1
    for key in (2, DN):
        with pytest.raises(ReadOnlyPartitionError) as exc:
            keyed(conn, 'b', key, PersistentMapping)
        assert "'b'" in str(exc.value)
    transaction.abort()


# --- idempotent import -------------------------------------------------------

PEOPLE = [(DN, 'Alice'), ('cn=Bob,ou=People,dc=example,dc=com', 'Bob'),
          (str(UUID), 'Service account'), (1001, 'Employee 1001')]


def run_import(conn, rows):
    """Create or update one object per row; returns how many were new."""
    made = Counting()
    directory = conn.root().setdefault('people', PersistentMapping())
    for key, name in rows:
        person = keyed(conn, 'b', key, made)
        if person.get('name') != name:
            person['name'] = name
        if directory.get(str(key)) is not person:
            directory[str(key)] = person
    conn.transaction_manager.commit()
    return made.calls


def test_an_import_run_twice_creates_nothing_the_second_time(db, closing):
    conn = db.open()
    assert run_import(conn, PEOPLE) == 4
    sizes = {name: os.path.getsize(path) for name, path in db.paths.items()}
    assert run_import(conn, PEOPLE) == 0
    assert {name: os.path.getsize(path)
            for name, path in db.paths.items()} == sizes
    # across a restart and a pack, too
    db.pack(time.time() + 1)
    db = reopen(db, closing)
    conn = db.open()
    count = len(db.storage)
    assert run_import(conn, PEOPLE) == 0
    assert len(db.storage) == count
    assert len(keyed_oids(db.storage, 1)) == 4


# --- across processes, and through ZEO ---------------------------------------

EMBEDDED = textwrap.dedent('''
    import json, sys, transaction, ZODB
    from persistent.mapping import PersistentMapping
    from ZODB.FileStorage import FileStorage
    from compositestorage import CompositeStorage, keyed
    main, b, keys = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    storage = CompositeStorage([('main', 0, FileStorage(main)),
                                ('b', 1, FileStorage(b))])
    db = ZODB.DB(storage)
    conn = db.open()
    made = []
    objs = [keyed(conn, 'b', k, lambda k=k: made.append(k) or
                  PersistentMapping()) for k in keys]
    conn.root()['objs'] = objs
    transaction.commit()
    print(json.dumps({'oids': [o._p_oid.hex() for o in objs],
                      'made': made}))
    db.close()
''')

KEYS = [12, DN, str(UUID), 'uid=x+cn=y,dc=example,dc=org']


def run_embedded(tmp_path, name, seed):
    out = subprocess.run(
        [sys.executable, '-c', EMBEDDED, str(tmp_path / (name + '-main.fs')),
         str(tmp_path / (name + '-b.fs')), json.dumps(KEYS)],
        env=dict(os.environ, PYTHONHASHSEED=str(seed)), capture_output=True,
        text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_same_oids_in_two_processes_without_talking(tmp_path):
    """Two processes on two separate composites, with different hash seeds,
    give every key the same oid; a third, on the first's files, finds
    them and creates nothing."""
    one = run_embedded(tmp_path, 'one', 1)
    two = run_embedded(tmp_path, 'two', 2)
    assert one['oids'] == two['oids'] and len(set(one['oids'])) == 4
    assert one['made'] == two['made'] == KEYS
    again = run_embedded(tmp_path, 'one', 3)
    assert again == {'oids': one['oids'], 'made': []}


ZEO_CLIENT = textwrap.dedent('''
    import json, os, sys, time, transaction, ZEO
    from persistent.mapping import PersistentMapping
    from compositestorage import keyed
    from compositestorage.namespaces import declare_namespaces
    port, me, sync, keys = (int(sys.argv[1]), sys.argv[2], sys.argv[3],
                            json.loads(sys.argv[4]))
    db = ZEO.DB(('127.0.0.1', port), server_sync=True)
    declare_namespaces(db, {'catalog': 1})
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    attempts = 0
    for attempt in tm.attempts(5):
        with attempt:
            attempts += 1
            made = []
            objs = [keyed(conn, 'catalog', k, lambda k=k: made.append(k) or
                          PersistentMapping(creator=me)) for k in keys]
            if attempts == 1:
                # both processes have their objects before either commits
                open(os.path.join(sync, me + '.ready'), 'w').close()
                while not os.path.exists(os.path.join(sync, me + '.go')):
                    time.sleep(0.02)
    print(json.dumps({'oids': [o._p_oid.hex() for o in objs],
                      'creators': [o['creator'] for o in objs],
                      'made': made, 'attempts': attempts}))
    db.close()
''')


def test_same_key_through_zeo_from_two_processes(tmp_path, serving):
    served = serving(['--address', '127.0.0.1:0'], tmp_path, 2)
    # The root first: two clients opening a fresh database at once both
    # create it, and one of them fails with a ConflictError (ZODB.DB).
    import ZEO
    ZEO.DB(('127.0.0.1', served.port)).close()
    sync = tmp_path / 'sync'
    sync.mkdir()
    clients = {
        me: subprocess.Popen(
            [sys.executable, '-c', ZEO_CLIENT, str(served.port), me,
             str(sync), json.dumps(KEYS)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for me in ('first', 'second')}
    try:
        deadline = time.time() + TIMEOUT
        while not all((sync / (me + '.ready')).exists() for me in clients):
            assert time.time() < deadline, [
                p.stderr.read() for p in clients.values()
                if p.poll() is not None]
            time.sleep(0.05)
        results = {}
        for me in ('first', 'second'):
            (sync / (me + '.go')).touch()
            out, err = clients[me].communicate(timeout=TIMEOUT)
            assert clients[me].returncode == 0, err
            results[me] = json.loads(out)
    finally:
        for proc in clients.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    first, second = results['first'], results['second']
    assert first['oids'] == second['oids'] and len(set(first['oids'])) == 4
    assert all(oid.startswith('01') for oid in first['oids'])
    assert first == dict(first, made=KEYS, attempts=1)
    # the second commit conflicted; its retry found the first's objects
    assert second['attempts'] == 2 and second['made'] == []
    assert second['creators'] == ['first'] * 4
    assert served.stop() == 0
    storage = open_composite(
        {'main': str(tmp_path / 'var' / 'main.fs'),
         'catalog': str(tmp_path / 'var' / 'catalog.fs')},
        (('main', 0), ('catalog', 1)), read_only=True)
    try:
        assert [storage.lookup('catalog', k).hex() for k in KEYS] == \
            first['oids']
        assert len(keyed_oids(storage, 1)) == 4     # nothing duplicated
    finally:
        storage.close()


def test_zeo_needs_declared_namespaces(tmp_path, serving):
    served = serving(['--address', '127.0.0.1:0'], tmp_path, 2)
    import ZEO
    from compositestorage.namespaces import declare_namespaces
    db = ZEO.DB(('127.0.0.1', served.port), server_sync=True)
    try:
        conn = db.open()
        with pytest.raises(KeyedError) as exc:
            keyed(conn, 'catalog', DN, PersistentMapping)
        assert 'declare_namespaces' in str(exc.value)
        declare_namespaces(db, {'catalog': 1, 'wrong': 0})
        conn.root()['x'] = keyed(conn, 'catalog', DN, PersistentMapping)
        transaction.commit()
        assert find(conn, 'catalog', DN) is conn.root()['x']
        # a table under a wrongly declared prefix names its namespace
        declare_namespaces(db, {'wrong': 1})
        with pytest.raises(KeyedError) as exc:
            keyed(conn, 'wrong', DN, PersistentMapping)
        assert "'catalog'" in str(exc.value) and 'prefix' in str(exc.value)
        transaction.abort()
    finally:
        db.close()
