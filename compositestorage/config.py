"""ZConfig datatypes for ``<compositestorage>`` (see component.xml).

Everything that can be checked before a child is opened is checked first,
so a bad config never opens, locks or creates a file.
"""
import os

from ZODB.config import BaseConfig

from compositestorage.errors import ConfigurationError
from compositestorage.partition import MAX_PREFIX
from compositestorage.partition import Partition
from compositestorage.storage import CompositeStorage


class PartitionSection:
    """A parsed ``<partition NAME>`` section."""

    def __init__(self, section):
        self.name = section.getSectionName()
        self.prefix = section.prefix
        self.read_only = section.read_only
        self.storage = section.storage


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
        opened = []
        try:
            for s in sections:
                opened.append(Partition(s.name, s.prefix, s.storage.open(),
                                        read_only=s.read_only))
            return CompositeStorage(
                opened, name=c.name, placement=c.placement,
                default_partition=c.default_partition,
                read_only=c.read_only, pack_gc=c.pack_gc)
        except BaseException:
            for p in opened:
                p.storage.close()
            raise


def check_sections(sections, default_partition=None):
    """Refuse a bad ``<compositestorage>`` before opening any child."""
    names = {}
    prefixes = {}
    paths = {}
    for s in sections:
        if s.storage is None:
            raise ConfigurationError(
                'partition %r has no storage section; give it exactly one '
                '(<filestorage>, <mappingstorage>, <zeoclient>, ...)'
                % s.name)
        if not 0 <= s.prefix <= MAX_PREFIX:
            raise ConfigurationError(
                'partition %r has prefix %d; prefixes run from 0 to %d'
                % (s.name, s.prefix, MAX_PREFIX))
        if s.prefix in prefixes:
            raise ConfigurationError(
                'partitions %r and %r both have prefix %d; each partition '
                'needs its own' % (prefixes[s.prefix], s.name, s.prefix))
        prefixes[s.prefix] = s.name
        names[s.name] = s
        path = getattr(getattr(s.storage, 'config', None), 'path', None)
        if path:
            path = os.path.realpath(path)
            if path in paths:
                raise ConfigurationError(
                    'partitions %r and %r both use %s; each partition needs '
                    'a storage of its own' % (paths[path], s.name, path))
            paths[path] = s.name
    if 0 not in prefixes:
        raise ConfigurationError(
            'no partition has prefix 0; exactly one partition, the primary, '
            'must have prefix 0 (configured: %s)'
            % ', '.join('%s=%d' % (s.name, s.prefix) for s in sections))
    if default_partition is not None and default_partition not in names:
        raise ConfigurationError(
            'default-partition %r is not a configured partition '
            '(configured: %s)' % (default_partition, ', '.join(names)))
