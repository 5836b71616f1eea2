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
        if self.n or self.total:
            self._show(time.monotonic(), ', done')


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
            return tqdm(desc=desc, total=total, unit=' ' + unit, file=out,
                        unit_scale=True, dynamic_ncols=True, leave=True)
        return Plain(desc, total, out, unit)
    return show
