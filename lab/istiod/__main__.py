"""`python -m lab.istiod --lab LAB --listen IP:15012 --ca-dir DIR --tokens FILE [--workload-cert-ttl SECONDS]`

The supervisor starts it inside the control-plane node's network namespace
(`ip netns exec <lab>-control-plane python -m lab.istiod ...`), like the istiod Deployment.
"""

import sys

from lab.istiod.server import main

sys.exit(main())
