"""The demo app that ``trustmesh brc103 serve`` puts behind BRC-104.

Routes (all behind mutual authentication):

- ``GET /hello`` → ``{"hello": <client identity key>}``
- ``POST /echo`` → the JSON body back, with ``x-bsv-echo: yes`` (signed: it is an
  ``x-bsv-*`` header)
- ``POST /echo-text``, ``POST /echo-bin`` → the body back, same content type
- ``GET /empty`` → 204
- ``GET /status/<code>`` → that status, with a small JSON body
"""

from __future__ import annotations

from aiohttp import web

from trustmesh.api.brc104 import CERTIFICATES, Brc104Server, identity_key_of
from trustmesh.errors import DecodeError
from trustmesh.wire.jsonwire import strict_loads

MAX_BODY = web.AppKey("max_body", int)


async def hello(request: web.Request) -> web.Response:
    body: dict[str, object] = {"hello": identity_key_of(request)}
    certificates = request.get(CERTIFICATES) or []
    if certificates:
        body["certificates"] = [
            {
                "type": c.certificate.type,
                "certifier": c.certificate.certifier,
                "fields": c.decrypted_fields,
            }
            for c in certificates
        ]
    return web.json_response(body)


async def echo(request: web.Request) -> web.Response:
    raw = await request.read()
    try:
        strict_loads(raw, max_size=request.app[MAX_BODY])
    except DecodeError as exc:
        return web.json_response({"error": f"the body is not JSON: {exc}"}, status=400)
    return web.Response(body=raw, content_type="application/json", headers={"x-bsv-echo": "yes"})


async def echo_body(request: web.Request) -> web.Response:
    raw = await request.read()
    content_type = request.headers.get("Content-Type", "application/octet-stream")
    response = web.Response(body=raw)
    response.headers["Content-Type"] = content_type
    return response


async def empty(_request: web.Request) -> web.Response:
    return web.Response(status=204)


async def status(request: web.Request) -> web.Response:
    try:
        code = int(request.match_info["code"])
    except ValueError:
        code = 0
    if not 200 <= code <= 599:
        return web.json_response({"error": "the status must be 200-599"}, status=400)
    if code in (204, 304):
        return web.Response(status=code)
    return web.json_response({"status": code}, status=code)


def demo_app(server: Brc104Server, *, max_body: int = 1024 * 1024) -> web.Application:
    app = web.Application(client_max_size=max_body)
    app[MAX_BODY] = max_body
    server.install(app)
    app.router.add_get("/hello", hello)
    app.router.add_post("/echo", echo)
    app.router.add_post("/echo-text", echo_body)
    app.router.add_post("/echo-bin", echo_body)
    app.router.add_get("/empty", empty)
    app.router.add_get(r"/status/{code}", status)
    return app
