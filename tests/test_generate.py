"""``benchmarks/generate.py`` builds a correct composite, and
``benchmarks/scale.py`` runs end to end.

A small composite (3,000 objects) and the same graph in a plain FileStorage
are built once for the module.  The checks read the children's records
directly (``record_iternext`` and ZODB's ``referencesf``), independently of
compositestorage's own walkers, and run the ``compositestorage`` commands as
subprocesses.  No assertion is made about speed.
"""
import collections
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from ZODB.FileStorage import FileStorage
from ZODB.serialize import referencesf
from ZODB.utils import get_pickle_metadata
from ZODB.utils import z64

from conftest import config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, 'benchmarks')
SCALE = os.path.join(BENCHMARKS, 'scale.py')
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)

import generate  # noqa: E402  (benchmarks/ is not a package)

OBJECTS = 3000
APP_CLASSES = {'generate.' + k: part for part, names in
               generate.CLASSES.items() for k in names}
PREFIX = dict(generate.PARTITIONS)


def cli(*args):
    proc = subprocess.run(
        [sys.executable, '-m', 'compositestorage'] + [str(a) for a in args],
        capture_output=True, text=True, timeout=120)
    return proc


def cli_json(*args):
    proc = cli(*args, '--json')
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def records(path):
    """``{oid: data}`` of the current records of the FileStorage at
    ``path``."""
    fs = FileStorage(path, read_only=True)
    try:
        out = {}
        token = None
        while True:
            oid, _, data, token = fs.record_iternext(token)
            out[oid] = data
            if token is None:
                return out
    finally:
        fs.close()


def klass(data):
    return '%s.%s' % get_pickle_metadata(data)


def own(prefix, recs):
    """The records of a child's own objects (no stubs, no partition map)."""
    return {oid: data for oid, data in recs.items()
            if oid[0] == prefix and oid[1:] != b'\xff' * 7}


def mark(load):
    """The classes of every object reachable from the root, by oid;
    ``load(oid)`` gives an object's record.  A reference to nothing fails."""
    seen = {}
    todo = [z64]
    while todo:
        oid = todo.pop()
        if oid in seen:
            continue
        data = load(oid)
        assert data is not None, 'dangling reference to %s' % oid.hex()
        seen[oid] = klass(data)
        todo.extend(r for r in referencesf(data) if r not in seen)
    return seen


def composite_records(paths):
    return {PREFIX[name]: records(path) for name, path in paths.items()}


def composite_mark(recs):
    return mark(lambda oid: recs[oid[0]].get(oid))


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    directory = tmp_path_factory.mktemp('generated')
    out = io.StringIO()
    summary = generate.generate(str(directory), OBJECTS,
                                plain=str(directory / 'plain.fs'), out=out)
    paths = {name: info['path'] for name, info in
             summary['composite']['partitions'].items()}
    return summary, out.getvalue(), directory, paths


def test_what_was_built_is_printed_and_summarized(built):
    summary, text, directory, paths = built
    assert summary['config'] == str(directory / 'composite.conf')
    with open(directory / 'generated.json') as f:
        assert json.load(f) == summary
    c = summary['composite']
    assert sum(c['created'].values()) == OBJECTS
    assert set(paths) == {'main', 'catalog', 'archive'}
    for name, info in c['partitions'].items():
        assert '%s' % info['path'] in text
        assert '  %-8s prefix %d: %9d objects' % (
            name, info['prefix'], info['objects']) in text
    assert 'cross-partition references created: %d' % sum(
        c['cross_references_created'].values()) in text
    assert 'composite built in' in text
    assert 'plain FileStorage built in' in text
    # the garbage is about 10% of what was created
    live = sum(c['expected_live'][k] for k in c['created'])
    assert 0.05 <= 1 - live / OBJECTS <= 0.15
    assert c['expected_live']['documents_last_held_from_another_partition']
    assert c['expected_live']['terms_held_only_from_main']


