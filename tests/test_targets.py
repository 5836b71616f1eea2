"""One rule for what every command takes, on real files.

Every command on a composite takes a zeo.conf, a Zope zope.conf (built
from Zope's own ``mkwsgiinstance`` skeleton, ``tests/data/zope.conf.in``
from Zope 6.3, the way ``mkwsgiinstance`` fills it in), a ``<zodb>`` file,
a bare ``<compositestorage>``, ``zconfig://PATH#NAME`` and a
``composite:`` URI; the composite is chosen in a file with several
databases, or named with ``--database``.  No maintenance command creates a
partition: a missing child file is an error that names it.
"""
import os
import re

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping

from compositestorage import placement
from compositestorage.cli import main as cli_main
from conftest import open_composite
from conftest import paths_for

HERE = os.path.dirname(os.path.abspath(__file__))
SKELETON = os.path.join(HERE, 'data', 'zope.conf.in')
TWO = (('main', 0), ('catalog', 1))

COMPOSITE = '''\
    <compositestorage>
      <partition main>
        prefix 0
        <filestorage>
          path $INSTANCE/var/main.fs
        </filestorage>
      </partition>
      <partition catalog>
        prefix 1
        <filestorage>
          path $INSTANCE/var/catalog.fs
        </filestorage>
      </partition>
    </compositestorage>
'''

SESSIONS = '''
<zodb_db sessions>
   <filestorage>
     path $INSTANCE/var/sessions.fs
   </filestorage>
   mount-point /sessions
   container-class OFS.Folder.Folder
</zodb_db>
'''


def zope_conf(instance, extra=''):
    """``etc/zope.conf`` as ``mkwsgiinstance`` writes it (the skeleton with
    ``<<INSTANCE_HOME>>`` replaced), its ``<zodb_db main>`` holding a
    composite, and ``extra`` databases after it."""
    with open(SKELETON) as f:
        text = f.read().replace('<<INSTANCE_HOME>>', str(instance))
    main = re.search(r'<zodb_db main>.*?</zodb_db>\n', text, re.S)
    assert main and 'mount-point /' in main.group(0)
    text = text.replace(main.group(0), (
        '<zodb_db main>\n    cache-size 30000\n%s    mount-point /\n'
        '</zodb_db>\n%s' % (COMPOSITE, extra)))
    assert 'instancehome $INSTANCE' in text and '<dos_protection>' in text
    os.makedirs(os.path.join(str(instance), 'etc'), exist_ok=True)
    path = os.path.join(str(instance), 'etc', 'zope.conf')
    with open(path, 'w') as f:
        f.write('%import compositestorage\n' + text)
    return path


def instance(tmp_path):
    """A Zope instance folder whose composite holds a few objects."""
    home = tmp_path / 'instance'
    (home / 'var').mkdir(parents=True)
    paths = {name: str(home / 'var' / ('%s.fs' % name))
             for name, _ in TWO}
    db = ZODB.DB(open_composite(paths, TWO))
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    with placement(conn, 'catalog'):
        conn.root()['catalog'] = PersistentMapping(entry=1)
        tm.commit()
    conn.root()['doc'] = PersistentMapping(title='x')
    tm.commit()
    db.close()
    return home, paths


def other_forms(home):
    """The other kinds of config of the same composite."""
    section = COMPOSITE.replace('$INSTANCE', str(home))
    forms = {}
    for name, text in (
            ('zeo.conf', '<zeo>\n  address 127.0.0.1:0\n</zeo>\n'
             + section.replace('<compositestorage>',
                               '<compositestorage 1>')),
            ('zodb.conf', '<zodb>\n%s</zodb>\n' % section),
            ('bare.conf', section)):
        path = str(home / 'etc' / name)
        with open(path, 'w') as f:
            f.write('%import compositestorage\n' + text)
        forms[name] = path
    forms['composite:'] = 'composite:(file://%s)/catalog=1:(file://%s)' % (
        home / 'var' / 'main.fs', home / 'var' / 'catalog.fs')
    return forms


def run(capsys, *argv):
    code = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def zope_instance(tmp_path):
    home, paths = instance(tmp_path)
    return home, paths, zope_conf(home)


def every_command(capsys, target, tmp_path, *options):
    """Run every command on ``target``; each must succeed."""
    repository = tmp_path / ('repo-%d' % len(os.listdir(str(tmp_path))))
    repository.mkdir()
    for argv in (['info'], ['verify', '-q'], ['stats', '-q'],
                 ['pack', '-q'], ['repair'], ['recover'],
                 ['backup', target, repository],
                 ['restore', target, repository, '--force']):
        if len(argv) == 1 or argv[0] in ('verify', 'stats', 'pack'):
            argv = argv + [target]
        code, out, err = run(capsys, *(argv + list(options)))
        assert code == 0, (argv, out, err)
        assert 'error' not in err, (argv, err)
        yield argv[0], out


def test_every_command_takes_a_zope_conf(zope_instance, tmp_path, capsys):
    home, paths, conf = zope_instance
    outputs = dict(every_command(capsys, conf, tmp_path))
    assert 'composite' in outputs['info']
    assert 'catalog' in outputs['info']
    assert outputs['verify'].splitlines()[-1] == 'ok'
    assert 'nothing to repair' in outputs['repair']
    assert 'nothing to recover' in outputs['recover']
    assert 'verify: ok' in outputs['restore']
    db = ZODB.DB(open_composite(paths, TWO, read_only=True))
    try:
        root = db.open().root()
        assert root['catalog']['entry'] == 1 and root['doc']['title'] == 'x'
    finally:
        db.close()


