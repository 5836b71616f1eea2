"""Scenario 13: garbage collection is global (invariant 7)."""
import time

import pytest
import ZODB
from persistent.mapping import PersistentMapping
from persistent.wref import WeakRef
from persistent.TimeStamp import TimeStamp
from ZODB.POSException import POSKeyError
from ZODB.serialize import referencesf
from ZODB.utils import z64

from compositestorage import placement

from conftest import THREE
from conftest import check_child_self_contained
from conftest import child_records
from conftest import is_stub
from conftest import make_composite
from conftest import Ref
from conftest import new_tm
from conftest import open_composite
from conftest import pm_record
from conftest import raw_commit
from conftest import unpickle_record

HOMES = {prefix: name for name, prefix in THREE}


def build(conn, tm):
    """The graph of the pack tests; returns {label: oid}."""
    root = conn.root()

    def new(name, **kw):
        obj = PersistentMapping(**kw)
        with placement(conn, name):
            conn.add(obj)
        return obj

    o = {}
    o['holder'] = holder = new('main')
    o['keep_b'] = keep_b = new('b', v='keep_b')     # only main refers to it
    o['keep_c'] = keep_c = new('c', v='keep_c')     # main -> b -> c
    o['m_via_c'] = m_via_c = new('main', v='m')     # ... -> c -> main
    holder['b'] = keep_b
    keep_b['chain'] = keep_c
    keep_c['back'] = m_via_c
    root['holder'] = holder

    o['g'] = g = new('main')                        # garbage to be
    o['g_b'] = g_b = new('b')
    o['g_b2'] = g_b2 = new('b')
    o['g_c'] = g_c = new('c')
    o['g_m'] = g_m = new('main')
    g['b'], g['c'], g_b['x'], g_c['m'] = g_b, g_c, g_b2, g_m
    root['g'] = g

    o['s_b'] = s_b = new('b', v='shared')           # stays alive ...
    o['cc'] = cc = new('c')
    cc['s'] = s_b                                   # ... but c's stub goes
    root['shared'] = s_b
    root['cc'] = cc

    o['wh'] = wh = new('main')
    o['w_b'] = w_b = new('b', v='weak only')
    wh['w'] = WeakRef(w_b)
    root['wh'] = wh
    tm.commit()
    o = {k: v._p_oid for k, v in o.items()}
    assert [o[k][0] for k in ('keep_b', 'keep_c', 'm_via_c', 'g_b', 'g_c',
                              'g_m', 'w_b')] == [1, 2, 0, 1, 2, 0, 1]

    del root['g']
    del cc['s']
    tm.commit()
    return o


GONE = {'g': 'main', 'g_b': 'b', 'g_b2': 'b', 'g_c': 'c', 'g_m': 'main',
        'w_b': 'b'}
KEPT = {'holder': 'main', 'keep_b': 'b', 'keep_c': 'c', 'm_via_c': 'main',
        's_b': 'b', 'cc': 'c', 'wh': 'main'}
#: (label, partition holding a stub for it) before the pack
STUBS_GONE = [('g_b', 'main'), ('g_c', 'main'), ('g_m', 'c'), ('s_b', 'c'),
              ('w_b', 'main')]
STUBS_KEPT = [('keep_b', 'main'), ('keep_c', 'b'), ('m_via_c', 'c'),
              ('s_b', 'main'), ('cc', 'main')]


def test_global_pack(tmp_path):
    storage, paths = make_composite(tmp_path)
    db = ZODB.DB(storage)
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    o = build(conn, tm)
    before = {name: child_records(path) for name, path in paths.items()}
    for label, part in STUBS_GONE + STUBS_KEPT:
        assert is_stub(before[part][o[label]]), (label, part)
    serials = {label: storage.load(o[label])[1] for label in GONE}

    db.pack()

    after = {name: child_records(path) for name, path in paths.items()}
    for label, part in KEPT.items():
        assert o[label] in after[part], label
    for label, part in STUBS_KEPT:
        assert is_stub(after[part][o[label]]), (label, part)
    for label, part in GONE.items():
        assert o[label] not in after[part], label
        with pytest.raises(POSKeyError):
            storage.load(o[label])
        with pytest.raises(POSKeyError):
            storage.loadSerial(o[label], serials[label])
    for label, part in STUBS_GONE:
        assert o[label] not in after[part], (label, part)
    # the secondaries keep the root stub and every child its map
    for name, prefix in THREE:
        assert bytes([prefix]) + b'\xff' * 7 in after[name]
        if prefix:
            assert is_stub(after[name][b'\0' * 8])

    # the survivors load through the composite
    tm.begin()
    root = conn.root()
    assert root['holder']['b']['v'] == 'keep_b'
    assert root['holder']['b']['chain']['v'] == 'keep_c'
    assert root['holder']['b']['chain']['back']['v'] == 'm'
    assert root['shared']['v'] == 'shared'
    assert 's' not in root['cc']

    # the stub cache forgot the removed stubs: a new reference from c to
    # the shared object writes its stub again
    root['cc']['s'] = root['shared']
    tm.commit()
    assert is_stub(child_records(paths['c'])[o['s_b']])
    db.close()
    for name, prefix in THREE:
        check_child_self_contained(paths[name], prefix, HOMES)


