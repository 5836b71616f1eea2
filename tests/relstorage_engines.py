"""RelStorage children for tests: SQLite (embedded, always there) and
PostgreSQL (a real server on 127.0.0.1:5432, trust authentication).

Each test database is created for the test and dropped after it.  Where no
PostgreSQL server answers, the tests that need one skip with the reason;
under CI (``CI=true``) a missing server is a failure, not a skip.

``benchmarks/bench.py --postgresql`` uses the same helpers to make and drop
its databases, so this module imports pytest only where it skips or fails.
"""
import contextlib
import os
import uuid

PG_HOST = os.environ.get('COMPOSITE_PG_HOST', '127.0.0.1')
PG_PORT = int(os.environ.get('COMPOSITE_PG_PORT', '5432'))
PG_USER = os.environ.get('COMPOSITE_PG_USER', 'postgres')


def _admin():
    import psycopg2
    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER,
                            dbname='postgres', connect_timeout=3)
    conn.autocommit = True
    return conn


def postgres_available():
    """``None`` when a PostgreSQL server answers, else why not."""
    try:
        import psycopg2  # noqa: F401
    except ImportError as e:
        return 'psycopg2 is not installed (pip install -e .[test]): %s' % e
    try:
        _admin().close()
    except Exception as e:
        return 'no PostgreSQL server answers on %s:%d as %s: %s' % (
            PG_HOST, PG_PORT, PG_USER, str(e).strip())
    return None


def require_postgres():
    """Skip (fail under CI=true) when no PostgreSQL server answers."""
    reason = postgres_available()
    if reason is None:
        return
    import pytest
    if os.environ.get('CI') == 'true':
        pytest.fail('CI=true needs a PostgreSQL server: ' + reason)
    pytest.skip(reason)


@contextlib.contextmanager
def postgres_database():
    """The name of a fresh PostgreSQL database, dropped afterwards."""
    require_postgres()
    name = 'composite_test_' + uuid.uuid4().hex[:12]
    conn = _admin()
    try:
        with conn.cursor() as cursor:
            cursor.execute('CREATE DATABASE %s' % name)
        yield name
    finally:
        with conn.cursor() as cursor:
            cursor.execute('DROP DATABASE IF EXISTS %s WITH (FORCE)' % name)
        conn.close()


def postgres_database_size(name):
    """Bytes on disk of database ``name`` (PostgreSQL's own count)."""
    conn = _admin()
    try:
        with conn.cursor() as cursor:
            cursor.execute('SELECT pg_database_size(%s)', (name,))
            return cursor.fetchone()[0]
    finally:
        conn.close()


def postgres_lock_slots():
    """The size of the server's shared lock table: ``max_locks_per_
    transaction`` times (``max_connections`` + ``max_prepared_
    transactions``).  RelStorage on PostgreSQL takes one lock per object
    a commit changes, so a commit can change at most about this many."""
    conn = _admin()
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                "SELECT current_setting('max_locks_per_transaction')::int"
                " * (current_setting('max_connections')::int"
                " + current_setting('max_prepared_transactions')::int)")
            return cursor.fetchone()[0]
    finally:
        conn.close()


def child_section(engine, where, keep_history=True, blob_dir=None,
                  read_only=False):
    """The ``<relstorage>`` section of a child: ``where`` is a directory
    (SQLite) or a database name (PostgreSQL)."""
    if engine == 'sqlite':
        db = '<sqlite3>\n  data-dir %s\n</sqlite3>' % where
    else:
        db = ('<postgresql>\n  dsn dbname=%s host=%s port=%d user=%s\n'
              '</postgresql>' % (where, PG_HOST, PG_PORT, PG_USER))
    blobs = 'blob-dir %s\n' % blob_dir if blob_dir else ''
    if read_only:
        blobs += '  read-only true\n'
    return ('<relstorage>\n  keep-history %s\n  %s%s\n</relstorage>'
            % ('true' if keep_history else 'false', blobs, db))


def open_child(engine, where, keep_history=True, read_only=False):
    """A RelStorage opened alone, from its own ZConfig section."""
    import ZODB.config
    return ZODB.config.storageFromString(
        '%import relstorage\n' + child_section(engine, where, keep_history,
                                               read_only=read_only))


@contextlib.contextmanager
def databases(engine, tmp_path, names):
    """``{name: where}`` for each child, created (and dropped) as needed."""
    if engine == 'sqlite':
        yield {name: str(tmp_path / ('%s-sqlite' % name)) for name in names}
        return
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(postgres_database())
               for name in names}


def composite_config(tmp_path, children, primary_file=True, journal=True,
                     placement='default', extra=''):
    """The text of a composite configuration.

    ``children`` is ``[(name, prefix, section text)]``; with
    ``primary_file`` a FileStorage primary ``main`` comes first.
    """
    parts = []
    if primary_file:
        parts.append('<partition main>\n prefix 0\n <filestorage>\n'
                     '  path %s\n </filestorage>\n</partition>'
                     % (tmp_path / 'main.fs'))
    for name, prefix, section in children:
        parts.append('<partition %s>\n prefix %d\n%s\n</partition>'
                     % (name, prefix, section))
    head = 'placement %s\n' % placement
    if journal:
        head += 'journal %s\n' % (tmp_path / 'composite.journal')
    return ('%%import compositestorage\n%%import relstorage\n'
            '<compositestorage>\n%s%s%s\n</compositestorage>\n'
            % (head, extra, '\n'.join(parts)))


def open_config(text):
    import ZODB.config
    return ZODB.config.storageFromString(text)
