"""Bookinfo ``reviews`` v1, v2 and v3 (images ``examples-bookinfo-reviews-v1/-v2/-v3``, Java).

``GET /reviews/<id>`` answers two reviews and the name of the pod that served them
(``"podname": "reviews-v2-..."``): that name is what productpage prints, and what the
tutorial greps (``reviews-v.-``) to watch traffic shift between versions.

- v1 does not call ratings: no stars.
- v2 calls ``http://ratings:9080/ratings/<id>`` and shows black stars (10 s timeout).
- v3 calls ratings too and shows red stars (2.5 s timeout).
If ratings cannot be reached, each review carries
``"rating": {"error": "Ratings service is currently unavailable"}`` instead of stars.
"""

from __future__ import annotations

import json
import os

from lab.apps import AppOptions
from lab.apps.bookinfo import FORWARD_HEADERS, pod_name, product_id_of, upstream
from lab.apps.http import HttpServer, Request, Response, UpstreamError, forward_headers, log_line, start_servers
from lab.apps.http import request as http_request
from lab.apps.runtime import run

REVIEWS = (
    ("Reviewer1", "An extremely entertaining play by Shakespeare. The slapstick humour is "
                  "refreshing!"),
    ("Reviewer2", "Absolutely fun and entertaining. The play lacks thematic depth when compared "
                  "to other plays by Shakespeare."),
)
RATINGS_UNAVAILABLE = "Ratings service is currently unavailable"

# What each image version sets in its environment (ENABLE_RATINGS, STAR_COLOR).
VERSIONS = {"v1": (False, "black"), "v2": (True, "black"), "v3": (True, "red")}


def version_config(version: str, environ: dict[str, str] | None = None) -> tuple[bool, str]:
    """(ratings enabled, star colour) of an image version; the environment may override."""
    env = os.environ if environ is None else environ
    enabled, color = VERSIONS.get(version or "v1", VERSIONS["v1"])
    if "ENABLE_RATINGS" in env:
        enabled = env["ENABLE_RATINGS"].lower() == "true"
    return enabled, env.get("STAR_COLOR") or color


def ratings_timeout(star_color: str) -> float:
    """The real v2 (black) waits 10 s for ratings, v3 (red) 2.5 s."""
    return 10.0 if star_color == "black" else 2.5


def reviews_document(product_id: int, podname: str, clustername: str, ratings_enabled: bool,
                     star_color: str, stars: dict[str, int] | None) -> dict:
    """The JSON reviews answers. ``stars`` None means ratings could not be fetched."""
    reviews = []
    for reviewer, text in REVIEWS:
        review: dict = {"reviewer": reviewer, "text": text}
        if ratings_enabled:
            if stars is not None and isinstance(stars.get(reviewer), int):
                review["rating"] = {"stars": stars[reviewer], "color": star_color}
            else:
                review["rating"] = {"error": RATINGS_UNAVAILABLE}
        reviews.append(review)
    return {"id": str(product_id), "podname": podname, "clustername": clustername,
            "reviews": reviews}


class Reviews:
    """One reviews pod: its version, its name, and where ratings is."""

    def __init__(self, version: str, podname: str, clustername: str,
                 ratings_at: tuple[str, int]) -> None:
        self.ratings_enabled, self.star_color = version_config(version)
        self.podname = podname
        self.clustername = clustername
        self.ratings_at = ratings_at

    async def fetch_stars(self, product_id: int, request: Request) -> dict[str, int] | None:
        """Ask ratings for the stars; None (and a log line) when it fails, as the real one."""
        host, port = self.ratings_at
        try:
            answer = await http_request(
                "GET", host, port, f"/ratings/{product_id}",
                forward_headers(request.headers, FORWARD_HEADERS)
                + [("accept", "application/json")],
                timeout=ratings_timeout(self.star_color))
        except UpstreamError as exc:
            log_line(f"Error: unable to contact http://{host}:{port}/ratings got exception {exc}")
            return None
        if answer.status != 200:
            log_line(f"Error: unable to contact http://{host}:{port}/ratings got status of "
                     f"{answer.status}")
            return None
        try:
            document = json.loads(answer.body)
        except ValueError:
            return None
        ratings = document.get("ratings") if isinstance(document, dict) else None
        return ratings if isinstance(ratings, dict) else {}

    async def handle(self, request: Request) -> Response:
        path = request.path
        if path == "/health":
            return Response.json({"status": "Reviews is healthy"})
        if path.startswith("/reviews/"):
            product_id = product_id_of(path[len("/reviews/"):])
            if product_id is not None:
                stars = None
                if self.ratings_enabled:
                    stars = await self.fetch_stars(product_id, request)
                return Response.json(reviews_document(
                    product_id, self.podname, self.clustername, self.ratings_enabled,
                    self.star_color, stars))
        return Response.text("Not Found\n", 404)


def main(options: AppOptions) -> int:
    service = Reviews(options.version or "v1", pod_name(options.pod),
                      os.environ.get("CLUSTER_NAME", "null"), upstream("ratings"))
    server = HttpServer(service.handle)
    return run(lambda: start_servers(server.serve_connection, options.listen, options.ports))
