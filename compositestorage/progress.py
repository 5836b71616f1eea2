"""Progress of the long-running commands, shown on stderr.

On a terminal, a tqdm bar: a percentage, a count and a rate.  Anywhere
else (a log, a pipe, cron), one plain line every few seconds, so that a
log still tells how far a pack got and how fast it went.  ``--quiet``
shows nothing.  Progress never goes to stdout, where ``--json`` writes.
"""
import sys
import time

try:
    from tqdm import tqdm
except ImportError:     # pragma: no cover - tqdm is a dependency
    tqdm = None


class Quiet:
    """Progress that shows nothing."""

    def update(self, n=1):
        pass

    def close(self):
        pass


def quiet(desc, total, unit='objects'):
    """The progress factory that shows nothing."""
    return Quiet()


class Plain:
    """A plain line every ``every`` seconds, and one at the end."""

    def __init__(self, desc, total, out, unit, every=5.0):
        self.desc = desc
        self.total = total
        self.out = out
        self.unit = unit
        self.every = every
        self.n = 0
        self.started = self._last = time.monotonic()

    def update(self, n=1):
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._show(now)

    def _show(self, now, end=''):
        elapsed = now - self.started
        rate = self.n / elapsed if elapsed > 0 else 0.0
        if self.total:
            done = '%d/%d %s (%d%%)' % (self.n, self.total, self.unit,
                                        min(100, 100 * self.n // self.total))
        else:
            done = '%d %s' % (self.n, self.unit)
        print('%s: %s, %.0f %s/s, %.1f s%s' % (
            self.desc, done, rate, self.unit, elapsed, end),
            file=self.out, flush=True)

    def close(self):
        """The last line: ``done`` only when the work ran to its end.

        ``total`` is often an estimate (a child's record count, which
        includes records the work steps over), so a finished run shows
        what it did as 100%; a run stopped by an exception (Ctrl-C, say:
        ``close`` is called from a ``finally``) shows where it stopped.
        """
        if not (self.n or self.total):
            return
        stopped = interrupted()
        if stopped is None:
            self.total = self.n
            self._show(time.monotonic(), ', done')
        else:
            self._show(time.monotonic(), ', stopped (%s)' % stopped)


def interrupted():
    """The name of the exception that is ending the work, or ``None``:
    progress objects are closed in ``finally`` clauses."""
    exc = sys.exc_info()[0]
    if exc is None:
        return None
    return 'interrupted' if issubclass(exc, KeyboardInterrupt) \
        else exc.__name__


class Bar:
    """A tqdm bar that ends at 100% only when the work ran to its end."""

    def __init__(self, bar):
        self.bar = bar

    def update(self, n=1):
        self.bar.update(n)

    def close(self):
        stopped = interrupted()
        if stopped is None:
            self.bar.total = self.bar.n
        else:
            self.bar.set_postfix_str('stopped (%s)' % stopped)
        self.bar.refresh()
        self.bar.close()


def reporter(out=None, quiet=False):
    """A factory ``show(desc, total, unit='objects')`` of progress objects.

    ``out`` defaults to stderr.  ``total`` may be ``None`` or an estimate.
    """
    out = sys.stderr if out is None else out

    def show(desc, total, unit='objects'):
        if quiet:
            return Quiet()
        isatty = getattr(out, 'isatty', lambda: False)
        if tqdm is not None and isatty():
            return Bar(tqdm(desc=desc, total=total, unit=' ' + unit,
                            file=out, unit_scale=True, dynamic_ncols=True,
                            leave=True))
        return Plain(desc, total, out, unit)
    return show
