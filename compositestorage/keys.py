"""Where keyed oids live in a partition, and how a key becomes one.

This module is pure: the same key gives the same answer in every process,
on every platform and Python version, with nothing asked of any storage.
:mod:`compositestorage.namespaces` builds the API on it.

A partition's oids are its prefix byte and a 7-byte suffix.  The suffix
range is split by its top bits::

    0x00.. - 0x7f..   allocated by the composite (Partition.new_oid)
    0x80.. - 0xbf..   integer keys: suffix 0x80 << 48 plus the integer
    0xc0.. - 0xdf..   hashed keys (UUIDs, DNs): 2**53 slots
    0xe0.. - 0xff..   reserved: key tables at 0xe0 00 00 00 00 XX XX,
                      the partition map at 0xff ff ff ff ff ff ff

A hashed key's home slot is 53 bits of ``hash_key`` of its canonical
text.  The low ``TABLE_BITS`` bits of a slot name the key table that
records which key holds it; a key whose home slot is taken probes
``slot + i * 2**TABLE_BITS`` (``i`` = 1, 2, ...), which stays in the same
table, so one table record always knows every key that could claim a
slot it covers.
"""
import hashlib
import uuid

from ZODB.utils import p64

from compositestorage.errors import KeyedError

#: The first suffix the allocator never hands out.
KEYED_SUFFIX = 1 << 55
#: Integer keys run from 0 to INT_KEYS - 1.
INT_KEYS = 1 << 54
HASH_BASE = 0b110 << 53
HASH_BITS = 53
HASH_MASK = (1 << HASH_BITS) - 1
TABLE_BITS = 16
TABLE_MASK = (1 << TABLE_BITS) - 1
#: The 5 bytes after the prefix that every key table's oid starts with.
TABLE_HEAD = b'\xe0\x00\x00\x00\x00'


def int_oid(prefix, n):
    """The oid of integer key ``n`` in partition ``prefix``."""
    return p64((prefix << 56) | KEYED_SUFFIX | n)


def slot_oid(prefix, slot):
    """The oid of hashed slot ``slot`` in partition ``prefix``."""
    return p64((prefix << 56) | HASH_BASE | slot)


def table_oid(prefix, slot):
    """The oid of the key table that records who holds ``slot``."""
    return bytes((prefix,)) + TABLE_HEAD + (slot & TABLE_MASK).to_bytes(
        2, 'big')


def hash_key(data):
    """64 stable bits of ``data`` (bytes): BLAKE2b, unlike ``hash()``,
    gives every process and platform the same answer.  Tests replace it
    with a weak one to force collisions."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(),
                          'big')


def home_slot(canonical):
    """The slot a canonical key text claims first."""
    return hash_key(canonical.encode('utf-8')) & HASH_MASK


def probe(slot, i):
    """The ``i``-th slot to try after ``slot``, covered by the same table."""
    return (slot + (i << TABLE_BITS)) & HASH_MASK


def canonical_key(key, namespace='?'):
    """An ``int`` key as it is, or the canonical text of a hashed key.

    A ``uuid.UUID``, or a ``str`` that parses as one, is ``'uuid:'`` and
    its lower-case hex form, so every spelling of one UUID is one key.  Any
    other ``str`` must be a distinguished name: ``'dn:'`` and
    :func:`normalize_dn` of it.
    """
    if isinstance(key, bool):
        raise KeyedError(
            'namespace %r: %r is not a key; keys are integers, UUIDs and '
            'distinguished names' % (namespace, key))
    if isinstance(key, int):
        if not 0 <= key < INT_KEYS:
            raise KeyedError(
                'namespace %r: integer key %d is out of range; integer keys '
                'run from 0 to %d (2**54 - 1): key larger or negative '
                'numbers by a UUID (uuid.uuid5) instead'
                % (namespace, key, INT_KEYS - 1))
        return key
    if isinstance(key, uuid.UUID):
        return 'uuid:' + str(key)
    if isinstance(key, str):
        try:
            return 'uuid:' + str(uuid.UUID(key))
        except ValueError:
            pass
        return 'dn:' + normalize_dn(key, namespace)
    raise KeyedError(
        'namespace %r: a key of type %s is not supported; pass an int, a '
        'uuid.UUID or a distinguished name (str)'
        % (namespace, type(key).__name__))


_ESCAPE = set(',+"\\<>;=')
_HEX = set('0123456789abcdefABCDEF')


def normalize_dn(dn, namespace='?'):
    """The canonical text of distinguished name ``dn`` (RFC 4514).

    What LDAP servers treat as the same entry comes out the same:
    attribute types are lower-cased, spaces around ``,``, ``+`` and ``=``
    are dropped, values are case-folded (``cn``, ``ou``, ``dc``, ``uid``
    and the other naming attributes match case-insensitively), escapes
    (``\\,`` and ``\\2C``) are decoded and written back one way, and the
    values of a multi-valued RDN are sorted.  Nothing else is normalized:
    attribute types are not mapped to OIDs (``cn`` and ``2.5.4.3`` differ)
    and quoted values are not parsed.  Where case matters, key by a UUID
    (``entryUUID``, ``objectGUID``) instead.
    """
    rdns = []
    avas = []
    attr = None
    chars = []          # (char, escaped) of the attribute or value so far
    pending = bytearray()   # hex escapes, decoded as UTF-8 together

    def bad(why):
        return KeyedError('namespace %r: %r is not a distinguished name '
                          '(%s); write it as attr=value,attr=value'
                          % (namespace, dn, why))

    def flush_hex():
        if pending:
            try:
                text = pending.decode('utf-8')
            except UnicodeDecodeError:
                raise bad('an escape is not UTF-8')
            chars.extend((c, True) for c in text)
            pending.clear()

    def text():
        flush_hex()
        while chars and chars[0] == (' ', False):
            chars.pop(0)
        while chars and chars[-1] == (' ', False):
            chars.pop()
        out = ''.join(c for c, _ in chars)
        chars.clear()
        return out

    def end_ava():
        nonlocal attr
        if attr is None:
            raise bad('%r has no "="' % text())
        value = text()
        avas.append('%s=%s' % (attr, _escape(value.casefold())))
        attr = None

    i = 0
    n = len(dn)
    while i < n:
        c = dn[i]
        if c == '\\':
            pair = dn[i + 1:i + 3]
            if len(pair) == 2 and all(h in _HEX for h in pair):
                pending.append(int(pair, 16))
                i += 3
                continue
            if i + 1 >= n:
                raise bad('it ends in a lone backslash')
            flush_hex()
            chars.append((dn[i + 1], True))
            i += 2
            continue
        flush_hex()
        if c == '=' and attr is None:
            attr = text().lower()
            if not attr:
                raise bad('an attribute type is empty')
        elif c == '+':
            end_ava()
        elif c in ',;':
            end_ava()
            rdns.append('+'.join(sorted(avas)))
            avas = []
        else:
            chars.append((c, False))
        i += 1
    if not dn.strip():
        raise bad('it is empty')
    end_ava()
    rdns.append('+'.join(sorted(avas)))
    return ','.join(rdns)


def _escape(value):
    out = ''.join('\\' + c if c in _ESCAPE else c for c in value)
    if out.startswith((' ', '#')):
        out = '\\' + out
    if out.endswith(' ') and not out.endswith('\\ '):
        out = out[:-1] + '\\ '
    return out
