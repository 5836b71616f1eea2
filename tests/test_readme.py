"""Every example in README.rst, run as written (paths and ports adjusted).

Each example in the README follows a ``.. example: NAME`` comment; this
module reads them from the README itself, so the README cannot drift.
"""
import os
import re
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import transaction
import ZODB.config
from persistent.mapping import PersistentMapping

from compositestorage import placement

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(os.path.dirname(HERE), 'README.rst')


def examples():
    """``{name: text}`` of the README's marked literal blocks."""
    with open(README) as f:
        lines = f.read().splitlines()
    found = {}
    for i, line in enumerate(lines):
        m = re.match(r'\.\. example: (\S+)$', line)
        if not m:
            continue
        j = i + 1
        while lines[j].strip() != '::':
            j += 1
        j += 1
        block = []
        while j < len(lines) and (not lines[j].strip()
                                  or lines[j].startswith(' ')):
            block.append(lines[j])
            j += 1
        found[m.group(1)] = textwrap.dedent('\n'.join(block)).strip() + '\n'
    return found


EXAMPLES = examples()


def test_the_readme_has_every_example():
    assert set(EXAMPLES) == {'zeo.conf', 'client.conf', 'zodb.conf',
                             'zope.conf', 'uri', 'python', 'keyed-import',
                             'keyed-lookup', 'overlay-vendor', 'overlay-hot',
                             'shared'}


def test_quick_start_commands():
    with open(README) as f:
        text = f.read()
    assert "pip install -e . && compositestorage serve" in text
    test_command = "pip install -e '.[test]' && python -m pytest -q"
    assert test_command in text
    with open(os.path.join(os.path.dirname(HERE), '.ci', 'run')) as f:
        assert test_command in f.read()   # CI runs the README's command


