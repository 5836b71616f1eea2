"""A zodburi resolver for composite storages: ``composite:`` URIs.

Grammar::

    composite:(PRIMARY_URI)/NAME=PREFIX:(CHILD_URI)/NAME=PREFIX:(CHILD_URI)...[?QUERY]

- Each part is ``NAME=PREFIX:(URI)``: a partition name, its prefix as a
  decimal integer and, in parentheses, the zodburi URI of its child storage.
  Parts are separated by ``/``.
- The first part may be written without a label, ``(URI)``: it is then the
  primary, named ``main``, with prefix 0.  It may also be written
  ``main=0:(URI)`` or ``NAME=0:(URI)``.  Only the first part may go without
  a label; labelled parts may come in any order, and exactly one has
  prefix 0.
- ``NAME`` is made of letters, digits, ``_``, ``.`` and ``-``, and is
  lower-cased, as ZConfig lower-cases section names, so a URI and a
  ``<compositestorage>`` config name the same partitions alike.  ``PREFIX``
  runs from 0 to 127 (checked by :func:`compositestorage.partition.check_layout`).
- A child URI is any URI zodburi resolves (``file://``, ``memory://``,
  ``zeo://``, ``zconfig://``, ``demo:``...), with its own ``?query``.
  Parentheses are matched by depth, so a child URI may contain balanced
  parentheses, a nested ``demo:(...)/(...)`` or a nested ``composite:``.
  A child URI must not carry database keywords: they belong to the
  composite's query.
- ``?QUERY``, after the last part, holds the composite's own options and
  the database keywords:

  ``placement``
      ``default`` (the default) or ``round-robin``.
  ``default_partition``
      The partition new objects go to (lower-cased like names); the one with
      prefix 0 if unset.
  ``name``
      The storage name (``getName()``).
  ``read_only``, ``pack_gc``, ``containment``
      Booleans: ``true``/``false``, ``1``/``0``, ``yes``/``no``,
      ``on``/``off``.  ``read_only`` and ``containment`` default to false,
      ``pack_gc`` to true.  A read-only composite opens every child read-only: ``file:`` and
      ``zeo:`` children get ``read_only=1``, nested ``composite:`` children
      ``read_only=true`` and ``zconfig:`` children every section marked
      read-only; other schemes open as their URI says.
  ``database_name``, ``connection_cache_size``, ``connection_pool_size``, ...
      zodburi's database keywords (``zodburi.PARAMETERS``), returned as the
      resolver's ``dbkw``.

Example::

    composite:(file:///var/main.fs)/catalog=1:(file:///var/catalog.fs)?placement=default

Everything that can be checked without opening a child is checked when the
URI is resolved: the syntax, the option values, each child URI (by its own
resolver) and the partition layout.  So a bad URI never opens, locks or
creates a file.  Errors are :class:`CompositeURIError`, a
:class:`compositestorage.ConfigurationError` (and ``ValueError``), with a
one-line message naming the offending part or key.
"""
import os
import re
from urllib.parse import parse_qsl
from urllib.parse import quote

import zodburi
from ZODB.config import BaseConfig
from zodburi.resolvers import Resolver

from compositestorage.config import make_read_only
from compositestorage.errors import ConfigurationError
from compositestorage.faults import point as fault_point
from compositestorage.journal import open_children_consistently
from compositestorage.partition import check_layout
from compositestorage.placement import POLICIES
from compositestorage.placement import contain_every_db
from compositestorage.storage import CompositeStorage

try:
    from zodburi import _get_uri_factory_and_dbkw as _resolve_child
except ImportError:  # pragma: no cover - zodburi < 3
    from zodburi import _resolve_uri as _resolve_child

SCHEME = 'composite:'
PRIMARY = ('main', 0)

_NAME_RE = re.compile(r'[A-Za-z0-9_.-]+\Z')
_PREFIX_RE = re.compile(r'-?[0-9]+\Z', re.ASCII)
_LABEL_RE = re.compile(r'(?P<name>[^=]*)=(?P<prefix>[^=]*):\Z', re.DOTALL)

_BOOLEANS = {
    'true': True, 'yes': True, 'on': True, '1': True,
    'false': False, 'no': False, 'off': False, '0': False,
}

#: Child schemes refused, and why.
UNSUPPORTED = {
    'demo': 'a DemoStorage cannot list its records, which verify, stats '
            'and the global mark of a pack read',
}

#: The composite's own query keys, beside zodburi's database keywords.
OPTIONS = ('placement', 'default_partition', 'name', 'read_only', 'pack_gc',
           'containment')