@pytest.mark.parametrize('form', ['zeo.conf', 'zodb.conf', 'bare.conf',
                                  'composite:', 'zconfig'])
def test_every_command_takes_every_form(zope_instance, tmp_path, capsys,
                                        form):
    home, paths, conf = zope_instance
    forms = other_forms(home)
    forms['zconfig'] = 'zconfig://%s#main' % conf
    outputs = dict(every_command(capsys, forms[form], tmp_path))
    assert outputs['verify'].splitlines()[-1] == 'ok'


def test_the_composite_is_chosen_beside_other_databases(zope_instance,
                                                        tmp_path, capsys):
    home, paths, _ = zope_instance
    conf = zope_conf(home, SESSIONS)
    from ZODB.FileStorage import FileStorage
    FileStorage(str(home / 'var' / 'sessions.fs')).close()
    code, out, err = run(capsys, 'info', conf)
    assert code == 0, err
    assert 'partition catalog' in out and 'sessions' not in out
    # the other database, named: info opens a plain storage read-only
    code, out, err = run(capsys, 'info', '--database', 'sessions', conf)
    assert code == 0, err
    assert 'sessions.fs' in out and 'partition' not in out
    # and a command that needs a composite says what it got
    code, out, err = run(capsys, 'verify', '-d', 'sessions', conf)
    assert code == 1 and 'not a composite' in err, err
    code, out, err = run(capsys, 'verify', '-q', '-d', 'MAIN', conf)
    assert code == 0, err


def test_several_composites_need_a_name(zope_instance, tmp_path, capsys):
    home, paths, _ = zope_instance
    other = '<zodb_db archive>\n%s  mount-point /archive\n</zodb_db>\n' % (
        COMPOSITE.replace('main.fs', 'a0.fs').replace('catalog.fs', 'a1.fs'))
    conf = zope_conf(home, other)
    code, out, err = run(capsys, 'verify', conf)
    assert code == 1
    assert 'several composites' in err and "'main'" in err \
        and "'archive'" in err and '--database' in err, err
    code, out, err = run(capsys, 'verify', '-q', '--database', 'main', conf)
    assert code == 0, err
    code, out, err = run(capsys, 'verify', '--database', 'nosuch', conf)
    assert code == 1 and "no database named 'nosuch'" in err, err
    assert "'archive'" in err and "'main'" in err


def test_a_zope_conf_without_a_composite(tmp_path, capsys):
    home = tmp_path / 'plain'
    (home / 'var').mkdir(parents=True)
    with open(SKELETON) as f:
        text = f.read().replace('<<INSTANCE_HOME>>', str(home))
    (home / 'zope.conf').write_text(text)
    code, out, err = run(capsys, 'verify', home / 'zope.conf')
    assert code == 1
    assert 'configures no <compositestorage>' in err and "'main'" in err


# --- no command creates a partition ---------------------------------------------

def listing(directory):
    return sorted(os.path.relpath(os.path.join(d, f), str(directory))
                  for d, _, files in os.walk(str(directory)) for f in files)


@pytest.mark.parametrize('command', ['pack', 'repair', 'recover', 'backup',
                                     'verify', 'stats', 'info'])
@pytest.mark.parametrize('form', ['zope.conf', 'composite:'])
def test_a_missing_partition_file_is_named_not_created(
        tmp_path, capsys, command, form):
    """(``restore`` writes missing partitions from the backup: that is
    its job.)"""
    home, paths = instance(tmp_path)
    conf = zope_conf(home)
    os.remove(paths['catalog'])
    target = conf if form == 'zope.conf' else other_forms(home)[form]
    repository = tmp_path / 'repository'
    repository.mkdir()
    before = listing(tmp_path)
    argv = [command, target]
    if command == 'backup':
        argv.append(repository)
    code, out, err = run(capsys, *argv)
    assert code == 1, (out, err)
    assert paths['catalog'] in err, err
    if command in ('pack', 'repair', 'recover', 'backup'):
        assert "partition 'catalog'" in err and 'never creates' in err, err
    assert listing(tmp_path) == before


def test_relative_paths_from_another_directory(tmp_path, capsys,
                                              monkeypatch):
    """``pack ../zodb.conf`` from elsewhere: the relative paths point at
    nothing, and nothing is created there."""
    home, paths = instance(tmp_path)
    conf = home / 'zodb.conf'
    conf.write_text('%import compositestorage\n<zodb>\n' + COMPOSITE.replace(
        '$INSTANCE/', '') + '</zodb>\n')
    elsewhere = home / 'elsewhere'
    (elsewhere / 'var').mkdir(parents=True)
    monkeypatch.chdir(str(home))
    code, out, err = run(capsys, 'verify', '-q', conf)
    assert code == 0, err
    monkeypatch.chdir(str(elsewhere))
    for command in ('pack', 'repair', 'recover'):
        code, out, err = run(capsys, command, conf)
        assert code == 1, (command, out, err)
        assert "partition 'main' has no file var/main.fs" in err, err
        assert os.listdir(str(elsewhere / 'var')) == []
