"""The ``composite:`` zodburi resolver (compositestorage.uri), with real
parts: FileStorage files in ``tmp_path``, ``memory://`` children, a real
in-process ZEO server, and zodburi's own ``resolve_uri``."""
import importlib.metadata
import os

import pytest
import ZEO
import ZODB
import zodburi
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob
from ZODB.FileStorage import FileStorage
from ZODB.MappingStorage import MappingStorage

from compositestorage import CompositeStorage
from compositestorage import ConfigurationError
from compositestorage import PartitionMapError
from compositestorage import placement
from compositestorage.uri import CompositeURIError
from compositestorage.uri import format_uri
from compositestorage.uri import parse_uri
from compositestorage.uri import resolve_composite

from conftest import child_records
from conftest import new_tm


def file_uri(path, **query):
    uri = 'file://%s' % path
    if query:
        uri += '?' + '&'.join('%s=%s' % item for item in query.items())
    return uri


def open_db(uri):
    """``ZODB.DB`` over the storage a URI names, the zodburi way."""
    factory, dbkw = zodburi.resolve_uri(uri)
    return ZODB.DB(factory(), **dbkw)


def prefixes(path):
    """The first bytes of the oids a FileStorage file holds."""
    return {oid[0] for oid in child_records(path)}


# --- registration -------------------------------------------------------------

def test_entry_point_is_registered():
    eps = importlib.metadata.entry_points(group='zodburi.resolvers')
    found = [ep for ep in eps if ep.name == 'composite']
    assert len(found) == 1
    assert found[0].value == 'compositestorage.uri:resolve_composite'
    assert found[0].load() is resolve_composite


# --- round trip ------------------------------------------------------------------

def test_round_trip_format_resolve_open_reopen(tmp_path):
    var = tmp_path / 'var'
    var.mkdir()
    paths = {name: str(var / ('%s.fs' % name))
             for name in ('main', 'catalog', 'archive')}
    parts = [('main', 0, file_uri(paths['main'])),
             ('catalog', 1, file_uri(paths['catalog'])),
             ('archive', 9, file_uri(paths['archive']))]
    uri = format_uri(parts, placement='round-robin',
                     default_partition='catalog', name='shop',
                     pack_gc=False, read_only=False,
                     database_name='shopdb', connection_cache_size=123)
    # the primary named main with prefix 0 is written bare
    assert uri.startswith('composite:(file://%s)/catalog=1:(' % paths['main'])
    assert parse_uri(uri)[0] == parts
    # nothing is opened or created by resolving
    factory, dbkw = zodburi.resolve_uri(uri)
    assert os.listdir(var) == []
    assert dbkw['database_name'] == 'shopdb'
    assert dbkw['cache_size'] == 123

    db = ZODB.DB(factory(), **dbkw)
    try:
        storage = db.storage
        assert isinstance(storage, CompositeStorage)
        assert db.database_name == 'shopdb'
        assert storage.getName() == 'shop'
        assert [(p.name, p.prefix) for p in storage.partitions] == [
            ('main', 0), ('catalog', 1), ('archive', 9)]
        assert [p.storage._file_name for p in storage.partitions] == [
            paths['main'], paths['catalog'], paths['archive']]
        assert storage._policy.name == 'round-robin'
        assert storage.default_partition.name == 'catalog'
        assert storage._pack_gc is False
        assert not storage.isReadOnly()
        tm = new_tm()
        conn = db.open(tm)
        root = conn.root()
        for i in range(6):
            root[i] = PersistentMapping(i=i)
        tm.commit()
        homes = {root[i]._p_oid[0] for i in range(6)}
        assert homes == {0, 1, 9}
        conn.close()
    finally:
        db.close()

    # the children are the files the URI named, each holding its objects;
    # the commit journal (and its writer lock) sit beside the primary
    assert sorted(os.listdir(var)) == sorted(
        [os.path.basename(p) + ext for p in paths.values()
         for ext in ('', '.index', '.lock', '.tmp')]
        + ['main.fs.journal', 'main.fs.journal.lock'])
    assert 1 in prefixes(paths['catalog'])
    assert 9 in prefixes(paths['archive'])

    db = open_db(uri)
    try:
        conn = db.open(new_tm())
        root = conn.root()
        assert [root[i]['i'] for i in range(6)] == list(range(6))
        assert {root[i]._p_oid[0] for i in range(6)} == {0, 1, 9}
        conn.close()
    finally:
        db.close()


