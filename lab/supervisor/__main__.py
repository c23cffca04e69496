"""`python -m lab.supervisor --name LAB ...`: the lab supervisor process (started by `ambient-lab up`)."""

import sys

from lab.supervisor.server import main

sys.exit(main())
