"""The sites' gateway: the only SuperLink endpoint the network sees, and it serves Fleet only.

Flower 1.42's SuperLink serves its Fleet API (``/v1/fleet/...``, what SuperNodes use), its
Control API (``/v1/control/...``: start runs, register node keys) and its Runtime API
(``/v1/runtime/...``: what ServerApp processes use) on ONE HTTP port, and the Control API
has no authentication in the open-source build. fedrad therefore never exposes that port:

- the SuperLink listens on the coordinator machine's loopback only
  (``flower-superlink --host 127.0.0.1 --port 9093 ...``, TLS and site authentication on);
- this gateway listens on the address the sites reach, with the same TLS certificate, and
  forwards ``/v1/fleet/...`` requests unchanged (SuperNode signatures included) to the
  SuperLink; every other path is answered ``403`` with an explanation and logged;
- the coordinator reaches the Control API on the coordinator machine itself (or through an
  SSH tunnel to it), so "who may start runs" becomes "who may log in to that machine".

Run it with ``python -m fedrad.server.gateway --listen 0.0.0.0:9092 --superlink
https://127.0.0.1:9093 --ca-cert ca.crt --certfile server.pem --keyfile server.key``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

__all__ = ["FLEET_PREFIX", "DEFAULT_MAX_BODY", "create_gateway", "main"]

log = logging.getLogger(__name__)

FLEET_PREFIX = "/v1/fleet/"
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailers", "transfer-encoding", "upgrade", "host", "content-length"}
REFUSAL = ("fedrad gateway: only the Fleet API (/v1/fleet/) is served on this address; the "
           "Control and Runtime APIs are reachable only on the coordinator's own machine "
           "(use an SSH tunnel to it)")


def _upstream_verify(ca_cert: Path | None) -> ssl.SSLContext | bool:
    if ca_cert is None:
        return False  # plain HTTP upstream (an --insecure SuperLink on loopback)
    return ssl.create_default_context(cafile=str(ca_cert))


DEFAULT_MAX_BODY = 64 * 2**20  # Flower pushes arrays in chunks of 5 MiB


def create_gateway(superlink: str, *, ca_cert: Path | None = None, timeout: float = 600.0,
                   max_body: int = DEFAULT_MAX_BODY, transport=None):
    """An ASGI app that forwards Fleet API requests to ``superlink`` and refuses the rest.

    ``superlink`` is the SuperLink's loopback URL (``https://127.0.0.1:9093``); ``ca_cert``
    is the study CA that its certificate chains to (``None`` for a plain-HTTP upstream).
    ``transport`` replaces the network transport to the SuperLink (an ``httpx`` transport,
    e.g. a Unix socket's).
    """
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    client = httpx.AsyncClient(base_url=superlink, verify=_upstream_verify(ca_cert),
                               timeout=timeout, transport=transport)

    async def forward(request: Request) -> Response:
        path = request.url.path
        peer = request.client.host if request.client else "unknown"
        if not path.startswith(FLEET_PREFIX) or ".." in path or "//" in path:
            log.warning("refused %s %s from %s: not a Fleet API path", request.method, path,
                        peer)
            return PlainTextResponse(REFUSAL, status_code=403)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                log.warning("refused %s %s from %s: body over %d bytes", request.method, path,
                            peer, max_body)
                return PlainTextResponse("fedrad gateway: request body too large",
                                         status_code=413)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP]
        try:
            upstream = await client.request(
                request.method, path, params=request.url.query or None,
                content=bytes(body), headers=headers)
        except httpx.HTTPError as err:
            log.error("the SuperLink at %s did not answer %s: %s", superlink, path, err)
            return PlainTextResponse("fedrad gateway: the SuperLink is not reachable",
                                     status_code=502)
        out_headers = {k: v for k, v in upstream.headers.items()
                       if k.lower() not in _HOP_BY_HOP and k.lower() != "content-encoding"}
        return Response(content=upstream.content, status_code=upstream.status_code,
                        headers=out_headers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)],
                     lifespan=lifespan)


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not host:port, e.g. 0.0.0.0:9092")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> None:
    """``python -m fedrad.server.gateway``: serve the Fleet API to the sites."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=_host_port, required=True,
                        help="address the sites reach, e.g. 0.0.0.0:9092")
    parser.add_argument("--superlink", required=True,
                        help="the SuperLink on loopback, e.g. https://127.0.0.1:9093")
    parser.add_argument("--ca-cert", type=Path, help="study CA (verifies the SuperLink)")
    parser.add_argument("--certfile", type=Path, help="TLS certificate shown to the sites")
    parser.add_argument("--keyfile", type=Path, help="its private key")
    parser.add_argument("--max-body-mib", type=int, default=DEFAULT_MAX_BODY // 2**20,
                        help="largest request body forwarded (MiB)")
    parser.add_argument("--insecure", action="store_true",
                        help="serve the sites without TLS (tests on loopback only)")
    args = parser.parse_args(argv)
    if not args.insecure and (args.certfile is None or args.keyfile is None):
        parser.error("--certfile and --keyfile are required (the study's server.pem and "
                     "server.key); pass --insecure only for a loopback test")
    if args.superlink.startswith("https://") and args.ca_cert is None:
        parser.error("--ca-cert is required to verify an https:// SuperLink")
    host, port = args.listen
    logging.basicConfig(level=logging.INFO, format="fedrad gateway %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per forwarded poll
    log.info("serving the Fleet API on %s:%d, forwarding to %s", host, port, args.superlink)
    gateway = create_gateway(args.superlink, ca_cert=args.ca_cert,
                             max_body=args.max_body_mib * 2**20)
    uvicorn.run(gateway, host=host, port=port,
                ssl_certfile=None if args.insecure else str(args.certfile),
                ssl_keyfile=None if args.insecure else str(args.keyfile),
                log_level="warning")


if __name__ == "__main__":
    main()
