"""`python -m lab`: the same as the `ambient-lab` command."""

import sys

from lab.cli.main import main

sys.exit(main())
