"""Scenario 11: explicit placement, containment and their precedence."""
import pytest
import transaction
import ZODB
from BTrees.OOBTree import OOBTree
from persistent.list import PersistentList
from persistent.mapping import PersistentMapping

from compositestorage import containment
from compositestorage import placement

from conftest import THREE
from conftest import child_records
from conftest import make_composite
from conftest import new_tm


def prefixes(objs):
    return [o._p_oid[0] for o in objs]


def all_buckets(tree):
    """Every bucket of a BTree, via the bucket chain."""
    out = []
    bucket = tree._firstbucket
    while bucket is not None:
        out.append(bucket)
        bucket = bucket._next
    return out


@pytest.fixture
def db(tmp_path, closing):
    storage, paths = make_composite(tmp_path, default_partition='c')
    db = ZODB.DB(storage)
    closing(db)
    db.paths = paths
    return db


def test_explicit_placement(db):
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    with placement(conn, 'b') as part:
        assert part.name == 'b' and part.prefix == 1
        added = PersistentMapping()
        conn.add(added)                         # conn.add in the block
        root['reached'] = reached = PersistentMapping(
            inner=PersistentList([PersistentMapping()]))
        root['added'] = added
        with placement(conn, 'main'):           # blocks nest
            nested = PersistentMapping()
            conn.add(nested)
        after_nested = PersistentMapping()
        conn.add(after_nested)
        root['nested'] = nested
        root['after_nested'] = after_nested
        tm.commit()                             # reached at commit
    outside = PersistentMapping()
    root['outside'] = outside
    tm.commit()
    assert prefixes([added, reached, reached['inner'],
                     reached['inner'][0], after_nested]) == [1] * 5
    assert nested._p_oid[0] == 0
    assert outside._p_oid[0] == 2               # the default partition
    # the children really hold them
    b = child_records(db.paths['b'])
    assert reached._p_oid in b and added._p_oid in b
    assert outside._p_oid in child_records(db.paths['c'])


def test_placement_of_objects_reached_at_savepoint(db):
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    with placement(conn, 'b'):
        root['sp'] = sp = PersistentMapping()
        tm.savepoint()
    tm.commit()
    assert sp._p_oid[0] == 1


def test_placement_unknown_partition(db):
    from compositestorage import ConfigurationError
    conn = db.open()
    with pytest.raises(ConfigurationError) as exc:
        with placement(conn, 'nowhere'):
            pass
    assert "'nowhere'" in str(exc.value)
    transaction.abort()


def fill_tree(conn, tm, tree, n, start=0, values=False):
    for i in range(start, start + n):
        tree['key%06d' % i] = PersistentMapping(i=i) if values else i
    tm.commit()


def test_containment_keeps_new_buckets_home(db):
    containment(db)
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    with placement(conn, 'b'):
        root['catalog'] = tree = OOBTree()
        tm.commit()
    assert tree._p_oid[0] == 1
    # outside any placement block: the buckets split off by these inserts
    # and the new values stay in the tree's partition
    fill_tree(conn, tm, tree, 2000, values=True)
    buckets = all_buckets(tree)
    assert len(buckets) > 10
    assert set(prefixes(buckets)) == {1}
    assert set(prefixes(tree.values())) == {1}
    # a new object hung off the root (in main) goes to main, not to the
    # default partition c
    root['beside_root'] = br = PersistentMapping()
    tm.commit()
    assert br._p_oid[0] == 0
    # an object with no referrer at all (conn.add) follows the policy
    lone = PersistentMapping()
    conn.add(lone)
    root['lone'] = lone
    tm.commit()
    assert lone._p_oid[0] == 2


def test_containment_in_a_connection_opened_later(db):
    """The containment mechanics alone: a connection that the DB creates
    after containment(db) (the pool's first one is kept busy)."""
    containment(db)
    busy = db.open()                 # whatever the pool held
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    assert conn is not busy
    root = conn.root()
    with placement(conn, 'b'):
        root['catalog'] = tree = OOBTree()
        tm.commit()
    fill_tree(conn, tm, tree, 2000, values=True)
    assert len(all_buckets(tree)) > 10
    assert set(prefixes(all_buckets(tree))) == {1}
    assert set(prefixes(tree.values())) == {1}
    busy.close()


def test_without_containment_buckets_follow_policy(db):
    """The control for the test above: same steps, no containment."""
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    with placement(conn, 'b'):
        root['catalog'] = tree = OOBTree()
        tm.commit()
    fill_tree(conn, tm, tree, 2000)
    buckets = all_buckets(tree)
    assert len(buckets) > 10
    assert set(prefixes(buckets)) == {2}        # the default partition


def test_precedence(db):
    containment(db)
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    with placement(conn, 'b'):
        root['catalog'] = tree = OOBTree()
        tm.commit()
    # explicit beats containment
    with placement(conn, 'main'):
        fill_tree(conn, tm, tree, 1000, values=True)
    assert set(prefixes(all_buckets(tree))) == {0}
    assert set(prefixes(tree.values())) == {0}
    # containment beats the configured policy (default partition c): new
    # values go beside the object that first references them, which is a
    # bucket, and the buckets were all placed in main above.
    fill_tree(conn, tm, tree, 1000, start=1000, values=True)
    new_values = [tree['key%06d' % i] for i in range(1000, 2000)]
    assert set(prefixes(new_values)) == {0}
    assert tree._p_oid[0] == 1


def test_round_robin_policy(tmp_path, closing):
    storage, paths = make_composite(tmp_path, placement='round-robin')
    db = ZODB.DB(storage)
    closing(db)
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    objs = []
    for i in range(9):
        o = PersistentMapping()
        conn.add(o)
        objs.append(o)
    conn.root()['objs'] = PersistentList(objs)
    tm.commit()
    got = prefixes(objs)
    assert sorted(got) == sorted([p for _, p in THREE] * 3)
    assert got[:3] != got[3:6] or len(set(got[:3])) == 3
