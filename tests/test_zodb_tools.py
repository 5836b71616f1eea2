"""ZODB's own file tools on each child: ``fsrefs`` and ``fstest``.

Each child is a self-contained FileStorage, so ``fsrefs`` (every reference
resolves inside the file) and ``fstest`` (the file's structure) report
nothing on any of them.  A stub removed by hand shows that ``fsrefs``
would notice a child that is not self-contained.
"""
import subprocess
import sys

import ZODB
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from persistent.wref import WeakRef
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage

from conftest import THREE
from conftest import open_composite
from conftest import paths_for


def tool(name, path):
    return subprocess.run([sys.executable, '-m', 'ZODB.scripts.' + name,
                           path], capture_output=True, text=True, timeout=120)


def build(paths):
    db = ZODB.DB(open_composite(paths, placement='round-robin'))
    with db.transaction() as conn:
        root = conn.root()
        root['tree'] = tree = OOBTree()
        for i in range(200):
            tree['k%03d' % i] = PersistentMapping(i=i)
        root['weak'] = PersistentMapping(w=WeakRef(tree['k001']))
    with db.transaction() as conn:          # a second revision of some
        for i in range(0, 200, 7):
            conn.root()['tree']['k%03d' % i]['i'] = -i
    db.close()


def test_fsrefs_and_fstest_find_nothing_in_any_child(tmp_path):
    paths = paths_for(tmp_path)
    build(paths)
    for name, _ in THREE:
        for script in ('fsrefs', 'fstest'):
            proc = tool(script, paths[name])
            assert proc.returncode == 0, (name, script, proc.stderr)
            assert proc.stdout.strip() == '', (name, script, proc.stdout)


def test_fsrefs_notices_a_missing_stub(tmp_path):
    paths = paths_for(tmp_path)
    build(paths)
    fs = FileStorage(paths['main'])
    try:
        stub = next(oid for oid in fs._index.keys() if oid[0] != 0)
        txn = TransactionMetaData()
        fs.tpc_begin(txn)
        fs.deleteObject(stub, fs.load(stub)[1], txn)
        fs.tpc_vote(txn)
        fs.tpc_finish(txn)
    finally:
        fs.close()
    proc = tool('fsrefs', paths['main'])
    assert 'refers to invalid object' in proc.stdout
    assert 'oid 0x%s' % stub.hex() in proc.stdout
