"""What a command is given, and how it is opened: one rule for every tool.

Every command that takes a composite (``info``, ``verify``, ``stats``,
``pack``, ``repair``, ``recover``, ``backup``, ``restore``) takes a
CONFIG_OR_URI and an optional ``--database NAME``:

- a ZConfig file: a ``zeo.conf``, a Zope ``zope.conf``, a file holding
  ``<zodb>`` sections, or a bare ``<compositestorage>`` section (each with
  ``%import compositestorage``).  In a file that configures several
  databases or storages, the one whose storage is a ``<compositestorage>``
  is taken; if there are several, ``--database NAME`` names one: the
  section name of ``<zodb_db NAME>``, ``<zodb NAME>`` or, in a zeo.conf,
  ``<compositestorage NAME>``;
- ``zconfig://PATH#NAME``: the same as ``PATH --database NAME``;
- ``composite:...``: the partitions written out as a URI;
- ``zeo://HOST:PORT``: what a ZEO client can read or ask (``info``,
  ``verify``, ``stats``, ``pack``); the commands that open the children as
  their one writer, or copy their files, refuse it;
- any other zodburi URI (``file://``, ``memory://``): ``info`` only.

A ``zope.conf`` can only be parsed whole with Zope's schema, which needs
Zope and every product the file configures.  Its ``<zodb_db>`` sections are
therefore read on their own: the file is kept line for line (so that
errors name the right line), with every line blanked except the
``%import`` and ``%define`` directives and the chosen ``<zodb_db>``
section, which is parsed with ZODB's ``<zodb>`` schema plus Zope's three
database keys (``mount-point``, ``connection-class``,
``container-class``).  ``%include``\\ d files are not read.

No command creates a partition: a writer open first checks that every
FileStorage child's file exists, and names the partition whose file does
not.
"""
import contextlib
import io
import logging
import os
import re
from urllib.parse import urlsplit

import ZConfig

from compositestorage.errors import ConfigurationError
from compositestorage.config import all_sections
from compositestorage.config import make_read_only

#: The magics a FileStorage data file begins with.
FILESTORAGE_MAGICS = (b'FS21', b'FS30')

_SECTION_RE = r'^\s*<\s*%s[\s>]'
_SCHEME_RE = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*):')
_ZODB_DB_RE = re.compile(r'^\s*<\s*zodb_db(?:\s+([^\s>]+))?\s*>', re.I)
_ZODB_DB_END_RE = re.compile(r'^\s*<\s*/\s*zodb_db\s*>', re.I)
_DIRECTIVE_RE = re.compile(r'^\s*%\s*(import|define)\b', re.I)

#: ZODB's ``<zodb>`` section with the keys Zope's ``<zodb_db>`` adds.
ZOPE_SCHEMA = """\
<schema>
  <import package="ZODB"/>
  <sectiontype name="zodb_db" datatype="ZODB.config.ZODBDatabase"
               implements="ZODB.database" extends="zodb">
    <multikey name="mount-point" attribute="mount_points"/>
    <key name="connection-class"/>
    <key name="container-class"/>
  </sectiontype>
  <multisection type="ZODB.database" name="+" attribute="databases"/>
</schema>
"""


class TargetError(ConfigurationError):
    """A config or URI that a command cannot take, and what to give."""


# --- reading a config file ----------------------------------------------------

def read_config(path):
    """The text of the ZConfig file ``path``; refuses what is no config."""
    if os.path.isdir(path):
        raise TargetError('%s is a folder: give a ZConfig file or a URI'
                          % path)
    if not os.path.isfile(path):
        raise TargetError(
            'no such file: %s (give a ZConfig file, or a URI such as '
            'zconfig://PATH, composite:... or zeo://HOST:PORT)' % path)
    with open(path, 'rb') as f:
        raw = f.read()
    if raw[:4] in FILESTORAGE_MAGICS:
        raise TargetError(
            '%s is a FileStorage data file, not a config: give the config '
            'file (zeo.conf, zope.conf or one with a <compositestorage> '
            'section) that names it' % path)
    try:
        return raw.decode('utf-8')
    except UnicodeDecodeError:
        raise TargetError('%s is not a text file: give a ZConfig file '
                          '(zeo.conf, zope.conf or one with a '
                          '<compositestorage> section)' % path)


def config_kind(text):
    """``'zeo'``, ``'zope'``, ``'zodb'`` or ``'storage'``: what a config
    file's text configures."""
    for kind, section in (('zeo', 'zeo'), ('zope', 'zodb_db'),
                          ('zodb', 'zodb')):
        if re.search(_SECTION_RE % section, text, re.I | re.M):
            return kind
    return 'storage'


KIND_NAMES = {'zeo': 'a zeo.conf', 'zope': 'a zope.conf',
              'zodb': 'a ZODB config (<zodb>)',
              'storage': 'a storage config'}