_BOOLEAN_OPTIONS = ('read_only', 'pack_gc', 'containment')
_KNOWN = ('the query takes %s and zodburi\'s database keywords '
          '(database_name, connection_cache_size, connection_pool_size, ...)'
          % ', '.join(OPTIONS))


class CompositeURIError(ConfigurationError):
    """A ``composite:`` URI that cannot be resolved."""


def _error(message):
    # One line, whatever the URI holds.
    return CompositeURIError(' '.join(str(message).split()))


class _OptionSplitter(Resolver):
    """zodburi's own helper splits the composite's options from dbkw."""
    _string_args = OPTIONS


# --- parsing --------------------------------------------------------------------

def _describe(index, text):
    return 'part %d %r' % (index, text)


def parse_uri(uri):
    """Split a ``composite:`` URI into parts and a query.

    Returns ``([(name, prefix, child_uri), ...], query)``, where ``query``
    is the raw text after ``?`` (or ``''``).  Checks only the syntax.
    """
    parts, query = _split(uri)
    return [part[:3] for part in parts], query


def _split(uri):
    """:func:`parse_uri`, with each part's text kept for messages."""
    if not isinstance(uri, str) or not uri.startswith(SCHEME):
        raise _error('not a composite URI: %r; composite URIs start with %r'
                     % (uri, SCHEME))
    s = uri[len(SCHEME):]
    parts = []
    query = ''
    pos = 0
    index = 1
    while True:
        start = pos
        open_at = s.find('(', pos)
        # A part ends at the ')' matching its first '('.
        if open_at == -1:
            text = s[start:].split('?', 1)[0]
            if not text:
                raise _error(
                    'part %d is empty: every "/" must be followed by '
                    'NAME=PREFIX:(URI)' % index if parts else
                    'no parts: write composite:(PRIMARY_URI)'
                    '/NAME=PREFIX:(CHILD_URI)...')
            if ')' in text:
                raise _error('unbalanced parentheses: %s has a ")" without '
                             'a matching "("' % _describe(index, text))
            raise _error('%s has no (URI): write NAME=PREFIX:(URI)'
                         % _describe(index, text))
        label = s[start:open_at]
        depth = 0
        close_at = None
        for i in range(open_at, len(s)):
            c = s[i]
            if c == '(':
                depth += 1
            elif c == ')':
                depth -= 1
                if depth == 0:
                    close_at = i
                    break
        if close_at is None:
            raise _error('unbalanced parentheses: %s opens a "(" that is '
                         'never closed' % _describe(index, s[start:]))
        text = s[start:close_at + 1]
        if ')' in label:
            raise _error('unbalanced parentheses: %s has a ")" without a '
                         'matching "("' % _describe(index, text))
        child = s[open_at + 1:close_at]
        name, prefix = _parse_label(index, label, text)
        if not child.strip():
            raise _error('%s has an empty child URI' % _describe(index, text))
        parts.append((name, prefix, child, text))
        pos = close_at + 1
        if pos == len(s):
            break
        c = s[pos]
        if c == '/':
            pos += 1
            index += 1
            continue
        if c == '?':
            query = s[pos + 1:]
            if ':(' in query:
                raise _error(
                    'the query %r holds a part: parts go before the '
                    '"?", the composite\'s query after the last part'
                    % query)
            break
        if c == ')':
            raise _error('unbalanced parentheses: a ")" follows %s without '
                         'a matching "("' % _describe(index, text))
        raise _error('unexpected %r after %s: separate parts with "/" and '
                     'start the query with "?"' % (s[pos:], _describe(
                         index, text)))
    return parts, query


def _parse_label(index, label, text):
    """``(name, prefix)`` of a part's ``NAME=PREFIX:`` label."""
    if not label:
        if index == 1:
            return PRIMARY
        raise _error('%s has no NAME=PREFIX: label; only the first part, '
                     'the primary, may be written as a bare (URI)'
                     % _describe(index, text))
    m = _LABEL_RE.match(label)
    if m is None:
        raise _error('%s has no NAME=PREFIX: label; write NAME=PREFIX:(URI), '
                     'for example catalog=1:(file:///var/catalog.fs)'
                     % _describe(index, text))
    name, prefix = m.group('name', 'prefix')
    if not _NAME_RE.match(name):
        raise _error('%s has the name %r; names are made of letters, '
                     'digits, "_", "." and "-"'
                     % (_describe(index, text), name))
    if not _PREFIX_RE.match(prefix):
        raise _error('%s has the prefix %r, which is not an integer; '
                     'prefixes are decimal integers from 0 to 127'
                     % (_describe(index, text), prefix))
    return name.lower(), int(prefix)


