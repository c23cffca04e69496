"""ztunnel's xDS client (zt:src/xds/): the Delta ADS stream to istiod that fills the ProxyState.

See lab/ztunnel/xds/client.py; the wire messages are in lab/proto/xds.py.
"""

from lab.ztunnel.xds.client import XdsClient, istiod_client_context

__all__ = ["XdsClient", "istiod_client_context"]
