"""Storages under test, built the same way for every conformance suite.

Each factory makes real files in the current directory (ZODB's test base
classes run every test in a fresh temporary directory).
"""
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