def test_pack_without_gc_keeps_garbage(tmp_path):
    storage, paths = make_composite(tmp_path, pack_gc=False)
    db = ZODB.DB(storage)
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    o = build(conn, tm)
    db.pack()
    for label, part in GONE.items():
        assert o[label] in child_records(paths[part]), label
        storage.load(o[label])
    db.close()
    for name, prefix in THREE:
        check_child_self_contained(paths[name], prefix, HOMES)


def test_children_never_collect_on_their_own(tmp_path):
    """What the composite protects against: b's child alone would collect
    keep_b, which only main refers to."""
    from ZODB.FileStorage import FileStorage
    storage, paths = make_composite(tmp_path)
    db = ZODB.DB(storage)
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    o = build(conn, tm)
    db.close()
    fs = FileStorage(paths['b'])
    try:
        fs.pack(time.time(), referencesf)
        fs.load(o['keep_b'])
        pytest.fail('a plain pack of b kept keep_b: the scenario is moot')
    except POSKeyError:
        pass
    finally:
        fs.close()


def test_pack_keeps_what_was_reachable_at_pack_time(tmp_path):
    """x (b) is referenced from h (main) at T0 and dropped at T1.  y (b)
    is unreferenced at T0 and referenced from g (main) at T2.  A pack
    between T0 and T1 keeps x and main's stub for it (h's T0 revision is
    still current at the pack time), and keeps y, which a record written
    after the pack time refers to.  A pack after T2 removes x and its
    stub, and still keeps y."""
    storage, paths = make_composite(tmp_path)
    base = time.time() - 3600
    h, g = storage.new_oid_in('main'), storage.new_oid_in('main')
    x, y = storage.new_oid_in('b'), storage.new_oid_in('b')
    t0 = raw_commit(storage, [
        (z64, z64, pm_record(holder=Ref(h), other=Ref(g))),
        (h, z64, pm_record(x=Ref(x))),
        (g, z64, pm_record()),
        (x, z64, pm_record(v='x')),
        (y, z64, pm_record(v='y'))], tid=tid_at(base))
    t1 = raw_commit(storage, [(h, t0, pm_record())],
                    tid=tid_at(base + 600))
    t2 = raw_commit(storage, [(g, t0, pm_record(y=Ref(y)))],
                    tid=tid_at(base + 900))
    assert (t0, t1, t2) == (tid_at(base), tid_at(base + 600),
                            tid_at(base + 900))

    storage.pack(base + 300, referencesf)
    assert storage.load(x)[0] == pm_record(v='x')
    assert storage.load(y)[0] == pm_record(v='y')
    main = child_records(paths['main'])
    assert is_stub(main[x]) and is_stub(main[y])
    assert unpickle_record(storage.loadBefore(h, t1)[0]) == \
        unpickle_record(pm_record(x=Ref(x)))
    storage.close()
    for name, prefix in THREE:
        check_child_self_contained(paths[name], prefix, HOMES)

    storage = open_composite(paths)
    storage.pack(base + 1200, referencesf)
    with pytest.raises(POSKeyError):
        storage.load(x)
    assert storage.load(y)[0] == pm_record(v='y')
    main = child_records(paths['main'])
    assert x not in main and is_stub(main[y])
    assert x not in child_records(paths['b'])
    storage.close()
    for name, prefix in THREE:
        check_child_self_contained(paths[name], prefix, HOMES)


def tid_at(t):
    return TimeStamp(*time.gmtime(t)[:5] + (t % 60,)).raw()
