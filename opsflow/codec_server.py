"""`opsflow codec-server`: Temporal's remote codec endpoints so the web UI and `temporal workflow show
--codec-endpoint` show decrypted inputs, details and reports to those who can reach it.

POST /encode and POST /decode take and return a Payloads message as protobuf JSON ({"payloads": [...]});
the UI sends `X-Namespace` and, when configured to, the user's `Authorization`. CORS admits the UI's origin
(--ui-origin, e.g. http://127.0.0.1:8233; the UI's "Codec Server" setting points at this server).
Serve it where only people allowed to read the histories can reach it (e.g. behind the SSO proxy, with
--require-auth), since it decrypts for anyone who can post to it. It refuses to listen on an address other than
loopback without --require-auth, and answers only requests whose Host is its own loopback name or address, the
address it listens on, or a name given with --allowed-host: a web page whose name an attacker re-points at
127.0.0.1 (DNS rebinding) reaches the server with its own name as Host, and gets 421.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import os
import sys
from typing import TYPE_CHECKING, Awaitable, Callable

if TYPE_CHECKING:  # aiohttp is imported when the server is built: every `opsflow` command builds this parser
    from aiohttp import web
    from temporalio.converter import PayloadCodec

DEFAULT_PORT = 8081
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another name, or "" / 0.0.0.0 (every interface): not only this machine


def host_name(header: str) -> str:
    """The name in a Host header, without its port: 'a.example:8081' -> 'a.example', '[::1]:8081' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def build_app(codec: PayloadCodec, ui_origins: list[str], auth_token: str | None = None,
              allowed_hosts: list[str] | None = None) -> web.Application:
    """`allowed_hosts`: the names a request's Host may carry besides loopback's (the listening address, a proxy's
    name); anything else gets 421."""
    from aiohttp import hdrs, web
    from google.protobuf import json_format
    from temporalio.api.common.v1 import Payloads

    allowed = {o.rstrip("/") for o in ui_origins}
    hosts = {h.strip("[]").lower() for h in (*LOOPBACK_NAMES, *(allowed_hosts or []))}

    @web.middleware
    async def check_host(req: web.Request, handler):
        # Checked before anything else, preflights included: a rebound name must learn nothing from us.
        if host_name(req.headers.get(hdrs.HOST, "")) not in hosts:
            return web.json_response({"error": "unknown Host: this codec server answers only to its own names"},
                                     status=421)
        return await handler(req)

    def cors(req: web.Request, resp: web.StreamResponse) -> None:
        origin = req.headers.get(hdrs.ORIGIN)
        if origin and origin.rstrip("/") in allowed:
            resp.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
            resp.headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = "POST"
            resp.headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = "content-type,x-namespace,authorization"
            resp.headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
            resp.headers[hdrs.VARY] = "Origin"

    async def options(req: web.Request) -> web.Response:
        resp = web.Response()
        cors(req, resp)
        return resp

    def handler(fn: Callable[[list], Awaitable[list]]):
        async def handle(req: web.Request) -> web.Response:
            if auth_token is not None:
                given = req.headers.get(hdrs.AUTHORIZATION, "")
                if not hmac.compare_digest(given.encode(), f"Bearer {auth_token}".encode()):
                    resp = web.json_response({"error": "unauthorized"}, status=401)
                    cors(req, resp)
                    return resp
            try:
                payloads = json_format.Parse(await req.read(), Payloads())
                payloads = Payloads(payloads=await fn(list(payloads.payloads)))
            except Exception as e:  # noqa: BLE001 - a bad request, an unknown key id: say so, keep serving
                resp = web.json_response({"error": f"{type(e).__name__}: {e}"}, status=400)
                cors(req, resp)
                return resp
            resp = web.Response(text=json_format.MessageToJson(payloads), content_type="application/json")
            cors(req, resp)
            return resp

        return handle

    app = web.Application(middlewares=[check_host])
    app.add_routes([
        web.post("/encode", handler(codec.encode)),
        web.post("/decode", handler(codec.decode)),
        web.options("/encode", options),
        web.options("/decode", options),
        # The UI may be configured with a namespace in the path: /{namespace}/decode
        web.post("/{namespace}/encode", handler(codec.encode)),
        web.post("/{namespace}/decode", handler(codec.decode)),
        web.options("/{namespace}/encode", options),
        web.options("/{namespace}/decode", options),
    ])
    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--ui-origin", action="append", default=[], metavar="URL",
                        help="the Temporal UI's origin to admit (CORS), e.g. http://127.0.0.1:8233 (repeatable); "
                             "default: the running lab's UI")
    parser.add_argument("--require-auth", action="store_true",
                        help="require 'Authorization: Bearer $OPSFLOW_CODEC_SERVER_TOKEN' on every request "
                             "(needed to listen on an address other than loopback)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="a name clients reach the server by (the Host they send, e.g. a proxy's), besides "
                             "localhost and the listening address (repeatable)")


def run_from_args(args: argparse.Namespace) -> int:
    from aiohttp import web

    from opsflow.client import lab_state
    from opsflow.codec import CodecConfigError, codec_from_env

    if not is_loopback(args.host) and not args.require_auth:
        print(f"error: --host {args.host or '(every interface)'} is not a loopback address: the codec server decrypts "
              "for anyone who can reach it, so listening there needs --require-auth (and "
              "OPSFLOW_CODEC_SERVER_TOKEN); or listen on 127.0.0.1 behind an authenticating proxy", file=sys.stderr)
        return 2
    try:
        codec = codec_from_env()
    except CodecConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if codec is None:
        print(
            "error: no codec key: set OPSFLOW_CODEC_KEY (a secret reference) or OPSFLOW_CODEC_KEY_FILE", file=sys.stderr
        )
        return 2
    token = None
    if args.require_auth:
        token = os.environ.get("OPSFLOW_CODEC_SERVER_TOKEN")
        if not token:
            print("error: --require-auth needs OPSFLOW_CODEC_SERVER_TOKEN", file=sys.stderr)
            return 2
    origins = list(args.ui_origin)
    lab = lab_state()
    if not origins and lab:
        origins = [lab["temporal"]["ui_url"]]
    codec.accept_plaintext = True  # it only shows payloads: those of histories recorded before encryption, as they are
    hosts = [*args.allowed_host, *([args.host] if args.host not in ("", "0.0.0.0", "::") else [])]
    ready = f"codec server on http://{args.host}:{args.port} (UI origins: {', '.join(origins) or 'none'})"
    # Printed once listening (run_app calls it then), so whoever started the server can wait for this line.
    web.run_app(build_app(codec, origins, token, hosts), host=args.host, port=args.port,
                print=lambda _: print(ready, flush=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="opsflow codec-server", description="Temporal remote codec endpoints for opsflow's payload encryption."
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
