"""``compositestorage verify``: each kind of problem, found on real files."""
import json
import os
import subprocess
import sys

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage

from compositestorage import placement
from compositestorage.verify import verify
from conftest import config_file
from conftest import open_composite
from conftest import paths_for
from conftest import pm_record
from conftest import raw_commit


@pytest.fixture
def built(tmp_path):
    """holder (main) -> x (b) -> y (c); returns (paths, oids)."""
    paths = paths_for(tmp_path)
    db = ZODB.DB(open_composite(paths))
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    with placement(conn, 'c'):
        y = PersistentMapping(v='y')
        conn.add(y)
    with placement(conn, 'b'):
        x = PersistentMapping(v='x', y=y)
        conn.add(x)
    conn.root()['holder'] = holder = PersistentMapping(x=x)
    tm.commit()
    oids = {'holder': holder._p_oid, 'x': x._p_oid, 'y': y._p_oid}
    db.close()
    return paths, oids


def problems_of(paths):
    storage = open_composite(paths, read_only=True)
    try:
        return verify(storage)[0]
    finally:
        storage.close()


def kinds(problems):
    return sorted((p.kind, p.partition) for p in problems)


def on_child(path, change):
    fs = FileStorage(path)
    try:
        change(fs)
    finally:
        fs.close()


def delete(oid):
    def change(fs):
        txn = TransactionMetaData()
        fs.tpc_begin(txn)
        fs.deleteObject(oid, fs.load(oid)[1], txn)
        fs.tpc_vote(txn)
        fs.tpc_finish(txn)
    return change


def overwrite(oid, data):
    return lambda fs: raw_commit(fs, [(oid, fs.load(oid)[1], data)])


def test_a_clean_composite(built):
    paths, oids = built
    storage = open_composite(paths, read_only=True)
    try:
        problems, counts = verify(storage)
    finally:
        storage.close()
    assert problems == []
    # main: root, holder; b: x and the stub of holder's x... as stubs
    assert counts['main'] == {'objects': 2, 'stubs': 1}      # x's stub
    assert counts['b']['objects'] == 1 and counts['c']['objects'] == 1
    assert counts['b']['stubs'] == 2                        # root, y


def test_a_broken_reference(built):
    paths, oids = built
    on_child(paths['c'], delete(oids['y']))
    found = problems_of(paths)
    assert kinds(found) == [('dangling-reference', 'c'),
                            ('stub-target-missing', 'b')]
    dangling = [p for p in found if p.kind == 'dangling-reference'][0]
    assert dangling.oid == oids['y']
    assert dangling.referrer == oids['x']
    assert dangling.referrer_partition == 'b'


def test_a_missing_stub(built):
    paths, oids = built
    on_child(paths['main'], delete(oids['x']))   # holder's stub for x
    found = problems_of(paths)
    assert kinds(found) == [('missing-stub', 'main')]
    assert found[0].oid == oids['x'] and found[0].referrer == oids['holder']


def test_an_orphan_stub(built):
    paths, oids = built
    db = ZODB.DB(open_composite(paths))
    with db.transaction() as conn:
        del conn.root()['holder']['x']      # the stub stays until a pack
    db.close()
    found = problems_of(paths)
    assert kinds(found) == [('orphan-stub', 'main')]
    assert found[0].oid == oids['x']
    assert found[0].klass == 'persistent.mapping.PersistentMapping'
    assert found[0].garbage


def test_garbage_is_listed_and_fails_only_strict(built, tmp_path):
    paths, oids = built
    db = ZODB.DB(open_composite(paths))
    with db.transaction() as conn:
        del conn.root()['holder']['x']      # the stub stays until a pack
    db.close()
    config = str(config_file(tmp_path, paths))

    def run(*args):
        return subprocess.run(
            [sys.executable, '-m', 'compositestorage', 'verify', '-q', config]
            + list(args), capture_output=True, text=True, timeout=120)
    proc = run()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # counted, not listed: an "ok" result is not a page of garbage
    assert lines[-1] == ('ok, with 1 garbage record(s) that the next pack '
                         '(or repair) removes (--list-garbage lists them)')
    assert not any('orphan-stub' in line for line in lines), lines
    for option in ('--list-garbage', '-v'):
        listed = run(option)
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert lines[-1] == ('ok, with 1 garbage record(s) that the next '
                             'pack (or repair) removes')
        assert any(line.startswith(
            'orphan-stub: partition \'main\', oid 0x%s' % oids['x'].hex())
            for line in lines)
    strict = run('--strict')
    assert strict.returncode == 1
    assert strict.stdout.splitlines()[-1] == '1 problem(s)'
    report = json.loads(run('--json').stdout)
    assert report['ok'] is True
    assert [p['garbage'] for p in report['problems']] == [True]
    # a dangling reference is an error, garbage or not beside it
    on_child(paths['c'], delete(oids['y']))
    proc = run()
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[-1] == '2 problem(s)'