def test_the_config_is_the_tests_format_and_opens(built, tmp_path):
    summary, _, directory, paths = built
    text = (directory / 'composite.conf').read_text()
    expected = config_file(tmp_path, paths, generate.PARTITIONS).read_text()
    def words(config):
        return ' '.join(config.split()).replace(' >', '>')
    assert words(text) == words(expected)
    storage = generate.open_config(summary['config'])
    try:
        assert [(p.name, p.prefix, p.storage._file_name)
                for p in storage.partitions] == [
            (name, prefix, paths[name])
            for name, prefix in generate.PARTITIONS]
    finally:
        storage.close()


def test_verify_finds_only_the_stubs_left_by_unindexing(built):
    """Taking a document out of ``featured`` leaves its stub in ``catalog``
    until a pack; verify reports exactly those, and nothing else."""
    summary, _, directory, paths = built
    orphans = summary['composite']['expected_live']['orphan_stubs']
    rc, report = cli_json('verify', summary['config'])
    assert [p for p in report['problems']
            if p['kind'] != 'orphan-stub'] == []
    found = collections.Counter(
        (p['partition'], p['class']) for p in report['problems'])
    assert found == collections.Counter(
        {('catalog', 'generate.Document'): orphans['catalog']})
    # orphan stubs are garbage, listed but not errors
    assert all(p['garbage'] for p in report['problems'])
    assert rc == 0 and report['ok'] is True
    rc, strict = cli_json('verify', '--strict', summary['config'])
    assert rc == (1 if orphans['catalog'] else 0)
    assert strict['ok'] is (orphans['catalog'] == 0)
    # every partition holds objects, as many as generate.py counted
    for name, info in summary['composite']['partitions'].items():
        assert report['partitions'][name]['objects'] == info['objects'] > 0
        assert report['partitions'][name]['stubs'] == info['stubs'] > 0


def test_objects_are_in_their_partitions(built):
    summary, _, directory, paths = built
    rc, report = cli_json('stats', summary['config'], '--top', '50')
    assert rc == 0
    created = summary['composite']['created']
    seen = set()
    for name, part in report['partitions'].items():
        counts = dict(part['top_by_count'])
        for cls, home in APP_CLASSES.items():
            if home == name:
                assert counts[cls] == created[cls.split('.')[1]] > 0
                seen.add(cls)
            else:
                assert cls not in counts
        # and BTrees of the partition's own
        assert any(cls.startswith('BTrees.') for cls in counts), name
    assert seen == set(APP_CLASSES)


def test_about_5_percent_of_references_cross_partitions(built):
    summary, _, directory, paths = built
    rc, report = cli_json('stats', summary['config'])
    assert rc == 0
    total = cross = 0
    pairs = collections.Counter()
    name_of = {prefix: name for name, prefix in generate.PARTITIONS}
    for prefix, recs in composite_records(paths).items():
        for oid, data in own(prefix, recs).items():
            for ref in referencesf(data):
                total += 1
                if ref[0] != prefix:
                    cross += 1
                    pairs[name_of[prefix], name_of[ref[0]]] += 1
    edges = report['edges']
    assert sum(sum(row.values()) for row in edges.values()) == cross
    for (src, dest), n in pairs.items():
        assert edges[src][dest] == n
    # every kind the generator makes is there
    assert pairs['catalog', 'main'] and pairs['archive', 'main']
    assert pairs['main', 'catalog'] and pairs['main', 'archive']
    assert 0.02 <= cross / total <= 0.10, (cross, total)


