"""The sites' door to the coordinator: only Flower's Fleet API, nothing else.

Flower 1.41's SuperLink serves the Fleet API (what SuperNodes call), the Control API
(``flwr run``, ``ls``, ``stop``, ``supernode register``) and the ServerApp runtime API on
one HTTP port, and its open-source build has no authentication for the Control API (the
account login it offers is an enterprise plugin). Whoever could reach the sites' port could
therefore submit a run whose code executes on the coordinator, register keys and stop runs.

So ``fedmed-server`` binds the SuperLink to loopback only, on a port of its own, and puts
this gateway on the address the operator names for the sites: it terminates TLS with the
coordinator's certificate and forwards ``POST /v1/fleet/...`` requests, headers and body
unchanged (a SuperNode's signed identity headers stay valid), to the loopback SuperLink.
Every other method or path is answered 404 and logged with the caller's address. The
Control and runtime APIs are then reachable only from the coordinator host itself.

Run as ``python -m fedmed.deploy.gateway`` (a child process of ``fedmed-server``); the
HTTP server and client are uvicorn and httpx, which Flower itself uses.
"""

from __future__ import annotations

import argparse
import logging
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

FLEET_PREFIX = "/v1/fleet/"  # the only API a site needs
# Hop-by-hop headers (RFC 9110, 7.6.1) and those httpx and uvicorn set again themselves.
NOT_FORWARDED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
UPSTREAM_TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=600.0, pool=10.0)
# Largest request body forwarded. A site's biggest request carries one model vector (a
# ResNet-50 at width 64, 23.5 M parameters, is 94 MB as float32); anything far larger is
# refused before it is buffered, so a stranger cannot fill the coordinator's memory.
MAX_BODY = 512 * 2**20

log = logging.getLogger("fedmed.gateway")


def is_site_request(method: str, path: str) -> bool:
    """Whether a request is one a SuperNode makes: a POST to the Fleet API."""
    return method == "POST" and path.startswith(FLEET_PREFIX) and ".." not in path


def create_app(upstream: str, verify: ssl.SSLContext | bool) -> Starlette:
    """The gateway's ASGI app forwarding Fleet API calls to ``upstream`` (the SuperLink's base URL)."""
    client = httpx.AsyncClient(base_url=upstream, verify=verify, timeout=UPSTREAM_TIMEOUT)

    async def forward(request: Request) -> Response:
        caller = request.client.host if request.client else "unknown"
        if not is_site_request(request.method, request.url.path):
            log.warning(
                "refused %s %s from %s: only the Fleet API is served on the sites' port",
                request.method,
                request.url.path[:200].encode("unicode_escape").decode("ascii"),
                caller,
            )
            return PlainTextResponse("not found", status_code=404)
        body = await _bounded_body(request)
        if body is None:
            log.warning("refused %s from %s: body over %d bytes", request.url.path, caller, MAX_BODY)
            return PlainTextResponse("request too large", status_code=413)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in NOT_FORWARDED]
        outgoing = client.build_request(
            request.method, request.url.path, params=request.query_params, headers=headers, content=body
        )
        try:
            answer = await client.send(outgoing, stream=True)
        except httpx.HTTPError as error:
            log.warning("the SuperLink did not answer %s: %s", request.url.path, error)
            return PlainTextResponse("coordinator unavailable", status_code=503)
        kept = {k: v for k, v in answer.headers.items() if k.lower() not in NOT_FORWARDED}
        return StreamingResponse(
            answer.aiter_raw(), status_code=answer.status_code, headers=kept, background=BackgroundTask(answer.aclose)
        )

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    routes = [Route("/{path:path}", forward, methods=methods)]

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    return Starlette(routes=routes, lifespan=lifespan)


async def _bounded_body(request: Request) -> bytes | None:
    """The request's body, or None as soon as it passes ``MAX_BODY`` (nothing more is read)."""
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > MAX_BODY:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            return None
    return bytes(body)


def upstream_tls(ca_certfile: str) -> ssl.SSLContext:
    """TLS to the loopback SuperLink: its certificate must chain to the coordinator's CA.
    The host name is not checked (the SuperLink is this host's own child, dialled on
    127.0.0.1, and an operator's certificate may not name loopback)."""
    context = ssl.create_default_context(cafile=ca_certfile)
    context.check_hostname = False
    return context


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedmed.deploy.gateway",
        description="Forward only Flower's Fleet API from the sites' address to a "
        "loopback SuperLink (started by fedmed-server).",
    )
    p.add_argument("--host", required=True, help="address the sites connect to")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream-port", type=int, required=True, help="the SuperLink's port on 127.0.0.1")
    p.add_argument("--certfile", help="the coordinator's TLS certificate (absent: no TLS)")
    p.add_argument("--keyfile")
    p.add_argument("--ca-certfile")
    args = p.parse_args(argv)
    tls = args.certfile is not None
    if tls and not (args.keyfile and args.ca_certfile):
        p.error("--certfile needs --keyfile and --ca-certfile")
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per forwarded request
    scheme = "https" if tls else "http"
    app = create_app(f"{scheme}://127.0.0.1:{args.upstream_port}", upstream_tls(args.ca_certfile) if tls else False)
    log.info("fedmed gateway on %s:%s forwards the Fleet API to 127.0.0.1:%s", args.host, args.port, args.upstream_port)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile,
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
