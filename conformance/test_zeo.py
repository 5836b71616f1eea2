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

COMPOSITE = """
%import compositestorage
<compositestorage 1>
  placement round-robin
  <partition main>
    prefix 0
    <filestorage>
      path Data-main.fs
    </filestorage>
  </partition>
  <partition catalog>
    prefix 1
    <filestorage>
      path Data-catalog.fs
    </filestorage>
  </partition>
  <partition archive>
    prefix 2
    <filestorage>
      path Data-archive.fs
    </filestorage>
  </partition>
</compositestorage>
"""


def _collectable(cls):
    """Give every ``check*`` test a ``test_check*`` alias, for pytest."""
    for name in dir(cls):
        if name.startswith('check') and callable(getattr(cls, name)):
            setattr(cls, 'test_' + name, getattr(cls, name))
    cls.__test__ = True
    return cls


@_collectable
class TestZEOFileStorage(testZEO.FileStorageTests, unittest.TestCase):
    """The reference: ZEO serving a plain FileStorage."""


@_collectable
class TestZEOComposite(testZEO.FullGenericTests, unittest.TestCase):
    """ZEO serving a composite of three FileStorage partitions."""

    def getConfig(self):
        return COMPOSITE
