"""``python -m tunesmith``: the same entry point as the ``tunesmith`` command."""

import sys

from tunesmith.cli import main

sys.exit(main())
