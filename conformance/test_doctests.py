"""ZODB's doctest conformance suites: IExternalGC and the reusable blob suite.

pytest does not collect ``test_suite()`` functions, so each doctest case of
those suites becomes one parametrized test here, run inside its layer.

``blob_transaction.txt`` checks that a blob cannot be written into a
read-only directory, which root can always do.  When the tests run as root
(as CI does), that doctest runs in a child process whose bounding and
inheritable sets lack CAP_DAC_OVERRIDE, so it tests what it means to test.
"""
import os
import shutil
import subprocess
import sys

import pytest
from ZODB.tests import PackableStorage
from ZODB.tests import testblob

from conformance.harness import STORAGES
from conformance.harness import run_case
from conformance.harness import unittest_cases

HERE = os.path.dirname(os.path.abspath(__file__))
DROPPED = 'COMPOSITESTORAGE_CAP_DROPPED'


def _blob_factory(kind):
    factory = STORAGES[kind]
    return lambda name, blob_dir: factory(name, blob_dir=blob_dir)


def _gc_factory(kind):
    factory = STORAGES[kind]
    return lambda: factory('data', blob_dir='blobs', pack_gc=False)


def _cases():
    for kind in STORAGES:
        suite = testblob.storage_reusable_suite(
            kind + 'Blob', _blob_factory(kind),
            test_blob_storage_recovery=True, test_packing=True)
        for case in unittest_cases(suite):
            yield pytest.param(kind, case, suite.layer,
                               id='%s-%s' % (kind, case.id()))
        gc_suite = PackableStorage.IExternalGC_suite(_gc_factory(kind))
        for case in unittest_cases(gc_suite):
            yield pytest.param(kind, case, None,
                               id='%s-%s' % (kind, case.id()))


def _needs_unprivileged(case):
    return 'blob_transaction' in case.id()


@pytest.mark.parametrize('kind, case, layer', list(_cases()))
def test_doctest(kind, case, layer, request):
    run_doctest_case(case, layer, request.node.nodeid)


def run_doctest_case(case, layer, nodeid):
    """Run one doctest case in its layer; as root, the one that checks
    file permissions runs in a child process without CAP_DAC_OVERRIDE."""
    if _needs_unprivileged(case) and os.geteuid() == 0 \
            and not os.environ.get(DROPPED):
        _run_without_dac_override(nodeid)
        return
    if layer is not None:
        layer.setUp()
    try:
        run_case(case, layer)
    finally:
        if layer is not None:
            layer.tearDown()


def _run_without_dac_override(nodeid):
    setpriv = shutil.which('setpriv')
    assert setpriv, 'running as root needs setpriv (util-linux) to drop ' \
                    'CAP_DAC_OVERRIDE for blob_transaction.txt'
    env = dict(os.environ, **{DROPPED: '1'})
    root = os.path.dirname(HERE)
    proc = subprocess.run(
        [setpriv, '--bounding-set=-dac_override',
         '--inh-caps=-dac_override', sys.executable, '-m', 'pytest', '-q',
         '-p', 'no:cacheprovider', nodeid],
        cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '1 passed' in proc.stdout, proc.stdout
