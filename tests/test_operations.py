"""Operating a composite: pack while commits go on, an interrupted pack,
progress, and ``verify``/``stats``/``pack`` through a ZEO server."""
import hashlib
import io
import json
import os
import signal
import threading
import time

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage

from compositestorage import cli
from compositestorage import faults
from compositestorage import gc
from compositestorage import placement
from compositestorage.errors import oid_hex
from compositestorage.progress import Plain
from compositestorage.progress import reporter
from conftest import config_file
from conftest import open_composite
from conftest import paths_for
from conftest import CLI
from test_cli import Client
from test_cli import composite_xml
from test_cli import run_cli
from test_cli import snapshot
from test_cli import write
from test_cli import write_graph
from test_cli import zeo_conf
from test_verify import delete
from test_verify import on_child
from test_verify import problems_of


def build_with_garbage(paths):
    """main holds ``kept`` (in b) and ``alive`` (in c); garbage in every
    partition refers across partitions, and b's garbage ``g`` is the only
    referrer in b of c's ``shared``, so b's stub of it is garbage too.
    Returns the oids."""
    db = ZODB.DB(open_composite(paths))
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    root = conn.root()
    with placement(conn, 'c'):
        shared = PersistentMapping(v='shared')
        conn.add(shared)
    with placement(conn, 'b'):
        kept = PersistentMapping(v='kept')
        g = PersistentMapping(v='garbage', shared=shared)
        conn.add(kept)
        conn.add(g)
    root['kept'] = kept
    root['shared'] = shared
    root['g'] = g
    root['junk'] = PersistentMapping(g=g)
    tm.commit()
    del root['g']
    del root['junk']
    tm.commit()
    oids = {'kept': kept._p_oid, 'shared': shared._p_oid, 'g': g._p_oid}
    db.close()
    return oids


def digest(paths):
    return {name: hashlib.sha256(open(path, 'rb').read()).hexdigest()
            for name, path in paths.items()}


@pytest.fixture
def hook():
    def install(function):
        faults.hook = function
    yield install
    faults.hook = None


# --- pack while commits go on ----------------------------------------------------

def test_a_commit_during_the_pack_keeps_the_stub_it_refers_through(
        tmp_path, monkeypatch):
    """The mark does not keep b's stub of ``shared`` (only garbage refers
    to it); a commit after the mark makes ``kept`` refer to ``shared``,
    through that stub.  The stub must survive the sweep."""
    paths = paths_for(tmp_path)
    oids = build_with_garbage(paths)
    fs = FileStorage(paths['b'], read_only=True)
    stub, stub_tid = fs.load(oids['shared'])
    fs.close()
    storage = open_composite(paths)
    db = ZODB.DB(storage)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    real_sweep = gc.sweep
    committed = []

    def sweep_after_a_commit(part, t, verdict):
        if not committed:
            assert part.name != 'b' or \
                int.from_bytes(oids['shared'], 'big') not in verdict
            root = conn.root()
            root['kept']['shared'] = root['shared']
            tm.commit()
            committed.append(storage.lastTransaction())
        return real_sweep(part, t, verdict)

    monkeypatch.setattr(gc, 'sweep', sweep_after_a_commit)
    time.sleep(0.01)
    db.pack()
    assert committed
    conn.close()
    db.close()

    assert problems_of(paths) == []
    storage = open_composite(paths, read_only=True)
    try:
        db = ZODB.DB(storage)
        root = db.open().root()
        assert root['kept']['shared']['v'] == 'shared'
        assert 'g' not in root
        db.close()
    finally:
        storage.close()
    fs = FileStorage(paths['b'], read_only=True)
    try:
        with pytest.raises(KeyError):
            fs.load(oids['g'])           # the garbage went
        # the stub stayed: the very same record, written again after the
        # pack time by the commit that referred through it
        assert fs.load(oids['shared']) == (stub, committed[0])
        assert committed[0] > stub_tid
    finally:
        fs.close()