def test_the_plain_file_holds_the_same_objects(built):
    summary, _, directory, paths = built
    comp = composite_records(paths)
    plain = records(summary['plain']['path'])
    owned = sum(len(own(p, r)) for p, r in comp.items())
    assert owned == len(plain) == summary['plain']['objects']
    reachable = composite_mark(comp)
    plain_reachable = mark(plain.get)
    assert len(reachable) == len(plain_reachable) < owned
    classes = collections.Counter(reachable.values())
    assert classes == collections.Counter(plain_reachable.values())
    live = summary['composite']['expected_live']
    for cls in APP_CLASSES:
        assert classes[cls] == live[cls.split('.')[1]], cls


def test_pack_removes_the_garbage_and_only_that(built, tmp_path):
    summary, _, directory, paths = built
    copies = {}
    for name, path in paths.items():
        copies[name] = str(tmp_path / ('%s.fs' % name))
        shutil.copyfile(path, copies[name])
    config = config_file(tmp_path, copies, generate.PARTITIONS)
    plain = str(tmp_path / 'plain.fs')
    shutil.copyfile(summary['plain']['path'], plain)

    before = composite_records(copies)
    reachable = composite_mark(before)
    owned_before = sum(len(own(p, r)) for p, r in before.items())

    proc = cli('pack', config)
    assert proc.returncode == 0, proc.stderr
    for name in paths:
        assert '%s: removed ' % name in proc.stdout

    proc = cli('verify', config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == 'ok'

    after = composite_records(copies)
    owned_after = {oid: klass(data) for p, r in after.items()
                   for oid, data in own(p, r).items()}
    assert len(owned_after) < owned_before          # garbage went
    assert owned_after == reachable                 # and only garbage
    # garbage went from every partition
    for name, prefix in generate.PARTITIONS:
        assert len(own(prefix, after[prefix])) < len(
            own(prefix, before[prefix])), name

    # the plain FileStorage packs to as many objects
    fs = FileStorage(plain)
    try:
        assert len(fs) == owned_before
        fs.pack(time.time(), referencesf)
        assert len(fs) == len(reachable)
    finally:
        fs.close()


ROWS = {'generate': 'generate.py (composite + plain)',
        'verify': 'compositestorage verify',
        'stats': 'compositestorage stats', 'pack': 'compositestorage pack',
        'fs-pack': 'FileStorage pack (plain)'}


def test_scale_runs_and_reports(tmp_path):
    out = tmp_path / 'scale.json'
    proc = subprocess.run(
        [sys.executable, SCALE, '--generate', '2000', '--dir',
         str(tmp_path / 'gen'), '--repeat', '1', '--json', str(out)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'ratio composite pack / FileStorage pack' in proc.stdout
    data = json.loads(out.read_text())
    assert data['generated']['objects'] == 2000
    for name in ('generate', 'verify', 'stats', 'pack', 'fs-pack'):
        s = data['summary'][name]
        assert s['runs'] == 1
        assert s['best_wall'] > 0 and s['median_wall'] > 0
        assert s['peak_rss_kb'] > 1024          # any Python is over 1 MB
        # the table row: label, runs, best s, median s, peak MB, exit
        row = [line[len(ROWS[name]):].split()
               for line in proc.stdout.splitlines()
               if re.match(re.escape(ROWS[name]) + r' +1 ', line)]
        assert row == [['1', '%.2f' % s['best_wall'],
                        '%.2f' % s['median_wall'],
                        '%.1f' % (s['peak_rss_kb'] / 1024.0),
                        ','.join(map(str, s['exit_status']))]], row
    assert data['summary']['stats']['exit_status'] == [0]
    assert data['summary']['pack']['exit_status'] == [0]
    for key in ('best_wall', 'median_wall', 'peak_rss'):
        assert data['ratio'][key] > 0
    assert data['ratio']['best_wall'] == pytest.approx(
        data['summary']['pack']['best_wall']
        / data['summary']['fs-pack']['best_wall'])
    for name in ('pack', 'fs-pack'):
        sizes = data['sizes'][name]
        assert 0 < sizes['after_bytes'] < sizes['before_bytes']
    assert not (tmp_path / 'gen' / 'scratch').exists()