def parse_query(query):
    """``(options, dbkw)`` from the composite's query text.

    ``options`` are keyword arguments for :class:`CompositeStorage`;
    ``dbkw`` holds zodburi's database keywords as strings, as every
    zodburi resolver returns them.
    """
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise _error('the query %r is malformed: write KEY=VALUE pairs '
                     'joined by "&"' % query)
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _error('the query key %r is given twice' % key)
        seen.add(key)
    options, dbkw = _OptionSplitter().interpret_kwargs(dict(pairs))
    unknown = sorted(set(dbkw) - set(zodburi.PARAMETERS))
    if unknown:
        raise _error('unknown query key %r; %s' % (unknown[0], _KNOWN))
    try:
        zodburi._get_dbkw(dict(dbkw))
    except (ValueError, TypeError) as e:
        bad = [k for k in dbkw if not _dbkw_ok(k, dbkw[k])]
        raise _error('the query key %r has a bad value %r (%s)' % (
            bad[0] if bad else '?', dbkw.get(bad[0]) if bad else '', e))
    for key in _BOOLEAN_OPTIONS:
        if key in options:
            value = options[key]
            try:
                options[key] = _BOOLEANS[value.lower()]
            except KeyError:
                raise _error('the query key %r is %r; use true or false'
                             % (key, value))
    if 'placement' in options and options['placement'] not in POLICIES:
        raise _error('the query key \'placement\' is %r; use one of %s'
                     % (options['placement'], ', '.join(POLICIES)))
    if 'default_partition' in options:
        options['default_partition'] = options['default_partition'].lower()
    if options.get('name') == '':
        del options['name']
    return options, dbkw


def _dbkw_ok(key, value):
    try:
        zodburi._get_dbkw({key: value})
    except (ValueError, TypeError):
        return False
    return True


# --- resolving ------------------------------------------------------------------

def _child_key(child_uri):
    """What :func:`check_layout` compares to find a shared child, or None."""
    if child_uri.startswith('file://'):
        path = child_uri.split('file://', 1)[1].split('?', 1)[0]
        if path:
            return ('file', os.path.realpath(os.path.normpath(path)))
    return None


def _resolve_child_uri(index, text, child_uri, read_only=False):
    """The storage factory of one child URI, through its own resolver.

    ``read_only`` marks a ``zconfig:`` child's sections read-only.
    """
    where = _describe(index, text)
    colon = child_uri.find(':')
    scheme = child_uri[:colon]
    if colon < 1:
        raise _error('%s: the child URI %r has no scheme (file://, '
                     'memory://, zeo://, zconfig://...)' % (where, child_uri))
    if scheme in UNSUPPORTED:
        raise _error('%s: a %s: child is not supported (%s); give the '
                     'partition a file://, memory:// or zconfig:// child'
                     % (where, scheme, UNSUPPORTED[scheme]))
    try:
        factory, child_dbkw = _resolve_child(child_uri)
    except zodburi.NoResolverForScheme:
        raise _error('%s: unknown scheme %r; no zodburi resolver is '
                     'installed for it (installed: %s)' % (
                         where, scheme, ', '.join(_installed_schemes())))
    except CompositeURIError as e:
        raise _error('%s: %s' % (where, e)) from e
    except Exception as e:
        raise _error('%s: the child URI cannot be resolved: %s: %s' % (
            where, type(e).__name__, e)) from e
    if child_dbkw:
        raise _error('%s: the child URI has query keys its storage does not '
                     'use: %s; database keywords belong in the composite\'s '
                     'own query, after the last part'
                     % (where, ', '.join(sorted(child_dbkw))))
    opener = getattr(factory, '__self__', None)
    if read_only and isinstance(opener, BaseConfig):
        make_read_only(opener)
    return factory


#: The query that tells these schemes' zodburi resolvers to open read-only.
_READ_ONLY_QUERY = {'file': ('read_only', '1'), 'zeo': ('read_only', '1')}


