#!/usr/bin/env python
"""Where the bytes go: a composite with round-robin placement against one
FileStorage holding the same objects.

``python benchmarks/disk.py [-n 3000] [--per-transaction 50] [--json FILE]``
builds, in a temporary directory, the same objects twice: in one
FileStorage, and in a composite of three FileStorage partitions with
``placement round-robin`` (new oids go to each partition in turn, so
almost every reference crosses partitions).  The objects are small
documents (``PersistentMapping`` with a title, a 200-byte body and a
reference to the previous document), held by one ``PersistentMapping``
of all of them, committed ``--per-transaction`` at a time: the holder is
written again in every transaction, as a catalog's or a folder's
container is.

For each file it reports its size, and the bytes of its data records
(every revision) split into the partition's own records and its internal
ones: the stubs at foreign oids (DESIGN.md, invariant 3) and the
partition map, each counted with FileStorage's 42-byte data header; the
transactions' headers and metadata make up the rest.  It also gives the size of the holder's last revision in both: what
a record full of cross-partition references costs.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

#: FileStorage's data record header (oid, tid, prev, txn pos, lengths).
DATA_HEADER = 42
NAMES = ('main', 'b', 'c')


def build(storage, n, per_txn):
    """``n`` documents under one holder; returns the holder's oid."""
    import ZODB
    from persistent.mapping import PersistentMapping
    db = ZODB.DB(storage)
    try:
        with db.transaction() as conn:
            conn.root()['items'] = PersistentMapping()
        made = 0
        while made < n:
            with db.transaction() as conn:
                items = conn.root()['items']
                for _ in range(min(per_txn, n - made)):
                    doc = PersistentMapping(title='document %d' % made,
                                            body='x' * 200, prev=None)
                    if made:
                        doc['prev'] = items[made - 1]
                    items[made] = doc
                    made += 1
        with db.transaction() as conn:
            return conn.root()['items']._p_oid
    finally:
        db.close()


def account(path, prefix=None, holder=None):
    """What the FileStorage file at ``path`` holds, in bytes."""
    from ZODB.FileStorage import FileStorage
    from compositestorage.partition import is_internal
    fs = FileStorage(path, read_only=True)
    try:
        out = {'file': os.path.getsize(path), 'transactions': 0,
               'records': 0, 'own': 0, 'stubs': 0, 'stub_count': 0}
        for txn in fs.iterator():
            out['transactions'] += 1
            for record in txn:
                if not record.data:
                    continue
                out['records'] += 1
                size = len(record.data) + DATA_HEADER
                if prefix is not None and is_internal(record.oid, prefix):
                    out['stubs'] += size
                    out['stub_count'] += 1
                else:
                    out['own'] += size
        if holder is not None and (prefix is None or holder[0] == prefix):
            out['holder'] = len(fs.load(holder)[0])
        return out
    finally:
        fs.close()


def measure(n, per_txn, directory):
    from ZODB.FileStorage import FileStorage
    from compositestorage import CompositeStorage
    plain_path = os.path.join(directory, 'plain.fs')
    holder = build(FileStorage(plain_path), n, per_txn)
    plain = account(plain_path, holder=holder)
    paths = {name: os.path.join(directory, name + '.fs') for name in NAMES}
    composite_holder = build(CompositeStorage(
        [(name, prefix, FileStorage(paths[name]))
         for prefix, name in enumerate(NAMES)],
        placement='round-robin'), n, per_txn)
    parts = {name: account(paths[name], prefix, composite_holder)
             for prefix, name in enumerate(NAMES)}
    total = {key: sum(p[key] for p in parts.values())
             for key in ('file', 'transactions', 'records', 'own', 'stubs',
                         'stub_count')}
    total['holder'] = sum(p.get('holder', 0) for p in parts.values())
    return {'n': n, 'per_transaction': per_txn, 'plain': plain,
            'partitions': parts, 'composite': total,
            'ratio': total['file'] / plain['file']}


def report(result):
    lines = ['%d documents, %d per transaction; bytes' % (
        result['n'], result['per_transaction']),
        '%-12s %12s %12s %12s %8s %14s' % (
            'file', 'size', 'own records', 'stubs', 'stubs #',
            'holder record')]
    rows = [('plain.fs', result['plain'])] + [
        (name + '.fs', part) for name, part in result['partitions'].items()
    ] + [('composite', result['composite'])]
    for name, row in rows:
        lines.append('%-12s %12d %12d %12d %8d %14s' % (
            name, row['file'], row['own'], row['stubs'], row['stub_count'],
            row.get('holder') or ''))
    lines.append('composite / plain: %.2f' % result['ratio'])
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('-n', type=int, default=3000)
    parser.add_argument('--per-transaction', type=int, default=50)
    parser.add_argument('--json', default=None)
    args = parser.parse_args(argv)
    if args.n < 1 or args.per_transaction < 1:
        parser.error('-n and --per-transaction take numbers >= 1')
    directory = tempfile.mkdtemp(prefix='composite-disk-')
    try:
        result = measure(args.n, args.per_transaction, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(report(result))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
