"""The few HTML pages the browser routes answer with: every value escaped, nothing loaded from elsewhere, no
script, never framed, never cached."""

from __future__ import annotations

import html

from aiohttp import web

__all__ = ["BROWSER_HEADERS", "escape", "page", "redirect"]

# No script runs and nothing is fetched: forms may post back to the publisher only.
BROWSER_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_STYLE = "body{font-family:system-ui,sans-serif;max-width:44rem;margin:3rem auto;padding:0 1rem;line-height:1.5}"


def escape(text: object) -> str:
    """`text` safe inside HTML, attribute values included."""
    return html.escape(str(text), quote=True)


def page(title: str, body: str, *, status: int = 200) -> web.Response:
    """A whole page: `title` is escaped here, `body` is HTML the caller escaped."""
    head = f'<meta charset="utf-8"><title>{escape(title)} · keyrelay</title><style>{_STYLE}</style>'
    document = f'<!doctype html><html lang="en"><head>{head}</head><body><h1>{escape(title)}</h1>{body}</body></html>'
    return web.Response(text=document, status=status, content_type="text/html", headers=BROWSER_HEADERS)


def redirect(location: str, status: int = 303) -> web.Response:
    """A redirect the browser follows (never cached)."""
    return web.Response(status=status, headers={**BROWSER_HEADERS, "Location": location})
