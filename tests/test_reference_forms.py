"""Scenario 3: every reference form that crosses partitions (invariant 4)."""
import io

import persistent
import ZODB
from persistent.mapping import PersistentMapping
from persistent.wref import WeakRef
from ZODB._compat import PersistentPickler
from ZODB.broken import find_global
from ZODB.FileStorage import FileStorage
from ZODB.persistentclass import PersistentMetaClass
from ZODB.utils import z64

from compositestorage import PartitionStub
from compositestorage import placement
from compositestorage.references import persistent_ids

from conftest import THREE
from conftest import check_child_self_contained
from conftest import child_records
from conftest import is_stub
from conftest import new_tm
from conftest import open_composite
from conftest import paths_for
from conftest import Ref
from conftest import pm_record
from conftest import raw_commit
from conftest import unpickle_record

HOMES = {prefix: name for name, prefix in THREE}


class PNewArgs(persistent.Persistent):
    """A persistent class with __getnewargs__: ZODB refers to its instances
    by a plain oid, without a class hint."""

    def __init__(self, value):
        self.value = value

    def __getnewargs__(self):
        return (None,)

    def __new__(cls, value=None):
        return persistent.Persistent.__new__(cls)


def test_plain_and_hinted_references(tmp_path, closing):
    paths = paths_for(tmp_path)
    storage = open_composite(paths)
    db = ZODB.DB(storage)
    closing(db)
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    with placement(conn, 'b'):
        target = PersistentMapping(v='target')   # (oid, klass) form
        newargs = PNewArgs(42)                   # plain oid form
        conn.add(target)
        conn.add(newargs)
    root['hinted'] = target
    root['plain'] = newargs
    tm.commit()
    t_oid, n_oid = target._p_oid, newargs._p_oid
    assert t_oid[0] == 1 and n_oid[0] == 1
    db.close()

    main = child_records(paths['main'])
    refs = persistent_ids(main[z64])
    # the class hint in the child names the stub class, the oid is T itself
    hinted = [r for r in refs if isinstance(r, tuple) and r[0] == t_oid]
    assert hinted
    # ... and, in its name, the GET of the root's own class it replaced
    # (the stub names the class)
    assert b'compositestorage.stubs\nPartitionStub:::h00\n' in main[z64]
    assert n_oid in refs                         # plain ref kept as is
    assert is_stub(main[t_oid]) and is_stub(main[n_oid])
    check_child_self_contained(paths['main'], 0, HOMES)
    fs = FileStorage(paths['main'], read_only=True)
    plain = ZODB.DB(fs)
    try:
        proot = plain.open().root()
        assert isinstance(proot['hinted'], PartitionStub)
        assert isinstance(proot['plain'], PartitionStub)
        assert proot['hinted'].home == 'b'
    finally:
        plain.close()

    storage = open_composite(paths)
    db = ZODB.DB(storage)
    closing(db)
    root = db.open().root()
    # the composite gives ZODB the original (oid, class) reference back
    raw = storage.load(z64)[0]
    assert b'compositestorage.stubs' not in raw
    assert type(root['hinted']) is PersistentMapping
    assert root['hinted']['v'] == 'target'
    assert type(root['plain']) is PNewArgs
    assert root['plain'].value == 42


def test_weak_references_cross_partitions(tmp_path, closing):
    paths = paths_for(tmp_path)
    storage = open_composite(paths)
    db = ZODB.DB(storage)
    closing(db)
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    with placement(conn, 'c'):
        strong_home = PersistentMapping()
        root['c_home'] = strong_home
        tm.commit()
        target = PersistentMapping(v='weakly held')
        strong_home['t'] = target          # strongly held from c only
        tm.commit()
    with placement(conn, 'b'):
        holder = PersistentMapping()
        conn.add(holder)
    holder['w'] = WeakRef(target)          # b -> c, weak only
    root['holder'] = holder
    tm.commit()
    h_oid, t_oid = holder._p_oid, target._p_oid
    assert (h_oid[0], t_oid[0]) == (1, 2)
    db.close()

    b = child_records(paths['b'])
    assert ['w', (t_oid,)] in persistent_ids(b[h_oid])
    assert is_stub(b[t_oid])               # the weak ref has its stub
    check_child_self_contained(paths['b'], 1, HOMES)

    # in the child alone, the weak reference resolves to the stub
    fs = FileStorage(paths['b'], read_only=True)
    plain = ZODB.DB(fs)
    try:
        h = plain.open().get(h_oid)
        stub = h['w']()
        assert isinstance(stub, PartitionStub)
        stub._p_activate()
        assert stub.home == 'c'
    finally:
        plain.close()

    storage = open_composite(paths)
    db = ZODB.DB(storage)
    closing(db)
    root = db.open().root()
    w = root['holder']['w']
    assert isinstance(w, WeakRef)
    assert w() is root['c_home']['t']
    assert type(w()) is PersistentMapping
    assert w()['v'] == 'weakly held'


