"""`python -m keyrelay` is the `keyrelay` command."""

import sys

from .cli import main

sys.exit(main())
