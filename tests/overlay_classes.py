"""Application classes for the overlay tests (importable by name)."""
import persistent


class Page(persistent.Persistent):
    """A dict state: title in the home, hits and workflow_* in the overlay."""

    hits = 0


class Slotted(persistent.Persistent):
    """A dict-plus-slots state."""

    __slots__ = ('hits', 'title', '__dict__')


class Counter(persistent.Persistent):
    """A state that is not a dict."""

    def __init__(self, value=0):
        self.value = value

    def __getstate__(self):
        return [self.value]

    def __setstate__(self, state):
        self.value = state[0]
