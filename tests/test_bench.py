"""The benchmark script runs end to end and reports what it promises.

It runs ``benchmarks/bench.py`` with a tiny N and one round as a subprocess.
No assertion is made about speed.
"""
import json
import os
import subprocess
import sys

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
            assert entry['ratio_to_fs'] > 0
            if kind == 'fs':
                assert entry['ratio_to_fs'] == 1.0
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
