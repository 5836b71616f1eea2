#!/usr/bin/env python
"""Build a large, realistic composite (and optionally the same plain ZODB).

``python benchmarks/generate.py --objects N --dir DIR [--plain PATH]``
builds, in ``DIR``, a composite of three FileStorage partitions, ``main``
(prefix 0, ``DIR/main.fs``), ``catalog`` (prefix 1, ``DIR/catalog.fs``) and
``archive`` (prefix 2, ``DIR/archive.fs``), writes its ZConfig file
``DIR/composite.conf`` (``%import compositestorage`` and a
``<compositestorage>`` section, opened by this script as any user would) and
a summary of what was built, ``DIR/generated.json``.  ``--plain PATH`` builds
the very same object graph, in the very same transactions, into one plain
FileStorage, so that its pack can be compared with the composite's.

The object graph (``N`` is the number of application objects; the BTrees'
own nodes come on top, a few percent more records):

* ``main``: ``root['content']``, a mapping of ``FOLDERS`` ``OOBTree``
  folders of :class:`Document` objects (two thirds of ``N``).  About 30% of
  the documents refer to another document (``related``, same partition) and
  about 2% to a catalog :class:`Term` (``subject``, main -> catalog).
* ``catalog``: ``root['catalog']``, a mapping of BTrees: ``records`` (an
  ``IOBTree`` of :class:`CatalogRecord` objects, one for every third
  document), ``terms`` (an ``OOBTree`` of :class:`Term` objects) and
  ``featured`` (an ``OOBTree`` whose values are documents in ``main``:
  catalog -> main, for about 4% of the documents).
* ``archive``: ``root['archive']``, a mapping of ``IOBTree`` per year of
  :class:`ArchivedItem` objects (one for every sixth document); about 30% of
  them refer to their original document (archive -> main).

About 5% of all references cross partitions.  Every application object is
added with ``compositestorage.placement`` to its partition, and
``compositestorage.containment`` keeps new BTree buckets beside their tree.

The build is deterministic (``--seed``) and runs in four phases of
transactions of about ``--batch`` objects each, with ``cacheMinimize()``
between them, so memory stays flat:

1. create everything;
2. update about 10% of the documents (and their catalog records, and some
   terms): old revisions for pack to remove;
3. delete about 13% of the documents from their folders, their catalog
   records from ``records`` and half of the featured ones from ``featured``
   (garbage in ``main`` whose last reference was in ``catalog``);
4. purge about 15% of the archived items (their original document, if it
   was deleted from its folder, becomes garbage in ``main`` whose last
   reference was in ``archive``) and remove 20% of the terms from ``terms``
   (a term that a live document still refers to from ``main`` stays).

About 10% of the objects end up unreachable.  The script works out, from
its own bookkeeping, how many objects of each class must survive a pack
(``expected_live`` in the summary).

The classes below are pickled as ``generate.Document`` etc.: when run as a
script, this file imports itself as ``generate`` first, so anything that
wants to load the objects needs ``benchmarks/`` on ``sys.path`` (the
``compositestorage`` commands, packs included, never load them).
"""
import argparse
import array
import json
import os
import random
import sys
import time

from persistent import Persistent

PARTITIONS = (('main', 0), ('catalog', 1), ('archive', 2))
FOLDERS = 10
YEARS = 10

#: fractions of the build (see the module docstring)
P_RELATED = 0.30        # document -> earlier document of the same batch
P_SUBJECT = 0.02        # document (main) -> term (catalog)
P_FEATURED = 0.04       # featured (catalog) -> document (main)
RECORD_EVERY = 3        # a catalog record for every third document
ARCHIVE_EVERY = 6       # an archived item for every sixth document
P_ORIGINAL = 0.30       # archived item (archive) -> document (main)
P_UPDATE = 0.10         # documents changed in phase 2
P_DELETE = 0.13         # documents removed from their folder in phase 3
P_UNFEATURE = 0.50      # of the deleted featured documents
P_PURGE = 0.15          # archived items purged in phase 4
P_TERM_REMOVED = 0.20   # terms removed from the terms tree in phase 4
TERMS_PER = 200         # one term per this many objects (at least 5)

# bookkeeping flags, one byte per document
RECORD, FEATURED, ARCHIVED, ORIGINAL, DELETED, UNFEATURED, PURGED = (
    1, 2, 4, 8, 16, 32, 64)


class Document(Persistent):
    """A content object in ``main``."""

    related = None
    subject = None

    def __init__(self, docid, title, body):
        self.docid = docid
        self.title = title
        self.body = body
        self.version = 0


