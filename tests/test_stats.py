"""``compositestorage stats``: counts, bytes, classes and the edge matrix."""
import json
import subprocess
import sys

import transaction
import ZODB
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping

from compositestorage import placement
from compositestorage.stats import format_stats
from compositestorage.stats import stats
from conftest import config_file
from conftest import open_composite
from conftest import paths_for


def test_stats_on_real_files(tmp_path):
    paths = paths_for(tmp_path)
    db = ZODB.DB(open_composite(paths))
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    root = conn.root()
    with placement(conn, 'b'):
        targets = [PersistentMapping(i=i) for i in range(5)]
        for t in targets:
            conn.add(t)
    root['index'] = index = OOBTree()
    for i, t in enumerate(targets):
        index[i] = t                    # 5 references from main to b
    with placement(conn, 'c'):
        c_obj = PersistentMapping(back=root['index'])  # 1 from c to main
        conn.add(c_obj)
    root['c'] = c_obj
    tm.commit()
    db.close()

    storage = open_composite(paths, read_only=True)
    try:
        report = stats(storage, top=3)
    finally:
        storage.close()
    main, b, c = (report['partitions'][n] for n in ('main', 'b', 'c'))
    assert main['objects'] == 2 and b['objects'] == 5 and c['objects'] == 1
    assert main['stubs'] == 6           # five targets and c_obj
    assert b['stubs'] == 1 and c['stubs'] == 2     # root; root and index
    assert b['top_by_count'] == [('persistent.mapping.PersistentMapping', 5)]
    assert dict(main['top_by_count']) == {
        'persistent.mapping.PersistentMapping': 1, 'BTrees.OOBTree.OOBTree': 1}
    assert main['bytes'] == sum(n for _, n in main['top_by_bytes'])
    assert report['edges']['main'] == {'b': 5, 'c': 1}
    assert report['edges']['c'] == {'main': 1, 'b': 0}
    assert report['edges']['b'] == {'main': 0, 'c': 0}
    text = format_stats(report)
    assert 'b (prefix 1): 5 objects' in text

    config = config_file(tmp_path, paths)
    proc = subprocess.run(
        [sys.executable, '-m', 'compositestorage', 'stats', str(config),
         '--json', '--top', '3'],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)['edges'] == json.loads(
        json.dumps(report))['edges']
