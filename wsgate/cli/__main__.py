"""``python -m wsgate.cli``: the ``wsgate`` command without the console script."""

import sys

from wsgate.cli import main

sys.exit(main())
