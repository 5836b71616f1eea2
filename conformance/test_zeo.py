"""ZODB's and ZEO's storage mixins through a real ZEO server.

ZEO's own ``testZEO`` harness starts ``runzeo``'s server in a separate
process on 127.0.0.1 with a free port, from a zeo.conf whose storage
section is given here, and connects a ``ClientStorage`` to it.  The same
``FullGenericTests`` combination runs over a plain FileStorage (the
reference count) and over a three-partition round-robin composite.

ZEO's tests are named ``check*``; each gets a ``test_`` alias so that
pytest collects it.
"""
import unittest

from ZEO.tests import testZEO

import tempfile


COMPOSITE = """
%%import compositestorage
<compositestorage 1>
  placement round-robin
  %(extra)s
  <partition main>
    prefix 0
    <%(child)s>
      %(path)s-main.fs
    </%(child)s>
  </partition>
  <partition catalog>
    prefix 1
    <%(child)s>
      %(path)s-catalog.fs
    </%(child)s>
  </partition>
  <partition archive>
    prefix 2
    <%(child)s>
      %(path)s-archive.fs
    </%(child)s>
  </partition>
</compositestorage>
"""


def composite_config(name='Data', extra='', child='filestorage'):
    """A zeo.conf storage section: three partitions, round-robin."""
    path = 'path %s' % name if child == 'filestorage' else ''
    text = COMPOSITE % dict(extra=extra, child=child, path=path)
    if child != 'filestorage':
        text = text.replace('-main.fs', '').replace('-catalog.fs', '') \
                   .replace('-archive.fs', '')
    return text


def _collectable(cls):
    """Give every ``check*`` test a ``test_check*`` alias, for pytest."""
    for name in dir(cls):
        if name.startswith('check') and callable(getattr(cls, name)):
            setattr(cls, 'test_' + name, getattr(cls, name))
    cls.__test__ = True
    return cls


BLOB_CLASSES = (testZEO.CommonBlobTests, testZEO.BlobAdaptedFileStorageTests,
                testZEO.BlobWritableCacheTests)


def _blob_tests_only(cls):
    """Collect only the blob tests of a ZEO blob class.

    ZEO's blob classes also inherit all of FullGenericTests, which the
    plain classes above already run against the same storages.
    """
    own = {name for klass in BLOB_CLASSES for name in vars(klass)
           if name.startswith(('check', 'test'))}
    for name in dir(cls):
        if name.startswith(('check', 'test')) and name not in own \
                and callable(getattr(cls, name)):
            setattr(cls, name, None)
    return _collectable(cls)


@_collectable
class TestZEOFileStorage(testZEO.FileStorageTests, unittest.TestCase):
    """The reference: ZEO serving a plain FileStorage."""


@_collectable
class TestZEOComposite(testZEO.FullGenericTests, unittest.TestCase):
    """ZEO serving a composite of three FileStorage partitions."""

    def getConfig(self):
        return composite_config()

    def checkInterfaceFromRemoteStorage(self):
        # As ZEO's FileStorageTests check: the client reflects the
        # interfaces the served composite declares for these children.
        served = set(self._storage._info['interfaces'])
        for iface in ('IStorageRestoreable', 'IStorageIteration',
                      'IStorageUndoable', 'IStorageCurrentRecordIteration',
                      'IExternalGC', 'IStorage', 'IMultiCommitStorage'):
            self.assertIn(('ZODB.interfaces', iface), served)
        self.assertNotIn(('ZODB.interfaces', 'IBlobStorage'), served)


@_blob_tests_only
class TestZEOFileStorageBlobs(testZEO.BlobAdaptedFileStorageTests,
                              unittest.TestCase):
    """Reference: blobs with a non-shared client blob cache."""


@_blob_tests_only
class TestZEOCompositeBlobs(testZEO.BlobAdaptedFileStorageTests,
                            unittest.TestCase):
    """Blobs through ZEO, non-shared client blob cache: every child shares
    the composite's blob directory, laid out by composite oid."""

    def getConfig(self):
        return composite_config(extra='blob-dir blobs')


@_blob_tests_only
class TestZEOFileStorageSharedBlobs(testZEO.BlobWritableCacheTests,
                                    unittest.TestCase):
    """Reference: the client shares the server's blob directory."""


@_blob_tests_only
class TestZEOCompositeSharedBlobs(testZEO.BlobWritableCacheTests,
                                  unittest.TestCase):
    """A client with a shared blob directory computes every blob's path
    itself, from the composite oid."""

    def getConfig(self):
        return composite_config(extra='blob-dir blobs')


@_collectable
class TestZEOMappingClientConflictResolution(
        testZEO.ClientConflictResolutionTests, unittest.TestCase):
    """Reference: client-side conflict resolution over a MappingStorage."""


@_collectable
class TestZEOCompositeClientConflictResolution(
        testZEO.ClientConflictResolutionTests, unittest.TestCase):
    """Client-side conflict resolution: the server's resolver must reach
    every child, since the children are the ones that resolve."""

    def getConfig(self):
        return composite_config(child='mappingstorage')


@_collectable
class TestZEOFileStorageRecovery(testZEO.FileStorageRecoveryTests,
                                 unittest.TestCase):
    """Reference: copyTransactionsFrom between two ZEO-served storages."""


@_collectable
class TestZEOCompositeRecovery(testZEO.FileStorageRecoveryTests,
                               unittest.TestCase):
    """copyTransactionsFrom between two ZEO-served composites."""

    def getConfig(self):
        return composite_config(tempfile.mktemp(dir='.'))

