"""`python -m lab.waypoint --lab LAB --namespace NS --name GATEWAY --node NODE --pod POD --pod-ip IP
--xds-address 172.18.0.2:15012 --token-file F --root-cert R --state-dir DIR [--keylog PATH]`

The supervisor starts it inside the waypoint pod's network namespace (lab/waypoint/server.py).
"""

import sys

from lab.waypoint.server import main

sys.exit(main())