def test_readme_example(tmp_path):
    # the README's example, with tmp_path for /srv/var
    uri = ('composite:(file://%s/main.fs)/catalog=1:(file://%s/catalog.fs)'
           '?placement=default' % (tmp_path, tmp_path))
    factory, dbkw = zodburi.resolve_uri(uri)
    assert dbkw == {'cache_size': 10000, 'pool_size': 7,
                    'database_name': 'unnamed'}
    db = ZODB.DB(factory(), **dbkw)
    try:
        storage = db.storage
        assert [(p.name, p.prefix) for p in storage.partitions] == [
            ('main', 0), ('catalog', 1)]
        assert storage._policy.name == 'default'
        assert storage.default_partition.name == 'main'
        assert storage._pack_gc is True
        tm = new_tm()
        conn = db.open(tm)
        root = conn.root()
        root['here'] = PersistentMapping()
        tm.commit()
        with placement(conn, 'catalog'):
            root['there'] = PersistentMapping(x=1)
            tm.commit()
        assert root['here']._p_oid[0] == 0
        assert root['there']._p_oid[0] == 1
        conn.close()
    finally:
        db.close()
    assert prefixes(str(tmp_path / 'catalog.fs')) >= {1}
    db = open_db(uri)
    try:
        assert db.open(new_tm()).root()['there']['x'] == 1
    finally:
        db.close()


def test_explicit_primary_label_and_case(tmp_path):
    uri = ('composite:Catalog=1:(file://%s/c.fs)/Home=0:(file://%s/h.fs)'
           '?default_partition=CATALOG' % (tmp_path, tmp_path))
    factory, dbkw = resolve_composite(uri)
    assert dbkw == {}
    storage = factory()
    try:
        # names are lower-cased as ZConfig lower-cases section names
        assert [(p.name, p.prefix) for p in storage.partitions] == [
            ('home', 0), ('catalog', 1)]
        assert storage.primary.storage._file_name == str(tmp_path / 'h.fs')
        assert storage.default_partition.name == 'catalog'
    finally:
        storage.close()


def test_memory_children(tmp_path):
    uri = ('composite:(memory://)/sessions=1:(memory://)?placement='
           'round-robin&read_only=0')
    factory, dbkw = zodburi.resolve_uri(uri)
    db = ZODB.DB(factory(), **dbkw)
    try:
        storage = db.storage
        assert [(p.name, p.prefix, type(p.storage)) for p in
                storage.partitions] == [('main', 0, MappingStorage),
                                        ('sessions', 1, MappingStorage)]
        tm = new_tm()
        conn = db.open(tm)
        root = conn.root()
        root['a'] = PersistentMapping()
        root['b'] = PersistentMapping()
        tm.commit()
        assert {root['a']._p_oid[0], root['b']._p_oid[0]} == {0, 1}
        sessions = storage.partition_named('sessions').storage
        assert any(oid[0] == 1 for oid in sessions._data)
    finally:
        db.close()


def test_read_only_option(tmp_path):
    path = tmp_path / 'main.fs'
    FileStorage(str(path)).close()
    factory, _ = resolve_composite('composite:(%s)?read_only=true'
                                   % file_uri(path))
    storage = factory()
    try:
        assert storage.isReadOnly()
        assert storage.primary.read_only
    finally:
        storage.close()


def test_blob_children(tmp_path):
    blobs = tmp_path / 'blobs'
    parts = [
        ('main', 0, file_uri(tmp_path / 'main.fs', blobstorage_dir=blobs)),
        ('catalog', 1,
         file_uri(tmp_path / 'catalog.fs', blobstorage_dir=blobs))]
    uri = format_uri(parts)
    db = open_db(uri)
    try:
        tm = new_tm()
        conn = db.open(tm)
        with placement(conn, 'catalog'):
            blob = Blob()
            with blob.open('w') as f:
                f.write(b'in the catalog')
            conn.root()['blob'] = blob
            tm.commit()
        assert conn.root()['blob']._p_oid[0] == 1
        conn.close()
    finally:
        db.close()
    assert blobs.is_dir()
    db = open_db(uri)
    try:
        with db.open(new_tm()).root()['blob'].open() as f:
            assert f.read() == b'in the catalog'
    finally:
        db.close()


