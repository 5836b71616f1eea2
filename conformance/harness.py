"""Storages under test, built the same way for every conformance suite.

Each factory makes real files in the current directory (ZODB's test base
classes run every test in a fresh temporary directory).
"""
import contextlib
import os

import ZODB.FileStorage

from compositestorage import CompositeStorage

PARTITIONS = (('main', 0), ('catalog', 1), ('archive', 2))


def composite(name='Data', placement='round-robin', blob_dir=None,
              read_only=False, pack_gc=True, **kwargs):
    """A composite of three FileStorage partitions, in ``name``-*.fs."""
    kwargs.pop('create', None)
    children = []
    for pname, prefix in PARTITIONS:
        children.append((pname, prefix, ZODB.FileStorage.FileStorage(
            '%s-%s.fs' % (name, pname), blob_dir=blob_dir,
            read_only=read_only, pack_gc=False, **kwargs)))
    return CompositeStorage(children, placement=placement,
                            read_only=read_only, pack_gc=pack_gc)


def mapping_composite(name='Data', placement='round-robin', **kwargs):
    """A composite of three MappingStorage partitions."""
    import ZODB.MappingStorage
    return CompositeStorage(
        [(pname, prefix, ZODB.MappingStorage.MappingStorage(pname))
         for pname, prefix in PARTITIONS], placement=placement)


def filestorage(name='Data', blob_dir=None, **kwargs):
    kwargs.pop('create', None)
    return ZODB.FileStorage.FileStorage('%s.fs' % name, blob_dir=blob_dir,
                                        **kwargs)


#: name -> factory(name, **kwargs), for each storage the suites run on
STORAGES = {
    'FileStorage': filestorage,
    'CompositeRoundRobin': lambda name='Data', **kw: composite(
        name, placement='round-robin', **kw),
    'CompositeDefault': lambda name='Data', **kw: composite(
        name, placement='default', **kw),
}


def unittest_cases(suite):
    """Flatten a unittest suite into its test cases."""
    for test in suite:
        if hasattr(test, '__iter__'):
            yield from unittest_cases(test)
        else:
            yield test


def run_case(case, layer=None):
    """Run one unittest/doctest case and fail with its report."""
    import unittest
    if layer is not None and hasattr(layer, 'testSetUp'):
        layer.testSetUp()
    result = unittest.TestResult()
    try:
        case.run(result)
    finally:
        if layer is not None and hasattr(layer, 'testTearDown'):
            layer.testTearDown()
    problems = result.failures + result.errors
    if problems:
        raise AssertionError('\n\n'.join(text for _, text in problems))
    if result.skipped:
        import pytest
        pytest.skip(result.skipped[0][1])


# --- RelStorage: plain, and a composite of three RelStorage children -------

#: the database engines RelStorage children are tested on
RELSTORAGE_ENGINES = ('sqlite', 'postgresql')


class PostgresPool:
    """PostgreSQL databases created once for a test module and dropped at
    its end; each test zaps the ones it uses (as RelStorage's own tests
    do), which is much faster than creating a database per test."""

    def __init__(self):
        self._stack = None
        self._names = []

    def name(self, index):
        """The name of the ``index``-th database, created if need be."""
        from tests.relstorage_engines import _admin
        from tests.relstorage_engines import postgres_database
        if self._stack is None:
            self._stack = contextlib.ExitStack()
        while len(self._names) <= index:
            name = self._stack.enter_context(postgres_database())
            # no fsync wait at each commit: these tests crash nothing
            conn = _admin()
            try:
                with conn.cursor() as cursor:
                    cursor.execute('ALTER DATABASE %s SET '
                                   'synchronous_commit = off' % name)
            finally:
                conn.close()
            self._names.append(name)
        return self._names[index]

    def drop_all(self):
        if self._stack is not None:
            self._stack.close()
        self._stack = None
        self._names = []


POSTGRES = PostgresPool()


def relstorage(engine, name='Data', index=0, create=False, read_only=False,
               **kwargs):
    """A plain history-preserving RelStorage: on SQLite in
    ``name``-``index``-sqlite in the current directory, on PostgreSQL in
    the pool's ``index``-th database, zapped when ``create``."""
    from tests.relstorage_engines import open_child
    if engine == 'sqlite':
        where = os.path.abspath('%s-%d-sqlite' % (name, index))
    else:
        where = POSTGRES.name(index)
    storage = open_child(engine, where, read_only=read_only)
    if create and engine != 'sqlite' and not read_only:
        storage.zap_all(slow=True)
    return storage


def relstorage_composite(engine, name='Data', placement='round-robin',
                         create=False, read_only=False, **kwargs):
    """A composite of three RelStorage partitions (the primary one of
    them), with its journal in ``name``.journal."""
    children = [(pname, prefix, relstorage(engine, name, prefix, create,
                                           read_only))
                for pname, prefix in PARTITIONS]
    return CompositeStorage(children, placement=placement,
                            read_only=read_only,
                            journal=os.path.abspath(name + '.journal'))
