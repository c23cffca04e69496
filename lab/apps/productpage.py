"""Bookinfo ``productpage`` (image ``examples-bookinfo-productpage-v1``, a Flask app).

``GET /productpage`` is the page of the getting-started tutorial: the app calls
``http://details:9080/details/0`` and then ``http://reviews:9080/reviews/0`` (twice if the first
attempt fails: the real app does, for the fault-injection task), each with a 3 s timeout,
copying the request's trace headers onto both calls, and renders one HTML page titled
``Simple Bookstore App`` with the details, the reviews, the stars and
``Reviews served by: reviews-v2-...``: the name of the reviews pod that answered.

If a call fails the page still renders, with "Error fetching product details" or "Error
fetching product reviews". The JSON API (``/api/v1/products...``) answers the upstream status.
"""

from __future__ import annotations

from html import escape
from urllib.parse import parse_qs, quote, unquote

from lab.apps import AppOptions
from lab.apps.bookinfo import FORWARD_HEADERS, upstream
from lab.apps.http import HttpServer, Request, Response, UpstreamError, forward_headers, log_line, start_servers
from lab.apps.http import request as http_request
from lab.apps.runtime import run

PRODUCTS = [{
    "id": 0,
    "title": "The Comedy of Errors",
    "descriptionHtml": (
        '<a href="https://en.wikipedia.org/wiki/The_Comedy_of_Errors">Wikipedia Summary</a>: '
        "The Comedy of Errors is one of <b>William Shakespeare's</b> early plays. It is his "
        "shortest and one of his most farcical comedies, with a major part of the humour coming "
        "from slapstick and mistaken identity, in addition to puns and word play."),
}]
DETAILS_UNAVAILABLE = "Sorry, product details are currently unavailable for this book."
REVIEWS_UNAVAILABLE = "Sorry, product reviews are currently unavailable for this book."
RATINGS_UNAVAILABLE = "Sorry, product ratings are currently unavailable for this book."
UPSTREAM_TIMEOUT = 3.0
USER_COOKIE = "user"
# productpage sets end-user itself, from the signed-in user; it does not copy an incoming one.
PRODUCTPAGE_FORWARDS = tuple(name for name in FORWARD_HEADERS if name != "end-user")


# ---------------------------------------------------------------- page rendering (pure)

def render_stars(rating: dict) -> str:
    """Five star glyphs, ``stars`` of them full, in the rating's colour; or the rating error."""
    stars = rating.get("stars")
    if isinstance(stars, int) and stars:
        color = escape(str(rating.get("color", "black")))
        full = '<span class="glyphicon glyphicon-star">&#9733;</span>' * stars
        empty = '<span class="glyphicon glyphicon-star-empty">&#9734;</span>' * max(0, 5 - stars)
        return f'<div class="stars" style="color: {color}">{full}{empty}</div>'
    if rating.get("error"):
        return f'<p class="rating-error" style="color: red">{escape(str(rating["error"]))}</p>'
    return ""


def render_details(status: int, details: dict) -> str:
    if status != 200:
        error = f"<p>{escape(str(details.get('error', '')))}</p>" if details else ""
        return f'<p class="error" style="color: red">Error fetching product details</p>{error}'
    rows = "".join(
        f"<tr><th>{label}</th><td>{escape(str(details.get(key, '')))}</td></tr>"
        for label, key in (("ISBN-10", "ISBN-10"), ("Publisher", "publisher"),
                           ("Pages", "pages"), ("Type", "type"), ("Language", "language")))
    return f"<h4>Book Details</h4>\n<table class=\"details\">{rows}</table>"


def render_reviews(status: int, reviews: dict) -> str:
    if status != 200:
        error = f"<p>{escape(str(reviews.get('error', '')))}</p>" if reviews else ""
        return f'<p class="error" style="color: red">Error fetching product reviews</p>{error}'
    podname = escape(str(reviews.get("podname", "")))
    cluster = str(reviews.get("clustername", "null"))
    served_by = f"Reviews served by: {podname}"
    if cluster != "null":
        served_by += f" on cluster {escape(cluster)}"
    sections = []
    for review in reviews.get("reviews", []):
        rating = review.get("rating")
        sections.append(
            "<section class=\"review\">\n"
            + (render_stars(rating) if isinstance(rating, dict) else "")
            + f"\n<blockquote><p>\"{escape(str(review.get('text', '')))}\"</p></blockquote>"
            + f"\n<div class=\"reviewer\">{escape(str(review.get('reviewer', '')))}</div>"
            + f"\n<div class=\"served-by\">{served_by}</div>\n</section>")
    return "<h4>Book Reviews</h4>\n" + "\n".join(sections)


def render_page(product: dict, details_status: int, details: dict, reviews_status: int,
                reviews: dict, user: str = "") -> str:
    """The product page: the same information as the real template, in plain HTML."""
    if user:
        account = (f'<p class="user">Signed in as {escape(user)} '
                   f'(<a href="logout">sign out</a>)</p>')
    else:
        account = ('<form method="post" action="login"><input name="username" '
                   'placeholder="User Name"> <button type="submit">Sign in</button></form>')
    return f"""<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>Simple Bookstore App</title>
</head>
<body>
<nav><a href="#">BookInfo Sample</a> {account}</nav>
<div class="product">
<h1>{escape(product["title"])}</h1>
<p>{product["descriptionHtml"]}</p>
</div>
<div class="details">
{render_details(details_status, details)}
</div>
<div class="reviews">
{render_reviews(reviews_status, reviews)}
</div>
</body>
</html>
"""