def test_pack_with_blob_children(tmp_path):
    """zodburi wraps a file:// child with blobstorage_dir in a BlobStorage;
    packing the composite must work over such children."""
    blobs = tmp_path / 'blobs'
    uri = format_uri([
        ('main', 0, file_uri(tmp_path / 'main.fs', blobstorage_dir=blobs)),
        ('catalog', 1,
         file_uri(tmp_path / 'catalog.fs', blobstorage_dir=blobs))])
    db = open_db(uri)
    try:
        tm = new_tm()
        conn = db.open(tm)
        with placement(conn, 'catalog'):
            conn.root()['blob'] = Blob(b'kept')
            tm.commit()
        db.pack()
        with conn.root()['blob'].open() as f:
            assert f.read() == b'kept'
    finally:
        db.close()


def test_zeo_child(tmp_path):
    addr, stop = ZEO.server(path=str(tmp_path / 'served.fs'))
    try:
        uri = format_uri([
            ('main', 0, file_uri(tmp_path / 'main.fs')),
            ('remote', 1, 'zeo://%s:%d?wait_timeout=30' % addr)])
        db = open_db(uri)
        try:
            tm = new_tm()
            conn = db.open(tm)
            with placement(conn, 'remote'):
                conn.root()['far'] = PersistentMapping(x=42)
                tm.commit()
            assert conn.root()['far']._p_oid[0] == 1
            remote = db.storage.partition_named('remote').storage
            assert type(remote).__name__ == 'ClientStorage'
        finally:
            db.close()
        db = open_db(uri)
        try:
            assert db.open(new_tm()).root()['far']['x'] == 42
        finally:
            db.close()
    finally:
        stop()
    assert 1 in prefixes(str(tmp_path / 'served.fs'))


# --- nesting ------------------------------------------------------------------------

def test_nested_uris_are_split_by_depth(tmp_path):
    demo = 'demo:(file://%s/base.fs)/(memory://?x=(1))' % tmp_path
    blob = file_uri(tmp_path / 'b.fs', blobstorage_dir=tmp_path / 'bl')
    uri = 'composite:(%s)/scratch=2:(%s)/b=1:(%s)?name=n' % (
        file_uri(tmp_path / 'm.fs'), demo, blob)
    parts, query = parse_uri(uri)
    assert parts == [('main', 0, file_uri(tmp_path / 'm.fs')),
                     ('scratch', 2, demo),
                     ('b', 1, blob)]
    assert query == 'name=n'


def test_zconfig_child(tmp_path):
    conf = tmp_path / 'children.conf'
    conf.write_text('''
<filestorage catalog>
  path %s/catalog.fs
</filestorage>
''' % tmp_path)
    uri = 'composite:(memory://)/catalog=1:(zconfig://%s#catalog)' % conf
    db = open_db(uri)
    try:
        tm = new_tm()
        conn = db.open(tm)
        with placement(conn, 'catalog'):
            conn.root()['c'] = PersistentMapping()
            tm.commit()
        child = db.storage.partition_named('catalog').storage
        assert child._file_name == str(tmp_path / 'catalog.fs')
    finally:
        db.close()
    assert 1 in prefixes(str(tmp_path / 'catalog.fs'))


# --- the zconfig:// alternative --------------------------------------------------------

ZCONFIG = '''
%%import compositestorage
<zodb shopdb>
  cache-size 321
  <compositestorage>
    name shop
    placement round-robin
    <partition main>
      prefix 0
      <filestorage>
        path %(dir)s/main.fs
      </filestorage>
    </partition>
    <partition catalog>
      prefix 1
      <filestorage>
        path %(dir)s/catalog.fs
      </filestorage>
    </partition>
  </compositestorage>
</zodb>
'''


