"""``python -m lab.ztunnel --lab LAB --node NODE --zds-socket PATH [--admin-socket PATH]``.

The entry point of the lab's ztunnel (one per node, run in the node's netns); see
:mod:`lab.ztunnel.main`.
"""

import sys

from lab.ztunnel.main import main

sys.exit(main())
