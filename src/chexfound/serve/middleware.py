"""ASGI middleware of the service: the upload size gate and the security headers on every response."""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Multipart framing around the file (boundaries, headers) on top of the file's own bytes.
MULTIPART_SLACK = 64 * 1024

# The page loads only its own script, styles and images and talks only to this server; nothing inline, no
# frames (clickjacking), no referrer leaking image ids, and no MIME sniffing of the PNGs and JSON we send.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every HTTP response (a header the route set itself is kept)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._raw = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                have = {k.lower() for k, _ in headers}
                headers.extend((k, v) for k, v in self._raw if k not in have)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class UploadLimit:
    """Reject oversized uploads to `path` (and the routes under it, e.g. /v1/predict/sr) from the
    Content-Length header, before the body is read or spooled."""

    def __init__(self, app: ASGIApp, max_bytes: int, path: str) -> None:
        self.app, self.max_bytes, self.path = app, max_bytes, path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and (
                scope["path"] == self.path or scope["path"].startswith(self.path + "/")):
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            if length is None:
                await JSONResponse({"detail": "uploads need a Content-Length header"}, 411)(scope, receive, send)
                return
            if not length.isdigit() or int(length) > self.max_bytes + MULTIPART_SLACK:
                await JSONResponse({"detail": f"upload too large: {length.decode(errors='replace')} bytes "
                                              f"(limit {self.max_bytes})"}, 413)(scope, receive, send)
                return
        await self.app(scope, receive, send)
