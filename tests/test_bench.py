"""The benchmark script runs end to end and reports what it promises.

It runs ``benchmarks/bench.py`` with a tiny N and one round as a subprocess.
No assertion is made about speed.  The ``--postgresql`` run needs the
PostgreSQL server the RelStorage tests use (skipped without one, a failure
under ``CI=true``); the ``--zeo`` run starts its own ZEO servers.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

from relstorage_engines import require_postgres

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'benchmarks', 'bench.py')

STORAGES = ('fs', 'multidb', 'composite1', 'composite2')
WORKLOADS = ('add', 'update', 'cold', 'warm', 'hot',
             'xadd', 'xupdate', 'xcold', 'small1', 'small2')


def test_help():
    proc = subprocess.run([sys.executable, BENCH, '--help'],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert '--rounds' in proc.stdout and '--json' in proc.stdout
    for option in ('--postgresql', '--zeo', '--clients', '--transactions'):
        assert option in proc.stdout


def test_tiny_run(tmp_path):
    out = tmp_path / 'out.json'
    proc = subprocess.run(
        [sys.executable, BENCH, '-n', '100', '--rounds', '1',
         '--json', str(out)],
        capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    summary = data['summary']
    assert set(STORAGES) <= set(data['storages'])
    for wl in WORKLOADS:
        assert wl in proc.stdout
        for kind in STORAGES:
            entry = summary[wl][kind]
            assert entry['rate'] > 0
            assert entry['ratio'] > 0
            if kind == 'fs':
                assert entry['ratio'] == 1.0
            if wl in ('small1', 'small2'):
                assert 0 < entry['p50_ms'] <= entry['p99_ms']
    for kind in STORAGES:
        assert summary['rss_kb'][kind] > 0
    # The raw per-round figures are there too.
    assert len(data['raw']) == 1
    for kind in STORAGES:
        raw = data['raw'][0][kind]
        assert raw['rss_kb'] > 0
        assert set(WORKLOADS) <= set(raw['results'])
        assert raw['results']['small1']['transactions'] == 500


def test_profile_prints_where_the_time_went(tmp_path):
    proc = subprocess.run(
        [sys.executable, BENCH, '--profile', 'composite2', '-n', '50'],
        capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for wl in WORKLOADS:
        assert wl in proc.stdout
    assert 'function calls' in proc.stdout
    assert 'compositestorage' in proc.stdout     # the composite's own frames


def test_overlay_read_ratio():
    """``--overlay`` reads overlaid objects and objects stored whole, and
    prints the ratio of the two."""
    import re
    proc = subprocess.run([sys.executable, BENCH, '--overlay', '-n', '50'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    m = re.search(r'overlay reads: 50 objects, stored whole [\d.]+ us each, '
                  r'overlaid [\d.]+ us each: ([\d.]+)x', proc.stdout)
    assert m and float(m.group(1)) > 0, proc.stdout


def _tiny(tmp_path, *options, env=None, timeout=300):
    """Run one tiny round of ``bench.py`` with ``options``: its JSON
    report and its standard output."""
    out = tmp_path / 'out.json'
    proc = subprocess.run(
        [sys.executable, BENCH, '-n', '20', '--rounds', '1', '--repeat',
         '1', '--transactions', '5', '--json', str(out)] + list(options),
        capture_output=True, text=True, timeout=timeout, cwd=str(tmp_path),
        env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout


def _assert_rows(summary, storages, reference, stdout):
    """Every workload has a row, a rate and a ratio for every storage,
    the reference's ratio being 1."""
    assert summary['reference'] == reference
    for wl in WORKLOADS:
        assert any(line.startswith(wl + ' ') and '(1.00)' in line
                   for line in stdout.splitlines()), (wl, stdout)
        for kind in storages:
            entry = summary[wl][kind]
            assert entry['rate'] > 0 and entry['ratio'] > 0
            if kind == reference:
                assert entry['ratio'] == 1.0
            else:   # a real ratio: this storage's rate over the reference's
                assert entry['ratio'] == pytest.approx(
                    entry['rates'][0] / summary[wl][reference]['rates'][0])
        assert summary['noise'][wl] > 0


def _database_exists(name):
    import psycopg2
    from relstorage_engines import PG_HOST, PG_PORT, PG_USER
    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER,
                            dbname='postgres')
    try:
        with conn.cursor() as cursor:
            cursor.execute('SELECT 1 FROM pg_database WHERE datname = %s',
                           (name,))
            return cursor.fetchone() is not None
    finally:
        conn.close()