@pytest.mark.parametrize('fragment', ['', '#shopdb'])
def test_zconfig_uri_opens_a_composite(tmp_path, fragment):
    conf = tmp_path / 'zodb.conf'
    conf.write_text(ZCONFIG % {'dir': tmp_path})
    factory, dbkw = zodburi.resolve_uri('zconfig://%s%s' % (conf, fragment))
    assert dbkw['cache_size'] == 321
    db = ZODB.DB(factory(), **dbkw)
    try:
        storage = db.storage
        assert isinstance(storage, CompositeStorage)
        assert storage.getName() == 'shop'
        assert [(p.name, p.prefix) for p in storage.partitions] == [
            ('main', 0), ('catalog', 1)]
        tm = new_tm()
        conn = db.open(tm)
        for i in range(4):
            conn.root()[i] = PersistentMapping()
        tm.commit()
        assert {conn.root()[i]._p_oid[0] for i in range(4)} == {0, 1}
    finally:
        db.close()
    assert 1 in prefixes(str(tmp_path / 'catalog.fs'))


def test_zconfig_uri_names_a_storage_section(tmp_path):
    conf = tmp_path / 'storages.conf'
    conf.write_text('''
%%import compositestorage
<filestorage other>
  path %(dir)s/other.fs
</filestorage>
<compositestorage shop>
  <partition main>
    prefix 0
    <mappingstorage/>
  </partition>
  <partition sessions>
    prefix 3
    <mappingstorage/>
  </partition>
</compositestorage>
''' % {'dir': tmp_path})
    factory, dbkw = zodburi.resolve_uri('zconfig://%s#shop' % conf)
    storage = factory()
    try:
        assert isinstance(storage, CompositeStorage)
        assert [(p.name, p.prefix) for p in storage.partitions] == [
            ('main', 0), ('sessions', 3)]
    finally:
        storage.close()
    assert not (tmp_path / 'other.fs').exists()


# --- opening fails: the children already opened are closed ------------------------------

def test_failing_child_closes_the_children_already_opened(tmp_path):
    main = tmp_path / 'main.fs'
    uri = 'composite:(%s)/bad=1:(%s)' % (
        file_uri(main), file_uri(tmp_path / 'no' / 'such' / 'dir' / 'x.fs'))
    factory, _ = resolve_composite(uri)
    with pytest.raises(OSError) as exc:
        factory()
    # main.fs was opened, so it exists; it was closed, so its lock is free
    # (exc keeps the failed factory's frame, and so any unclosed child, alive)
    assert main.exists()
    FileStorage(str(main)).close()
    assert 'x.fs' in str(exc.value)


def test_failing_composite_closes_its_children(tmp_path):
    a, b = tmp_path / 'a.fs', tmp_path / 'b.fs'
    db = open_db('composite:(%s)/b=1:(%s)' % (file_uri(a), file_uri(b)))
    try:
        tm = new_tm()
        conn = db.open(tm)
        conn.root()['x'] = PersistentMapping()
        tm.commit()
    finally:
        db.close()
    # b.fs is partition b; calling it c is refused after both are open
    factory, _ = resolve_composite(
        'composite:(%s)/c=1:(%s)' % (file_uri(a), file_uri(b)))
    with pytest.raises(PartitionMapError) as exc:
        factory()
    assert "'c'" in str(exc.value)
    FileStorage(str(a)).close()
    FileStorage(str(b)).close()


# --- bad URIs ---------------------------------------------------------------------------

