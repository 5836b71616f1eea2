"""Scenario 2: one target always gets the same stub (invariant 3)."""
import subprocess
import sys
import textwrap
import threading

import transaction
import ZODB
from persistent.mapping import PersistentMapping

import compositestorage

from conftest import TWO
from conftest import child_history
from conftest import child_records
from conftest import is_stub
from conftest import make_composite
from conftest import new_tm
from conftest import open_composite
from conftest import paths_for

#: Runs in a fresh interpreter: opens the composite over main.fs and b.fs
#: and does one step.  argv: tmpdir step
WORKER = textwrap.dedent('''
    import os, sys
    import transaction, ZODB
    from persistent.mapping import PersistentMapping
    from ZODB.FileStorage import FileStorage
    import compositestorage

    tmp, step = sys.argv[1], sys.argv[2]
    storage = compositestorage.CompositeStorage([
        ('main', 0, FileStorage(os.path.join(tmp, 'main.fs'))),
        ('b', 1, FileStorage(os.path.join(tmp, 'b.fs'))),
    ])
    db = ZODB.DB(storage)
    conn = db.open()
    root = conn.root()
    if step == 'one':
        with compositestorage.placement(conn, 'b'):
            x = PersistentMapping(name='X')
            conn.add(x)
        root['first'] = PersistentMapping(ref=x)    # in main, refers to X
        transaction.commit()
    else:
        x = root['first']['ref']
        assert x['name'] == 'X', x
        root['second'] = PersistentMapping(ref=x)   # another main object
        transaction.commit()
    print(x._p_oid.hex())
    db.close()
''')


def run_worker(tmp_path, step):
    out = subprocess.run(
        [sys.executable, '-c', WORKER, str(tmp_path), step],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return bytes.fromhex(out.stdout.strip())


def stub_writes(path, oid):
    """How many transactions in the file wrote a record at ``oid``."""
    return sum(1 for _, records in child_history(path)
               for roid, _ in records if roid == oid)


def test_same_stub_across_processes(tmp_path):
    paths = paths_for(tmp_path, TWO)
    x_oid = run_worker(tmp_path, 'one')
    assert x_oid[0] == 1
    main_before = child_records(paths['main'])
    assert is_stub(main_before[x_oid])
    stub_bytes = main_before[x_oid]
    assert stub_writes(paths['main'], x_oid) == 1

    assert run_worker(tmp_path, 'two') == x_oid

    main_after = child_records(paths['main'])
    # exactly one stub record at X, unchanged, written only once
    assert main_after[x_oid] == stub_bytes
    assert stub_writes(paths['main'], x_oid) == 1
    # the child grew by the new main object only: no second stub anywhere
    new = set(main_after) - set(main_before)
    assert len(new) == 1
    (new_oid,) = new
    assert new_oid[0] == 0
    assert not is_stub(main_after[new_oid])
    assert sum(is_stub(d) for d in main_after.values()) == \
        sum(is_stub(d) for d in main_before.values())

    # and both referrers see the very same X through the composite
    storage = open_composite(paths, TWO)
    db = ZODB.DB(storage)
    try:
        root = db.open().root()
        assert root['first']['ref'] is root['second']['ref']
        assert root['second']['ref']._p_oid == x_oid
    finally:
        db.close()


def test_same_stub_after_restart_in_process(tmp_path):
    """Stub bytes depend only on the target: re-deriving the stub after a
    restart (cold stub cache) for an existing target writes nothing new."""
    storage, paths = make_composite(tmp_path, TWO)
    db = ZODB.DB(storage)
    conn = db.open()
    with compositestorage.placement(conn, 'b'):
        x = PersistentMapping(name='X')
        conn.add(x)
    conn.root()['a1'] = PersistentMapping(ref=x)
    transaction.commit()
    x_oid = x._p_oid
    db.close()
    before = child_records(paths['main'])[x_oid]

    for i in range(3):
        storage = open_composite(paths, TWO)
        db = ZODB.DB(storage)
        conn = db.open()
        root = conn.root()
        root['more%d' % i] = PersistentMapping(ref=root['a1']['ref'])
        transaction.commit()
        db.close()
    assert child_records(paths['main'])[x_oid] == before
    assert stub_writes(paths['main'], x_oid) == 1


def test_concurrent_transactions_creating_the_same_stub(tmp_path):
    """Two transactions that both need the stub for one target: no
    ConflictError, one stub record."""
    storage, paths = make_composite(tmp_path, TWO)
    db = ZODB.DB(storage)
    tm0 = new_tm()
    conn = db.open(transaction_manager=tm0)
    root = conn.root()
    with compositestorage.placement(conn, 'b'):
        root['bside'] = PersistentMapping()     # in b: stub in main
        tm0.commit()
        root['bside']['x'] = x = PersistentMapping(name='X')
        tm0.commit()
    root['h1'] = PersistentMapping()
    root['h2'] = PersistentMapping()
    tm0.commit()
    x_oid = x._p_oid
    assert x_oid[0] == 1
    assert x_oid not in child_records(paths['main'])   # no stub yet

    tms = [new_tm(), new_tm()]
    conns = [db.open(transaction_manager=tm) for tm in tms]
    for i, (c, tm) in enumerate(zip(conns, tms)):
        r = c.root()
        r['h%d' % (i + 1)]['ref'] = r['bside']['x']
    # two threads commit at once; the composite serializes them
    errors = []
    barrier = threading.Barrier(2)

    def commit(tm):
        try:
            barrier.wait()
            tm.commit()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=commit, args=(tm,)) for tm in tms]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert stub_writes(paths['main'], x_oid) == 1
    tm0.begin()
    assert root['h1']['ref'] is root['h2']['ref'] is root['bside']['x']
    db.close()
