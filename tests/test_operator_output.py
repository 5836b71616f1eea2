"""Output that says what happened: repair in the past tense, stats through
ZEO named by prefix once, progress that says "done" only when done, and
no stale-index warning on a read-only open beside a live server."""
import io
import subprocess

import pytest
import ZEO
from persistent.mapping import PersistentMapping

from compositestorage.progress import Plain
from compositestorage.progress import reporter
from conftest import CLI
from conftest import config_file
from conftest import TIMEOUT
from test_verify import built  # noqa: F401 (a fixture)
from test_verify import delete
from test_verify import on_child


def run_cli(*args):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True,
                          text=True, timeout=TIMEOUT)


def test_repair_says_what_it_did(built, tmp_path):  # noqa: F811
    paths, oids = built
    on_child(paths['b'], delete(oids['y']))     # b's stub for y: missing
    config = config_file(tmp_path, paths)
    dry = run_cli('repair', '--dry-run', config)
    assert dry.stdout.splitlines() == [
        "would create the stub for 0x%s in partition 'b'" % oids['y'].hex()]
    done = run_cli('repair', config)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "created the stub for 0x%s in partition 'b'" % oids['y'].hex()]
    assert run_cli('repair', config).stdout.strip() == 'nothing to repair'


def served_stats(tmp_path, serving, commit):
    from test_cli import zeo_conf
    conf = tmp_path / 'zeo.conf'
    conf.write_text(zeo_conf(str(tmp_path)))
    served = serving(['--config', str(conf)], tmp_path, 3)
    if commit:
        db = ZEO.DB((served.host, served.port), server_sync=True)
        with db.transaction() as conn:
            conn.root()['x'] = PersistentMapping(v=1)
        db.close()
    result = run_cli('stats', '-q', 'zeo://%s:%d' % (served.host,
                                                      served.port))
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize('commit', [True, False])
def test_stats_through_zeo_names_partitions_by_prefix_once(
        tmp_path, serving, commit):
    lines = served_stats(tmp_path, serving, commit)
    assert not any('(prefix' in line for line in lines), lines
    assert not any(line.rstrip().endswith(':') and 'by ' in line
                   for line in lines), lines
    if not commit:
        assert lines == ['no objects yet (nothing has been committed)']
    if commit:
        assert lines[0].startswith('prefix 0: 2 objects, '), lines
        assert 'stubs not known through ZEO' in lines[0]
        assert lines[1].startswith('  by count: persistent.mapping.')


def test_plain_progress_is_done_at_100_percent_when_the_estimate_was_high():
    out = io.StringIO()
    shown = Plain('verify: records', 100, out, 'records', every=3600)
    try:
        shown.update(84)
    finally:
        shown.close()
    last = out.getvalue().splitlines()[-1]
    assert '84/84 records (100%)' in last and last.endswith(', done'), last


def test_plain_progress_after_an_interrupt_is_not_done():
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        shown = Plain('pack: mark', 100, out, 'objects', every=3600)
        try:
            shown.update(40)
            raise KeyboardInterrupt
        finally:
            shown.close()
    last = out.getvalue().splitlines()[-1]
    assert '40/100 objects (40%)' in last, last
    assert 'done' not in last and last.endswith('stopped (interrupted)')


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_bar_after_an_interrupt_is_not_done():
    out = Terminal()
    with pytest.raises(KeyboardInterrupt):
        shown = reporter(out)('pack: mark', 100)
        try:
            shown.update(40)
            raise KeyboardInterrupt
        finally:
            shown.close()
    text = out.getvalue()
    assert 'stopped (interrupted)' in text and '100%' not in text, text
    out = Terminal()
    shown = reporter(out)('pack: mark', 100)
    try:
        shown.update(84)
    finally:
        shown.close()
    assert '100%' in out.getvalue().splitlines()[-1].split('\r')[-1]


def test_no_stale_index_warning_beside_a_live_server(tmp_path, serving):
    from test_cli import zeo_conf
    conf = tmp_path / 'zeo.conf'
    conf.write_text(zeo_conf(str(tmp_path)))
    served = serving(['--config', str(conf)], tmp_path, 3)
    for commit in (False, True):
        if commit:
            db = ZEO.DB((served.host, served.port), server_sync=True)
            with db.transaction() as conn:
                conn.root()['x'] = PersistentMapping(v=1)
            db.close()
        for command in ('info', 'verify', 'stats'):
            result = run_cli(command, conf)
            assert result.returncode == 0, (command, result.stderr)
            assert 'Ignoring index' not in result.stderr, result.stderr