def test_pack_in_a_thread_while_commits_continue(tmp_path):
    """As ZEO packs: in a thread of its own, while another thread commits
    cross-partition transactions.  No commit is lost; the result verifies."""
    paths = paths_for(tmp_path)
    build_with_garbage(paths)
    storage = open_composite(paths, placement='round-robin')
    db = ZODB.DB(storage)
    errors = []
    written = []
    packs = []
    stop = threading.Event()

    def packer():
        try:
            while not stop.is_set():
                storage.pack(time.time(), None)
                packs.append(1)
        except Exception as e:      # pragma: no cover - reported below
            errors.append(e)

    thread = threading.Thread(target=packer)
    thread.start()
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        root = conn.root()
        deadline = time.time() + 30
        i = 0
        while (len(packs) < 3 or i < 60) and time.time() < deadline:
            chain = [PersistentMapping(n=i, k=k) for k in range(3)]
            for a, b in zip(chain, chain[1:]):
                a['next'] = b
            chain[-1]['shared'] = root['shared']  # through a stub
            root['t%d' % i] = chain[0]
            if i >= 2:
                del root['t%d' % (i - 2)]          # garbage for the packs
            tm.commit()
            written.append(i)
            i += 1
        conn.close()
    finally:
        stop.set()
        thread.join(120)
    assert not errors, errors
    assert len(packs) >= 3 and len(written) >= 60
    db.pack()
    db.close()

    assert problems_of(paths) == []
    storage = open_composite(paths, read_only=True)
    try:
        root = ZODB.DB(storage).open().root()
        last = written[-1]
        for i in (last - 1, last):
            head = root['t%d' % i]
            assert head['n'] == i
            assert head['next']['next']['shared']['v'] == 'shared'
            prefixes = {head._p_oid[0], head['next']._p_oid[0],
                        head['next']['next']._p_oid[0]}
            assert len(prefixes) > 1        # the chain crosses partitions
        assert 't%d' % (last - 2) not in root
    finally:
        storage.close()


# --- an interrupted pack -----------------------------------------------------------

def pack_with_sigint_at(tmp_path, hook, point):
    paths = paths_for(tmp_path)
    oids = build_with_garbage(paths)
    config = config_file(tmp_path, paths)
    before = digest(paths)

    def interrupt(name):
        if name == point:
            os.kill(os.getpid(), signal.SIGINT)
    hook(interrupt)
    err = io.StringIO()
    out = io.StringIO()
    real = cli.sys.stderr
    cli.sys.stderr = err
    try:
        args = cli.make_parser().parse_args(['pack', '-q', str(config)])
        code = cli.cmd_pack(args, out)
    finally:
        cli.sys.stderr = real
    return paths, oids, before, code, err.getvalue(), out.getvalue()


def test_ctrl_c_during_the_mark_changes_nothing(tmp_path, hook):
    paths, oids, before, code, err, out = pack_with_sigint_at(
        tmp_path, hook, 'pack:marking')
    assert code == 130
    assert 'before anything was removed' in err
    assert digest(paths) == before
    assert problems_of(paths) == []


def test_ctrl_c_during_the_sweep_finishes_every_partition(tmp_path, hook):
    paths, oids, before, code, err, out = pack_with_sigint_at(
        tmp_path, hook, 'pack:swept:main')
    assert code == 130
    assert 'finished sweeping every partition' in err
    after = digest(paths)
    assert all(after[name] != before[name] for name in ('main', 'b'))
    assert problems_of(paths) == []
    fs = FileStorage(paths['b'], read_only=True)
    try:
        with pytest.raises(KeyError):
            fs.load(oids['g'])           # b was swept after the interrupt
    finally:
        fs.close()


