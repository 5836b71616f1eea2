"""Scenario 1: every child stays a valid ZODB on its own (invariant 2)."""
import ZODB
from BTrees.OOBTree import OOBTree
from persistent.list import PersistentList
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage
from ZODB.utils import z64

from compositestorage import PartitionStub

from conftest import THREE
from conftest import check_child_self_contained
from conftest import child_records
from conftest import is_stub
from conftest import iter_current
from conftest import map_oid
from conftest import make_composite
from conftest import new_tm
from conftest import open_composite
from conftest import pickle_class

HOMES = {prefix: name for name, prefix in THREE}


def build_graph(db):
    """A graph spread round-robin over three partitions, with cycles,
    shared objects, a BTree and later modifications.  Returns the expected
    state as ``{key: value}`` to check through the composite."""
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    nodes = [PersistentMapping(n=i) for i in range(12)]
    for i, node in enumerate(nodes):
        node['next'] = nodes[(i + 1) % len(nodes)]      # a cycle
        node['shared'] = nodes[0]
    root['nodes'] = PersistentList(nodes)
    tree = OOBTree()
    for i in range(30):
        tree['k%02d' % i] = nodes[i % len(nodes)]
    root['tree'] = tree
    root['leaf'] = PersistentMapping(name='leaf')
    tm.commit()
    # a second transaction that adds references in both directions
    nodes[3]['back'] = root['leaf']
    root['leaf']['to'] = nodes[7]
    root['late'] = PersistentList([PersistentMapping(late=j)
                                   for j in range(4)])
    tm.commit()
    conn.close()


def test_children_are_self_contained(tmp_path):
    storage, paths = make_composite(tmp_path, placement='round-robin')
    db = ZODB.DB(storage)
    build_graph(db)

    # round-robin really spread the graph, with crossing references
    conn = db.open()
    root = conn.root()
    nodes = list(root['nodes'])
    assert {n._p_oid[0] for n in nodes} == {0, 1, 2}
    assert [n['n'] for n in nodes] == list(range(12))
    assert nodes[5]['next'] is nodes[6]
    assert nodes[11]['next'] is nodes[0]
    assert root['leaf']['to'] is nodes[7]
    assert nodes[3]['back'] is root['leaf']
    assert [root['tree']['k%02d' % i]['n'] for i in range(30)] == \
        [i % 12 for i in range(30)]
    assert [m['late'] for m in root['late']] == [0, 1, 2, 3]
    conn.close()
    db.close()

    all_own = {}
    for name, prefix in THREE:
        path = paths[name]
        records = child_records(path)
        own = {oid for oid in records
               if oid[0] == prefix and oid != map_oid(prefix)}
        foreign = {oid for oid in records if oid[0] != prefix}
        assert own, name
        assert foreign, 'no stubs in %s: nothing crossed' % name
        assert map_oid(prefix) in records
        all_own.update((oid, pickle_class(records[oid])) for oid in own)
        # every foreign record is a stub, and every stub is foreign
        assert all(is_stub(records[oid]) for oid in foreign)
        assert not any(is_stub(records[oid]) for oid in own)
        check_child_self_contained(path, prefix, HOMES)

    # Open each child alone and look at the stubs through a plain ZODB.
    for name, prefix in THREE:
        fs = FileStorage(paths[name], read_only=True)
        db = ZODB.DB(fs)
        try:
            conn = db.open()
            for oid, _, data in iter_current(fs):
                if oid[0] == prefix:
                    continue
                stub = conn.get(oid)
                assert isinstance(stub, PartitionStub)
                stub._p_activate()
                assert stub.home == HOMES[oid[0]]
                assert ('0x' + oid.hex()) in repr(stub)
                assert repr(HOMES[oid[0]]) in repr(stub)
                if oid == z64:
                    assert (stub.module, stub.name) == \
                        ('persistent.mapping', 'PersistentMapping')
                else:
                    # the stub's class hint names the target's real class
                    assert (stub.module, stub.name) == all_own[oid]
            # the secondary's root is the stub for the composite root: a
            # plain ZODB did not create a root of its own
            if prefix:
                assert isinstance(conn.get(z64), PartitionStub)
            conn.close()
        finally:
            db.close()


def test_stub_class_hint_matches_target_class(tmp_path):
    """The stub in A for T records T's real class, and the composite gives
    ZODB the (oid, class) reference back."""
    storage, paths = make_composite(tmp_path)
    db = ZODB.DB(storage)
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    tree = OOBTree()
    conn.add(tree)
    from compositestorage import placement
    with placement(conn, 'c'):
        root['tree'] = tree
        tree['x'] = PersistentList([1, 2])
        tm.commit()
    toid = tree._p_oid
    loid = tree['x']._p_oid
    assert toid[0] == 0   # conn.add outside the block: the policy
    assert loid[0] == 2
    conn.close()
    db.close()

    main = child_records(paths['main'])
    c = child_records(paths['c'])
    # the tree (main) references the list (c), so the stub for the list
    # sits in main at the list's own oid
    assert loid in main and is_stub(main[loid])
    assert pickle_class(c[loid]) == ('persistent.list', 'PersistentList')

    fs = FileStorage(paths['main'], read_only=True)
    plain = ZODB.DB(fs)
    try:
        stub = plain.open().get(loid)
        stub._p_activate()
        assert (stub.home, stub.module, stub.name) == (
            'c', 'persistent.list', 'PersistentList')
    finally:
        plain.close()

    storage = open_composite(paths)
    db = ZODB.DB(storage)
    try:
        conn = db.open()
        lst = conn.root()['tree']['x']
        assert type(lst) is PersistentList
        assert list(lst) == [1, 2]
        assert lst._p_oid == loid
    finally:
        db.close()
