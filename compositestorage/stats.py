"""What a composite holds: counts, sizes, classes and cross-partition edges.

``stats(storage)`` walks every current record of every partition once and
returns, for each partition, its object count and bytes, its stub count,
its overlay record count (an overlay partition's records of its base's
objects, counted apart from stubs; ``overlay_of`` names the base), and its
top classes by count and by bytes; and the cross-partition
references as a matrix: how many references from objects in one partition
to objects in each other partition.  Memory is a counter per class, not
per object.

``stats_served(client)`` does the same through a ZEO client of a server
that serves a composite: it reads the composite's current records, as any
ZEO client may, and opens nothing behind the server.  A client sees
objects, not the children's records: stubs are not counted (``None``),
bytes are the records as ZODB sees them (without the class hints that a
child stores beside a cross-partition reference), and partitions are named
by prefix (``prefix 1``).
"""
import collections

from compositestorage.partition import is_internal
from compositestorage.progress import quiet
from compositestorage.references import class_of
from compositestorage.references import strong_and_weak_oids
from compositestorage.verify import current_records
from compositestorage.verify import estimate
from compositestorage.verify import served_name
from compositestorage.verify import served_records


class _Tally:

    def __init__(self, names, top, stubs_known=True, bases=None):
        self.names = dict(names)        # prefix -> partition name
        self.top = top
        self.stubs_known = stubs_known
        self.bases = bases or {}        # overlay prefix -> base name
        self.rows = {}
        self.edges = collections.defaultdict(collections.Counter)
        for prefix in self.names:
            self._row(prefix)

    def _row(self, prefix):
        row = self.rows.get(prefix)
        if row is None:
            self.names.setdefault(prefix, served_name(prefix))
            row = self.rows[prefix] = {
                'objects': 0, 'bytes': 0,
                'stubs': 0 if self.stubs_known else None,
                'overlays': 0 if self.stubs_known else None,
                'count': collections.Counter(),
                'size': collections.Counter()}
        return row

    def stub(self, prefix):
        self.rows[prefix]['stubs'] += 1

    def overlay(self, prefix):
        self.rows[prefix]['overlays'] += 1

    def record(self, oid, data):
        prefix = oid[0]
        row = self._row(prefix)
        row['objects'] += 1
        row['bytes'] += len(data)
        klass = class_of(data)
        name = '%s.%s' % klass if klass else '?'
        row['count'][name] += 1
        row['size'][name] += len(data)
        strong, weak = strong_and_weak_oids(data)
        edges = self.edges[prefix]
        for ref in strong + weak:
            if ref[0] != prefix:
                edges[ref[0]] += 1

    def report(self):
        for targets in list(self.edges.values()):
            for prefix in targets:
                self._row(prefix)
        order = sorted(self.rows)
        names = self.names
        partitions = {}
        for prefix in order:
            row = self.rows[prefix]
            partitions[names[prefix]] = {
                'prefix': prefix, 'objects': row['objects'],
                'bytes': row['bytes'], 'stubs': row['stubs'],
                'overlays': row['overlays'],
                'overlay_of': self.bases.get(prefix),
                'top_by_count': row['count'].most_common(self.top),
                'top_by_bytes': row['size'].most_common(self.top)}
        edges = {names[p]: {names[q]: self.edges[p][q]
                            for q in order if q != p}
                 for p in order}
        return {'partitions': partitions, 'edges': edges}


def stats(storage, top=10, progress=None):
    """The report of a composite opened here (its children readable)."""
    overlays = getattr(storage, 'overlay_parts', {})
    tally = _Tally({p.prefix: p.name for p in storage.partitions}, top,
                   bases={prefix: o.base.name
                          for prefix, o in overlays.items()})
    shown = (progress or quiet)('stats', estimate(storage), 'records')
    try:
        for part in storage.partitions:
            overlay = overlays.get(part.prefix)
            for oid, _, data in current_records(part.base,
                                                part.child.skips_deleted):
                shown.update(1)
                if overlay is not None and overlay.shows(oid, data):
                    tally.overlay(part.prefix)
                elif oid[0] != part.prefix:
                    tally.stub(part.prefix)
                elif not is_internal(oid, part.prefix):
                    tally.record(oid, data)
    finally:
        shown.close()
    return tally.report()


def stats_served(client, top=10, progress=None):
    """The report of the composite a ZEO ``client`` is connected to."""
    tally = _Tally({}, top, stubs_known=False)
    shown = (progress or quiet)('stats', len(client) or None, 'objects')
    try:
        for oid, _, data in served_records(client):
            shown.update(1)
            tally.record(oid, data)
    finally:
        shown.close()
    return tally.report()


def format_stats(report):
    lines = []
    for name, p in report['partitions'].items():
        # through ZEO a partition is known by its prefix only
        label = name if name == served_name(p['prefix']) else \
            '%s (prefix %d)' % (name, p['prefix'])
        lines.append('%s: %d objects, %d bytes, %s%s' % (
            label, p['objects'], p['bytes'],
            'stubs not known through ZEO' if p['stubs'] is None
            else '%d stubs' % p['stubs'],
            '' if not p.get('overlay_of') else
            ', %d overlay records (overlay of %s)' % (p['overlays'],
                                                      p['overlay_of'])))
        for key, title in (('top_by_count', 'by count'),
                           ('top_by_bytes', 'by bytes')):
            if p[key]:
                lines.append('  %s: %s' % (title, ', '.join(
                    '%s %d' % item for item in p[key])))
    names = list(report['partitions'])
    if not names:
        return 'no objects yet (nothing has been committed)'
    width = max([len(n) for n in names] + [8]) + 2
    lines.append('cross-partition references (row: from, column: to):')
    lines.append(' ' * width + ''.join('%*s' % (width, n) for n in names))
    for name in names:
        row = report['edges'][name]
        lines.append('%-*s' % (width, name) + ''.join(
            '%*s' % (width, '-' if other == name else row[other])
            for other in names))
    return '\n'.join(lines)
