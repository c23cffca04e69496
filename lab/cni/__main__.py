"""`python -m lab.cni ...`: run the istio-cni node agent of one node (see lab/cni/nodeagent.py)."""

import sys

from lab.cni.nodeagent import main

if __name__ == "__main__":
    sys.exit(main())
