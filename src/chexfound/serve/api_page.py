"""The API reference at /docs: plain HTML rendered from the app's own OpenAPI document.

Swagger UI would load its script and styles from a CDN (a blank page offline, and a hole in the page's
Content-Security-Policy); no installed package ships its assets, so we render the reference ourselves:
every route with its parameters, request body and responses, and a link to /openapi.json for tools.
"""

from __future__ import annotations

from html import escape
from typing import Any


def render_api_page(spec: dict[str, Any]) -> str:
    info = spec.get("info", {})
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(info.get('title', 'API'))} API</title>",
        '<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">'
        '<link rel="stylesheet" href="/static/style.css"></head><body class="api">',
        f"<header><h1>{escape(info.get('title', 'API'))} API</h1>"
        f'<span class="muted">version {escape(str(info.get("version", "")))}</span>'
        '<a href="/">the page</a><a href="/openapi.json">openapi.json</a></header>',
        "<main>",
        f"<p>{escape(info.get('description', ''))}</p>",
    ]
    for path, methods in spec.get("paths", {}).items():
        for method, op in methods.items():
            parts.append(_operation(path, method, op, spec))
    parts.append("</main></body></html>")
    return "\n".join(parts)


def _operation(path: str, method: str, op: dict[str, Any], spec: dict[str, Any]) -> str:
    anchor = f"{method}-{path}".replace("/", "-").replace("{", "").replace("}", "")
    out = [f'<section class="op" id="{escape(anchor)}">',
           f'<h2><span class="method">{escape(method.upper())}</span> <code>{escape(path)}</code></h2>']
    if op.get("summary"):
        out.append(f"<p>{escape(op['summary'])}</p>")
    if op.get("description"):
        out.append(f"<p class=\"muted\">{escape(op['description'])}</p>")
    params = op.get("parameters", [])
    body = _body_fields(op, spec)
    if params or body:
        out.append("<table><tr><th>parameter</th><th>in</th><th>type</th><th>required</th><th>description</th></tr>")
        for p in params:
            schema = p.get("schema", {})
            out.append(_row(p["name"], p.get("in", ""), _type(schema, spec), p.get("required", False),
                            p.get("description") or schema.get("description", ""), schema.get("default")))
        for name, where, schema, required in body:
            out.append(_row(name, where, _type(schema, spec), required, schema.get("description", ""),
                            schema.get("default")))
        out.append("</table>")
    responses = op.get("responses", {})
    if responses:
        out.append("<table><tr><th>status</th><th>meaning</th><th>content</th></tr>")
        for status, r in responses.items():
            content = ", ".join(r.get("content", {}))
            out.append(f"<tr><td>{escape(str(status))}</td><td>{escape(r.get('description', ''))}</td>"
                       f"<td>{escape(content)}</td></tr>")
        out.append("</table>")
    out.append("</section>")
    return "\n".join(out)


def _row(name: str, where: str, typ: str, required: bool, description: str, default: Any) -> str:
    extra = "" if default is None else f" (default {default!r})"
    return (f"<tr><td><code>{escape(name)}</code></td><td>{escape(where)}</td><td>{escape(typ)}</td>"
            f"<td>{'yes' if required else 'no'}</td><td>{escape(description + extra)}</td></tr>")


def _body_fields(op: dict[str, Any], spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], bool]]:
    """The request body's fields as (name, content type, schema, required)."""
    out = []
    for ctype, media in op.get("requestBody", {}).get("content", {}).items():
        schema = _resolve(media.get("schema", {}), spec)
        required = set(schema.get("required", []))
        for name, sub in schema.get("properties", {}).items():
            out.append((name, ctype, _resolve(sub, spec), name in required))
    return out


def _resolve(schema: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if not ref:
        return schema
    node: Any = spec
    for key in ref.removeprefix("#/").split("/"):
        node = node.get(key, {})
    return node


def _type(schema: dict[str, Any], spec: dict[str, Any]) -> str:
    schema = _resolve(schema, spec)
    if "enum" in schema:
        return " | ".join(map(str, schema["enum"]))
    if "anyOf" in schema:
        return " | ".join(_type(s, spec) for s in schema["anyOf"])
    t = schema.get("type", "object")
    if schema.get("format") == "binary" or schema.get("contentMediaType"):
        return "file"
    return str(t)
