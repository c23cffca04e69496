"""`python -m lab`: the same as the `ambient-lab` command."""

import sys

from .cli import main

sys.exit(main())
