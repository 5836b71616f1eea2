"""Holding Ctrl-C back while a command changes several files that must
change together (the sweep of a pack, the swap of a restore)."""
import contextlib
import logging
import signal
import threading

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def interrupts_held_back(doing, done):
    """Hold a SIGINT back until the block ends, then raise it.

    ``doing`` is logged when the interrupt arrives (what is finished
    first); ``done`` is the message of the ``KeyboardInterrupt`` raised
    at the end.
    Only the main thread receives signals; elsewhere (a ZEO server packs
    in a thread) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []

    def note(signum, frame):
        if not caught:
            logger.warning('interrupt noted; %s', doing)
        caught.append(signum)

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt(done)