BAD = [
    # (id, uri template, error type, words the message must hold)
    ('unclosed', 'composite:(F/main.fs)/catalog=1:(F/c.fs',
     CompositeURIError, ['unbalanced parentheses', "part 2 'catalog=1:("]),
    ('extra-close', 'composite:(F/main.fs))/catalog=1:(F/c.fs)',
     CompositeURIError, ['unbalanced parentheses', "part 1 '(file://"]),
    ('stray-close', 'composite:(F/main.fs)/catalog=1):(F/c.fs)',
     CompositeURIError, ['unbalanced parentheses', "part 2 'catalog=1):("]),
    ('no-label', 'composite:(F/main.fs)/(F/c.fs)',
     CompositeURIError, ['NAME=PREFIX:', "part 2 '(file://"]),
    ('no-prefix', 'composite:(F/main.fs)/catalog:(F/c.fs)',
     CompositeURIError, ['NAME=PREFIX:', "part 2 'catalog:(file://"]),
    ('no-colon', 'composite:(F/main.fs)/catalog=1(F/c.fs)',
     CompositeURIError, ['NAME=PREFIX:', "part 2 'catalog=1(file://"]),
    ('no-parens', 'composite:F/main.fs',
     CompositeURIError, ['no (URI)', "part 1 'file://"]),
    ('prefix-not-int', 'composite:(F/main.fs)/catalog=one:(F/c.fs)',
     CompositeURIError, ['not an integer', "part 2 'catalog=one:(",
                         "'one'"]),
    ('prefix-float', 'composite:(F/main.fs)/catalog=1.5:(F/c.fs)',
     CompositeURIError, ['not an integer', "'1.5'"]),
    ('bad-name', 'composite:(F/main.fs)/cat alog=1:(F/c.fs)',
     CompositeURIError, ["part 2 'cat alog=1:(", "'cat alog'"]),
    ('unknown-key', 'composite:(F/main.fs)/catalog=1:(F/c.fs)?colour=red',
     CompositeURIError, ['unknown query key', "'colour'"]),
    ('hyphen-key',
     'composite:(F/main.fs)/catalog=1:(F/c.fs)?default-partition=catalog',
     CompositeURIError, ['unknown query key', "'default-partition'"]),
    ('duplicate-key', 'composite:(F/main.fs)?name=a&name=b',
     CompositeURIError, ["'name'", 'twice']),
    ('bad-boolean', 'composite:(F/main.fs)?read_only=maybe',
     CompositeURIError, ["'read_only'", "'maybe'"]),
    ('bad-placement', 'composite:(F/main.fs)?placement=random',
     CompositeURIError, ["'placement'", "'random'", 'round-robin']),
    ('bad-db-value', 'composite:(F/main.fs)?connection_cache_size=lots',
     CompositeURIError, ["'connection_cache_size'", "'lots'"]),
    ('unknown-scheme', 'composite:(F/main.fs)/catalog=1:(bogus:///x)',
     CompositeURIError, ["part 2 'catalog=1:(bogus:///x)'", "'bogus'"]),
    ('no-scheme', 'composite:(F/main.fs)/catalog=1:(/var/c.fs)',
     CompositeURIError, ["part 2 'catalog=1:(/var/c.fs)'", 'no scheme']),
    ('child-dbkw',
     'composite:(F/main.fs)/catalog=1:(F/c.fs?database_name=x)',
     CompositeURIError, ["part 2 'catalog=1:(file://", 'database_name']),
    ('bad-child-uri',
     'composite:(F/main.fs)/catalog=1:(zconfig://F/none.conf)',
     CompositeURIError, ["part 2 'catalog=1:(zconfig://", 'none.conf']),
    ('bad-nested-composite',
     'composite:(F/main.fs)/c=1:(composite:(F/x.fs)/d=x:(F/y.fs))',
     CompositeURIError, ["part 2 'c=1:(composite:", "part 2 'd=x:("]),
    ('empty-child', 'composite:(F/main.fs)/catalog=1:()',
     CompositeURIError, ["part 2 'catalog=1:()'", 'empty']),
    ('part-after-query', 'composite:(F/main.fs)?name=x/catalog=1:(F/c.fs)',
     CompositeURIError, ['holds a part', 'catalog=1:(file://']),
    ('trailing-slash', 'composite:(F/main.fs)/',
     CompositeURIError, ['part 2 is empty']),
    ('junk-after-part', 'composite:(F/main.fs)x',
     CompositeURIError, ["'x'", "part 1 '(file://"]),
    # the layout checks of CompositeStorage, made before anything is opened
    ('duplicate-prefix', 'composite:(F/main.fs)/catalog=0:(F/c.fs)',
     ConfigurationError, ["'main'", "'catalog'", 'prefix 0']),
    ('duplicate-name', 'composite:(F/main.fs)/main=1:(F/c.fs)',
     ConfigurationError, ["'main'", 'two partitions']),
    ('prefix-range', 'composite:(F/main.fs)/catalog=128:(F/c.fs)',
     ConfigurationError, ["'catalog'", '128']),
    ('no-primary', 'composite:catalog=1:(F/c.fs)',
     ConfigurationError, ['prefix 0', 'catalog=1']),
    ('same-file', 'composite:(F/main.fs)/catalog=1:(F/./main.fs)',
     ConfigurationError, ["'main'", "'catalog'", 'same storage']),
    ('unknown-default', 'composite:(F/main.fs)?default_partition=nowhere',
     ConfigurationError, ["'nowhere'"]),
]


