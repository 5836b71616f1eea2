"""What a composite holds: counts, sizes, classes and cross-partition edges.

``stats(storage)`` walks every current record of every partition once and
returns, for each partition, its object count and bytes, its stub count,
and its top classes by count and by bytes; and the cross-partition
references as a matrix: how many references from objects in one partition
to objects in each other partition.
"""
import collections

from compositestorage.partition import is_internal
from compositestorage.references import class_of
from compositestorage.references import strong_and_weak_oids
from compositestorage.verify import current_records


def stats(storage, top=10):
    by_prefix = {p.prefix: p for p in storage.partitions}
    partitions = {}
    edges = {p.name: {q.name: 0 for q in storage.partitions if q is not p}
             for p in storage.partitions}
    for part in storage.partitions:
        count = collections.Counter()
        size = collections.Counter()
        objects = total = stubs = 0
        row = edges[part.name]
        for oid, _, data in current_records(part.base):
            if oid[0] != part.prefix:
                stubs += 1
                continue
            if is_internal(oid, part.prefix):
                continue
            objects += 1
            total += len(data)
            klass = class_of(data)
            name = '%s.%s' % klass if klass else '?'
            count[name] += 1
            size[name] += len(data)
            strong, weak = strong_and_weak_oids(data)
            for ref in strong + weak:
                home = by_prefix.get(ref[0])
                if home is not None and home is not part:
                    row[home.name] += 1
        partitions[part.name] = {
            'prefix': part.prefix, 'objects': objects, 'bytes': total,
            'stubs': stubs,
            'top_by_count': count.most_common(top),
            'top_by_bytes': size.most_common(top)}
    return {'partitions': partitions, 'edges': edges}


def format_stats(report):
    lines = []
    for name, p in report['partitions'].items():
        lines.append('%s (prefix %d): %d objects, %d bytes, %d stubs' % (
            name, p['prefix'], p['objects'], p['bytes'], p['stubs']))
        lines.append('  by count: ' + ', '.join(
            '%s %d' % item for item in p['top_by_count']))
        lines.append('  by bytes: ' + ', '.join(
            '%s %d' % item for item in p['top_by_bytes']))
    names = list(report['partitions'])
    width = max(len(n) for n in names) + 2
    lines.append('cross-partition references (row: from, column: to):')
    lines.append(' ' * width + ''.join('%*s' % (width, n) for n in names))
    for name in names:
        row = report['edges'][name]
        lines.append('%-*s' % (width, name) + ''.join(
            '%*s' % (width, '-' if other == name else row[other])
            for other in names))
    return '\n'.join(lines)
