"""The ``compositestorage`` command-line tool, run as a real process.

``serve`` runs in a subprocess on 127.0.0.1 with a port the OS picks (the
tool prints the one it bound); ZEO clients are further subprocesses that
commit and read with ``server_sync=True``.  ``info`` runs on real
FileStorage files written through a real composite.  No mocks.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import ZODB
import ZODB.config
from persistent.list import PersistentList
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage
from ZODB.TimeStamp import TimeStamp
from ZODB.utils import z64

from compositestorage import CompositeStorage

from conftest import iter_current

from conftest import CLI
from conftest import TIMEOUT
THREE = (('main', 0), ('catalog', 1), ('archive', 2))


def run_cli(*args, cwd=None):
    return subprocess.run(CLI + [str(a) for a in args], cwd=cwd,
                          capture_output=True, text=True, timeout=TIMEOUT)


def assert_error(result, *words, code=1):
    """A non-zero exit and one clear line on stderr, no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert 'Traceback' not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    if code == 2:   # argparse: the usage line, then the error
        assert lines[-1].startswith('compositestorage'), lines
        assert ': error: ' in lines[-1], lines
    else:
        assert len(lines) == 1, lines
        assert lines[0].startswith('compositestorage: error: '), lines
    for word in words:
        assert word in lines[-1], (word, lines[-1])
    return lines[-1]


# --- configs ------------------------------------------------------------------

def partitions_xml(directory, parts=THREE):
    return ''.join('''
  <partition %s>
    prefix %d
    <filestorage>
      path %s
    </filestorage>
  </partition>''' % (name, prefix, os.path.join(directory, name + '.fs'))
                   for name, prefix in parts)


def composite_xml(directory, parts=THREE, top='placement round-robin',
                  section='compositestorage', blobs='blobs'):
    return '<%s>\n  %s\n  blob-dir %s%s\n</compositestorage>\n' % (
        section, top, os.path.join(directory, blobs),
        partitions_xml(directory, parts))


def zeo_conf(directory, address='127.0.0.1:0', **kw):
    return '%%import compositestorage\n<zeo>\n  address %s\n</zeo>\n%s' % (
        address, composite_xml(directory, section='compositestorage 1', **kw))


def write(path, text):
    path.write_text(text)
    return str(path)


# --- clients of a served composite ---------------------------------------------

CLIENT = textwrap.dedent('''
    """A ZEO client driven over stdin: write KEY N | read KEY."""
    import json
    import sys

    import transaction
    import ZEO
    from persistent.mapping import PersistentMapping

    db = ZEO.DB((sys.argv[1], int(sys.argv[2])), server_sync=True,
                wait_timeout=30)
    conn = db.open()
    print(json.dumps('ready'), flush=True)

    def describe(head):
        items = head['items']
        return {'oids': [head._p_oid.hex()] + [o._p_oid.hex() for o in items],
                'values': [o['value'] for o in items],
                'next': [o['next']._p_oid.hex() if 'next' in o else None
                         for o in items]}

    for line in sys.stdin:
        cmd, key, *rest = line.split()
        transaction.begin()
        root = conn.root()
        if cmd == 'write':
            items = [PersistentMapping(value='%s-%d' % (key, i))
                     for i in range(int(rest[0]))]
            for a, b in zip(items, items[1:]):
                a['next'] = b
            root[key] = PersistentMapping(items=items)
            transaction.commit()
            out = describe(root[key])
        else:
            out = describe(root[key]) if key in root else None
            transaction.abort()
        print(json.dumps(out), flush=True)
    conn.close()
    db.close()
''')