def _zeo_schema():
    import ZEO
    return ZConfig.loadSchema(
        os.path.join(os.path.dirname(ZEO.__file__), 'schema.xml'))


def _load(schema, path, text=None):
    try:
        if text is None:
            return ZConfig.loadConfig(schema, path)[0]
        return ZConfig.loadConfigFile(schema, io.StringIO(text), path)[0]
    except ZConfig.ConfigurationError as e:
        raise TargetError('%s: %s' % (path, ' '.join(str(e).split())))


def zope_databases(text):
    """``[(name, first line, last line)]`` of the ``<zodb_db>`` sections
    of a zope.conf, found by their lines (line numbers from 0)."""
    found, start, name = [], None, None
    for number, line in enumerate(text.splitlines()):
        if start is None:
            m = _ZODB_DB_RE.match(line)
            if m:
                start, name = number, (m.group(1) or '').lower()
        elif _ZODB_DB_END_RE.match(line):
            found.append((name, start, number))
            start = None
    return found


def zope_database_text(text, first, last):
    """The zope.conf ``text`` with every line blanked but its ``%import``
    and ``%define`` directives and lines ``first`` to ``last``."""
    lines = text.splitlines()
    return '\n'.join(
        line if first <= number <= last or _DIRECTIVE_RE.match(line)
        else '' for number, line in enumerate(lines)) + '\n'


def _is_composite(opener):
    from compositestorage.config import CompositeStorageConfig
    return isinstance(opener, CompositeStorageConfig)


def _candidates(path, text, kind):
    """``[(name, storage opener)]`` that the file configures."""
    import ZODB.config
    if kind == 'zeo':
        config = _load(_zeo_schema(), path)
        return [(s.name, s) for s in config.storages or ()]
    if kind == 'zodb':
        config = _load(ZODB.config.getDbSchema(), path)
        return [(d.name, d.config.storage) for d in config.database or ()]
    if kind == 'storage':
        config = _load(ZODB.config.getStorageSchema(), path)
        return [(config.storage.name, config.storage)] \
            if config.storage is not None else []
    raise AssertionError(kind)


def storage_opener(path, database=None, composite=True):
    """The storage opener (``ZODB.config`` style, nothing opened yet) of
    the database the config file ``path`` configures: the one named
    ``database``, else its composite.  ``composite=False`` (``info``)
    takes the first storage of a file that configures no composite."""
    text = read_config(path)
    kind = config_kind(text)
    if kind == 'zope':
        sections = zope_databases(text)
        names = [name for name, _, _ in sections]
        if database is not None:
            chosen = [s for s in sections if s[0] == database.lower()]
        else:
            chosen = [s for s in sections if re.search(
                _SECTION_RE % 'compositestorage',
                '\n'.join(text.splitlines()[s[1]:s[2] + 1]), re.I | re.M)]
            if not chosen and not composite:
                chosen = sections[:1]
        found = []
        for name, first, last in chosen:
            schema = ZConfig.loadSchemaFile(io.StringIO(ZOPE_SCHEMA))
            config = _load(schema, path,
                           zope_database_text(text, first, last))
            found.extend((d.name, d.config.storage)
                         for d in config.databases)
        return _choose(path, kind, names, found, database, composite)
    found = _candidates(path, text, kind)
    names = [name for name, _ in found]
    if database is not None:
        found = [(n, o) for n, o in found
                 if (n or '').lower() == database.lower()]
    return _choose(path, kind, names, found, database, composite)


def _choose(path, kind, names, found, database, composite):
    listed = ', '.join(repr(n) for n in names if n) or 'none named'
    if database is not None and not found:
        raise TargetError('%s (%s) configures no database named %r (it '
                          'has %s)' % (path, KIND_NAMES[kind], database,
                                       listed))
    composites = [(n, o) for n, o in found if _is_composite(o)]
    if database is None and len(composites) > 1:
        raise TargetError(
            '%s configures several composites (%s): name one with '
            '--database NAME' % (path, ', '.join(repr(n) for n, _ in
                                                 composites)))
    if composites:
        return composites[0][1]
    if found and (database is not None or not composite):
        return found[0][1]
    raise TargetError(
        '%s (%s) configures no <compositestorage> (databases: %s): give '
        'a config whose storage is a <compositestorage> section, after '
        '"%%import compositestorage"' % (path, KIND_NAMES[kind], listed))


# --- the sections of a parsed config ----------------------------------------------

def drop_blob_dirs(opener):
    """Open without blob directories: the read-only commands read no
    blob, and a FileStorage creates its blob directory even when
    read-only."""
    for section in all_sections(opener):
        if getattr(section, 'blob_dir', None):
            section.blob_dir = None