def read_only_child_uri(child_uri):
    """``child_uri`` spelled so that its resolver opens it read-only.

    A read-only composite opens every child read-only: a writable
    FileStorage would take its lock (so the composite could not open beside
    its writer) and create a missing file.  ``file:`` and ``zeo:`` get
    ``read_only=1``, a nested ``composite:`` ``read_only=true``;
    ``zconfig:`` children are marked read-only once resolved; other
    schemes open as their URI says.
    """
    scheme = child_uri.split(':', 1)[0]
    if scheme + ':' == SCHEME:
        parts, query = parse_uri(child_uri)
        options = dict(parse_qsl(query, keep_blank_values=True))
        options['read_only'] = True
        return format_uri(parts, **options)
    if scheme not in _READ_ONLY_QUERY:
        return child_uri
    key, value = _READ_ONLY_QUERY[scheme]
    base, hash_, fragment = child_uri.partition('#')
    path, _, query = base.partition('?')
    pairs = [p for p in query.split('&') if p and p.split('=', 1)[0] != key]
    pairs.append('%s=%s' % (key, value))
    return path + '?' + '&'.join(pairs) + hash_ + fragment


def _installed_schemes():
    from importlib.metadata import entry_points
    return sorted({ep.name for ep in
                   entry_points(group='zodburi.resolvers')})


def resolve_composite(uri):
    """zodburi resolver: ``(storage_factory, dbkw)`` for a composite URI.

    ``storage_factory()`` opens every child through its own resolver's
    factory, then the :class:`CompositeStorage` over them.  If a child or
    the composite fails to open, the children already opened are closed
    and the error is re-raised.
    """
    parts, query = _split(uri)
    options, dbkw = parse_query(query)
    # The layout checks the storage makes, made before any child is opened.
    placeholder = object()
    check_layout([(name, prefix, placeholder, _child_key(child))
                  for name, prefix, child, _ in parts],
                 options.get('default_partition'))
    read_only = options.get('read_only')
    children = [
        (name, prefix, _resolve_child_uri(
            index, text, read_only_child_uri(child) if read_only else child,
            read_only))
        for index, (name, prefix, child, text) in enumerate(parts, 1)]

    def open_children():
        opened = []
        try:
            for name, prefix, open_child in children:
                opened.append((name, prefix, open_child()))
                fault_point('opened-child', name)
        except BaseException:
            close_children(opened)
            raise
        return opened

    def factory():
        if options.get('read_only'):
            primary = [child for name, prefix, child, _ in parts
                       if prefix == 0]
            key = _child_key(primary[0]) if primary else None
            opened, options['journal_seen'] = open_children_consistently(
                open_children, close_children,
                key[1] + '.journal' if key else None)
        else:
            opened = open_children()
        kw = {k: v for k, v in options.items() if k != 'containment'}
        try:
            storage = CompositeStorage(opened, **kw)
        except BaseException:
            close_children(opened)
            raise
        if options.get('containment'):
            contain_every_db(storage)
        return storage

    return factory, dbkw


def close_children(opened):
    for _, _, storage in reversed(opened):
        try:
            storage.close()
        except Exception:
            pass


# --- formatting -----------------------------------------------------------------

def _format_value(value):
    if isinstance(value, bool):
        return 'true' if value else 'false'
    return str(value)


def format_uri(parts, **options):
    """A ``composite:`` URI for ``[(name, prefix, child_uri), ...]``.

    ``options`` are the query keys (the composite's options and zodburi's
    database keywords); ``None`` values are left out.  A first part named
    ``main`` with prefix 0 is written bare, ``(URI)``.  The result resolves
    back to the same parts and options.
    """
    if not parts:
        raise _error('format_uri needs at least one part')
    out = []
    for index, (name, prefix, child_uri) in enumerate(parts, 1):
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise _error('part %d has the name %r; names are made of '
                         'letters, digits, "_", "." and "-"' % (index, name))
        if isinstance(prefix, bool) or not isinstance(prefix, int):
            raise _error('part %d (%s) has the prefix %r, which is not an '
                         'integer' % (index, name, prefix))
        if not _balanced(child_uri):
            raise _error('unbalanced parentheses: part %d (%s) has the '
                         'child URI %r' % (index, name, child_uri))
        if index == 1 and (name, prefix) == PRIMARY:
            out.append('(%s)' % child_uri)
        else:
            out.append('%s=%d:(%s)' % (name, prefix, child_uri))
    query = []
    for key, value in options.items():
        if key not in OPTIONS and key not in zodburi.PARAMETERS:
            raise _error('unknown query key %r; %s' % (key, _KNOWN))
        if value is None:
            continue
        query.append('%s=%s' % (key, quote(_format_value(value), safe='')))
    uri = SCHEME + '/'.join(out)
    if query:
        uri += '?' + '&'.join(query)
    return uri


def _balanced(text):
    depth = 0
    for c in text:
        if c == '(':
            depth += 1
        elif c == ')':
            depth -= 1
            if depth < 0:
                return False
    return depth == 0
