"""``python -m edgevlm`` = the ``edgevlm`` command."""

import sys

from edgevlm.cli import main

sys.exit(main())
