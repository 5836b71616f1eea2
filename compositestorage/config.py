"""ZConfig datatypes for ``<compositestorage>`` (see component.xml).

Everything that can be checked before a child is opened is checked first,
so a bad config never opens, locks or creates a file.
"""
import os

from ZODB.config import BaseConfig

from compositestorage.errors import ConfigurationError
from compositestorage.faults import point as fault_point
from compositestorage.journal import open_children_consistently
from compositestorage.partition import check_layout
from compositestorage.partition import Partition
from compositestorage.placement import contain_every_db
from compositestorage.storage import CompositeStorage


class PartitionSection:
    """A parsed ``<partition NAME>`` section."""

    def __init__(self, section):
        self.name = section.getSectionName()
        self.prefix = section.prefix
        self.read_only = section.read_only
        self.storage = section.storage
        self.overlay_of = section.overlay_of
        self.overlay_attributes = section.overlay_attributes
        self.overlay_revalidate = section.overlay_revalidate


class CompositeStorageConfig(BaseConfig):
    """Opens the children, then the composite over them."""

    def open(self, database_name='unnamed', databases=None):
        c = self.config
        sections = list(c.partitions)
        check_sections(sections, c.default_partition)
        if c.blob_dir:
            for s in sections:
                child = getattr(s.storage, 'config', None)
                if child is not None and hasattr(child, 'blob_dir') \
                        and not child.blob_dir:
                    child.blob_dir = c.blob_dir
        path = journal_path(c.journal, sections)
        seen = None
        if c.read_only:
            # Every child read-only too: a writable FileStorage takes its
            # lock, so a read-only composite could not open beside the
            # writer, and would create missing files.
            make_read_only(sections)
            opened, seen = open_children_consistently(
                lambda: open_children(sections), close_all, path)
        else:
            opened = open_children(sections)
        try:
            storage = CompositeStorage(
                opened, name=c.name, placement=c.placement,
                default_partition=c.default_partition,
                read_only=c.read_only, pack_gc=c.pack_gc,
                journal=path, journal_seen=seen,
                overlays=overlays_of(sections), shared=shared_value(c.shared))
        except BaseException:
            close_all(opened)
            raise
        if c.containment:
            contain_every_db(storage)
        return storage


def shared_value(text):
    """The ``shared`` key: ``'auto'``, true or false."""
    value = (text or 'auto').strip().lower()
    if value == 'auto':
        return 'auto'
    if value in ('true', 'yes', 'on', '1'):
        return True
    if value in ('false', 'no', 'off', '0'):
        return False
    raise ConfigurationError(
        'shared must be auto, true or false, not %r' % text)


def overlays_of(sections):
    """``{overlay name: (base name, rules, revalidate rules or None)}``
    of the sections that say ``overlay-of``; both keys go together, and
    ``overlay-revalidate`` needs them."""
    overlays = {}
    for s in sections:
        if bool(s.overlay_of) != bool(s.overlay_attributes):
            raise ConfigurationError(
                'partition %r: overlay-of and overlay-attributes go '
                'together; give %s too' % (
                    s.name, 'overlay-attributes' if s.overlay_of
                    else 'overlay-of'))
        if s.overlay_revalidate and not s.overlay_of:
            raise ConfigurationError(
                'partition %r: overlay-revalidate names attributes of the '
                'base of an overlay, but the partition has no overlay-of; '
                'give overlay-of and overlay-attributes too' % s.name)
        if s.overlay_of:
            overlays[s.name] = (s.overlay_of.lower(), s.overlay_attributes,
                                s.overlay_revalidate)
    return overlays


def open_children(sections):
    opened = []
    try:
        for s in sections:
            opened.append(Partition(s.name, s.prefix, s.storage.open(),
                                    read_only=s.read_only))
            fault_point('opened-child', s.name)
    except BaseException:
        close_all(opened)
        raise
    return opened


def close_all(partitions):
    for p in partitions:
        p.storage.close()


def journal_path(configured, sections):
    """The configured journal, or the one beside the primary's file."""
    if configured:
        return configured
    for s in sections:
        path = getattr(getattr(s.storage, 'config', None), 'path', None)
        if s.prefix == 0 and path:
            return path + '.journal'
    return None


def check_sections(sections, default_partition=None):
    """Refuse a bad ``<compositestorage>`` before opening any child."""
    layout = []
    for s in sections:
        path = getattr(getattr(s.storage, 'config', None), 'path', None)
        key = ('file', os.path.realpath(path)) if path else None
        layout.append((s.name, s.prefix, s.storage, key))
    check_layout(layout, default_partition)
    names = {s.name for s in sections}
    for name, (base, _, _) in overlays_of(sections).items():
        if base not in names:
            raise ConfigurationError(
                'partition %r: overlay-of names %r, which is not a '
                'configured partition (configured: %s)'
                % (name, base, ', '.join(sorted(names))))


def all_sections(opener, _seen=None):
    """Every section of a parsed storage section, itself included.

    Works on the openers ``ZODB.config`` builds (``<filestorage>``,
    ``<zeoclient>``, ...) and on ``<compositestorage>`` with its
    ``<partition>`` sections: yields their ``SectionValue`` objects and
    the ``PartitionSection`` objects.
    """
    from ZConfig.matcher import SectionValue
    seen = set() if _seen is None else _seen
    if id(opener) in seen:
        return
    seen.add(id(opener))
    if isinstance(opener, (list, tuple)):
        for item in opener:
            yield from all_sections(item, seen)
    elif isinstance(opener, PartitionSection):
        yield opener
        yield from all_sections(opener.storage, seen)
    elif isinstance(opener, BaseConfig):
        yield from all_sections(opener.config, seen)
    elif isinstance(opener, SectionValue):
        yield opener
        for name, value in list(vars(opener).items()):
            if not name.startswith('_'):
                yield from all_sections(value, seen)


def make_read_only(opener):
    """Mark a parsed storage section, and every section in it, read-only,
    before anything is opened."""
    for section in all_sections(opener):
        if hasattr(section, 'read_only'):
            section.read_only = True