def test_postgresql_composites_against_plain_relstorage(tmp_path):
    """``--postgresql`` runs a FileStorage+PostgreSQL composite and an
    all-PostgreSQL composite beside plain RelStorage on PostgreSQL, with
    ratios to the latter, each on databases made for it and dropped."""
    require_postgres()
    data, stdout = _tiny(tmp_path, '--postgresql')
    storages = ['pg', 'fs+pg', 'pg+pg']
    assert data['mode'] == 'postgresql' and data['storages'] == storages
    _assert_rows(data['summary'], storages, 'pg', stdout)
    assert 'ratio to pg' in stdout and 'pg noise' in stdout
    raw = data['raw'][0]
    assert set(raw) == {'pg', 'fs+pg', 'pg+pg', 'pg-again'}
    made = {kind: raw[kind]['databases'] for kind in raw}
    assert [len(made[k]) for k in storages] == [1, 1, 2]
    names = [name for kind in made for name in made[kind]]
    assert len(set(names)) == 5                 # fresh for every storage
    assert not any(_database_exists(name) for name in names)   # dropped
    for kind in storages:
        assert raw[kind]['disk_bytes'] > 0      # the databases' own size
        assert raw[kind]['results']['small2']['transactions'] == 5


def test_postgresql_refuses_an_n_beyond_the_lock_table(tmp_path):
    """RelStorage takes a PostgreSQL lock per changed object: an N that the
    server's lock table cannot hold is refused before anything runs."""
    require_postgres()
    proc = subprocess.run(
        [sys.executable, BENCH, '--postgresql', '-n', '100000000'],
        capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert '-n 100000000 is too many' in proc.stderr
    assert 'max_locks_per_transaction' in proc.stderr
    assert 'round 1' not in proc.stderr


def _refused_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]     # closed again: nothing listens there


