"""One adapter per kind of child storage.

The composite needs a few things of every child that the storage API does
not give: its highest own oid, counts of objects and stubs, its last
finished tid, which transactions it holds and which partitions each
spans, taking back a transaction, reading records for the pack's mark and
removing garbage.  Each kind of child answers them in one class here, and
every private name of ZODB, ZEO and RelStorage that the composite uses
lives in this package and nowhere else.  A kind of child without an
adapter gets :class:`~compositestorage.children.generic.Child`, which
answers what the storage API allows and says plainly what it cannot do.

A new kind of child is one new class, registered in :func:`adapter_for`.
"""
from compositestorage.children.generic import Child


def base_storage(storage):
    """The storage under ZODB's ``BlobStorage`` proxy, or ``storage``."""
    return getattr(storage, '_BlobStorage__storage', storage)


def adapter_for(storage):
    """The adapter for the child ``storage`` (perhaps a BlobStorage)."""
    base = base_storage(storage)
    from compositestorage.children import filestorage
    from compositestorage.children import mapping
    from compositestorage.children import relstorage
    for module in (filestorage, mapping, relstorage):
        if module.handles(base):
            return module.adapter(storage, base)
    return Child(storage, base)


def file_name(storage):
    """The file a child keeps its data in, or ``None`` (not one file).

    Asked of storages that have no adapter yet (a composite checking its
    children at open), so no adapter is built for it."""
    from compositestorage.children import filestorage
    base = base_storage(storage)
    return base._file_name if filestorage.handles(base) else None