class Client:
    """One ZEO client process of ``served``."""

    def __init__(self, served, tmp_path):
        script = tmp_path / 'client.py'
        if not script.exists():
            script.write_text(CLIENT)
        self.proc = subprocess.Popen(
            [sys.executable, str(script), served.host, str(served.port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        assert self._reply() == 'ready'

    def _reply(self):
        line = self.proc.stdout.readline()
        assert line, 'client died: %s' % self.proc.stderr.read()
        return json.loads(line)

    def ask(self, *words):
        self.proc.stdin.write(' '.join(map(str, words)) + '\n')
        self.proc.stdin.flush()
        return self._reply()

    def close(self):
        self.proc.stdin.close()
        rc = self.proc.wait(timeout=TIMEOUT)
        err = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        assert rc == 0, err


@pytest.fixture
def clients(tmp_path):
    started = []

    def start(served):
        client = Client(served, tmp_path)
        started.append(client)
        return client
    yield start
    for client in started:
        if client.proc.poll() is None:
            client.proc.kill()
            client.proc.wait(timeout=TIMEOUT)


def prefixes(oids):
    return {bytes.fromhex(oid)[0] for oid in oids}


# --- --help -------------------------------------------------------------------

def test_help_of_the_tool_and_every_subcommand():
    # the console script itself, as installed
    script = os.path.join(os.path.dirname(sys.executable), 'compositestorage')
    top = subprocess.run([script, '--help'], capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert top.returncode == 0, top.stderr
    assert top.stdout.startswith('usage: compositestorage')
    for command in ('serve', 'info'):
        assert command in top.stdout
    serve = run_cli('serve', '--help')
    assert serve.returncode == 0, serve.stderr
    for text in ('--config', '--address', 'HOST:PORT', 'zeo.conf',
                 '127.0.0.1:8100', 'SIGTERM'):
        assert text in serve.stdout, text
    info = run_cli('info', '--help')
    assert info.returncode == 0, info.stderr
    for text in ('CONFIG_OR_URI', '--json', 'read-only', 'zeo://'):
        assert text in info.stdout, text


def test_no_command_is_a_usage_error():
    result = run_cli()
    assert result.returncode == 2
    assert 'usage: compositestorage' in result.stderr
    assert 'Traceback' not in result.stderr


# --- serve: the embedded default -------------------------------------------------

@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT],
                         ids=['SIGTERM', 'SIGINT'])
def test_serve_the_embedded_default(tmp_path, serving, clients, sig):
    served = serving(['--address', '127.0.0.1:0'], tmp_path, 2)
    assert served.host == '127.0.0.1' and served.port != 0
    assert served.partitions == [
        '  partition main prefix 0 FileStorage var/main.fs',
        '  partition catalog prefix 1 FileStorage var/catalog.fs']

    writer = clients(served)
    written = writer.ask('write', 'things', 5)
    # a second client, in a second process, reads the commit back
    reader = clients(served)
    assert reader.ask('read', 'things') == written
    assert written['values'] == ['things-%d' % i for i in range(5)]
    # the default placement puts new objects in main
    assert prefixes(written['oids']) == {0}
    writer.close()
    reader.close()

    assert served.stop(sig) == 0, served.stderr()
    log = served.stderr()
    assert 'terminated by %s' % sig.name in log
    assert "closing storage '1'" in log
    assert 'Traceback' not in log
    var = tmp_path / 'var'
    assert (var / 'main.fs').exists() and (var / 'catalog.fs').exists()
    assert (var / 'blobs').is_dir()
    # the files are unlocked and hold the commit
    storage = CompositeStorage([
        ('main', 0, FileStorage(str(var / 'main.fs'))),
        ('catalog', 1, FileStorage(str(var / 'catalog.fs')))])
    db = ZODB.DB(storage)
    try:
        with db.transaction() as conn:
            items = conn.root()['things']['items']
            assert [o['value'] for o in items] == written['values']
    finally:
        db.close()


# --- serve --config: a round-robin composite ---------------------------------------

def test_serve_config_two_clients_see_each_other(tmp_path, serving, clients):
    conf = write(tmp_path / 'zeo.conf', zeo_conf(str(tmp_path)))
    served = serving(['--config', conf], tmp_path, 3)
    assert served.port != 0
    assert served.partitions == [
        '  partition %s prefix %d FileStorage %s' % (
            name, prefix, os.path.relpath(str(tmp_path / (name + '.fs')),
                                          str(tmp_path)))
        for name, prefix in THREE]

    a = clients(served)
    b = clients(served)
    from_a = a.ask('write', 'a', 6)
    assert prefixes(from_a['oids']) == {0, 1, 2}
    # the chain crosses partitions at every step
    assert all(bytes.fromhex(x)[0] != bytes.fromhex(y)[0]
               for x, y in zip(from_a['oids'][1:], from_a['oids'][2:]))
    assert b.ask('read', 'a') == from_a
    from_b = b.ask('write', 'b', 6)
    assert prefixes(from_b['oids']) == {0, 1, 2}
    assert a.ask('read', 'b') == from_b
    assert a.ask('read', 'a') == from_a
    a.close()
    b.close()
    assert served.stop() == 0, served.stderr()


def test_serve_address_overrides_the_config(tmp_path, serving):
    # the config names a port nobody can bind; --address wins
    conf = write(tmp_path / 'zeo.conf',
                 zeo_conf(str(tmp_path), address='192.0.2.1:1'))
    served = serving(['--config', conf, '--address', '127.0.0.1:0'],
                     tmp_path, 3)
    assert served.host == '127.0.0.1' and served.port not in (0, 1)
    assert served.stop(signal.SIGINT) == 0, served.stderr()


def test_info_and_a_second_server_while_serving(tmp_path, serving, clients):
    conf = write(tmp_path / 'zeo.conf', zeo_conf(str(tmp_path)))
    served = serving(['--config', conf], tmp_path, 3)
    (tmp_path / 'elsewhere').mkdir()
    client = clients(served)
    written = client.ask('write', 'a', 5)
    client.close()
    oids = [z64.hex()] + written['oids']

    # A read-only FileStorage takes no lock: info works while the server
    # runs, on the server's own zeo.conf, and sees every commit.
    result = run_cli('info', '--json', conf)
    assert result.returncode == 0, result.stderr
    assert 'Traceback' not in result.stderr
    info = json.loads(result.stdout)
    assert info['objects'] == len(oids)
    assert {p['name']: p['objects'] for p in info['partitions']} == {
        name: sum(1 for oid in oids if bytes.fromhex(oid)[0] == prefix)
        for name, prefix in THREE}

    # Over ZEO only what a client knows, and a pointer to the config.
    result = run_cli('info', '--json', 'zeo://%s:%d' % (served.host,
                                                         served.port))
    assert result.returncode == 0, result.stderr
    remote = json.loads(result.stdout)
    assert remote['composite'] is False
    assert remote['type'] == 'ClientStorage'
    assert remote['objects'] == len(oids)
    assert remote['last_transaction'] == info['last_transaction']
    assert "server's config" in remote['note']

    # A second server on the same files: the first one holds their locks.
    second = run_cli('serve', '--config', conf, '--address', '127.0.0.1:0',
                     cwd=tmp_path)
    assert_error(second, "Couldn't lock", 'main.fs.lock')
    # ... or on the same address
    third = run_cli('serve', '--address', '%s:%d' % (served.host, served.port),
                    cwd=tmp_path / 'elsewhere')
    assert_error(third, 'already in use', str(served.port))
    assert served.stop() == 0, served.stderr()


# --- info -------------------------------------------------------------------

def write_graph(tmp_path):
    """A round-robin composite with a cross-referenced graph, closed.

    Returns ``(oids, last tid)``.
    """
    db = ZODB.config.databaseFromString(
        '%%import compositestorage\n<zodb>\n%s</zodb>\n'
        % composite_xml(str(tmp_path)))
    try:
        with db.transaction() as conn:
            items = [PersistentMapping(n=i) for i in range(9)]
            for a, b in zip(items, items[1:]):
                a['next'] = b
            items[-1]['next'] = items[0]
            conn.root()['items'] = PersistentList(items)
        with db.transaction() as conn:
            conn.root()['more'] = PersistentMapping(
                first=conn.root()['items'][0])
        with db.transaction() as conn:
            root = conn.root()
            oids = [root._p_oid, root['items']._p_oid, root['more']._p_oid]
            oids += [o._p_oid for o in root['items']]
        return oids, db.storage.lastTransaction()
    finally:
        db.close()


def snapshot(directory):
    """Every file below ``directory``: its size and mtime."""
    out = {}
    for dirpath, _, files in os.walk(directory):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.join(dirpath, f)] = (st.st_size, st.st_mtime_ns)
    return out


def parse_text(text):
    """``info``'s text: ``{'': composite facts, name: partition facts}``."""
    sections = {}
    current = None
    for line in text.splitlines():
        if line.startswith('  '):
            key, _, value = line.strip().partition('  ')
            current[key] = value.strip()
        else:
            kind, name = line.split(' ', 1)
            current = sections.setdefault(
                '' if kind == 'composite' else name, {'name': name})
    return sections


def info_targets(tmp_path):
    """The same composite, named in every form info takes.

    The configs name a blob directory that does not exist: info must not
    create it (a read-only FileStorage would).
    """
    d = str(tmp_path)
    return {
        'zodb-section': write(
            tmp_path / 'zodb.conf', '%%import compositestorage\n<zodb>\n%s'
            '</zodb>\n' % composite_xml(d, blobs='new-blobs')),
        'bare-section': write(
            tmp_path / 'storage.conf', '%%import compositestorage\n%s'
            % composite_xml(d, blobs='new-blobs')),
        'zeo.conf': write(tmp_path / 'zeo.conf',
                          zeo_conf(d, blobs='new-blobs')),
        'zconfig-uri': 'zconfig://' + write(
            tmp_path / 'uri.conf', '%%import compositestorage\n%s'
            % composite_xml(d, blobs='new-blobs')),
        'composite-uri': 'composite:' + '/'.join(
            '%s=%d:(file://%s)' % (name, prefix,
                                   os.path.join(d, name + '.fs'))
            for name, prefix in THREE) + '?placement=round-robin',
    }


@pytest.mark.parametrize('form', ['zodb-section', 'bare-section', 'zeo.conf',
                                  'zconfig-uri', 'composite-uri'])
def test_info(tmp_path, form):
    oids, last_tid = write_graph(tmp_path)
    target = info_targets(tmp_path)[form]
    before = snapshot(tmp_path)

    text = run_cli('info', target)
    assert text.returncode == 0, text.stderr
    assert 'Traceback' not in text.stderr
    as_json = run_cli('info', target, '--json')
    assert as_json.returncode == 0, as_json.stderr
    # info wrote, created and locked nothing
    assert snapshot(tmp_path) == before
    assert not (tmp_path / 'new-blobs').exists()

    info = json.loads(as_json.stdout)
    sections = parse_text(text.stdout)
    assert info['composite'] is True
    assert info['read_only'] is True
    assert info['objects'] == len(oids)
    assert info['last_transaction'] == {
        'tid': last_tid.hex(), 'time': '%s UTC' % TimeStamp(last_tid)}
    top = sections['']
    assert top['name'] == info['name']
    assert top['objects'] == str(len(oids))
    assert top['last transaction'] == '%s UTC (0x%s)' % (
        TimeStamp(last_tid), last_tid.hex())
    assert top['identity'] == info['identity']

    assert [p['name'] for p in info['partitions']] == [n for n, _ in THREE]
    for (name, prefix), part in zip(THREE, info['partitions']):
        path = str(tmp_path / (name + '.fs'))
        child = FileStorage(path, read_only=True)
        try:
            stubs = sum(1 for oid, _, _ in iter_current(child)
                        if oid[0] != prefix)
        finally:
            child.close()
        assert stubs > 0, name
        expected = {
            'prefix': prefix,
            'type': 'FileStorage',
            'objects': sum(1 for oid in oids if oid[0] == prefix),
            'stubs': stubs,
            'size': os.path.getsize(path),
        }
        assert {k: part[k] for k in expected} == expected, name
        assert part['objects'] > 0
        assert part['map']['partition'] == name
        assert part['map']['prefix'] == prefix
        assert part['map']['composite'] == info['identity']
        assert part['map']['partitions'] == dict(THREE)
        shown = sections[name]
        assert shown['prefix'] == str(prefix)
        assert shown['type'] == 'FileStorage (read-only)'
        assert shown['objects'] == str(expected['objects'])
        assert shown['stubs'] == str(stubs)
        assert shown['size'] == '%d bytes' % expected['size']
        assert shown['path'].endswith(name + '.fs')
        assert shown['map'].startswith(
            'partition %s (prefix %d) of composite %s' % (
                name, prefix, info['identity']))
    assert sum(p['objects'] for p in info['partitions']) == len(oids)


# --- demo -------------------------------------------------------------------

def test_demo_commits_across_partitions(tmp_path):
    for run in (1, 2):
        result = run_cli('demo', '--var', 'data', cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        shown = parse_text(result.stdout)
        # each run adds one object to catalog, referred to from main
        assert shown['catalog']['objects'] == str(run)
        assert shown['main']['stubs'] == str(run)
    assert sorted(f for f in os.listdir(tmp_path / 'data')
                  if f.endswith('.fs')) == ['catalog.fs', 'main.fs']


# --- errors -------------------------------------------------------------------

BAD_CONFIGS = {
    'unclosed': ('%import compositestorage\n<compositestorage>\n'
                 '  <partition main>\n', ['unclosed', 'line 3']),
    'bad-prefix': ('%import compositestorage\n<compositestorage>\n'
                   '  <partition main>\n    prefix zero\n'
                   '    <mappingstorage>\n    </mappingstorage>\n'
                   '  </partition>\n</compositestorage>\n',
                   ["'zero'", 'line 4']),
    'no-import': ('<compositestorage>\n</compositestorage>\n',
                  ["'compositestorage'"]),
    'unknown-default-partition': (
        lambda d: '%%import compositestorage\n%s' % composite_xml(
            d, top='default-partition nosuch'),
        ["default-partition 'nosuch' is not a configured partition"]),
    'duplicate-prefix': (
        lambda d: '%%import compositestorage\n%s' % composite_xml(
            d, parts=(('main', 0), ('b', 1), ('c', 1))),
        ["'b' and 'c' both have prefix 1"]),
}


@pytest.mark.parametrize('case', sorted(BAD_CONFIGS))
def test_info_bad_config(tmp_path, case):
    text, words = BAD_CONFIGS[case]
    if callable(text):
        text = text(str(tmp_path))
    conf = write(tmp_path / 'bad.conf', text)
    assert_error(run_cli('info', conf), *words)
    # nothing was created beside the config
    assert os.listdir(tmp_path) == ['bad.conf']


def test_serve_bad_config(tmp_path):
    conf = write(tmp_path / 'zeo.conf', zeo_conf(
        str(tmp_path), top='default-partition nosuch'))
    assert_error(run_cli('serve', '--config', conf, cwd=tmp_path),
                 "default-partition 'nosuch'")
    # a storage config is not a zeo.conf
    conf = write(tmp_path / 'storage.conf',
                 '%%import compositestorage\n%s' % composite_xml(
                     str(tmp_path)))
    assert_error(run_cli('serve', '--config', conf, cwd=tmp_path),
                 '<zeo>')
    assert sorted(os.listdir(tmp_path)) == ['storage.conf', 'zeo.conf']


def test_missing_files(tmp_path):
    assert_error(run_cli('info', tmp_path / 'nothere.conf'), 'no such file',
                 'nothere.conf')
    assert_error(run_cli('serve', '--config', tmp_path / 'nothere.conf',
                         cwd=tmp_path), 'no such file', 'nothere.conf')
    # a config naming a partition file that does not exist: read-only
    # info reports it and creates nothing
    conf = write(tmp_path / 'c.conf', '%%import compositestorage\n%s'
                 % composite_xml(str(tmp_path)))
    assert_error(run_cli('info', conf), 'no such file', 'main.fs')
    assert os.listdir(tmp_path) == ['c.conf']


def test_unknown_uri_scheme():
    assert_error(run_cli('info', 'nosuch://somewhere'),
                 "unknown URI scheme 'nosuch'", 'zconfig')


def test_usage_errors(tmp_path):
    assert_error(run_cli('info'), 'CONFIG_OR_URI', code=2)
    assert_error(run_cli('serve', '--address', 'host:port', cwd=tmp_path),
                 '--address', code=2)
    assert_error(run_cli('bogus'), 'bogus', code=2)
    assert os.listdir(tmp_path) == []
