"""A composite that was opened but never written to is healthy.

``verify`` and ``repair`` find nothing to do on it, on its files and
through a real server (``compositestorage serve`` on 127.0.0.1 with a port
the OS picks) that has just started, on its config and on ``zeo://``.
"""
import json
import os
import subprocess

import transaction
import ZODB
from persistent.mapping import PersistentMapping

from compositestorage.repair import plan
from compositestorage.verify import verify
from conftest import CLI
from conftest import config_file
from conftest import open_composite
from conftest import paths_for
from conftest import TIMEOUT

FOUR = (('main', 0), ('b', 1), ('c', 2), ('d', 3))


def run_cli(*args, cwd=None):
    return subprocess.run(CLI + [str(a) for a in args], cwd=cwd,
                          capture_output=True, text=True, timeout=TIMEOUT)


def problems_and_actions(paths, parts=None):
    kw = {} if parts is None else {'parts': parts}
    storage = open_composite(paths, read_only=True, **kw)
    try:
        problems = verify(storage)[0]
        actions, untouched = plan(storage)
    finally:
        storage.close()
    return problems, actions, untouched


def test_a_composite_opened_but_never_written_passes_verify(tmp_path):
    paths = paths_for(tmp_path)
    open_composite(paths).close()           # opened for writing, no commit
    assert all(os.path.getsize(p) <= 4 for p in paths.values())
    problems, actions, untouched = problems_and_actions(paths)
    assert problems == [] and actions == [] and untouched == []
    config = config_file(tmp_path, paths)
    result = run_cli('verify', '-q', config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == 'ok'
    result = run_cli('repair', config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == 'nothing to repair'


def test_a_partition_added_since_the_last_commit_is_healthy(tmp_path):
    paths = paths_for(tmp_path)
    db = ZODB.DB(open_composite(paths))
    with db.transaction() as conn:
        conn.root()['x'] = PersistentMapping(v=1)
    db.close()
    paths.update(paths_for(tmp_path, FOUR))
    open_composite(paths, FOUR).close()     # 'd' is new, never written
    problems, actions, untouched = problems_and_actions(paths, FOUR)
    assert problems == [] and actions == [] and untouched == []


def test_an_empty_primary_beside_written_children_is_a_problem(tmp_path):
    paths = paths_for(tmp_path)
    db = ZODB.DB(open_composite(paths))
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    conn.root()['x'] = PersistentMapping(v=1)
    tm.commit()
    db.close()
    os.rename(paths['main'], str(tmp_path / 'elsewhere.fs'))
    from ZODB.FileStorage import FileStorage
    FileStorage(paths['main']).close()      # an empty primary in its place
    problems, _, _ = problems_and_actions(paths)
    found = [p for p in problems
             if p.kind == 'partition-map' and p.partition == 'main']
    assert found, [str(p) for p in problems]
    assert 'not the file this composite was created with' in str(found[0])


def test_a_fresh_server_passes_verify_and_stats_at_once(tmp_path, serving):
    """The first thing an operator does: start a server, check it."""
    from test_cli import zeo_conf
    conf = tmp_path / 'zeo.conf'
    conf.write_text(zeo_conf(str(tmp_path)))
    served = serving(['--config', str(conf)], tmp_path, 3)
    uri = 'zeo://%s:%d' % (served.host, served.port)
    for target in (str(conf), uri):
        for command in ('verify', 'stats'):
            result = run_cli(command, '-q', target)
            assert result.returncode == 0, (command, target, result.stdout,
                                            result.stderr)
            assert 'Traceback' not in result.stderr
            assert 'error' not in result.stderr, result.stderr
        result = run_cli('verify', '-q', '--json', target)
        report = json.loads(result.stdout)
        assert report['ok'] and report['problems'] == []
    assert 'no more records' not in served.stderr(), served.stderr()
    assert 'Traceback' not in served.stderr(), served.stderr()


def test_verify_and_stats_through_zeo_after_the_first_commit(tmp_path,
                                                             serving):
    """Once a client has made the root, the served composite is read."""
    import ZEO
    from test_cli import zeo_conf
    conf = tmp_path / 'zeo.conf'
    conf.write_text(zeo_conf(str(tmp_path)))
    served = serving(['--config', str(conf)], tmp_path, 3)
    db = ZEO.DB((served.host, served.port), server_sync=True)
    with db.transaction() as conn:
        conn.root()['x'] = PersistentMapping(v=1)
    db.close()
    uri = 'zeo://%s:%d' % (served.host, served.port)
    result = run_cli('stats', '-q', '--json', uri)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert sum(p['objects'] for p in report['partitions'].values()) == 2
    result = run_cli('verify', '-q', uri)
    assert result.returncode == 0, result.stdout + result.stderr
