"""``python -m compositestorage``: open the embedded default and show it.

The embedded default is a composite of two FileStorage partitions under
``./var``: ``main`` (prefix 0, the primary) and ``catalog`` (prefix 1).
Each run commits one object into each partition, the main one referring to
the catalog one, and prints what every partition holds.  (Serving it over
ZEO comes with ``compositestorage serve``.)
"""
import argparse
import datetime
import os
import sys

import ZODB
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage
from ZODB.TimeStamp import TimeStamp

from compositestorage import CompositeStorage
from compositestorage import placement


def default_storage(var='var'):
    """The embedded default: ``main`` and ``catalog`` under ``var``."""
    os.makedirs(var, exist_ok=True)
    return CompositeStorage([
        ('main', 0, FileStorage(os.path.join(var, 'main.fs'))),
        ('catalog', 1, FileStorage(os.path.join(var, 'catalog.fs'))),
    ], name='default')


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m compositestorage',
        description='Open the embedded default composite (main and catalog '
                    'FileStorage partitions under VAR), commit one '
                    'cross-partition reference and show each partition.')
    parser.add_argument('--var', default='var',
                        help='folder for the partition files (default: var)')
    args = parser.parse_args(argv)
    storage = default_storage(args.var)
    db = ZODB.DB(storage)
    try:
        with db.transaction('python -m compositestorage') as conn:
            root = conn.root()
            with placement(conn, 'catalog'):
                entry = PersistentMapping(
                    when=datetime.datetime.now().isoformat())
                conn.add(entry)
            root.setdefault('runs', PersistentMapping())
            root['runs'][str(len(root['runs']))] = entry
        print('composite %s, last transaction %s' % (
            storage.getName(), TimeStamp(storage.lastTransaction())))
        for part in storage.partitions:
            print('  partition %-8s prefix %3d  %6d objects  %s' % (
                part.name, part.prefix, part.count_own(),
                part.storage.getName()))
    finally:
        db.close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
