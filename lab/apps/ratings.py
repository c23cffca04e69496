"""Bookinfo ``ratings`` (image ``examples-bookinfo-ratings-v1``, a Node.js server).

``GET /ratings/<id>`` answers ``{"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}``;
``POST /ratings/<id>`` with a JSON body replaces the ratings of that product (kept in memory);
``/health`` says it is healthy. Like the real image, ``SERVICE_VERSION`` can make it misbehave
for the fault-tolerance tasks: ``v-faulty`` (half the requests 503), ``v-delayed`` (half the
requests 7 s late), ``v-unavailable`` (503 for a minute, every other minute).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time

from lab.apps import AppOptions
from lab.apps.http import HttpServer, Request, Response, start_servers
from lab.apps.runtime import run

DEFAULT_RATINGS = {"Reviewer1": 5, "Reviewer2": 4}


def parse_int_prefix(text: str) -> int | None:
    """JavaScript's ``parseInt``: the leading digits of ``text``, or None (NaN)."""
    digits = ""
    for char in text.strip():
        if not char.isdigit() or not char.isascii():
            break
        digits += char
    return int(digits) if digits else None


class Ratings:
    """The ratings service's state: ratings posted by users, and its fault mode."""

    def __init__(self, service_version: str = "", started: float | None = None) -> None:
        self.user_ratings: dict[int, dict] = {}
        self.service_version = service_version
        self.started = time.monotonic() if started is None else started

    def ratings_of(self, product_id: int) -> dict:
        return self.user_ratings.get(product_id) or {"id": product_id,
                                                     "ratings": dict(DEFAULT_RATINGS)}

    def unavailable_now(self) -> bool:
        """v-unavailable flips between available and unavailable every 60 s."""
        return int((time.monotonic() - self.started) // 60) % 2 == 1

    async def handle(self, request: Request) -> Response:
        path = request.path
        if path == "/health":
            return Response.json({"status": "Ratings is healthy"}, compact=True)
        if not path.startswith("/ratings/"):
            return Response.text("Page Not Found\n", 404)
        product_id = parse_int_prefix(path.rsplit("/", 1)[-1])
        if product_id is None:
            return Response.json({"error": "please provide numeric product ID"}, 400,
                                 compact=True)
        if request.method == "POST":
            return self.post(product_id, request.body)
        if request.method not in ("GET", "HEAD"):
            return Response.text("Page Not Found\n", 404)
        mode = self.service_version
        if mode == "v-faulty" and random.random() <= 0.5:
            return Response.json({"error": "Service unavailable"}, 503, compact=True)
        if mode == "v-delayed" and random.random() <= 0.5:
            await asyncio.sleep(7)
        if mode in ("v-unavailable", "v-unhealthy") and self.unavailable_now():
            return Response.json({"error": "Service unavailable"}, 503, compact=True)
        return Response.json(self.ratings_of(product_id), compact=True)

    def post(self, product_id: int, body: bytes) -> Response:
        try:
            ratings = json.loads(body)
        except ValueError:
            return Response.json({"error": "please provide valid ratings JSON"}, 400,
                                 compact=True)
        self.user_ratings[product_id] = {"id": product_id, "ratings": ratings}
        return Response.json(self.ratings_of(product_id), compact=True)


def main(options: AppOptions) -> int:
    service = Ratings(os.environ.get("SERVICE_VERSION", ""))
    server = HttpServer(service.handle)
    return run(lambda: start_servers(server.serve_connection, options.listen, options.ports))
