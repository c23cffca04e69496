"""Bookinfo ``details`` (image ``examples-bookinfo-details-v1``, a Ruby WEBrick server).

``GET /details/<id>`` answers the book's details as compact JSON; ``/health`` says it is
healthy. It calls nothing upstream (the real one can call Google Books, off by default).
"""

from __future__ import annotations

from lab.apps import AppOptions
from lab.apps.bookinfo import product_id_of
from lab.apps.http import HttpServer, Request, Response, start_servers
from lab.apps.runtime import run


def book_details(product_id: int) -> dict:
    """The one book bookinfo knows, whatever the id (the real service does the same)."""
    return {
        "id": product_id,
        "author": "William Shakespeare",
        "year": 1595,
        "type": "paperback",
        "pages": 200,
        "publisher": "PublisherA",
        "language": "English",
        "ISBN-10": "1234567890",
        "ISBN-13": "123-1234567890",
    }


async def handle(request: Request) -> Response:
    path = request.path
    if path == "/health":
        return Response.json({"status": "Details is healthy"}, compact=True)
    if path == "/details" or path.startswith("/details/"):
        product_id = product_id_of(path.rstrip("/").rsplit("/", 1)[-1])
        if product_id is None:
            return Response.json({"error": "please provide numeric product id"}, 400,
                                 compact=True)
        return Response.json(book_details(product_id), compact=True)
    return Response.html(f"<html><body><h1>Not Found</h1>`{path}' not found.</body></html>", 404)


def main(options: AppOptions) -> int:
    server = HttpServer(handle)
    return run(lambda: start_servers(server.serve_connection, options.listen, options.ports))
