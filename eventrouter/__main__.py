"""``python -m eventrouter``: the same command line as the ``eventrouter`` script."""

import sys

from eventrouter.cli import main

if __name__ == "__main__":
    sys.exit(main())
