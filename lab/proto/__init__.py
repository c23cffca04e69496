"""The messages the mesh's components exchange, as the real ones are defined in protobuf.

`xds` is Delta xDS as istiod pushes it to ztunnel and the waypoint (istio/ztunnel
`proto/workload.proto`, `proto/authorization.proto`; istiod's `pilot/pkg/xds`); `zds` is the
"ztunnel discovery service" between the istio-cni node agent and ztunnel (istio/ztunnel
`proto/zds.proto`, istio/istio `pkg/zdsapi`). The lab encodes them as JSON so a learner can read
them on the wire; their fields keep the real names.
"""
