"""``python -m embq``: the ``embq`` command."""

import sys

from embq.worker.cli import main

sys.exit(main())