class CatalogRecord(Persistent):
    """A catalog entry (metadata only, no references) in ``catalog``."""

    def __init__(self, docid, title, path):
        self.docid = docid
        self.title = title
        self.path = path


class Term(Persistent):
    """A vocabulary term in ``catalog``."""

    def __init__(self, name, weight):
        self.name = name
        self.weight = weight


class ArchivedItem(Persistent):
    """An archived copy in ``archive``, maybe referring to its original."""

    original = None

    def __init__(self, docid, summary):
        self.docid = docid
        self.summary = summary


CLASSES = {'main': ['Document'], 'catalog': ['CatalogRecord', 'Term'],
           'archive': ['ArchivedItem']}


def doc_key(docid):
    return 'doc%08d' % docid


def term_key(t):
    return 'term%06d' % t


def year_of(docid):
    return 2000 + docid % YEARS


# --- building -------------------------------------------------------------

class Builder:
    """Builds the graph through one connection.

    ``place(conn, obj, partition)`` gives ``obj`` its oid: explicitly in
    ``partition`` for the composite, wherever for a plain storage.  Every
    random choice comes from one ``random.Random(seed)`` and none depends on
    the storage, so two builders with the same seed and ``objects`` make the
    same graph in the same transactions.
    """

    def __init__(self, db, objects, seed, batch, place, log):
        import transaction
        self.db = db
        self.objects = objects
        self.rng = random.Random(seed)
        self.batch = batch
        self.place = place
        self.log = log
        self.tm = transaction.TransactionManager()
        self.conn = db.open(transaction_manager=self.tm)
        self.transactions = 0
        self.pending = 0
        self.sentences = [self._sentence() for _ in range(1000)]

    def _sentence(self):
        words = ('zodb', 'storage', 'object', 'catalog', 'archive', 'pack',
                 'partition', 'reference', 'record', 'transaction', 'btree',
                 'bucket', 'content', 'folder', 'document', 'index', 'term',
                 'revision', 'garbage', 'root', 'stub', 'oid', 'tid')
        n = self.rng.randint(15, 35)
        return ' '.join(self.rng.choice(words) for _ in range(n)).capitalize()

    def add(self, obj, partition):
        self.place(self.conn, obj, partition)
        self.pending += 1

    def commit(self, note, force=False):
        if not force and self.pending < self.batch:
            return
        txn = self.tm.get()
        txn.note(note)
        self.tm.commit()
        self.conn.cacheMinimize()
        self.transactions += 1
        self.pending = 0

    def run(self):
        from BTrees.IOBTree import IOBTree
        from BTrees.OOBTree import OOBTree
        from persistent.mapping import PersistentMapping
        rng = self.rng
        started = time.time()
        objects = self.objects
        n_terms = max(5, objects // TERMS_PER)
        # documents, records and archived items come 1 : 1/3 : 1/6
        per_doc = 1 + 1.0 / RECORD_EVERY + 1.0 / ARCHIVE_EVERY
        docs_planned = max(1, int((objects - n_terms) / per_doc) + 10)
        self.flags = flags = bytearray(docs_planned)
        self.related = related = array.array('i', [-1]) * docs_planned
        self.subject = subject = {}        # docid -> term number
        cross = {'root->catalog/archive': 2, 'featured': 0, 'original': 0,
                 'subject': 0}
        created = {'Document': 0, 'CatalogRecord': 0, 'Term': 0,
                   'ArchivedItem': 0}

        # --- phase 1: create ----------------------------------------------
        root = self.conn.root()
        content = PersistentMapping()
        self.add(content, 'main')
        for f in range(FOLDERS):
            folder = OOBTree()
            self.add(folder, 'main')
            content['folder%02d' % f] = folder
        catalog = PersistentMapping()
        self.add(catalog, 'catalog')
        for name, factory in (('records', IOBTree), ('terms', OOBTree),
                              ('featured', OOBTree)):
            tree = factory()
            self.add(tree, 'catalog')
            catalog[name] = tree
        archive = PersistentMapping()
        self.add(archive, 'archive')
        for y in range(YEARS):
            tree = IOBTree()
            self.add(tree, 'archive')
            archive[str(2000 + y)] = tree
        root['content'] = content
        root['catalog'] = catalog
        root['archive'] = archive
        self.commit('generate: structure', force=True)
        made = 0
        for t in range(n_terms):
            term = Term(term_key(t), rng.random())
            self.add(term, 'catalog')
            catalog['terms'][term_key(t)] = term
            made += 1
            self.commit('generate: terms')
        created['Term'] = n_terms
        terms = catalog['terms']
        docid = 0
        batch_docs = []
        transactions = self.transactions
        while made < objects and docid < docs_planned:
            i = docid
            docid += 1
            doc = Document(i, 'Document %d' % i,
                           self.sentences[rng.randrange(1000)])
            self.add(doc, 'main')
            content['folder%02d' % (i % FOLDERS)][doc_key(i)] = doc
            created['Document'] += 1
            made += 1
            f = 0
            if batch_docs and rng.random() < P_RELATED:
                other = batch_docs[rng.randrange(len(batch_docs))]
                doc.related = other
                related[i] = other.docid
            if rng.random() < P_SUBJECT:
                t = rng.randrange(n_terms)
                doc.subject = terms[term_key(t)]
                subject[i] = t
                cross['subject'] += 1
            if rng.random() < P_FEATURED:
                catalog['featured'][doc_key(i)] = doc
                f |= FEATURED
                cross['featured'] += 1
            if i % RECORD_EVERY == 0 and made < objects:
                rec = CatalogRecord(i, doc.title, '/folder%02d/%s' % (
                    i % FOLDERS, doc_key(i)))
                self.add(rec, 'catalog')
                catalog['records'][i] = rec
                created['CatalogRecord'] += 1
                made += 1
                f |= RECORD
            if i % ARCHIVE_EVERY == 1 and made < objects:
                item = ArchivedItem(i, doc.body[:60])
                if rng.random() < P_ORIGINAL:
                    item.original = doc
                    f |= ORIGINAL
                    cross['original'] += 1
                self.add(item, 'archive')
                archive[str(year_of(i))][i] = item
                created['ArchivedItem'] += 1
                made += 1
                f |= ARCHIVED
            flags[i] = f
            batch_docs.append(doc)
            if self.pending >= self.batch:
                self.commit('generate: create up to document %d' % i)
                batch_docs = []
        self.commit('generate: create up to document %d' % (docid - 1),
                    force=True)
        docs = self.docs = docid
        del flags[docs:]
        del related[docs:]
        self.log('  phase 1: %d objects created in %d transactions, %.1f s'
                 % (made, self.transactions - transactions + 1,
                    time.time() - started))

        # --- phase 2: update ----------------------------------------------
        phase = time.time()
        transactions = self.transactions
        updated = 0
        for i in range(docs):
            if rng.random() >= P_UPDATE:
                continue
            doc = content['folder%02d' % (i % FOLDERS)][doc_key(i)]
            doc.version += 1
            doc.title = 'Document %d, version %d' % (i, doc.version)
            self.pending += 1
            updated += 1
            if flags[i] & RECORD:
                catalog['records'][i].title = doc.title
                self.pending += 1
                updated += 1
            self.commit('generate: update up to document %d' % i)
        for t in range(0, n_terms, 7):
            terms[term_key(t)].weight += 1.0
            self.pending += 1
            updated += 1
        self.commit('generate: update', force=True)
        self.log('  phase 2: %d objects updated in %d transactions, %.1f s'
                 % (updated, self.transactions - transactions,
                    time.time() - phase))

        # --- phase 3: delete documents --------------------------------------
        phase = time.time()
        transactions = self.transactions
        deleted = 0
        for i in range(docs):
            if rng.random() >= P_DELETE:
                continue
            del content['folder%02d' % (i % FOLDERS)][doc_key(i)]
            flags[i] |= DELETED
            deleted += 1
            self.pending += 1
            if flags[i] & RECORD:
                del catalog['records'][i]
                self.pending += 1
            if flags[i] & FEATURED and rng.random() < P_UNFEATURE:
                del catalog['featured'][doc_key(i)]
                flags[i] |= UNFEATURED
                self.pending += 1
            self.commit('generate: delete up to document %d' % i)
        self.commit('generate: delete', force=True)
        self.log('  phase 3: %d documents deleted in %d transactions, %.1f s'
                 % (deleted, self.transactions - transactions,
                    time.time() - phase))

        # --- phase 4: purge archived items, remove terms --------------------
        phase = time.time()
        transactions = self.transactions
        purged = 0
        for i in range(docs):
            if not flags[i] & ARCHIVED or rng.random() >= P_PURGE:
                continue
            del archive[str(year_of(i))][i]
            flags[i] |= PURGED
            purged += 1
            self.pending += 1
            self.commit('generate: purge up to item %d' % i)
        self.removed_terms = removed = set()
        for t in range(n_terms):
            if rng.random() < P_TERM_REMOVED:
                del terms[term_key(t)]
                removed.add(t)
                self.pending += 1
                self.commit('generate: remove terms')
        self.commit('generate: purge', force=True)
        self.log('  phase 4: %d archived items purged, %d terms removed in '
                 '%d transactions, %.1f s'
                 % (purged, len(removed), self.transactions - transactions,
                    time.time() - phase))
        self.tm.abort()
        self.conn.close()
        self.n_terms = n_terms
        return {'created': created, 'cross_references_created': cross,
                'objects_updated': updated, 'documents_deleted': deleted,
                'archived_items_purged': purged,
                'terms_removed': len(removed),
                'transactions': self.transactions,
                'expected_live': self.expected_live(),
                'seconds': time.time() - started}

    def expected_live(self):
        """How many objects of each class are reachable after the build,
        from the bookkeeping alone (no storage is read)."""
        flags, related, subject = self.flags, self.related, self.subject
        live = bytearray(self.docs)
        cross_garbage = 0
        for i in range(self.docs - 1, -1, -1):
            f = flags[i]
            held_home = not f & DELETED
            held_away = (f & FEATURED and not f & UNFEATURED) or (
                f & ORIGINAL and not f & PURGED)
            if held_home or held_away or live[i]:
                live[i] = 1
                if related[i] >= 0:
                    live[related[i]] = 1     # related[i] < i: not yet seen
            elif f & (FEATURED | ORIGINAL):
                cross_garbage += 1           # last held from another partition
        live_terms = set(range(self.n_terms)) - self.removed_terms
        live_terms.update(t for i, t in subject.items() if live[i])
        return {
            'Document': sum(live),
            'CatalogRecord': sum(1 for f in flags
                                 if f & RECORD and not f & DELETED),
            'Term': len(live_terms),
            'ArchivedItem': sum(1 for f in flags
                                if f & ARCHIVED and not f & PURGED),
            'documents_last_held_from_another_partition': cross_garbage,
            'terms_held_only_from_main': len(
                live_terms - (set(range(self.n_terms)) - self.removed_terms)),
            # The stub in catalog of a document taken out of ``featured``
            # stays until a pack, referred to by nothing: verify reports it
            # (orphan-stub).  No other deletion drops a cross-partition
            # reference from a current record.
            'orphan_stubs': {'catalog': sum(
                1 for f in flags if f & UNFEATURED)},
        }


def place_in_partition(conn, obj, partition):
    from compositestorage import placement
    with placement(conn, partition):
        conn.add(obj)


def place_anywhere(conn, obj, partition):
    conn.add(obj)


# --- files ----------------------------------------------------------------

def partition_paths(directory):
    return {name: os.path.join(directory, '%s.fs' % name)
            for name, _ in PARTITIONS}


def config_text(paths):
    """The ZConfig text of the composite (the tests' ``config_file``
    format)."""
    sections = ''.join('''
  <partition %s>
    prefix %d
    <filestorage>
      path %s
    </filestorage>
  </partition>''' % (name, prefix, paths[name]) for name, prefix in PARTITIONS)
    return '%%import compositestorage\n\n<compositestorage>%s\n' \
        '</compositestorage>\n' % sections


def write_config(directory, paths):
    path = os.path.join(directory, 'composite.conf')
    with open(path, 'w') as f:
        f.write(config_text(paths))
    return path


FS_SUFFIXES = ('', '.index', '.lock', '.tmp', '.old', '.pack', '.journal',
               '.journal.lock')


def remove_storage_files(path):
    for suffix in FS_SUFFIXES:
        if os.path.exists(path + suffix):
            os.remove(path + suffix)


def open_config(path):
    import ZODB.config
    with open(path) as f:
        return ZODB.config.storageFromFile(f)


def file_size(path):
    return os.path.getsize(path) if os.path.exists(path) else 0


# --- the whole run --------------------------------------------------------

def generate(directory, objects=1000000, plain=None, seed=1, batch=5000,
             force=False, out=None):
    """Build the composite in ``directory`` (and the plain FileStorage at
    ``plain``); returns the summary also written to ``generated.json``."""
    import ZODB
    from ZODB.FileStorage import FileStorage
    from compositestorage import containment
    out = out or sys.stdout

    def log(text):
        print(text, file=out, flush=True)

    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    paths = partition_paths(directory)
    plain = os.path.abspath(plain) if plain else None
    targets = list(paths.values()) + ([plain] if plain else [])
    existing = [p for p in targets if os.path.exists(p)]
    if existing and not force:
        raise SystemExit('generate.py: %s already exist(s); use --force to '
                         'replace' % ', '.join(existing))
    for p in targets:
        remove_storage_files(p)
    config = write_config(directory, paths)
    summary = {'objects': objects, 'seed': seed, 'batch': batch,
               'directory': directory, 'config': config}

    log('composite: %d objects in %s (config %s)'
        % (objects, directory, config))
    started = time.time()
    storage = open_config(config)
    db = ZODB.DB(storage)
    containment(db)
    try:
        result = Builder(db, objects, seed, batch, place_in_partition,
                         log).run()
        parts = {}
        for part in storage.partitions:
            parts[part.name] = {
                'prefix': part.prefix, 'path': paths[part.name],
                'objects': part.count_own(), 'stubs': part.count_stubs()}
    finally:
        db.close()
    for name, info in parts.items():
        info['bytes'] = file_size(info['path'])
    elapsed = time.time() - started
    summary['composite'] = dict(result, seconds=elapsed, partitions=parts)
    log('composite built in %.1f s:' % elapsed)
    for name, info in parts.items():
        log('  %-8s prefix %d: %9d objects, %7d stubs, %8.1f MB  %s' % (
            name, info['prefix'], info['objects'], info['stubs'],
            info['bytes'] / 1e6, info['path']))
    created = result['created']
    log('  created: %s' % ', '.join('%d %s' % (v, k)
                                    for k, v in created.items()))
    cross = result['cross_references_created']
    log('  cross-partition references created: %d (%s)' % (
        sum(cross.values()), ', '.join('%s %d' % kv for kv in cross.items())))
    live = result['expected_live']
    live_objects = sum(live[k] for k in created)
    log('  %d transactions; %d objects updated, %d documents deleted, %d '
        'archived items purged, %d terms removed' % (
            result['transactions'], result['objects_updated'],
            result['documents_deleted'], result['archived_items_purged'],
            result['terms_removed']))
    log('  reachable application objects: %d of %d (%.1f%% garbage; %d '
        'garbage documents were last held from another partition, %d terms '
        'live only through main)' % (
            live_objects, sum(created.values()),
            100.0 * (1 - live_objects / max(1, sum(created.values()))),
            live['documents_last_held_from_another_partition'],
            live['terms_held_only_from_main']))

    if plain:
        log('plain FileStorage: the same graph in %s' % plain)
        started = time.time()
        db = ZODB.DB(FileStorage(plain, create=True))
        try:
            presult = Builder(db, objects, seed, batch, place_anywhere,
                              log).run()
            count = len(db.storage)
        finally:
            db.close()
        elapsed = time.time() - started
        if presult['expected_live'] != live or \
                presult['created'] != created:
            raise AssertionError('the plain build differs from the '
                                 'composite build')
        summary['plain'] = {'path': plain, 'objects': count,
                            'bytes': file_size(plain),
                            'transactions': presult['transactions'],
                            'seconds': elapsed}
        log('plain FileStorage built in %.1f s: %d objects, %.1f MB' % (
            elapsed, count, file_size(plain) / 1e6))
    with open(os.path.join(directory, 'generated.json'), 'w') as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    return summary


def make_parser():
    parser = argparse.ArgumentParser(
        prog='generate.py',
        description='Build a composite of N objects in three FileStorage '
        'partitions (main, catalog, archive), and optionally the same graph '
        'in one plain FileStorage.')
    parser.add_argument('--objects', type=int, default=1000000, metavar='N',
                        help='application objects to create '
                        '(default: %(default)s)')
    parser.add_argument('--dir', required=True, metavar='DIR',
                        help='where the partitions, composite.conf and '
                        'generated.json go')
    parser.add_argument('--plain', metavar='PATH',
                        help='also build the same graph into this plain '
                        'FileStorage file')
    parser.add_argument('--seed', type=int, default=1,
                        help='random seed (default: %(default)s)')
    parser.add_argument('--batch', type=int, default=5000, metavar='N',
                        help='objects per transaction (default: '
                        '%(default)s)')
    parser.add_argument('--force', action='store_true',
                        help='replace existing storage files')
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    if args.objects < 10:
        raise SystemExit('generate.py: --objects must be at least 10')
    if args.batch < 1:
        raise SystemExit('generate.py: --batch must be at least 1')
    generate(args.dir, args.objects, args.plain, args.seed, args.batch,
             args.force)
    return 0


if __name__ == '__main__':
    # Pickle the classes as generate.Document etc., not __main__.Document.
    import importlib
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(importlib.import_module('generate').main())