def _record(klass, state, pid):
    """A ZODB record for ``klass`` with ``state``; ``pid(obj)`` gives
    persistent ids."""
    f = io.BytesIO()
    p = PersistentPickler(pid, f, 3)
    p.dump((klass, None))
    p.dump(state)
    return f.getvalue()


class PidMarker:
    """Pickled as the persistent id it carries."""

    def __init__(self, pid):
        self.pid = pid


def test_legacy_weak_reference_form(tmp_path, closing):
    """The legacy weak form [oid] also goes through a stub."""
    paths = paths_for(tmp_path)
    storage = open_composite(paths)
    db = ZODB.DB(storage)
    closing(db)
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    with placement(conn, 'b'):
        target = PersistentMapping(v='old style')
        root['t'] = target
        tm.commit()
    t_oid = target._p_oid
    db.close()

    storage = open_composite(paths)
    closing(storage)
    oid = storage.new_oid_in('c')
    data = _record(PersistentMapping,
                   {'data': {'w': PidMarker([t_oid])}},
                   lambda o: o.pid if isinstance(o, PidMarker) else None)
    assert [t_oid] in persistent_ids(data)
    raw_commit(storage, [(oid, z64, data)])
    # no class hint: stored and returned byte for byte
    assert storage.load(oid)[0] == data
    storage.close()

    c = child_records(paths['c'])
    assert c[oid] == data
    assert is_stub(c[t_oid])
    check_child_self_contained(paths['c'], 2, HOMES)

    storage = open_composite(paths)
    db = ZODB.DB(storage)
    closing(db)
    conn = db.open()
    obj = conn.get(oid)
    assert obj['w']() is conn.root()['t']
    assert obj['w']()['v'] == 'old style'


def test_persistent_classes_cross_partitions(tmp_path, closing):
    """A persistent class living in b, referenced from main by a plain oid,
    and a persistent instance of it in b referenced from main."""
    def class_factory(connection, modulename, globalname):
        if modulename == '__zodb__':
            return connection.root()['classes'][globalname]
        return find_global(modulename, globalname)

    paths = paths_for(tmp_path)
    storage = open_composite(paths)
    db = ZODB.DB(storage, class_factory=class_factory)
    closing(db)
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    C = PersistentMetaClass('C', (persistent.Persistent,), dict(
        __module__='__zodb__', kind='sample', __init__=_init_name))
    root['classes'] = PersistentMapping()
    tm.commit()
    with placement(conn, 'b'):
        root['classes']['C'] = C            # the class gets a b oid
        tm.commit()
    root['obs'] = PersistentMapping()
    with placement(conn, 'b'):
        inst = C('p')
        conn.add(inst)
    root['obs']['p'] = inst
    tm.commit()
    c_oid, i_oid = C._p_oid, inst._p_oid
    classes_oid, obs_oid = root['classes']._p_oid, root['obs']._p_oid
    assert (c_oid[0], i_oid[0], classes_oid[0], obs_oid[0]) == (1, 1, 0, 0)
    db.close()

    main = child_records(paths['main'])
    # plain oid references (no class hint), each through a stub in main
    assert c_oid in persistent_ids(main[classes_oid])
    assert i_oid in persistent_ids(main[obs_oid])
    assert is_stub(main[c_oid]) and is_stub(main[i_oid])
    check_child_self_contained(paths['main'], 0, HOMES)

    storage = open_composite(paths)
    db = ZODB.DB(storage, class_factory=class_factory)
    closing(db)
    root = db.open().root()
    C2 = root['classes']['C']
    assert isinstance(C2, PersistentMetaClass)
    assert C2._p_oid == c_oid
    p = root['obs']['p']
    assert type(p) is C2
    assert p.name == 'p'
    assert p.kind == 'sample'


def _init_name(self, name):
    self.name = name


