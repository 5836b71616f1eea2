"""``python -m compositestorage``: the ``compositestorage`` tool.

See :mod:`compositestorage.cli` (``python -m compositestorage --help``).
"""
import sys

from compositestorage.cli import main


if __name__ == '__main__':
    sys.exit(main())
