"""``compositestorage pack``: the global pack from the command line."""
import subprocess
import sys

import transaction
import ZODB
from persistent.mapping import PersistentMapping

from compositestorage import placement
from compositestorage.verify import verify
from conftest import config_file
from conftest import open_composite
from conftest import paths_for


def test_pack_removes_garbage_and_orphan_stubs(tmp_path):
    paths = paths_for(tmp_path)
    db = ZODB.DB(open_composite(paths))
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    root = conn.root()
    with placement(conn, 'b'):
        kept = PersistentMapping(v='kept')
        dropped = [PersistentMapping(v=i) for i in range(3)]
        for obj in [kept] + dropped:
            conn.add(obj)
    root['kept'] = kept
    root['dropped'] = PersistentMapping(
        ('d%d' % i, d) for i, d in enumerate(dropped))
    tm.commit()
    del root['dropped']             # 1 object in main, 3 in b (3 stubs)
    tm.commit()
    db.close()

    config = config_file(tmp_path, paths)
    proc = subprocess.run(
        [sys.executable, '-m', 'compositestorage', 'pack', str(config)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith('packing ')
    assert 'main: removed 1 objects, 3 stubs' in proc.stdout
    assert 'b: removed 3 objects, 0 stubs' in proc.stdout
    assert 'c: removed 0 objects, 0 stubs' in proc.stdout

    storage = open_composite(paths, read_only=True)
    try:
        assert verify(storage)[0] == []
        db = ZODB.DB(storage)
        assert db.open().root()['kept']['v'] == 'kept'
        db.close()
    finally:
        storage.close()


def test_pack_refuses_what_it_cannot_pack(tmp_path):
    proc = subprocess.run(
        [sys.executable, '-m', 'compositestorage', 'pack',
         str(tmp_path / 'missing.conf')],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert 'no such file' in proc.stderr and 'missing.conf' in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