def test_a_corrupt_stub_and_a_foreign_object(built):
    paths, oids = built
    on_child(paths['main'], overwrite(oids['x'], b'garbage'))
    on_child(paths['b'], overwrite(oids['y'], pm_record(v='impostor')))
    found = problems_of(paths)
    assert kinds(found) == [('corrupt-stub', 'main'),
                            ('foreign-object', 'b')]


def test_the_command(built, tmp_path):
    paths, oids = built
    config = config_file(tmp_path, paths)

    def run(*args):
        return subprocess.run(
            [sys.executable, '-m', 'compositestorage', 'verify', str(config)]
            + list(args), capture_output=True, text=True, timeout=120)

    proc = run()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == 'ok'
    on_child(paths['c'], delete(oids['y']))
    proc = run()
    assert proc.returncode == 1
    assert 'dangling-reference' in proc.stdout
    assert '0x' + oids['y'].hex() in proc.stdout
    report = json.loads(run('--json').stdout)
    assert report['ok'] is False
    dangling = [p for p in report['problems']
                if p['kind'] == 'dangling-reference'][0]
    assert dangling['partition'] == 'c'
    assert dangling['referrer'] == '0x' + oids['x'].hex()
    assert dangling['referrer_partition'] == 'b'


# --- repair ----------------------------------------------------------------------

def _repair(config, *args):
    return subprocess.run(
        [sys.executable, '-m', 'compositestorage', 'repair', str(config)]
        + list(args), capture_output=True, text=True, timeout=120)


def test_repair_recreates_a_missing_stub_and_removes_an_orphan(built,
                                                                tmp_path):
    paths, oids = built
    on_child(paths['main'], delete(oids['x']))      # missing stub in main
    db = ZODB.DB(open_composite(paths))
    with db.transaction() as conn:
        del conn.root()['holder']['x']['y']         # orphans y's stub in b
    db.close()
    assert kinds(problems_of(paths)) == [('missing-stub', 'main'),
                                         ('orphan-stub', 'b')]
    config = config_file(tmp_path, paths)
    before = {name: os.path.getsize(path) for name, path in paths.items()}
    proc = _repair(config, '--dry-run')
    assert proc.returncode == 0, proc.stderr
    assert 'would create the stub for 0x%s' % oids['x'].hex() in proc.stdout
    assert 'would remove the stub for 0x%s' % oids['y'].hex() in proc.stdout
    assert {name: os.path.getsize(path)
            for name, path in paths.items()} == before   # nothing written
    proc = _repair(config)
    assert proc.returncode == 0, proc.stderr
    assert problems_of(paths) == []
    assert 'nothing to repair' in _repair(config).stdout
    # the repair is internal: it shows in no undo log
    storage = open_composite(paths, read_only=True)
    try:
        assert all(d['description'] != b'compositestorage repair'
                   for d in storage.undoLog(0, 100))
    finally:
        storage.close()


def test_repair_leaves_a_dangling_reference_to_a_person(built, tmp_path):
    paths, oids = built
    on_child(paths['c'], delete(oids['y']))
    proc = _repair(config_file(tmp_path, paths))
    assert proc.returncode == 1
    assert 'left for you: dangling-reference' in proc.stdout


def test_repair_needs_the_storage_offline(built, tmp_path):
    paths, oids = built
    storage = open_composite(paths)          # a running writer
    try:
        proc = _repair(config_file(tmp_path, paths))
    finally:
        storage.close()
    assert proc.returncode == 1
    assert 'another process' in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
