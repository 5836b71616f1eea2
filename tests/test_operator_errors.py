"""Errors an operator meets in the first hour: each one line that names
the problem and the fix, on real files."""
import os

import pytest
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage
from ZODB.POSException import POSKeyError

from compositestorage import UnknownPartitionError
from compositestorage.cli import main as cli_main
from compositestorage.uri import CompositeURIError
from compositestorage.uri import resolve_composite
from conftest import config_file
from conftest import make_composite


def run(capsys, *argv):
    code = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err, *words):
    assert 'Traceback' not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.mark.parametrize('command', ['verify', 'info', 'stats', 'pack',
                                     'repair'])
def test_a_data_file_given_for_a_config(tmp_path, capsys, command):
    storage, paths = make_composite(tmp_path)
    db = ZODB.DB(storage)
    with db.transaction() as conn:
        conn.root()['x'] = PersistentMapping()
    db.close()
    code, _, err = run(capsys, command, paths['main'])
    assert code == 1
    one_line(err, paths['main'], 'FileStorage data file, not a config',
             'give the config file')


def test_a_binary_file_given_for_a_config(tmp_path, capsys):
    path = tmp_path / 'x.bin'
    path.write_bytes(b'\xff\xfe\x00junk')
    code, _, err = run(capsys, 'verify', path)
    assert code == 1
    one_line(err, 'not a text file')


@pytest.mark.parametrize('oid', [b'', None, 'main', 7])
def test_unknown_partition_error_for_what_is_no_oid(composite, oid):
    storage, _ = composite
    with pytest.raises(UnknownPartitionError) as exc:
        storage.load(oid)
    text = str(exc.value)
    assert 'an oid is 8 bytes' in text and repr(oid) in text
    assert 'main=0' in text and '\n' not in text


def test_a_short_oid_of_a_known_prefix_is_not_found(composite):
    storage, _ = composite
    with pytest.raises(POSKeyError):
        storage.load(b'\x00' * 3)


def test_unknown_partition_error_for_an_unknown_prefix(composite):
    storage, _ = composite
    with pytest.raises(UnknownPartitionError) as exc:
        storage.load(b'\x09' + b'\0' * 7)
    assert 'no partition has prefix 9' in str(exc.value)


@pytest.mark.parametrize('days', ['-1', '-0.5', 'nan', 'inf', 'soon'])
def test_pack_days_in_the_future_is_refused(tmp_path, capsys, days):
    storage, paths = make_composite(tmp_path)
    storage.close()
    conf = config_file(tmp_path, paths)
    before = {p: os.path.getsize(p) for p in paths.values()}
    with pytest.raises(SystemExit) as exc:
        cli_main(['pack', '--days=%s' % days, str(conf)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert 'invalid --days' in err and '0 or more' in err, err
    assert {p: os.path.getsize(p) for p in paths.values()} == before


@pytest.mark.parametrize('kind', ['zodb', 'storage', 'zope'])
def test_serve_needs_a_zeo_conf(tmp_path, capsys, kind):
    section = ('<compositestorage>\n  <partition main>\n    prefix 0\n'
               '    <filestorage>\n      path %s/main.fs\n    </filestorage>'
               '\n  </partition>\n</compositestorage>\n' % tmp_path)
    text = {'zodb': '<zodb>\n%s</zodb>\n',
            'storage': '%s',
            'zope': 'instancehome %s\n<zodb_db main>\n  mount-point /\n'
                    % tmp_path + '%s</zodb_db>\n'}[kind] % section
    conf = tmp_path / 'some.conf'
    conf.write_text('%import compositestorage\n' + text)
    code, _, err = run(capsys, 'serve', '--config', conf)
    assert code == 1
    one_line(err, 'serve --config takes a zeo.conf', '<zeo> section')
    assert not os.path.exists(str(tmp_path / 'main.fs'))


def test_a_demo_child_is_refused_when_the_uri_is_resolved(tmp_path):
    demo = 'demo:(file://%s/base.fs)/(memory://)' % tmp_path
    with pytest.raises(CompositeURIError) as exc:
        resolve_composite('composite:(file://%s/m.fs)/scratch=1:(%s)'
                          % (tmp_path, demo))
    text = str(exc.value)
    assert 'demo: child is not supported' in text and 'file://' in text
    assert '\n' not in text
    assert os.listdir(str(tmp_path)) == []


def test_a_demo_child_through_the_command(tmp_path, capsys):
    uri = 'composite:(file://%s/m.fs)/scratch=1:(demo:(memory://)/(memory://))' \
        % tmp_path
    FileStorage(str(tmp_path / 'm.fs')).close()
    code, _, err = run(capsys, 'verify', uri)
    assert code == 1
    one_line(err, 'demo: child is not supported')