def _filestorage_path(section):
    """The path of a ``<filestorage>`` section, else ``None``."""
    get_type = getattr(section, 'getSectionType', None)
    if get_type is not None and get_type() == 'filestorage':
        return section.path
    return None


def missing_partition_files(opener):
    """``[(partition name, path)]`` of the FileStorage children of a
    parsed ``<compositestorage>`` whose file does not exist."""
    missing = []
    for part in opener.config.partitions:
        for section in all_sections(part.storage):
            path = _filestorage_path(section)
            if path and not os.path.exists(path):
                missing.append((part.name, path))
    return missing


def refuse_missing(missing, what, target):
    if missing:
        raise TargetError(
            '%s: %s; %s opens existing partitions and never creates one: '
            'run it where the config\'s relative paths start, or fix the '
            'path' % (target, '; '.join(
                'partition %r has no file %s' % (name, path)
                for name, path in missing), what))


# --- URIs -----------------------------------------------------------------------

def uri_scheme(target):
    m = _SCHEME_RE.match(target)
    return m.group(1).lower() if m and not os.path.exists(target) else None


def uri_schemes():
    from importlib.metadata import entry_points
    return sorted({ep.name for ep in entry_points(group='zodburi.resolvers')})


def zconfig_target(uri):
    """``(path, name or None)`` of a ``zconfig://PATH#NAME`` URI."""
    parts = urlsplit(uri)
    if parts.netloc:
        raise TargetError(
            '%s: write zconfig:///ABSOLUTE/PATH (three slashes), or give '
            'the path of the config itself' % uri)
    return os.path.normpath(parts.path), parts.fragment or None


def _with_query(uri, key, value):
    """``uri`` with ``key=value`` in its query (replacing any given)."""
    base, hash_, frag = uri.partition('#')
    path, q, query = base.partition('?')
    pairs = [p for p in query.split('&')
             if p and p.split('=', 1)[0] != key]
    pairs.append('%s=%s' % (key, value))
    return path + '?' + '&'.join(pairs) + hash_ + frag


def _has_query(uri, key):
    query = uri.partition('#')[0].partition('?')[2]
    return any(p.split('=', 1)[0] == key for p in query.split('&'))


def read_only_uri(uri):
    """``uri`` spelled so that its resolver opens it read-only.

    ``file:`` and ``zeo:`` get ``read_only=1`` in their query, as
    zodburi's resolvers spell it (``zeo:`` also a ``wait_timeout``, so that
    a missing server is reported rather than waited for); a ``composite:``
    URI gets ``read_only=true`` and each of its child URIs is made
    read-only in turn, so that no child file is locked or created.
    Other schemes are returned unchanged.
    """
    scheme = _SCHEME_RE.match(uri)
    scheme = scheme.group(1).lower() if scheme else None
    if scheme == 'composite':
        from urllib.parse import parse_qsl

        from compositestorage import uri as composite_uri
        parts, query = composite_uri.parse_uri(uri)
        options = dict(parse_qsl(query, keep_blank_values=True))
        options['read_only'] = True
        return composite_uri.format_uri(
            [(name, prefix, read_only_uri(child))
             for name, prefix, child in parts], **options)
    if scheme in ('file', 'zeo'):
        uri = _with_query(uri, 'read_only', '1')
    if scheme == 'zeo' and not _has_query(uri, 'wait_timeout'):
        uri = _with_query(uri, 'wait_timeout', '10')
    return uri


def resolve(uri, read_only=True):
    """The storage factory of a zodburi ``uri``; errors in one line."""
    import zodburi
    scheme = uri_scheme(uri)
    known = uri_schemes()
    if scheme not in known:
        raise TargetError('unknown URI scheme %r in %s (known schemes: %s); '
                          'for a ZConfig file give its path'
                          % (scheme, uri, ', '.join(known)))
    try:
        factory, _dbkw = zodburi.resolve_uri(
            read_only_uri(uri) if read_only else uri)
    except zodburi.UnknownDatabaseKeywords as e:
        raise TargetError('%s: %s' % (uri, e.args[0]))
    except ImportError as e:
        raise TargetError('the resolver for %r URIs cannot be loaded: %s'
                          % (scheme, e))
    return factory


def missing_uri_files(uri):
    """``[(partition name, path)]`` of the ``file://`` (or ``zconfig://``
    FileStorage) children of a ``composite:`` URI whose file is missing."""
    from compositestorage.uri import parse_uri
    missing = []
    for name, _, child in parse_uri(uri)[0]:
        scheme = _SCHEME_RE.match(child)
        scheme = scheme.group(1).lower() if scheme else None
        if scheme == 'file':
            path = urlsplit(child).path
            if path and not os.path.exists(path):
                missing.append((name, path))
        elif scheme == 'zconfig':
            path, section = zconfig_target(child)
            for item in _zconfig_storages(path):
                if section is None or item.name == section:
                    for found in all_sections(item):
                        fs_path = _filestorage_path(found)
                        if fs_path and not os.path.exists(fs_path):
                            missing.append((name, fs_path))
                    break
    return missing


