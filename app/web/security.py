"""CSRF on every form, security headers on every response, and error pages
(JSON under /api, HTML elsewhere)."""

from __future__ import annotations

from flask import Flask, Response, jsonify, render_template, request
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException

csrf = CSRFProtect()

# No inline script or style anywhere: everything comes from /static.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # Approval links carry a token in the path: never send it on as a Referer.
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def init_app(app: Flask) -> None:
    csrf.init_app(app)
    app.after_request(add_headers)
    app.register_error_handler(CSRFError, csrf_failed)
    app.register_error_handler(HTTPException, http_error)


def add_headers(response: Response) -> Response:
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def wants_json() -> bool:
    return request.path.startswith("/api/")


def csrf_failed(error: CSRFError) -> tuple[str, int]:
    return (
        render_template(
            "error.html",
            title="The form could not be verified",
            message="It was not sent from a page of this site, or your session changed. "
            "Go back, reload the page and try again. Nothing was changed.",
        ),
        400,
    )


def http_error(error: HTTPException) -> tuple[Response | str, int]:
    status = error.code or 500
    if wants_json():
        return jsonify(error=error.description or error.name), status
    return render_template("error.html", title=error.name, message=error.description), status