def test_multi_database_references_pass_untouched(tmp_path, closing):
    """References into another database ('m', 'n' and weak with a database
    name) are stored as they are: no stub, even when their oid's first
    byte is a configured prefix."""
    paths = paths_for(tmp_path)
    other_path = str(tmp_path / 'other.fs')
    databases = {}
    storage = open_composite(paths)
    db = ZODB.DB(storage, databases=databases, database_name='root')
    closing(db)
    other = ZODB.DB(FileStorage(other_path), databases=databases,
                    database_name='other')
    closing(other)
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    root['main_obj'] = PersistentMapping()     # composite oid 0x00..01
    tm.commit()
    assert root['main_obj']._p_oid == b'\0' * 7 + b'\x01'

    oconn = conn.get_connection('other')
    o = PersistentMapping(x=1)
    n = PNewArgs(7)
    oconn.root()['o'] = o
    oconn.root()['n'] = n
    tm.commit()      # a new object may not be reachable from two databases
    with placement(conn, 'b'):
        holder = PersistentMapping()
        conn.add(holder)
    holder['m'] = o
    holder['n'] = n
    holder['w'] = WeakRef(o)
    root['holder'] = holder
    tm.commit()
    o_oid, n_oid, h_oid = o._p_oid, n._p_oid, holder._p_oid
    # the other database's oids look like primary oids of the composite
    assert o_oid[0] == 0 and n_oid[0] == 0
    db.close()
    other.close()

    b = child_records(paths['b'])
    refs = persistent_ids(b[h_oid])
    m_refs = [r for r in refs if isinstance(r, list) and r[0] == 'm']
    assert len(m_refs) == 1 and m_refs[0][1][:2] == ('other', o_oid)
    assert ['n', ('other', n_oid)] in refs
    assert ['w', (o_oid, 'other')] in refs
    # no stub was made for the other database's objects
    assert o_oid not in b and n_oid not in b
    assert not any(is_stub(d) for oid, d in b.items() if oid != z64)

    databases = {}
    storage = open_composite(paths)
    db = ZODB.DB(storage, databases=databases, database_name='root')
    closing(db)
    other = ZODB.DB(FileStorage(other_path), databases=databases,
                    database_name='other')
    closing(other)
    conn = db.open()
    h = conn.root()['holder']
    # what the composite returns is what ZODB wrote
    assert storage.load(h_oid)[0] == b[h_oid]
    assert h['m']._p_jar.db() is other
    assert h['m'] is conn.get_connection('other').root()['o']
    assert h['m']['x'] == 1
    assert type(h['n']) is PNewArgs and h['n'].value == 7
    assert h['w']() is h['m']


def test_record_without_crossing_reference_is_byte_for_byte(tmp_path,
                                                           closing):
    paths = paths_for(tmp_path)
    storage = open_composite(paths)
    closing(storage)
    a, b = storage.new_oid_in('b'), storage.new_oid_in('b')
    data_a = pm_record(v='a', to_b=Ref(b))          # b -> b only
    data_b = pm_record(v='b')
    raw_commit(storage, [(a, z64, data_a), (b, z64, data_b)])
    assert (b, None) in persistent_ids(data_a)
    assert storage.load(a)[0] == data_a
    assert storage.load(b)[0] == data_b
    storage.close()
    records = child_records(paths['b'])
    assert records[a] == data_a and records[b] == data_b


def test_repeated_and_memoized_references(tmp_path, closing):
    """One record referring twice to one foreign object, to another
    foreign object and to a local one, all of the same class, so the
    pickle memoizes the class and the oids: the child gets stub hints for
    the foreign ones only, and the composite gives back the same
    references."""
    paths = paths_for(tmp_path)
    storage = open_composite(paths)
    db = ZODB.DB(storage)
    closing(db)
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    with placement(conn, 'b'):
        f1, f2 = PersistentMapping(v='f1'), PersistentMapping(v='f2')
        conn.add(f1)
        conn.add(f2)
    local = PersistentMapping(v='local')
    conn.add(local)
    holder = PersistentMapping()
    conn.add(holder)
    holder.update(one=f1, again=f1, two=f2, local=local,
                  nested=[f1, (f2, local)])
    root['holder'] = holder
    tm.commit()
    h_oid = holder._p_oid
    assert h_oid[0] == 0 and local._p_oid[0] == 0
    db.close()

    main = child_records(paths['main'])
    check_child_self_contained(paths['main'], 0, HOMES)
    plain = ZODB.DB(FileStorage(paths['main'], read_only=True))
    try:
        h = plain.open().get(h_oid)
        assert isinstance(h['one'], PartitionStub)
        assert h['one'] is h['again'] is h['nested'][0]
        assert isinstance(h['two'], PartitionStub)
        assert type(h['local']) is PersistentMapping
        assert h['nested'][1][1] is h['local']
    finally:
        plain.close()

    storage = open_composite(paths)
    db = ZODB.DB(storage)
    closing(db)
    conn = db.open()
    h = conn.get(h_oid)
    assert type(h['one']) is PersistentMapping
    assert h['one'] is h['again'] is h['nested'][0]
    assert (h['one']['v'], h['two']['v'], h['local']['v']) == (
        'f1', 'f2', 'local')
    assert h['nested'][1][0] is h['two'] and h['nested'][1][1] is h['local']
    # the composite's record has the same references as the original
    orig = unpickle_record(storage.load(h_oid)[0])
    assert b'compositestorage' not in storage.load(h_oid)[0]
    assert b'compositestorage' in main[h_oid]
    assert orig[0] is PersistentMapping or orig[0][0] is PersistentMapping