def render_index(services: dict[str, tuple[str, int]]) -> str:
    """The landing page: which services productpage calls, and links to the product page."""
    rows = "".join(f"<tr><td>{escape(name)}</td><td>http://{escape(host)}:{port}</td></tr>"
                   for name, (host, port) in services.items())
    return f"""<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>Simple Bookstore App</title>
</head>
<body>
<h3>Hello! This is a simple bookstore application consisting of three services as shown below</h3>
<table class="services"><tr><th>service</th><th>address</th></tr>{rows}</table>
<p>Click on one of the links below to auto generate a request to the backend as a real user or
a tester</p>
<p><a href="/productpage?u=normal">Normal user</a></p>
<p><a href="/productpage?u=test">Test user</a></p>
</body>
</html>
"""


def cookie_value(request: Request, name: str) -> str:
    """One cookie's value from the request's Cookie headers ('' when absent)."""
    for header in request.headers.get_all("cookie"):
        for pair in header.split(";"):
            key, _, value = pair.strip().partition("=")
            if key == name:
                return unquote(value)
    return ""


# ---------------------------------------------------------------- the service

class ProductPage:
    """The productpage service: its upstreams, and the handlers of its routes."""

    def __init__(self, details_at: tuple[str, int], reviews_at: tuple[str, int],
                 ratings_at: tuple[str, int]) -> None:
        self.details_at = details_at
        self.reviews_at = reviews_at
        self.ratings_at = ratings_at

    def outgoing_headers(self, request: Request) -> list[tuple[str, str]]:
        """Trace and session headers to copy upstream; ``end-user`` names the signed-in user."""
        headers = forward_headers(request.headers, PRODUCTPAGE_FORWARDS)
        user = cookie_value(request, USER_COOKIE)
        if user:
            headers.append(("end-user", user))
        return headers

    async def call(self, at: tuple[str, int], path: str,
                   headers: list[tuple[str, str]]) -> tuple[int, dict | list | None]:
        """GET an upstream: (200, its JSON), or (its status or 500, None) when it failed."""
        host, port = at
        try:
            answer = await http_request("GET", host, port, path, headers,
                                        timeout=UPSTREAM_TIMEOUT)
        except UpstreamError as exc:
            log_line(f"upstream call failed: {exc}")
            return 500, None
        if answer.status == 200:
            try:
                return 200, answer.json()
            except ValueError:
                return 500, None
        return answer.status, None

    async def product_details(self, product_id: str, headers) -> tuple[int, dict]:
        status, body = await self.call(self.details_at, f"/details/{product_id}", headers)
        if status == 200 and isinstance(body, dict):
            return 200, body
        return (status if status != 200 else 500), {"error": DETAILS_UNAVAILABLE}

    async def product_reviews(self, product_id: str, headers) -> tuple[int, dict]:
        status = 500
        for _attempt in range(2):  # the real app tries twice
            status, body = await self.call(self.reviews_at, f"/reviews/{product_id}", headers)
            if status == 200 and isinstance(body, dict):
                return 200, body
        return (status if status != 200 else 500), {"error": REVIEWS_UNAVAILABLE}

    async def product_ratings(self, product_id: str, headers) -> tuple[int, dict]:
        status, body = await self.call(self.ratings_at, f"/ratings/{product_id}", headers)
        if status == 200 and isinstance(body, dict):
            return 200, body
        return (status if status != 200 else 500), {"error": RATINGS_UNAVAILABLE}

    async def handle(self, request: Request) -> Response:
        path = request.path
        if path in ("/", "/index.html"):
            return Response.html(render_index({"details": self.details_at,
                                               "reviews": self.reviews_at,
                                               "ratings": self.ratings_at}))
        if path == "/health":
            return Response.html("Product page is healthy")
        if path == "/productpage":
            headers = self.outgoing_headers(request)
            details_status, details = await self.product_details("0", headers)
            reviews_status, reviews = await self.product_reviews("0", headers)
            return Response.html(render_page(PRODUCTS[0], details_status, details,
                                             reviews_status, reviews,
                                             cookie_value(request, USER_COOKIE)))
        if path == "/login" and request.method == "POST":
            user = (parse_qs(request.body.decode("utf-8", "replace")).get("username")
                    or [""])[0]
            return self.redirect_back(request, f"{USER_COOKIE}={quote(user)}; Path=/")
        if path == "/logout":
            return self.redirect_back(request, f"{USER_COOKIE}=; Path=/; Max-Age=0")
        if path == "/api/v1/products":
            return Response.json(PRODUCTS)
        parts = path.split("/")
        if len(parts) in (5, 6) and path.startswith("/api/v1/products/") and parts[4]:
            product_id = quote(unquote(parts[4]), safe="")
            headers = self.outgoing_headers(request)
            what = parts[5] if len(parts) == 6 else "details"
            fetch = {"details": self.product_details, "reviews": self.product_reviews,
                     "ratings": self.product_ratings}.get(what)
            if fetch is not None:
                status, body = await fetch(product_id, headers)
                return Response.json(body, status)
        return Response.html("<!doctype html>\n<title>404 Not Found</title>\n<h1>Not Found</h1>"
                             "\n<p>The requested URL was not found on the server.</p>\n", 404)

    @staticmethod
    def redirect_back(request: Request, cookie: str) -> Response:
        """A 302 to the page the user came from, setting the session cookie."""
        location = request.headers.get("referer") or "/productpage"
        return Response(302, f'<a href="{escape(location)}">{escape(location)}</a>'.encode(),
                        "text/html; charset=utf-8",
                        [("location", location), ("set-cookie", cookie)])


def main(options: AppOptions) -> int:
    service = ProductPage(upstream("details"), upstream("reviews"), upstream("ratings"))
    server = HttpServer(service.handle)
    return run(lambda: start_servers(server.serve_connection, options.listen, options.ports))
