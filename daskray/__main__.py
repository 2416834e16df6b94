"""``python -m daskray``: the ``daskray`` command (see :mod:`daskray.cli`)."""

import sys

from .cli import main

sys.exit(main())
