"""Built-in stand-in apps: what runs in a pod instead of its container image.

A real cluster pulls ``registry.istio.io/release/examples-bookinfo-reviews-v2:1.20.3`` and runs
it. The lab has no container runtime: the kubelet part of the supervisor maps each container
image to one of the apps below and runs it as an ordinary process inside the pod's network
namespace (``ip netns exec <pod> python -m lab.apps reviews --version v2 ...``). The apps answer
on the same ports with the same paths and the same JSON as the real images, so the manifests of
Istio's samples work unchanged and the traffic between pods is the traffic ztunnel carries in a
real cluster.

This module is the registry (image name -> app). It is imported by every app process, so it
imports nothing.
"""

from __future__ import annotations

# App name -> module in this package that implements it (``main(options) -> exit code``).
APP_MODULES: dict[str, str] = {
    "productpage": "productpage",
    "details": "details",
    "reviews": "reviews",
    "ratings": "ratings",
    "httpbin": "httpbin",
    "tcp-echo": "tcp_echo",
    "echo": "echo",
    "idle": "idle",
}

# The process name an app shows in `ps` and `ss -p`, where it is not the app's own name: the curl
# and sleep images run `sleep` (their manifests say `command: ["/bin/sleep", "infinity"]`).
PROCESS_NAMES: dict[str, str] = {"idle": "sleep"}


def process_name(app: str) -> str:
    """What `ps -o comm` shows for the app's process, as for the real image's entrypoint."""
    return PROCESS_NAMES.get(app, app)


# Ports an app listens on when the pod spec declares none (the images' defaults).
DEFAULT_PORTS: dict[str, tuple[int, ...]] = {
    "productpage": (9080,),
    "details": (9080,),
    "reviews": (9080,),
    "ratings": (9080,),
    "httpbin": (8080,),  # go-httpbin listens on 8080; the Service maps 8000 -> 8080
    "tcp-echo": (9000,),  # the image's CMD is ["9000", "hello"]
    "echo": (),
    "idle": (),
}

# Image-name pattern -> app. A pattern with a "/" matches the end of the repository path
# (``curlimages/curl`` matches ``docker.io/curlimages/curl:8.16.0``); one without matches the
# last path component, with or without a ``-vN`` version suffix (which becomes the version).
IMAGE_APPS: dict[str, str] = {
    "examples-bookinfo-productpage": "productpage",
    "examples-bookinfo-details": "details",
    "examples-bookinfo-reviews": "reviews",
    "examples-bookinfo-ratings": "ratings",
    "mccutchen/go-httpbin": "httpbin",
    "go-httpbin": "httpbin",
    "httpbin": "httpbin",  # older samples used kennethreitz/httpbin
    "tcp-echo-server": "tcp-echo",
    "tcp-echo": "tcp-echo",
    # curl and sleep pods run `sleep infinity`: learners exec real tools inside their netns.
    "curlimages/curl": "idle",
    "curl": "idle",
    "sleep": "idle",
    "netshoot": "idle",
    "busybox": "idle",
}


class AppOptions:
    """How the supervisor started an app: the pod it stands in for, and the container spec.

    A plain class rather than a dataclass: the ``idle`` app must start without importing
    ``dataclasses`` (and ``inspect`` behind it).
    """

    __slots__ = ("app", "pod", "namespace", "ports", "version", "listen", "args")

    def __init__(self, app: str, pod: str = "", namespace: str = "default",
                 ports: tuple[int, ...] = (), version: str = "", listen: str = "0.0.0.0",
                 args: tuple[str, ...] = ()) -> None:
        self.app = app
        self.pod = pod
        self.namespace = namespace
        self.ports = ports
        self.version = version
        self.listen = listen
        self.args = args

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"AppOptions({fields})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AppOptions) and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__)


def image_repository(image: str) -> str:
    """The repository path of an image reference, without registry host, tag or digest.

    ``registry.istio.io/release/examples-bookinfo-reviews-v2:1.20.3`` ->
    ``release/examples-bookinfo-reviews-v2``; ``curl`` -> ``curl``.
    """
    name = image.strip().split("@", 1)[0]
    parts = name.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]  # the first component is a registry host
    last = parts[-1]
    if ":" in last:
        parts[-1] = last.rsplit(":", 1)[0]  # the tag
    return "/".join(parts).lower()


def split_version(name: str) -> tuple[str, str]:
    """``examples-bookinfo-reviews-v2`` -> (``examples-bookinfo-reviews``, ``v2``)."""
    base, sep, suffix = name.rpartition("-v")
    if sep and base and suffix.isdigit():
        return base, "v" + suffix
    return name, ""


def app_for_image(image: str) -> tuple[str, dict]:
    """Which stand-in app replaces a container image, and its options (e.g. ``version``).

    Unknown images get the generic ``echo`` app, which answers on every declared port.
    """
    repository = image_repository(image)
    last = repository.rsplit("/", 1)[-1]
    base, version = split_version(last)
    for pattern, app in IMAGE_APPS.items():
        if "/" in pattern:
            if repository == pattern or repository.endswith("/" + pattern):
                return app, {}
        elif pattern == last:
            return app, {}
        elif version and pattern == base:
            return app, {"version": version}
    return "echo", {}