def test_a_real_sigint_to_the_pack_command(tmp_path):
    """The command in a process of its own, interrupted during its mark."""
    import subprocess
    import sys
    paths = paths_for(tmp_path)
    build_with_garbage(paths)
    config = config_file(tmp_path, paths)
    before = digest(paths)
    script = tmp_path / 'slow_pack.py'
    script.write_text(
        'import sys, time\n'
        'from compositestorage import cli, faults\n'
        'def hook(name):\n'
        '    if name == "pack:marking":\n'
        '        print("marking", flush=True)\n'
        '        time.sleep(30)\n'
        'faults.hook = hook\n'
        'sys.exit(cli.main(["pack", sys.argv[1]]))\n')
    proc = subprocess.Popen([sys.executable, str(script), str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for line in proc.stdout:
            if line.strip() == 'marking':
                break
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert rc == 130, err
    assert 'interrupted' in err and 'Traceback' not in err
    assert digest(paths) == before
    assert problems_of(paths) == []


# --- progress -------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    shown = Plain('verify: records', 200, out, 'records', every=0.0)
    for _ in range(4):
        shown.update(50)
    shown.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith('verify: records: 50/200 records (25%), ')
    assert '/s' in lines[0]
    assert lines[-1].startswith('verify: records: 200/200 records (100%)')
    assert lines[-1].endswith(', done')


def test_progress_bar_on_a_terminal_and_quiet():
    out = Terminal()
    shown = reporter(out)('pack: mark', 1000)
    shown.update(500)
    shown.update(500)
    shown.close()
    text = out.getvalue()
    assert text.startswith('\rpack: mark:   0%|')
    assert 'pack: mark: 100%|' in text and '1.00k/1.00k' in text
    assert 'objects/s]' in text
    quiet = io.StringIO()
    shown = reporter(quiet, quiet=True)('pack: mark', 1000)
    shown.update(1000)
    shown.close()
    assert quiet.getvalue() == ''


def test_the_commands_show_progress_on_stderr_only(tmp_path):
    paths = paths_for(tmp_path)
    build_with_garbage(paths)
    config = str(config_file(tmp_path, paths))
    for command in ('verify', 'stats', 'pack'):
        result = run_cli(command, config)
        assert result.returncode == 0, result.stderr
        assert 'done' in result.stderr, (command, result.stderr)
        assert 'done' not in result.stdout
        quiet = run_cli(command, '--quiet', config)
        assert quiet.returncode == 0 and quiet.stderr == ''
    stats = run_cli('stats', '--json', config)
    assert json.loads(stats.stdout)['partitions']['b']['objects'] == 1


# --- through a ZEO server ------------------------------------------------------------

def test_verify_stats_and_pack_through_zeo(tmp_path, serving):
    oids, _ = write_graph(tmp_path)
    local = run_cli('stats', '--json', '--quiet',
                    write(tmp_path / 'local.conf', '%import compositestorage\n'
                          + composite_xml(str(tmp_path))))
    assert local.returncode == 0, local.stderr
    local = json.loads(local.stdout)

    conf = write(tmp_path / 'zeo.conf', zeo_conf(str(tmp_path)))
    served = serving(['--config', conf], tmp_path, 3)
    uri = 'zeo://%s:%d?wait_timeout=30' % (served.host, served.port)
    def data_files():
        return {path: state for path, state in snapshot(str(tmp_path)).items()
                if not path.endswith('.log')}
    files = data_files()

    result = run_cli('verify', '--json', '--quiet', uri)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report['ok'] and report['problems'] == []
    by_prefix = {name: count['objects']
                 for name, count in report['partitions'].items()}
    assert by_prefix == {'prefix %d' % p['prefix']: p['objects']
                         for p in local['partitions'].values()}

    result = run_cli('stats', '--json', '--quiet', uri)
    assert result.returncode == 0, result.stderr
    served_stats = json.loads(result.stdout)
    for name, p in local['partitions'].items():
        there = served_stats['partitions']['prefix %d' % p['prefix']]
        assert there['objects'] == p['objects']
        # a client sees ZODB's bytes; a child stores class hints with them
        assert 0 < there['bytes'] <= p['bytes']
        assert there['top_by_count'] == p['top_by_count']
        assert there['stubs'] is None
    names = {p['prefix']: name for name, p in local['partitions'].items()}
    for src, row in served_stats['edges'].items():
        for dst, n in row.items():
            assert n == local['edges'][names[int(src.split()[1])]][
                names[int(dst.split()[1])]]
    assert sum(sum(row.values()) for row in served_stats['edges'].values())

    # reading through the server wrote nothing (but the server's log)
    assert data_files() == files

    result = run_cli('pack', uri)
    assert result.returncode == 0, result.stderr
    assert 'the server packed' in result.stdout
    # the server's log says what each partition lost
    for name in ('main', 'catalog', 'archive'):
        assert ("pack: partition '%s': removed 0 objects, 0 stubs"
                % name) in served.stderr()
    assert served.proc.poll() is None


def test_verify_through_zeo_finds_a_broken_reference(tmp_path,
                                                     serving):
    oids, _ = write_graph(tmp_path)
    victim = oids[3]                # one of the items, in some partition
    names = {0: 'main', 1: 'catalog', 2: 'archive'}
    on_child(str(tmp_path / (names[victim[0]] + '.fs')), delete(victim))
    conf = write(tmp_path / 'zeo.conf', zeo_conf(str(tmp_path)))
    served = serving(['--config', conf], tmp_path, 3)
    uri = 'zeo://%s:%d?wait_timeout=30' % (served.host, served.port)
    result = run_cli('verify', '--quiet', uri)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    # items[0]: the list, the last item and ``more`` refer to it
    assert lines[-1] == '3 problem(s)'
    dangling = [line for line in lines if line.startswith('dangling')]
    assert len(dangling) == 3
    assert all(line.startswith('dangling-reference: partition %r, oid %s' % (
        'prefix %d' % victim[0], oid_hex(victim))) for line in dangling)


def test_verify_through_zeo_refuses_a_plain_storage(tmp_path,
                                                    serving):
    conf = write(tmp_path / 'zeo.conf',
                 '<zeo>\n  address 127.0.0.1:0\n</zeo>\n'
                 '<filestorage 1>\n  path %s\n</filestorage>\n'
                 % (tmp_path / 'plain.fs'))
    served = serving(['--config', conf], tmp_path, 1)
    uri = 'zeo://%s:%d?wait_timeout=30' % (served.host, served.port)
    result = run_cli('verify', uri)
    assert result.returncode == 1
    assert 'does not serve a composite' in result.stderr


def test_zeo_packs_while_a_client_commits(tmp_path, serving):
    """ZEO runs the pack in a thread of the server while its clients go on
    committing: every commit stays, and the composite verifies after."""
    import subprocess
    conf = write(tmp_path / 'zeo.conf', zeo_conf(str(tmp_path)))
    served = serving(['--config', conf], tmp_path, 3)
    uri = 'zeo://%s:%d?wait_timeout=30' % (served.host, served.port)
    client = Client(served, tmp_path)
    done = threading.Event()
    packs = []

    def pack_again_and_again():
        while not done.is_set():
            proc = subprocess.run(CLI + ['pack', '-q', uri],
                                  capture_output=True, text=True, timeout=120)
            packs.append((proc.returncode, proc.stderr))

    thread = threading.Thread(target=pack_again_and_again)
    thread.start()
    written = {}
    try:
        deadline = time.time() + 60
        i = 0
        while (len(packs) < 3 or i < 30) and time.time() < deadline:
            key = 'k%d' % (i % 7)       # each write makes the last garbage
            written[key] = client.ask('write', key, 4)
            assert len({oid[:2] for oid in written[key]['oids']}) > 1
            i += 1
    finally:
        done.set()
        thread.join(180)
    assert len(packs) >= 3 and all(code == 0 for code, _ in packs), packs
    for key, expected in written.items():
        assert client.ask('read', key) == expected
    client.close()
    assert served.stop() == 0

    local = write(tmp_path / 'local.conf',
                  '%import compositestorage\n' + composite_xml(str(tmp_path)))
    result = run_cli('verify', '--json', '--quiet', local)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    # what is left is garbage written since the last pack, at most
    assert all(p['garbage'] for p in report['problems']), report