@pytest.fixture
def var(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir('var')
    return tmp_path


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _wait_for(port, proc, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError('server exited: %s' % (
                proc.stdout.read() if proc.stdout else proc.returncode))
        try:
            socket.create_connection(('127.0.0.1', port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError('server did not listen on %d' % port)


def test_zeo_conf_and_client_conf(var):
    port = _free_port()
    with open('zeo.conf', 'w') as f:
        f.write(EXAMPLES['zeo.conf'].replace('8100', str(port)))
    server = subprocess.Popen(
        [sys.executable, '-m', 'ZEO.runzeo', '-C', 'zeo.conf'],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(port, server)
        client_conf = EXAMPLES['client.conf'].replace('8100', str(port))
        db = ZODB.config.databaseFromString(client_conf)
        try:
            conn = db.open()
            conn.root()['x'] = PersistentMapping(a=1)
            transaction.commit()
            conn.close()
        finally:
            db.close()
        db = ZODB.config.databaseFromString(client_conf)
        try:
            assert db.open().root()['x']['a'] == 1
        finally:
            db.close()
    finally:
        server.terminate()
        server.wait(30)
    assert os.path.getsize('var/main.fs') > 4
    assert os.path.exists('var/catalog.fs')


def test_zodb_conf(var):
    db = ZODB.config.databaseFromString(EXAMPLES['zodb.conf'])
    try:
        storage = db.storage
        assert [(p.name, p.prefix) for p in storage.partitions] == [
            ('main', 0), ('catalog', 1)]
        conn = db.open()
        conn.root()['x'] = PersistentMapping()
        transaction.commit()
        assert conn.root()['x']._p_oid[0] == 0
    finally:
        db.close()


def test_zope_conf_through_zodb_config(var):
    """The ZODB-config path of the zope.conf example: Zope's <zodb_db>
    extends ZODB's <zodb> with mount-point, which ZODB lacks."""
    text = EXAMPLES['zope.conf'].replace('<zodb_db main>', '<zodb main>')
    text = text.replace('</zodb_db>', '</zodb>')
    text = '\n'.join(line for line in text.splitlines()
                     if 'mount-point' not in line)
    db = ZODB.config.databaseFromString(text)
    try:
        assert db.getCacheSize() == 50000
        assert [p.name for p in db.storage.partitions] == ['main', 'catalog']
    finally:
        db.close()


def test_shared(var):
    """The shared example, on two fresh PostgreSQL databases, opened by two
    ZODB.DBs as two processes would: each sees the other's commit."""
    from ZODB.interfaces import IMVCCStorage
    from relstorage_engines import PG_HOST, PG_PORT, PG_USER
    from relstorage_engines import postgres_database
    with postgres_database() as site, postgres_database() as catalog:
        text = EXAMPLES['shared'].replace('<zodb_db main>', '<zodb main>')
        text = text.replace('</zodb_db>', '</zodb>')
        text = '\n'.join(line for line in text.splitlines()
                         if 'mount-point' not in line)
        for name, db in (('site', site), ('catalog', catalog)):
            text = text.replace(
                'dbname=%s host=db.example.com' % name,
                'dbname=%s host=%s port=%d user=%s' % (
                    db, PG_HOST, PG_PORT, PG_USER))
        one = ZODB.config.databaseFromString(text)
        two = ZODB.config.databaseFromString(text)
        try:
            assert IMVCCStorage.providedBy(one.storage)
            with one.transaction() as conn:
                with placement(conn, 'catalog'):
                    conn.root()['catalog'] = PersistentMapping(n=1)
                    conn.add(conn.root()['catalog'])
            with two.transaction() as conn:
                assert conn.root()['catalog']['n'] == 1
                assert conn.root()['catalog']._p_oid[0] == 1
        finally:
            one.close()
            two.close()


def test_zope_conf_with_zope(var):
    """The zope.conf example through Zope's own schema."""
    zopeconf = pytest.importorskip(
        'Zope2.Startup.datatypes',
        reason='Zope is not installed; the ZODB-config path runs above')
    import ZConfig
    from Zope2.Startup import __file__ as startup
    schema = ZConfig.loadSchema(os.path.join(os.path.dirname(startup),
                                             'wsgischema.xml'))
    with open('zope.conf', 'w') as f:
        f.write(EXAMPLES['zope.conf'])
    config, _ = ZConfig.loadConfig(schema, 'zope.conf')
    dbtab = zopeconf.DBTab(config.databases)
    db = dbtab.getDatabase('/')
    try:
        assert [p.name for p in db.storage.partitions] == ['main', 'catalog']
    finally:
        db.close()


def test_uri(var):
    import zodburi
    uri = EXAMPLES['uri'].strip().replace('/srv/var', str(var / 'var'))
    factory, dbkw = zodburi.resolve_uri(uri)
    storage = factory()
    try:
        assert [(p.name, p.prefix) for p in storage.partitions] == [
            ('main', 0), ('catalog', 1)]
        assert storage.default_partition.name == 'main'
    finally:
        storage.close()
    assert os.path.exists(var / 'var' / 'catalog.fs')


def test_zconfig_uri(var):
    import zodburi
    with open('zodb.conf', 'w') as f:
        f.write(EXAMPLES['zodb.conf'])
    factory, dbkw = zodburi.resolve_uri('zconfig://%s' % (var / 'zodb.conf'))
    storage = factory()
    try:
        assert [p.name for p in storage.partitions] == ['main', 'catalog']
    finally:
        storage.close()


def test_python(var):
    exec(compile(EXAMPLES['python'], 'README.rst', 'exec'), {})
    assert os.path.getsize('var/catalog.fs') > 4


def test_keyed_import_and_lookup(var):
    """The import runs twice creating nothing; then another process (as an
    external system would) finds the objects by DN and UUID."""
    exec(compile(EXAMPLES['keyed-import'], 'README.rst', 'exec'), {})
    size = os.path.getsize('var/people.fs')
    assert size > 4
    out = subprocess.run([sys.executable, '-c', EXAMPLES['keyed-lookup']],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert os.path.getsize('var/people.fs') == size     # nothing written


def test_overlay_vendor(var):
    """A read-only vendor base with local attributes per site."""
    exec(compile(EXAMPLES['overlay-vendor'], 'README.rst', 'exec'), {})
    from ZODB.FileStorage import FileStorage
    vendor = FileStorage('var/vendor.fs', read_only=True)
    try:
        records = [r.data for t in vendor.iterator() for r in t]
        assert not any(b'hits' in data for data in records)
    finally:
        vendor.close()
    assert os.path.getsize('var/local.fs') > 4


def test_overlay_hot(var):
    exec(compile(EXAMPLES['overlay-hot'], 'README.rst', 'exec'), {})
    assert os.path.getsize('var/hot.fs') > os.path.getsize('var/main.fs')
