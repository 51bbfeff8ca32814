"""``python -m imdsd`` is the same as the ``imdsd`` command."""

import sys

from imdsd.cli import main

sys.exit(main())