#: The schema zodburi's ``zconfig:`` resolver reads a file with.
ZCONFIG_URI_SCHEMA = """\
<schema>
  <import package="ZODB"/>
  <multisection type="ZODB.storage" attribute="storages" />
  <multisection type="ZODB.database" attribute="databases" />
</schema>
"""


def _zconfig_storages(path):
    """The storage openers of a file a ``zconfig://`` child names."""
    config = _load(ZConfig.loadSchemaFile(io.StringIO(ZCONFIG_URI_SCHEMA)),
                   path, read_config(path))
    return list(config.storages) + [d.config.storage
                                    for d in config.databases]


def served_client(target):
    """A read-only ZEO client for a ``zeo://`` target, else ``None``.

    Through ZEO, ``verify`` and ``stats`` read what any client reads and
    open nothing behind the server's back.
    """
    if uri_scheme(target) != 'zeo':
        return None
    from ZEO.Exceptions import ClientDisconnected
    try:
        client = resolve(target)()
    except ClientDisconnected as e:
        raise TargetError('cannot reach the ZEO server of %s: %s'
                          % (target, e))
    served = ('compositestorage.interfaces', 'ICompositeStorage')
    if served not in client._info.get('interfaces', ()):
        client.close()
        raise TargetError('the server at %s does not serve a composite'
                          % target)
    return client


# --- opening ----------------------------------------------------------------------

class _StaleIndexIsNews(logging.Filter):
    """FileStorage's ``Ignoring index for ...`` at INFO, not WARNING.

    A read-only open beside a live server finds the ``.index`` file out of
    date (the server writes it when it closes, and it is never sane for
    an empty file) and builds the index from the data file instead, as it
    must: nothing is wrong, and the ``.index`` is the server's to write.
    """

    def filter(self, record):
        if record.msg == 'Ignoring index for %s':
            record.levelno, record.levelname = logging.INFO, 'INFO'
        return True


@contextlib.contextmanager
def stale_index_is_news():
    logger = logging.getLogger('ZODB.FileStorage')
    quiet = _StaleIndexIsNews()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def open_read_only(target, database=None, composite=False):
    """Open ``target`` (see the module's rule) read-only."""
    scheme = uri_scheme(target)
    with stale_index_is_news():
        if scheme is None or scheme == 'zconfig':
            path = target
            if scheme == 'zconfig':
                path, database = zconfig_target(target)
            opener = storage_opener(path, database, composite)
            make_read_only(opener)
            drop_blob_dirs(opener)
            storage = opener.open()
        else:
            if database is not None:
                raise TargetError('--database names a database of a config '
                                  'file, not of %s' % target)
            from ZEO.Exceptions import ClientDisconnected
            try:
                storage = resolve(target)()
            except ClientDisconnected as e:
                raise TargetError('cannot reach the ZEO server of %s: %s'
                                  % (target, e))
    if not storage.isReadOnly():
        storage.close()
        raise TargetError('%s did not open read-only (a %s); this command '
                          'does not open storages for writing'
                          % (target, type(storage).__name__))
    return storage


def open_writer(target, database=None, what='this command'):
    """Open the composite ``target`` names as its one writer, here.

    Only a config file, ``zconfig://`` or ``composite:`` names children
    that can be opened here; every FileStorage child's file must exist.
    """
    scheme = uri_scheme(target)
    if scheme is None or scheme == 'zconfig':
        path = target
        if scheme == 'zconfig':
            path, database = zconfig_target(target)
        opener = storage_opener(path, database)
        refuse_missing(missing_partition_files(opener), what, target)
        return opener.open()
    if scheme == 'composite':
        if database is not None:
            raise TargetError('--database names a database of a config '
                              'file, not of %s' % target)
        refuse_missing(missing_uri_files(target), what, target)
        return resolve(target, read_only=False)()
    raise TargetError(
        '%s opens the children of a composite itself, as their one writer: '
        'give its config file (zeo.conf, zope.conf, ...), zconfig://PATH or '
        'a composite: URI, not %s' % (what, target))


@contextlib.contextmanager
def opened_composite(target, database=None, read_only=True,
                     what='this command'):
    """The composite ``target`` names, opened here and closed afterwards:
    read-only, or as its one writer (see :func:`open_writer`)."""
    from compositestorage.storage import CompositeStorage
    if read_only:
        storage = open_read_only(target, database, composite=True)
    else:
        storage = open_writer(target, database, what)
    try:
        if not isinstance(storage, CompositeStorage):
            raise TargetError('%s opens a %s, not a composite'
                              % (target, type(storage).__name__))
        yield storage
    finally:
        storage.close()
