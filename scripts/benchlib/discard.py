"""The HTTP ceiling: a Litestar/hypercorn endpoint that parses multipart bodies and drops them.

Run as `python -m scripts.benchlib.discard PORT`; it reads `request.receive` and feeds the same
push parser the gateway uses, on the gateway's event loop, so the only difference from the gateway
is the work after parsing.
"""

from __future__ import annotations

import sys
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config
from litestar import Litestar, Request, Response, post
from multipart import PushMultipartParser, parse_options_header

from gateway.system import eventloop


@post("/api/device/images/upload", status_code=201)
async def discard(request: Request[Any, Any, Any]) -> Response[bytes]:
    _, options = parse_options_header(request.headers.get("content-type", ""))
    parser = PushMultipartParser(options["boundary"].encode())
    size = 0
    while True:
        message = await request.receive()
        for event in parser.parse(message.get("body", b"")) if message.get("body") else ():
            if isinstance(event, (bytes, bytearray)):
                size += len(event)
        if not message.get("more_body", False):
            break
    return Response(b'{"success":true,"data":{"bytes":%d}}' % size, status_code=201, media_type="application/json")


def main() -> None:
    config = Config()
    config.bind = [f"127.0.0.1:{int(sys.argv[1])}"]
    config.accesslog = None
    app = Litestar([discard], request_max_body_size=None, logging_config=None, openapi_config=None)
    eventloop.run(lambda: serve(app, config))  # type: ignore[arg-type]  # the gateway's own loop


if __name__ == "__main__":
    main()
