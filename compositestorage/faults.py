"""Named points of the commit protocol, recovery and pack, for fault
injection.

Tests set :data:`hook` to a callable that gets each point's name as the
code passes it, and may kill the process there (``kill -9`` of itself) or
raise.  In production the hook is ``None`` and a point costs one global
lookup.
"""

hook = None


def point(*name):
    if hook is not None:
        hook(':'.join(name))
