"""The composite's own interface.

ZODB's storage interfaces say what the composite can do; this one says what
it is.  A ZEO server lists the interfaces its storage provides, so a client
(``compositestorage verify zeo://...``) learns from it that a composite
stands behind the server, without opening anything there.
"""
from zope.interface import Attribute
from ZODB.interfaces import IStorage


class ICompositeStorage(IStorage):
    """A storage made of child storages, one per partition.

    Each oid's first byte, its prefix, names the partition that holds it.
    """

    partitions = Attribute(
        "The partitions, primary (prefix 0) first: objects with ``name``, "
        "``prefix``, ``storage`` (the child) and ``read_only``.")

    def partition_for(oid, what='load'):
        """The partition that holds ``oid``; a clear error when none does."""

    def new_oid_in(name):
        """A new oid in the partition called ``name``."""