@pytest.mark.parametrize('uri, error, needles',
                         [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_uri_is_refused_naming_the_part(tmp_path, uri, error, needles):
    var = tmp_path / 'var'
    var.mkdir()
    uri = uri.replace('F/', 'file://%s/' % var)
    with pytest.raises(error) as exc:
        zodburi.resolve_uri(uri)
    assert isinstance(exc.value, ConfigurationError)
    assert isinstance(exc.value, ValueError)
    text = str(exc.value)
    assert '\n' not in text
    for needle in needles:
        assert needle in text, (needle, text)
    assert os.listdir(var) == []


def test_not_a_composite_uri():
    with pytest.raises(CompositeURIError) as exc:
        resolve_composite('file:///x.fs')
    assert "'file:///x.fs'" in str(exc.value)


# --- format_uri ------------------------------------------------------------------------

def test_format_uri_writes_labels_and_quotes_values():
    uri = format_uri([('home', 0, 'memory://'), ('b', 1, 'memory://')],
                     name='a b&c', pack_gc=True, placement=None)
    assert uri == ('composite:home=0:(memory://)/b=1:(memory://)'
                   '?name=a%20b%26c&pack_gc=true')
    factory, dbkw = resolve_composite(uri)
    storage = factory()
    try:
        assert storage.getName() == 'a b&c'
        assert storage.primary.name == 'home'
    finally:
        storage.close()


@pytest.mark.parametrize('parts, options, needle', [
    ([('main', 0, 'file:///x(.fs')], {}, 'unbalanced parentheses'),
    ([('main', 0, 'memory://')], {'colour': 'red'}, "'colour'"),
    ([('main', 'zero', 'memory://')], {}, "'zero'"),
    ([('ma in', 0, 'memory://')], {}, "'ma in'"),
])
def test_format_uri_refuses_what_cannot_round_trip(parts, options, needle):
    with pytest.raises(CompositeURIError) as exc:
        format_uri(parts, **options)
    assert needle in str(exc.value)


# --- the examples in docs/zodburi.rst ---------------------------------------------------

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'docs', 'zodburi.rst')


def doc_uris():
    with open(DOC) as f:
        return [line.strip() for line in f
                if line.strip().startswith(('composite:', '# composite:'))
                and 'NAME=PREFIX' not in line]


def test_doc_examples_resolve(tmp_path):
    (tmp_path / 'children.conf').write_text(
        '<filestorage catalog>\n  path %s/catalog.fs\n</filestorage>\n'
        % tmp_path)
    uris = doc_uris()
    assert len(uris) >= 7
    for uri in uris:
        if uri.startswith('# '):
            continue
        uri = uri.replace('/srv/var', str(tmp_path)).replace(
            '/srv/etc', str(tmp_path))
        factory, dbkw = zodburi.resolve_uri(uri)
        assert callable(factory)
        if 'zeo://' not in uri:
            storage = factory()
            try:
                assert isinstance(storage, CompositeStorage)
                assert len(storage.partitions) == uri.count(':(')
            finally:
                storage.close()


def test_doc_format_uri_example():
    written = [u[2:] for u in doc_uris() if u.startswith('# ')]
    assert written == [format_uri(
        [('main', 0, 'file:///srv/var/main.fs'),
         ('catalog', 1, 'file:///srv/var/catalog.fs')],
        placement='round-robin', pack_gc=False)]
