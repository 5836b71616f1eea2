"""ZODB's IExternalGC doctest and reusable blob suite, through ZEO.

As ZEO's own suite does, each storage the doctests create is a
``ClientStorage`` that starts (and, when closed, stops) its own ZEO server
process: over a plain FileStorage with ZEO's ``ServerManagingClientStorage``
(the reference), and over a three-partition round-robin composite here.
Blobs run with a non-shared and with a shared client blob directory.
"""
import pytest
import zope.testing.setupstack
from ZEO.ClientStorage import ClientStorage
from ZEO.tests import forker
from ZEO.tests import testZEO
from ZODB.tests import PackableStorage
from ZODB.tests import testblob

from conformance.harness import unittest_cases
from conformance.test_doctests import run_doctest_case
from conformance.test_zeo import composite_config


class CompositeServerClient(ClientStorage):
    """A client of its own ZEO server, which serves a composite."""

    def __init__(self, name, blob_dir, shared=False, extra=''):
        server_blob_dir = blob_dir if shared else 'server-' + blob_dir
        addr, stop = forker.start_zeo_server(composite_config(
            name, extra='blob-dir %s\n%s' % (server_blob_dir, extra)))
        zope.testing.setupstack.register(self, stop)
        ClientStorage.__init__(self, addr, blob_dir=blob_dir,
                               shared_blob_dir=shared)

    def close(self):
        ClientStorage.close(self)
        zope.testing.setupstack.tearDown(self)


class CompositeServerClientForIExternalGC(CompositeServerClient):
    """As ZEO's own: pack waits, then the client caches are emptied."""

    def pack(self, t=None, referencesf=None):
        CompositeServerClient.pack(self, t, referencesf, wait=True)
        self._cache.clear()
        from ZEO.ClientStorage import _check_blob_cache_size
        _check_blob_cache_size(self.blob_dir, 0)


FACTORIES = {
    'ZEOFileStorage': (
        testZEO.ServerManagingClientStorage,
        testZEO.create_storage_shared,
        lambda: testZEO.ServerManagingClientStorageForIExternalGCTest(
            'data.fs', 'blobs', extrafsoptions='pack-gc false')),
    'ZEOComposite': (
        CompositeServerClient,
        lambda name, blob_dir: CompositeServerClient(name, blob_dir, True),
        lambda: CompositeServerClientForIExternalGC(
            'data', 'blobs', extra='pack-gc false')),
}


def _cases():
    for kind, (non_shared, shared, external_gc) in FACTORIES.items():
        for label, factory in (('NonSharedBlobs', non_shared),
                               ('SharedBlobs', shared)):
            suite = testblob.storage_reusable_suite(kind + label, factory)
            for case in unittest_cases(suite):
                yield pytest.param(case, suite.layer,
                                   id='%s-%s-%s' % (kind, label, case.id()))
        for case in unittest_cases(
                PackableStorage.IExternalGC_suite(external_gc)):
            yield pytest.param(case, None, id='%s-%s' % (kind, case.id()))


@pytest.mark.parametrize('case, layer', list(_cases()))
def test_zeo_doctest(case, layer, request):
    run_doctest_case(case, layer, request.node.nodeid)