def test_postgresql_without_a_server_says_so(tmp_path):
    env = dict(os.environ, COMPOSITE_PG_PORT=str(_refused_port()))
    proc = subprocess.run([sys.executable, BENCH, '--postgresql', '--quick'],
                          capture_output=True, text=True, timeout=60,
                          cwd=str(tmp_path), env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert '--postgresql needs a PostgreSQL server' in proc.stderr
    assert 'COMPOSITE_PG_PORT' in proc.stderr
    assert 'round 1' not in proc.stderr        # nothing was run


def _listens(address):
    host, port = address.rsplit(':', 1)
    try:
        socket.create_connection((host, int(port)), 1).close()
    except OSError:
        return False
    return True


def test_zeo_served_composites_with_one_and_two_clients(tmp_path):
    """``--zeo`` serves each storage from a ZEO server of its own and runs
    one client, then two concurrent clients, with ratios to FileStorage
    served by ZEO; the servers are gone afterwards."""
    data, stdout = _tiny(tmp_path, '--zeo', '--clients', '1,2')
    storages = ['zeo-fs', 'zeo-composite', 'zeo-roundrobin']
    assert data['mode'] == 'zeo' and data['storages'] == storages
    assert [run['clients'] for run in data['runs']] == [1, 2]
    assert stdout.count('ratio to zeo-fs') == 2
    assert '2 concurrent clients' in stdout
    addresses = set()
    for run in data['runs']:
        clients = run['clients']
        _assert_rows(run['summary'], storages, 'zeo-fs', stdout)
        raw = run['raw'][0]
        assert set(raw) == set(storages) | {'zeo-fs-again'}
        for kind in raw:
            assert raw[kind]['clients'] == clients
            results = raw[kind]['results']
            assert results['add']['objects'] == 20 * clients
            assert results['small1']['transactions'] == 5 * clients
            assert raw[kind]['disk_bytes'] > 0     # the server's files
            addresses.add(raw[kind]['address'])
    assert len(addresses) == 8                 # a server per storage and run
    assert not any(_listens(a) for a in addresses)


def test_writer_processes_against_plain_relstorage(tmp_path):
    """``--processes 1,2`` runs one, then two writer processes, each
    opening the storage itself, on plain RelStorage on PostgreSQL and on
    a shared composite of two PostgreSQL children, and reports the
    throughput, the ratio to plain RelStorage and the scaling; the
    databases are dropped afterwards."""
    import re
    require_postgres()
    out = tmp_path / 'out.json'
    proc = subprocess.run(
        [sys.executable, BENCH, '--processes', '1,2', '-n', '30',
         '--rounds', '1', '--json', str(out)],
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stdout = proc.stdout
    data = json.loads(out.read_text())
    assert data['mode'] == 'processes' and data['counts'] == [1, 2]
    assert data['storages'] == ['pg', 'pg-shared']

    def figures(line_start):
        line = [x for x in stdout.splitlines() if x.startswith(line_start)]
        assert len(line) == 1, (line_start, stdout)
        found = dict((int(c), float(v)) for c, v in
                     re.findall(r'(\d+) proc ([\d.]+)', line[0]))
        assert set(found) == {1, 2}, line
        return found
    ratio = figures('ratio pg-shared/pg: ')
    for kind in ('pg', 'pg-shared'):
        scaling = figures('scaling %s: ' % kind)
        assert scaling[1] == 1.0 and scaling[2] > 0
    runs = data['summary']['runs']
    for c in ('1', '2'):
        assert ratio[int(c)] == pytest.approx(runs[c]['pg-shared']['ratio'],
                                              abs=0.006)
        assert ratio[int(c)] > 0
        for kind in ('pg', 'pg-shared'):
            e = runs[c][kind]
            assert e['rate'] > 0 and 0 < e['p50_ms'] <= e['p99_ms']
            assert e['retries'] >= 0
            assert re.search(r'^%s\s+%s\s+%.1f\s' % (c, kind, e['rate']),
                             stdout, re.M), stdout
    names = []
    for c in ('1', '2'):
        (raw,) = data['raw'][c]
        for kind in ('pg', 'pg-shared'):
            r = raw[kind]
            assert r['processes'] == int(c)
            assert len(r['writers']) == int(c)
            # each process ran its own 30 transactions, all three kinds
            assert r['transactions'] == 30 * int(c)
            for w in r['writers']:
                assert w['kinds'] == {'one': 10, 'two': 10, 'add': 10}
            assert r['imvcc']      # each process opened it as IMVCCStorage
            names += r['databases']
        shared = raw['pg-shared']
        assert shared['target_prefixes'] == [1]   # two-partition commits
        assert raw['pg']['target_prefixes'] == [0]
        assert len(shared['databases']) == 2
        assert shared['lock_held'] > 0     # its commit lock was measured
    assert len(set(names)) == 6                  # fresh for every run
    assert not any(_database_exists(name) for name in names)   # dropped


DISK = os.path.join(os.path.dirname(BENCH), 'disk.py')
BREAKDOWN = os.path.join(os.path.dirname(BENCH), 'breakdown.py')


def test_disk_accounting(tmp_path):
    """benchmarks/disk.py: the same documents in one FileStorage and in a
    round-robin composite of three; every partition holds stubs, and the
    holder of cross-partition references is bigger than ZODB's."""
    out = tmp_path / 'disk.json'
    proc = subprocess.run(
        [sys.executable, DISK, '-n', '60', '--per-transaction', '20',
         '--json', str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    plain, composite = result['plain'], result['composite']
    assert result['n'] == 60
    assert plain['stub_count'] == 0 and plain['records'] > 60
    # every revision of every object is written once, in its partition
    assert composite['records'] - composite['stub_count'] == \
        plain['records']
    assert all(p['stub_count'] > 0 for p in result['partitions'].values())
    assert composite['file'] == sum(
        p['file'] for p in result['partitions'].values())
    assert result['ratio'] == composite['file'] / plain['file'] > 1
    assert composite['holder'] > plain['holder']
    assert 'composite / plain: %.2f' % result['ratio'] in proc.stdout


def test_breakdown_times_each_step(tmp_path):
    """benchmarks/breakdown.py: timers around the composite's steps, and
    FileStorage's, on cross-partition commits."""
    out = tmp_path / 'breakdown.json'
    proc = subprocess.run(
        [sys.executable, BREAKDOWN, '-n', '200', '--transactions', '5',
         '--rounds', '1', '--json', str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    fs, composite = result['fs'], result['composite2']
    for workload in ('xadd', 'xupdate', 'small2'):
        steps = composite[workload]
        # the composite's steps are parts of its store, vote and finish
        assert 0 < steps['rewrite'] < steps['store'] < steps['seconds']
        assert 0 < steps['child stores'] < steps['store']
        assert steps['child finishes'] > 0 and steps['child votes'] > 0
        assert set(fs[workload]) == {'seconds', 'store', 'child votes',
                                     'child finishes'}
    # new targets get stubs; every commit here spans both partitions
    assert composite['xadd']['stubs'] > 0
    assert composite['small2']['intent'] > 0
    assert 'ratio fs/composite: xadd ' in proc.stdout
