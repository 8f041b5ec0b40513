"""``python -m dist_mtl`` is the ``dist-mtl`` command."""

import sys

from .cli import main

sys.exit(main())
